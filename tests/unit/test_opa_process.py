"""OpaProcess: one owner for "which OPA process is this, and can kopa write to it"."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest

from app.opa.client import OpaUnauthorized, OpaUnavailable
from app.opa.process import OpaProcess
from tests.unit.polling import until

pytestmark = pytest.mark.anyio


class ScriptedOpa:
    """Answers /v1/config as told: a process id, or an exception to raise."""

    def __init__(self, answer: str | Exception = "one") -> None:
        self.answer = answer
        self.calls = 0

    async def config(self) -> dict[str, Any]:
        self.calls += 1
        await anyio.sleep(0.01)  # a real request yields, so concurrent checks overlap
        if isinstance(self.answer, Exception):
            raise self.answer
        return {"labels": {"id": self.answer}}


async def test_a_restart_is_counted_and_announced_once_whoever_checks() -> None:
    opa = ScriptedOpa("one")
    process = OpaProcess(opa, interval=1.0)
    announced = []

    async def listener() -> None:
        announced.append(process.epoch)
        await anyio.sleep(0.01)

    process.on_restart(listener)
    assert await process.check()
    opa.answer = "two"
    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(process.check)
    assert (process.restarts, process.epoch, announced) == (1, 1, [1])


async def test_a_refused_token_is_logged_once_and_waited_out(caplog: pytest.LogCaptureFixture) -> None:
    opa = ScriptedOpa(OpaUnauthorized("GET config: HTTP 401", 401))
    process = OpaProcess(opa, interval=1.0, wait_cap=0.01)
    caplog.set_level(logging.INFO)
    for _ in range(3):
        assert not await process.check()
    assert process.problem() == "OPA refuses kopa's credentials (HTTP 401)"
    assert process.refusals == 1 and process.available
    async with anyio.create_task_group() as tg:
        tg.start_soon(process.wait_usable)
        await until(lambda: opa.calls >= 10)
        opa.answer = "one"
    assert process.usable and process.problem() == ""
    messages = [r.getMessage() for r in caplog.records]
    assert sum("refuses kopa's credentials" in m for m in messages) == 1
    assert sum("accepts kopa's credentials again" in m for m in messages) == 1


async def test_a_write_failure_is_the_writes_fault_when_opa_is_fine() -> None:
    opa = ScriptedOpa("one")
    process = OpaProcess(opa, interval=1.0, wait_cap=0.01)
    assert not await process.outage_or_fault(OpaUnavailable("PUT data: HTTP 500"))
    opa.answer = OpaUnavailable("connection refused")

    async def come_back() -> None:
        await until(lambda: opa.calls >= 5)
        opa.answer = "one"

    async with anyio.create_task_group() as tg:
        tg.start_soon(come_back)
        with anyio.fail_after(5):
            assert await process.outage_or_fault(OpaUnavailable("PUT data: connection refused"))
    assert process.usable


class Connection:
    """A stand-in for OpaClient.until_closed: each call opens a "connection" that lasts until the test
    closes it (close()), or closes at once when `always_closed`."""

    def __init__(self, *, always_closed: bool = False) -> None:
        self.opened = 0
        self.always_closed = always_closed
        self._closed = anyio.Event()

    async def __call__(self) -> None:
        self.opened += 1
        if not self.always_closed:
            await self._closed.wait()
            self._closed = anyio.Event()

    def close(self) -> None:
        self._closed.set()


async def test_a_restart_is_noticed_when_opa_closes_the_connection_not_at_the_next_check() -> None:
    """OPA killed: its connections close. The check that follows at once meets the gap (OPA not yet up),
    asks again soon, and sees the new process long before the (here 60 s) interval."""
    opa, connection = ScriptedOpa("one"), Connection()
    process = OpaProcess(opa, interval=60.0, watch=connection)
    async with anyio.create_task_group() as tg:
        tg.start_soon(process.run)
        await until(lambda: connection.opened == 1)
        opa.answer = OpaUnavailable("connection refused")  # killed; the new process is starting
        connection.close()
        await until(lambda: not process.available)
        await until(lambda: opa.calls >= 4)  # asked again without waiting for the interval
        opa.answer = "two"
        await until(lambda: process.restarts == 1)
        await until(lambda: connection.opened == 2)  # and the new process is watched in turn
        tg.cancel_scope.cancel()
    assert process.available and process.epoch == 1


async def test_a_connection_that_keeps_closing_costs_a_check_per_interval_at_most() -> None:
    """A proxy that drops idle connections at once must not turn the watch into a busy loop."""
    opa, connection = ScriptedOpa("one"), Connection(always_closed=True)
    process = OpaProcess(opa, interval=0.1, watch=connection)
    async with anyio.create_task_group() as tg:
        tg.start_soon(process.run)
        await until(lambda: connection.opened >= 5)
        tg.cancel_scope.cancel()
    # Each opening is followed by one check for its close, and one at the end of the interval.
    assert opa.calls <= 2 * connection.opened + 1
    assert process.restarts == 0
