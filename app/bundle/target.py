"""What the writer's handlers write to in bundle mode: the Protocols they write to OPA with in push mode
(`PolicyApi`, `DataApi`, `CollectionApi`), kept in the `BundleState`.

Every module is checked before it enters the bundle, since one module that does not compile makes OPA refuse
the whole bundle:

- its package must have a root in kopa's bundle: a prefix that overlaps no reserved root
  (`--bundle-reserved-roots`, `system` by default: paths that belong to OPA itself or to other bundles, such
  as the chart's `system.authz`; see `BundleState.root_of`). Data is held to the same rule. A refusal is an
  `OpaError` with OPA's shape, so the ConfigMap's status and Events say why, as for any error in push mode;
- then it is loaded into the validation OPA (`--opa-url` in bundle mode: a private OPA that nothing else
  writes to), which compiles it with every module the bundle holds. The module enters the bundle only if that
  OPA accepted it; a module is removed from the bundle once that OPA let it go (it refuses while others depend
  on it, naming them, which the PolicyBook handles as in push mode).

The validation OPA therefore holds exactly the bundle's modules. `OpaProcess` watches it (its process id):
when it restarts, the books load everything again into it, and writes of what the bundle already holds
change nothing here. Each PUT makes that OPA compile every module, so loading N modules costs N compiles (the
quadratic cost of push mode, paid once by kopa instead of by every OPA); the next step is to compile the
candidate bundle once, through the validation OPA's own bundle plugin.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from app.bundle.state import BundleState
from app.configmaps.policies import package_of
from app.model import related
from app.opa.client import Chunks, OpaError


class Validator(Protocol):
    """What the target needs of the validation OPA."""

    async def put_policy(self, policy_id: str, text: str) -> None: ...

    async def delete_policy(self, policy_id: str) -> bool: ...


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


class BundleTarget:
    def __init__(self, state: BundleState, validator: Validator) -> None:
        self.state = state
        self._validator = validator

    # --- policies ---

    async def put_policy(self, policy_id: str, text: str) -> None:
        package = package_of(text)
        if package:
            refused = root_error(f"package {'.'.join(package)}", package, self.state)
            if refused is not None:
                raise refused
        await self._validator.put_policy(policy_id, text)  # OpaError: OPA's own words, per module
        self.state.put_module(policy_id, text)

    async def delete_policy(self, policy_id: str) -> bool:
        await self._validator.delete_policy(policy_id)
        return self.state.delete_module(policy_id)

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
