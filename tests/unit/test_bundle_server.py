"""The bundle endpoint's answers, over HTTP on loopback: the token, 503 before the first complete load, 304
for a current ETag, long polls woken by a change, and when a delta is sent rather than a snapshot; and the
status service (`POST /status`). Real OPAs downloading from kopa and reporting to it are in
tests/integration/test_bundle_mode.py."""

from __future__ import annotations

import gzip
import io
import ssl
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import anyio
import orjson
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from app.bundle.state import BundleState
from app.opa.credentials import CredentialsError
from app.server.bundle import (
    CONTENT_TYPE,
    MAX_STATUS_BYTES,
    BundleServer,
    Preferences,
    etag_of,
    reloading_server_tls,
    server_tls,
)
from devstack.certs import TestCA
from tests.unit.polling import until
from tests.unit.test_fleet import REFUSED

pytestmark = pytest.mark.anyio

TOKEN = "a-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LONG_POLL = "modes=snapshot,delta;wait=30"


@pytest.fixture
async def served() -> AsyncIterator[tuple[BundleState, BundleServer, str]]:
    state = BundleState()
    server = BundleServer(state, "127.0.0.1", 0, token=lambda: TOKEN)
    async with TestServer(server.app(), host="127.0.0.1") as test_server:
        yield state, server, str(test_server.make_url("/bundles/kopa"))


async def get(url: str, **headers: str) -> tuple[int, CIMultiDict[str], bytes]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(url, headers=headers) as response,
    ):
        return response.status, CIMultiDict(response.headers), await response.read()


def files_of(body: bytes) -> set[str]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(body))) as tar:
        return set(tar.getnames())


async def test_the_token_is_required(served: tuple[BundleState, BundleServer, str]) -> None:
    state, server, url = served
    state.publish()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        status, answer, body = await get(url, **headers)
        assert status == 401
        assert TOKEN.encode() not in body
        assert answer["WWW-Authenticate"].startswith("Bearer")
    assert (await get(url, **AUTH))[0] == 200
    assert server.stats.responses["unauthorized"] == 3


async def test_nothing_is_served_before_the_bundle_reflects_the_cluster(
    served: tuple[BundleState, BundleServer, str],
) -> None:
    """Before the first complete load the endpoint answers 503, so OPA activates no partial bundle and its
    /health?bundles stays unready; a long poll waiting then is answered as soon as it is published."""
    state, server, url = served
    await state.put_data(["ns", "cm", "k"], b'{"partial":true}')
    assert (await get(url, Prefer="modes=snapshot,delta;wait=0", **AUTH))[0] == 503
    async with anyio.create_task_group() as tg:
        answers: list[int] = []

        async def poll() -> None:
            answers.append((await get(url, Prefer=LONG_POLL, **AUTH))[0])

        tg.start_soon(poll)
        await until(lambda: server.stats.held == 1)
        state.publish()
    assert answers == [200]


async def test_current_etag_gets_304_and_a_long_poll_wakes_on_a_change(
    served: tuple[BundleState, BundleServer, str],
) -> None:
    state, server, url = served
    state.publish()
    await state.put_data(["ns", "cm", "k"], b'{"v":1}')
    status, headers, body = await get(url, **AUTH)
    assert (status, headers["Content-Type"]) == (200, CONTENT_TYPE)
    etag = headers["ETag"]
    assert etag == f'"{state.current.revision}"'
    assert files_of(body) == {"/.manifest", "/data.json"}

    assert (await get(url, **{"If-None-Match": etag}, **AUTH))[0] == 304
    with anyio.fail_after(5):  # held for wait minus one second, then 304
        status, headers, _ = await get(url, **{"If-None-Match": etag, "Prefer": "wait=1.5"}, **AUTH)
    assert (status, headers["ETag"]) == (304, etag)

    answers: list[tuple[int, CIMultiDict[str], bytes]] = []
    with anyio.fail_after(5):  # far less than the 30 s the long poll may wait
        async with anyio.create_task_group() as tg:

            async def poll() -> None:
                answers.append(await get(url, **{"If-None-Match": etag, "Prefer": LONG_POLL}, **AUTH))

            tg.start_soon(poll)
            await until(lambda: server.stats.held == 1)
            await state.put_data(["ns", "cm", "k"], b'{"v":2}')
    status, headers, body = answers[0]
    assert status == 200
    assert headers["ETag"] == f'"{state.current.revision}"'
    assert files_of(body) == {"/.manifest", "/patch.json"}
    assert server.stats.responses == {"snapshot": 1, "not_modified": 2, "delta": 1}


async def test_delta_or_snapshot(served: tuple[BundleState, BundleServer, str]) -> None:
    """A delta only for a client that takes deltas, holds a revision kopa still has in its log, and when only
    data changed since; a snapshot otherwise."""
    state, server, url = served
    state.publish()
    await state.put_data(["ns", "cm", "k"], b'{"v":1}')
    base = f'"{state.current.revision}"'
    await state.put_data(["ns", "cm", "k"], b'{"v":2}')

    def kind(body: bytes) -> str:
        return "delta" if "/patch.json" in files_of(body) else "snapshot"

    async def answer(etag: str, prefer: str = "modes=snapshot,delta") -> str:
        status, _, body = await get(url, **{"If-None-Match": etag, "Prefer": prefer}, **AUTH)
        assert status == 200
        return kind(body)

    assert await answer(base) == "delta"
    patch = orjson.loads(_member(await _body(url, base), "/patch.json"))
    assert patch == {"data": [{"op": "upsert", "path": "/ns/cm/k", "value": {"v": 2}}]}
    assert await answer(base, "modes=snapshot") == "snapshot"
    assert await answer('"unknown"') == "snapshot"
    assert await answer("") == "snapshot"
    state.put_module("ns/cm/p.rego", "package ns.p\n")
    assert await answer(base) == "snapshot"
    assert server.stats.sent_bytes["delta"] > 0


