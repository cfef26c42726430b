"""Makes OPA match one ConfigMap: its policies, or its data, or nothing, whichever its labels now say.

The handler is level-triggered: it reads the ConfigMap's latest state from the stores, never a replayed
event, so ten changes to one ConfigMap cost one sync and kopa's own annotation writes change nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.configmaps.data import DataBook, kopa_error
from app.configmaps.ledger import Ledger
from app.configmaps.policies import PolicyBook, package_of
from app.configmaps.status import StatusReporter
from app.model import ALL, CHECK, DataPath, Key, ObjectKey, Store, objects_only
from app.opa.client import OpaError
from app.opa.process import OpaProcess

log = logging.getLogger(__name__)


ACTION_POLICY = "LoadPolicy"
ACTION_DATA = "LoadData"


def _texts(configmap: dict[str, Any] | None) -> dict[str, str]:
    if configmap is None:
        return {}
    return {str(k): str(v) for k, v in (configmap.get("data") or {}).items()}


def _binary_errors(configmap: dict[str, Any]) -> list[dict[str, Any]]:
    """kube-mgmt reads only `data`; kopa says so instead of silently loading nothing."""
    return [
        kopa_error("invalid_parameter", f"key {key}: binaryData is not read; put the content under data")
        for key in sorted(configmap.get("binaryData") or {})
    ]


@dataclass(frozen=True)
class ConfigMapStores:
    """The two selections kopa watches; either is None when that kind of loading is disabled."""

    policies: Store[dict[str, Any]] | None
    data: Store[dict[str, Any]] | None

    def lookup(self, key: ObjectKey) -> dict[str, Any] | None:
        """The ConfigMap as kopa sees it; a data ConfigMap wins over a policy one, as in kube-mgmt."""
        found = self.data.get(key) if self.data else None
        if found is None and self.policies is not None:
            found = self.policies.get(key)
        return found


@dataclass
class ConfigMapSync:
    policies: PolicyBook
    data: DataBook
    reporter: StatusReporter
    stores: ConfigMapStores
    process: OpaProcess
    filled_epoch: int = 0  # the OPA process (OpaProcess.epoch) that the books describe
    # Push mode's record in OPA of the data ConfigMaps written (see app/configmaps/ledger.py); None in bundle
    # mode, or when data ConfigMaps are not loaded.
    ledger: Ledger | None = None
    listed: Callable[[], bool] = lambda: True  # whether every ConfigMap watch has completed its first list
    owns: Callable[[ObjectKey], bool] = lambda key: True  # in a namespace kopa watches
    # Ledger entries in namespaces kopa does not watch (now): kept in the ledger, never acted on.
    carried: dict[ObjectKey, frozenset[str]] = field(default_factory=dict)

    async def apply(self, keys: Sequence[Key]) -> list[tuple[Key, Exception]]:
        """The writer's entry point. A new OPA process (ALL is queued for it) is first loaded with
        everything again, in order, from the books. ALL stands for every ConfigMap of the source at its
        latest state (the queue folds keys into it), so it syncs every ConfigMap kopa knows, after the
        refill too: a change the books have not seen yet is only in the stores. CHECK compares OPA with the
        books, once they hold the batch, and repairs what differs."""
        objects = objects_only(keys)
        if self.ledger is not None and not self.ledger.read_done:
            inherited = await self.ledger.read()
            self.data.inherited = {cm: keys for cm, keys in inherited.items() if self.owns(cm)}
            self.carried = {cm: keys for cm, keys in inherited.items() if not self.owns(cm)}
        if self.filled_epoch != self.process.epoch:
            await self.refill()
        if ALL in keys:
            objects = sorted(set(objects) | self.known())
        await self._ledger_ahead(objects)
        failures: list[tuple[Key, Exception]] = []
        touched: set[ObjectKey] = set()
        for key in objects:
            try:
                touched |= await self.handle(key)
            except OpaError as exc:  # e.g. OPA refused to delete something; OpaUnavailable passes up
                log.warning("syncing configmap %s failed: %s", key, exc)
                failures.append((key, exc))
        if CHECK in keys:
            touched |= await self._drop_inherited()
            await self.check()
        if self.ledger is not None:
            await self.ledger.record(self._documented())
        # Statuses are written once the batch's modules are decided (bundle mode decides them together).
        self._report(touched | await self.policies.settle())
        return failures

    def _documented(self) -> dict[ObjectKey, frozenset[str]]:
        """The data ConfigMaps, and their keys, that may have documents in OPA: what the ledger names."""
        return {**self.carried, **self.data.documented()}

    async def _ledger_ahead(self, keys: Sequence[ObjectKey]) -> None:
        """Before documents are written: the ledger names each data ConfigMap among `keys`, and its keys."""
        store = self.stores.data
        if self.ledger is not None and store is not None:
            entries = self._documented()
            for cm in keys:
                configmap = store.get(cm)
                if configmap is not None:
                    entries[cm] = entries.get(cm, frozenset()) | frozenset(_texts(configmap))
            await self.ledger.include(entries)

    async def _drop_inherited(self) -> set[ObjectKey]:
        """Once every watch has listed: a ConfigMap the predecessor wrote that is no data ConfigMap now (gone,
        relabelled, or changed while no kopa ran) is synced, which removes its documents."""
        touched: set[ObjectKey] = set()
        if not self.listed():
            return touched
        for key in sorted(self.data.inherited):
            try:
                touched |= await self.handle(key)
            except OpaError as exc:  # kept in the ledger; tried again at the next check
                log.warning("removing data of configmap %s left by a previous kopa failed: %s", key, exc)
        return touched

    def footprint(self) -> list[DataPath] | None:
        """Where applying this source may write in OPA: the package of every module, in the book and in
        the policy ConfigMaps as they are now, and `<namespace>/<configmap>` of every data ConfigMap. None
        when a module's package cannot be read (it could be anywhere)."""
        texts = [module.text for module in self.policies.modules.values()]
        if self.stores.policies is not None:
            for _, configmap in self.stores.policies.items():
                texts.extend(_texts(configmap).values())
        packages = [package_of(text) for text in texts]
        if not all(packages):
            return None
        data_store = self.stores.data
        data = set(data_store.keys() if data_store else []) | set(self.data.loaded)
        return sorted({*packages, *((key.namespace, key.name) for key in data)})

    def known(self) -> set[ObjectKey]:
        """Every ConfigMap in the stores or in the books (so that one gone from both is cleaned up)."""
        found = {m.configmap for m in self.policies.modules.values()} | set(self.data.loaded)
        for store in (self.stores.data, self.stores.policies):
            if store is not None:
                found.update(store.keys())
        return found

    async def refill(self) -> None:
        """Loads everything into a new OPA process. The epoch counts as filled only once all of it went
        in: a refill cut short (OPA gone again, the token refused) starts again from the beginning."""
        epoch = self.process.epoch
        self.policies.reset(epoch)
        self.data.reset()
        touched = await self.policies.load_all()
        touched |= await self.policies.settle()
        data_store = self.stores.data
        if self.ledger is not None:
            self.ledger.forget()
        # also the ConfigMaps kopa wrote but that are gone from the store.
        keys = sorted(set(data_store.keys() if data_store else []) | set(self.data.loaded))
        await self._ledger_ahead(keys)
        for key in keys:
            touched.add(key)
            await self.data.set_configmap(key, _texts(data_store.get(key) if data_store else None))
        self.filled_epoch = epoch
        log.info(
            "loaded ConfigMaps into OPA again: %d policy modules (%d refused), %d data documents",
            self.policies.loaded_count,
            self.policies.failed_count,
            self.data.document_count(),
        )
        self._report(touched)

    async def check(self) -> int:
        """Anti-entropy: policies and data documents as OPA holds them, against the books. Skipped when
        OPA turns out to be a new process (its refill is queued): everything would look missing."""
        if not await self.process.check() or self.filled_epoch != self.process.epoch:
            return 0
        data_store = self.stores.data
        repairs, touched = await self.policies.check()
        repairs += await self.data.check(lambda key: _texts(data_store.get(key) if data_store else None))
        self._report(touched)
        return repairs

    async def handle(self, key: ObjectKey) -> set[ObjectKey]:
        """Makes OPA match one ConfigMap; returns the ConfigMaps whose status may have changed."""
        data_cm = self.stores.data.get(key) if self.stores.data else None
        policy_cm = self.stores.lookup(key) if data_cm is None else None
        # Unload first, so a ConfigMap relabelled from policy to data (or back) never holds both at once.
        touched: set[ObjectKey] = set()
        modules, documents = self.policies.changes, self.data.writes
        if data_cm is None:
            await self.data.set_configmap(key, {})
        if policy_cm is None:
            touched |= await self.policies.set_configmap(key, {})
        if data_cm is not None:
            await self.data.set_configmap(key, _texts(data_cm))
        if policy_cm is not None:
            touched |= await self.policies.set_configmap(key, _texts(policy_cm))
        if data_cm is None and policy_cm is None:
            self.reporter.forget(key)
        # A policy and a data ConfigMap that claim one path: the later is refused, and tried again when the
        # other side changes (its module or document removed), as modules retry when modules change.
        if self.data.writes != documents:
            touched |= await self.policies.retry_related([(key.namespace, key.name)])
        if self.policies.changes != modules and self.stores.data is not None:
            for other in sorted(self.data.refused - {key}):
                other_cm = self.stores.data.get(other)
                if other_cm is not None:
                    await self.data.set_configmap(other, _texts(other_cm))
                    touched.add(other)
        return touched | {key}

    def _report(self, configmaps: set[ObjectKey]) -> None:
        """Hands the latest status of each ConfigMap to the reporter (which writes only changes)."""
        for cm in sorted(configmaps):
            data_cm = self.stores.data.get(cm) if self.stores.data else None
            if data_cm is not None:
                errors = [e for _, e in sorted(self.data.errors_of(cm).items())]
                self.reporter.report(cm, errors + _binary_errors(data_cm), ACTION_DATA)
                continue
            policy_cm = self.stores.lookup(cm)
            if policy_cm is not None:
                errors = [m.error for m in self.policies.of(cm) if m.error is not None]
                self.reporter.report(cm, errors + _binary_errors(policy_cm), ACTION_POLICY)
