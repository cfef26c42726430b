"""A seeded stream of ConfigMap changes that runs in a thread while the tests inject faults.

Everything the workload creates carries the label `kopa.test/fault=<namespace>`, which kopa replicates
(`--replicate=v1/configmaps` with that selector), so one stream exercises all three of kopa's outputs:
Rego policies, JSON data and a replicated collection. The changes cover every path of kopa's sync: content
updates, keys added and removed, ConfigMaps deleted and recreated, the kopa label removed and put back,
and a ConfigMap switched between policy and data. A workload made with `services=N` also keeps N Services
(a second replicated collection, `--replicate=v1/services`), and `step(change)` applies a change of a kind
given by the caller, including those of EXTRA_CHANGES, which the random stream never draws.

The workload talks to the API server with plain HTTP calls of its own (no client library state to share
with the test's thread) and rides out API server outages: a call that fails is tried again until it
succeeds or the workload is stopped. What matters at the end is never the workload's idea of the state but
a fresh list from the API server.
"""

from __future__ import annotations

import json
import random
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

from devstack.kube import KubeCluster
from devstack.processes import wait_until

FAULT_LABEL = "kopa.test/fault"
POLICY = {"openpolicyagent.org/policy": "rego"}
DATA = {"openpolicyagent.org/data": "opa"}
# Kinds of change and how often each is drawn.
CHANGES: dict[str, int] = {
    "update policy": 4,
    "add or remove a policy key": 1,
    "update data": 3,
    "add or remove a data key": 1,
    "update replicated-only": 2,
    "delete or recreate": 1,
    "remove or restore the kopa label": 1,
    "switch between policy and data": 1,
}
# Drawn only when asked for by name (Workload.step(change)); the fault scenarios' streams stay as they were.
EXTRA_CHANGES = (
    "add or remove the policy label on data (data wins)",
    "update a service",
)
CALL_TIMEOUT = 10.0
RETRY_PAUSE = 0.2  # between attempts while the API server is down
GIVE_UP_AFTER = 180.0  # one change that cannot be applied for this long fails the test


class KubeCallError(Exception):
    """The API server answered with an unexpected status."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {str(body)[:300]}")
        self.status = status


class KubeRest:
    """Minimal JSON calls to the API server as admin: raw objects, exactly as the API server sends them."""

    def __init__(self, kube: KubeCluster) -> None:
        self.base = kube.url
        self.token = kube.admin_token
        self.context = ssl.create_default_context(cafile=str(kube.ca_file))

    def call(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = ()) -> tuple[int, Any]:
        """(status, decoded JSON); raises KubeCallError unless 2xx or in `ok`, OSError when unreachable."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=CALL_TIMEOUT, context=self.context) as response:
                status, raw = int(response.status), response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                status, raw = int(exc.code), exc.read()
        decoded = json.loads(raw) if raw else None
        if not (200 <= status < 300 or status in ok):
            raise KubeCallError(method, path, status, decoded)
        return status, decoded

    def get(self, path: str) -> Any:
        return self.call("GET", path)[1]


def configmaps_path(namespace: str, name: str = "") -> str:
    return objects_path("configmaps", namespace, name)


def objects_path(plural: str, namespace: str, name: str = "") -> str:
    """The path of a core (v1) namespaced collection, or of one object in it."""
    path = f"/api/v1/namespaces/{quote(namespace)}/{plural}"
    return f"{path}/{quote(name)}" if name else path


def put_configmap(
    api: KubeRest, namespace: str, name: str, labels: dict[str, str], data: dict[str, str]
) -> None:
    """Creates the ConfigMap or replaces its labels and data, keeping everything else (kopa's annotation)."""
    put_object(api, "configmaps", namespace, name, labels=labels, fields={"data": data})


def put_object(
    api: KubeRest, plural: str, namespace: str, name: str, *, labels: dict[str, str], fields: dict[str, Any]
) -> None:
    """Creates the object or replaces its labels and top-level `fields`, keeping everything else.

    A 409 (kopa wrote its annotation meanwhile, or a create whose answer was lost) means: read and retry.
    """
    for _ in range(20):
        status, current = api.call("GET", objects_path(plural, namespace, name), ok=(404,))
        if status == 404:
            body = {"metadata": {"name": name, "namespace": namespace, "labels": labels}, **fields}
            if api.call("POST", objects_path(plural, namespace), body, ok=(409,))[0] != 409:
                return
            continue
        current["metadata"]["labels"] = labels
        current.update(fields)
        if api.call("PUT", objects_path(plural, namespace, name), current, ok=(409,))[0] != 409:
            return
    raise AssertionError(f"{plural} {namespace}/{name} kept changing under the workload")


