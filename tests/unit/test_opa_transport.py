"""The HTTP/1.1 transport to OPA, against a loopback server that answers in the framings a real OPA uses
(Content-Length, chunked) and the ones it cannot be made to produce on demand (an idle connection closed
as a request goes out, an answer cut short, a close-delimited body, no answer at all).

The real OPA is behind every integration test; these pin down the framing and the connection reuse.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from app.opa.transport import Connections, TransportError

pytestmark = pytest.mark.anyio

# One connection's script: reads requests from the client and writes answers.
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A loopback server running `script` on each connection; counts connections and records requests."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []  # (head, body as the server de-framed it)
        self._server: asyncio.Server | None = None
        self._arrived = asyncio.Condition()

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """Reads one request (Content-Length or chunked body); returns its head."""
        head = await reader.readuntil(b"\r\n\r\n")
        fields = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)
        }
        body = b""
        if fields.get(b"transfer-encoding") == b"chunked":
            while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                body += await reader.readexactly(size)
                await reader.readexactly(2)
            await reader.readuntil(b"\r\n")
        elif b"content-length" in fields:
            body = await reader.readexactly(int(fields[b"content-length"]))
        self.requests.append((head, body))
        async with self._arrived:
            self._arrived.notify_all()
        return head

    async def received(self, count: int) -> None:
        """Returns once `count` requests have arrived."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= count)


def answer(status: int, body: bytes, *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def connections(url: str, *, limit: int = 8, request_timeout: float = 5.0) -> Connections:
    return Connections(
        url,
        tls=lambda: None,
        limit=limit,
        connect_timeout=1.0,
        request_timeout=request_timeout,
        user_agent="kopa",
    )


async def test_keep_alive_connections_are_reused_and_requests_are_framed() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(answer(200, b'{"result":1}'))

    async with Server(script) as server:
        pool = connections(server.url)
        assert await pool.request("PATCH", "data/a%2Fb", {"Content-Type": "x/y"}, lambda: b"[1]") == (
            200,
            b'{"result":1}',
        )
        assert await pool.request("GET", "data", {}, lambda: None) == (200, b'{"result":1}')
        assert await pool.request("PUT", "data/e", {}, lambda: None) == (200, b'{"result":1}')
        pool.close()

    assert server.connections == 1
    (patch, patch_body), (get, _), (put, put_body) = server.requests
    assert patch.startswith(b"PATCH /v1/data/a%2Fb HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:" in patch and b"\r\nContent-Type: x/y\r\n" in patch
    assert patch_body == b"[1]"
    assert get.startswith(b"GET /v1/data HTTP/1.1\r\n") and b"Content-Length" not in get
    assert b"\r\nContent-Length: 0\r\n" in put and put_body == b""


async def test_a_body_produced_in_pieces_is_sent_chunked() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer(204, b""))

    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b'{"a":', b"", b"1}"):
            yield piece

    async with Server(script) as server:
        pool = connections(server.url)
        assert await pool.request("PUT", "data/x", {}, pieces) == (204, b"")
        pool.close()
    ((head, body),) = server.requests
    assert b"\r\nTransfer-Encoding: chunked\r\n" in head and body == b'{"a":1}'


async def test_chunked_and_close_delimited_answers_are_read_whole() -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\nthe rest, up to the close",
    ]

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while answers:
            await server.read_request(reader)
            writer.write(answers.pop(0))
            if not answers:
                return  # closes: the last answer's end

    async with Server(script) as server:
        pool = connections(server.url)
        assert await pool.request("GET", "a", {}, lambda: None) == (200, b"hello world")
        assert await pool.request("GET", "b", {}, lambda: None) == (200, b"ok")
        assert await pool.request("GET", "c", {}, lambda: None) == (404, b"the rest, up to the close")
        pool.close()
    assert server.connections == 1


async def test_a_connection_the_answer_says_to_close_is_not_reused() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer(200, b"{}", "Connection: close"))
        await writer.drain()

    async with Server(script) as server:
        pool = connections(server.url)
        for _ in range(3):
            assert await pool.request("GET", "health", {}, lambda: None) == (200, b"{}")
        pool.close()
    assert server.connections == 3


