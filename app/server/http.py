"""The HTTP server the kubelet probes and Prometheus scrapes: /healthz, /readyz, /health, /metrics.

It runs its own event loop on a thread of its own, so that /healthz can still answer, with the reason, when
kopa's main event loop is blocked. It only reads what the components publish; it drives nothing.

- A wildcard address (empty host, `0.0.0.0` or `[::]`) listens on one dual-stack socket (IPv4 and IPv6),
  as Go's listener does for kube-mgmt, so probes reach kopa on IPv6-only and IPv6-first clusters too; a
  host without IPv6 falls back to IPv4. A literal address or a name binds exactly that.
- A client gets `IDLE_TIMEOUT` seconds from connecting (or from its last answer) to send a complete request's
  headers; a half-sent or idle connection is closed after that. At most `MAX_CONNECTIONS` are open: past
  that, the oldest connection not in a handler is closed to make room, so a flood of slow clients cannot
  lock the kubelet out.
- /metrics is rendered on kopa's main event loop, where the components change what the metrics read, so a
  scrape never sees a dict in the middle of a change; if that loop does not answer in time, 503.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from app.http1 import url_host

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, dict[str, Any]]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Seconds a connection may stay without a complete request: from connecting, or from the last answer.
IDLE_TIMEOUT = 5.0
# Open connections at most; the kubelet and Prometheus need a handful.
MAX_CONNECTIONS = 100
# How long /metrics waits for the main event loop to render before answering 503.
METRICS_TIMEOUT = 5.0
# Hosts that mean "every address": served on one dual-stack socket.
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
# Errors that mean this host has no IPv6 (disabled in the kernel, or no address for ::).
_NO_IPV6 = {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT}


class ServerError(Exception):
    """The server could not start; str() is one line naming the address."""


def dual_stack_socket(port: int) -> socket.socket | None:
    """A socket bound to [::]:port that accepts IPv4 too (IPV6_V6ONLY off, which asyncio would turn on);
    None when this host has no IPv6. Other errors (the port is taken) are raised."""
    if not socket.has_ipv6:
        return None
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError as exc:
        if exc.errno in _NO_IPV6:
            return None
        raise
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", port))
    except OSError as exc:
        sock.close()
        if exc.errno in _NO_IPV6:
            return None
        raise
    return sock


def ipv4_wildcard_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
    except OSError:
        sock.close()
        raise
    return sock


def _address(host: str, port: int) -> str:
    return f"{url_host(host)}:{port}"


class _Refused(asyncio.Protocol):
    """Stands in for a connection over the cap when every open one is busy: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _ConnectionCap:
    """The protocol factory handed to asyncio: aiohttp's, behind a cap on open connections.

    At the cap, the oldest connection that is not inside a handler (idle, or still sending its headers) is
    closed to make room; the newest client, such as the kubelet's next probe, gets in.
    """

    def __init__(self, cap: int) -> None:
        self.server: web.Server | None = None  # set once the runner has made it
        self._cap = cap
        self.busy: set[RequestHandler] = set()
        self._warned = 0.0

    def __call__(self) -> asyncio.BaseProtocol:
        assert self.server is not None
        open_ = [c for c in self.server.connections if c.transport is not None]
        if len(open_) >= self._cap:
            self._warn()
            idle = next((c for c in open_ if c not in self.busy), None)
            if idle is None:
                return _Refused()
            idle.force_close()
        return self.server()

    def _warn(self) -> None:
        now = time.monotonic()
        if now - self._warned >= 60:
            self._warned = now
            log.warning("the probe server has %d connections open; closing the oldest idle ones", self._cap)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Marks the connection busy while its request is handled, so it is never the one closed."""
        protocol = request.protocol
        self.busy.add(protocol)
        try:
            return await handler(request)
        finally:
            self.busy.discard(protocol)


async def _render(metrics: Callable[[], bytes]) -> bytes:
    return metrics()


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        liveness: Check,
        readiness: Check,
        metrics: Callable[[], bytes],
        health: Check | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        metrics_timeout: float = METRICS_TIMEOUT,
    ):
        self.host = host
        self.port = port  # the bound port once started (port 0 picks a free one)
        self._liveness = liveness
        self._readiness = readiness
        self._health = health or readiness
        self._metrics = metrics
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self._metrics_timeout = metrics_timeout
        self._owner: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._listening = ""

    def _app(self, cap: _ConnectionCap) -> web.Application:
        app = web.Application(middlewares=[cap.middleware])
        app.router.add_get("/healthz", self._check(self._liveness))
        app.router.add_get("/readyz", self._check(self._readiness))
        app.router.add_get("/health", self._check(self._health))  # kube-mgmt's path
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
        try:
            body = await self._render_metrics()
        except TimeoutError:
            reason = f"kopa's event loop did not answer within {self._metrics_timeout:g}s"
            return web.Response(status=503, text=f"metrics unavailable: {reason}\n")
        except Exception as exc:  # one line for Prometheus and the log, never a traceback
            log.warning("rendering the metrics failed: %s: %s", type(exc).__name__, exc)
            return web.Response(status=500, text=f"metrics failed: {type(exc).__name__}\n")
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})

    async def _render_metrics(self) -> bytes:
        """On the loop that started the server (kopa's main loop), where the sources change."""
        owner = self._owner
        if owner is None:
            return self._metrics()
        try:
            future = asyncio.run_coroutine_threadsafe(_render(self._metrics), owner)
        except RuntimeError:  # the main loop is closed: kopa is stopping
            raise TimeoutError from None
        return await asyncio.wait_for(asyncio.wrap_future(future), self._metrics_timeout)

    async def _listen(self, cap: _ConnectionCap) -> list[asyncio.Server]:
        loop = asyncio.get_running_loop()
        if self.host in WILDCARD_HOSTS:
            sock = dual_stack_socket(self.port)
            self._listening = "IPv4 and IPv6"
            if sock is None:
                log.info("this host has no IPv6; serving probes on IPv4 only")
                sock = ipv4_wildcard_socket(self.port)
                self._listening = "IPv4 only"
            servers = [await loop.create_server(cap, sock=sock, backlog=128)]
        else:
            servers = [await loop.create_server(cap, self.host, self.port, backlog=128)]
        self.port = servers[0].sockets[0].getsockname()[1]
        return servers

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        cap = _ConnectionCap(self._max_connections)
        # aiohttp's keep-alive timer starts when a connection is made and again after each answer, and
        # closes the connection if no complete request came in by then: the header timeout and the idle one.
        runner = web.AppRunner(self._app(cap), access_log=None, keepalive_timeout=self._idle_timeout)
        servers: list[asyncio.Server] = []
        try:
            loop.run_until_complete(runner.setup())
            cap.server = runner.server
            servers = loop.run_until_complete(self._listen(cap))
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
            for listener in servers:
                listener.close()
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def start(self) -> None:
        """Starts serving on a thread of its own. Call it from kopa's main event loop: /metrics is rendered
        there."""
        try:
            self._owner = asyncio.get_running_loop()
        except RuntimeError:
            self._owner = None
        self._thread = threading.Thread(target=self._serve, name="kopa-http", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            reason = getattr(self._error, "strerror", None) or str(self._error)
            raise ServerError(f"invalid --health-endpoint {self.host}:{self.port}: cannot listen: {reason}")
        where = _address("*" if self.host in WILDCARD_HOSTS else self.host, self.port)
        if self._listening:
            where = f"{where} ({self._listening})"
        log.info("serving /healthz, /readyz, /health and /metrics on %s", where)

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
