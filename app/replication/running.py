"""The replicated resources of the moment, each with its own task: those named in the settings, and those
the policy analysis finds, which come and go while kopa runs.

Starting a resource registers its handler with the writer and starts its producer; retiring one stops its
producer and queues REMOVE, which the writer applies after any write of the resource still queued (the
collection is then deleted from OPA, and later keys of it are no-ops). Its handler goes once that is done.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass

import anyio
from anyio.abc import TaskGroup

from app.kube.client import KubeClient
from app.kube.resources import GroupVersionResource
from app.model import REMOVE, WorkKey
from app.opa.process import OpaProcess
from app.operations.readiness import SourceState
from app.pipeline.watcher import WatchStats
from app.pipeline.worker import Footprint, Handler
from app.replication.collection import CollectionApi
from app.replication.discovery import ResourceInfo
from app.replication.replicator import ReplicatedResource, ReplicationOptions

log = logging.getLogger(__name__)

# Runs a component under supervision: (name, component) -> runs until cancelled.
Supervise = Callable[[str, Callable[[], Awaitable[None]]], Awaitable[None]]


@dataclass
class _Running:
    resource: ReplicatedResource
    scope: anyio.CancelScope
    retired: bool = False


class Replicators:
    def __init__(
        self,
        *,
        kube: KubeClient,
        opa: CollectionApi,
        process: OpaProcess,
        options: ReplicationOptions,
        add: Callable[[WorkKey], None],
        handlers: MutableMapping[str, Handler],
        footprints: MutableMapping[str, Footprint],
        supervise: Supervise,
    ) -> None:
        """`handlers` and `footprints` are the writer's: each resource adds its own while it exists (a
        collection writes under its own path in OPA and nowhere else)."""
        self._kube = kube
        self._opa = opa
        self._process = process
        self._options = options
        self._add = add
        self._handlers = handlers
        self._footprints = footprints
        self._supervise = supervise
        self._running: dict[GroupVersionResource, _Running] = {}
        self._tg: TaskGroup | None = None

    async def run(self) -> None:
        """Owns the resources' tasks: those started before run() start now; cancel run() to stop all."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for gvr, running in self._running.items():
                tg.start_soon(self._run_one, gvr, running)
            await anyio.sleep_forever()

    def start(
        self,
        gvr: GroupVersionResource,
        namespaced: bool,
        info: ResourceInfo | None,
        *,
        required: bool = True,
        looked_up: bool = True,
    ) -> ReplicatedResource:
        resource = ReplicatedResource(
            kube=self._kube,
            opa=self._opa,
            process=self._process,
            gvr=gvr,
            namespaced=namespaced,
            info=info,
            options=self._options,
            add=self._add,
            required=required,
            looked_up=looked_up,
        )
        running = _Running(resource, anyio.CancelScope())
        self._running[gvr] = running
        self._handlers[resource.source] = resource.sync
        path = tuple(resource.sync.path)
        self._footprints[resource.source] = lambda: [path]
        if self._tg is not None:
            self._tg.start_soon(self._run_one, gvr, running)
        return resource

    def retire(self, gvr: GroupVersionResource) -> None:
        """Stops the resource's producer and takes its collection out of OPA (through the writer)."""
        running = self._running[gvr]
        running.retired = True
        running.scope.cancel()
        self._add(WorkKey(running.resource.source, REMOVE))

    def prune(self) -> None:
        """Forgets the retired resources whose collection OPA no longer holds."""
        for gvr, running in list(self._running.items()):
            if running.retired and running.resource.sync.removed:
                del self._running[gvr]
                if self._handlers.get(running.resource.source) is running.resource.sync:
                    del self._handlers[running.resource.source]
                    del self._footprints[running.resource.source]

    def get(self, gvr: GroupVersionResource) -> ReplicatedResource | None:
        """The resource while it is replicated (not retired)."""
        running = self._running.get(gvr)
        return running.resource if running is not None and not running.retired else None

    def retiring(self, gvr: GroupVersionResource) -> bool:
        running = self._running.get(gvr)
        return running is not None and running.retired

    @property
    def resources(self) -> list[ReplicatedResource]:
        return [r.resource for r in self._running.values() if not r.retired]

    def states(self) -> list[SourceState]:
        return [resource.state for resource in self.resources]

    def watch_stats(self) -> list[tuple[str, WatchStats]]:
        return [(r.source, r.watcher.stats) for r in self.resources if r.watcher is not None]

    def sizes(self) -> list[tuple[str, int]]:
        return [(str(r.gvr), len(r.store)) for r in self.resources]

    def repairs(self) -> int:
        return sum(r.sync.repairs for r in self.resources)

    async def _run_one(self, gvr: GroupVersionResource, running: _Running) -> None:
        """The resource's producer and its drift checks' reads (idle until the writer starts one), each
        supervised on its own, both stopped by the resource's scope."""
        resource = running.resource

        async def checks() -> None:
            await self._supervise(f"drift check of {gvr}", resource.sync.run_checks)

        with running.scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(checks)
                await self._supervise(f"replication of {gvr}", resource.run)
