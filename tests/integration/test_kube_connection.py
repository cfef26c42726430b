"""The kubeconfig's cluster settings kopa honours besides server and CA: proxy-url and tls-server-name.

- proxy-url: kopa reaches the real API server through a loopback HTTP CONNECT proxy written here (it only
  ever tunnels to 127.0.0.1), with the credentials of the proxy-url sent as Proxy-Authorization.
- socks5:// proxies are refused at start-up with one line (aiohttp would need another dependency).
- tls-server-name: the API server's self-signed certificate names kubernetes.default.svc (and also
  127.0.0.1, which the kubeconfig's server is), so a wrong name must fail verification and a right one pass.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from devstack.kube import KubeCluster
from devstack.opa import OpaServer
from devstack.processes import HOST
from tests.integration.conftest import KopaFactory
from tests.integration.helpers import (
    DATA,
    OK,
    put_configmap,
    start_up_error,
    wait_data,
    wait_log,
    wait_status,
)

pytestmark = pytest.mark.integration


def kubeconfig_with(kube: KubeCluster, path: Path, **cluster: Any) -> Path:
    """The admin kubeconfig with extra keys in its cluster entry (proxy-url, tls-server-name)."""
    kube.write_kubeconfig(path)
    config = yaml.safe_load(path.read_text())
    config["clusters"][0]["cluster"].update(cluster)
    path.write_text(yaml.safe_dump(config))
    return path


class ConnectProxy:
    """An HTTP CONNECT proxy on a loopback port, in a thread of its own; tunnels to 127.0.0.1 only.

    Counts the tunnels it opened and keeps the Proxy-Authorization header of each CONNECT.
    """

    def __init__(self) -> None:
        self.tunnels = 0
        self.authorizations: list[str] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="connect-proxy", daemon=True)

    def __enter__(self) -> ConnectProxy:
        self._thread.start()
        assert self._ready.wait(10), "the proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, HOST, 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, target, _ = head[0].split(" ", 2)
            host, _, port = target.rpartition(":")
            if method != "CONNECT" or host != HOST:
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "proxy-authorization":
                    self.authorizations.append(value.strip())
            upstream_reader, upstream_writer = await asyncio.open_connection(HOST, int(port))
            self.tunnels += 1
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(
                _pipe(reader, upstream_writer), _pipe(upstream_reader, writer), return_exceptions=True
            )
        except (OSError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


@pytest.fixture
def connect_proxy() -> Iterator[ConnectProxy]:
    with ConnectProxy() as proxy:
        yield proxy


def test_kopa_reaches_the_api_server_through_the_kubeconfig_proxy_url(
    run_kopa: KopaFactory,
    kube: KubeCluster,
    opa: OpaServer,
    core_v1: client.CoreV1Api,
    connect_proxy: ConnectProxy,
    *,
    namespace: str,
    tmp_path: Path,
) -> None:
    proxy_url = f"http://kopa:pr0xy-secret@{HOST}:{connect_proxy.port}"
    kubeconfig = kubeconfig_with(kube, tmp_path / "kubeconfig", **{"proxy-url": proxy_url})
    put_configmap(core_v1, namespace, "d", {"x.json": '{"via": "proxy"}'}, DATA)

    kopa = run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}", kubeconfig=kubeconfig)
    wait_data(opa, f"{namespace}/d/x.json", {"via": "proxy"})
    wait_status(core_v1, namespace, "d", OK)  # the status patch went through the proxy too
    assert connect_proxy.tunnels >= 2, "a watch and a request each need a tunnel"
    expected = "Basic " + base64.b64encode(b"kopa:pr0xy-secret").decode()
    assert connect_proxy.authorizations and set(connect_proxy.authorizations) == {expected}
    assert "pr0xy-secret" not in kopa.log_path.read_text()


def test_a_socks_proxy_url_stops_start_up_with_one_line(
    run_kopa: KopaFactory, kube: KubeCluster, opa: OpaServer, *, namespace: str, tmp_path: Path
) -> None:
    kubeconfig = kubeconfig_with(
        kube, tmp_path / "kubeconfig", **{"proxy-url": f"socks5://user:s0cks-secret@{HOST}:1080"}
    )
    kopa = run_kopa(
        f"--opa-url={opa.api_url}", f"--namespaces={namespace}", kubeconfig=kubeconfig, expect_exit=2
    )
    line = start_up_error(kopa)
    assert "proxy-url scheme socks5 is not supported" in line, line
    assert "s0cks-secret" not in kopa.log_path.read_text()


def test_the_kubeconfig_tls_server_name_is_the_name_verified(
    run_kopa: KopaFactory,
    kube: KubeCluster,
    opa: OpaServer,
    core_v1: client.CoreV1Api,
    *,
    namespace: str,
    tmp_path: Path,
) -> None:
    put_configmap(core_v1, namespace, "d", {"x.json": '{"name": "checked"}'}, DATA)

    wrong = kubeconfig_with(kube, tmp_path / "wrong", **{"tls-server-name": "not-the-api.kopa.test"})
    kopa = run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}", kubeconfig=wrong)
    wait_log(kopa, "certificate is not valid for 'not-the-api.kopa.test'")
    kopa.stop()

    right = kubeconfig_with(kube, tmp_path / "right", **{"tls-server-name": "kubernetes.default.svc"})
    run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}", kubeconfig=right)
    wait_data(opa, f"{namespace}/d/x.json", {"name": "checked"})
