"""The watch stream's framing and ends: lines of any size however the answer is cut, error answers, a
connection that breaks, silence, and a refused proxy tunnel.

The framing is fed to the protocol directly, cut at every byte, because TCP on loopback would not cut it
there on demand; the ends run against loopback servers answering as an API server cannot be made to.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from app.kube.stream import KEEPALIVE, MAX_LINE, Endpoint, LineStream, StreamError
from devstack.certs import TestCA
from devstack.processes import HOST

pytestmark = pytest.mark.anyio

HEAD_200 = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the stream is an asyncio protocol


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


async def feed(pieces: list[bytes]) -> tuple[list[bytes], tuple[int, bytes]]:
    lines: list[bytes] = []
    stream = LineStream(lines.append, idle_timeout=5)
    for piece in pieces:
        stream.data_received(piece)
    return lines, await asyncio.wait_for(stream.answer(), 5)


def cut(data: bytes, size: int) -> list[bytes]:
    return [data[start : start + size] for start in range(0, len(data), size)]


async def test_lines_cut_anywhere_come_out_whole() -> None:
    # Two lines in one chunk, a line across chunks, an empty line, a chunk extension, no final newline.
    body = chunked(b'{"a":1}\n{"bb":22}\n', b'{"c":', b"3}\n\n", b'{"d":4}')
    answer = HEAD_200 + body.replace(b"5\r\n", b"5;ext=1\r\n", 1)
    for size in range(1, len(answer) + 1):
        lines, outcome = await feed(cut(answer, size))
        assert lines == [b'{"a":1}', b'{"bb":22}', b'{"c":3}', b'{"d":4}'], size
        assert outcome == (200, b""), size


@pytest.mark.parametrize("size", [4093, 64 * 1024, 10**7])
async def test_a_line_as_large_as_an_object_comes_out_whole(size: int) -> None:
    big = b'{"object":"' + b"x" * (1024 * 1024) + b'"}'
    answer = HEAD_200 + chunked(*cut(b'{"a":1}\n' + big + b"\n", 8000))
    lines, outcome = await feed(cut(answer, size))
    assert lines == [b'{"a":1}', big]
    assert outcome == (200, b"")


async def test_a_line_over_the_limit_is_a_malformed_answer() -> None:
    stream = LineStream(lambda line: None, idle_timeout=5)
    stream.data_received(HEAD_200)
    for part in cut(b"x" * (MAX_LINE + 1), 1 << 20):
        stream.data_received(b"%x\r\n%b\r\n" % (len(part), part))
    with pytest.raises(StreamError, match=r"malformed answer.*a line over 16 MiB"):
        await stream.answer()


async def test_an_error_answer_gives_its_status_and_body_and_no_line() -> None:
    status = b'{"kind":"Status","code":410,"reason":"Expired"}'
    for framing in (b"Content-Length: %d\r\n\r\n%b" % (len(status), status), b"\r\n" + status):
        head = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 410 Gone\r\nContent-Type: application/json\r\n"
        lines: list[bytes] = []
        stream = LineStream(lines.append, idle_timeout=5)
        stream.data_received(head + framing)
        if not framing.startswith(b"Content-Length"):
            stream.connection_lost(None)  # a body delimited by the close
        assert await stream.answer() == (410, status)
        assert lines == []


async def test_what_the_line_handler_raises_ends_the_stream_as_it_is() -> None:
    def refuse(line: bytes) -> None:
        raise KeyError(line)

    stream = LineStream(refuse, idle_timeout=5)
    stream.data_received(HEAD_200 + chunked(b'{"a":1}\n'))
    with pytest.raises(KeyError):
        await stream.answer()


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x answer"),
        (HEAD_200 + b"zz\r\n", "invalid literal"),
        (HEAD_200 + b"2\r\n{}XX", "a chunk not followed by CRLF"),
        (HEAD_200.replace(b"chunked", b"gzip"), "unsupported transfer coding"),
    ],
)
async def test_a_malformed_answer_is_a_stream_error(answer: bytes, message: str) -> None:
    stream = LineStream(lambda line: None, idle_timeout=5)
    stream.data_received(answer)
    with pytest.raises(StreamError, match=f"malformed answer.*{message}"):
        await stream.answer()


Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def answering(answer: Answer) -> AsyncIterator[str]:
    """A loopback server that reads one request head and answers with `answer`; yields its URL."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await answer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, HOST, 0)
    async with server:
        yield f"http://{HOST}:{server.sockets[0].getsockname()[1]}"


async def run(url: str, *, idle_timeout: float = 5, proxy: str | None = None) -> tuple[list[bytes], int]:
    lines: list[bytes] = []
    endpoint = Endpoint(url, None, proxy=proxy, proxy_authorization="Basic c2VjcmV0" if proxy else None)
    stream = LineStream(lines.append, idle_timeout=idle_timeout)
    status, _ = await asyncio.wait_for(stream.run(endpoint, "/api/v1/pods?watch=1", {}, 5), 10)
    return lines, status


