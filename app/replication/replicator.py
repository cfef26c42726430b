"""One replicated resource, put together: its store, its producer, and its collection in OPA.

A resource that the API server does not serve yet (a CRD not installed) counts as an empty, loaded
collection; discovery is asked again until it appears, and replication starts then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from app.kube.client import KubeApiError, KubeClient, KubeUnavailable
from app.kube.resources import GroupVersionResource
from app.model import ALL, Key, Store, WorkKey
from app.opa.process import OpaProcess
from app.operations.readiness import SourceState
from app.pipeline.watcher import Collection, Watcher
from app.replication.collection import CollectionApi, CollectionSync
from app.replication.discovery import DiscoveryError, ResourceInfo, lookup_checked, warn_missing
from app.replication.objects import Replica, converter, same_content

log = logging.getLogger(__name__)

DISCOVERY_INTERVAL = 5.0  # seconds between looks for a resource that is not served yet


@dataclass(frozen=True)
class ReplicationOptions:
    path: list[str]  # --replicate-path, split into segments
    ignore_namespaces: tuple[str, ...] = ()
    keep_managed_fields: bool = False
    selectors: dict[GroupVersionResource, str] = field(default_factory=dict)
    fields: dict[GroupVersionResource, tuple[str, ...]] = field(default_factory=dict)


class ReplicatedResource:
    def __init__(
        self,
        *,
        kube: KubeClient,
        opa: CollectionApi,
        process: OpaProcess,
        gvr: GroupVersionResource,
        namespaced: bool,
        info: ResourceInfo | None,
        options: ReplicationOptions,
        add: Callable[[WorkKey], None],
        required: bool = True,
        looked_up: bool = True,
    ) -> None:
        """`required=False` (a resource found by analysis): a 403 is reported and does not hold readiness;
        a resource named in the settings must load, so its 403 does. `looked_up=False`: the API server
        could not be asked at start-up, so `info` says nothing yet; run() looks the resource up first."""
        self.kube = kube
        self.gvr = gvr
        self.namespaced = namespaced
        self.info = info
        self.options = options
        self.source = f"replicate:{gvr}"
        self._add = add
        self.store: Store[Replica] = Store(self.source, same_content)
        self.sync = CollectionSync(
            opa, process, [*options.path, gvr.resource], self.store, namespaced, self._add_key
        )
        self.watcher: Watcher[Replica] | None = None
        self._looked_up = looked_up
        self._refused = ""  # why the last lookup refused the resource (logged once per reason)
        self.state = SourceState(
            self.source, self._synced, missing=looked_up and info is None, failing=self._failing
        )
        if not required:
            self.state.blocked = self.forbidden

    def _synced(self) -> bool:
        """Listed, and the collection is in OPA (a failing PUT keeps kopa not ready)."""
        return self.watcher is not None and self.watcher.synced.is_set() and self.sync.loaded

    def _failing(self) -> str | None:
        return self.watcher.stats.failing() if self.watcher is not None else None

    def forbidden(self) -> str | None:
        """Why the resource cannot be read, when the API server refuses kopa (RBAC), else None."""
        failure = self.watcher.stats.failure if self.watcher is not None else None
        if isinstance(failure, KubeApiError) and failure.status == 403 and not self._synced():
            return f"not readable: {failure.message or failure}"
        return None

    def _collection(self) -> Collection:
        field_selector = ""
        if self.namespaced and self.options.ignore_namespaces:
            field_selector = ",".join(f"metadata.namespace!={ns}" for ns in self.options.ignore_namespaces)
        return Collection(
            self.gvr.collection_path(),
            None,
            label_selector=self.options.selectors.get(self.gvr, ""),
            field_selector=field_selector,
        )

    def _add_key(self, key: Key) -> None:
        self._add(WorkKey(self.source, key))

    async def _lookup(self) -> tuple[bool, ResourceInfo | None]:
        """(whether the API server answered, what it serves that can be replicated); a failure is retried
        by the caller. What start-up would have refused (the other scope: a CRD installed later) is logged
        once per reason and counts as not served: nothing of it is written."""
        try:
            return True, await lookup_checked(self.kube, self.gvr, self.namespaced)
        except (KubeUnavailable, KubeApiError) as exc:
            log.debug("discovery of %s failed: %s", self.gvr, exc)
            return False, None
        except DiscoveryError as exc:
            if str(exc) != self._refused:
                self._refused = str(exc)
                log.error("%s; %s is not replicated until that is fixed", exc, self.gvr)
            return True, None

    def _load_whole(self) -> None:
        self._add_key(ALL)

    async def run(self) -> None:
        """Replicates for as long as kopa runs; waits for the resource first if it is not served yet (or
        not in a form it can be replicated in, see _lookup)."""
        while not self._looked_up:
            answered, info = await self._lookup()
            if not answered:
                await anyio.sleep(DISCOVERY_INTERVAL)
                continue
            self._looked_up, self.info = True, info
            self.state.missing = info is None
            if info is None and not self._refused:
                warn_missing(self.gvr)
        if self.info is None:
            self._load_whole()  # an empty collection, so policies see {} rather than undefined
            while self.info is None:
                await anyio.sleep(DISCOVERY_INTERVAL)
                _, self.info = await self._lookup()
            log.info("%s is now served by the API server; replicating it", self.gvr)
        if self.watcher is None:
            convert = converter(
                self.info.kind,
                self.gvr.api_version,
                keep_managed_fields=self.options.keep_managed_fields,
                fields=self.options.fields.get(self.gvr, ()),
            )
            self.watcher = Watcher(
                self.kube,
                self._collection(),
                self.store,
                self.source,
                self._add,
                convert=convert,
                emit_initial=False,
                on_synced=self._load_whole,
            )
            self.state.missing = False
        await self.watcher.run()
