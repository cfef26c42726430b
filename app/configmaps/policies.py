"""The set of Rego modules kopa keeps in OPA, and how dependencies between them resolve themselves.

Each module is `<namespace>/<configmap>/<key>`. A module that fails to compile (not a parse error) is tried
again when a module it could depend on, or conflict with, is loaded or removed: one whose package lies on a
`data.` path the failing module mentions, or shares its package. Every PUT makes OPA compile every module
it holds, so retrying every failed module after every change would cost a compile per failed module per
change; this costs one only when something relevant changed. A module with a parse error waits until its
own text changes. Modules keep the order in which kopa first saw them (`Module.order`), so that retries go
in the same order.

A refill after an OPA restart loads the modules OPA held in the order they were loaded, then the others, so
which module of a conflicting pair fails never flips. A module whose current text is refused keeps its last
good text in force, as it does while OPA runs (a failed PUT leaves OPA's version): a bad edit followed by an
OPA restart must not drop a `deny` rule.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.model import ObjectKey, related
from app.opa.client import OpaError, error_codes
from app.opa.process import OpaProcess, OpaRestarted

log = logging.getLogger(__name__)

PARSE_ERROR = "rego_parse_error"

_PACKAGE = re.compile(r"^\s*package\s+([A-Za-z_][\w.]*)", re.MULTILINE)
_DATA_REF = re.compile(r"(?<![.\w])data((?:\.[A-Za-z_]\w*)*)")

Path = tuple[str, ...]


class PolicyApi(Protocol):
    """What the book needs of OPA."""

    async def put_policy(self, policy_id: str, text: str) -> None: ...

    async def delete_policy(self, policy_id: str) -> bool: ...

    async def list_policies(self) -> list[dict[str, Any]]: ...


class Settled(Protocol):
    """What became of one module whose write was staged: the text now held under its id, and OPA's error
    when the wanted text was refused or the module unloaded."""

    @property
    def id(self) -> str: ...

    @property
    def held(self) -> str | None: ...

    @property
    def error(self) -> dict[str, Any] | None: ...


class Settler(Protocol):
    """A PolicyApi whose writes are staged and decided together (bundle mode): until `settle`, a write it
    accepted counts as loaded."""

    async def settle(self) -> Sequence[Settled]: ...


def package_of(text: str) -> Path:
    found = _PACKAGE.search(text)
    return tuple(found.group(1).split(".")) if found else ()


def data_refs(text: str) -> list[Path]:
    """Every `data.a.b` path the text mentions (comments too: erring on the side of a retry). A dynamic
    reference (`data[x]`, `data.a[x]`) is cut where it becomes dynamic: anything below may be meant."""
    return [tuple(m.group(1).split(".")[1:]) for m in _DATA_REF.finditer(text)]


@dataclass
class Module:
    id: str
    configmap: ObjectKey
    text: str
    order: int
    loaded_text: str | None = None  # what OPA holds under this id, None when nothing
    good_text: str | None = None  # the last text OPA accepted under this id, kept across OPA restarts
    loaded_seq: int | None = None  # when good_text was loaded (PolicyBook._loads): the refill's order
    error: dict[str, Any] | None = None  # OPA's error object while the current text is not loaded
    parse_error: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and self.loaded_text == self.text

    @property
    def retry_on_change(self) -> bool:
        """Worth another try when other modules change: failed, but not for its own syntax."""
        return self.error is not None and not self.parse_error

    def may_need(self, package: Path) -> bool:
        """Whether a change to a module of `package` could change this module's compile outcome."""
        own = package_of(self.text)
        if own and related(own, package):
            return True
        return any(related(ref, package) for ref in data_refs(self.text))


def _refill_order(module: Module) -> tuple[bool, int, int]:
    """The modules OPA held, in the order they were loaded; then the others, in the order first seen."""
    return module.loaded_seq is None, module.loaded_seq or 0, module.order