async def test_a_connection_that_breaks_mid_stream_is_a_stream_error_after_the_lines_before() -> None:
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD_200 + b"8\r\n" + b'{"a":1}\n' + b"\r\n" + b"8\r\n{")
        await writer.drain()

    seen: list[bytes] = []
    async with answering(half) as url:
        stream = LineStream(seen.append, idle_timeout=5)
        with pytest.raises(StreamError, match="closed the connection in the middle of the answer"):
            await asyncio.wait_for(stream.run(Endpoint(url, None), "/x", {}, 5), 10)
    assert seen == [b'{"a":1}']


async def test_a_stream_silent_past_the_idle_timeout_is_a_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD_200)
        await writer.drain()
        await reader.read()  # until the client gives up

    async with answering(silent) as url:
        with pytest.raises(StreamError, match=r"TimeoutError: no data from .* for 0.3 s"):
            await run(url, idle_timeout=0.3)


async def test_a_watch_connection_has_tcp_keepalive_on() -> None:
    """A peer that vanishes without closing the connection shows within about a minute (the kernel's
    probes), not only at the idle deadline (minutes)."""
    options: dict[str, int] = {}

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD_200 + chunked(b'{"a":1}\n'))
        await writer.drain()

    def seen(line: bytes) -> None:
        assert stream._transport is not None
        sock = stream._transport.get_extra_info("socket")
        options["keepalive"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        for name in KEEPALIVE:
            options[name] = sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))

    async with answering(answer) as url:
        stream = LineStream(seen, idle_timeout=5)
        assert await asyncio.wait_for(stream.run(Endpoint(url, None), "/x", {}, 5), 10) == (200, b"")
    assert options == {"keepalive": 1, **KEEPALIVE}


async def test_a_refused_connection_is_a_stream_error() -> None:
    async with answering(lambda r, w: asyncio.sleep(0)) as url:
        pass  # closed: nothing listens there any more
    with pytest.raises(StreamError, match="connecting to"):
        await run(url)


async def test_an_http_api_server_behind_a_proxy_gets_the_absolute_form_and_the_proxy_credentials() -> None:
    heads: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD_200 + chunked(b'{"via":"proxy"}\n'))
        await writer.drain()

    async def recording(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        await proxy(reader, writer)

    server = await asyncio.start_server(recording, HOST, 0)
    async with server:
        proxy_url = f"http://{HOST}:{server.sockets[0].getsockname()[1]}"
        lines, status = await run("http://api.example:8080/base", proxy=proxy_url)
    assert (lines, status) == ([b'{"via":"proxy"}'], 200)
    request_line, *fields = heads[0].decode().split("\r\n")
    assert request_line == "GET http://api.example:8080/base/api/v1/pods?watch=1 HTTP/1.1"
    assert "Proxy-Authorization: Basic c2VjcmV0" in fields


async def test_a_proxy_that_refuses_the_tunnel_is_a_stream_error_naming_its_answer() -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with answering(refuse) as proxy_url:
        endpoint = Endpoint("https://api.example:6443", ssl.create_default_context(), proxy=proxy_url)
        stream = LineStream(lambda line: None, idle_timeout=5)
        with pytest.raises(StreamError, match="refused the tunnel: HTTP 407"):
            await asyncio.wait_for(stream.run(endpoint, "/x", {}, 5), 10)


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for 127.0.0.1 from a test CA, and a client context trusting it."""
    ca = TestCA(tmp_path_factory.mktemp("ca"))
    cert, key = ca.issue("loopback")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(ca.ca_file))


async def test_an_https_api_server_behind_an_https_proxy_is_reached_through_tls_inside_tls(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_tls, client_tls = tls_pair
    connects: list[str] = []

    async def api(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(HEAD_200 + chunked(b'{"via":"tunnel"}\n'))
        await writer.drain()
        writer.close()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")[0]
        connects.append(request_line)
        host, port = request_line.split(" ")[1].rsplit(":", 1)
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    api_server = await asyncio.start_server(api, HOST, 0, ssl=server_tls)
    proxy_server = await asyncio.start_server(proxy, HOST, 0, ssl=server_tls)
    async with api_server, proxy_server:
        api_port = api_server.sockets[0].getsockname()[1]
        proxy_port = proxy_server.sockets[0].getsockname()[1]
        endpoint = Endpoint(f"https://{HOST}:{api_port}", client_tls, proxy=f"https://{HOST}:{proxy_port}")
        lines: list[bytes] = []
        stream = LineStream(lines.append, idle_timeout=5)
        outcome = await asyncio.wait_for(stream.run(endpoint, "/api/v1/pods?watch=1", {}, 5), 10)
    assert (lines, outcome) == ([b'{"via":"tunnel"}'], (200, b""))
    assert connects == [f"CONNECT {HOST}:{api_port} HTTP/1.1"]
