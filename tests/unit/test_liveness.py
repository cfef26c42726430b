"""Liveness: a component that keeps crashing, a stuck component, a blocked loop, each reported with why."""

from __future__ import annotations

import time

import anyio
import pytest

from app.operations import liveness as liveness_module
from app.operations.liveness import Liveness
from app.operations.supervisor import supervise
from app.pipeline.workqueue import Backoff

pytestmark = pytest.mark.anyio


async def test_a_component_that_keeps_crashing_fails_liveness() -> None:
    alive = Liveness()
    runs = 0
    enough = anyio.Event()

    async def broken() -> None:
        nonlocal runs
        runs += 1
        if runs >= liveness_module.CRASH_LOOP:
            enough.set()
        raise RuntimeError("cannot start")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervise, "watch of x", broken, Backoff(base=0.001, cap=0.002), alive.crashed)
            await enough.wait()
            tg.cancel_scope.cancel()
    ok, details = alive.check()
    assert not ok
    assert any("watch of x crashed" in p for p in details["problems"])
    alive.crashed("watch of x", healthy_run=True)  # it ran a long while before crashing this time
    assert alive.check()[0]


async def test_a_component_without_progress_fails_liveness() -> None:
    alive = Liveness()
    alive.beat("OPA writer", bound=0.05)
    assert alive.check()[0]
    await anyio.sleep(0.1)
    ok, details = alive.check()
    assert not ok and "OPA writer made no progress" in details["problems"][0]


def test_a_blocked_event_loop_fails_liveness() -> None:
    alive = Liveness(last_tick=time.monotonic() - liveness_module.LOOP_BLOCKED - 1)
    ok, details = alive.check()
    assert not ok and details["problems"][0].startswith("event loop blocked for")
