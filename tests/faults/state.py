"""OPA's state read over its REST API, the cluster's from a fresh list, and the differences between them.

Never compared with kopa's own store: that would test kopa against itself. For one test's namespace N and
the workload's selector S, "equal" means:

- policies: the ids OPA lists under `N/` are exactly `N/<configmap>/<key>` for every key of every
  ConfigMap in N labelled `openpolicyagent.org/policy=rego` (and not `openpolicyagent.org/data=opa`: data
  wins), and each id's `raw` text in OPA is byte-equal to the key's value;
- data: `data.N`, read as {configmap: {key: document}}, equals the parsed JSON of every key of every
  ConfigMap in N labelled `openpolicyagent.org/data=opa` (OPA's "undefined" counts as {});
- replicated objects: `data.kubernetes.configmaps`, read as {namespace: {name: object}}, equals every
  ConfigMap matching S in any namespace, taken from the list with `kind` and `apiVersion` filled in and
  `metadata.managedFields` dropped, as kopa documents; `metadata.resourceVersion` is ignored on both sides,
  because kopa skips writes whose only change is the resourceVersion; the same for every other resource
  the caller names in `replicated` (e.g. SERVICES, when kopa also replicates v1/services with S);
- status: every ConfigMap kopa selects says `{"status":"ok"}` (all the workload's input is valid).

Values are compared with ==, after JSON decoding on both sides.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from devstack.opa import OpaServer
from devstack.processes import wait_until
from tests.faults.workload import KubeRest, configmaps_path

STATUS = "openpolicyagent.org/kube-mgmt-status"
OK = '{"status":"ok"}'
POLICY_LABEL, POLICY_VALUE = "openpolicyagent.org/policy", "rego"
DATA_LABEL, DATA_VALUE = "openpolicyagent.org/data", "opa"
REPLICATE_PATH = "kubernetes"  # kopa's default --replicate-path


@dataclass(frozen=True)
class Replicated:
    """A core (v1) namespaced resource kopa replicates with the workload's selector."""

    plural: str
    kind: str


CONFIGMAPS = Replicated("configmaps", "ConfigMap")
SERVICES = Replicated("services", "Service")


@dataclass(frozen=True)
class State:
    policies: dict[str, str]  # policy id -> raw Rego
    data: dict[str, Any]  # "<configmap>/<key>" -> document
    replicas: dict[str, Any]  # "<namespace>/<name>" (others: "<plural>/<ns>/<name>") -> object, sans version
    statuses: dict[str, str | None]  # "<configmap>" -> its status annotation (the cluster's side only)

    def size(self) -> int:
        return len(self.policies) + len(self.data) + len(self.replicas)


def _without_version(obj: dict[str, Any]) -> dict[str, Any]:
    meta = dict(obj.get("metadata") or {})
    meta.pop("resourceVersion", None)
    return {**obj, "metadata": meta}


def _replica_key(resource: Replicated, namespace: str, name: str) -> str:
    return f"{namespace}/{name}" if resource == CONFIGMAPS else f"{resource.plural}/{namespace}/{name}"


def cluster_state(
    api: KubeRest, namespace: str, selector: str, replicated: tuple[Replicated, ...] = (CONFIGMAPS,)
) -> State:
    """What OPA should hold, from fresh lists from the API server."""
    policies: dict[str, str] = {}
    data: dict[str, Any] = {}
    statuses: dict[str, str | None] = {}
    for cm in api.get(configmaps_path(namespace))["items"]:
        meta = cm["metadata"]
        labels = meta.get("labels") or {}
        name = meta["name"]
        texts: dict[str, str] = cm.get("data") or {}
        is_data = labels.get(DATA_LABEL) == DATA_VALUE
        is_policy = not is_data and labels.get(POLICY_LABEL) == POLICY_VALUE
        if is_data:
            data.update({f"{name}/{key}": json.loads(text) for key, text in texts.items()})
        elif is_policy:
            policies.update({f"{namespace}/{name}/{key}": text for key, text in texts.items()})
        if is_data or is_policy:
            statuses[name] = (meta.get("annotations") or {}).get(STATUS)
    replicas: dict[str, Any] = {}
    for resource in replicated:
        for item in api.get(f"/api/v1/{resource.plural}?labelSelector={quote(selector)}")["items"]:
            meta = {k: v for k, v in item["metadata"].items() if k != "managedFields"}
            obj = {**item, "kind": resource.kind, "apiVersion": "v1", "metadata": meta}
            replicas[_replica_key(resource, meta["namespace"], meta["name"])] = _without_version(obj)
    return State(policies, data, replicas, statuses)


