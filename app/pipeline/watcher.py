"""Producers: list, then watch, one collection (a resource in one namespace, or cluster-wide).

A producer keeps its source's store current (latest state per key) and adds the key of every object that
changed to the bounded queue (a plain call, as client-go's event handlers make: the queue never blocks).
Whatever happens to the connection, it resumes from the last resourceVersion it saw; when that is too old
(410 Gone), or the server refuses the watch (RBAC without the watch verb), it lists again and diffs the
list against the store, so objects deleted during the gap are removed too.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import anyio

from app.kube.client import KubeApiError, KubeGone, KubeUnavailable, ListResult, WatchEvent
from app.model import ObjectKey, Store, WorkKey
from app.pipeline.workqueue import Backoff

log = logging.getLogger(__name__)

# The queue's add: tells it that an object of a source (or, with a marker, the whole source) changed; never
# blocks (the queue bounds itself by collapsing a source's keys into its ALL marker when full).
Add = Callable[[WorkKey], None]
V = TypeVar("V")


def resource_version(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def same_resource_version(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return resource_version(old) == resource_version(new) != ""


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


# Why a watch was started again (kopa_watch_restarts_total's reason label):
#   closed        the server ended the watch after a while (its timeoutSeconds): the normal case, at once
#   closed_early  the server ended it within MIN_WATCH_SECONDS without a single event: backed off
#   gone          410 Gone, the resourceVersion expired: listed again, at once the first time, then backed off
#   timeout       the connection timed out (or the stream stayed silent too long): backed off
#   error         any other failure (connection refused, 5xx, 403, ...): backed off
RESTART_REASONS = ("closed", "closed_early", "gone", "timeout", "error")
# A watch that ends sooner than this with no event did not work (client-go's reflector treats it the same).
MIN_WATCH_SECONDS = 1.0


@dataclass
class WatchStats:
    """What the metrics and readiness layers read about one producer."""

    restarts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESTART_REASONS, 0))
    lists: int = 0
    last_list: float | None = None  # wall-clock time of the last complete list
    # The failure the producer is backing off from, None once a list or a watch works again: readiness
    # reports it (a 403 is RBAC that does not grant the resource).
    failure: KubeApiError | KubeUnavailable | None = None

    def failing(self) -> str | None:
        """The failure backed off from, as readiness says it (the API server's own words)."""
        return str(self.failure) if self.failure is not None else None


class ListWatch(Protocol):
    """What a producer needs of the Kubernetes API: lists in pages, and watches."""

    def list_pages(
        self, path: str, *, label_selector: str = "", field_selector: str = "", page_size: int = 500
    ) -> AsyncIterator[ListResult]: ...

    async def watch(
        self,
        path: str,
        *,
        resource_version: str,
        on_event: Callable[[WatchEvent], None],
        label_selector: str = "",
        field_selector: str = "",
        timeout_seconds: int = 300,
        idle_timeout: float = 330.0,
    ) -> None: ...


class Watcher(Generic[V]):
    """One producer. run() never returns on its own; cancel it to stop.

    `convert` turns an API object into what the store keeps; each change adds `WorkKey(source, key)` to the
    queue. `on_synced` is called once the first list is stored (and its keys added). With `emit_initial=False`
    that list adds nothing per object (replication loads a collection in one write).
    """

    def __init__(
        self,
        client: ListWatch,
        collection: Collection,
        store: Store[V],
        source: str,
        add: Add,
        *,
        convert: Callable[[dict[str, Any]], V],
        emit_initial: bool = True,
        on_synced: Callable[[], None] | None = None,
        watch_seconds: tuple[int, int] = (240, 300),
        idle_grace: float = 30.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.client = client
        self.collection = collection
        self.store = store
        self.source = source
        self.add = add
        self.convert = convert
        self.synced = anyio.Event()
        self.stats = WatchStats()
        self._emit_initial = emit_initial
        self._on_synced = on_synced
        self._watch_seconds = watch_seconds
        self._idle_grace = idle_grace
        self._backoff = backoff or Backoff(base=0.5, cap=30.0)
        self._progress = False  # the current watch delivered an event (bookmarks included)
        self._resource_version: str | None = None  # the last one seen; None: list (again)
        self._watch_began = 0.0  # when the current watch was opened (monotonic)

    async def run(self) -> None:
        """Lists, then watches; restarts every watch that ends, backing off while they keep failing.

        `failures` counts attempts in a row that achieved nothing (no event; for a watch the server ended
        cleanly, not even MIN_WATCH_SECONDS open); it sets the backoff. Time alone does not make a failed
        attempt healthy: a connect that times out after 10 s achieved nothing either. A 410 relists at once
        (however many connection failures came before it: an API server back from an outage), but a 410
        that keeps coming spaces the relists, so a misbehaving server never sees a hot loop. A watch the
        server refuses (403 without the watch verb, 405, 404) lists again at the next attempt, as
        client-go's reflector does: resuming the watch alone left the store as the first list had it.
        """
        failures = 0
        gone = 0  # 410s in a row with nothing achieved between them
        said = ""  # the failure last logged at warning level, until a watch works again
        while True:
            self._progress = False
            try:
                if self._resource_version is None:
                    self._resource_version = await self._relist()
                self._watch_began = time.monotonic()
                await self._watch(self._resource_version)
            except KubeGone:
                gone = 0 if self._progress else gone
                gone += 1
                failures = 0  # the server answered: whatever failed before is over
                self.stats.restarts["gone"] += 1
                self._resource_version = None
                delay = 0.0 if gone == 1 else self._backoff.delay(gone - 1)
                log.info(
                    "watch of %s expired (410 Gone); listing again%s",
                    self.collection.describe(),
                    f" in {delay:.1f}s" if delay else "",
                )
                await anyio.sleep(delay)
            except (KubeUnavailable, KubeApiError) as exc:
                if self._progress:
                    failures = gone = 0
                    said = ""
                kind = "timeout" if "Timeout" in str(exc) else "error"
                self.stats.restarts[kind] += 1
                failures += 1
                if isinstance(exc, KubeApiError):
                    self._resource_version = None  # refused, not cut off: list again (docstring)
                delay = self._backoff.delay(failures)
                # The same failure again (a 403 until RBAC changes) is logged once, then at debug level.
                again, said = said == str(exc), str(exc)
                self.stats.failure = exc
                quiet = (failures == 1 and kind == "timeout") or again
                level = logging.DEBUG if quiet else logging.WARNING
                log.log(
                    level,
                    "watch of %s failed (%s); retrying in %.1fs",
                    self.collection.describe(),
                    exc,
                    delay,
                )
                await anyio.sleep(delay)
            else:
                if self._healthy():
                    failures = gone = 0
                    said = ""
                    self.stats.restarts["closed"] += 1
                    continue
                failures += 1
                self.stats.restarts["closed_early"] += 1
                delay = self._backoff.delay(failures)
                log.warning(
                    "watch of %s ended at once with no event; retrying in %.1fs",
                    self.collection.describe(),
                    delay,
                )
                await anyio.sleep(delay)

    def _healthy(self) -> bool:
        """Whether a watch the server ended worked: it delivered an event, or lasted MIN_WATCH_SECONDS."""
        return self._progress or time.monotonic() - self._watch_began >= MIN_WATCH_SECONDS

    def _emit(self, key: ObjectKey) -> None:
        self.add(WorkKey(self.source, key))

    async def _relist(self) -> str:
        c = self.collection
        initial = not self.synced.is_set()
        emit = self._emit if self._emit_initial or not initial else None
        seen: set[ObjectKey] = set()
        resource_version = ""
        async for page in self.client.list_pages(
            c.path, label_selector=c.label_selector, field_selector=c.field_selector
        ):
            for obj in page.items:
                key = ObjectKey.of(obj)
                seen.add(key)
                if self.store.put(key, self.convert(obj)) and emit is not None:
                    emit(key)
            resource_version = page.resource_version
        for key in self.store.keys(c.namespace):
            if key not in seen and self.store.pop(key) and emit is not None:
                emit(key)
        self.stats.lists += 1
        self.stats.last_list = time.time()
        self.stats.failure = None
        if initial:
            log.debug("listed %s: %d objects", c.describe(), len(seen))
            if self._on_synced is not None:
                self._on_synced()
            self.synced.set()
        return resource_version

    async def _watch(self, resource_version: str) -> None:
        """Watches from `resource_version` until the server ends the stream."""
        c = self.collection
        seconds = random.randint(*self._watch_seconds)
        await self.client.watch(
            c.path,
            resource_version=resource_version,
            on_event=self._on_event,
            label_selector=c.label_selector,
            field_selector=c.field_selector,
            timeout_seconds=seconds,
            idle_timeout=seconds + self._idle_grace,
        )

    def _on_event(self, event: WatchEvent) -> None:
        """One event, handled in the callback that read it (a plain call: nothing here waits)."""
        self._progress = True
        self.stats.failure = None
        obj = event.object
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if rv:
            self._resource_version = str(rv)
        if event.type == "BOOKMARK":
            return
        key = ObjectKey.of(obj)
        if self.store.pop(key) if event.type == "DELETED" else self.store.put(key, self.convert(obj)):
            self._emit(key)
