"""The ConfigMaps source, put together: which ConfigMaps kopa watches, their stores, their producers, the
books that keep them in OPA, and the status writer that reports back on them.

Each namespace is watched on its own (two label selectors: policies and data), so namespaced RBAC suffices;
`*` means one cluster-wide watch per selector.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from app.configmaps.data import DataApi, DataBook
from app.configmaps.ledger import Ledger
from app.configmaps.policies import PolicyApi, PolicyBook, Settler
from app.configmaps.status import Leadership, StatusReporter
from app.configmaps.sync import ConfigMapStores, ConfigMapSync
from app.kube.client import KubeClient
from app.model import CHECK, ObjectKey, Store, WorkKey
from app.opa.process import OpaProcess
from app.operations.readiness import SourceState
from app.pipeline.watcher import Collection, Watcher, WatchStats, same_resource_version
from app.pipeline.workqueue import QueueObserver

SOURCE = "configmaps"


class ConfigMapApi(PolicyApi, DataApi, Protocol):
    """What the books write to: OPA's REST client in push mode, the bundle in bundle mode."""


@dataclass(frozen=True)
class Selection:
    """Which ConfigMaps: label selectors ("" when that kind is disabled) and namespaces (["*"]: all)."""

    policies: str  # e.g. "openpolicyagent.org/policy=rego"
    data: str  # e.g. "openpolicyagent.org/data=opa"
    namespaces: Sequence[str]

    def collections(self) -> list[tuple[str, Collection]]:
        """(kind, collection) pairs, kind being "data" or "policies"."""
        pairs = []
        for kind, selector in (("data", self.data), ("policies", self.policies)):
            if not selector:
                continue
            if list(self.namespaces) == ["*"]:
                pairs.append((kind, Collection("/api/v1/configmaps", None, label_selector=selector)))
            else:
                for ns in self.namespaces:
                    path = f"/api/v1/namespaces/{ns}/configmaps"
                    pairs.append((kind, Collection(path, ns, label_selector=selector)))
        return pairs

    def watches(self, namespace: str) -> bool:
        return list(self.namespaces) == ["*"] or namespace in self.namespaces

    def owns_policy(self, policy_id: str) -> bool:
        """Policy ids of kopa's own form, `<namespace>/<configmap>/<key>` in a namespace it watches: the
        only ids the drift check removes when no ConfigMap has them (never a bootstrap policy's)."""
        parts = policy_id.split("/")
        return len(parts) == 3 and all(parts) and self.watches(parts[0])

    def owns_data(self, configmap: ObjectKey) -> bool:
        """A data ConfigMap a previous kopa wrote (its ledger) is this one's to clean up when its namespace
        is watched now."""
        return self.watches(configmap.namespace)


class ConfigMapSource:
    def __init__(
        self,
        *,
        kube: KubeClient,
        opa: ConfigMapApi,
        process: OpaProcess,
        selection: Selection,
        add: Callable[[WorkKey], None],
        status_observer: QueueObserver | None = None,
        leader: Leadership | None = None,
        settler: Settler | None = None,
    ) -> None:
        self.name = SOURCE
        self.stores: dict[str, Store[dict[str, Any]]] = {
            "data": Store("data", same_resource_version),
            "policies": Store("policies", same_resource_version),
        }
        self.collections = selection.collections()
        unsynced = set(range(len(self.collections)))

        def synced(index: int) -> None:
            """Once every watch has listed (its keys queued before this one), push mode compares OPA with
            the books: an OPA that outlived a previous kopa may hold modules of ConfigMaps deleted meanwhile
            (and modules that need them), which go before kopa says it is ready."""
            unsynced.discard(index)
            if not unsynced and settler is None:
                add(WorkKey(SOURCE, CHECK))

        self.watchers = [
            Watcher(kube, c, self.stores[kind], SOURCE, add, convert=dict, on_synced=partial(synced, i))
            for i, (kind, c) in enumerate(self.collections)
        ]
        selected = ConfigMapStores(
            policies=self.stores["policies"] if selection.policies else None,
            data=self.stores["data"] if selection.data else None,
        )
        self.reporter = StatusReporter(kube, selected.lookup, observer=status_observer, leader=leader)
        policies = PolicyBook(opa, process, owns=selection.owns_policy, settler=settler)
        self.sync = ConfigMapSync(
            policies,
            DataBook(opa),
            self.reporter,
            selected,
            process,
            ledger=Ledger(opa) if settler is None and selection.data else None,
            listed=lambda: not unsynced,
            owns=selection.owns_data,
        )

    @property
    def states(self) -> list[SourceState]:
        """What readiness asks: has each watch completed its first list?"""
        return [
            SourceState(w.collection.describe(), w.synced.is_set, failing=w.stats.failing)
            for w in self.watchers
        ]

    def watch_stats(self) -> list[tuple[str, WatchStats]]:
        return [
            (f"{kind}:{c.namespace or '*'}", w.stats)
            for (kind, c), w in zip(self.collections, self.watchers, strict=True)
        ]
