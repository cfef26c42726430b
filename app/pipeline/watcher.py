"""Producers: list, then watch, one collection (a resource in one namespace, or cluster-wide).

A producer keeps its source's store current (latest object per key) and emits the key of every object that
changed onto the bounded queue. Whatever happens to the connection, it resumes from the last
resourceVersion it saw; when that is too old (410 Gone) it lists again and diffs the list against the store,
so objects deleted during the gap are removed too.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio

from app.kube.client import KubeApiError, KubeClient, KubeGone, KubeUnavailable
from app.pipeline.workqueue import Backoff

log = logging.getLogger(__name__)

ObjectKey = tuple[str, str]  # (namespace, name); namespace is "" for cluster-scoped objects
Emit = Callable[[ObjectKey], Awaitable[None]]


def object_key(obj: dict[str, Any]) -> ObjectKey:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def resource_version(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


class Store:
    """Latest state of one source, per key. Shared by the producers of that source (one per namespace)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._objects: dict[ObjectKey, dict[str, Any]] = {}

    def get(self, key: ObjectKey) -> dict[str, Any] | None:
        return self._objects.get(key)

    def put(self, key: ObjectKey, obj: dict[str, Any]) -> bool:
        """Stores obj; False when the stored object already had this resourceVersion (nothing changed)."""
        old = self._objects.get(key)
        if old is not None and resource_version(old) == resource_version(obj) != "":
            return False
        self._objects[key] = obj
        return True

    def pop(self, key: ObjectKey) -> bool:
        return self._objects.pop(key, None) is not None

    def keys(self, namespace: str | None = None) -> list[ObjectKey]:
        """All keys, or those of one namespace (None means all)."""
        if namespace is None:
            return list(self._objects)
        return [k for k in self._objects if k[0] == namespace]

    def __len__(self) -> int:
        return len(self._objects)


@dataclass(frozen=True)
class Collection:
    """What one producer watches: an API path plus server-side selectors."""

    path: str  # e.g. /api/v1/namespaces/default/configmaps or /api/v1/configmaps
    namespace: str | None  # the namespace the path is limited to; None for cluster-wide
    label_selector: str = ""
    field_selector: str = ""

    def describe(self) -> str:
        where = f"namespace {self.namespace}" if self.namespace else "all namespaces"
        sel = f" ({self.label_selector})" if self.label_selector else ""
        return f"{self.path.rsplit('/', 1)[-1]}{sel} in {where}"


class Watcher:
    """One producer. run() never returns on its own; cancel it to stop."""

    def __init__(
        self,
        client: KubeClient,
        collection: Collection,
        store: Store,
        emit: Emit,
        *,
        watch_seconds: tuple[int, int] = (240, 300),
        idle_grace: float = 30.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.client = client
        self.collection = collection
        self.store = store
        self.emit = emit
        self.synced = anyio.Event()
        self.restarts: dict[str, int] = {"gone": 0, "timeout": 0, "error": 0}
        self._watch_seconds = watch_seconds
        self._idle_grace = idle_grace
        self._backoff = backoff or Backoff(base=0.5, cap=30.0)

    async def run(self) -> None:
        resource_version: str | None = None
        failures = 0
        while True:
            try:
                if resource_version is None:
                    resource_version = await self._relist()
                resource_version = await self._watch(resource_version)
                failures = 0
            except KubeGone:
                self.restarts["gone"] += 1
                log.info("watch of %s expired (410 Gone); listing again", self.collection.describe())
                resource_version = None
            except (KubeUnavailable, KubeApiError) as exc:
                kind = "timeout" if "Timeout" in str(exc) else "error"
                self.restarts[kind] += 1
                failures += 1
                delay = self._backoff.delay(failures)
                level = logging.DEBUG if failures == 1 and kind == "timeout" else logging.WARNING
                log.log(
                    level,
                    "watch of %s failed (%s); retrying in %.1fs",
                    self.collection.describe(),
                    exc,
                    delay,
                )
                await anyio.sleep(delay)

    async def _relist(self) -> str:
        c = self.collection
        result = await self.client.list(
            c.path, label_selector=c.label_selector, field_selector=c.field_selector
        )
        seen: set[ObjectKey] = set()
        for obj in result.items:
            key = object_key(obj)
            seen.add(key)
            if self.store.put(key, obj):
                await self.emit(key)
        for key in self.store.keys(c.namespace):
            if key not in seen and self.store.pop(key):
                await self.emit(key)
        if not self.synced.is_set():
            log.debug("listed %s: %d objects", c.describe(), len(result.items))
            self.synced.set()
        return result.resource_version

    async def _watch(self, resource_version: str) -> str:
        """Watches until the server ends the stream; returns the last resourceVersion seen."""
        c = self.collection
        seconds = random.randint(*self._watch_seconds)
        async for event in self.client.watch(
            c.path,
            resource_version=resource_version,
            label_selector=c.label_selector,
            field_selector=c.field_selector,
            timeout_seconds=seconds,
            idle_timeout=seconds + self._idle_grace,
        ):
            rv = (event.object.get("metadata") or {}).get("resourceVersion")
            if rv:
                resource_version = str(rv)
            if event.type == "BOOKMARK":
                continue
            key = object_key(event.object)
            deleted = event.type == "DELETED"
            if self.store.pop(key) if deleted else self.store.put(key, event.object):
                await self.emit(key)
        return resource_version
