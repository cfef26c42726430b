"""Notices a new OPA process, however fast it restarted: OPA's /v1/config carries an id per process start.

Nothing pushed over OPA's REST API survives a restart, so a new id means OPA is empty and everything must
be loaded again (kube-mgmt's most reported defect is that it never does).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio

from app.opa.client import OpaClient, OpaError, OpaUnavailable
from app.pipeline.worker import OpaGate

log = logging.getLogger(__name__)


class OpaWatchdog:
    def __init__(
        self, opa: OpaClient, gate: OpaGate, interval: float, on_restart: Callable[[], Awaitable[None]]
    ) -> None:
        self.opa = opa
        self.gate = gate
        self.interval = interval
        self.on_restart = on_restart
        self.process_id: str | None = None
        self.restarts = 0

    async def check(self) -> None:
        try:
            config = await self.opa.config()
        except (OpaUnavailable, OpaError) as exc:  # OpaUnauthorized too: kopa cannot work with this OPA
            self.gate.mark_down(exc)
            return
        self.gate.mark_up()
        process_id = str((config.get("labels") or {}).get("id") or "")
        if not process_id:
            return
        if self.process_id is not None and process_id != self.process_id:
            self.restarts += 1
            log.warning(
                "OPA restarted (process id %s -> %s); loading everything again", self.process_id, process_id
            )
            await self.on_restart()
        self.process_id = process_id

    async def run(self) -> None:
        while True:
            await self.check()
            await anyio.sleep(self.interval)
