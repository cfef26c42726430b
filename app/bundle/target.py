"""What the writer's handlers write to in bundle mode: the Protocols they write to OPA with in push mode
(`PolicyApi`, `DataApi`, `CollectionApi`), kept in the `BundleState`.

Every module is checked before it enters the bundle, since one module that does not compile makes OPA refuse
the whole bundle:

- its package must have a root in kopa's bundle: a prefix that overlaps no reserved root
  (`--bundle-reserved-roots`, `system` by default: paths that belong to OPA itself or to other bundles, such
  as the chart's `system.authz`; see `BundleState.root_of`). Data is held to the same rule. A refusal is an
  `OpaError` with OPA's shape, so the ConfigMap's status and Events say why, as for any error in push mode;
- then it must compile with everything else the bundle holds. Module writes are staged, and `settle` (the
  PolicyBook calls it once per batch of the writer) decides the whole batch with one compile of the
  candidate in the validation OPA (`app/bundle/settle.py`, `compiler.py`), so loading N modules costs one
  compile, not N. Until then the book counts a staged module as loaded; `settle` tells it what became of
  each one, in OPA's words.
- and its rules must not lie where data is (OPA checks that on activation too): the rule paths come from
  the ASTs the validation OPA compiled, and a module that collides is refused with OPA's words; a data
  write that would collide with a rule is refused by the state, as OPA refuses it in push mode.

Data needs no compile and goes into the bundle at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from app.bundle.settle import COMPILE_MESSAGE, Failure, Outcome, settle
from app.bundle.state import BundleState, Path
from app.configmaps.policies import package_of
from app.model import related
from app.opa.client import Chunks, OpaError


class Compiler(Protocol):
    """What the target needs of the validation OPA (`BundleCompiler`)."""

    async def compile(self, modules: Mapping[str, str]) -> list[Failure]: ...

    async def rule_paths(self, modules: Mapping[str, str], ids: Sequence[str]) -> dict[str, list[Path]]: ...

    def rest(self, modules: Mapping[str, str]) -> None: ...


def root_error(what: str, path: Sequence[str], state: BundleState) -> OpaError | None:
    """The refusal of content at `path` that has no root in kopa's bundle (it lies in or above a reserved
    root), or None."""
    if state.root_of(path) is not None:
        return None
    reserved = next(root for root in state.reserved if related(path, root))
    message = (
        f"{what} overlaps data.{'.'.join(reserved)}, which is reserved for OPA itself or for other bundles "
        "(--bundle-reserved-roots); kopa's bundle cannot hold it"
    )
    return OpaError(400, "bundle_root_error", message, {"code": "bundle_root_error", "message": message})


def collision_error(module_id: str, path: Sequence[str]) -> dict[str, Any]:
    """OPA's answer to a PUT of a module whose rule lies where data is (push mode's words)."""
    error = {
        "code": "rego_compile_error",
        "message": f"conflicting rule for data path {'/'.join(path)} found",
        "location": {"file": module_id},
    }
    return {"code": "invalid_parameter", "message": COMPILE_MESSAGE, "errors": [error]}


class BundleTarget:
    def __init__(self, state: BundleState, compiler: Compiler) -> None:
        self.state = state
        self._compiler = compiler
        self._staged: dict[str, str | None] = {}  # module id -> text (None: removed), in the order made

    # --- policies ---

    async def put_policy(self, policy_id: str, text: str) -> None:
        package = package_of(text)
        if package:
            refused = root_error(f"package {'.'.join(package)}", package, self.state)
            if refused is not None:
                raise refused
        self._stage(policy_id, text)

    async def delete_policy(self, policy_id: str) -> bool:
        held = self._staged.get(policy_id, self.state.modules.get(policy_id))
        self._stage(policy_id, None)
        return held is not None

    def _stage(self, policy_id: str, text: str | None) -> None:
        self._staged.pop(policy_id, None)
        self._staged[policy_id] = text

    async def settle(self) -> list[Outcome]:
        """Decides the staged module writes (see the module docstring) and puts what passed into the
        bundle. Raises OpaUnavailable when the validation OPA cannot say; the writes stay staged."""
        if not self._staged:
            return []
        held = self.state.modules
        changes = [(i, t) for i, t in self._staged.items() if held.get(i) != t]
        same = [Outcome(i, t) for i, t in self._staged.items() if held.get(i) == t]
        refused: list[Outcome] = []
        while True:
            accepted, outcomes = await settle(held, changes, self._compiler.compile)
            entering = [i for i, t in accepted.items() if held.get(i) != t]
            paths = await self._compiler.rule_paths(accepted, entering)
            collisions = {
                i: path for i in entering for path in paths.get(i, []) if self.state.data_conflict(path)
            }
            if not collisions:
                break
            # OPA would refuse the bundle: those modules stay out, and the rest is decided again without them.
            changes = [(i, t) for i, t in changes if i not in collisions]
            refused += [Outcome(i, held.get(i), collision_error(i, p)) for i, p in sorted(collisions.items())]
        self._staged.clear()
        for module_id in [i for i in held if i not in accepted]:
            self.state.delete_module(module_id)
        for module_id in entering:
            self.state.put_module(module_id, accepted[module_id])
            self.state.set_rule_paths(module_id, paths.get(module_id, []))
        self._compiler.rest(accepted)
        return same + outcomes + refused

    async def list_policies(self) -> list[dict[str, Any]]:
        return self.state.list_modules()

    # --- data ---

    async def put_data(self, path: Sequence[str], document: bytes | Chunks) -> None:
        refused = root_error(f"data.{'.'.join(path)}", path, self.state)
        if refused is not None:
            raise refused
        await self.state.put_data(path, document)

    async def patch_data(self, path: Sequence[str], operations: bytes) -> None:
        await self.state.patch_data(path, operations)

    async def delete_data(self, path: Sequence[str]) -> bool:
        return await self.state.delete_data(path)

    async def get_data(self, path: Sequence[str]) -> Any:
        return await self.state.get_data(path)

    async def keys(self, path: Sequence[str]) -> list[str] | None:
        return await self.state.keys(path)

    async def get_many(self, path: Sequence[str], names: Sequence[str]) -> dict[str, Any]:
        return await self.state.get_many(path, names)


class Publication:
    """Readiness's marker in bundle mode. Push mode writes `data.system.kopa` into OPA once everything is
    loaded; in bundle mode the same moment opens the bundle endpoint (`BundleState.publish`), which answers
    503 before it, so OPA's own `/health?bundles` turns ready only with a bundle that reflects the cluster.
    It stays open: a restart of the validation OPA loses nothing of the bundle."""

    def __init__(self, state: BundleState) -> None:
        self._state = state

    async def put_data(self, path: Sequence[str], document: bytes | Chunks) -> None:
        self._state.publish()

    async def delete_data(self, path: Sequence[str]) -> bool:
        return False
