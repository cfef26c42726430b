"""The OPA writer: takes keys from the workqueue and makes OPA match each key's current state.

One writer per OPA (OPA serialises writes; more writers buy nothing). When a write fails because OPA is
unreachable, the outage is noticed once and waited out, and the key is retried when OPA is back; when OPA is
up but the key still fails, only that key is requeued with its own backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import TypeVar

import anyio

from app.opa.client import OpaUnavailable
from app.pipeline.workqueue import Backoff, WorkQueue

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)


class OpaGate:
    """Tells a broken OPA from a failing key, and waits out an outage with capped backoff."""

    def __init__(self, probe: Callable[[], Awaitable[bool]], backoff: Backoff | None = None) -> None:
        self._probe = probe
        self._backoff = backoff or Backoff(base=0.2, cap=5.0)
        self.available = True

    async def wait_if_down(self, cause: Exception) -> bool:
        """True if OPA was down (and is now back); False if OPA is up, so the failure was the key's."""
        if await self._probe():
            return False
        self.available = False
        log.warning("OPA is unreachable (%s); waiting for it to come back", cause)
        attempt = 0
        while not await self._probe():
            attempt += 1
            await anyio.sleep(self._backoff.delay(attempt))
        self.available = True
        log.info("OPA is reachable again")
        return True


async def run_worker(queue: WorkQueue[K], handle: Callable[[K], Awaitable[None]], gate: OpaGate) -> None:
    """Processes keys forever. Exceptions other than OPA's unavailability are the key's own failure."""
    while True:
        key = await queue.get()
        try:
            await handle(key)
        except OpaUnavailable as exc:
            if await gate.wait_if_down(exc):
                queue.add(key)
            else:
                delay = queue.add_rate_limited(key)
                log.warning("writing %s to OPA failed (%s); retrying in %.1fs", key, exc, delay)
        except Exception as exc:
            delay = queue.add_rate_limited(key)
            log.error(
                "processing %s failed (%s: %s); retrying in %.1fs",
                key,
                type(exc).__name__,
                exc,
                delay,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
        else:
            queue.forget(key)
        finally:
            queue.done(key)
