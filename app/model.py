"""kopa's shared vocabulary: the keys that travel through the pipeline, and the store they point into.

One meaning per word:
- a *source* is one kind of thing kopa keeps in OPA, with one handler: the ConfigMaps (policies and data),
  or one replicated resource (`replicate:<group/version/resource>`);
- a *store* holds the latest state of a source's objects, per key, as the producers saw it;
- a *key* names one object of a source, or is a marker for the whole source.
The queue holds keys, never payloads: the writer reads each key's latest state from the store.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

V = TypeVar("V")


class ObjectKey(NamedTuple):
    """One object: its namespace ("" when cluster-scoped) and name."""

    namespace: str
    name: str

    @classmethod
    def of(cls, obj: dict[str, Any]) -> ObjectKey:
        meta = obj.get("metadata") or {}
        return cls(str(meta.get("namespace") or ""), str(meta.get("name") or ""))

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


class Marker(enum.Enum):
    """A key that stands for a whole source rather than one object."""

    ALL = "all"  # every object of the source: a first load, a refill, or the queue's overflow
    CHECK = "check"  # compare OPA with kopa's copy and repair what differs (the drift check)
    REMOVE = "remove"  # take the whole source out of OPA: it is no longer replicated


ALL = Marker.ALL
CHECK = Marker.CHECK
REMOVE = Marker.REMOVE
Key = ObjectKey | Marker


# A path in OPA's data tree, as segments: ("kubernetes", "configmaps") is data.kubernetes.configmaps.
DataPath = tuple[str, ...]


def related(a: Sequence[str], b: Sequence[str]) -> bool:
    """One path lies under the other (or they are equal): writes or rules at the two can meet in OPA."""
    shorter = min(len(a), len(b))
    return tuple(a[:shorter]) == tuple(b[:shorter])


class WorkKey(NamedTuple):
    """What the queue holds: a key of one source."""

    source: str
    key: Key


def whole_source(work: WorkKey) -> WorkKey | None:
    """The key that stands for every object of this key's source (what a full queue collapses into)."""
    return WorkKey(work.source, ALL) if isinstance(work.key, ObjectKey) else None


def objects_only(keys: Iterable[Key]) -> list[ObjectKey]:
    """The object keys among these, markers left out."""
    return [key for key in keys if isinstance(key, ObjectKey)]


class Store(Generic[V]):
    """Latest state of one source, per key, as the source chose to keep it (a dict, compact bytes, ...).

    `same(old, new)` says when a new state changes nothing worth a write; the producer then emits nothing.
    """

    def __init__(self, name: str, same: Callable[[V, V], bool]) -> None:
        self.name = name
        self._same = same
        self._entries: dict[ObjectKey, V] = {}

    def get(self, key: ObjectKey) -> V | None:
        return self._entries.get(key)

    def put(self, key: ObjectKey, value: V) -> bool:
        """Stores value; False when it changes nothing."""
        old = self._entries.get(key)
        self._entries[key] = value
        return old is None or not self._same(old, value)

    def pop(self, key: ObjectKey) -> bool:
        return self._entries.pop(key, None) is not None

    def keys(self, namespace: str | None = None) -> list[ObjectKey]:
        """All keys, or those of one namespace (None means all)."""
        if namespace is None:
            return list(self._entries)
        return [k for k in self._entries if k.namespace == namespace]

    def items(self) -> Iterator[tuple[ObjectKey, V]]:
        return iter(list(self._entries.items()))

    def __len__(self) -> int:
        return len(self._entries)
