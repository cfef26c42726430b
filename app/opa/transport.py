"""HTTP/1.1 to one OPA over plain asyncio streams: a few keep-alive connections, nothing else.

Why not aiohttp, which kopa uses for the Kubernetes API: every change kopa writes is one small request to a
sidecar on loopback, and aiohttp's machinery around such a request (its request and response objects,
tasks, timers, cookie and redirect handling) costs about 0.25 ms of CPU, and about 0.5 ms of latency when
changes are sparse and the caches cold, which is more than OPA's own work on the write (bench/, churn
phase; measured in docs/benchmarks.md). OPA speaks plain HTTP/1.1 with Content-Length or chunked bodies, so
what this module handles is small: request framing, response framing (Content-Length, chunked, or up to
the close), keep-alive reuse, TLS, and timeouts.

Nothing here knows OPA's API, retries or metrics: OpaClient does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from app.http1 import Origin, content_length, is_chunked, keeps_alive, parse_head, request_head

# A reader's buffer limit: also the largest status line plus headers accepted.
READ_LIMIT = 1 << 20
# Bodies up to this size are written at once and the answer read after; larger ones are sent while the
# answer is read (Connections._send_while_receiving).
SMALL_BODY = 64 * 1024
# Statuses that never have a body (RFC 9110 6.4.1).
NO_BODY = frozenset({204, 304})

Body = bytes | AsyncIterator[bytes] | None


class TransportError(Exception):
    """The request got no complete answer: connection refused, reset or closed early, TLS failure, a
    malformed answer, or a timeout. The message names the peer, never a header (the token)."""


@dataclass(eq=False)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    tls: ssl.SSLContext | None

    def usable(self, tls: ssl.SSLContext | None) -> bool:
        """Still open, nothing unasked for waiting on it, and made under the current TLS trust."""
        return tls is self.tls and not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


async def connect(
    origin: Origin, tls: ssl.SSLContext | None, within: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A new connection (TLS handshake included) within `within` seconds; TransportError otherwise."""
    try:
        return await asyncio.wait_for(
            asyncio.open_connection(origin.host, origin.port, ssl=tls, limit=READ_LIMIT), within
        )
    except (OSError, TimeoutError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise TransportError(f"connecting to {origin.netloc}: {_reason(exc)}") from None


class Connections:
    """Keep-alive HTTP/1.1 connections to one origin, at most `limit` of them in use at once.

    `tls` is asked before each request: connections made under another context (a rotated CA) are not
    reused, while requests already on them finish there.
    """

    def __init__(
        self,
        url: str,
        *,
        tls: Callable[[], ssl.SSLContext | None],
        limit: int,
        connect_timeout: float,
        request_timeout: float,
        user_agent: str,
    ) -> None:
        self.origin = Origin.of(url)
        self._tls = tls
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[_Connection] = []
        self._agent = user_agent

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: Callable[[], Body]
    ) -> tuple[int, bytes]:
        """(status, body) of one request to base_path/path, waiting for a free slot included, within the
        request timeout. `body` is called for each attempt (a request on a reused connection that the peer
        had closed is sent once more on a new one)."""
        timeout = self._request_timeout
        try:
            async with asyncio.timeout(timeout):
                async with self._slots:
                    return await self._exchange(method, path, headers, body)
        except TimeoutError:
            raise TransportError(f"no answer from {self.origin.netloc} within {timeout:g} s") from None

    async def _exchange(
        self, method: str, path: str, headers: dict[str, str], body: Callable[[], Body]
    ) -> tuple[int, bytes]:
        tls = self._tls()
        while True:
            connection, reused = self._reusable(tls), True
            if connection is None:
                reader, writer = await connect(self.origin, tls, self._connect_timeout)
                connection, reused = _Connection(reader, writer, tls), False
            kept = False
            try:
                content = body()
                if isinstance(content, bytes | None) and len(content or b"") <= SMALL_BODY:
                    try:
                        await self._send(connection.writer, method, path, headers, content)
                    except ConnectionError:
                        raise _ClosedBeforeAnswer() from None
                    status, payload, kept = await _receive(connection.reader, method)
                else:
                    status, payload, kept = await self._send_while_receiving(
                        connection, method, path, headers, content
                    )
                return status, payload
            except _ClosedBeforeAnswer:
                if reused:
                    continue  # the peer closed an idle connection as the request went out: not an answer
                raise TransportError(f"{self.origin.netloc} closed the connection unanswered") from None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                raise TransportError(f"{method} to {self.origin.netloc}: {_reason(exc)}") from None
            finally:
                if kept:
                    self._idle.append(connection)
                else:
                    connection.close()

    async def _send_while_receiving(
        self, connection: _Connection, method: str, path: str, headers: dict[str, str], body: Body
    ) -> tuple[int, bytes, bool]:
        """Sends a large body while reading the answer. OPA answers some requests before it reads their
        body (a refused token: 401) and then closes the connection; the reset that the rest of the body
        meets must not hide that answer. The connection is kept only when both sides completed."""
        answer = asyncio.ensure_future(_receive(connection.reader, method))
        sending = asyncio.ensure_future(self._send(connection.writer, method, path, headers, body))
        try:
            await asyncio.wait((answer, sending), return_when=asyncio.FIRST_COMPLETED)
            if not answer.done():
                # A reset while sending: the answer (or the connection's end) is read below all the same.
                with contextlib.suppress(ConnectionError):
                    sending.result()
            status, payload, kept = await answer
            return status, payload, kept and sending.done() and sending.exception() is None
        finally:
            for task in (answer, sending):
                task.cancel()
            await asyncio.gather(answer, sending, return_exceptions=True)

    def _reusable(self, tls: ssl.SSLContext | None) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if connection.usable(tls):
                return connection
            connection.close()
        return None

    async def _send(
        self, writer: asyncio.StreamWriter, method: str, path: str, headers: dict[str, str], body: Body
    ) -> None:
        request_line = f"{method} {self.origin.base_path}/{path} HTTP/1.1"
        fields = {"Host": self.origin.netloc, "User-Agent": self._agent, **headers}
        if isinstance(body, bytes | None):
            if body is not None or method in ("PUT", "POST", "PATCH"):
                fields["Content-Length"] = str(len(body or b""))
            writer.write(request_head(request_line, fields) + (body or b""))
        else:
            fields["Transfer-Encoding"] = "chunked"
            writer.write(request_head(request_line, fields))
            async for chunk in body:
                if chunk:
                    writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    await writer.drain()
            writer.write(b"0\r\n\r\n")
        await writer.drain()

    def close(self) -> None:
        """Closes the idle connections; those in use close when their request ends."""
        while self._idle:
            self._idle.pop().close()


class _ClosedBeforeAnswer(Exception):
    """The connection ended before the first byte of an answer."""


async def _receive(reader: asyncio.StreamReader, method: str) -> tuple[int, bytes, bool]:
    """Reads one answer: (status, body, whether the connection can carry another request)."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise _ClosedBeforeAnswer() from None
            raise
        except ConnectionError:  # reset, or a broken pipe met while sending, handed on by the reader
            raise _ClosedBeforeAnswer() from None
        version, status, fields = parse_head(head)
        if not 100 <= status < 200:
            break  # an interim answer (100 Continue) is followed by the real one
    keep = keeps_alive(version, fields)
    if method == "HEAD" or status in NO_BODY:
        return status, b"", keep
    if is_chunked(fields):
        return status, await _read_chunked(reader), keep
    size = content_length(fields)
    if size is not None:
        return status, await reader.readexactly(size), keep
    return status, await reader.read(), False  # delimited by the close


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        line = await reader.readuntil(b"\r\n")
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            break
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise ValueError("malformed chunk")
    while await reader.readuntil(b"\r\n") != b"\r\n":
        pass  # trailer fields, unused
    return b"".join(parts)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return "the connection closed in the middle of the answer"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"[:300]
