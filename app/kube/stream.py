"""One watch request over a hand-written asyncio protocol: each line of the answer reaches a plain callback
from the event loop's read callback, in the same turn of the loop that read it.

Why not aiohttp, which serves every other request to the API server: aiohttp hands a body to the task that
reads it, so each watch event waited one more turn of the event loop, behind async generators, before kopa
saw it (about 0.1 ms on every change's path to OPA when changes are sparse; docs/benchmarks.md). A watch
answer is one long HTTP/1.1 answer whose chunked body is JSON lines, so what this module does is small:
connect (directly, or through an HTTP or HTTPS proxy as kubeconfig's proxy-url asks), send one request,
read the answer's head, undo the chunked framing, split lines, and give up on a stream silent too long.

Nothing here knows Kubernetes: KubeClient.watch decodes the lines and decides what a status means.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from app.http1 import Origin, content_length, is_chunked, parse_head, request_head

# The largest head (status line and headers) and the largest line accepted. A line carries one object, at
# most 1.5 MiB in etcd, and JSON escaping can double that.
MAX_HEAD = 64 * 1024
MAX_LINE = 16 << 20
# The largest error body kept (a Status object is a few hundred bytes).
MAX_ERROR_BODY = 1 << 20
# TCP keepalive on a watch's connection (idle seconds before the first probe, seconds between probes,
# probes unanswered): a peer that vanished (a dropped NAT or conntrack entry, a load balancer's failover, a
# host gone) shows within about a minute, as with client-go's dialer, rather than at the idle deadline.
KEEPALIVE = {"TCP_KEEPIDLE": 30, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 3}


def keep_alive(transport: asyncio.BaseTransport) -> None:
    """Turns TCP keepalive on for the transport's socket (the options a platform lacks are skipped)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in KEEPALIVE.items():
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


class StreamError(Exception):
    """The answer did not come, or broke off: connection refused or reset, TLS refused, proxy refusal, a
    malformed answer, or silence past the idle timeout. The message names the peer, never a header."""


@dataclass(frozen=True)
class Endpoint:
    """How to reach the API server: its URL, TLS, and optionally a proxy (kubeconfig's proxy-url)."""

    url: str  # scheme://host:port[/base-path]
    tls: ssl.SSLContext | None  # None for http://
    server_name: str | None = None  # the name the certificate must carry, when not the URL's host
    proxy: str | None = None  # http:// or https:// proxy URL, without credentials
    proxy_authorization: str | None = None


LineHandler = Callable[[bytes], None]


