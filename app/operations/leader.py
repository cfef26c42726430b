"""Which kopa replica writes statuses and Events: the holder of a Lease, elected as client-go elects.

Several kopa replicas serving the same bundle see the same ConfigMaps and reach the same statuses; if all
of them wrote, every Event would be recorded once per replica. So they elect one writer with a
coordination.k8s.io/v1 Lease, with the semantics of client-go's leaderelection package (the model, not the
code):

- Every retry period a candidate reads the Lease. It takes it when nobody holds it (never created, or
  released) or when the record has not changed for the record's lease duration, measured on the
  candidate's own clock from when it saw the record change (so clocks need not agree across nodes).
- The leader renews every retry period. A write carries the resourceVersion it read, so of two replicas
  racing for an expired Lease only one wins (the other gets 409 and reads again).
- A leader that has not renewed within the renew deadline (shorter than the lease duration) stops leading
  at once: `leading` is computed from the time of its last successful renewal, so even a renewal stuck in a
  slow request cannot make it write past the deadline; the others may take over only after the longer lease
  duration. A leader that dies is replaced within the lease duration plus one retry period.
- On a clean stop the leader releases the Lease (no holder, a one-second duration), so another replica
  takes over at its next retry instead of waiting out the lease duration.
"""

from __future__ import annotations

import logging
import math
import os
import random
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from app.kube.client import KubeApiError, KubeUnavailable
from app.kube.leases import Lease, LeaseConflict, LeaseRecord, micro_time

log = logging.getLogger(__name__)

# A release is a courtesy bounded well within the shutdown timeout: without it the Lease simply expires.
RELEASE_TIMEOUT = 2.0


@dataclass(frozen=True)
class Timing:
    """client-go's three durations, in seconds (defaults there: 15, 10, 2)."""

    lease_duration: float
    renew_deadline: float
    retry_period: float


class LeaseStore(Protocol):
    """The Lease, as app.kube.leases.Leases reads and writes it."""

    async def get(self) -> Lease | None: ...

    async def create(self, record: LeaseRecord) -> Lease: ...

    async def update(self, record: LeaseRecord, resource_version: str) -> Lease: ...

    def describe(self) -> str: ...


