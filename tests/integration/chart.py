"""kopa's Helm chart for its tests: devstack/chart.py (rendering it with the real helm, and running its pod
on this machine with `LocalPod`), plus what only the tests need: a Helm that skips (or under CI fails) the
test when helm is not built, and the metric names a dashboard uses and an exposition has.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from devstack import chart
from devstack.chart import (
    CHART,
    IMAGE_VALUES,
    HelmError,
    LocalPod,
    Obj,
    Rendered,
    container,
    opa_image_tag,
    parse_quantity,
    rbac_objects,
)
from tests.conftest import require_binaries

__all__ = [
    "CHART",
    "CLUSTER_SCOPED",
    "IMAGE_VALUES",
    "Helm",
    "HelmError",
    "LocalPod",
    "Rendered",
    "container",
    "dashboard_metric_names",
    "exposed",
    "metric_families",
    "mounted_file",
    "opa_image_tag",
    "parse_quantity",
    "rbac_objects",
]

# Kinds that live outside any namespace.
CLUSTER_SCOPED = {
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
    "CustomResourceDefinition",
    "Namespace",
}


class Helm(chart.Helm):
    """devstack.chart.Helm, once helm is built: the test is skipped (under CI, failed) if it is not."""

    def __init__(self, home: Path, kubeconfig: Path | None = None) -> None:
        require_binaries("helm")
        super().__init__(home, kubeconfig)


# --- files in the pod ---------------------------------------------------------------------------------------


def mounted_file(rendered: Rendered, container_name: str, path: str) -> tuple[Obj, str, bool]:
    """Where a file a container reads comes from: (the pod's volume, the file's key in the volume's Secret
    or ConfigMap, whether the mount is read-only), through the container's mount whose path is the longest
    prefix of `path`."""
    mounts = [
        mount
        for mount in rendered.container(container_name).get("volumeMounts", [])
        if path.startswith(mount["mountPath"].rstrip("/") + "/")
    ]
    if not mounts:
        raise AssertionError(f"container {container_name} mounts nothing at {path}")
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in rendered.pod_spec["volumes"] if v["name"] == mount["name"]]
    key = path.removeprefix(mount["mountPath"].rstrip("/") + "/")
    source = volume.get("secret") or volume.get("configMap") or {}
    for item in source.get("items") or []:
        if item["path"] == key:
            key = item["key"]
    return volume, key, bool(mount.get("readOnly"))


# --- metrics -----------------------------------------------------------------------------------------------

_METRIC = re.compile(r"\b(?:kopa|workqueue)_[a-z0-9_]+\b")


def dashboard_metric_names(dashboard: Mapping[str, Any]) -> set[str]:
    """Every kopa metric name (kopa_*, workqueue_*) a Grafana dashboard's queries and variables use."""
    names: set[str] = set()
    for text in _strings(dashboard):
        names.update(_METRIC.findall(text))
    return names


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for key, value in node.items():
            if key in ("expr", "query", "definition") or isinstance(value, Mapping | list):
                yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def metric_families(exposition: str) -> dict[str, str]:
    """{family name: type} from the `# TYPE` lines of a Prometheus text exposition."""
    families = {}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            families[name] = kind.strip()
    return families


def exposed(exposition: str, name: str) -> bool:
    """Whether a metric name a query uses is in a Prometheus text exposition: as a family or a sample, or
    as a sample a family of that type will have (a counter's _total, a histogram's _bucket, _sum and _count),
    which counts even before the first sample of a labelled metric exists."""
    families = metric_families(exposition)
    lines = exposition.splitlines()
    samples = {line.split("{", 1)[0].split(" ", 1)[0] for line in lines if line[:1].isalpha()}
    if name in families or name in samples:
        return True
    for suffix, kinds in (
        ("_total", {"counter"}),
        ("_bucket", {"histogram"}),
        ("_sum", {"histogram", "summary"}),
        ("_count", {"histogram", "summary"}),
        ("_created", {"counter", "histogram", "summary"}),
    ):
        if name.endswith(suffix) and families.get(name.removesuffix(suffix)) in kinds:
            return True
    return False
