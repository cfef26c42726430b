"""The set of Rego modules kopa keeps in OPA, and how dependencies between them resolve themselves.

Each module is `<namespace>/<configmap>/<key>`. A module that fails to compile because something it uses is
not loaded yet is tried again whenever the set of loaded modules changes, with no cap on attempts; a module
with a parse error waits until its own text changes. Modules keep the order in which kopa first saw them
(`Module.order`), so that retries, and a refill after an OPA restart, go in the same order.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from app.opa.client import OpaClient, OpaError, OpaUnavailable
from app.pipeline.watcher import ObjectKey

log = logging.getLogger(__name__)

PARSE_ERROR = "rego_parse_error"


@dataclass
class Module:
    id: str
    configmap: ObjectKey
    text: str
    order: int
    loaded_text: str | None = None  # what OPA holds under this id, None when nothing
    error: dict[str, Any] | None = None  # OPA's error object while the current text is not loaded
    parse_error: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and self.loaded_text == self.text

    @property
    def retry_on_change(self) -> bool:
        """Worth another try when other modules change: failed, but not for its own syntax."""
        return self.error is not None and not self.parse_error


@dataclass
class PolicyBook:
    opa: OpaClient
    modules: dict[str, Module] = field(default_factory=dict)
    # asked before a compile error is believed; False when OPA turned out to have restarted.
    same_opa: Callable[[], Awaitable[bool]] | None = None
    _order: itertools.count[int] = field(default_factory=itertools.count)

    def of(self, configmap: ObjectKey) -> list[Module]:
        """The modules of one ConfigMap, in key order."""
        return sorted((m for m in self.modules.values() if m.configmap == configmap), key=lambda m: m.id)

    async def set_configmap(self, configmap: ObjectKey, texts: dict[str, str]) -> set[ObjectKey]:
        """Makes OPA hold exactly these modules for one ConfigMap (keys -> Rego text).

        Returns the ConfigMaps whose module states changed (this one and any whose errors resolved or
        appeared), so their status can be written.
        """
        ns, name = configmap
        desired = {f"{ns}/{name}/{key}": text for key, text in texts.items()}
        touched: set[ObjectKey] = {configmap}
        set_changed = False
        for module in self.of(configmap):
            if module.id not in desired:
                touched |= await self._remove(module)
                set_changed = True
        for module_id in sorted(desired):
            text = desired[module_id]
            known = self.modules.get(module_id)
            if known is not None and known.text == text and (known.ok or known.error is not None):
                continue  # unchanged: loaded, or failed and waiting for a change elsewhere
            module = known or Module(module_id, configmap, text, next(self._order))
            self.modules[module_id] = module
            module.text = text
            if await self._load(module):
                set_changed = True
        if set_changed:
            touched |= await self._retry_failed()
        return touched

    def reset(self) -> None:
        """OPA restarted and holds nothing."""
        for module in self.modules.values():
            module.loaded_text = None

    async def load_all(self) -> set[ObjectKey]:
        """Loads every module again in the order kopa first saw them, so outcomes do not flip."""
        for module in sorted(self.modules.values(), key=lambda m: m.order):
            await self._load(module)
        await self._retry_failed()
        return {m.configmap for m in self.modules.values()}

    @property
    def loaded_count(self) -> int:
        return sum(1 for m in self.modules.values() if m.ok)

    @property
    def failed_count(self) -> int:
        return sum(1 for m in self.modules.values() if m.error is not None)

    async def _load(self, module: Module) -> bool:
        """PUTs the module; True if OPA now runs its text. A failed PUT leaves OPA's old version in place."""
        try:
            await self.opa.put_policy(module.id, module.text)
        except OpaError as exc:
            if PARSE_ERROR not in exc.error_codes and self.same_opa is not None and not await self.same_opa():
                raise OpaUnavailable("OPA restarted; the module is loaded again after the refill") from None
            module.error = exc.body or {"code": exc.code, "message": exc.message}
            module.parse_error = PARSE_ERROR in exc.error_codes
            log.debug("policy %s failed to load: %s", module.id, exc)
            return False
        module.loaded_text = module.text
        module.error = None
        module.parse_error = False
        return True

    async def _retry_failed(self) -> set[ObjectKey]:
        """Tries failed modules again until a round loads none of them (a fixpoint)."""
        touched: set[ObjectKey] = set()
        progress = True
        while progress:
            progress = False
            for module in sorted(self.modules.values(), key=lambda m: m.order):
                if module.retry_on_change and await self._load(module):
                    log.info("policy %s loaded after a module it needs appeared", module.id)
                    touched.add(module.configmap)
                    progress = True
        return touched

    async def _remove(self, module: Module) -> set[ObjectKey]:
        touched = await self._unload(module, reason=None)
        del self.modules[module.id]
        return touched

    async def _unload(self, module: Module, reason: str | None) -> set[ObjectKey]:
        """Deletes a module from OPA; modules that cannot compile without it are unloaded first.

        OPA refuses to delete a module others depend on, naming the dependents in its error.
        """
        touched: set[ObjectKey] = set()
        while module.loaded_text is not None:
            try:
                await self.opa.delete_policy(module.id)
            except OpaError as exc:
                dependents = [
                    self.modules[f]
                    for f in sorted(exc.files)
                    if f in self.modules and f != module.id and self.modules[f].loaded_text is not None
                ]
                if not dependents:
                    raise
                for dep in dependents:
                    log.info("policy %s is unloaded: it depends on %s, which is removed", dep.id, module.id)
                    touched |= await self._unload(dep, reason=f"it depends on {module.id}, which was removed")
                continue
            module.loaded_text = None
            if reason is not None:
                module.error = {"code": "invalid_operation", "message": f"unloaded because {reason}"}
                module.parse_error = False
                touched.add(module.configmap)
        return touched
