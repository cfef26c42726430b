"""A 401 reloads the kubeconfig; when only the token changed, open watches must carry on. Credentials past
their expiry are reloaded before they are sent, and many requests refused at once reload them once.

Exec-plugin tokens (EKS) expire every 15 minutes, so tearing down every watch on each reload would relist
every collection four times an hour. The fake API server (tests/unit/fake_api.py) serves TLS from a test CA,
as a real one does, because the TLS settings are what decide whether the session is rebuilt.
"""

from __future__ import annotations

import base64
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
import yaml

from app.kube.client import KubeClient, KubeUnavailable, WatchEvent
from app.kube.config import KubeConnection, load_connection
from devstack.certs import TestCA
from tests.unit.fake_api import PATH, FakeApi, serving

pytestmark = pytest.mark.anyio


def write_kubeconfig(path: Path, server: str, ca_file: Path, token: str, *, insecure: bool = False) -> Path:
    cluster: dict[str, object] = {"server": server}
    if insecure:
        cluster["insecure-skip-tls-verify"] = True
    else:
        cluster["certificate-authority-data"] = base64.b64encode(ca_file.read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ssl.SSLContext]:
    """A CA file and a server TLS context with a certificate for 127.0.0.1 issued by it."""
    ca = TestCA(tmp_path_factory.mktemp("ca"))
    cert, key = ca.issue("fake-api")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return ca.ca_file, context


class Events:
    """A watch's events as they are handed on, and how the watch ended."""

    def __init__(self) -> None:
        self.send, self.received = anyio.create_memory_object_stream[WatchEvent](100)
        self.ended: BaseException | None = None

    async def next(self) -> WatchEvent:
        """The next event; the watch's own exception once it ended."""
        try:
            return await self.received.receive()
        except anyio.EndOfStream:
            assert self.ended is not None, "the watch ended without an error"
            raise self.ended from None

    async def watch(self, client: KubeClient) -> None:
        with self.send:
            try:
                await client.watch(
                    PATH,
                    resource_version="5",
                    on_event=self.send.send_nowait,
                    timeout_seconds=60,
                    idle_timeout=60,
                )
            except Exception as exc:
                self.ended = exc


@asynccontextmanager
async def open_watch(
    test_ca: tuple[Path, ssl.SSLContext], tmp_path: Path
) -> AsyncIterator[tuple[FakeApi, KubeClient, Events, Path]]:
    """A client with a stale token (which the fake refuses) holding a watch open past its first event."""
    ca_file, server_tls = test_ca
    async with serving(FakeApi("hold", valid_token="fresh"), server_tls) as api:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url, ca_file, "stale")
        connection = await load_connection(str(kubeconfig))
        async with KubeClient(connection, reload=partial(load_connection, str(kubeconfig))) as client:
            events = Events()
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(events.watch, client)
                with anyio.fail_after(10):
                    assert (await events.next()).type == "BOOKMARK"  # the watch is open
                yield api, client, events, kubeconfig
                tasks.cancel_scope.cancel()


async def test_a_watch_survives_a_401_that_only_rotated_the_token(
    test_ca: tuple[Path, ssl.SSLContext], tmp_path: Path
) -> None:
    ca_file, _ = test_ca
    async with open_watch(test_ca, tmp_path) as (api, client, events, kubeconfig):
        with anyio.fail_after(10):
            write_kubeconfig(kubeconfig, api.url, ca_file, "fresh")  # the token rotated
            await client.get(PATH + "/x")  # 401, reload, retried with the fresh token
            assert api.unauthorized == 1

            api.push.set()  # the server sends one more event on the watch opened before the 401
            event = await events.next()
    assert event.type == "ADDED"
    assert api.watches == 1, "the watch was opened again: the reload tore the session down"


async def test_a_reload_that_changed_tls_ends_open_watches_as_unavailable(
    test_ca: tuple[Path, ssl.SSLContext], tmp_path: Path
) -> None:
    """New TLS settings need new connections: the watch ends with an error the watcher retries."""
    ca_file, _ = test_ca
    async with open_watch(test_ca, tmp_path) as (api, client, events, kubeconfig):
        with anyio.fail_after(10):
            write_kubeconfig(kubeconfig, api.url, ca_file, "fresh", insecure=True)
            await client.get(PATH + "/x")
            with pytest.raises(KubeUnavailable, match="closed for new TLS settings"):
                await events.next()


