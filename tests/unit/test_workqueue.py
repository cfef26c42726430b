"""The dispatcher keeps client-go's workqueue promises."""

from __future__ import annotations

import anyio
import pytest

from app.pipeline.workqueue import Backoff, WorkQueue

pytestmark = pytest.mark.anyio


async def test_adds_of_a_waiting_key_coalesce_into_one() -> None:
    queue: WorkQueue[str] = WorkQueue("t")
    for _ in range(10):
        queue.add("a")
    queue.add("b")
    assert len(queue) == 2
    assert queue.stats.coalesced == 9
    assert await queue.get() == "a"
    assert await queue.get() == "b"


async def test_a_key_in_flight_is_not_handed_out_again_until_done() -> None:
    queue: WorkQueue[str] = WorkQueue("t")
    queue.add("a")
    assert await queue.get() == "a"
    queue.add("a")  # changed while in flight
    assert len(queue) == 0, "a key in flight must not be queued twice"
    with anyio.move_on_after(0.05) as scope:
        await queue.get()
    assert scope.cancelled_caught
    queue.done("a")
    assert len(queue) == 1, "a key changed while in flight is processed once more"
    assert await queue.get() == "a"
    queue.done("a")
    assert len(queue) == 0


async def test_failed_keys_come_back_after_a_growing_capped_delay() -> None:
    backoff = Backoff(base=0.01, cap=0.04, jitter=0.0)
    assert [backoff.delay(n) for n in (1, 2, 3, 4, 5)] == [0.01, 0.02, 0.04, 0.04, 0.04]
    queue: WorkQueue[str] = WorkQueue("t", backoff)
    async with anyio.create_task_group() as tg:
        tg.start_soon(queue.run_timer)
        queue.add("a")
        key = await queue.get()
        assert queue.add_rate_limited(key) == 0.01
        queue.done(key)
        assert len(queue) == 0
        with anyio.fail_after(2):
            assert await queue.get() == "a"
        assert queue.failures("a") == 1
        queue.forget("a")
        queue.done("a")
        assert queue.failures("a") == 0
        with anyio.fail_after(2):
            await queue.wait_idle()
        tg.cancel_scope.cancel()


async def test_one_failing_key_does_not_hold_up_the_others() -> None:
    queue: WorkQueue[str] = WorkQueue("t", Backoff(base=10, cap=10, jitter=0))
    async with anyio.create_task_group() as tg:
        tg.start_soon(queue.run_timer)
        queue.add("bad")
        queue.add("good")
        bad = await queue.get()
        queue.add_rate_limited(bad)
        queue.done(bad)
        with anyio.fail_after(1):
            assert await queue.get() == "good"
        tg.cancel_scope.cancel()
