"""Checks the resources to replicate against the API server's discovery, before anything starts.

A resource named with the wrong scope, or two resources that would land on the same plural, stop start-up
with a clear message. A resource whose API group is not served yet (a CRD not installed) is not fatal: it
is reported as missing and looked up again until it appears. Nor is an API server that cannot be asked at
start-up (down, or refusing kopa's credentials): each replicator then looks its resource up until the API
server answers, and a wrong scope found then stops that resource with the same message.
"""

from __future__ import annotations

import difflib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from app.kube.client import JSON, KubeApiError
from app.kube.resources import GroupVersionResource

log = logging.getLogger(__name__)


class Discovery(Protocol):
    """What discovery needs of the Kubernetes API."""

    async def get(self, path: str) -> JSON: ...


class DiscoveryError(Exception):
    """The replication settings cannot work with this cluster; str() is one line for the user."""


@dataclass(frozen=True)
class ResourceInfo:
    gvr: GroupVersionResource
    namespaced: bool
    kind: str


async def lookup(client: Discovery, gvr: GroupVersionResource) -> ResourceInfo | None:
    """The resource as the API server serves it, or None when its group/version or name is not served."""
    return _find(gvr, await _resources(client, gvr))


def _find(gvr: GroupVersionResource, entries: list[dict[str, Any]]) -> ResourceInfo | None:
    """The resource among its group/version's discovery entries."""
    for entry in entries:
        if entry.get("name") == gvr.resource:
            return _info(gvr, entry)
    return None


async def _resources(client: Discovery, gv: GroupVersionResource) -> list[dict[str, Any]]:
    """The resources of a group/version; none when it is not served (not installed, or an aggregated
    API that is not available right now)."""
    try:
        listing = await client.get(gv.api_path)
    except KubeApiError as exc:
        if exc.status in (404, 503):
            log.debug("discovery of %s: %s", gv.api_version, exc)
            return []
        raise
    return list(listing.get("resources") or [])


def _info(gvr: GroupVersionResource, entry: dict[str, Any]) -> ResourceInfo:
    return ResourceInfo(gvr, bool(entry.get("namespaced")), str(entry.get("kind", "")))


def check_plurals(
    namespaced: Sequence[GroupVersionResource], cluster: Sequence[GroupVersionResource]
) -> None:
    """kube-mgmt's layout has no group in the path: two resources with one plural would collide."""
    counts = Counter(g.resource for g in (*namespaced, *cluster))
    clashes = sorted(name for name, n in counts.items() if n > 1)
    if clashes:
        same = [str(g) for g in (*namespaced, *cluster) if g.resource == clashes[0]]
        raise DiscoveryError(
            f"--replicate: {' and '.join(same)} would both be replicated at <replicate-path>/{clashes[0]}; "
            "replicate only one of them"
        )


# Groups the API server itself serves, whose resources no CRD adds to (a CRD's group has a dot, and the
# *.k8s.io ones need an approval): a resource missing there is a typo, not a CRD to wait for.
BUILT_IN_GROUPS = frozenset(
    {
        f"{name}.k8s.io"
        for name in (
            "admissionregistration",
            "apiextensions",
            "apiregistration",
            "authentication",
            "authorization",
            "certificates",
            "coordination",
            "discovery",
            "events",
            "flowcontrol.apiserver",
            "internal.apiserver",
            "networking",
            "node",
            "rbac.authorization",
            "resource",
            "scheduling",
            "storage",
            "storagemigration",
        )
    }
)


def _built_in(group: str) -> bool:
    return "." not in group or group in BUILT_IN_GROUPS


async def lookup_checked(
    client: Discovery, gvr: GroupVersionResource, want_namespaced: bool
) -> ResourceInfo | None:
    """lookup() with the checks a resource named in the settings gets. DiscoveryError when it is served
    with the other scope than its flag says, when it cannot be listed and watched (v1/bindings), or when
    a built-in group/version that is served has no such resource: a typo, since no CRD adds resources
    there (elsewhere a missing resource may be a CRD not installed yet: None)."""
    given = "--replicate" if want_namespaced else "--replicate-cluster"
    entries = await _resources(client, gvr)
    info = _find(gvr, entries)
    if info is not None:
        if info.namespaced != want_namespaced:
            scope, flag = ("namespaced", "--replicate")
            if not info.namespaced:
                scope, flag = ("cluster-scoped", "--replicate-cluster")
            raise DiscoveryError(f"{given}={gvr}: {gvr.resource} is {scope}; use {flag}={gvr}")
        verbs = {str(v) for e in entries if e.get("name") == gvr.resource for v in e.get("verbs") or []}
        if verbs and not {"list", "watch"} <= verbs:
            raise DiscoveryError(
                f"{given}={gvr}: the API server cannot list and watch {gvr.resource} "
                f"(it allows {', '.join(sorted(verbs))}); there is nothing to replicate"
            )
        return info
    if not _built_in(gvr.group) or (gvr.group and not entries):
        return None  # not served (yet): a CRD not installed, an aggregated API away
    names = [str(e.get("name")) for e in entries if "/" not in str(e.get("name", ""))]
    close = difflib.get_close_matches(gvr.resource, names, n=1)
    where = f"{gvr.group}/{gvr.version}" if gvr.group else f"the core group {gvr.version}"
    hint = f" (did you mean {gvr.api_version}/{close[0]}?)" if close else ""
    raise DiscoveryError(f"{given}={gvr}: {where} has no resource {gvr.resource}{hint}")


def warn_missing(gvr: GroupVersionResource) -> None:
    log.warning("%s is not served by the API server (is its CRD installed?); replicating it once it is", gvr)


async def discover(
    client: Discovery, namespaced: Sequence[GroupVersionResource], cluster: Sequence[GroupVersionResource]
) -> dict[GroupVersionResource, ResourceInfo | None]:
    """Looks every resource up; raises DiscoveryError for a wrong scope, returns None for missing ones.
    Raises KubeError when the API server cannot be asked (the caller looks them up later instead)."""
    check_plurals(namespaced, cluster)
    found: dict[GroupVersionResource, ResourceInfo | None] = {}
    for gvr, want_namespaced in [*((g, True) for g in namespaced), *((g, False) for g in cluster)]:
        info = await lookup_checked(client, gvr, want_namespaced)
        if info is None:
            warn_missing(gvr)
        found[gvr] = info
    return found


async def served_resources(client: Discovery) -> dict[str, list[ResourceInfo]]:
    """Every resource the API server serves, by plural, at its group's preferred version (as kubectl and
    kube-mgmt resolve a plural). One plural can be served by several groups (`events`: core and
    events.k8s.io): the caller decides. Subresources (`pods/log`) are left out."""
    versions = [("", "v1")]
    groups = await client.get("/apis")
    for group in groups.get("groups") or []:
        preferred = (group.get("preferredVersion") or {}).get("version")
        if group.get("name") and preferred:
            versions.append((str(group["name"]), str(preferred)))
    found: dict[str, list[ResourceInfo]] = {}
    for group_name, version in versions:
        for entry in await _resources(client, GroupVersionResource(group_name, version, "")):
            name = str(entry.get("name") or "")
            if name and "/" not in name:
                info = _info(GroupVersionResource(group_name, version, name), entry)
                found.setdefault(name, []).append(info)
    return found
