"""The probe and metrics server on its own thread: where it listens, and consistent scrapes under churn.

Only loopback addresses are contacted.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sys
import threading
import urllib.error
import urllib.request
from typing import Any

import pytest

from app.configmaps.data import DataBook
from app.metrics import Metrics, MetricSources
from app.model import ObjectKey
from app.pipeline.watcher import WatchStats
from app.pipeline.workqueue import WorkQueue
from app.server import http
from app.server.http import HealthServer
from devstack.processes import free_port

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


async def test_scrapes_are_consistent_while_the_main_loop_changes_the_sources() -> None:
    """The components change their dicts on the main loop while Prometheus scrapes from the server's thread.

    Rendering on the server's thread read them mid-change ("dictionary changed size during iteration");
    rendering on the main loop sees them between two changes. Every scrape must succeed.
    """
    metrics = Metrics()
    queue: WorkQueue[int] = WorkQueue("opa")
    data = DataBook(opa=None)  # type: ignore[arg-type]  # only its bookkeeping is used
    watch = WatchStats()
    metrics.sources = MetricSources(
        queues=[queue], watches=lambda: [("data:ns", watch)], data_documents=data.document_count
    )
    server = _server("127.0.0.1", metrics, free_port())
    server.start()
    url = f"http://127.0.0.1:{server.port}/metrics"
    statuses: list[int] = []
    failures: list[bytes] = []
    scraped = threading.Event()

    def scrape() -> None:
        try:
            for _ in range(100):
                status, body = _get(url)
                statuses.append(status)
                if status != 200:
                    failures.append(body[:200])
        finally:
            scraped.set()

    thread = threading.Thread(target=scrape)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so a scrape meets a change if it can
    thread.start()
    n = 0
    try:
        while not scraped.is_set():
            for _ in range(200):  # keys come and go between two yields to the loop, as in kopa
                n += 1
                metrics.observe_opa("data", "PUT", str(n % 2000), 0.001)
                data.loaded[ObjectKey("ns", f"cm-{n}")] = {"k": b""}
                data.loaded.pop(ObjectKey("ns", f"cm-{n - 1000}"), None)
                queue.stats.started_at[n] = 0.0
                queue.stats.started_at.pop(n - 1000, None)
                watch.restarts[f"reason-{n % 1000}"] = n
            await asyncio.sleep(0)
    finally:
        thread.join(timeout=60)
        sys.setswitchinterval(switch_interval)
        server.stop()
    assert len(statuses) == 100
    assert failures == [], f"{len(failures)} of 100 scrapes failed, e.g. {failures[0]!r}"


async def test_metrics_answer_503_when_the_main_loop_is_blocked() -> None:
    """/healthz still answers from the server's thread; /metrics says why it cannot."""
    server = HealthServer(
        "127.0.0.1",
        0,
        liveness=lambda: (True, {"alive": True}),
        readiness=lambda: (True, {}),
        metrics=lambda: b"m 1\n",
        metrics_timeout=0.2,
    )
    server.start()
    try:
        # This test's loop is the main loop; a blocking call here blocks it, as a stuck component would.
        assert _get(f"http://127.0.0.1:{server.port}/healthz")[0] == 200
        status, body = _get(f"http://127.0.0.1:{server.port}/metrics")
        assert (status, body) == (503, b"metrics unavailable: kopa's event loop did not answer within 0.2s\n")
        assert await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}/metrics") == (200, b"m 1\n")
    finally:
        server.stop()
