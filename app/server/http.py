"""The HTTP server the kubelet probes and Prometheus scrapes: /healthz, /readyz, /health, /metrics.

It runs its own event loop on a thread of its own, so that /healthz can still answer, with the reason, when
kopa's main event loop is blocked. It only reads what the components publish; it drives nothing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import anyio
import orjson
from aiohttp import web

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, dict[str, Any]]]


class ServerError(Exception):
    """The server could not start; str() is one line naming the address."""


class HealthServer:
    def __init__(
        self, host: str, port: int, *, liveness: Check, readiness: Check, metrics: Callable[[], bytes]
    ):
        self.host = host
        self.port = port
        self._liveness = liveness
        self._readiness = readiness
        self._metrics = metrics
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._check(self._liveness))
        app.router.add_get("/readyz", self._check(self._readiness))
        app.router.add_get("/health", self._check(self._readiness))  # kube-mgmt's path
        app.router.add_get("/metrics", self._serve_metrics)
        return app

    @staticmethod
    def _check(check: Check) -> Callable[[web.Request], Any]:
        async def handle(_: web.Request) -> web.Response:
            ok, details = check()
            return web.Response(
                body=orjson.dumps(details, option=orjson.OPT_INDENT_2),
                status=200 if ok else 503,
                content_type="application/json",
            )

        return handle

    async def _serve_metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self._metrics(), headers={"Content-Type": "text/plain; version=0.0.4"})

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        runner = web.AppRunner(self._app(), access_log=None)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, self.host, self.port).start())
        except OSError as exc:
            self._error = exc
            self._started.set()
            loop.run_until_complete(runner.cleanup())
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="kopa-http", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            reason = getattr(self._error, "strerror", None) or str(self._error)
            raise ServerError(f"invalid --health-endpoint {self.host}:{self.port}: cannot listen: {reason}")
        log.info("serving /healthz, /readyz, /health and /metrics on %s:%d", self.host or "*", self.port)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    async def run(self) -> None:
        """Serves until cancelled (the task group owns it like any other component)."""
        try:
            await anyio.sleep_forever()
        finally:
            self.stop()
