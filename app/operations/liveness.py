"""Whether kopa is wedged, which only a restart can fix: the kubelet's liveness probe asks this.

Three signs, none of which depends on OPA or the API server being up (restarting kopa would not help):
- the event loop is blocked: its ticker has not run for LOOP_BLOCKED seconds (read from another thread);
- a component keeps crashing: CRASH_LOOP crashes in a row without a healthy run in between;
- a component stopped making progress: its heartbeat is older than its own bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import anyio

LOOP_BLOCKED = 5.0  # seconds without a tick of the event loop
TICK = 0.25
CRASH_LOOP = 5

# The progress callback of the component whose task is running, so that an adapter's hook (called inside
# that task, e.g. when an OPA request completes) can report progress without knowing the component.
_progress: ContextVar[Callable[[], None] | None] = ContextVar("kopa_progress", default=None)


@contextmanager
def progress_of(report: Callable[[], None]) -> Iterator[None]:
    """Within this block (and the calls it awaits), report_progress() calls `report`."""
    token = _progress.set(report)
    try:
        yield
    finally:
        _progress.reset(token)


def report_progress() -> None:
    """Progress of whichever component is running now, if it asked for it (progress_of)."""
    report = _progress.get()
    if report is not None:
        report()


def on_opa_request(endpoint: str, method: str, code: str, seconds: float) -> None:
    """The OPA client's hook: a request completed (or failed), which is progress for the component that
    made it, whatever OPA answered."""
    report_progress()


@dataclass
class Liveness:
    last_tick: float = field(default_factory=time.monotonic)
    crashes: dict[str, int] = field(default_factory=dict)  # consecutive crashes per component
    beats: dict[str, tuple[float, float]] = field(default_factory=dict)  # component -> (last beat, bound)

    async def run_ticker(self) -> None:
        while True:
            self.last_tick = time.monotonic()
            await anyio.sleep(TICK)

    def beat(self, component: str, bound: float) -> None:
        """The component made progress; without another beat within `bound` seconds it counts as stuck."""
        self.beats[component] = (time.monotonic(), bound)

    def crashed(self, component: str, healthy_run: bool) -> None:
        self.crashes[component] = 1 if healthy_run else self.crashes.get(component, 0) + 1

    def check(self) -> tuple[bool, dict[str, Any]]:
        """(alive, details). Safe to call from another thread: it only reads numbers."""
        now = time.monotonic()
        problems = []
        blocked = now - self.last_tick
        if blocked > LOOP_BLOCKED:
            problems.append(f"event loop blocked for {blocked:.1f}s")
        for component, count in list(self.crashes.items()):
            if count >= CRASH_LOOP:
                problems.append(f"{component} crashed {count} times in a row")
        for component, (last, bound) in list(self.beats.items()):
            if now - last > bound:
                problems.append(f"{component} made no progress for {now - last:.0f}s")
        return not problems, {"alive": not problems, "problems": problems}
