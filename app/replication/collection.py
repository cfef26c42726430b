"""Makes one replicated collection in OPA match the store: one PUT to load it, then batched JSON Patches.

The first load (and every refill after OPA restarts) is one PUT of the whole collection. After that, the
keys that changed since the last write go out as one JSON Patch: a burst of changes becomes few OPA writes.
A namespace that does not exist in OPA yet is added whole, with its objects, and one whose last object
goes is removed whole, so no operation ever needs a parent that is missing.

OPA applies a patch all or nothing, and answers 404 when one operation's path is missing (someone changed
OPA behind kopa's back). kopa records only what OPA accepted: when a patch is refused, each namespace it
touched is written again whole from kopa's copy (a PUT, which creates missing parents), and a namespace
whose rewrite fails too is rewritten on its next change. The drift check (CHECK) reads one namespace
subtree per call, in rotation, and rewrites it when it differs from kopa's copy.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import orjson

from app.model import ALL, CHECK, Key, ObjectKey, Store, objects_only
from app.opa.client import Chunks, OpaError
from app.opa.process import OpaProcess
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


class CollectionApi(Protocol):
    """What a collection needs of OPA."""

    async def put_data(self, path: Sequence[str], document: bytes | Chunks) -> None: ...

    async def patch_data(self, path: Sequence[str], operations: bytes) -> None: ...

    async def delete_data(self, path: Sequence[str]) -> bool: ...

    async def get_data(self, path: Sequence[str]) -> Any: ...


@dataclass
class CollectionSync:
    opa: CollectionApi
    process: OpaProcess
    path: list[str]  # e.g. ["kubernetes", "services"]
    store: Store[Replica]
    namespaced: bool
    applied: dict[ObjectKey, bytes] = field(default_factory=dict)  # key -> digest OPA holds
    per_namespace: Counter[str] = field(default_factory=Counter)  # objects OPA holds per namespace
    unknown: set[str] = field(default_factory=set)  # namespaces whose content in OPA kopa cannot vouch for
    filled_epoch: int | None = None  # the OPA process the collection was PUT into, if any
    full_syncs: int = 0
    writes: int = 0
    repairs: int = 0
    _rotation: int = 0

    @property
    def loaded(self) -> bool:
        """The collection's PUT has been done in the OPA process of the moment."""
        return self.filled_epoch == self.process.epoch

    async def apply(self, keys: Sequence[Key]) -> list[tuple[Key, Exception]]:
        """The writer's entry point. ALL (a first load, a refill, the queue's overflow) and a new OPA
        process are one PUT of the whole collection; CHECK is the drift check of one namespace."""
        if not self.loaded or ALL in keys:
            try:
                await self.put_collection()
            except OpaError as exc:  # e.g. a policy owns this path: only this collection waits
                log.warning("loading %s into OPA failed: %s", "/".join(self.path), exc)
                return [(key, exc) for key in keys]
            return []
        failures: list[tuple[Key, Exception]] = []
        if CHECK in keys:
            failures += await self.check()
        objects = objects_only(keys)
        for start in range(0, len(objects), MAX_OPS):
            failures += await self._patch(objects[start : start + MAX_OPS])
        return failures

    async def put_collection(self) -> None:
        """One PUT of the whole collection, streamed from the stored bytes (never held whole in memory)."""
        epoch = self.process.epoch
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
        self.unknown.clear()
        self.filled_epoch = epoch
        log.info("loaded %s into OPA: %d objects", "/".join(self.path), len(digests))

    async def _patch(self, keys: list[ObjectKey]) -> list[tuple[Key, Exception]]:
        """One JSON Patch for these keys; a namespace OPA refused it for is written again whole."""
        suspect = sorted({key[0] for key in keys if key[0] in self.unknown})
        failures = await self._rewrite(suspect, keys) if suspect else []
        keys = [key for key in keys if key[0] not in suspect]
        ops, after = self._operations(keys)
        if not ops:
            return failures
        try:
            await self.opa.patch_data(self.path, orjson.dumps(ops))
        except OpaError as exc:
            log.warning(
                "patching %s in OPA failed (%s); writing the namespaces concerned again from kopa's copy",
                "/".join(self.path),
                exc,
            )
            return failures + await self._rewrite(sorted({key[0] for key in after}), keys)
        self.writes += 1
        for key, digest in after.items():
            if digest is None:
                del self.applied[key]
                self.per_namespace[key[0]] -= 1
            else:
                self.per_namespace[key[0]] += key not in self.applied
                self.applied[key] = digest
        return failures

    async def _rewrite(self, namespaces: list[str], keys: list[ObjectKey]) -> list[tuple[Key, Exception]]:
        """Writes these namespaces (or, cluster-scoped, the collection) whole from the store. Returns the
        keys whose namespace OPA refused again; those namespaces stay unknown until a rewrite succeeds."""
        if not self.namespaced:
            try:
                await self.put_collection()
            except OpaError as exc:
                self.filled_epoch = None
                log.warning("loading %s into OPA failed: %s", "/".join(self.path), exc)
                return [(key, exc) for key in keys]
            return []
        failures: list[tuple[Key, Exception]] = []
        for ns in namespaces:
            objects = {key: replica for key, replica in self.store.items() if key[0] == ns}
            try:
                if objects:
                    groups = {ns: {key[1]: replica.body for key, replica in objects.items()}}
                    await self.opa.put_data([*self.path, ns], partial(_document, groups, False))
                else:
                    await self.opa.delete_data([*self.path, ns])
            except OpaError as exc:
                self.unknown.add(ns)
                log.warning("writing %s/%s into OPA failed: %s", "/".join(self.path), ns, exc)
                failures += [(key, exc) for key in keys if key[0] == ns]
                continue
            self.writes += 1
            self.unknown.discard(ns)
            for key in [key for key in self.applied if key[0] == ns]:
                del self.applied[key]
            self.applied.update((key, replica.digest) for key, replica in objects.items())
            self.per_namespace[ns] = len(objects)
        return failures

    async def check(self) -> list[tuple[Key, Exception]]:
        """Anti-entropy for one namespace subtree (the whole collection when cluster-scoped), in rotation:
        brings it up to date, reads it back from OPA and rewrites it if it differs from kopa's copy.
        Skipped when OPA turns out to be a new process (its refill is queued)."""
        if not await self.process.check() or not self.loaded:
            return []
        if self.namespaced:
            namespaces = sorted({ns for ns, count in self.per_namespace.items() if count} | self.unknown)
            if not namespaces:
                return []
            ns = namespaces[self._rotation % len(namespaces)]
            self._rotation += 1
            keys = [key for key in set(self.applied) | set(self.store.keys(ns)) if key[0] == ns]
            where = [*self.path, ns]
        else:
            ns = ""
            keys = list(set(self.applied) | set(self.store.keys()))
            where = list(self.path)
        failures = await self._patch(keys)
        if failures:
            return failures
        held = await self.opa.get_data(where)
        wanted = {
            key[1]: orjson.loads(replica.body)
            for key, replica in self.store.items()
            if not self.namespaced or key[0] == ns
        }
        if (held or {}) == wanted:
            return []
        self.repairs += 1
        log.warning("drift: %s in OPA differs from the cluster; writing it again", "/".join(where))
        return await self._rewrite([ns] if self.namespaced else [], keys)

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
