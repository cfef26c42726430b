"""Automatic replication (--opa-config): replicate exactly the resources the policies in OPA read.

Every tick kopa reads a small fingerprint of what OPA runs: its process, the manifests of its bundles
(`data.system.bundles`: revision and ETag) and the modules kopa itself loaded from ConfigMaps. When it
changes (and, for bundles without a revision, once a minute anyway) kopa reads OPA's modules with their
ASTs and walks them (analysis.py). Reading the policies from OPA rather than downloading the bundles again
means analysing exactly what OPA evaluates, ConfigMap policies included, with no second copy of the bundle
services' credentials.

Each plural read is resolved with discovery, refreshed (at most every DISCOVERY_INTERVAL) while a plural
is unknown, so a CRD installed later is picked up. A plural served by two groups is ambiguous unless a
--replicate/--replicate-cluster entry names it (that entry then replicates it, once). A plural that does
not resolve, an ambiguous one, a reference without a constant plural, a missing entrypoint and a resource
RBAC does not grant are each reported (/readyz, the metric, one log line) and hold nothing else up; none
of them holds readiness either, since with `failurePolicy: Fail` an OPA that never gets ready is an outage.
What does hold readiness: the bundles the configuration names must be active in OPA and analysed, and
each resource found must have loaded, as any replicated resource.

A resource no longer read keeps being replicated for the grace period (a bundle that flaps costs nothing),
then its watch stops and its collection is removed from OPA (kube-mgmt leaves stale data behind).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol

import anyio

from app.kube.client import KubeApiError, KubeUnavailable
from app.kube.resources import GroupVersionResource
from app.opa.client import OpaError, OpaUnavailable
from app.opa.process import OpaProcess
from app.operations.readiness import SourceState
from app.replication.analysis import Analysis, analyse
from app.replication.discovery import Discovery, ResourceInfo, served_resources
from app.replication.running import Replicators

log = logging.getLogger(__name__)

TICK = 1.0  # seconds between fingerprints (one small GET of data.system.bundles)
FULL_READ = 60.0  # seconds between reads of every module, for bundles whose manifest has no revision
DISCOVERY_INTERVAL = 5.0  # at most one discovery refresh this often while a plural is unknown

# What a plural the policies read has come to; the label values of kopa_analysis_resources.
STATES = ("replicating", "given", "unresolved", "ambiguous", "forbidden", "unreferenced")


class PolicySource(Protocol):
    """What the analysis needs of OPA: its modules with their ASTs, and its bundle manifests."""

    async def list_policies(self) -> list[dict[str, Any]]: ...

    async def get_data(self, path: Sequence[str]) -> Any: ...


@dataclass(frozen=True)
class AutoSettings:
    entrypoint: list[str]  # below data, e.g. ["main", "main"]
    prefix: list[str]  # --replicate-path, split
    grace: float  # seconds a resource no longer read stays replicated
    bundles: tuple[str, ...]  # the bundles OPA's configuration activates: waited for
    given: tuple[GroupVersionResource, ...]  # --replicate and --replicate-cluster: they win a plural


@dataclass(frozen=True)
class _Fingerprint:
    epoch: int
    bundles: tuple[tuple[str, str, str], ...]  # (name, revision, etag)
    configmap_policies: frozenset[tuple[str, str]]


@dataclass
class Found:
    """One plural the policies read, and what became of it."""

    state: str
    gvr: GroupVersionResource | None = None  # once resolved
    reason: str = ""

    @property
    def resource(self) -> str:
        return str(self.gvr) if self.gvr is not None else ""

    def describe(self) -> dict[str, str]:
        fields = {"state": self.state, "resource": self.resource, "reason": self.reason}
        return {key: value for key, value in fields.items() if value}


@dataclass
class AutoReplication:
    opa: PolicySource
    kube: Discovery
    process: OpaProcess
    replicators: Replicators
    settings: AutoSettings
    configmap_policies: Callable[[], frozenset[tuple[str, str]]]  # (id, text) kopa loaded into OPA
    _found: dict[str, Found] = field(default_factory=dict)  # plural -> state, as of the last tick
    result: Analysis | None = None
    waiting_for: list[str] = field(default_factory=list)  # bundles not active in OPA yet
    analysed_at: str = ""
    _analysed: _Fingerprint | None = None
    _seen: _Fingerprint | None = None
    _digest: bytes = b""
    _last_read: float = 0.0
    _served: dict[str, list[ResourceInfo]] | None = None
    _discovered_at: float = 0.0
    _started: set[GroupVersionResource] = field(default_factory=set)  # by the analysis, not retired
    _unreferenced: dict[GroupVersionResource, float] = field(default_factory=dict)  # -> since (monotonic)
    _summary: str = ""

    def __post_init__(self) -> None:
        self.state = SourceState("analysis", self.current)

    @property
    def entrypoint(self) -> str:
        return "data." + ".".join(self.settings.entrypoint)

    def current(self) -> bool:
        """Analysed against what OPA runs now: the bundles active, this OPA process, kopa's modules."""
        done = self._analysed
        return (
            done is not None
            and not self.waiting_for
            and done == self._seen
            and done.epoch == self.process.epoch
            and done.configmap_policies == self.configmap_policies()
        )

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except (OpaUnavailable, OpaError, KubeUnavailable, KubeApiError) as exc:
                log.debug("policy analysis postponed: %s", exc)
            await anyio.sleep(TICK)

    async def step(self) -> None:
        """One tick: fingerprint; analyse when it changed; bring the replicated resources in line."""
        self.replicators.prune()
        fingerprint = await self._fingerprint()
        now = time.monotonic()
        analysed = self._analysed
        if fingerprint is not None and (fingerprint != self._seen or now - self._last_read >= FULL_READ):
            policies = await self.opa.list_policies()
            self._last_read = now
            digest = _digest(policies)
            if fingerprint != self._analysed or digest != self._digest:
                roots = {policy_id for policy_id, _ in fingerprint.configmap_policies}
                # Pure CPU (0.1 s for 300 modules of 20 rules here): off the event loop, like the parse.
                entry, prefix = self.settings.entrypoint, self.settings.prefix
                walk = partial(analyse, policies, entrypoint=entry, prefix=prefix, roots=roots)
                self.result = await anyio.to_thread.run_sync(walk)
                self.analysed_at = datetime.now(UTC).isoformat(timespec="seconds")
                self._digest = digest
                log.debug(
                    "policy analysis ran on %d modules (OPA epoch %d): %d rules reached",
                    len(policies),
                    fingerprint.epoch,
                    self.result.rules_visited,
                )
            analysed = fingerprint
        if self.result is not None:
            await self._reconcile(self.result, now)
        # Only now, with every resource found registered, may readiness count the analysis as current.
        self._analysed = analysed
        self._seen = fingerprint or self._seen

    async def _fingerprint(self) -> _Fingerprint | None:
        """What OPA runs, in brief; None while a bundle the configuration names is not active yet."""
        epoch = self.process.epoch
        bundles = await self.opa.get_data(["system", "bundles"]) or {}
        self.waiting_for = [name for name in self.settings.bundles if name not in bundles]
        if self.waiting_for:
            return None
        brief = []
        for name, bundle in sorted(bundles.items()):
            manifest = (bundle or {}).get("manifest") or {}
            brief.append((str(name), str(manifest.get("revision", "")), str((bundle or {}).get("etag", ""))))
        return _Fingerprint(epoch, tuple(brief), self.configmap_policies())

    async def _reconcile(self, result: Analysis, now: float) -> None:
        given = {gvr.resource: gvr for gvr in self.settings.given}
        unknown = [p for p in result.plurals if p not in given and p not in (self._served or {})]
        if self._served is None or (unknown and now - self._discovered_at >= DISCOVERY_INTERVAL):
            self._served = await served_resources(self.kube)
            self._discovered_at = now
        found: dict[str, Found] = {}
        wanted: dict[GroupVersionResource, ResourceInfo] = {}
        for plural in sorted(result.plurals):
            infos = self._served.get(plural, [])
            if plural in given:
                found[plural] = Found("given", given[plural], "replicated as given by --replicate")
            elif not infos:
                reason = f"no resource named {plural} is served (CRD missing?)"
                found[plural] = Found("unresolved", reason=reason)
            elif len(infos) > 1:
                names = " and ".join(str(i.gvr) for i in infos)
                reason = f"{plural} is served by {names}: name one with --replicate or --replicate-cluster"
                found[plural] = Found("ambiguous", reason=reason)
            else:
                wanted[infos[0].gvr] = infos[0]
                found[plural] = Found("replicating", infos[0].gvr)
        for gvr, info in wanted.items():
            self._unreferenced.pop(gvr, None)
            if gvr in self._started or self.replicators.retiring(gvr):
                continue  # running, or its removal is still queued: started on a later tick
            self.replicators.start(gvr, info.namespaced, info, required=False)
            self._started.add(gvr)
        for gvr in sorted(self._started - set(wanted)):
            since = self._unreferenced.setdefault(gvr, now)
            left = self.settings.grace - (now - since)
            if left > 0:
                reason = f"no longer read; removed in {left:.0f}s"
                found[gvr.resource] = Found("unreferenced", gvr, reason)
                continue
            log.info("policies no longer read %s: stopped replicating it and removing it from OPA", gvr)
            self.replicators.retire(gvr)
            self._started.discard(gvr)
            del self._unreferenced[gvr]
        self._found = found
        self._log_changes(result)

    @property
    def found(self) -> dict[str, Found]:
        """Each plural read, as of now: a resource RBAC does not grant shows as forbidden."""
        found = dict(self._found)
        for plural, entry in found.items():
            if entry.state == "replicating" and entry.gvr is not None:
                running = self.replicators.get(entry.gvr)
                forbidden = running.forbidden() if running is not None else None
                if forbidden is not None:
                    found[plural] = Found("forbidden", entry.gvr, forbidden)
        return found

    def _log_changes(self, result: Analysis) -> None:
        """One line when what the analysis found changes (not at every tick)."""
        parts = [f"entrypoint {self.entrypoint}" + ("" if result.entrypoint_found else " not found")]
        by_state: dict[str, list[str]] = {}
        for plural, entry in sorted(self.found.items()):
            by_state.setdefault(entry.state, []).append(entry.resource or plural)
        parts += [f"{state}: {', '.join(names)}" for state, names in sorted(by_state.items())]
        if result.unbounded:
            unbounded = "; ".join(result.unbounded)
            parts.append(f"references without a constant resource (not replicated): {unbounded}")
        summary = "; ".join(parts)
        if summary == self._summary:
            return
        self._summary = summary
        problems = not result.entrypoint_found or result.unbounded or set(by_state) - {"replicating", "given"}
        log.log(logging.WARNING if problems else logging.INFO, "policy analysis: %s", summary)

    def report(self) -> dict[str, Any]:
        """The analysis section of /readyz's body."""
        section: dict[str, Any] = {"entrypoint": self.entrypoint}
        if self.waiting_for:
            section["waitingForBundles"] = list(self.waiting_for)
        if self.result is None:
            waiting = "waiting for the bundles to be active in OPA"
            section["state"] = waiting if self.waiting_for else "not run yet"
            return {"analysis": section}
        section.update(
            entrypointFound=self.result.entrypoint_found,
            analysedAt=self.analysed_at,
            resources={plural: entry.describe() for plural, entry in sorted(self.found.items())},
        )
        if self.result.unbounded:
            section["unbounded"] = list(self.result.unbounded)
        return {"analysis": section}

    def problems(self) -> tuple[bool, int] | None:
        """(entrypoint found, references without a constant plural) for the metrics; None before a run."""
        if self.result is None:
            return None
        return self.result.entrypoint_found, len(self.result.unbounded)

    def counts(self) -> list[tuple[str, str]]:
        """(resource or plural, state) for the metric."""
        return [(entry.resource or plural, entry.state) for plural, entry in sorted(self.found.items())]


def _digest(policies: list[dict[str, Any]]) -> bytes:
    digest = hashlib.sha256()
    for policy in sorted(policies, key=lambda p: str(p.get("id"))):
        digest.update(str(policy.get("id")).encode() + b"\0" + str(policy.get("raw", "")).encode() + b"\0")
    return digest.digest()