def delete_configmap(api: KubeRest, namespace: str, name: str) -> None:
    delete_object(api, "configmaps", namespace, name)


def delete_object(api: KubeRest, plural: str, namespace: str, name: str) -> None:
    api.call("DELETE", objects_path(plural, namespace, name), ok=(404,))


@dataclass(frozen=True)
class Member:
    """What one ConfigMap of the workload should be."""

    kind: str  # "policy", "data", "plain" (replicated only) or "service" (replicated, a Service)
    n: int = 0  # bumped by every content change
    extra: bool = False  # a second key
    labelled: bool = True  # carries kopa's label for its kind
    exists: bool = True
    both: bool = False  # as data, carries the policy label too (data wins)


class Workload:
    """`size` ConfigMaps of each kind, `services` Services, and a core that never changes; changes drawn
    from Random(seed)."""

    def __init__(
        self,
        kube: KubeCluster,
        namespace: str,
        *,
        seed: int,
        rate: float = 20.0,
        size: int = 5,
        services: int = 0,
    ) -> None:
        self.api = KubeRest(kube)
        self.namespace = namespace
        self.tag = "f" + namespace.replace("-", "")  # a Rego identifier unique to the test
        self.rate = rate
        self.rng = random.Random(seed)
        self.members: dict[str, Member] = {}
        for i in range(size):
            self.members[f"pol-{i}"] = Member("policy")
            self.members[f"dat-{i}"] = Member("data")
            self.members[f"plain-{i}"] = Member("plain")
            self.members[f"mix-{i}"] = Member("policy" if i % 2 else "data")
        for i in range(services):
            self.members[f"svc-{i}"] = Member("service")
        self.core = {"core-lib": Member("policy"), "core-data": Member("data"), "core-plain": Member("plain")}
        self.changes: Counter[str] = Counter()  # applied changes by kind
        self.retries = 0  # calls that failed (API server down) and were tried again
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    @property
    def selector(self) -> str:
        """The label selector kopa replicates, and that a fresh list uses to compare."""
        return f"{FAULT_LABEL}={self.namespace}"

    @property
    def applied(self) -> int:
        return sum(self.changes.values())

    # what each member looks like

    def labels(self, member: Member) -> dict[str, str]:
        labels = {FAULT_LABEL: self.namespace}
        if member.labelled and member.kind in ("policy", "data"):
            labels.update(POLICY if member.kind == "policy" else DATA)
            if member.kind == "data" and member.both:
                labels.update(POLICY)
        return labels

    def content(self, name: str, member: Member) -> dict[str, Any]:
        n = member.n
        if name == "core-lib":
            return {"lib.rego": f"package {self.tag}.lib\n\ntwice(x) := x * 2\n"}
        if name == "core-data":
            return {"core.json": json.dumps({"core": True, "items": list(range(10))})}
        package = f"{self.tag}.{name.replace('-', '')}"
        if member.kind == "policy":
            module = f"package {package}\n\nimport data.{self.tag}.lib\n\nv := {n}\n\nw := lib.twice(v)\n"
            texts = {"m.rego": module}
            if member.extra:
                texts["x.rego"] = f"package {package}.x\n\nz := {n}\n"
            return texts
        if member.kind == "data":
            docs = {"d.json": json.dumps({"n": n, "name": name, "list": list(range(n % 7))})}
            if member.extra:
                docs["e.json"] = json.dumps({"extra": n})
            return docs
        if member.kind == "service":
            return {"ports": [{"name": "p", "port": 1000 + n % 1000, "targetPort": 8000 + n % 7}]}
        return {"value": str(n), "text": "x" * (n % 50)}

    def core_policy_ids(self) -> set[str]:
        return {f"{self.namespace}/core-lib/lib.rego"}

    # applying

    def write(self, name: str, member: Member) -> None:
        plural, field = ("services", "spec") if member.kind == "service" else ("configmaps", "data")
        if member.exists:
            fields = {field: self.content(name, member)}
            put_object(self.api, plural, self.namespace, name, labels=self.labels(member), fields=fields)
        else:
            delete_object(self.api, plural, self.namespace, name)

    def setup(self) -> None:
        """Creates the core and every member (from the test's thread, before kopa starts)."""
        for name, member in {**self.core, **self.members}.items():
            self.write(name, member)

    def draw(self, change: str | None = None) -> tuple[str, str, Member]:
        """The next change (of the kind given, or drawn): (kind of change, object name, what it becomes)."""
        if change is None:
            kinds, weights = zip(*CHANGES.items(), strict=True)
            change = self.rng.choices(kinds, weights)[0]
        elif change not in CHANGES and change not in EXTRA_CHANGES:
            raise ValueError(f"unknown kind of change: {change!r}")
        wanted = {
            "update policy": "policy",
            "add or remove a policy key": "policy",
            "update data": "data",
            "add or remove a data key": "data",
            "update replicated-only": "plain",
            "add or remove the policy label on data (data wins)": "data",
            "update a service": "service",
        }.get(change)
        names = sorted(n for n, m in self.members.items() if wanted is None or m.kind == wanted)
        if change == "switch between policy and data":
            names = sorted(n for n in self.members if n.startswith("mix-"))
        name = self.rng.choice(names)
        member = self.members[name]
        bumped = replace(member, n=member.n + 1, exists=True)
        if change.startswith("add or remove"):
            bumped = replace(bumped, extra=not member.extra)
        elif change == "delete or recreate":
            bumped = replace(member, exists=not member.exists)
        elif change == "remove or restore the kopa label":
            bumped = replace(bumped, labelled=not member.labelled)
        elif change == "switch between policy and data":
            bumped = replace(bumped, kind="data" if member.kind == "policy" else "policy")
        elif change == "add or remove the policy label on data (data wins)":
            bumped = replace(bumped, both=not member.both)
        return change, name, bumped

    def step(self, change: str | None = None) -> str:
        """Applies one change (of the kind given, or drawn), riding out API server outages; says which."""
        change, name, member = self.draw(change)
        deadline = time.monotonic() + GIVE_UP_AFTER
        while True:
            try:
                self.write(name, member)
                break
            except (OSError, KubeCallError) as exc:
                if isinstance(exc, KubeCallError) and exc.status < 500 and exc.status != 429:
                    raise
                self.retries += 1
                if self._stop.is_set():
                    return f"{change}: {name} (abandoned)"  # the fresh list at the end decides what counts
                if time.monotonic() > deadline:
                    raise
                self._stop.wait(RETRY_PAUSE)
        self.members[name] = member
        self.changes[change] += 1
        return f"{change}: {name} -> {self.describe(member)}"

    @staticmethod
    def describe(member: Member) -> str:
        if not member.exists:
            return "deleted"
        labels = "" if member.labelled else ", unlabelled"
        return f"{member.kind}{'+policy label' if member.both else ''} n={member.n}{labels}" + (
            ", 2 keys" if member.extra else ""
        )

    # the thread

    def start(self, max_changes: int = 5000) -> None:
        def run() -> None:
            try:
                while not self._stop.is_set() and self.applied < max_changes:
                    self.step()
                    self._stop.wait(1 / self.rate)  # the workload's pace, not a wait for any state
            except BaseException as exc:
                self._failure = exc

        self._thread = threading.Thread(target=run, name="workload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the stream and re-raises whatever failed in it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=CALL_TIMEOUT * 3)
            if self._thread.is_alive():
                raise AssertionError("the workload thread did not stop")
        if self._failure is not None:
            raise AssertionError(f"the workload failed: {self._failure!r}") from self._failure

    def wait_for_changes(self, count: int, timeout: float = 60.0) -> None:
        """Waits until `count` more changes have been applied (the stream goes on meanwhile)."""
        target = self.applied + count

        wait_until(
            lambda: self._failure is not None or self.applied >= target,
            timeout=timeout,
            what=f"{count} more workload changes applied",
        )
        if self._failure is not None:
            raise AssertionError(f"the workload failed: {self._failure!r}") from self._failure
