"""A TLS proxy on 127.0.0.1 in front of OPA that injects latency, HTTP 500s and connection resets.

kopa talks TLS to the proxy (its certificate comes from the test CA, so `--opa-ca-file` verifies it) and the
proxy forwards each request to OPA over TLS, with kopa's own Authorization header. Per request, a seeded
random generator decides, in the order requests arrive:

- latency: the request waits up to `max_latency` seconds before anything else happens;
- `error_500`: the proxy answers 500 itself; OPA never sees the request;
- `reset_before`: the connection is reset (RST) before the request reaches OPA;
- `reset_after`: OPA applies the request, then the connection is reset, so the answer is lost: the nastiest
  case, since kopa cannot know whether its write happened.

`hold(name, methods, path)` makes matching requests wait until `release(name)`: a test can keep kopa's
writer busy in one write, or its OPA watchdog in one check, while it arranges what happens next, so that a
race is decided the same way every time.

The proxy runs its own asyncio loop in a thread, so synchronous tests can use it; it stops when asked, or
by itself after `lifetime` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp
from aiohttp import web

from devstack.processes import HOST, free_port

# Request headers worth passing on; everything else (Host, hop-by-hop headers, compression) is the proxy's.
FORWARDED_HEADERS = ("Authorization", "Content-Type", "Accept")
FAULTS = ("error_500", "reset_before", "reset_after")


@dataclass(frozen=True)
class FaultRates:
    """Probabilities per request. The three faults exclude each other; latency combines with any."""

    latency: float = 0.3
    max_latency: float = 0.2  # seconds, uniform in [0, max_latency]
    error_500: float = 0.08
    reset_before: float = 0.04
    reset_after: float = 0.04

    def __post_init__(self) -> None:
        if self.error_500 + self.reset_before + self.reset_after > 1:
            raise ValueError("the fault rates add up to more than 1")


@dataclass(frozen=True)
class Decision:
    delay: float  # 0 when no latency is injected
    fault: str | None  # one of FAULTS, or None to forward the request untouched


@dataclass(frozen=True)
class Hold:
    methods: frozenset[str]
    path: str
    released: asyncio.Event


class FaultProxy:
    """Listens on 127.0.0.1:<free port> with `cert_file`/`key_file`; forwards to `upstream` (https URL)."""

    def __init__(
        self,
        upstream: str,
        upstream_ca: Path,
        cert_file: Path,
        key_file: Path,
        *,
        rates: FaultRates,
        seed: int,
        lifetime: float = 300.0,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.rates = rates
        self.seed = seed
        self.lifetime = lifetime
        self.port = free_port()
        self.url = f"https://{HOST}:{self.port}"
        # Written only by the proxy's loop; read by the test once traffic is over (or as a rough figure).
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server_tls.load_cert_chain(cert_file, key_file)
        self._upstream_tls = ssl.create_default_context(cafile=str(upstream_ca))
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._session: aiohttp.ClientSession | None = None
        self._holds: dict[str, Hold] = {}

    # lifecycle

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout=30):
            raise RuntimeError("the fault proxy did not start within 30s")
        if self._failure is not None:
            raise RuntimeError(f"the fault proxy failed to start: {self._failure!r}") from self._failure
        return self

    def stop(self) -> None:
        """Stops serving and waits for the thread (idempotent)."""
        loop, stopping, thread = self._loop, self._stopping, self._thread
        if loop is not None and stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: its lifetime ran out
                loop.call_soon_threadsafe(stopping.set)
        if thread is not None:
            thread.join(timeout=30)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def hold(self, name: str, methods: Iterable[str], path: str = "/") -> None:
        """From now on, requests with one of `methods` and a path starting with `path` wait until
        release(name); counts["held <name>"] says how many arrived."""
        matching = frozenset(m.upper() for m in methods)

        def add() -> None:
            self._holds[name] = Hold(matching, path, asyncio.Event())

        self._in_loop(add)

    def release(self, name: str | None = None) -> None:
        """Lets the requests held by `name` (every hold when None) go on; they are held no more."""

        def drop() -> None:
            for key in [name] if name is not None else list(self._holds):
                hold = self._holds.pop(key, None)
                if hold is not None:
                    hold.released.set()

        self._in_loop(drop)

    def held(self, name: str) -> int:
        return self.counts[f"held {name}"]

    def _in_loop(self, action: Callable[[], None]) -> None:
        if self._loop is None:
            raise RuntimeError("the fault proxy is not running")

        async def run() -> None:
            action()

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    @property
    def faults(self) -> int:
        """Faults injected so far (latency not counted)."""
        return sum(self.counts[kind] for kind in FAULTS)

    # the proxy's own thread

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start(), or ends the thread quietly after a stop
            self._failure = exc
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        connector = aiohttp.TCPConnector(ssl=self._upstream_tls, limit=16)
        timeout = aiohttp.ClientTimeout(total=30, sock_connect=5)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        ) as session:
            self._session = session
            runner = web.ServerRunner(web.Server(self._handle), access_log=None)
            await runner.setup()
            try:
                await web.TCPSite(runner, HOST, self.port, ssl_context=self._server_tls).start()
                self._started.set()
                # Stops by itself after its lifetime: a forgotten proxy never outlives its test by much.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=self.lifetime)
            finally:
                for hold in self._holds.values():  # nothing stays held while the server shuts down
                    hold.released.set()
                await runner.cleanup()

    def _decide(self) -> Decision:
        rates = self.rates
        delay = self._rng.uniform(0, rates.max_latency) if self._rng.random() < rates.latency else 0.0
        roll = self._rng.random()
        fault = None
        for kind in FAULTS:
            rate = float(getattr(rates, kind))
            if roll < rate:
                fault = kind
                break
            roll -= rate
        return Decision(delay, fault)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        self.counts["requests"] += 1
        for name, hold in list(self._holds.items()):
            if request.method in hold.methods and request.path.startswith(hold.path):
                self.counts[f"held {name}"] += 1
                await hold.released.wait()
        decision = self._decide()
        if decision.delay:
            self.counts["latency"] += 1
            self.counts["latency_ms"] += round(decision.delay * 1000)
            await asyncio.sleep(decision.delay)
        if decision.fault == "error_500":
            self.counts["error_500"] += 1
            return web.Response(status=500, text="injected by kopa's fault proxy\n")
        if decision.fault == "reset_before":
            self.counts["reset_before"] += 1
            return self._reset(request)
        assert self._session is not None
        headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
        try:
            async with self._session.request(
                request.method, self.upstream + str(request.rel_url), data=body or None, headers=headers
            ) as upstream:
                payload = await upstream.read()
                status = upstream.status
                content_type = upstream.headers.get("Content-Type", "application/json")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.counts["upstream_errors"] += 1
            return web.Response(status=502, text=f"OPA unreachable from the fault proxy: {exc}\n")
        self.counts["forwarded"] += 1
        if decision.fault == "reset_after":
            self.counts["reset_after"] += 1
            return self._reset(request)
        return web.Response(status=status, body=payload, headers={"Content-Type": content_type})

    @staticmethod
    def _reset(request: web.BaseRequest) -> web.StreamResponse:
        """Resets the client's connection (RST: SO_LINGER 0, then abort); nothing is sent back."""
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        return web.Response(status=500)  # never reaches the client: the connection is gone
