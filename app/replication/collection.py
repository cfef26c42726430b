"""Makes one replicated collection in OPA match the store: one PUT to load it, then batched JSON Patches.

The first load (and every refill after OPA restarts) is one PUT of the whole collection. After that, the
keys that changed since the last write go out as one JSON Patch: a burst of changes becomes few OPA writes.
A namespace that does not exist in OPA yet is added whole, with its objects, and one whose last object
goes is removed whole, so no operation ever needs a parent that is missing.

OPA applies a patch all or nothing, and answers 404 when one operation's path is missing (someone changed
OPA behind kopa's back). kopa records only what OPA accepted: when a patch is refused, each namespace it
touched is written again whole from kopa's copy (a PUT, which creates missing parents), and a namespace
whose rewrite fails too is rewritten on its next change.

The drift check (CHECK) reads one namespace subtree per call, in rotation, off the writer's path: the
writer only picks the namespace and notes, while the read is in flight, what it writes there; run_checks
reads the subtree and compares each object with what kopa wrote (objects written meanwhile count for
nothing). A namespace that differs goes back to the writer to be written again whole. The read is the
namespace's keys, then its objects in slices of about READ_BYTES: neither OPA nor kopa ever serializes or
parses a large namespace at once for it (one GET of 1,000 objects of 2 KB cost kopa 6 MB of peak memory).
Once per rotation the check reads the collection's own keys instead, its namespaces: one missing there goes
back to the writer, and so does one that kopa holds no object of (written there behind kopa's back), which
the writer removes.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, Protocol

import anyio
import anyio.lowlevel
import orjson
from anyio.abc import TaskGroup, TaskStatus

from app.model import ALL, CHECK, REMOVE, Key, ObjectKey, Store, objects_only
from app.opa.client import Chunks, OpaError, OpaUnauthorized, OpaUnavailable
from app.opa.process import OpaProcess
from app.replication.objects import Replica, content_digest

log = logging.getLogger(__name__)

MAX_OPS = 1000  # per JSON Patch, to keep one write's size and OPA's lock time bounded
CHUNK = 256 * 1024  # bytes per piece of a collection's PUT
SLICE = 0.001  # seconds of the drift check's digests before the event loop (and the writer) gets a turn
READ_BYTES = 256 * 1024  # of objects (kopa's copies' sizes) per read of a drift check
UNKNOWN_SIZE = 4096  # what an object kopa has no copy of counts for in READ_BYTES


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

    async def keys(self, path: Sequence[str]) -> list[str] | None: ...

    async def get_many(self, path: Sequence[str], names: Sequence[str]) -> dict[str, Any]: ...


async def _digests(objects: dict[str, Any]) -> dict[str, bytes]:
    """Each object's content_digest (b"" for a value that is not an object), on the event loop in slices
    of SLICE seconds. Not in a worker thread: orjson holds the GIL for a whole call, and the writer would
    wait for the thread at every turn of the loop (measured on 1,000 objects: 35 ms gaps, against 1.3 ms
    in slices)."""
    found: dict[str, bytes] = {}
    started = time.perf_counter()
    for name, obj in objects.items():
        found[name] = content_digest(obj) if isinstance(obj, dict) else b""
        if time.perf_counter() - started > SLICE:
            await anyio.lowlevel.checkpoint()
            started = time.perf_counter()
    return found


def _slices(names: list[str], size: Callable[[str], int]) -> Iterable[list[str]]:
    """The names in runs of about READ_BYTES of objects (at least one name each)."""
    piece: list[str] = []
    total = 0
    for name in names:
        if piece and total + size(name) > READ_BYTES:
            yield piece
            piece, total = [], 0
        piece.append(name)
        total += size(name)
    if piece:
        yield piece


# The slot of the drift check that reads the collection's list of namespaces rather than one namespace.
NAMESPACES: Final = None


@dataclass
class _Check:
    """A drift check whose read is in flight: the namespace ("" when cluster-scoped, NAMESPACES for the
    collection's list of namespaces), and what the writer has written there since the check began. Objects
    (or, for the list, namespaces) written meanwhile count for nothing; a namespace (or collection) written
    whole makes the whole check count for nothing."""

    namespace: str | None
    epoch: int  # the OPA process it reads
    again: bool  # the check of a namespace whose previous check counted for nothing
    written: set[str] = field(default_factory=set)  # names of the objects (or namespaces) written meanwhile
    whole: bool = False


@dataclass
class CollectionSync:
    opa: CollectionApi
    process: OpaProcess
    path: list[str]  # e.g. ["kubernetes", "services"]
    store: Store[Replica]
    namespaced: bool
    add: Callable[[Key], None]  # queues a key of this collection for the writer (a drift check's repair)
    applied: dict[ObjectKey, bytes] = field(default_factory=dict)  # key -> digest OPA holds
    per_namespace: Counter[str] = field(default_factory=Counter)  # objects OPA holds per namespace
    unknown: set[str] = field(default_factory=set)  # namespaces whose content in OPA kopa cannot vouch for
    filled_epoch: int | None = None  # the OPA process the collection was PUT into, if any
    full_syncs: int = 0
    writes: int = 0
    repairs: int = 0
    removed: bool = False  # taken out of OPA for good (REMOVE): every later key is a no-op
    _rotation: int = 0
    _again: str | None = None  # the namespace to check at the next CHECK: its check counted for nothing
    _check: _Check | None = None  # the drift check in flight
    _whole_reads: bool = False  # OPA refuses kopa's queries: the drift check GETs each namespace whole
    _checks: TaskGroup | None = None  # run_checks' task group, which owns the checks' reads

    @property
    def loaded(self) -> bool:
        """The collection's PUT has been done in the OPA process of the moment."""
        return self.filled_epoch == self.process.epoch

    @property
    def checking(self) -> bool:
        """A drift check is reading OPA (started by check(), not concluded yet)."""
        return self._check is not None

    async def apply(self, keys: Sequence[Key]) -> list[tuple[Key, Exception]]:
        """The writer's entry point. ALL (a first load, a refill, the queue's overflow) and a new OPA
        process are one PUT of the whole collection; CHECK is the drift check of one namespace; REMOVE
        deletes the collection from OPA, after which the source writes nothing more (its watch has been
        stopped; a refill queued before that must not bring it back)."""
        if self.removed:
            return []
        if REMOVE in keys:
            self._writing(None)
            try:
                await self.opa.delete_data(self.path)
            except OpaError as exc:
                log.warning("removing %s from OPA failed: %s", "/".join(self.path), exc)
                return [(REMOVE, exc)]
            self.removed = True
            self.applied.clear()
            self.per_namespace.clear()
            log.info("removed %s from OPA", "/".join(self.path))
            return []
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
        self._writing(None)
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
        ops, after, whole = self._operations(keys)
        if not ops:
            return failures
        for ns in whole:
            self._writing(ns)
        for key in after:
            self._writing(key.namespace, [key.name])
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
            self._writing(ns)
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
        """The writer's part of the drift check (CHECK): picks what to check, one namespace per call in
        rotation (the whole collection when cluster-scoped) and, once per rotation, the collection's list
        of namespaces, and starts its read in run_checks' task group; from then on, _writing tells the check
        what the writer writes there. A namespace kopa cannot vouch for (unknown) is written again instead.
        Skipped while the previous check still reads, and when run_checks is not running."""
        if self._check is not None or self._checks is None or not self.loaded:
            return []
        rotation = self._rotation_slots()
        ns: str | None
        if self._again is not None and self._again in rotation:
            ns, again = self._again, True
        else:
            ns, again = rotation[self._rotation % len(rotation)], False
            self._rotation += 1
        self._again = None
        if ns is not NAMESPACES and ns in self.unknown:  # written whole, or removed if kopa holds none there
            keys = [key for key in set(self.applied) | set(self.store.keys(ns)) if key[0] == ns]
            return await self._rewrite([ns], keys)
        self._check = _Check(ns, self.process.epoch, again)
        self._checks.start_soon(self._compare, self._check)
        return []

    def _rotation_slots(self) -> list[str | None]:
        """What the drift check rotates over: the namespaces OPA holds objects of or kopa cannot vouch for,
        then the list of namespaces itself (NAMESPACES: not when OPA refuses kopa's queries, where reading it
        would be a GET of the whole collection); the one "" when cluster-scoped, whose read is the whole
        collection."""
        if not self.namespaced:
            return [""]
        slots: list[str | None] = [
            *sorted({ns for ns, count in self.per_namespace.items() if count} | self.unknown)
        ]
        if not self._whole_reads:
            slots.append(NAMESPACES)
        return slots

    def _writing(self, namespace: str | None, names: Iterable[str] | None = None) -> None:
        """Tells the drift check in flight that the writer is about to write into OPA: these objects of a
        namespace, or (no names) the namespace whole, or (None) the whole collection."""
        check = self._check
        if check is not None and check.namespace is NAMESPACES:  # the list: namespaces come or go whole
            if namespace is None:
                check.whole = True
            elif names is None:
                check.written.add(namespace)
            return
        if check is None or namespace not in (None, check.namespace):
            return
        if names is None:
            check.whole = True
        else:
            check.written.update(names)

    async def run_checks(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Owns the reads of the drift checks that check() starts, for as long as the collection is
        replicated (the Replicators run it beside the resource's producer; cancelling it stops them)."""
        async with anyio.create_task_group() as tg:
            self._checks = tg
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._checks = None

    async def _compare(self, check: _Check) -> None:
        """The drift check's read and compare, off the writer's path: reads the namespace subtree from
        OPA and compares each object (its content_digest) with what kopa wrote there, or is about to write
        (the store), leaving out the objects written meanwhile. When one differs, the namespace is marked
        unknown and one of its keys queued: the writer then writes it whole from the store (_patch). A
        check that cannot conclude (written whole meanwhile, OPA unreachable or restarted) counts for
        nothing and is done again at the next CHECK (once: then the rotation moves on)."""
        ns = check.namespace
        if ns is NAMESPACES:
            await self._compare_namespaces(check)
            return
        path = [*self.path, ns] if self.namespaced else list(self.path)
        try:
            found = await self._read(path, ns)
            # Asked after the read: a new, empty OPA process must not look like drift (its refill is queued).
            usable = await self.process.check()
        except OpaError as exc:
            log.warning("drift check of %s: reading it failed: %s", "/".join(path), exc)
            return
        except OpaUnavailable as exc:  # the writer and OpaProcess deal with the outage itself
            log.debug("drift check of %s: reading it failed: %s", "/".join(path), exc)
            found, usable = None, False
        finally:
            self._check = None
        if check.whole or not usable or check.epoch != self.process.epoch or not self.loaded:
            log.debug("drift check of %s counts for nothing", "/".join(path))
            self._again = None if check.again else ns
            return
        stored = {key.name: replica.digest for key, replica in self.store.items() if key.namespace == ns}
        wanted = {key.name: digest for key, digest in self.applied.items() if key.namespace == ns}
        held = found or {}
        differs = sorted(
            name
            for name in held.keys() | wanted.keys()
            if name not in check.written and held.get(name) not in (wanted.get(name), stored.get(name))
        )
        if not differs:
            return
        self.repairs += 1
        log.warning("drift: %s in OPA differs from the cluster; writing it again", "/".join(path))
        if self.namespaced:
            self._repair(ns, differs[0])
        else:
            self.unknown.add(ns)
            self.add(ALL)

    async def _compare_namespaces(self, check: _Check) -> None:
        """The drift check of the collection's list of namespaces. A namespace OPA lacks that kopa wrote
        objects into is written again whole; one OPA holds that kopa holds no object of, neither in OPA nor
        in its store, is a stray: the writer removes it (_rewrite). Namespaces written whole during the read
        count for nothing; a namespace whose objects differ is the other checks' business."""
        try:
            found = await self.opa.keys(self.path)
            usable = await self.process.check()
        except OpaUnauthorized:  # no queries: the list is not checked (a GET would be the whole collection)
            self._whole_reads = True
            return
        except (OpaError, OpaUnavailable) as exc:
            log.debug("drift check of %s's namespaces: reading them failed: %s", "/".join(self.path), exc)
            return
        finally:
            self._check = None
        if check.whole or not usable or check.epoch != self.process.epoch or not self.loaded:
            return
        held = set(found or ())
        written = {ns for ns, count in self.per_namespace.items() if count}
        settled = self.unknown | check.written  # being written again, or written during the read
        for ns in sorted(written - held - settled):
            self.repairs += 1
            log.warning("drift: %s is missing in OPA; writing it again", "/".join([*self.path, ns]))
            self._repair(ns, next(key.name for key in self.applied if key.namespace == ns))
        candidates = held - written - settled
        if candidates:
            candidates -= {key.namespace for key, _ in self.store.items()}
        for ns in sorted(candidates):
            self.repairs += 1
            log.warning(
                "drift: %s in OPA holds no object of the cluster; removing it", "/".join([*self.path, ns])
            )
            self._repair(ns, "")

    def _repair(self, namespace: str, name: str) -> None:
        """Hands a namespace kopa cannot vouch for to the writer, which writes it whole from the store or
        removes it (_patch, _rewrite). The key queued is one of its objects, or a name no object has ("")
        when kopa holds none there."""
        self.unknown.add(namespace)
        self.add(ObjectKey(namespace, name))

    async def _read(self, path: list[str], ns: str) -> dict[str, bytes] | None:
        """The content_digest of each object OPA holds at path (b"" for a value that is not an object), its
        keys first, then the objects in slices of about READ_BYTES; None when OPA holds nothing there.

        An OPA whose authorization policy lets kopa's token read and write data but not ask queries (kube-mgmt
        only ever used the data and policy APIs) is read with one GET of the subtree instead, from then on."""
        if self._whole_reads:
            return await self._read_whole(path)
        try:
            names = await self.opa.keys(path)
        except OpaUnauthorized as refused:
            whole = await self._read_whole(path)  # refused too: the token itself, which the writer reports
            self._whole_reads = True
            log.warning(
                "OPA refuses kopa's queries (%s); the drift check reads each namespace of %s whole instead",
                refused,
                "/".join(self.path),
            )
            return whole
        if names is None:
            return None
        found: dict[str, bytes] = {}
        for piece in _slices(names, lambda name: self._size(ObjectKey(ns, name))):
            found.update(await _digests(await self.opa.get_many(path, piece)))
        return found

    async def _read_whole(self, path: list[str]) -> dict[str, bytes] | None:
        held = await self.opa.get_data(path)
        return await _digests(held) if isinstance(held, dict) else None

    def _size(self, key: ObjectKey) -> int:
        replica = self.store.get(key)
        return len(replica.body) if replica is not None else UNKNOWN_SIZE

    def _operations(
        self, keys: list[ObjectKey]
    ) -> tuple[list[dict[str, Any]], dict[ObjectKey, bytes | None], set[str]]:
        """The patch for these keys, the digests OPA will hold once it is applied (None: removed), and the
        namespaces it adds or removes whole."""
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
        whole: set[str] = set()
        for ns, changed in by_namespace.items():
            before = self.per_namespace[ns]
            added = sum(1 for k in changed if after[k] is not None and k not in self.applied)
            removed = sum(1 for k in changed if after[k] is None)
            remaining = before + added - removed
            if self.namespaced and before == 0 and remaining > 0:
                objects = {k[1]: orjson.Fragment(self._body(k)) for k in changed if after[k] is not None}
                ops.append({"op": "add", "path": _pointer(ns), "value": objects})
                whole.add(ns)
            elif self.namespaced and remaining == 0 and before > 0:
                ops.append({"op": "remove", "path": _pointer(ns)})
                whole.add(ns)
            else:
                for key in changed:
                    where = (ns, key[1]) if self.namespaced else (key[1],)
                    if after[key] is None:
                        ops.append({"op": "remove", "path": _pointer(*where)})
                    else:
                        value = orjson.Fragment(self._body(key))
                        ops.append({"op": "add", "path": _pointer(*where), "value": value})
        return ops, after, whole

    def _body(self, key: ObjectKey) -> bytes:
        replica = self.store.get(key)
        assert replica is not None
        return replica.body
