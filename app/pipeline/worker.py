"""The OPA writer: takes keys from the workqueue and makes OPA match each key's current state.

One writer per OPA (OPA serialises writes; more writers buy nothing). It takes every key that is waiting
at once and hands each source its keys in one call, so a source can batch them into few writes.

Batching is group commit: the writer never waits for company. A key that arrives while the writer is idle
goes out at once; the keys that arrive while a write is in flight wait for it, and the next write takes
them all. Sparse changes thus reach OPA as fast as one write allows, and dense ones form batches by
themselves, as large as the previous write was long (a longer write makes a larger batch, which keeps the
writer ahead of the stream). The bench's churn phase chose this over waiting for a batch (up to 100 ms
for 20 keys), which cost a change 20 times kube-mgmt's lag at moderate rates. When OPA
is unreachable or refuses kopa's credentials, that is noticed once (by OpaProcess) and waited out, and the
keys are retried when OPA is usable again; when OPA is fine but a key still fails, only that key is
requeued, with its own backoff.

Liveness: the writer reports progress whenever its loop turns and whenever one of its own OPA requests
completes (see liveness.progress_of), so a long refill or a long outage is progress, never a reason for
the kubelet to restart kopa; only a writer that stopped turning is stuck.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

import anyio

from app.model import ALL, DataPath, Key, WorkKey, related
from app.opa.client import OpaUnavailable
from app.opa.process import OpaProcess
from app.operations.liveness import progress_of
from app.pipeline.workqueue import WorkQueue

log = logging.getLogger(__name__)

BATCH_LIMIT = 5000
IDLE_CHECK = 0.5  # seconds


class Handler(Protocol):
    """A source's side of the writer: makes OPA match the current state of these keys."""

    async def apply(self, keys: Sequence[Key]) -> list[tuple[Key, Exception]]:
        """Returns the keys that failed; raises OpaUnavailable when OPA cannot be reached."""
        ...


# A source's footprint: the paths in OPA under which applying it may write data or define rules (None:
# not known, anywhere). The writer compares them before it loads two sources at once (_lanes).
Footprint = Callable[[], list[DataPath] | None]


async def run_worker(
    queue: WorkQueue[WorkKey],
    handlers: Mapping[str, Handler],
    opa: OpaProcess,
    after_batch: Callable[[], Awaitable[None]] | None = None,
    progress: Callable[[], None] = lambda: None,
    *,
    footprints: Mapping[str, Footprint] | None = None,
) -> None:
    """Processes keys forever, a batch at a time, in the order they were first queued.

    `after_batch` also runs before the first batch, and every IDLE_CHECK seconds while the queue is idle,
    so a source with nothing to write still gets noticed as loaded. `progress` is called at every turn of
    the loop and after every OPA request the writer makes. `footprints` has the sources whose whole loads
    may go beside others (_apply); a source without one is never loaded beside anything.
    """
    with progress_of(progress):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_idle_ticks, queue)
            if after_batch is not None:
                await after_batch()
            while True:
                progress()
                # Group commit: whatever is waiting now, without waiting for more (module docstring).
                batch = await queue.get_batch(BATCH_LIMIT)
                if batch:
                    await _write(queue, handlers, opa, batch, footprints or {})
                if after_batch is not None:
                    await after_batch()


async def _idle_ticks(queue: WorkQueue[WorkKey]) -> None:
    """Wakes the writer every IDLE_CHECK seconds, so that it turns (after_batch, progress) while idle."""
    while True:
        await anyio.sleep(IDLE_CHECK)
        queue.nudge()


def _lanes(
    grouped: Mapping[str, list[Key]], footprints: Mapping[str, Footprint]
) -> tuple[list[str], list[str]]:
    """The batch's sources in two lanes, each in batch order: the whole loads (ALL) that go beside the
    others, and the rest. Only when nothing a whole load writes in OPA can meet what the rest writes;
    otherwise everything stays in one lane."""
    sources = list(grouped)
    beside = [source for source in sources[1:] if ALL in grouped[source]]
    if not beside:
        return sources, []
    main = [source for source in sources if source not in beside]

    def footprint(source: str) -> list[DataPath] | None:
        known = footprints.get(source)
        return known() if known is not None else None

    theirs = [footprint(source) for source in main]
    for source in beside:
        mine = footprint(source)
        if mine is None or any(
            other is None or any(related(a, b) for a in mine for b in other) for other in theirs
        ):
            return sources, []
    return main, beside


async def _apply(
    handlers: Mapping[str, Handler], grouped: Mapping[str, list[Key]], footprints: Mapping[str, Footprint]
) -> dict[str, list[tuple[Key, Exception]]]:
    """Hands each source its keys, in batch order, except for whole loads that can go beside (_lanes).

    After an OPA restart every source is loaded whole. OPA reads and decodes a request's body before it
    takes its write lock, so a collection's PUT (18 MB for 10,000 objects: 0.3 s of decoding) runs on
    another core while OPA compiles the policy PUTs, which it does for every module at each one: the
    refill costs about what the policies cost. Sources whose writes could meet (a policy whose package
    holds the collection's path, a data ConfigMap under it) keep the batch order, so that a conflict
    between them fails the same way every time.
    """
    main, beside = _lanes(grouped, footprints)
    results: dict[str, list[tuple[Key, Exception]]] = {}
    errors: list[Exception] = []

    async def lane(sources: list[str]) -> None:
        for source in sources:
            handler = handlers.get(source)
            if handler is None:  # a source that is gone (a retired resource): nothing left to write
                log.debug("dropping %d keys of %s: no longer a source", len(grouped[source]), source)
                continue
            try:
                results[source] = await handler.apply(grouped[source])
            except Exception as exc:  # each lane stops at its own failure, as the batch would
                errors.append(exc)
                return

    if beside:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lane, beside)
            await lane(main)
    else:  # the usual batch: no task group to open and close for every change
        await lane(main)
    if errors:  # an outage first: it is waited out and the whole batch written again
        raise next((exc for exc in errors if isinstance(exc, OpaUnavailable)), errors[0])
    return results


async def _write(
    queue: WorkQueue[WorkKey],
    handlers: Mapping[str, Handler],
    opa: OpaProcess,
    batch: list[WorkKey],
    footprints: Mapping[str, Footprint],
) -> None:
    """One batch: hands each source its keys; requeues what failed (see the module docstring)."""
    grouped: dict[str, list[Key]] = {}
    for work in batch:
        grouped.setdefault(work.source, []).append(work.key)
    failed: dict[WorkKey, Exception] = {}
    try:
        for source, failures in (await _apply(handlers, grouped, footprints)).items():
            for key, exc in failures:
                failed[WorkKey(source, key)] = exc
    except OpaUnavailable as exc:
        for work in batch:
            queue.note_failure(work)  # failing from now on, for readiness, even while OPA is waited for
        if await opa.outage_or_fault(exc):
            for work in batch:
                queue.add(work)
        else:
            delays = [queue.add_after_failure(work) for work in batch]
            log.warning("writing %d keys to OPA failed (%s); retrying in %.1fs", len(batch), exc, min(delays))
    except Exception as exc:
        # A bug, not a bad input: requeue with backoff rather than lose the keys or spin.
        delays = [queue.add_rate_limited(work) for work in batch]
        log.error(
            "processing %d keys failed (%s: %s); retrying in %.1fs",
            len(batch),
            type(exc).__name__,
            exc,
            min(delays),
            exc_info=True,
        )
    else:
        for work in batch:
            if work in failed:
                queue.add_rate_limited(work)
            else:
                queue.forget(work)
    finally:
        for work in batch:
            queue.done(work)
