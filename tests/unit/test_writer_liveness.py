"""The OPA writer's liveness: a long batch or a long OPA outage is progress, a writer that stopped is not.

OPA is the real OpaClient talking to an aiohttp server on loopback (aiohttp's own test server, so the
requests, their timeouts and the client's hooks are the real ones), slowed down or switched off on demand.
The liveness bound is made short; the writer's hooks are wired as app/cli.py wires them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from functools import partial
from typing import Any

import anyio
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from app.model import Key, ObjectKey, WorkKey, objects_only
from app.opa.client import OpaClient
from app.opa.process import OpaProcess
from app.operations.liveness import Liveness, on_opa_request
from app.pipeline.worker import run_worker
from app.pipeline.workqueue import WorkQueue
from tests.unit.polling import until

pytestmark = pytest.mark.anyio

BOUND = 1.0  # seconds without progress that count as stuck, here


class Opa:
    """A loopback OPA whose writes take `delay` seconds, and that can answer 503 (down)."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.down = False
        self.writes = 0

    async def handle(self, request: web.Request) -> web.Response:
        if self.down:
            return web.Response(status=503)
        if request.method == "PUT":
            await anyio.sleep(self.delay)
            self.writes += 1
            return web.Response(status=204)
        return web.json_response({"result": {"labels": {"id": "one"}}})


class Writes:
    """A source whose every key is one slow OPA write."""

    def __init__(self, opa: OpaClient) -> None:
        self.opa = opa

    async def apply(self, keys: Sequence[Key]) -> list[tuple[Key, Exception]]:
        for key in objects_only(keys):
            await self.opa.put_data(["k", *key], b"{}")
        return []


@pytest.fixture
async def opa() -> AsyncIterator[tuple[Opa, OpaClient]]:
    fake = Opa()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    async with TestServer(app, host="127.0.0.1") as server:
        url = str(server.make_url("/v1"))
        async with OpaClient(url, observe=[on_opa_request], retry_budget=0.1) as client:
            yield fake, client


async def watch_liveness(alive: Liveness, seconds: float) -> list[str]:
    """Asks liveness every 50 ms for `seconds`; returns the problems it reported."""
    problems: list[str] = []
    with anyio.move_on_after(seconds):
        while True:
            problems += alive.check()[1]["problems"]
            await anyio.sleep(0.05)
    return problems


def writer(
    queue: WorkQueue[WorkKey], client: OpaClient, alive: Liveness
) -> Callable[[], Coroutine[Any, Any, None]]:
    process = OpaProcess(client, interval=1.0, wait_cap=0.1)
    return partial(
        run_worker, queue, {"s": Writes(client)}, process, None, lambda: alive.beat("OPA writer", BOUND)
    )


async def test_a_batch_longer_than_the_bound_is_progress(opa: tuple[Opa, OpaClient]) -> None:
    fake, client = opa
    fake.delay = 0.1
    queue: WorkQueue[WorkKey] = WorkQueue("t")
    alive = Liveness()
    for i in range(30):  # one batch of 30 writes: 3 s, three times the bound
        queue.add(WorkKey("s", ObjectKey("ns", str(i))))
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer(queue, client, alive))
        assert await watch_liveness(alive, 3.5) == []
        tg.cancel_scope.cancel()
    assert fake.writes == 30


async def test_an_opa_outage_longer_than_the_bound_is_progress(opa: tuple[Opa, OpaClient]) -> None:
    fake, client = opa
    fake.down = True
    queue: WorkQueue[WorkKey] = WorkQueue("t")
    alive = Liveness()
    queue.add(WorkKey("s", ObjectKey("ns", "pending")))
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer(queue, client, alive))
        assert await watch_liveness(alive, 3 * BOUND) == []
        fake.down = False
        await until(lambda: fake.writes >= 1)
        tg.cancel_scope.cancel()


async def test_a_writer_that_stopped_turning_is_stuck() -> None:
    alive = Liveness()
    alive.beat("OPA writer", BOUND)
    await until(lambda: not alive.check()[0], within=3 * BOUND)
    assert "OPA writer made no progress" in alive.check()[1]["problems"][0]
