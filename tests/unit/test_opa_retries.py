"""The OPA client's retries of transient failures (5xx, 429, connection errors): a request that fails once
is tried again after a pause, within an attempt count and a time budget that both count the first attempt;
anything else is the caller's to handle. OPA is an aiohttp server on loopback that fails on demand."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from app.opa.client import FIRST_RETRY_DELAY, OpaClient, OpaError, OpaUnavailable

pytestmark = pytest.mark.anyio


class Flaky:
    """Answers `failures` 500s (or `status`), then 204."""

    def __init__(self) -> None:
        self.failures = 0
        self.status = 500
        self.requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.failures:
            self.failures -= 1
            return web.json_response({"code": "x", "message": "failing"}, status=self.status)
        return web.Response(status=204)


@pytest.fixture
async def server() -> AsyncIterator[tuple[Flaky, str]]:
    flaky = Flaky()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", flaky.handle)
    async with TestServer(app, host="127.0.0.1") as test_server:
        yield flaky, str(test_server.make_url("/v1"))


async def test_a_request_that_succeeds_is_sent_once(server: tuple[Flaky, str]) -> None:
    flaky, url = server
    async with OpaClient(url) as client:
        await client.put_data(["a"], b"{}")
    assert flaky.requests == 1


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_transient_failures_are_retried_after_a_pause(server: tuple[Flaky, str], status: int) -> None:
    flaky, url = server
    flaky.failures, flaky.status = 2, status
    async with OpaClient(url, attempts=3, retry_budget=5.0) as client:
        started = time.monotonic()
        await client.put_data(["a"], b"{}")
    assert flaky.requests == 3
    assert time.monotonic() - started >= FIRST_RETRY_DELAY


async def test_the_attempts_count_the_first_one(server: tuple[Flaky, str]) -> None:
    flaky, url = server
    flaky.failures = 10
    async with OpaClient(url, attempts=3, retry_budget=5.0) as client:
        with pytest.raises(OpaUnavailable, match="HTTP 500"):
            await client.put_data(["a"], b"{}")
    assert flaky.requests == 3


async def test_one_attempt_means_no_retry(server: tuple[Flaky, str]) -> None:
    flaky, url = server
    flaky.failures = 1
    async with OpaClient(url, attempts=1) as client:
        with pytest.raises(OpaUnavailable):
            await client.put_data(["a"], b"{}")
    assert flaky.requests == 1


async def test_a_client_error_is_never_retried(server: tuple[Flaky, str]) -> None:
    flaky, url = server
    flaky.failures, flaky.status = 1, 400
    async with OpaClient(url, attempts=3) as client:
        with pytest.raises(OpaError):
            await client.put_data(["a"], b"{}")
    assert flaky.requests == 1
