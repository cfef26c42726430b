"""kopa's producers when the API server misbehaves, end to end: real kube-apiserver, etcd and OPA.

- The API server restarts under a running kopa: kopa resumes and sees what changes afterwards.
- A watch expires (410 Gone) across a gap in which an object vanished with no DELETE event (deleted
  straight in etcd while the API server was down): only kopa's relist + diff can find that out.
- ConfigMaps near the 1 MiB limit, from the initial list and as a single watch line far beyond aiohttp's
  128 KiB readline limit.

Why the restart gives 410 Gone: a fresh API server's watch cache starts at etcd's revision of its initial
list and keeps no history before it, so a watch from an older resourceVersion is "too old". The deletion in
etcd is itself a write after the last resourceVersion kopa saw, so the 410 does not depend on anything else
writing to etcd meanwhile.

The tests that stop the session's API server restore it in a `finally`, so the tests after them find it up
and ready.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from devstack.kube import KubeCluster
from devstack.opa import OpaServer
from devstack.processes import ManagedProcess, wait_until
from tests.integration.conftest import KopaFactory
from tests.integration.helpers import (
    DATA,
    OK,
    apiserver_restored,
    configmap_key,
    data,
    etcd_count,
    etcd_delete,
    get,
    log_text,
    put_configmap,
    wait_data,
    wait_log,
    wait_status,
)
from tests.integration.test_replication import service

pytestmark = pytest.mark.integration

# Covers an API server start (seconds to tens of seconds here) plus kopa's reconnect backoff (capped at 30 s).
RESUME_TIMEOUT = 120.0
TIMEOUT = 30.0
DATA_SELECTOR = "openpolicyagent.org/data=opa"
LINE_LIMIT = 128 * 1024  # aiohttp's StreamReader.readline() limit
CONFIGMAP_LIMIT = 1024 * 1024  # the API server's limit on a ConfigMap's data (keys + values)


# --- helpers -----------------------------------------------------------------------------------------------


def describe(namespace: str) -> str:
    """How kopa names the data producer of a namespace in its log lines."""
    return f"configmaps ({DATA_SELECTOR}) in namespace {namespace}"


def expired_line(namespace: str) -> str:
    return f"watch of {describe(namespace)} expired (410 Gone); listing again"


def listed_line(namespace: str) -> str:
    """Logged (debug) once the initial list is in: anything created afterwards arrives by the watch."""
    return f"listed {describe(namespace)}:"


def big_document(size: int) -> dict[str, Any]:
    """A JSON object whose compact serialization is close to (never above) `size` bytes."""
    chunk = "x" * 1000
    entries: dict[str, str] = {}
    length = len(compact({"entries": entries}))
    while True:
        key = f"e{len(entries):05d}"
        cost = len(compact({key: chunk})) - 2 + (1 if entries else 0)  # minus braces, plus a comma
        if length + cost > size:
            break
        entries[key] = chunk
        length += cost
    doc = {"entries": entries}
    assert len(compact(doc)) == length
    return doc


def compact(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))


def restarts_logged(process: ManagedProcess, namespace: str) -> int:
    return log_text(process).count(expired_line(namespace))


# --- API server restart ------------------------------------------------------------------------------------


def test_kopa_resumes_after_an_api_server_restart(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str, kube: KubeCluster
) -> None:
    run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    put_configmap(core_v1, namespace, "before", {"x.json": '{"v": 1}'}, DATA)
    put_configmap(core_v1, namespace, "kept", {"k.json": '{"kept": true}'}, DATA)
    wait_data(opa, f"{namespace}/before", {"x.json": {"v": 1}})
    assert wait_status(core_v1, namespace, "before") == OK
    assert wait_status(core_v1, namespace, "kept") == OK

    with apiserver_restored(kube):
        kube.restart_apiserver()

    # After the restart: one ConfigMap updated, one created. kopa has to be watching again to see them.
    put_configmap(core_v1, namespace, "before", {"x.json": '{"v": 2}'}, DATA)
    put_configmap(core_v1, namespace, "after", {"y.json": '{"new": true}'}, DATA)
    expected = {
        "before": {"x.json": {"v": 2}},
        "after": {"y.json": {"new": True}},
        "kept": {"k.json": {"kept": True}},
    }
    wait_until(
        lambda: data(opa, namespace) == expected,
        timeout=RESUME_TIMEOUT,
        what=f"data/{namespace} == {expected}",
    )
    # Status annotations are written again, so the status writer came through the outage as well.
    assert wait_status(core_v1, namespace, "after") == OK
    assert wait_status(core_v1, namespace, "before") == OK
    # Whether kopa resumed its watch or had to list again (410) depends on whether etcd changed between
    # the last resourceVersion kopa saw and the new watch cache's start; both are correct. The test below
    # makes the 410 certain.


def test_replication_starts_once_an_api_server_down_at_start_up_answers(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str, kube: KubeCluster
) -> None:
    """The resources to replicate cannot be looked up while the API server is down: kopa starts anyway
    (no exit, no traceback: run_kopa fails the test on either) and replicates once it answers."""
    with apiserver_restored(kube):
        kube.stop_apiserver()
        kopa = run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}", "--replicate=v1/services")
        wait_log(kopa, "could not look up the resources to replicate")
        kube.start_apiserver()
    core_v1.create_namespaced_service(namespace, service("after-outage"))
    wait_until(
        lambda: "after-outage" in (data(opa, f"kubernetes/services/{namespace}") or {}),
        timeout=RESUME_TIMEOUT,
        what="the Service in data.kubernetes.services",
    )


# --- watch expiry with a deletion nobody announced ---------------------------------------------------------


def test_expired_watch_relists_and_removes_what_was_deleted_during_the_gap(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str, kube: KubeCluster
) -> None:
    kopa = run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    put_configmap(core_v1, namespace, "a", {"a.json": '{"a": 1}'}, DATA)
    put_configmap(core_v1, namespace, "b", {"b.json": '{"b": 2}'}, DATA)
    both = {"a": {"a.json": {"a": 1}}, "b": {"b.json": {"b": 2}}}
    wait_data(opa, namespace, both)
    # Status writes done too, so no write of kopa's own is pending when the API server goes away.
    assert wait_status(core_v1, namespace, "a") == OK
    assert wait_status(core_v1, namespace, "b") == OK
    assert restarts_logged(kopa, namespace) == 0

    b_key = configmap_key(namespace, "b")
    assert etcd_count(kube, b_key) == 1, f"{b_key} should be in etcd"
    with apiserver_restored(kube):
        kube.stop_apiserver()
        # The only write during the gap: b disappears, and no API server is there to announce it.
        assert etcd_delete(kube, b_key) == 1
        kube.start_apiserver()

    with pytest.raises(client.ApiException) as gone:
        core_v1.read_namespaced_config_map("b", namespace)
    assert gone.value.status == 404
    # kopa's watch cannot resume (410 Gone), it lists again and its diff finds b missing.
    wait_log(kopa, expired_line(namespace), timeout=RESUME_TIMEOUT)
    wait_data(opa, namespace, {"a": {"a.json": {"a": 1}}})
    answer = opa.http().get_json(f"/v1/data/{namespace}")
    assert answer["result"] == {"a": {"a.json": {"a": 1}}}

    # And kopa keeps watching after the relist.
    put_configmap(core_v1, namespace, "c", {"c.json": '{"c": 3}'}, DATA)
    wait_data(opa, namespace, {"a": {"a.json": {"a": 1}}, "c": {"c.json": {"c": 3}}})
    assert wait_status(core_v1, namespace, "c") == OK
    assert wait_status(core_v1, namespace, "a") == OK


def test_a_watch_rbac_refuses_lists_again_and_keeps_opa_current(
    *,
    run_kopa: KopaFactory,
    opa: OpaServer,
    core_v1: client.CoreV1Api,
    namespace: str,
    k8s: client.ApiClient,
    kubeconfig_for: Callable[..., Path],
) -> None:
    """A ClusterRole with get and list but not watch, a common slip. kopa loaded the first list, became
    ready, and kept it for good while every watch was refused; kube-mgmt lists again."""
    name = f"kopa-nowatch-{namespace}"
    rbac = client.RbacAuthorizationV1Api(k8s)
    role: Any = {
        "metadata": {"name": name},
        "rules": [{"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list"]}],
    }
    binding: Any = {
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "namespace": "kopa-system", "name": "restricted"}],
    }
    rbac.create_cluster_role(role)
    rbac.create_cluster_role_binding(binding)
    try:
        core_v1.create_namespaced_service(namespace, service("old"))
        kopa = run_kopa(
            f"--opa-url={opa.api_url}",
            "--enable-policies=false",
            "--enable-data=false",
            "--replicate=v1/services",
            kubeconfig=kubeconfig_for("kopa-system:restricted"),
        )
        wait_until(lambda: data(opa, f"kubernetes/services/{namespace}/old"), timeout=TIMEOUT, what="listed")
        wait_log(kopa, "cannot watch resource")
        core_v1.create_namespaced_service(namespace, service("new"))
        core_v1.delete_namespaced_service("old", namespace)
        wait_until(
            lambda: set(data(opa, f"kubernetes/services/{namespace}") or {}) == {"new"},
            timeout=RESUME_TIMEOUT,
            what="OPA holding the services as the API server lists them",
        )
    finally:
        rbac.delete_cluster_role_binding(name)
        rbac.delete_cluster_role(name)


def test_readiness_says_why_a_first_list_keeps_failing(
    *,
    run_kopa: KopaFactory,
    opa: OpaServer,
    namespace: str,
    kube: KubeCluster,
    kubeconfig_for: Callable[..., Path],
) -> None:
    """An identity RBAC grants nothing: /readyz names the API server's refusal for each source, in its own
    words, not just that the first list is not complete; and never the token."""
    identity = "kopa-system:restricted"
    kopa = run_kopa(
        f"--opa-url={opa.api_url}",
        f"--namespaces={namespace}",
        "--replicate=v1/services",
        kubeconfig=kubeconfig_for(identity),
    )

    def refused() -> dict[str, Any] | None:
        code, body = get(kopa, "/readyz")
        sources = json.loads(body)["sources"]
        reasons = [source.get("reason", "") for source in sources.values()]
        done = len(sources) >= 2 and all("403" in reason for reason in reasons)
        return {"code": code, "body": body, "sources": sources} if done else None

    found = wait_until(refused, timeout=TIMEOUT, what="/readyz naming the refusals")
    assert found["code"] == 503
    services = found["sources"]["replicate:v1/services"]["reason"]
    assert 'cannot list resource "services"' in services, services
    configmaps = [s["reason"] for name, s in found["sources"].items() if name != "replicate:v1/services"]
    assert all(f'in the namespace "{namespace}"' in reason for reason in configmaps), configmaps
    assert kube.user_token(identity) not in found["body"]


# --- ConfigMaps near the 1 MiB limit -----------------------------------------------------------------------


def big_configmap_text() -> tuple[dict[str, Any], str]:
    """A document for one data key, with the ConfigMap's data ~64 KiB short of the 1 MiB limit."""
    doc = big_document(CONFIGMAP_LIMIT - 64 * 1024)
    text = compact(doc)
    assert 900 * 1024 < len(text) < CONFIGMAP_LIMIT - len("big.json")
    return doc, text