class LineStream(asyncio.Protocol):
    """One GET whose answer, when it is a 200, is handed on line by line to `on_line`.

    run() returns (status, body): (200, b"") once the server ended the stream, or an error status with its
    body. An exception raised by `on_line` ends the stream and is raised by run() as it is.
    """

    def __init__(self, on_line: LineHandler, *, idle_timeout: float) -> None:
        self._on_line = on_line
        self._idle_timeout = idle_timeout
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[tuple[int, bytes]] = self._loop.create_future()
        self._transport: asyncio.Transport | None = None
        self._last_data = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._peer = ""
        # The answer as it is read: the head, then the body, chunked or not.
        self._buffer = bytearray()  # read, not yet decoded
        self._status = 0
        self._chunked = False
        self._remaining: int | None = None  # of the current chunk, or of a Content-Length body
        self._state = "head"  # head, size, data, crlf, trailer, raw (until the close), done
        self._pending = bytearray()  # a 200's body: the start of a line not yet complete
        self._error_body = bytearray()

    async def run(
        self, endpoint: Endpoint, target: str, headers: Mapping[str, str], within: float
    ) -> tuple[int, bytes]:
        """Connects within `within` seconds, sends `GET target` and waits for the answer's end."""
        origin = Origin.of(endpoint.url)
        self._peer = origin.netloc
        try:
            async with asyncio.timeout(within):
                transport, prefix, extra = await self._connect(endpoint, origin)
        except TimeoutError:
            raise StreamError(f"TimeoutError: no connection to {origin.netloc} within {within:g} s") from None
        except (OSError, ValueError, EOFError, asyncio.LimitOverrunError) as exc:  # SSLError is an OSError
            raise StreamError(f"connecting to {origin.netloc}: {_reason(exc)}") from None
        keep_alive(transport)
        try:
            fields = {"Host": origin.netloc, **headers, **extra}
            transport.write(request_head(f"GET {prefix}{target} HTTP/1.1", fields))
            self._last_data = self._loop.time()
            self._arm_idle_timer()
            return await self.answer()
        finally:
            self._stop()

    async def answer(self) -> tuple[int, bytes]:
        """(status, error body) once the answer is complete; what ended it otherwise."""
        return await self._done

    def abort(self, reason: str) -> None:
        """Ends the stream from outside: run() raises StreamError(reason)."""
        self._fail(StreamError(reason))

    async def _connect(
        self, endpoint: Endpoint, origin: Origin
    ) -> tuple[asyncio.Transport, str, dict[str, str]]:
        """The transport the request goes on, what the request target starts with, and headers the proxy
        needs."""
        path = origin.base_path
        if endpoint.proxy is None:
            transport, _ = await self._loop.create_connection(
                lambda: self,
                origin.host,
                origin.port,
                ssl=endpoint.tls,
                server_hostname=(endpoint.server_name or origin.host) if endpoint.tls else None,
            )
            return transport, path, {}
        proxy = Origin.of(endpoint.proxy)
        # As aiohttp does: an https:// proxy is spoken to with the API server's TLS settings.
        proxy_tls = (endpoint.tls or ssl.create_default_context()) if proxy.https else None
        auth = {"Proxy-Authorization": endpoint.proxy_authorization} if endpoint.proxy_authorization else {}
        if endpoint.tls is None:  # http:// API server: the proxy forwards a request in absolute form
            transport, _ = await self._loop.create_connection(
                lambda: self,
                proxy.host,
                proxy.port,
                ssl=proxy_tls,
                server_hostname=proxy.host if proxy_tls else None,
            )
            return transport, f"http://{origin.netloc}{path}", auth
        raw, tunnel_head = await self._loop.create_connection(
            _TunnelHead,
            proxy.host,
            proxy.port,
            ssl=proxy_tls,
            server_hostname=proxy.host if proxy_tls else None,
        )
        try:
            raw.write(
                request_head(f"CONNECT {origin.authority} HTTP/1.1", {"Host": origin.authority, **auth})
            )
            _, status, _ = parse_head(await tunnel_head.head)
            if status != 200:
                raise ValueError(f"the proxy {proxy.netloc} refused the tunnel: HTTP {status}")
            tunnel = await self._loop.start_tls(
                raw, self, endpoint.tls, server_hostname=endpoint.server_name or origin.host
            )
        except BaseException:
            raw.abort()
            raise
        if tunnel is None:
            raise ValueError(f"the tunnel through {proxy.netloc} closed during the TLS handshake")
        self.connection_made(tunnel)
        return tunnel, path, {}

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._last_data = self._loop.time()
        if self._done.done():
            return
        try:
            self._feed(data)
        except _Handed as handed:  # on_line's: raised by run() as it is
            self._fail(handed.exc)
        except ValueError as exc:
            self._fail(StreamError(f"a malformed answer from {self._peer}: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost says whether the answer was complete

    def connection_lost(self, exc: Exception | None) -> None:
        if self._done.done():
            return
        if self._state == "raw":  # a body delimited by the close: complete
            self._finish()
        elif exc is not None:
            self._fail(StreamError(f"the connection to {self._peer} broke: {_reason(exc)}"))
        else:
            self._fail(StreamError(f"{self._peer} closed the connection in the middle of the answer"))

    # the answer's framing

    def _feed(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while buffer and self._state != "done":
            state = self._state
            if state == "head":
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD:
                        raise ValueError(f"a head over {MAX_HEAD} bytes")
                    return
                _, status, fields = parse_head(bytes(buffer[: end + 4]))
                del buffer[: end + 4]
                if 100 <= status < 200:
                    continue  # an interim answer: the real one follows
                self._status = status
                if status in (204, 304):
                    self._finish()
                elif is_chunked(fields):
                    self._chunked, self._state = True, "size"
                elif (length := content_length(fields)) is not None:
                    self._remaining = length
                    self._state = "data" if length else "done"
                    if not length:
                        self._finish()
                else:
                    self._state = "raw"
            elif state == "size":
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > 1024:
                        raise ValueError("a chunk size line over 1 KiB")
                    return
                size = int(bytes(buffer[:end]).split(b";", 1)[0].strip(), 16)
                del buffer[: end + 2]
                if size < 0:
                    raise ValueError("a negative chunk size")
                self._remaining, self._state = size, ("data" if size else "trailer")
            elif state == "data":
                assert self._remaining is not None
                take = min(self._remaining, len(buffer))
                self._body(bytes(buffer[:take]))
                del buffer[:take]
                self._remaining -= take
                if not self._remaining:
                    if self._chunked:
                        self._state = "crlf"
                    else:
                        self._finish()
            elif state == "crlf":
                if len(buffer) < 2:
                    return
                if buffer[:2] != b"\r\n":
                    raise ValueError("a chunk not followed by CRLF")
                del buffer[:2]
                self._state = "size"
            elif state == "trailer":
                end = buffer.find(b"\r\n")
                if end < 0:
                    return
                del buffer[: end + 2]
                if end == 0:  # the blank line that ends the trailer
                    self._finish()
            else:  # raw
                self._body(bytes(buffer))
                buffer.clear()

    def _body(self, part: bytes) -> None:
        if self._status != 200:
            if len(self._error_body) < MAX_ERROR_BODY:
                self._error_body += part[: MAX_ERROR_BODY - len(self._error_body)]
            return
        pending = self._pending
        if not pending and part.endswith(b"\n") and part.find(b"\n") == len(part) - 1:
            if len(part) > 1:
                self._line(part[:-1])  # the usual case: one chunk, one line
            return
        searched = len(pending)  # a line read in many pieces is searched once, not once per piece
        pending += part
        start, end = 0, pending.find(b"\n", searched)
        while end >= 0:
            if end > start:
                self._line(bytes(pending[start:end]))
            start = end + 1
            end = pending.find(b"\n", start)
        del pending[:start]
        if len(pending) > MAX_LINE:
            raise ValueError(f"a line over {MAX_LINE >> 20} MiB")

    def _line(self, line: bytes) -> None:
        try:
            self._on_line(line)
        except Exception as exc:
            raise _Handed(exc) from exc

    def _finish(self) -> None:
        if self._status == 200 and self._pending.strip():
            line, self._pending = bytes(self._pending), bytearray()
            try:
                self._line(line)
            except _Handed as handed:
                self._fail(handed.exc)
                return
        self._state = "done"
        if not self._done.done():
            self._done.set_result((self._status, bytes(self._error_body)))
        self._stop()

    def _fail(self, exc: BaseException) -> None:
        if not self._done.done():
            self._done.set_exception(exc)
        self._stop()

    def _stop(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()

    # silence

    def _arm_idle_timer(self) -> None:
        """Rearms itself at the deadline the last data sets: no timer is rescheduled per read."""
        deadline = self._last_data + self._idle_timeout
        if self._loop.time() >= deadline:
            self._idle_timer = None
            self._fail(StreamError(f"TimeoutError: no data from {self._peer} for {self._idle_timeout:g} s"))
            return
        self._idle_timer = self._loop.call_at(deadline, self._arm_idle_timer)


class _TunnelHead(asyncio.Protocol):
    """Reads the proxy's answer to CONNECT, up to its blank line; TLS to the API server follows."""

    def __init__(self) -> None:
        self.head: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end >= 0 and not self.head.done():
            self.head.set_result(bytes(self._buffer[: end + 4]))
        elif len(self._buffer) > MAX_HEAD and not self.head.done():
            self.head.set_exception(ValueError(f"a head over {MAX_HEAD} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(ConnectionResetError("the proxy closed the connection"))


class _Handed(Exception):
    """Carries what on_line raised out of the framing code, told apart from a malformed answer."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(str(exc))
        self.exc = exc


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]