def default_identity() -> str:
    """The pod's name in a cluster (the chart sets POD_NAME); elsewhere the host name plus a random
    suffix, so that two kopa processes on one host never take each other for the holder."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}_{secrets.token_hex(4)}"


class LeaderElector:
    """Runs the election (`run`); the status writer asks `leading` before each write."""

    def __init__(
        self,
        leases: LeaseStore,
        identity: str,
        timing: Timing,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.leases = leases
        self.identity = identity
        self.timing = timing
        self._clock = clock
        self._observed: Lease | None = None  # the last record read or written
        self._observed_at = 0.0  # local time at which that record last changed
        self._renewed_at: float | None = None  # local time before the last acquire/renew that succeeded
        self._listeners: list[Callable[[], None]] = []
        self._problem: str | None = None  # why the last attempt failed, when the API server refused it

    @property
    def leading(self) -> bool:
        """True while the last successful renewal is younger than the renew deadline."""
        renewed = self._renewed_at
        return renewed is not None and self._clock() - renewed < self.timing.renew_deadline

    @property
    def holder(self) -> str:
        """The holder in the last record seen ("" when none, or not read yet)."""
        return self._observed.record.holder if self._observed is not None else ""

    def on_started_leading(self, listener: Callable[[], None]) -> None:
        """listener() runs each time this replica becomes leader (the status writer re-syncs)."""
        self._listeners.append(listener)

    def report(self) -> dict[str, Any]:
        """The `leaderElection` part of /readyz's body."""
        report: dict[str, Any] = {
            "lease": self.leases.describe(),
            "identity": self.identity,
            "leading": self.leading,
            "holder": self.holder or None,
        }
        if self._problem:
            report["problem"] = self._problem
        return report

    async def run(self) -> None:
        """Acquire, renew until the renew deadline passes without a renewal, and again; releases on exit."""
        try:
            while True:
                await self._acquire()
                await self._renew()
        finally:
            await self._release()

    async def _acquire(self) -> None:
        """Tries every retry period (slightly jittered, never later) until this replica holds the Lease."""
        while True:
            if await self._attempt_within(self.timing.renew_deadline):
                break
            await anyio.sleep(self.timing.retry_period * random.uniform(0.8, 1.0))
        log.info(
            "leading: %s is held by %s; this replica writes statuses and Events", self._what(), self.identity
        )
        for listener in self._listeners:
            listener()

    async def _renew(self) -> None:
        """Renews every retry period; returns when no renewal succeeded within the renew deadline."""
        while True:
            await anyio.sleep(self.timing.retry_period)
            renewed = self._renewed_at if self._renewed_at is not None else self._clock()
            deadline = renewed + self.timing.renew_deadline
            while not await self._attempt_within(deadline - self._clock()):
                if self._clock() >= deadline:
                    self._renewed_at = None
                    log.warning(
                        "stopped leading: could not renew %s within %gs; statuses are left to the next one",
                        self._what(),
                        self.timing.renew_deadline,
                    )
                    return
                await anyio.sleep(min(self.timing.retry_period, max(0.0, deadline - self._clock())))

    async def _attempt_within(self, seconds: float) -> bool:
        """One acquire-or-renew, abandoned (a failure) when it takes longer than `seconds`."""
        with anyio.move_on_after(max(0.0, seconds)):
            return await self._attempt()
        self._note_problem(f"no answer from the API server within {seconds:.1f}s")
        return False

    async def _attempt(self) -> bool:
        """client-go's tryAcquireOrRenew: True when this replica holds the Lease, renewed just now."""
        now = self._clock()
        stamp = micro_time()
        duration = max(1, math.ceil(self.timing.lease_duration))
        try:
            lease = await self.leases.get()
            if lease is None:
                created = await self.leases.create(LeaseRecord(self.identity, duration, stamp, stamp, 0))
                return self._won(created, now)
            self._observe(lease, now)
            old = lease.record
            mine = old.holder == self.identity
            if old.holder and not mine and now < self._observed_at + (old.duration or duration):
                self._problem = None
                return False  # held, and renewed recently enough
            record = LeaseRecord(
                holder=self.identity,
                duration=duration,
                acquire_time=old.acquire_time if mine else stamp,
                renew_time=stamp,
                transitions=old.transitions if mine else old.transitions + 1,
            )
            return self._won(await self.leases.update(record, lease.resource_version), now)
        except LeaseConflict:
            return False  # another replica wrote first: read again at the next try
        except (KubeUnavailable, KubeApiError) as exc:
            self._note_problem(str(exc))
            return False

    def _won(self, lease: Lease, now: float) -> bool:
        self._observe(lease, now)
        self._renewed_at = now  # before the request was sent: the leader's view errs on the safe side
        if self._problem:
            log.info("%s: the API server answers again", self._what())
        self._problem = None
        return True

    def _observe(self, lease: Lease, now: float) -> None:
        """Remembers the record, and when it last changed (on this replica's clock)."""
        if self._observed is None or lease.record != self._observed.record:
            self._observed_at = now
        self._observed = lease

    def _note_problem(self, problem: str) -> None:
        """Logged when it is new (a missing RBAC grant would otherwise log every retry period)."""
        if problem != self._problem:
            log.warning("leader election: %s: %s", self._what(), problem)
        self._problem = problem

    async def _release(self) -> None:
        """On a clean stop: stop writing, then hand the Lease back (if this replica still holds it)."""
        observed = self._observed
        was_leading = self._renewed_at is not None
        self._renewed_at = None
        if not was_leading or observed is None or observed.record.holder != self.identity:
            return
        stamp = micro_time()
        released = LeaseRecord("", 1, stamp, stamp, observed.record.transitions)
        with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_TIMEOUT):
            try:
                await self.leases.update(released, observed.resource_version)
            except (LeaseConflict, KubeUnavailable, KubeApiError) as exc:
                log.warning("could not release %s (%s); it expires by itself", self._what(), exc)
                return
            log.info("released %s", self._what())

    def _what(self) -> str:
        return self.leases.describe()