async def test_the_tls_fingerprint_follows_the_tls_settings_not_the_token(
    test_ca: tuple[Path, ssl.SSLContext], tmp_path: Path
) -> None:
    ca_file, _ = test_ca
    server = "https://127.0.0.1:1"
    kubeconfig = tmp_path / "kubeconfig"
    first = await load_connection(str(write_kubeconfig(kubeconfig, server, ca_file, "token-one")))
    second = await load_connection(str(write_kubeconfig(kubeconfig, server, ca_file, "token-two")))
    insecure = await load_connection(
        str(write_kubeconfig(kubeconfig, server, ca_file, "token-two", insecure=True))
    )
    assert first.ssl_context is not second.ssl_context  # rebuilt at each load: no use comparing those
    assert first.tls_fingerprint == second.tls_fingerprint
    assert insecure.tls_fingerprint != second.tls_fingerprint
    assert "token-one" not in repr(first), "the token must not show in a repr"


def plain(url: str, token: str, expires_at: float | None = None) -> KubeConnection:
    return KubeConnection(
        host=url,
        authorization=f"Bearer {token}",
        ssl_context=False,
        namespace="default",
        source="test",
        expires_at=expires_at,
    )


class Reloads:
    """A reload function that counts its calls and hands out `fresh` (or raises `error`)."""

    def __init__(self, fresh: KubeConnection | None = None, error: Exception | None = None) -> None:
        self.fresh, self.error, self.calls = fresh, error, 0

    async def __call__(self) -> KubeConnection:
        self.calls += 1
        await anyio.lowlevel.checkpoint()  # let the other requests queue up behind this reload
        if self.error is not None:
            raise self.error
        assert self.fresh is not None
        return self.fresh


async def test_expired_credentials_are_loaded_again_before_they_are_sent() -> None:
    """An exec plugin's token past its expirationTimestamp is renewed first, as kubectl does: no 401."""
    async with serving(FakeApi("hold", valid_token="fresh")) as api:
        reloads = Reloads(plain(api.url, "fresh"))
        async with KubeClient(plain(api.url, "stale", expires_at=time.time() - 1), reload=reloads) as client:
            await client.get(PATH + "/x")
            await client.get(PATH + "/y")
    assert (reloads.calls, api.unauthorized, api.gets) == (1, 0, 2)


async def test_concurrent_401s_reload_the_credentials_once() -> None:
    """Thirty requests refused together run the exec plugin once, not thirty times."""
    async with serving(FakeApi("hold", valid_token="fresh")) as api:
        reloads = Reloads(plain(api.url, "fresh"))
        async with (
            KubeClient(plain(api.url, "stale"), reload=reloads) as client,
            anyio.create_task_group() as tg,
        ):
            for i in range(30):
                tg.start_soon(client.get, f"{PATH}/o{i}")
    assert reloads.calls == 1
    assert api.gets == 30 + api.unauthorized


async def test_a_failed_renewal_is_not_tried_again_at_every_request(caplog: pytest.LogCaptureFixture) -> None:
    """A plugin that keeps failing is logged once per RELOAD_RETRY, not once per request; the old
    credentials are sent meanwhile (the API server may still take them)."""
    async with serving(FakeApi("hold")) as api:
        reloads = Reloads(error=RuntimeError("the exec plugin aws exited with 1"))
        async with KubeClient(plain(api.url, "old", expires_at=time.time() - 1), reload=reloads) as client:
            for name in ("a", "b", "c"):
                await client.get(f"{PATH}/{name}")
    assert (reloads.calls, api.gets) == (1, 3)
    assert [r.message for r in caplog.records].count(
        "could not reload Kubernetes credentials: the exec plugin aws exited with 1"
    ) == 1


async def test_credentials_that_come_back_expired_are_not_fetched_at_every_request() -> None:
    async with serving(FakeApi("hold")) as api:
        reloads = Reloads(plain(api.url, "fresh", expires_at=time.time() - 60))
        async with KubeClient(plain(api.url, "old", expires_at=time.time() - 1), reload=reloads) as client:
            for name in ("a", "b", "c"):
                await client.get(f"{PATH}/{name}")
    assert (reloads.calls, api.gets) == (1, 3)