def assert_watch_never_broke(kopa: ManagedProcess, namespace: str) -> None:
    """The document must have come by the watch itself. A line kopa could not read would end the watch
    ("failed" and retried, or "crashed" and restarted by the supervisor, which lists again and so loads
    the document anyway): kopa logs "watch of <collection> ..." only when a watch breaks or expires."""
    broken = [line for line in log_text(kopa).splitlines() if f"watch of {describe(namespace)}" in line]
    assert not broken, "\n".join(broken)


def test_configmap_near_1mib_from_the_initial_list(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    doc, text = big_configmap_text()
    put_configmap(core_v1, namespace, "big", {"big.json": text}, DATA)
    kopa = run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    wait_log(kopa, f"{listed_line(namespace)} 1 objects")
    assert wait_status(core_v1, namespace, "big") == OK
    assert data(opa, f"{namespace}/big/big.json") == doc
    assert_watch_never_broke(kopa, namespace)


def test_configmap_near_1mib_from_the_watch(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    kopa = run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    # Once the initial (empty) list is in, whatever is created next can only arrive by the watch.
    wait_log(kopa, f"{listed_line(namespace)} 0 objects")
    doc, text = big_configmap_text()
    put_configmap(core_v1, namespace, "big", {"big.json": text}, DATA)
    cm = core_v1.read_namespaced_config_map("big", namespace)
    event_line = compact({"type": "ADDED", "object": core_v1.api_client.sanitize_for_serialization(cm)})
    assert len(event_line) > 7 * LINE_LIMIT, "the watch event must be far beyond aiohttp's readline limit"

    assert wait_status(core_v1, namespace, "big") == OK
    assert data(opa, f"{namespace}/big/big.json") == doc
    # A change to the big ConfigMap arrives as another long line (MODIFIED).
    doc["entries"]["e00000"] = "changed"
    put_configmap(core_v1, namespace, "big", {"big.json": compact(doc)}, DATA)
    wait_until(
        lambda: data(opa, f"{namespace}/big/big.json/entries/e00000") == "changed",
        timeout=TIMEOUT,
        what="the changed entry in OPA",
    )
    assert data(opa, f"{namespace}/big/big.json") == doc
    assert_watch_never_broke(kopa, namespace)
