"""Makes OPA match one ConfigMap: its policies, or its data, or nothing, whichever its labels now say.

The handler is level-triggered: it reads the ConfigMap's latest state from the stores, never a replayed
event, so ten changes to one ConfigMap cost one sync and kopa's own annotation writes change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.configmaps.data import DataBook, kopa_error
from app.configmaps.policies import PolicyBook
from app.configmaps.status import StatusReporter
from app.pipeline.watcher import ObjectKey, Store

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

    policies: Store | None
    data: Store | None

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

    async def handle(self, key: ObjectKey) -> None:
        data_cm = self.stores.data.get(key) if self.stores.data else None
        policy_cm = self.stores.lookup(key) if data_cm is None else None
        # Unload first, so a ConfigMap relabelled from policy to data (or back) never holds both at once.
        touched: set[ObjectKey] = set()
        if data_cm is None:
            await self.data.set_configmap(key, {})
        if policy_cm is None:
            touched |= await self.policies.set_configmap(key, {})
        if data_cm is not None:
            await self.data.set_configmap(key, _texts(data_cm))
            errors = [e for _, e in sorted(self.data.errors_of(key).items())] + _binary_errors(data_cm)
            self.reporter.report(key, errors, ACTION_DATA)
        if policy_cm is not None:
            touched |= await self.policies.set_configmap(key, _texts(policy_cm))
            touched.add(key)
        if data_cm is None and policy_cm is None:
            self.reporter.forget(key)
        for cm in sorted(touched):
            configmap = self.stores.lookup(cm)
            if configmap is None or (self.stores.data is not None and self.stores.data.get(cm) is not None):
                continue
            errors = [m.error for m in self.policies.of(cm) if m.error is not None]
            self.reporter.report(cm, errors + _binary_errors(configmap), ACTION_POLICY)
