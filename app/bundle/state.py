"""What kopa's bundle holds: Rego modules and one data tree, with OPA's write semantics, a content digest as
the revision, and a bounded log of the data changes between revisions (what delta bundles are made of).

The writer's handlers write here exactly as they write to OPA in push mode (through `BundleTarget`), so the
bundle holds exactly what push mode would put into OPA. Nothing here does I/O.

**Revision.** A digest of the content, never of its history: two kopa replicas holding the same policies and
data give the same revision (and ETag), whatever order their changes came in. The data part is a Merkle
digest: a node above `DIGEST_DEPTH` is the hash of its sorted keys and its children's digests, a node at that
depth (a replicated object at `kubernetes/<plural>/<namespace>/<name>`, a key of a data ConfigMap) the hash of
its canonical JSON. Digests down to that depth are cached and a write drops only those on its path, so a
change costs the hashing of what it touched plus one line of siblings per level, not the whole tree.

**Rules and data.** OPA refuses a bundle (or, in push mode, a write) when a rule's path holds data, or lies
below data that is not an object (`ast.CheckPathConflicts` with `storage.NonEmpty`). The state keeps each
module's rule paths (given by `BundleTarget` once the module compiled), refuses a data write that would
collide with one, in OPA's words, and answers `data_conflict` for a module's rules.

**Changes.** Each write records its data operations in OPA's delta form (`upsert`, `remove`). They are
folded into a log entry when the revision is next asked for (`commit`): writes between two questions make one
entry, and writes that end where they started make none. The log keeps the last `LOG_ENTRIES` entries and at
most `LOG_BYTES` of operations; a base older than that gets a snapshot.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import orjson

from app.configmaps.policies import package_of
from app.jsonbytes import dumps
from app.model import related
from app.opa.client import Chunks, OpaError

# Depth down to which data digests are cached (see the module docstring).
DIGEST_DEPTH = 4
# The log of data changes: entries kept, and bytes of operations kept.
LOG_ENTRIES = 256
LOG_BYTES = 32 * 1024 * 1024

Path = tuple[str, ...]


def _hash(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


RULE = "\x00rule"  # the trie key that marks a rule's path (never a data key: OPA paths are text)


def _any_rule(trie: dict[str, Any]) -> str:
    """A module with a rule somewhere below this trie node."""
    pending = [trie]
    while pending:
        node = pending.pop()
        if RULE in node:
            return str(node[RULE])
        pending += [v for k, v in node.items() if k != RULE]
    return ""


def _conflict(path: Sequence[str], module_id: str) -> OpaError:
    """OPA's answer to a data write that collides with a rule (in push mode, from `PUT /v1/data`)."""
    found = f"rego_compile_error: conflicting rule for data path {'/'.join(path)} found"
    message = f"1 error occurred: {module_id}: {found}"
    return OpaError(400, "invalid_parameter", message, {"code": "invalid_parameter", "message": message})


def _not_found(path: Sequence[str]) -> OpaError:
    """OPA's answer to a write whose path is missing, in OPA's words."""
    message = f"storage_not_found_error: /{'/'.join(path)}: document does not exist"
    return OpaError(404, "resource_not_found", message, {"code": "resource_not_found", "message": message})


def _pointer_segments(pointer: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]] if pointer else []


def pointer(path: Iterable[str]) -> str:
    """A path as a JSON pointer, escaped as OPA's delta bundles read it (RFC 6901)."""
    return "".join("/" + s.replace("~", "~0").replace("/", "~1") for s in path)


@dataclass(frozen=True)
class Operation:
    """One data change in OPA's delta form: `upsert` (value: serialized JSON) or `remove`."""

    op: str
    path: Path
    value: bytes = b""

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op, "path": pointer(self.path)}
        if self.op == "upsert":
            out["value"] = orjson.Fragment(self.value)
        return out

    @property
    def size(self) -> int:
        return len(self.value) + sum(len(s) for s in self.path) + 16


