"""The objects the benchmarks replicate: ConfigMaps of about 2 KB each, in namespaces of 1,000.

Namespace bench-00 holds the first 1,000 (the N = 1,000 collection); bench-01 .. bench-09 bring it to
10,000. The churn runs over the first objects of the last namespace. Policies for the propagation and
refill runs live in their own namespace, which replication ignores, so the replicated collection is
exactly N objects.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from bench.common import JSON

PER_NAMESPACE = 1000
POLICY_NAMESPACE = "bench-policies"
RULES_NAMESPACE = "bench-rules"  # the policy-load phase's modules, which only its own kopa loads
BUNDLE_NAMESPACE = "bench-bundle"  # the bundle phase's data ConfigMap, which only its own kopas load
MODULES_NAMESPACE = "bench-modules"  # the bundle phase's policy modules, likewise
# Everything replication skips: the API server's own namespaces, `default`, and the policy ConfigMaps.
IGNORED_NAMESPACES = (
    "default",
    "kube-node-lease",
    "kube-public",
    "kube-system",
    POLICY_NAMESPACE,
    RULES_NAMESPACE,
    BUNDLE_NAMESPACE,
    MODULES_NAMESPACE,
)
FIELD_SELECTOR = ",".join(f"metadata.namespace!={ns}" for ns in IGNORED_NAMESPACES)
REPLICATE_PATH = ["kubernetes", "configmaps"]
# Size of the settings text: with metadata the API server adds, the replicated object is about 2 KB.
FILLER_BYTES = 1560


POLICY_LABEL = ("openpolicyagent.org/policy", "rego")
DATA_LABEL = ("openpolicyagent.org/data", "opa")


def labelled_configmap(namespace: str, name: str, label: tuple[str, str], data: dict[str, str]) -> JSON:
    """A ConfigMap kopa loads: labelled with POLICY_LABEL (its keys are modules) or DATA_LABEL (JSON)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": dict([label])},
        "data": data,
    }


def namespace_of(index: int) -> str:
    return f"bench-{index // PER_NAMESPACE:02d}"


def name_of(index: int) -> str:
    return f"cm-{index:05d}"


def _filler(index: int) -> str:
    """Deterministic YAML-ish text that differs per object (so nothing compresses or dedupes)."""
    lines: list[str] = []
    seed = hashlib.sha256(str(index).encode()).hexdigest()
    n = 0
    while sum(len(line) + 1 for line in lines) < FILLER_BYTES:
        lines.append(f"key{n:03d}: {seed[(n * 7) % 40 : (n * 7) % 40 + 24]}-{n * index % 9973}")
        n += 1
    return "\n".join(lines)[:FILLER_BYTES]


def configmap(index: int) -> JSON:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name_of(index),
            "namespace": namespace_of(index),
            "labels": {"app.kubernetes.io/name": "bench", "team": f"team-{index % 16}"},
        },
        "data": {"owner": f"user-{index % 97}", "seq": "0", "settings.yaml": _filler(index)},
    }


def path_of(obj: JSON) -> str:
    return f"/api/v1/namespaces/{obj['metadata']['namespace']}/configmaps"


def replicated(obj: JSON) -> JSON:
    """The object as kopa replicates it (kube-mgmt's layout): kind and apiVersion set, no managedFields."""
    obj["kind"] = "ConfigMap"
    obj["apiVersion"] = "v1"
    obj.setdefault("metadata", {}).pop("managedFields", None)
    return obj


def tree(items: list[JSON]) -> dict[str, dict[str, Any]]:
    """namespace -> name -> replicated object, as data.kubernetes.configmaps holds it."""
    out: dict[str, dict[str, Any]] = {}
    for obj in items:
        meta = replicated(obj)["metadata"]
        out.setdefault(meta["namespace"], {})[meta["name"]] = obj
    return out


def json_size(items: list[JSON]) -> dict[str, int]:
    """Bytes of the replicated objects as compact JSON: per object summed, and the whole collection."""
    whole = tree(items)
    per_object = sum(len(orjson.dumps(obj)) for objs in whole.values() for obj in objs.values())
    return {"objects_bytes": per_object, "collection_bytes": len(orjson.dumps(whole))}


COUNT_QUERY = "x := sum([count(objs) | objs := data.kubernetes.configmaps[_]])"
