"""Makes one replicated collection in OPA match the store: one PUT to load it, then batched JSON Patches.

The first load (and every refill after OPA restarts) is one PUT of the whole collection. After that, the
keys that changed since the last write go out as one JSON Patch: a burst of changes becomes few OPA writes.
A namespace that does not exist in OPA yet is added whole, with its objects, and one whose last object
goes is removed whole, so no operation ever needs a parent that is missing. OPA applies a patch all or
nothing; when one fails, the batch is split in halves until the bad key is found, and only it fails.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson

from app.opa.client import OpaClient, OpaError
from app.pipeline.watcher import ALL, ObjectKey, Store
from app.replication.objects import Replica

log = logging.getLogger(__name__)

MAX_OPS = 1000  # per JSON Patch, to keep one write's size and OPA's lock time bounded
CHUNK = 256 * 1024  # bytes per piece of a collection's PUT


async def _document(groups: dict[str, dict[str, bytes]], namespaced: bool) -> AsyncIterator[bytes]:
    """The collection as one JSON document, {ns: {name: object}} or {name: object}, in CHUNK-sized pieces.

    The objects are the stored bytes, copied into the pieces as they are: nothing is parsed or re-encoded.
    """
    piece = bytearray(b"{")
    for i, (ns, objects) in enumerate(groups.items()):
        if namespaced:
            piece += b"%s%s:{" % (b"," if i else b"", orjson.dumps(ns))
        for j, (name, body) in enumerate(objects.items()):
            piece += b"%s%s:%s" % (b"," if j else b"", orjson.dumps(name), body)
            if len(piece) >= CHUNK:
                yield bytes(piece)
                piece.clear()
        if namespaced:
            piece += b"}"
    piece += b"}"
    yield bytes(piece)


def _pointer(*segments: str) -> str:
    return "".join("/" + s.replace("~", "~0").replace("/", "~1") for s in segments)


@dataclass
class CollectionSync:
    opa: OpaClient
    path: list[str]  # e.g. ["kubernetes", "services"]
    store: Store[Replica]
    namespaced: bool
    applied: dict[ObjectKey, bytes] = field(default_factory=dict)  # key -> digest OPA holds
    per_namespace: Counter[str] = field(default_factory=Counter)  # objects OPA holds per namespace
    loaded: bool = False  # the collection's PUT has been done (since the last OPA restart)
    full_syncs: int = 0
    writes: int = 0

    def reset(self) -> None:
        """OPA restarted and holds nothing: the next write is a PUT of the whole collection."""
        self.applied.clear()
        self.per_namespace.clear()
        self.loaded = False

    async def apply(self, keys: Sequence[ObjectKey]) -> list[tuple[ObjectKey, Exception]]:
        if not self.loaded or ALL in keys:
            try:
                await self.put_collection()
            except OpaError as exc:  # e.g. a policy owns this path: only this collection waits
                log.warning("loading %s into OPA failed: %s", "/".join(self.path), exc)
                return [(key, exc) for key in keys]
            return []
        failures: list[tuple[ObjectKey, Exception]] = []
        for start in range(0, len(keys), MAX_OPS):
            failures += await self._patch(list(keys[start : start + MAX_OPS]))
        return failures

    async def put_collection(self) -> None:
        """One PUT of the whole collection, streamed from the stored bytes (never held whole in memory)."""
        groups: dict[str, dict[str, bytes]] = {}  # namespace ("" when cluster-scoped) -> name -> object
        digests: dict[ObjectKey, bytes] = {}
        for key, replica in self.store.items():
            ns, name = key
            groups.setdefault(ns if self.namespaced else "", {})[name] = replica.body
            digests[key] = replica.digest
        await self.opa.put_data(self.path, partial(_document, groups, self.namespaced))
        self.writes += 1
        self.full_syncs += 1
        self.applied = digests
        self.per_namespace = Counter(ns for ns, _ in digests)
        self.loaded = True
        log.info("loaded %s into OPA: %d objects", "/".join(self.path), len(digests))

    async def _patch(self, keys: list[ObjectKey]) -> list[tuple[ObjectKey, Exception]]:
        """One JSON Patch for these keys; on OpaError, halves until the failing key is isolated."""
        ops, after = self._operations(keys)
        if not ops:
            return []
        try:
            await self.opa.patch_data(self.path, orjson.dumps(ops))
        except OpaError as exc:
            if len(keys) == 1:
                log.warning("replicating %s to %s failed: %s", "/".join(keys[0]), "/".join(self.path), exc)
                return [(keys[0], exc)]
            middle = len(keys) // 2
            return await self._patch(keys[:middle]) + await self._patch(keys[middle:])
        self.writes += 1
        for key, digest in after.items():
            if digest is None:
                del self.applied[key]
                self.per_namespace[key[0]] -= 1
            else:
                self.per_namespace[key[0]] += key not in self.applied
                self.applied[key] = digest
        return []

    def _operations(
        self, keys: list[ObjectKey]
    ) -> tuple[list[dict[str, Any]], dict[ObjectKey, bytes | None]]:
        """The patch for these keys, and the digests OPA will hold once it is applied (None: removed)."""
        after: dict[ObjectKey, bytes | None] = {}
        by_namespace: dict[str, list[ObjectKey]] = {}
        for key in dict.fromkeys(keys):
            replica = self.store.get(key)
            held = self.applied.get(key)
            if replica is None and held is not None:
                after[key] = None
            elif replica is not None and replica.digest != held:
                after[key] = replica.digest
            else:
                continue
            by_namespace.setdefault(key[0], []).append(key)
        ops: list[dict[str, Any]] = []
        for ns, changed in by_namespace.items():
            before = self.per_namespace[ns]
            added = sum(1 for k in changed if after[k] is not None and k not in self.applied)
            removed = sum(1 for k in changed if after[k] is None)
            remaining = before + added - removed
            if self.namespaced and before == 0 and remaining > 0:
                objects = {k[1]: orjson.Fragment(self._body(k)) for k in changed if after[k] is not None}
                ops.append({"op": "add", "path": _pointer(ns), "value": objects})
            elif self.namespaced and remaining == 0 and before > 0:
                ops.append({"op": "remove", "path": _pointer(ns)})
            else:
                for key in changed:
                    where = (ns, key[1]) if self.namespaced else (key[1],)
                    if after[key] is None:
                        ops.append({"op": "remove", "path": _pointer(*where)})
                    else:
                        value = orjson.Fragment(self._body(key))
                        ops.append({"op": "add", "path": _pointer(*where), "value": value})
        return ops, after

    def _body(self, key: ObjectKey) -> bytes:
        replica = self.store.get(key)
        assert replica is not None
        return replica.body