def opa_state(opa: OpaServer, namespace: str, replicated: tuple[Replicated, ...] = (CONFIGMAPS,)) -> State:
    """What OPA holds, read directly from OPA (never through a fault proxy)."""
    http = opa.http()
    policies = {
        p["id"]: p["raw"]
        for p in http.get_json("/v1/policies")["result"]
        if str(p["id"]).startswith(f"{namespace}/")
    }
    tree = http.get_json(f"/v1/data/{quote(namespace)}").get("result") or {}
    data = {f"{cm}/{key}": doc for cm, docs in tree.items() for key, doc in docs.items()}
    replicas: dict[str, Any] = {}
    for resource in replicated:
        collection = http.get_json(f"/v1/data/{REPLICATE_PATH}/{resource.plural}").get("result") or {}
        replicas.update(
            (_replica_key(resource, ns, name), _without_version(obj))
            for ns, objs in collection.items()
            for name, obj in objs.items()
        )
    return State(policies, data, replicas, {})


def _diff(what: str, expected: dict[str, Any], observed: dict[str, Any]) -> list[str]:
    found = []
    for key in sorted(expected.keys() | observed.keys()):
        if key not in observed:
            found.append(f"{what} {key}: missing in OPA")
        elif key not in expected:
            found.append(f"{what} {key}: in OPA but not in the cluster")
        elif expected[key] != observed[key]:
            cluster, opa = _from_first_difference(expected[key], observed[key])
            found.append(f"{what} {key}: differs (cluster {cluster!r:.150} != OPA {opa!r:.150})")
    return found


def _from_first_difference(a: Any, b: Any) -> tuple[Any, Any]:
    """Two texts from a little before where they first differ (a long module may differ at its end)."""
    if not (isinstance(a, str) and isinstance(b, str)):
        return a, b
    at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    start = max(0, at - 30)
    return ("..." if start else "") + a[start:], ("..." if start else "") + b[start:]


def differences(expected: State, observed: State) -> list[str]:
    """One line per object that is not equal; empty when OPA matches the cluster."""
    return (
        _diff("policy", expected.policies, observed.policies)
        + _diff("data", expected.data, observed.data)
        + _diff("replicated", expected.replicas, observed.replicas)
        + [f"status of {cm}: {value}" for cm, value in sorted(expected.statuses.items()) if value != OK]
    )


@dataclass(frozen=True)
class Convergence:
    seconds: float  # from the call until OPA matched the cluster
    compared: State  # the cluster's state it matched


def converge(
    api: KubeRest,
    opa: OpaServer,
    namespace: str,
    selector: str,
    *,
    timeout: float,
    replicated: tuple[Replicated, ...] = (CONFIGMAPS,),
) -> Convergence:
    """Waits until OPA equals a fresh list; fails with the differences of the last comparison."""
    started = time.monotonic()
    last: list[str] = []
    matched: list[State] = []

    def equal() -> bool:
        nonlocal last
        expected = cluster_state(api, namespace, selector, replicated)
        last = differences(expected, opa_state(opa, namespace, replicated))
        if not last:
            matched.append(expected)
        return not last

    try:
        wait_until(equal, timeout=timeout, what="OPA equal to a fresh list from the API server")
    except TimeoutError as exc:
        shown = "\n".join(last[:30]) + (f"\n... and {len(last) - 30} more" if len(last) > 30 else "")
        raise AssertionError(
            f"{len(last)} differences between OPA and the cluster ({exc}):\n{shown}"
        ) from None
    return Convergence(time.monotonic() - started, matched[-1])
