"""The watch line reader: events of any size, however the stream is cut into chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from app.kube.client import watch_lines

pytestmark = pytest.mark.anyio


async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("size", [4093, 64 * 1024, 10**7])
async def test_lines_of_any_length_come_out_whole(size: int) -> None:
    big = b'{"object":"' + b"x" * (1024 * 1024) + b'"}'
    stream = b'{"a":1}\n\n' + big + b'\n{"b":2}'  # an empty line, a 1 MiB line, no final newline
    assert [line async for line in watch_lines(chunks(stream, size))] == [b'{"a":1}', big, b'{"b":2}']


async def test_lines_cut_anywhere_come_out_whole() -> None:
    stream = b'{"a":1}\n{"bb":22}\n\n{"c":3}\n'
    for size in range(1, len(stream) + 1):
        lines = [line async for line in watch_lines(chunks(stream, size))]
        assert lines == [b'{"a":1}', b'{"bb":22}', b'{"c":3}'], size
