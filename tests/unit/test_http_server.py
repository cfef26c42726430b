"""The probe and metrics server on its own thread: where it listens, and consistent scrapes under churn.

Only loopback addresses are contacted.
"""

from __future__ import annotations

import errno
import logging
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest

from app.metrics import Metrics
from app.server import http
from app.server.http import HealthServer

pytestmark = pytest.mark.anyio


def _server(host: str, metrics: Metrics | None = None, port: int = 0) -> HealthServer:
    return HealthServer(
        host,
        port,
        liveness=lambda: (True, {"alive": True}),
        readiness=lambda: (True, {"ready": True}),
        metrics=metrics.render if metrics is not None else (lambda: b""),
    )


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), exc.read()


@pytest.mark.parametrize("failure", ["socket", "bind"])
def test_a_host_without_ipv6_falls_back_to_ipv4(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    """IPv6 disabled in the kernel (no AF_INET6 sockets) or on every interface (no address for ::):
    the wildcard address serves IPv4 instead of failing start-up."""

    class NoIpv6Socket(socket.socket):
        def __init__(self, family: int = socket.AF_INET, *args: Any, **kwargs: Any) -> None:
            if family == socket.AF_INET6 and failure == "socket":
                raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
            super().__init__(family, *args, **kwargs)
            self._v6 = family == socket.AF_INET6

        def bind(self, address: Any) -> None:
            if self._v6:
                raise OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")
            super().bind(address)

    monkeypatch.setattr(socket, "socket", NoIpv6Socket)
    caplog.set_level(logging.INFO, logger="app.server.http")
    server = _server("0.0.0.0")
    server.start()
    try:
        assert _get(f"http://127.0.0.1:{server.port}/healthz")[0] == 200
    finally:
        server.stop()
    assert "this host has no IPv6; serving probes on IPv4 only" in caplog.text
    assert f"on *:{server.port} (IPv4 only)" in caplog.text


def test_a_taken_port_is_still_a_start_up_error() -> None:
    """Only a missing IPv6 falls back; a port in use stops start-up with one line, as before."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))  # the IPv4 half of the dual-stack socket is taken
        busy.listen()
        server = HealthServer(
            "",
            busy.getsockname()[1],
            liveness=lambda: (True, {}),
            readiness=lambda: (True, {}),
            metrics=bytes,
        )
        with pytest.raises(http.ServerError, match="cannot listen: Address already in use"):
            server.start()
