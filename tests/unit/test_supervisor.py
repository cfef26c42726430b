"""A crashing component is restarted with backoff and never takes the others down."""

from __future__ import annotations

import anyio
import pytest

from app.operations.supervisor import supervise
from app.pipeline.workqueue import Backoff

pytestmark = pytest.mark.anyio


async def test_a_crashing_component_is_restarted_until_it_succeeds() -> None:
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 4:
            raise RuntimeError("boom")

    with anyio.fail_after(5):
        await supervise("flaky", flaky, Backoff(base=0.001, cap=0.01))
    assert runs == 4


async def test_a_crash_does_not_stop_its_siblings(caplog: pytest.LogCaptureFixture) -> None:
    ticks = 0

    async def always_crashes() -> None:
        raise ValueError("bad")

    async def steady() -> None:
        nonlocal ticks
        while ticks < 20:
            ticks += 1
            await anyio.sleep(0.001)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervise, "crasher", always_crashes, Backoff(base=0.001, cap=0.005))
            await supervise("steady", steady)
            tg.cancel_scope.cancel()
    assert ticks == 20
    assert "crasher crashed (ValueError: bad)" in caplog.text


async def test_a_crash_inside_a_task_group_is_logged_as_what_it_was(caplog: pytest.LogCaptureFixture) -> None:
    runs = 0

    async def crashes_in_a_task() -> None:
        nonlocal runs
        runs += 1
        if runs > 1:
            return

        async def task() -> None:
            raise ValueError("the real cause")

        async with anyio.create_task_group() as tg:
            tg.start_soon(task)

    with anyio.fail_after(5):
        await supervise("grouped", crashes_in_a_task, Backoff(base=0.001, cap=0.01))
    assert "grouped crashed (ValueError: the real cause)" in caplog.text
    assert "sub-exception" not in caplog.text
