"""The dispatcher's core: client-go's workqueue semantics, for anyio.

- A key waiting to be processed is held once: ten adds while it waits become one piece of work.
- A key is never handed out twice at once; one added while in flight is handed out again after done().
- A key that failed comes back after a per-key, capped, jittered exponential delay (rate-limited requeue);
  a key waiting for its delay is held once, at the earliest time it was asked for.
The queue holds keys, never payloads: the worker reads the key's latest state when it gets it.
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, Protocol, Self, TypeVar

import anyio
from anyio.abc import TaskGroup

K = TypeVar("K", bound=Hashable)


@dataclass
class Backoff:
    """Capped exponential backoff with jitter; `failures` is the count so far."""

    base: float = 0.05
    cap: float = 30.0
    jitter: float = 0.2

    def delay(self, failures: int) -> float:
        raw = min(self.cap, self.base * 2.0 ** max(failures - 1, 0))
        return raw * random.uniform(1 - self.jitter, 1 + self.jitter)


class QueueObserver(Protocol):
    """Told how long keys wait and how long they take; the metrics layer implements it."""

    def queued(self, seconds: float) -> None: ...

    def worked(self, seconds: float) -> None: ...


@dataclass
class QueueStats:
    """Counters the metrics layer reads; kept here so the queue does not depend on it."""

    adds: int = 0
    coalesced: int = 0
    retries: int = 0
    collapsed: int = 0  # waiting keys replaced by their whole source's key when the queue was full
    added_at: dict[Hashable, float] = field(default_factory=dict)
    started_at: dict[Hashable, float] = field(default_factory=dict)


class WorkQueue(Generic[K]):
    """Use it as an async context manager: it owns the timer task that moves due retries back in.

    Bounded: with `capacity` keys waiting, adding a key of another object collapses the waiting keys of
    that key's source into one whole-source key (`collapse(key)`, e.g. the source's ALL marker), which
    stands for them all (handlers are level-triggered: they read every object's latest state). Memory
    stays flat, producers never wait (a watch that is not read is closed by the API server, and a stalled
    list's continue token expires: waiting producers would turn into relists), and nothing is lost.
    """

    def __init__(
        self,
        name: str,
        backoff: Backoff | None = None,
        observer: QueueObserver | None = None,
        *,
        capacity: int | None = None,
        collapse: Callable[[K], K | None] | None = None,
    ) -> None:
        self.name = name
        self.backoff = backoff or Backoff()
        self.observer = observer
        self.capacity = capacity
        self._collapse = collapse
        self.stats = QueueStats()
        self._queue: deque[K] = deque()
        self._dirty: set[K] = set()
        self._processing: set[K] = set()
        self._failures: dict[K, int] = {}
        self._delayed: list[tuple[float, int, K]] = []  # a heap; entries not matching _due are stale
        self._due: dict[K, float] = {}  # each delayed key once, with the time it is due
        self._waited: dict[K, float] = {}  # of each key in flight: seconds it waited to be handed out
        self._tiebreak = itertools.count()
        self._ready = anyio.Event()
        self._nudged = False
        self._timer_changed = anyio.Event()
        self._idle_waiters: anyio.Event | None = None  # made by wait_idle, set by _check_idle
        self._timer_group: TaskGroup | None = None

    async def __aenter__(self) -> Self:
        self._timer_group = anyio.create_task_group()
        await self._timer_group.__aenter__()
        self._timer_group.start_soon(self.run_timer)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._timer_group is not None
        self._timer_group.cancel_scope.cancel()
        await self._timer_group.__aexit__(None, None, None)
        self._timer_group = None

    def __len__(self) -> int:
        """Keys waiting to be handed out (the depth)."""
        return len(self._queue)

    @property
    def delayed(self) -> int:
        """Keys waiting for their retry delay: writes that failed and are not yet redone."""
        return len(self._due)

    @property
    def failing(self) -> int:
        """Keys whose last attempt failed and that have not succeeded since (see forget())."""
        return len(self._failures)

    @property
    def pending(self) -> int:
        """Keys not yet processed to the end: waiting, in flight, or waiting for a retry."""
        return len(self._dirty | self._processing | self._due.keys())

    def add(self, key: K) -> None:
        self.stats.adds += 1
        whole = self._collapse(key) if self._collapse is not None else None
        if key in self._dirty or (whole is not None and whole in self._dirty):
            self.stats.coalesced += 1  # waiting already, itself or as part of its whole source
            return
        if whole is not None and self.capacity is not None and len(self._dirty) >= self.capacity:
            self._collapse_into(whole)
            key = whole
        self._dirty.add(key)
        self.stats.added_at.setdefault(key, time.monotonic())
        if key in self._processing:
            return  # done() puts it back
        self._queue.append(key)
        self._ready.set()

    def _collapse_into(self, whole: K) -> None:
        """Replaces the waiting keys that `whole` stands for by `whole` itself (see the class docstring)."""
        assert self._collapse is not None
        covered = {key for key in self._dirty if self._collapse(key) == whole}
        self._dirty -= covered
        self._queue = deque(key for key in self._queue if key not in covered)
        for key in covered:
            self.stats.added_at.pop(key, None)
        self.stats.collapsed += len(covered)

    async def get(self) -> K:
        while not self._queue:
            await self._wait_ready()
        return self._start(self._queue.popleft(), time.monotonic())

    async def _wait_ready(self) -> None:
        if self._ready.is_set():
            self._ready = anyio.Event()
        await self._ready.wait()

    def _start(self, key: K, now: float) -> K:
        self._processing.add(key)
        self._dirty.discard(key)
        self.stats.started_at[key] = now
        added = self.stats.added_at.pop(key, None)
        if added is not None:
            self._waited[key] = now - added  # told the observer at done(), after the key's write
        return key

    async def get_batch(self, limit: int) -> list[K]:
        """Waits for one key, then also takes those already waiting, up to `limit` (for batched writes).
        Empty when nudge() came while it waited (or since the last call that found nothing waiting)."""
        while not self._queue:
            if self._nudged:
                self._nudged = False
                return []
            await self._wait_ready()
        return self.take_waiting(limit)

    def nudge(self) -> None:
        """Makes a waiting get_batch return, empty if nothing is waiting: the writer's idle tick. Cheaper
        on every change than a timeout around each wait (a cancel scope and a timer per key)."""
        self._nudged = True
        self._ready.set()

    def take_waiting(self, limit: int) -> list[K]:
        """Hands out up to `limit` keys that are waiting now, without waiting for more."""
        now = time.monotonic()
        taken: list[K] = []
        while self._queue and len(taken) < limit:
            taken.append(self._start(self._queue.popleft(), now))
        return taken

    def done(self, key: K) -> None:
        self._processing.discard(key)
        started = self.stats.started_at.pop(key, None)
        waited = self._waited.pop(key, None)
        if self.observer is not None:
            if waited is not None:
                self.observer.queued(waited)
            if started is not None:
                self.observer.worked(time.monotonic() - started)
        if key in self._dirty:
            self._queue.append(key)
            self._ready.set()
        self._check_idle()

    def add_rate_limited(self, key: K) -> float:
        """Requeues a failed key after its backoff; returns the delay."""
        self.note_failure(key)
        return self.add_after_failure(key)

    def note_failure(self, key: K) -> None:
        """The key's attempt failed: it counts as failing (see `failing`) until forget()."""
        self._failures[key] = self._failures.get(key, 0) + 1

    def add_after_failure(self, key: K) -> float:
        """Requeues a key whose failure was noted, after the backoff its failures so far call for."""
        self.stats.retries += 1
        delay = self.backoff.delay(self._failures.get(key, 1))
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """The key succeeded: its next failure starts the backoff from the beginning."""
        self._failures.pop(key, None)

    def add_after(self, key: K, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        due = time.monotonic() + delay
        if key in self._due and self._due[key] <= due:
            return  # already waiting, and due sooner
        self._due[key] = due
        heapq.heappush(self._delayed, (due, next(self._tiebreak), key))
        self._timer_changed.set()

    def _idle(self) -> bool:
        return not self._queue and not self._processing and not self._due and not self._dirty

    def _check_idle(self) -> None:
        if self._idle_waiters is not None and self._idle():
            self._idle_waiters.set()
            self._idle_waiters = None

    async def wait_idle(self) -> None:
        """Returns when nothing is queued, in flight or waiting for a delay (used by tests and refills)."""
        while not self._idle():
            if self._idle_waiters is None:  # made here, not at every add: adds are the hot path
                self._idle_waiters = anyio.Event()
            await self._idle_waiters.wait()

    async def run_timer(self) -> None:
        """Moves delayed keys into the queue when they are due; runs for the queue's lifetime."""
        while True:
            now = time.monotonic()
            while self._delayed and self._delayed[0][0] <= now:
                due, _, key = heapq.heappop(self._delayed)
                if self._due.get(key) == due:
                    del self._due[key]
                    self.add(key)
            self._check_idle()
            if self._timer_changed.is_set():
                self._timer_changed = anyio.Event()
            timeout = self._delayed[0][0] - now if self._delayed else None
            with anyio.move_on_after(timeout):
                await self._timer_changed.wait()
