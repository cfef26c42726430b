"""Keeps a component running: a crash is logged and the component restarted with backoff.

A component that crashes must never silently stop the others, and must not spin either.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import anyio

from app.pipeline.workqueue import Backoff

log = logging.getLogger(__name__)

# A component that ran this long without crashing starts its backoff from the beginning again.
HEALTHY_RUN = 60.0


async def supervise(
    name: str,
    component: Callable[[], Awaitable[None]],
    backoff: Backoff | None = None,
    on_crash: Callable[[str, bool], None] | None = None,
) -> None:
    """Runs component until it returns; restarts it after each crash. Cancellation passes through.

    on_crash(name, healthy_run) lets liveness notice a component that keeps crashing.
    """
    backoff = backoff or Backoff(base=0.5, cap=30.0)
    crashes = 0
    while True:
        started = time.monotonic()
        try:
            await component()
            return
        except Exception as exc:
            healthy_run = time.monotonic() - started > HEALTHY_RUN
            if healthy_run:
                crashes = 0
            crashes += 1
            if on_crash is not None:
                on_crash(name, healthy_run)
            delay = backoff.delay(crashes)
            cause = _cause(exc)
            log.error(
                "%s crashed (%s: %s); restarting in %.1fs",
                name,
                type(cause).__name__,
                cause,
                delay,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            await anyio.sleep(delay)


def _cause(exc: BaseException) -> BaseException:
    """What a task group's crash was: its one exception rather than "unhandled errors in a TaskGroup (1
    sub-exception)", which names nothing."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
