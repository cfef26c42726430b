"""Tells users what happened to their ConfigMap: the kube-mgmt status annotation, and Kubernetes Events.

The annotation is kube-mgmt's, byte for byte: `{"status":"ok"}`, or `{"status":"error","error":E}` where E is
the error of the one failing key, or a list of them. It is written only when it changes, on a queue of its
own, so a slow API server never holds up writes to OPA. An Event (events.k8s.io/v1) is recorded when a load
fails and when it recovers, so `kubectl describe configmap` tells the story.

With leader election (several kopa replicas, one status writer), a replica that does not lead keeps every
status it reaches but writes none; when it becomes leader it writes each one that differs from what the
ConfigMap carries (the previous leader's writes arrive through the watch), so taking over is a re-sync.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote

import orjson

from app.kube.client import JSON, KubeApiError, KubeUnavailable
from app.model import ObjectKey
from app.pipeline.workqueue import QueueObserver, WorkQueue

log = logging.getLogger(__name__)

STATUS_ANNOTATION = "openpolicyagent.org/kube-mgmt-status"
OK = '{"status":"ok"}'
# Kubernetes caps all annotations of an object at 256 KiB together; kopa's stays far below that.
MAX_STATUS_BYTES = 16 * 1024
MAX_ERROR_BYTES = 4 * 1024
MAX_NOTE_BYTES = 1024  # events.k8s.io/v1 limits note to 1 kB, counted in bytes

TRUNCATED = "... (truncated)"

REASON_FAILED = "LoadFailed"
REASON_RECOVERED = "LoadRecovered"
REPORTING_CONTROLLER = "openpolicyagent.org/kopa"

Lookup = Callable[[ObjectKey], dict[str, Any] | None]


def _trim_detail(detail: Any) -> Any:
    """OPA quotes the offending line in a parse error; a long one is cut, not the error."""
    if isinstance(detail, dict) and isinstance(detail.get("details"), dict):
        line = detail["details"].get("line")
        if isinstance(line, str) and len(line) > 200:
            return {**detail, "details": {**detail["details"], "line": line[:200] + "... (truncated)"}}
    return detail


def _bounded(error: dict[str, Any]) -> dict[str, Any]:
    """Trims an oversized error object (OPA lists up to ten detailed errors) to fit the budget."""
    if len(orjson.dumps(error)) <= MAX_ERROR_BYTES:
        return error
    trimmed = {k: v for k, v in error.items() if k != "errors"}
    details = [_trim_detail(d) for d in error.get("errors") or []]
    kept: list[Any] = []
    for detail in details:
        if len(orjson.dumps({**trimmed, "errors": [*kept, detail]})) > MAX_ERROR_BYTES:
            break
        kept.append(detail)
    if kept:
        trimmed["errors"] = kept
    if len(orjson.dumps(trimmed)) > MAX_ERROR_BYTES:
        trimmed["message"] = str(trimmed.get("message", ""))[: MAX_ERROR_BYTES // 2] + "... (truncated)"
    return trimmed


# What Go's encoding/json escapes in strings (kube-mgmt's annotations are its output): equal statuses are
# equal texts, so a ConfigMap kube-mgmt reported on is not rewritten when kopa takes over.
_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_GO_ESCAPED = re.compile("[<>&\u2028\u2029]")


def _encode(doc: dict[str, Any]) -> str:
    """JSON as Go writes it. The characters escaped can only occur inside strings."""
    return _GO_ESCAPED.sub(lambda m: _GO_ESCAPES[m.group(0)], orjson.dumps(doc).decode())


def status_value(errors: list[dict[str, Any]]) -> str:
    """The annotation for a ConfigMap whose failing keys produced these errors (in key order)."""
    if not errors:
        return OK
    if len(errors) == 1:
        return _encode({"status": "error", "error": _bounded(errors[0])})
    kept: list[dict[str, Any]] = []
    for index, error in enumerate(errors):
        candidate = [*kept, _bounded(error)]
        rest = len(errors) - index - 1
        marker = [{"code": "truncated", "message": f"{rest} more errors not shown"}] if rest else []
        if len(_encode({"status": "error", "error": candidate + marker}).encode()) > MAX_STATUS_BYTES:
            break
        kept = candidate
    if len(kept) < len(errors):
        omitted = len(errors) - len(kept)
        kept.append({"code": "truncated", "message": f"{omitted} more errors not shown"})
    return _encode({"status": "error", "error": kept})


def _shortest(value: str) -> str:
    """An error status cut to its first error's code and the start of its message."""
    errors = orjson.loads(value).get("error")
    first = (errors[0] if isinstance(errors, list) and errors else errors) or {}
    message = str(first.get("message", ""))[:200]
    message += " (shortened: the ConfigMap's other annotations leave no room; its Events have more)"
    return _encode({"status": "error", "error": {"code": first.get("code", ""), "message": message}})