@dataclass(frozen=True)
class Revision:
    """A committed state: its digest, its roots and modules' digest (a delta may change neither), and the
    operations that lead to it from the previous entry of the log."""

    revision: str
    roots: tuple[str, ...]
    modules: bytes
    operations: tuple[Operation, ...]

    @property
    def size(self) -> int:
        return sum(op.size for op in self.operations)


class BundleState:
    """The modules and the data tree kopa serves, their revision, and the log of data changes."""

    def __init__(
        self,
        reserved: Iterable[Sequence[str]] = (),
        *,
        log_entries: int = LOG_ENTRIES,
        log_bytes: int = LOG_BYTES,
    ) -> None:
        self.reserved: list[Path] = [tuple(root) for root in reserved]
        self.modules: dict[str, str] = {}
        self.data: dict[str, Any] = {}
        self._rule_paths: dict[str, tuple[Path, ...]] = {}  # module id -> its rules' paths (ground prefix)
        self._rule_trie: dict[str, Any] = {}  # the same paths as a trie; RULE marks where a rule is
        self._digests: dict[Path, bytes] = {}
        self._modules_digest: bytes | None = None
        self._pending: list[Operation] = []
        self._dirty = True
        self._log: list[Revision] = []
        self._log_entries = log_entries
        self._log_bytes = log_bytes
        self._changed = anyio.Event()
        self.published = anyio.Event()  # set once the bundle reflects the cluster (see publish)

    # --- what the server asks ---

    def publish(self) -> None:
        """The bundle now reflects the cluster (every source loaded): from now on it is served."""
        self.published.set()

    @property
    def current(self) -> Revision:
        """The committed state of the moment (commits what was written since the last question)."""
        self.commit()
        return self._log[-1]

    def commit(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        pending, self._pending = self._pending, []
        revision = _hash(b"kopa-bundle/1", self._module_digest(), self._data_digest((), self.data)).hex()
        if self._log and self._log[-1].revision == revision:
            return  # changes that ended where they started
        self._log.append(Revision(revision, self.roots(), self._module_digest(), tuple(pending)))
        self._trim()

    def _trim(self) -> None:
        total = sum(entry.size for entry in self._log)
        while len(self._log) > 1 and (len(self._log) > self._log_entries or total > self._log_bytes):
            total -= self._log.pop(0).size

    def since(self, base: str) -> list[Operation] | None:
        """The operations that turn the state of revision `base` into the current one, when a delta can do
        it: `base` is still in the log, and the roots and the modules are the same now as then. None means a
        snapshot is needed."""
        current = self.current
        if base == current.revision:
            return []
        for index in range(len(self._log) - 2, -1, -1):
            entry = self._log[index]
            if entry.revision != base:
                continue
            if entry.roots != current.roots or entry.modules != current.modules:
                return None
            return [op for later in self._log[index + 1 :] for op in later.operations]
        return None

    async def wait_changed(self) -> None:
        """Returns after the next write (which may or may not change the revision)."""
        await self._changed.wait()

    def root_of(self, path: Sequence[str]) -> Path | None:
        """The root that content at `path` lies under: its shortest prefix that overlaps no reserved root
        (so, with the default `system`, its first segment); None when there is none (the content lies in,
        or above, a reserved root, and cannot be in kopa's bundle)."""
        for n in range(1, len(path) + 1):
            if not any(related(path[:n], root) for root in self.reserved):
                return tuple(path[:n])
        return None

    def roots(self) -> tuple[str, ...]:
        """The bundle's roots: the root (`root_of`) of every data document and of every module's package,
        without those that lie under another. The writes are checked first (`BundleTarget`), so every
        document and package has one."""
        found: set[Path] = set()
        stack: list[tuple[Path, Any]] = [((key,), value) for key, value in self.data.items()]
        while stack:
            path, node = stack.pop()
            if not any(related(path, root) for root in self.reserved):
                found.add(path)
            elif isinstance(node, dict):
                stack += [((*path, key), value) for key, value in node.items()]
        for text in self.modules.values():
            root = self.root_of(package_of(text))
            if root is not None:
                found.add(root)
        minimal = [p for p in found if not any(p[:n] in found for n in range(1, len(p)))]
        return tuple(sorted("/".join(p) for p in minimal))

    # --- digests ---

    def _module_digest(self) -> bytes:
        if self._modules_digest is None:
            parts = [_hash(i.encode(), t.encode()) for i, t in sorted(self.modules.items())]
            self._modules_digest = _hash(*parts)
        return self._modules_digest

    def _data_digest(self, path: Path, node: Any) -> bytes:
        if len(path) > DIGEST_DEPTH:
            return _hash(b"v", dumps(node, sort_keys=True))
        cached = self._digests.get(path)
        if cached is not None:
            return cached
        if isinstance(node, dict) and len(path) < DIGEST_DEPTH:
            parts = [b"{"]
            for key in sorted(node):
                parts += [key.encode(), self._data_digest((*path, key), node[key])]
            digest = _hash(*parts)
        else:
            digest = _hash(b"v", dumps(node, sort_keys=True))
        self._digests[path] = digest
        return digest

    def _forget(self, path: Path, old: Any) -> None:
        """Drops the cached digests a write at `path` makes stale: its ancestors, and the old subtree."""
        for i in range(min(len(path), DIGEST_DEPTH) + 1):
            self._digests.pop(path[:i], None)
        stack = [(path, old)]
        while stack:
            where, node = stack.pop()
            if len(where) > DIGEST_DEPTH:
                continue
            self._digests.pop(where, None)
            if isinstance(node, dict) and len(where) < DIGEST_DEPTH:
                stack += [((*where, k), v) for k, v in node.items()]

    def _changed_now(self, operations: list[Operation]) -> None:
        self._pending += operations
        self._dirty = True
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    # --- policies (PolicyApi's storage side; BundleTarget validates first) ---

    def put_module(self, module_id: str, text: str) -> None:
        if self.modules.get(module_id) == text:
            return
        self.modules[module_id] = text
        self._modules_digest = None
        self._changed_now([])

    def delete_module(self, module_id: str) -> bool:
        if self._rule_paths.pop(module_id, None) is not None:
            self._index_rules()
        if self.modules.pop(module_id, None) is None:
            return False
        self._modules_digest = None
        self._changed_now([])
        return True

    def set_rule_paths(self, module_id: str, paths: Iterable[Sequence[str]]) -> None:
        """Where a module's rules are (each rule's path down to its first non-constant segment)."""
        self._rule_paths[module_id] = tuple(tuple(p) for p in paths)
        self._index_rules()

    def _index_rules(self) -> None:
        trie: dict[str, Any] = {}
        for module_id, paths in self._rule_paths.items():
            for path in paths:
                node = trie
                for segment in path:
                    node = node.setdefault(segment, {})
                node.setdefault(RULE, module_id)
        self._rule_trie = trie

    def data_conflict(self, path: Sequence[str]) -> bool:
        """Whether a rule at `path` would collide with the data (OPA's `storage.NonEmpty`): something is
        there, or the nearest thing above it is not an object."""
        node: Any = self.data
        for segment in path:
            if not isinstance(node, dict):
                return True
            if segment not in node:
                return False
            node = node[segment]
        return bool(path)

    def _rule_conflict(self, where: Path, value: Any) -> OpaError | None:
        """OPA's refusal of writing `value` at `where` when it would collide with a rule, or None."""
        node = self._rule_trie
        for depth, segment in enumerate(where):
            if RULE in node:  # a rule above: the write would put data at its path
                return _conflict(where[:depth], node[RULE])
            if segment not in node:
                return None
            node = node[segment]
        # Rules at or below `where`: the value must hold nothing at their paths.
        pending: list[tuple[dict[str, Any], Any, Path]] = [(node, value, where)]
        while pending:
            trie, content, at = pending.pop()
            if RULE in trie or not isinstance(content, dict):
                return _conflict(at, trie.get(RULE) or _any_rule(trie))
            pending += [(trie[k], content[k], (*at, k)) for k in trie if k != RULE and k in content]
        return None

    def list_modules(self) -> list[dict[str, Any]]:
        return [{"id": i, "raw": t} for i, t in self.modules.items()]

    # --- data, with OPA's semantics (DataApi and CollectionApi) ---

    def _node(self, path: Sequence[str]) -> Any:
        node: Any = self.data
        for segment in path:
            if not isinstance(node, dict) or segment not in node:
                raise _not_found(path)
            node = node[segment]
        return node

    def _set(self, path: Path, value: Any) -> None:
        """Writes value at path, creating missing parents (and replacing a parent that is not an object,
        as OPA's PUT does)."""
        node = self.data
        for i, segment in enumerate(path[:-1]):
            child = node.get(segment)
            if not isinstance(child, dict):
                if segment in node:
                    self._forget(path[: i + 1], child)
                child = node[segment] = {}
            node = child
        self._forget(path, node.get(path[-1]))
        node[path[-1]] = value

    async def put_data(self, path: Sequence[str], document: bytes | Chunks) -> None:
        if callable(document):
            document = b"".join([piece async for piece in document()])
        if not path:
            raise OpaError(400, "invalid_parameter", "kopa never writes the whole data tree", {})
        value = orjson.loads(document)
        where = tuple(path)
        refused = self._rule_conflict(where, value)
        if refused is not None:
            raise refused
        try:
            if self._node(where) == value:
                return
        except OpaError:
            pass
        self._set(where, value)
        self._changed_now([Operation("upsert", where, bytes(document))])

    async def delete_data(self, path: Sequence[str]) -> bool:
        where = tuple(path)
        try:
            parent = self._node(where[:-1])
        except OpaError:
            return False
        if not isinstance(parent, dict) or where[-1] not in parent:
            return False
        self._forget(where, parent[where[-1]])
        del parent[where[-1]]
        self._changed_now([Operation("remove", where)])
        return True

    async def patch_data(self, path: Sequence[str], operations: bytes) -> None:
        """A JSON Patch (add, replace, remove) below path, applied in order and all or nothing: 404 when a
        path an operation needs is missing, as OPA answers."""
        base = tuple(path)
        undo: list[tuple[Path, Any, bool]] = []  # (path, old value, whether it existed), newest last
        done: list[Operation] = []
        try:
            for op in orjson.loads(operations):
                where = (*base, *_pointer_segments(op["path"]))
                if not where:
                    raise OpaError(400, "invalid_parameter", "kopa never patches the whole data tree", {})
                parent = self._node(where[:-1])
                if not isinstance(parent, dict):
                    raise _not_found(where)
                existed = where[-1] in parent
                if op["op"] in ("remove", "replace") and not existed:
                    raise _not_found(where)
                if op["op"] not in ("add", "replace", "remove"):
                    raise OpaError(400, "invalid_parameter", f"unsupported patch op {op['op']!r}", {})
                refused = self._rule_conflict(where, op["value"]) if op["op"] != "remove" else None
                if refused is not None:
                    raise refused
                undo.append((where, parent.get(where[-1]), existed))
                self._forget(where, parent.get(where[-1]))
                if op["op"] == "remove":
                    del parent[where[-1]]
                    done.append(Operation("remove", where))
                else:
                    parent[where[-1]] = op["value"]
                    done.append(Operation("upsert", where, dumps(op["value"])))
        except OpaError:
            for where, old, existed in reversed(undo):
                parent = self._node(where[:-1])
                self._forget(where, parent.get(where[-1]))
                if existed:
                    parent[where[-1]] = old
                else:
                    parent.pop(where[-1], None)
            raise
        if done:
            self._changed_now(done)

    async def get_data(self, path: Sequence[str]) -> Any:
        try:
            return copy.deepcopy(self._node(path))
        except OpaError:
            return None

    async def keys(self, path: Sequence[str]) -> list[str] | None:
        node = self._object(path)
        return None if node is None else list(node)

    async def get_many(self, path: Sequence[str], names: Sequence[str]) -> dict[str, Any]:
        node = self._object(path) or {}
        return {name: copy.deepcopy(node[name]) for name in names if name in node}

    def _object(self, path: Sequence[str]) -> dict[str, Any] | None:
        try:
            node = self._node(path)
        except OpaError:
            return None
        return node if isinstance(node, dict) else None
