"""Helpers shared by the integration tests: ConfigMaps through the API, OPA's view over its REST API."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubernetes import client

from devstack.kopa import KopaProcess
from devstack.kube import KubeCluster
from devstack.opa import OpaServer
from devstack.processes import ManagedProcess, wait_until

STATUS = "openpolicyagent.org/kube-mgmt-status"
OK = '{"status":"ok"}'
POLICY = {"openpolicyagent.org/policy": "rego"}
DATA = {"openpolicyagent.org/data": "opa"}
TIMEOUT = 30.0


def put_configmap(
    core: client.CoreV1Api, ns: str, name: str, data: dict[str, str], labels: dict[str, str] | None = None
) -> None:
    """Creates the ConfigMap, or replaces its data and labels (keeping other metadata).

    kopa writes its status annotation concurrently, so a replace can meet a newer resourceVersion (409):
    then it reads again and retries, as kubectl does.
    """
    for _ in range(10):
        try:
            existing = core.read_namespaced_config_map(name, ns)
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, labels=labels), data=data)
            core.create_namespaced_config_map(ns, body)
            return
        assert existing.metadata is not None
        existing.data = data
        existing.metadata.labels = labels
        try:
            core.replace_namespaced_config_map(name, ns, existing)
            return
        except client.ApiException as exc:
            if exc.status != 409:
                raise
    raise AssertionError(f"configmap {ns}/{name} kept changing under the test")


def annotations_of(core: client.CoreV1Api, ns: str, name: str) -> dict[str, str]:
    meta = core.read_namespaced_config_map(name, ns).metadata
    return dict(meta.annotations or {}) if meta is not None else {}


def status_of(core: client.CoreV1Api, ns: str, name: str) -> str | None:
    return annotations_of(core, ns, name).get(STATUS)


def wait_status(core: client.CoreV1Api, ns: str, name: str, check: Any = OK) -> str:
    """Waits for the status annotation to equal `check` (a string) or satisfy it (a callable)."""

    def current() -> str | None:
        value = status_of(core, ns, name)
        ok = value is not None and (check(value) if callable(check) else value == check)
        return value if ok else None

    result: str = wait_until(current, timeout=TIMEOUT, what=f"configmap {ns}/{name} status {check}")
    return result


def data(opa: OpaServer, path: str) -> Any:
    """data.<path> as OPA answers it now, or None when undefined."""
    answer = opa.http().get_json(f"/v1/data/{path}")
    return answer.get("result") if isinstance(answer, dict) else None


def wait_data(opa: OpaServer, path: str, expected: Any) -> None:
    wait_until(lambda: data(opa, path) == expected, timeout=TIMEOUT, what=f"data/{path} == {expected!r}")


def policy_ids(opa: OpaServer) -> set[str]:
    return {p["id"] for p in opa.http().get_json("/v1/policies")["result"]}


def wait_policies(opa: OpaServer, expected: set[str], prefix: str) -> None:
    def match() -> bool:
        return {i for i in policy_ids(opa) if i.startswith(prefix)} == expected

    wait_until(match, timeout=TIMEOUT, what=f"policies under {prefix} == {sorted(expected)}")


def error_of(status: str) -> Any:
    doc = json.loads(status)
    assert doc["status"] == "error", status
    return doc["error"]


def opa_writes(opa: OpaServer, handler: str) -> float:
    """How many write requests OPA itself counted for a handler (its own /metrics)."""
    text = opa.http().request("GET", "/metrics")[1]
    total = 0.0
    for line in str(text).splitlines():
        if (
            line.startswith("http_request_duration_seconds_count")
            and f'handler="{handler}"' in line
            and re.search(r'method="(put|patch|delete)"', line, re.IGNORECASE)
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- etcd, behind the API server's back, and kopa's log -------------------------------------------------


def etcd_call(kube: KubeCluster, method: str, body: dict[str, Any]) -> dict[str, Any]:
    """POSTs to etcd's JSON gateway (/v3/kv/<method>) and returns its answer."""
    request = urllib.request.Request(
        f"{kube.etcd_url}/v3/kv/{method}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def configmap_key(namespace: str, name: str) -> str:
    """Where kube-apiserver keeps a ConfigMap in etcd (default prefix /registry)."""
    return f"/registry/configmaps/{namespace}/{name}"


def etcd_count(kube: KubeCluster, key: str) -> int:
    return int(etcd_call(kube, "range", {"key": b64(key), "count_only": True}).get("count", 0))


def etcd_delete(kube: KubeCluster, key: str) -> int:
    """Deletes one key behind the API server's back; returns how many keys etcd deleted."""
    return int(etcd_call(kube, "deleterange", {"key": b64(key)}).get("deleted", 0))


@contextlib.contextmanager
def apiserver_restored(kube: KubeCluster) -> Iterator[None]:
    """Whatever happens inside, the session's API server is running and ready afterwards."""
    try:
        yield
    finally:
        if not kube.apiserver.running:
            kube.start_apiserver()


def log_text(process: ManagedProcess) -> str:
    return process.log_path.read_text(errors="replace")


def wait_log(process: ManagedProcess, needle: str, timeout: float = TIMEOUT) -> None:
    wait_until(lambda: needle in log_text(process), timeout=timeout, what=f"kopa log line {needle!r}")


def secure_args(opa: OpaServer, namespace: str) -> list[str]:
    """kopa's arguments for the production-shape OPA: its token file and its CA."""
    return [
        f"--opa-url={opa.api_url}",
        f"--opa-auth-token-file={opa.token_file}",
        f"--opa-ca-file={opa.ca_file}",
        f"--namespaces={namespace}",
    ]


def start_up_error(kopa: ManagedProcess) -> str:
    """Waits for kopa to stop at start-up (exit 2) and returns the one line it printed about why."""
    assert kopa.wait(timeout=30) == 2
    lines = [line for line in kopa.tail_log(20).splitlines() if line.startswith("kopa: ")]
    assert len(lines) == 1, kopa.tail_log(20)
    return lines[0]


# --- kopa's probe and metrics server ---------------------------------------------------------------------


def get(kopa: KopaProcess, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(kopa.health_url + path, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), exc.read().decode()


def scrape(kopa: KopaProcess) -> dict[str, float]:
    """Metric samples as 'name{labels}' -> value."""
    status, text = get(kopa, "/metrics")
    assert status == 200
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def metric(samples: dict[str, float], metric_name: str, /, **labels: str) -> float:
    """The sum of a metric's samples whose labels include these."""
    total = 0.0
    for sample, value in samples.items():
        named = sample == metric_name or sample.startswith(metric_name + "{")
        if named and all(f'{k}="{v}"' in sample for k, v in labels.items()):
            total += value
    return total


def wait_probe(kopa: KopaProcess, path: str, status: int, timeout: float = 30) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        code, body = get(kopa, path)
        return json.loads(body) if code == status else None

    result: dict[str, Any] = wait_until(check, timeout=timeout, what=f"{path} answering {status}")
    return result


def swap_in(secret_dir: Path, version: str, files: dict[str, bytes]) -> dict[str, Path]:
    """A mounted Secret as the kubelet writes it: each file a link through `..data` to a versioned directory.
    The first call lays it out; each later one (a rotation: all the files, in a new `version`) is one rename
    of the `..data` link. Returns each file's path, as a pod would name it."""
    secret_dir.mkdir(parents=True, exist_ok=True)
    (secret_dir / version).mkdir()
    for name, content in files.items():
        (secret_dir / version / name).write_bytes(content)
    (secret_dir / "..data_tmp").symlink_to(version)
    os.replace(secret_dir / "..data_tmp", secret_dir / "..data")
    for name in files:
        if not (secret_dir / name).is_symlink():
            (secret_dir / name).symlink_to(f"..data/{name}")
    return {name: secret_dir / name for name in files}
