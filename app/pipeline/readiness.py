"""Whether OPA holds what kopa should have put there, and the marker that tells OPA itself.

kopa is ready once every source has completed its first full load into OPA, and is not ready while OPA is
unreachable or being refilled after a restart. When it becomes ready (again), it writes a marker document
at data.system.kopa, so that OPA's own readiness check (a system.health policy) can wait for it too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from app.opa.client import OpaClient, OpaError, OpaUnavailable

log = logging.getLogger(__name__)

MARKER_PATH = ["system", "kopa"]


@dataclass
class SourceState:
    """One source as readiness sees it: listed yet? missing from the API server?"""

    name: str
    synced: Callable[[], bool]
    missing: bool = False  # e.g. a CRD not installed: counts as an empty, loaded collection

    def describe(self) -> dict[str, Any]:
        if self.missing:
            return {"ready": True, "reason": "not served by the API server yet (CRD missing?); empty"}
        if self.synced():
            return {"ready": True}
        return {
            "ready": False,
            "reason": "first list from the API server, or its load into OPA, not complete",
        }


@dataclass
class Readiness:
    opa: OpaClient
    pending: Callable[[], int]  # keys not yet written to OPA
    opa_available: Callable[[], bool]
    sources: list[SourceState] = field(default_factory=list)
    loaded: bool = False  # everything was loaded since start or since the last OPA restart
    refilling: bool = False
    loaded_at: float | None = None
    # asked right before the marker is written; False when OPA turned out to have restarted.
    same_opa: Callable[[], Awaitable[bool]] | None = None

    def on_opa_restart(self) -> None:
        self.loaded = False
        self.refilling = True

    @property
    def ready(self) -> bool:
        return self.loaded and self.opa_available()

    async def after_batch(self) -> None:
        """Called by the writer after each batch: is everything in OPA now?"""
        if self.loaded or self.pending() or not all(s.missing or s.synced() for s in self.sources):
            return
        if self.same_opa is not None and not await self.same_opa():
            return  # a new OPA, which the refill the watchdog queued will load
        marker = {"ready": True, "loadedAt": datetime.now(UTC).isoformat(timespec="seconds")}
        try:
            await self.opa.put_data(MARKER_PATH, orjson.dumps(marker))
        except (OpaUnavailable, OpaError) as exc:
            log.warning("could not write the readiness marker to OPA: %s", exc)
            return
        log.info(
            "%s complete: OPA holds every configured source", "refill" if self.refilling else "initial load"
        )
        self.loaded = True
        self.refilling = False
        self.loaded_at = time.time()

    def report(self) -> dict[str, Any]:
        """The body of /readyz: overall, and per source what is ready and what is not, and why."""
        reasons = []
        if not self.opa_available():
            reasons.append("OPA is unreachable")
        if self.refilling:
            reasons.append("OPA restarted; loading everything again")
        elif not self.loaded:
            reasons.append("first load into OPA not complete")
        return {
            "ready": self.ready,
            "reasons": reasons,
            "pending": self.pending(),
            "sources": {s.name: s.describe() for s in self.sources},
        }