def _summary(value: str) -> str:
    """A one-paragraph reading of a status for an Event's note."""
    doc = orjson.loads(value)
    errors = doc.get("error")
    errors = errors if isinstance(errors, list) else [errors]
    parts = []
    for e in errors:
        if isinstance(e, dict):
            details = [d.get("message", "") for d in e.get("errors") or [] if isinstance(d, dict)]
            parts.append("; ".join(filter(None, [str(e.get("message", "")), *details[:2]])))
    note = " | ".join(parts) or value
    if len(note.encode()) <= MAX_NOTE_BYTES:
        return note
    cut = note.encode()[: MAX_NOTE_BYTES - len(TRUNCATED)].decode("utf-8", "ignore")  # whole characters
    return cut + TRUNCATED


class StatusApi(Protocol):
    """What the status writer needs of the Kubernetes API."""

    async def merge_patch(self, path: str, patch: JSON) -> JSON: ...

    async def create(self, path: str, obj: JSON) -> JSON: ...


class Leadership(Protocol):
    """Whether this replica may write now (app.operations.leader.LeaderElector)."""

    @property
    def leading(self) -> bool: ...


class StatusReporter:
    """Keeps each ConfigMap's annotation equal to its latest status; records Events on transitions."""

    def __init__(
        self,
        kube: StatusApi,
        lookup: Lookup,
        observer: QueueObserver | None = None,
        leader: Leadership | None = None,
    ) -> None:
        self.kube = kube
        self.lookup = lookup
        self.leader = leader  # None: no election, this replica always writes
        self.queue: WorkQueue[ObjectKey] = WorkQueue("status", observer=observer)
        self._wanted: dict[ObjectKey, tuple[str, str]] = {}  # key -> (status, action)
        # What kopa last wrote on each ConfigMap, and on which version of it ((uid, resourceVersion)): until
        # the store moves past that version, it has not seen kopa's own patch yet.
        self._written: dict[ObjectKey, tuple[tuple[str | None, str | None], str]] = {}
        self._instance = os.environ.get("POD_NAME") or socket.gethostname()
        self._failing: dict[ObjectKey, str] = {}  # why writing each ConfigMap's status last failed

    def report(self, configmap: ObjectKey, errors: list[dict[str, Any]], action: str) -> None:
        """Records the latest status of a ConfigMap; the writer catches up asynchronously."""
        self._wanted[configmap] = (status_value(errors), action)
        self.queue.add(configmap)

    @property
    def writing(self) -> bool:
        return self.leader is None or self.leader.leading

    def resync(self) -> None:
        """This replica just became the writer: every status it knows is written where it differs from what
        the ConfigMap carries. What it wrote as an earlier leader no longer counts (another leader may have
        written since), so the stores' annotations, kept current by the watches, are the reference."""
        self._written.clear()
        for configmap in self._wanted:
            self.queue.add(configmap)

    def forget(self, configmap: ObjectKey) -> None:
        self._wanted.pop(configmap, None)
        self._written.pop(configmap, None)
        self._failing.pop(configmap, None)

    async def run(self) -> None:
        async with self.queue:
            while True:
                await self._next()

    async def _next(self) -> None:
        """Writes the status of the next ConfigMap that needs it; a failure is retried with backoff."""
        key = await self.queue.get()
        try:
            await self._write(key)
        except (KubeUnavailable, KubeApiError) as exc:
            delay = self.queue.add_rate_limited(key)
            # Said once per ConfigMap and reason: a missing RBAC grant fails every retry the same way.
            reason = str(exc)
            level = logging.DEBUG if self._failing.get(key) == reason else logging.WARNING
            self._failing[key] = reason
            log.log(
                level, "writing the status of configmap %s failed (%s); retrying in %.1fs", key, exc, delay
            )
        else:
            if self._failing.pop(key, None) is not None:
                log.info("writing the status of configmap %s works again", key)
            self.queue.forget(key)
        finally:
            self.queue.done(key)

    async def _write(self, key: ObjectKey) -> None:
        wanted = self._wanted.get(key)
        obj = self.lookup(key)
        if wanted is None or obj is None:
            return  # gone or no longer selected: nothing to tell
        value, action = wanted
        meta = obj.get("metadata") or {}
        version = (meta.get("uid"), meta.get("resourceVersion"))
        carried = (meta.get("annotations") or {}).get(STATUS_ANNOTATION)
        written = self._written.get(key)
        if written is not None and written[0][0] == version[0]:
            if written[0] == version:
                carried = written[1]  # the store has not seen kopa's patch yet
            elif carried is not None and written[1] == value:
                # Told already. Another writer's status (a second push-mode sidecar whose OPA took the other
                # module of a conflicting pair) is left alone: rewriting it made two replicas patch each
                # other's status, and record Events, without end. An update that dropped the annotation
                # (`kubectl replace`, a GitOps tool) gets it back.
                return
            current: str | None = written[1]  # the transition kopa's Events tell is from what kopa said
        else:
            current = carried  # a recreated object, or nothing written yet: the object says what it carries
        if carried == value or not self.writing:
            return  # a replica that does not lead writes nothing; resync() catches up when it leads
        ns, name = key
        path = f"/api/v1/namespaces/{quote(ns)}/configmaps/{quote(name)}"
        try:
            try:
                await self.kube.merge_patch(path, {"metadata": {"annotations": {STATUS_ANNOTATION: value}}})
            except KubeApiError as exc:
                if exc.status != 422 or value == OK:
                    raise
                # The object's other annotations leave no room (all of them share 256 KiB, and a ConfigMap
                # applied with `kubectl apply` carries itself in last-applied-configuration): the status in
                # its shortest form; the Event and the log say the rest.
                short = {"metadata": {"annotations": {STATUS_ANNOTATION: _shortest(value)}}}
                await self.kube.merge_patch(path, short)
        except KubeApiError as exc:
            if exc.status == 404:
                return
            raise
        self._written[key] = (version, value)
        if value != OK:
            log.warning("configmap %s/%s: %s failed: %s", ns, name, action, _summary(value))
            await self._event(obj, "Warning", REASON_FAILED, action, _summary(value))
        elif current is not None and current != OK:
            log.info("configmap %s/%s: %s recovered", ns, name, action)
            await self._event(obj, "Normal", REASON_RECOVERED, action, f"{action} succeeded")

    async def _event(self, obj: dict[str, Any], type_: str, reason: str, action: str, note: str) -> None:
        meta = obj.get("metadata") or {}
        ns, name = meta.get("namespace", ""), meta.get("name", "")
        if not self.writing:
            return  # leadership lost during the patch: the next leader sees the annotation, not a change
        event = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"name": f"{name[:200]}.{time.time_ns():x}", "namespace": ns},
            "eventTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "reportingController": REPORTING_CONTROLLER,
            "reportingInstance": self._instance[:128],
            "action": action,
            "reason": reason,
            "type": type_,
            "note": note,
            "regarding": {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "namespace": ns,
                "name": name,
                "uid": meta.get("uid", ""),
                "resourceVersion": meta.get("resourceVersion", ""),
            },
        }
        try:
            await self.kube.create(f"/apis/events.k8s.io/v1/namespaces/{quote(ns)}/events", event)
        except (KubeUnavailable, KubeApiError) as exc:
            # An Event is a courtesy; the annotation already carries the status.
            log.warning("could not record an event on configmap %s/%s: %s", ns, name, exc)