@dataclass
class PolicyBook:
    opa: PolicyApi
    process: OpaProcess
    owns: Callable[[str], bool] = lambda policy_id: False  # ids kopa may delete when it does not know them
    settler: Settler | None = None  # bundle mode: `opa`'s writes are decided per batch, by `settle`
    modules: dict[str, Module] = field(default_factory=dict)
    epoch: int = 0  # the OPA process (OpaProcess.epoch) that loaded_text describes
    repairs: int = 0
    # Ids of kopa's form that OPA would not let kopa remove because a bundle owns them: not kopa's after all.
    bundled: set[str] = field(default_factory=set)
    changes: int = 0  # modules loaded into or removed from OPA: what refused data may wait on
    _order: itertools.count[int] = field(default_factory=itertools.count)
    _loads: itertools.count[int] = field(default_factory=itertools.count)

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
        changed: list[Path] = []  # packages whose modules were loaded or removed
        for module in self.of(configmap):
            if module.id not in desired:
                held = module.loaded_text
                touched |= await self._remove(module)
                if held is not None:
                    changed.append(package_of(held))
        for module_id in sorted(desired):
            text = desired[module_id]
            known = self.modules.get(module_id)
            if known is not None and known.text == text and (known.ok or known.error is not None):
                continue  # unchanged: loaded, or failed and waiting for a change elsewhere
            module = known or Module(module_id, configmap, text, next(self._order))
            self.modules[module_id] = module
            before = module.loaded_text
            module.text = text
            if await self._load(module):
                changed += [package_of(text)] + ([package_of(before)] if before is not None else [])
        if changed:
            touched |= await self._retry_failed(changed)
        return touched

    def reset(self, epoch: int) -> None:
        """OPA restarted (a new epoch) and holds nothing."""
        self.epoch = epoch
        for module in self.modules.values():
            module.loaded_text = None

    async def load_all(self) -> set[ObjectKey]:
        """Loads every module into a new OPA process (module docstring: order, last good text)."""
        changed = []
        for module in sorted(self.modules.values(), key=_refill_order):
            if await self._load(module):
                changed.append(package_of(module.text))
            elif module.good_text not in (None, module.text) and await self._restore(module):
                changed.append(package_of(module.loaded_text or ""))
        await self._retry_failed(changed)
        return {m.configmap for m in self.modules.values()}

    async def _restore(self, module: Module) -> bool:
        """Puts back the module's last good text, its current one being refused; True if OPA took it."""
        assert module.good_text is not None
        try:
            await self.opa.put_policy(module.id, module.good_text)
        except OpaError as exc:
            log.debug("policy %s: its last good text failed to load too: %s", module.id, exc)
            return False
        module.loaded_text = module.good_text
        log.info("policy %s: its ConfigMap's text is refused; its last good text stays in force", module.id)
        return True

    async def settle(self) -> set[ObjectKey]:
        """Bundle mode: learns what became of the writes of this batch (a staged module counted as loaded
        until now). Returns the ConfigMaps whose module states changed."""
        if self.settler is None:
            return set()
        touched: set[ObjectKey] = set()
        for outcome in await self.settler.settle():
            module = self.modules.get(outcome.id)
            if module is None:
                continue
            before = (module.loaded_text, module.error)
            module.loaded_text = outcome.held
            if outcome.held is not None and outcome.held != before[0]:
                self._loaded(module, outcome.held)
            if outcome.error is not None:
                module.error = outcome.error
                module.parse_error = PARSE_ERROR in error_codes(outcome.error)
                log.debug("policy %s failed to load: %s", module.id, outcome.error)
            elif outcome.held == module.text:
                module.error = None
                module.parse_error = False
            if (module.loaded_text, module.error) != before:
                touched.add(module.configmap)
        return touched

    def held(self) -> frozenset[tuple[str, str]]:
        """(id, text) of every module kopa has loaded into OPA: what the policy analysis compares."""
        return frozenset((m.id, m.loaded_text) for m in self.modules.values() if m.loaded_text is not None)

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
            if PARSE_ERROR not in exc.error_codes:
                # A compile error may only mean that OPA restarted and lost a module this one needs.
                await self.process.check()
                if self.process.epoch != self.epoch:
                    raise OpaRestarted("OPA restarted; the module is loaded again after the refill") from None
            module.error = exc.body or {"code": exc.code, "message": exc.message}
            module.parse_error = PARSE_ERROR in exc.error_codes
            log.debug("policy %s failed to load: %s", module.id, exc)
            return False
        self._loaded(module, module.text)
        module.error = None
        module.parse_error = False
        return True

    def _loaded(self, module: Module, text: str) -> None:
        module.loaded_text = module.good_text = text
        module.loaded_seq = next(self._loads)
        self.changes += 1

    async def retry_related(self, paths: list[Path]) -> set[ObjectKey]:
        """Tries the failed modules that data written or removed at these paths concerns (a module whose
        rules would have defined a data ConfigMap's path)."""
        return await self._retry_failed(paths)

    async def _retry_failed(self, changed: list[Path]) -> set[ObjectKey]:
        """Tries the failed modules that the changed packages concern; a module that loads then concerns
        others in turn, until no retry loads anything."""
        touched: set[ObjectKey] = set()
        changed = list(dict.fromkeys(changed))  # one retry round per package, however often it changed
        while changed:
            package = changed.pop()
            for module in sorted(self.modules.values(), key=lambda m: m.order):
                if module.retry_on_change and module.may_need(package) and await self._load(module):
                    log.info("policy %s loaded after a module it needs appeared", module.id)
                    touched.add(module.configmap)
                    if package_of(module.text) not in changed:
                        changed.append(package_of(module.text))
        return touched

    async def check(self) -> tuple[int, set[ObjectKey]]:
        """Compares the modules OPA holds with kopa's book and repairs the differences (anti-entropy).

        Only ids kopa owns are touched: those in the book, and unknown ones for which `owns` says so.
        Returns the number of repairs and the ConfigMaps whose module states changed.
        """
        held = {str(p.get("id")): str(p.get("raw", "")) for p in await self.opa.list_policies()}
        repairs = 0
        touched: set[ObjectKey] = set()
        for module in sorted(self.modules.values(), key=lambda m: m.order):
            have = held.get(module.id)
            if have == module.loaded_text:
                continue
            if module.loaded_text is None and have is not None and module.error is not None:
                # An earlier text of this key (a previous kopa's, or kube-mgmt's), while the current one is
                # refused: it stays in force, as it would had this kopa loaded it (module docstring).
                log.info("policy %s: OPA holds an earlier text of it, which stays in force", module.id)
                self._loaded(module, have)
                continue
            repairs += 1
            if module.loaded_text is None:
                log.warning("drift: OPA holds policy %s, which kopa did not load; removing it", module.id)
                await self._delete_quietly(module.id)
                continue
            log.warning(
                "drift: policy %s in OPA %s; loading it again",
                module.id,
                "is missing" if have is None else "differs from its ConfigMap",
            )
            wanted = module.loaded_text
            try:
                await self.opa.put_policy(module.id, wanted)
            except OpaError as exc:
                log.warning("drift: could not load policy %s again: %s", module.id, exc)
                if have is None:
                    module.loaded_text = None
                    module.error = exc.body or {"code": exc.code, "message": exc.message}
        for policy_id in sorted(set(held) - set(self.modules) - self.bundled):
            if self.owns(policy_id):
                repairs += 1
                log.warning("drift: OPA holds policy %s, which no ConfigMap has; removing it", policy_id)
                # Modules that need it (a library whose ConfigMap was deleted while kopa was down) go first,
                # and are reported, as when kopa removes a module itself.
                ns, name, _ = [*policy_id.split("/", 2), "", ""][:3]
                text = held[policy_id]
                stale = Module(policy_id, ObjectKey(ns, name), text, -1, loaded_text=text)
                try:
                    touched |= await self._unload(stale, reason=None)
                except OpaError as exc:
                    if "owned by bundle" in exc.message:
                        repairs -= 1
                        self.bundled.add(policy_id)
                        log.info("policy %s belongs to one of OPA's bundles; left alone", policy_id)
                        continue
                    log.warning("drift: could not remove policy %s: %s", policy_id, exc)
        self.repairs += repairs
        return repairs, touched

    async def _delete_quietly(self, policy_id: str) -> None:
        try:
            await self.opa.delete_policy(policy_id)
        except OpaError as exc:  # e.g. another module depends on it: say so, try again next time
            log.warning("drift: could not remove policy %s: %s", policy_id, exc)

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
            self.changes += 1
            if reason is not None:
                module.error = {"code": "invalid_operation", "message": f"unloaded because {reason}"}
                module.parse_error = False
                touched.add(module.configmap)
        return touched
