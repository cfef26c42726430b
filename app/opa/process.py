"""Which OPA process kopa is talking to, and whether it can be written to: the one owner of those facts.

Nothing pushed over OPA's REST API survives a restart, so OPA's /v1/config, which carries an id per process
start (`labels.id`), is read every check interval, and at once when OPA closes an idle connection kopa keeps
open to it (`watch`: a process that exits closes its connections, so a restart is noticed when it happens,
not up to an interval later). A new id starts a new *epoch*: everything kopa wrote is
gone, so whatever was loaded "in this OPA" is loaded again. The books, the collections and readiness remember
the epoch they last filled and compare it with `epoch`; the restart listeners queue the refill once. A restart
is noticed, counted and announced once, whoever checks first (checks are serialised).

The same check tells the three states a write can meet apart: OPA up and accepting kopa's credentials; OPA
unreachable (down, restarting, 5xx); OPA up but refusing kopa's credentials (401/403). The last two are both
waited out by the writer and reported by readiness; each change of state is logged once, not per write.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from app.opa.client import OpaError, OpaUnauthorized, OpaUnavailable

log = logging.getLogger(__name__)

Listener = Callable[[], Awaitable[None]]

# While OPA does not answer, it is asked again after DOWN_POLL_FIRST, doubling up to DOWN_POLL (or the
# check interval, if shorter): a restarted OPA answers within milliseconds to a second, and a connection
# refused costs next to nothing.
DOWN_POLL_FIRST = 0.02
DOWN_POLL = 0.25


class OpaRestarted(OpaUnavailable):
    """A write met a new OPA process that kopa has not refilled yet: redo it after the refill."""


class _NotYet(Exception):
    """Internal: OPA is still unusable; probe again."""


class ConfigSource(Protocol):
    """What this needs of OPA: its configuration, read with kopa's credentials."""

    async def config(self) -> dict[str, Any]: ...


class OpaProcess:
    """The OPA process of the moment: its id, its epoch, and whether kopa can write to it."""

    def __init__(
        self,
        opa: ConfigSource,
        interval: float,
        wait_cap: float = 5.0,
        watch: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`watch` returns (or raises) when a connection it opened to OPA closes: OpaClient.until_closed."""
        self._opa = opa
        self.interval = interval
        self._watch = watch
        self._wait_cap = wait_cap
        self.process_id: str | None = None
        self.epoch = 0  # +1 at every restart noticed
        self.restarts = 0
        self.available = True  # OPA answers
        self.refused: str = ""  # why OPA refuses kopa's credentials ("" while it accepts them)
        self.refusals = 0  # times OPA started refusing them (counted per episode, logged once each)
        self._listeners: list[Listener] = []
        self._lock = anyio.Lock()

    def on_restart(self, listener: Listener) -> None:
        """`listener` runs once per restart noticed, after the epoch has moved on."""
        self._listeners.append(listener)

    @property
    def usable(self) -> bool:
        """OPA answers and accepts kopa's credentials (as of the last check)."""
        return self.available and not self.refused

    def problem(self) -> str:
        """Why OPA cannot be written to now, for /readyz; "" when it can."""
        if not self.available:
            return "OPA is unreachable"
        if self.refused:
            return f"OPA refuses kopa's credentials ({self.refused})"
        return ""

    async def check(self) -> bool:
        """Asks OPA who it is; True when it is usable.

        A new process id moves the epoch on and runs the restart listeners, before the check returns.
        """
        async with self._lock:
            try:
                config = await self._opa.config()
            except OpaUnauthorized as exc:
                self.mark_refused(exc)
                return False
            except (OpaUnavailable, OpaError) as exc:
                self.mark_down(exc)
                return False
            self.mark_up()
            restarted = self._see(str((config.get("labels") or {}).get("id") or ""))
            if restarted:
                for listener in self._listeners:
                    await listener()
            return True

    def _see(self, process_id: str) -> bool:
        if not process_id:
            return False
        previous, self.process_id = self.process_id, process_id
        if previous is None or previous == process_id:
            return False
        self.epoch += 1
        self.restarts += 1
        log.warning("OPA restarted (process id %s -> %s); loading everything again", previous, process_id)
        return True

    def mark_down(self, cause: object) -> None:
        if self.available:
            self.available = False
            log.warning("OPA is unreachable (%s); waiting for it to come back", cause)

    def mark_refused(self, cause: OpaUnauthorized) -> None:
        self.available = True
        if not self.refused:
            self.refusals += 1
            log.warning(
                "OPA refuses kopa's credentials (%s); waiting until it accepts them "
                "(check --opa-auth-token or --opa-auth-token-file, and that OPA's system.authz lets that "
                "token use /v1/config, /v1/policies, /v1/data and /v1/query: kopa reads /v1/config to "
                "notice OPA restarts)",
                cause.status_text,
            )
        self.refused = cause.status_text

    def mark_up(self) -> None:
        if not self.available:
            log.info("OPA is reachable again")
        if self.refused:
            log.info("OPA accepts kopa's credentials again")
        self.available = True
        self.refused = ""

    async def wait_usable(self) -> None:
        """Returns once OPA answers and accepts kopa's credentials; probes with a capped backoff."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(_NotYet),
            wait=wait_exponential_jitter(multiplier=0.2, max=self._wait_cap, jitter=0.2),
        ):
            with attempt:
                if not await self.check():
                    raise _NotYet

    async def outage_or_fault(self, cause: Exception) -> bool:
        """After a write failed with `cause`: True if OPA was unusable (now waited out), False if OPA is
        fine and the failure belongs to what was written."""
        if isinstance(cause, OpaUnauthorized):
            self.mark_refused(cause)
        elif await self.check():
            return False
        await self.wait_usable()
        return True

    async def run(self) -> None:
        """The check, for kopa's lifetime: every `interval`; at once when the watched connection closes;
        and, while OPA does not answer, every DOWN_POLL at most, so that the new process of a restart is
        noticed as soon as it answers.

        After OPA went away or restarted, the watched connection is opened again at once; after it closed
        while OPA stayed the same process (a proxy that drops idle connections), only once an interval has
        passed since it was opened: such a close costs a check, never a busy loop."""
        closed: anyio.Event | None = None
        reopen_at = 0.0
        watched_epoch = self.epoch
        down_delay = DOWN_POLL_FIRST
        async with anyio.create_task_group() as tg:
            while True:
                await self.check()
                if not self.available:
                    reopen_at = 0.0
                    await anyio.sleep(min(down_delay, self.interval))
                    down_delay = min(down_delay * 2, DOWN_POLL)
                    continue
                down_delay = DOWN_POLL_FIRST
                now = anyio.current_time()
                if self.epoch != watched_epoch:
                    reopen_at = 0.0
                if self._watch is not None and (closed is None or closed.is_set()) and now >= reopen_at:
                    closed, reopen_at, watched_epoch = anyio.Event(), now + self.interval, self.epoch
                    tg.start_soon(self._watched, self._watch, closed)
                with anyio.move_on_after(self.interval):
                    if closed is not None and not closed.is_set():
                        await closed.wait()
                    else:
                        await anyio.sleep(self.interval)

    @staticmethod
    async def _watched(watch: Callable[[], Awaitable[None]], closed: anyio.Event) -> None:
        try:
            await watch()
        except OpaUnavailable:
            pass  # could not even connect: the check that follows says whether OPA is down
        finally:
            closed.set()
