"""An in-memory OPA for the domain's unit tests, built on the Protocols the domain declares.

It keeps what matters to the code under test and nothing more: a data tree with OPA's write semantics (PUT
creates parents; a JSON Patch applies all or nothing and fails with 404 when a path it needs is missing;
GET of a missing path is undefined) and a policy set whose "compiler" refuses a module that reads
`data.needs.<...>` while no loaded module has that package (as OPA refuses an undefined reference). The
integration suite checks the same behaviours against the real OPA.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, TypeVar

import anyio
import orjson

from app.configmaps.policies import data_refs, package_of
from app.opa.client import Chunks, OpaError, OpaUnauthorized

T = TypeVar("T")


def _not_found(path: Sequence[str]) -> OpaError:
    message = f"storage_not_found_error: /{'/'.join(path)}: document does not exist"
    return OpaError(404, "resource_not_found", message, {"code": "resource_not_found", "message": message})


def _pointer(pointer: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]


class FakeOpa:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.policies: dict[str, str] = {}
        self.process_id = "one"
        self.writes: list[tuple[str, str]] = []  # (method, path) of every accepted or refused write
        # A path where OPA refuses writes (400), as at a policy's package: writes under it, or of a
        # document that would contain it.
        self.refuse_writes_under: str | None = None
        self.refuse_token_after: int | None = None  # writes accepted before OPA refuses kopa's token (401)
        self.restart_before_put: bool = False  # the next data PUT lands in a new process (a retried PUT)
        self.reads: list[str] = []  # the data paths read (GET, or a drift check's keys), in order
        self.slices: list[int] = []  # how many objects each of a drift check's reads asked for
        self.refuse_queries = False  # an authorization policy that lets kopa's token use the data API only
        self.read_gate: anyio.Event | None = None  # a read answers its snapshot only once the test sets it

    # --- the process ---

    async def config(self) -> dict[str, Any]:
        return {"labels": {"id": self.process_id}}

    def restart(self) -> None:
        self.data, self.policies, self.process_id = {}, {}, self.process_id + "+"

    # --- data ---

    def _parent(self, path: Sequence[str], create: bool) -> dict[str, Any]:
        node = self.data
        for segment in path:
            if segment not in node or not isinstance(node[segment], dict):
                if not create:
                    raise _not_found(path)
                node[segment] = {}
            node = node[segment]
        return node

    def _check_refused(self, method: str, path: Sequence[str]) -> None:
        where = "/".join(path)
        self.writes.append((method, where))
        refused = self.refuse_writes_under
        if refused is not None and (where.startswith(refused) or refused.startswith(f"{where}/")):
            raise OpaError(400, "invalid_parameter", "refused by the test", {})

    async def put_data(self, path: Sequence[str], document: bytes | Chunks) -> None:
        if callable(document):
            document = b"".join([piece async for piece in document()])
        self._check_refused("PUT", path)
        if self.restart_before_put:
            self.restart_before_put = False
            self.restart()
        self._parent(path[:-1], create=True)[path[-1]] = orjson.loads(document)

    async def delete_data(self, path: Sequence[str]) -> bool:
        self._check_refused("DELETE", path)
        try:
            parent = self._parent(path[:-1], create=False)
        except OpaError:
            return False
        return parent.pop(path[-1], None) is not None

    async def patch_data(self, path: Sequence[str], operations: bytes) -> None:
        self._check_refused("PATCH", path)
        before = copy.deepcopy(self.data)
        try:
            base = self._parent(path, create=False)
            for op in orjson.loads(operations):
                *parents, last = _pointer(op["path"])
                node = base
                for segment in parents:
                    if segment not in node:
                        raise _not_found([*path, *parents])
                    node = node[segment]
                if op["op"] == "remove":
                    if last not in node:
                        raise _not_found([*path, *parents, last])
                    del node[last]
                else:
                    node[last] = op["value"]
        except OpaError:
            self.data = before  # all or nothing
            raise

    def _at(self, path: Sequence[str]) -> Any:
        node: Any = self.data
        for segment in path:
            if not isinstance(node, dict) or segment not in node:
                return None
            node = node[segment]
        return node

    async def _answer(self, snapshot: T) -> T:
        """Answered once read_gate (if any) is set: writes made while the answer is on its way are not in
        it."""
        if self.read_gate is not None:
            await self.read_gate.wait()
        return snapshot

    def _check_query(self) -> None:
        if self.refuse_queries:
            raise OpaUnauthorized("POST query: HTTP 401: request rejected by administrative policy", 401)

    async def get_data(self, path: Sequence[str]) -> Any:
        """What OPA held when the read began."""
        self.reads.append("/".join(path))
        return await self._answer(copy.deepcopy(self._at(path)))

    async def keys(self, path: Sequence[str]) -> list[str] | None:
        """The first read of a drift check: recorded in `reads`, like get_data."""
        self._check_query()
        self.reads.append("/".join(path))
        node = self._at(path)
        return await self._answer(list(node) if isinstance(node, dict) else None)

    async def get_many(self, path: Sequence[str], names: Sequence[str]) -> dict[str, Any]:
        self._check_query()
        self.slices.append(len(names))
        node = self._at(path)
        node = node if isinstance(node, dict) else {}
        return await self._answer({name: copy.deepcopy(node[name]) for name in names if name in node})

    # --- policies ---

    def _check_token(self) -> None:
        if self.refuse_token_after is not None:
            if self.refuse_token_after <= 0:
                raise OpaUnauthorized("PUT policies: HTTP 401", 401)
            self.refuse_token_after -= 1

    async def put_policy(self, policy_id: str, text: str) -> None:
        self._check_token()
        self.writes.append(("PUT", f"policies/{policy_id}"))
        packages = {package_of(t) for i, t in self.policies.items() if i != policy_id}
        for ref in data_refs(text):
            if ref and ref[0] == "needs" and not any(ref[: len(p)] == p for p in packages if p):
                undefined = {"code": "rego_type_error", "message": "undefined ref: data." + ".".join(ref)}
                raise OpaError(400, "invalid_parameter", "error(s) occurred", {"errors": [undefined]})
        self.policies[policy_id] = text

    async def delete_policy(self, policy_id: str) -> bool:
        self.writes.append(("DELETE", f"policies/{policy_id}"))
        return self.policies.pop(policy_id, None) is not None

    async def list_policies(self) -> list[dict[str, Any]]:
        return [{"id": i, "raw": t} for i, t in self.policies.items()]

    @property
    def puts(self) -> int:
        return sum(1 for method, where in self.writes if method == "PUT" and where.startswith("policies/"))