async def test_an_idle_connection_the_peer_closed_is_replaced_without_an_error() -> None:
    """OPA (or a proxy before it) may close a keep-alive connection while it waits in the pool; the next
    request on it is not an outage."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer(200, b"first"))
        await writer.drain()
        # Then closes: the client still holds the connection as idle and reusable.

    async with Server(script) as server:
        pool = connections(server.url)
        assert await pool.request("GET", "a", {}, lambda: None) == (200, b"first")
        sent = 0

        def body() -> bytes:
            nonlocal sent
            sent += 1
            return b"{}"

        assert await pool.request("PUT", "b", {}, body) == (200, b"first")
        pool.close()
    assert server.connections == 2
    assert sent in (1, 2)  # sent again only when the first try went out on the closed connection


async def test_an_answer_cut_short_is_a_transport_error_and_the_connection_is_dropped() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        await writer.drain()

    async with Server(script) as server:
        pool = connections(server.url)
        with pytest.raises(TransportError, match="closed in the middle of the answer"):
            await pool.request("GET", "a", {"Authorization": "Bearer s3cret"}, lambda: None)
        pool.close()


@pytest.mark.parametrize(
    "reply",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    ],
)
async def test_a_malformed_answer_is_a_transport_error(reply: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(reply)
        await writer.drain()
        await reader.read()

    async with Server(script) as server:
        pool = connections(server.url)
        with pytest.raises(TransportError) as raised:
            await pool.request("GET", "a", {"Authorization": "Bearer s3cret"}, lambda: None)
        pool.close()
    assert "s3cret" not in str(raised.value)


async def test_no_answer_within_the_request_timeout_is_a_transport_error() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await reader.read()  # never answers

    async with Server(script) as server:
        pool = connections(server.url, request_timeout=0.3)
        with pytest.raises(TransportError, match=r"within 0\.3 s"):
            await pool.request("GET", "a", {}, lambda: None)
        pool.close()


async def test_nothing_listening_is_a_transport_error_naming_the_peer() -> None:
    async with Server(lambda r, w: asyncio.sleep(0)) as server:
        url = server.url
    pool = connections(url)
    with pytest.raises(TransportError, match=r"connecting to 127\.0\.0\.1:\d+"):
        await pool.request("GET", "a", {}, lambda: None)


async def test_at_most_limit_connections_are_open_at_once() -> None:
    release = asyncio.Event()
    open_now = most = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now, most
        open_now += 1
        most = max(most, open_now)
        try:
            while True:
                await server.read_request(reader)
                await release.wait()
                writer.write(answer(200, b"done"))
        finally:
            open_now -= 1

    async with Server(script) as server:
        pool = connections(server.url, limit=2)
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(pool.request("GET", "a", {}, lambda: None)) for _ in range(5)]
            await asyncio.wait_for(server.received(2), 5)
            release.set()
        pool.close()
    assert [t.result() for t in tasks] == [(200, b"done")] * 5
    assert most == 2 and server.connections == 2


async def test_a_request_cancelled_in_flight_leaves_no_answer_behind_for_the_next() -> None:
    release = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await server.read_request(reader)
            if b"slow" in head:
                await release.wait()
                writer.write(answer(200, b"stale"))
            else:
                writer.write(answer(200, b"fresh"))

    async with Server(script) as server:
        pool = connections(server.url, limit=1)
        slow = asyncio.create_task(pool.request("GET", "slow", {}, lambda: None))
        await asyncio.wait_for(server.received(1), 5)
        slow.cancel()
        release.set()
        assert await pool.request("GET", "fast", {}, lambda: None) == (200, b"fresh")
        pool.close()
    assert server.connections == 2


@pytest.mark.parametrize("chunked", [True, False])
async def test_an_answer_given_before_a_large_body_was_read_is_the_answer(chunked: bool) -> None:
    """OPA refuses a bad token before it reads the body, answers 401 and closes the connection (Go's server
    half-closes, waits, then resets what is left unread): that 401 is what the request gets, not a reset."""
    piece = b"x" * 65536

    async def pieces() -> AsyncIterator[bytes]:
        for _ in range(200):  # 13 MB: far more than the socket buffers hold
            yield piece

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer(401, b'{"code":"unauthorized","message":"token refused"}'))
        await writer.drain()
        writer.transport.set_write_buffer_limits(0)
        if writer.can_write_eof():
            writer.write_eof()
        await asyncio.sleep(0.2)  # then closes with the body unread: the client's sends meet a reset

    async with Server(script) as server:
        pool = connections(server.url)
        body: Callable[[], bytes | AsyncIterator[bytes]] = pieces if chunked else (lambda: piece * 200)
        status, payload = await pool.request("PUT", "data/big", {}, body)
        pool.close()
    assert status == 401 and b"token refused" in payload
