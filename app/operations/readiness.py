"""Whether OPA holds what kopa should have put there, and the marker that tells OPA itself.

kopa is ready once every source has completed its first full load into OPA, and is not ready while OPA is
unreachable, refuses kopa's credentials, is being refilled after a restart, or while a change OPA did not
accept waits for its retry. When it becomes ready (again), it writes a marker document
at data.system.kopa, so that OPA's own readiness check (a system.health policy) can wait for it too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from app.opa.client import Chunks, OpaError, OpaUnauthorized, OpaUnavailable
from app.opa.process import OpaProcess

log = logging.getLogger(__name__)

MARKER_PATH = ["system", "kopa"]


class MarkerWriter(Protocol):
    async def put_data(self, path: Sequence[str], document: bytes | Chunks) -> None: ...

    async def delete_data(self, path: Sequence[str]) -> bool: ...


@dataclass
class SourceState:
    """One source as readiness sees it: listed yet? missing from the API server? blocked?"""

    name: str
    synced: Callable[[], bool]
    missing: bool = False  # e.g. a CRD not installed: counts as an empty, loaded collection
    # Why the source cannot load for a cause kopa cannot fix (a resource found by analysis that RBAC
    # does not grant): reported, but it does not hold readiness; None when there is none.
    blocked: Callable[[], str | None] = lambda: None
    # What keeps the first load from completing, when its producer keeps failing (the API server refuses
    # the list, or cannot be reached): said in the reason, and it still holds readiness; None otherwise.
    failing: Callable[[], str | None] = lambda: None

    @property
    def settled(self) -> bool:
        """Nothing more to wait for before kopa may say ready."""
        return self.missing or self.synced() or self.blocked() is not None

    def describe(self) -> dict[str, Any]:
        if self.missing:
            return {"ready": True, "reason": "not served by the API server yet (CRD missing?); empty"}
        if self.synced():
            return {"ready": True}
        blocked = self.blocked()
        if blocked is not None:
            return {"ready": False, "reason": blocked, "holdsReadiness": False}
        reason = "first list from the API server, or its load into OPA, not complete"
        failing = self.failing()
        return {"ready": False, "reason": f"{reason}: {failing}" if failing else reason}


@dataclass
class Readiness:
    """Ready means: every source that can be loaded has its current state in this OPA process, with no
    change waiting for a retry, and OPA answers and accepts kopa's credentials."""

    opa: MarkerWriter
    process: OpaProcess
    pending: Callable[[], int]  # changes not yet written to OPA, retries included
    retrying: Callable[[], int]  # changes OPA did not accept and that wait to be written again
    sources: Callable[[], Iterable[SourceState]] = list  # asked each time: sources come and go
    details: Callable[[], dict[str, Any]] = dict  # more of /readyz's body (the analysis, when on)
    loaded_epoch: int | None = None  # the OPA epoch (see OpaProcess) that holds everything, if any
    stale_marker_cleared: bool = False  # the marker of a previous kopa (see after_batch) is gone
    marker_refused: bool = False  # OPA refused the marker (its path is a bundle's): said once

    @property
    def loaded(self) -> bool:
        return self.loaded_epoch == self.process.epoch

    @property
    def ready(self) -> bool:
        return self.loaded and self.process.usable and not self.retrying()

    async def after_batch(self) -> None:
        """Called by the writer before its first batch and after each one: is everything in this OPA now?"""
        if not self.stale_marker_cleared and not self.loaded and self.process.usable:
            # A sidecar restarted beside a running OPA: its predecessor's marker would tell OPA's readiness
            # check "ready" while this kopa has loaded nothing (tried again at each call until it works).
            try:
                await self.opa.delete_data(MARKER_PATH)
                self.stale_marker_cleared = True
            except OpaUnavailable:
                pass
            except OpaError:  # not kopa's to remove (a bundle owns `system`): nothing to take back
                self.stale_marker_cleared = True
        if self.loaded or self.pending() or not all(s.settled for s in self.sources()):
            return
        epoch = self.process.epoch
        if not await self.process.check() or self.process.epoch != epoch:
            return  # unusable (the process says why), or a new OPA, whose refill is queued
        marker = {"ready": True, "loadedAt": datetime.now(UTC).isoformat(timespec="seconds")}
        try:
            await self.opa.put_data(MARKER_PATH, orjson.dumps(marker))
        except OpaUnauthorized as exc:
            self.process.mark_refused(exc)
            return
        except OpaUnavailable as exc:
            log.warning("could not write the readiness marker to OPA: %s", exc)
            return
        except OpaError as exc:
            # OPA will not take it (a bundle owns `system`): kopa is ready all the same; only OPA's own
            # readiness check cannot wait for the marker. Said once.
            if not self.marker_refused:
                self.marker_refused = True
                log.warning("OPA refused the readiness marker at data.system.kopa; ready without it: %s", exc)
        # OPA may have restarted between the check and the write (a retried PUT lands in the new process):
        # a marker in a process kopa has not refilled would say "ready" too early, so take it back.
        if not await self.process.check() or self.process.epoch != epoch:
            try:
                await self.opa.delete_data(MARKER_PATH)
            except (OpaUnavailable, OpaError) as exc:
                log.warning("could not take back a readiness marker written into a new OPA: %s", exc)
            return
        refill = self.loaded_epoch is not None
        self.loaded_epoch = epoch
        log.info("%s complete: OPA holds every configured source", "refill" if refill else "initial load")

    def report(self) -> dict[str, Any]:
        """The body of /readyz: overall, and per source what is ready and what is not, and why."""
        reasons = []
        problem = self.process.problem()
        if problem:
            reasons.append(problem)
        if self.loaded_epoch is not None and not self.loaded:
            reasons.append("OPA restarted; loading everything again")
        elif not self.loaded:
            reasons.append("first load into OPA not complete")
        retrying = self.retrying()
        if retrying:
            reasons.append(f"{retrying} changes were not accepted by OPA and wait to be written again")
        return {
            "ready": self.ready,
            "reasons": reasons,
            "pending": self.pending(),
            "sources": {s.name: s.describe() for s in self.sources()},
            **self.details(),
        }
