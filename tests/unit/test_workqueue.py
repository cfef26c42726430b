"""The dispatcher keeps client-go's workqueue promises."""

from __future__ import annotations

import tracemalloc

import anyio
import pytest

from app.model import ALL, CHECK, ObjectKey, WorkKey, whole_source
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
        assert queue.failing == 1
        queue.forget("a")
        queue.done("a")
        assert queue.failing == 0
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


async def test_a_key_waiting_for_its_retry_is_held_once_at_its_earliest_time() -> None:
    queue: WorkQueue[str] = WorkQueue("t")
    queue.add_after("a", 30.0)
    queue.add_after("a", 60.0)
    queue.add_after("a", 0.05)
    assert queue.delayed == 1
    async with queue:
        with anyio.fail_after(2):
            assert await queue.get() == "a"  # the queue runs its own timer while it is open
    assert queue.delayed == 0


async def test_a_burst_into_a_stalled_writer_keeps_memory_flat_and_loses_nothing() -> None:
    """100,000 changes of distinct objects while nothing is taken out: the queue holds at most its
    capacity; a source that would overflow it is collapsed into its ALL key, which stands for all of them."""
    queue: WorkQueue[WorkKey] = WorkQueue("t", capacity=1000, collapse=whole_source)
    queue.add(WorkKey("other", ObjectKey("ns", "lone")))
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(100_000):
            queue.add(WorkKey("s", ObjectKey("ns", f"o{i}")))
        grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    finally:
        tracemalloc.stop()
    assert queue.pending <= 1000
    assert grown < 1_000_000, f"{grown} bytes held for 100,000 changes"
    taken = await queue.get_batch(10_000)
    assert set(taken) == {WorkKey("other", ObjectKey("ns", "lone")), WorkKey("s", ALL)}
    assert queue.stats.collapsed == 999  # the keys of "s" waiting when it overflowed
    # After the collapse, changes of "s" coalesce into its ALL key while it waits; once it is taken, they
    # are held on their own again.
    for key in taken:
        queue.done(key)
    queue.add(WorkKey("s", ObjectKey("ns", "after")))
    assert await queue.get() == WorkKey("s", ObjectKey("ns", "after"))


def test_markers_and_other_sources_are_not_collapsed() -> None:
    queue: WorkQueue[WorkKey] = WorkQueue("t", capacity=2, collapse=whole_source)
    queue.add(WorkKey("a", ObjectKey("ns", "1")))
    queue.add(WorkKey("b", ObjectKey("ns", "1")))
    queue.add(WorkKey("c", CHECK))  # a marker has no whole to collapse into: held as it is
    queue.add(WorkKey("a", ObjectKey("ns", "2")))  # full: "a" collapses into its ALL
    assert len(queue) == 3
    assert queue.stats.collapsed == 1