async def _body(url: str, etag: str) -> bytes:
    return (await get(url, **{"If-None-Match": etag, "Prefer": "modes=snapshot,delta"}, **AUTH))[2]


def _member(body: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(body))) as tar:
        member = tar.extractfile(name)
        assert member is not None
        return member.read()


def test_prefer_and_etag_parsing() -> None:
    """As OPA 1.16 sends them: `Prefer: modes=snapshot,delta;wait=N`, the ETag back as it got it."""
    assert Preferences.parse("modes=snapshot,delta;wait=30") == Preferences(True, 30.0)
    assert Preferences.parse("modes=snapshot") == Preferences(False, None)
    assert Preferences.parse("wait=99999").wait == 600.0
    assert Preferences.parse("wait=x") == Preferences(False, None)
    assert etag_of('"abc"') == etag_of('W/"abc"') == etag_of("abc") == "abc"


async def post(url: str, body: bytes, **headers: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.post(url, data=body, headers=headers) as response,
    ):
        return response.status, await response.text()


async def test_the_status_service_records_what_each_opa_runs(
    served: tuple[BundleState, BundleServer, str],
) -> None:
    """OPA's report, plain or gzip-encoded (and under a partition's path), with the bundle's token; kopa's
    revision followed as the bundle changes (`run`)."""
    state, server, url = served
    status_url = url.replace("/bundles/kopa", "/status")
    report = orjson.dumps(REFUSED)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.run)
        state.publish()
        await until(lambda: server.fleet.report(0)["opas"]["revision"] == state.current.revision)
        assert await post(status_url, report, **AUTH) == (204, "")
        fine = orjson.dumps({"labels": {"id": "b"}, "bundles": {"kopa": {"active_revision": "r"}}})
        assert (
            await post(status_url + "/part", gzip.compress(fine), **{"Content-Encoding": "gzip"}, **AUTH)
        )[0] == 204
        await state.put_data(["ns", "cm", "k"], b"{}")
        await until(lambda: server.fleet.report(0)["opas"]["revision"] == state.current.revision)
        tg.cancel_scope.cancel()
    assert server.fleet.counts(0) == {"current": 0, "behind": 1, "failing": 1}
    assert server.stats.status_reports == {"accepted": 2}


async def test_the_status_service_refuses_what_is_not_a_report(
    served: tuple[BundleState, BundleServer, str],
) -> None:
    _, server, url = served
    status_url = url.replace("/bundles/kopa", "/status")
    report = orjson.dumps(REFUSED)
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        status, body = await post(status_url, report, **headers)
        assert status == 401 and TOKEN not in body
    status, body = await post(status_url, b"{not json", **AUTH)
    assert status == 400 and body.startswith("invalid status report: not JSON:")
    assert await post(status_url, b'{"labels": {}}', **AUTH) == (
        400,
        "invalid status report: a status report needs labels.id (the OPA's instance id)\n",
    )
    assert await post(status_url, b"not gzip", **{"Content-Encoding": "gzip"}, **AUTH) == (
        400,
        "invalid status report: not readable as 'gzip'\n",
    )
    status, body = await post(status_url, gzip.compress(report)[:-20], **{"Content-Encoding": "gzip"}, **AUTH)
    assert status == 400 and body.startswith("invalid status report: not JSON:")
    huge = b" " * (MAX_STATUS_BYTES + 1)
    assert (await post(status_url, huge, **AUTH))[0] == 413
    assert (await post(status_url, gzip.compress(huge), **{"Content-Encoding": "gzip"}, **AUTH))[0] == 413
    assert server.fleet.counts(0) == {"current": 0, "behind": 0, "failing": 0}
    assert server.stats.status_reports == {"unauthorized": 2, "invalid": 6}


def test_client_certificates_are_verified_against_the_given_ca_alone(tmp_path: Path) -> None:
    """Mutual TLS trusts --bundle-tls-ca-file and nothing else: the system's CAs would admit any publicly
    issued client certificate. Without it, no client certificate is asked for."""
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue("kopa")
    mutual = server_tls(str(cert), str(key), str(ca.ca_file))
    assert mutual.verify_mode == ssl.CERT_REQUIRED
    subjects = [certificate["subject"] for certificate in mutual.get_ca_certs()]
    assert subjects == [((("commonName", "kopa test CA"),),)]
    assert server_tls(str(cert), str(key)).verify_mode == ssl.CERT_NONE


def test_unusable_tls_files_name_their_setting(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue("kopa")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n", encoding="utf-8")
    with pytest.raises(CredentialsError, match=r"^invalid --bundle-tls-ca-file .*missing"):
        reloading_server_tls(str(cert), str(key), str(tmp_path / "missing"))
    with pytest.raises(CredentialsError, match=r"^invalid --bundle-tls-ca-file "):
        server_tls(str(cert), str(key), str(not_pem))
    with pytest.raises(CredentialsError, match=r"^invalid --bundle-tls-cert-file/--bundle-tls-key-file "):
        server_tls(str(not_pem), str(key))
