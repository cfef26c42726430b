"""What kopa keeps of a replicated object: compact JSON bytes, stripped of what users asked to drop.

The local copy exists to refill OPA after a restart without listing the API again, so it must be small:
serialized bytes cost a fraction of nested dicts. metadata.managedFields (often 40% of an object) is
dropped unless asked for, and --replicate-fields keeps only the listed fields.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from app.jsonbytes import dumps

# Always kept, whatever --replicate-fields says: they place the object and tell what it is.
ALWAYS_KEPT = ("kind", "apiVersion", "metadata.name", "metadata.namespace")


@dataclass(frozen=True, slots=True)
class Replica:
    body: bytes  # the object as OPA holds it
    digest: bytes  # of the content without metadata.resourceVersion: equal digests need no write


def right_sized(data: bytes) -> bytes:
    """A copy of orjson's output that owns only its length.

    orjson returns bytes whose allocation is rounded far up (16 KiB for a 2 KB object) and never shrunk;
    kept for an object's lifetime, that is 8x the JSON. Copying costs one memcpy.
    """
    return bytes(memoryview(data))


def same_content(old: Replica, new: Replica) -> bool:
    return old.digest == new.digest


def project(obj: dict[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    """Keeps only the given top-level or dotted fields (plus ALWAYS_KEPT), in the object's shape."""
    kept: dict[str, Any] = {}
    for path in (*ALWAYS_KEPT, *fields):
        parts = path.split(".")
        source: Any = obj
        for part in parts:
            if not isinstance(source, dict) or part not in source:
                break
            source = source[part]
        else:
            target = kept
            for part in parts[:-1]:
                target = target.setdefault(part, {})
            target[parts[-1]] = source
    return kept


def converter(
    kind: str, api_version: str, *, keep_managed_fields: bool, fields: Sequence[str] = ()
) -> Callable[[dict[str, Any]], Replica]:
    """The function the watcher applies to each object of one resource before storing it."""

    def convert(obj: dict[str, Any]) -> Replica:
        # Lists omit kind and apiVersion on their items; kube-mgmt's layout has them, as watch events do.
        obj["kind"] = kind
        obj["apiVersion"] = api_version
        meta = obj.setdefault("metadata", {})
        if not keep_managed_fields:
            meta.pop("managedFields", None)
        if fields:
            obj = project(obj, fields)
        digest = content_digest(obj)
        return Replica(right_sized(dumps(obj)), digest)

    return convert


def content_digest(obj: dict[str, Any]) -> bytes:
    """A Replica's digest: of the object without metadata.resourceVersion, which moves at every write to
    the API, also of fields kopa does not keep. The drift check takes it of what OPA holds, too."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or "resourceVersion" not in meta:
        return _sorted_digest(obj)
    version = meta.pop("resourceVersion")
    try:
        return _sorted_digest(obj)
    finally:
        meta["resourceVersion"] = version


def _sorted_digest(obj: dict[str, Any]) -> bytes:
    # Sorted keys: a list's items and a watch's objects carry the same fields in another order (kind and
    # apiVersion are added by the converter, at the end, to list items), and must not count as a change.
    return hashlib.blake2b(dumps(obj, sort_keys=True), digest_size=16).digest()
