"""Replication of Kubernetes resources into OPA, against the real API server and OPA.

Layout as kube-mgmt: data.<path>.<plural>.<namespace>.<name> and data.<path>.<plural>.<name>, objects with
kind and apiVersion. OPA's write counts come from OPA's own /metrics, never from kopa.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from kubernetes import client

from devstack.kube import KubeCluster
from devstack.opa import OpaServer
from devstack.processes import wait_until
from tests.integration.conftest import KopaFactory
from tests.integration.helpers import (
    apiserver_restored,
    configmap_key,
    data,
    etcd_count,
    etcd_delete,
    get,
    log_text,
    opa_writes,
    start_up_error,
    wait_log,
    wait_probe,
)

pytestmark = pytest.mark.integration

TIMEOUT = 60.0


def service(name: str, labels: dict[str, str] | None = None) -> client.V1Service:
    return client.V1Service(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1ServiceSpec(ports=[client.V1ServicePort(port=80)]),
    )


def wait_for(opa: OpaServer, path: str, check: Any, what: str) -> Any:
    """Waits until data.<path> satisfies check; returns it."""

    def current() -> tuple[Any] | None:
        value = data(opa, path)
        return (value,) if check(value) else None  # a tuple, so that a falsy value still counts

    return wait_until(current, timeout=TIMEOUT, what=what)[0]


@pytest.fixture
def other_namespace(core_v1: client.CoreV1Api, namespace: str) -> Iterator[str]:
    """A second namespace for the test, cleaned up like the first."""
    name = f"{namespace[:55]}-two"
    core_v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        core_v1.delete_collection_namespaced_service(name)
        core_v1.delete_collection_namespaced_config_map(name)
        core_v1.delete_namespace(name)


def test_namespaced_services_with_an_ignored_namespace(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str, other_namespace: str
) -> None:
    """kube-mgmt's replicate scenario, plus add, update (labels), delete."""
    core_v1.create_namespaced_service(namespace, service("web", {"tier": "front"}))
    core_v1.create_namespaced_service(other_namespace, service("hidden"))
    run_kopa(
        f"--opa-url={opa.api_url}",
        f"--namespaces={namespace}",
        "--replicate=v1/services",
        f"--replicate-ignore-namespaces={other_namespace}",
    )
    web = wait_for(opa, f"kubernetes/services/{namespace}/web", bool, "service web replicated")
    assert web["kind"] == "Service" and web["apiVersion"] == "v1"
    assert web["metadata"]["labels"] == {"tier": "front"}
    assert "managedFields" not in web["metadata"]
    assert data(opa, f"kubernetes/services/{other_namespace}") is None

    core_v1.create_namespaced_service(namespace, service("api"))
    wait_for(opa, f"kubernetes/services/{namespace}/api", bool, "service api added")
    core_v1.create_namespaced_service(other_namespace, service("still-hidden"))
    core_v1.patch_namespaced_service("web", namespace, {"metadata": {"labels": {"tier": "back"}}})
    wait_for(
        opa,
        f"kubernetes/services/{namespace}/web/metadata/labels",
        lambda labels: labels == {"tier": "back"},
        "label change replicated",
    )
    core_v1.delete_namespaced_service("api", namespace)
    wait_for(opa, f"kubernetes/services/{namespace}", lambda ns: ns is not None and "api" not in ns, "delete")
    assert data(opa, f"kubernetes/services/{other_namespace}") is None


def test_cluster_scoped_namespaces_at_a_custom_path(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    run_kopa(
        f"--opa-url={opa.api_url}",
        f"--namespaces={namespace}",
        "--replicate-cluster=v1/namespaces",
        "--replicate-path=cluster/state",
    )
    ns = wait_for(opa, f"cluster/state/namespaces/{namespace}", bool, "namespace replicated")
    assert ns["kind"] == "Namespace" and ns["apiVersion"] == "v1"
    assert ns["metadata"]["name"] == namespace
    core_v1.patch_namespace(namespace, {"metadata": {"labels": {"kopa-test": "relabelled"}}})
    wait_for(
        opa,
        f"cluster/state/namespaces/{namespace}/metadata/labels/kopa-test",
        lambda v: v == "relabelled",
        "namespace label replicated",
    )
    assert data(opa, "kubernetes") is None, "--replicate-path moves everything"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--replicate=v1/namespaces"],
            "namespaces is cluster-scoped; use --replicate-cluster=v1/namespaces",
        ),
        (["--replicate-cluster=v1/services"], "services is namespaced; use --replicate=v1/services"),
        (["--replicate=v1/events", "--replicate=events.k8s.io/v1/events"], "would both be replicated"),
        (["--replicate=v1/service"], "the core group v1 has no resource service (did you mean v1/services?)"),
        (
            ["--replicate=apps/v1/deploymentz"],
            "apps/v1 has no resource deploymentz (did you mean apps/v1/deployments?)",
        ),
        (["--replicate=v1/bindings"], "the API server cannot list and watch bindings (it allows create)"),
        (
            ["--replicate-cluster=v1/componentstatuses"],
            "cannot list and watch componentstatuses (it allows get, list)",
        ),
        (["--replicate=v1/pods/status"], "pods/status is a subresource; replicate v1/pods instead"),
    ],
)
def test_wrong_scope_or_a_shared_plural_stops_start_up(
    run_kopa: KopaFactory, opa: OpaServer, namespace: str, args: list[str], expected: str
) -> None:
    kopa = run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}", *args, expect_exit=2)
    assert expected in start_up_error(kopa)


def crd(group: str, plural: str, kind: str) -> Any:
    """A CRD as the API takes it (a plain dict: the client serializes it as it is)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                    },
                }
            ],
        },
    }


def create_once_established(
    k8s: client.ApiClient, group: str, namespace: str, plural: str, body: Any
) -> None:
    """Creates a custom object as soon as its new CRD is established (404 until then)."""
    custom = client.CustomObjectsApi(k8s)

    def create() -> bool:
        try:
            custom.create_namespaced_custom_object(group, "v1", namespace, plural, body)
        except client.ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    wait_until(create, timeout=TIMEOUT, what=f"{plural} CRD established")


@pytest.fixture
def crd_group(k8s: client.ApiClient) -> Iterator[str]:
    """A unique API group for this test's CRDs; the CRDs are deleted afterwards (they are cluster-wide)."""
    group = f"t{secrets.token_hex(4)}.kopa.test"
    yield group
    ext = client.ApiextensionsV1Api(k8s)
    for item in ext.list_custom_resource_definition().items:
        if item.spec.group == group and item.metadata and item.metadata.name:
            ext.delete_custom_resource_definition(item.metadata.name)


def test_a_crd_created_after_start_is_replicated_once_it_appears(
    run_kopa: KopaFactory, opa: OpaServer, k8s: client.ApiClient, namespace: str, crd_group: str
) -> None:
    custom = client.CustomObjectsApi(k8s)
    ext = client.ApiextensionsV1Api(k8s)
    ext.create_custom_resource_definition(crd(crd_group, "widgets", "Widget"))
    run_kopa(
        f"--opa-url={opa.api_url}",
        f"--namespaces={namespace}",
        f"--replicate={crd_group}/v1/widgets",
        f"--replicate={crd_group}/v1/gadgets",  # its CRD does not exist yet
    )
    # The missing one counts as an empty, loaded collection.
    wait_for(opa, "kubernetes/gadgets", lambda v: v == {}, "missing CRD loaded as empty")
    body = {
        "apiVersion": f"{crd_group}/v1",
        "kind": "Widget",
        "metadata": {"name": "w1"},
        "spec": {"size": 3},
    }
    custom.create_namespaced_custom_object(crd_group, "v1", namespace, "widgets", body)
    widget = wait_for(opa, f"kubernetes/widgets/{namespace}/w1", bool, "custom resource replicated")
    assert widget["kind"] == "Widget" and widget["apiVersion"] == f"{crd_group}/v1"
    assert widget["spec"] == {"size": 3}

    ext.create_custom_resource_definition(crd(crd_group, "gadgets", "Gadget"))
    gadget = {"apiVersion": f"{crd_group}/v1", "kind": "Gadget", "metadata": {"name": "g1"}}
    create_once_established(k8s, crd_group, namespace, "gadgets", gadget)
    found = wait_for(opa, f"kubernetes/gadgets/{namespace}/g1", bool, "CRD created later replicated")
    assert found["kind"] == "Gadget"


def test_a_crd_installed_later_with_the_other_scope_is_refused_not_replicated(
    run_kopa: KopaFactory, opa: OpaServer, k8s: client.ApiClient, namespace: str, crd_group: str
) -> None:
    """--replicate-cluster for a CRD that turns out namespaced: start-up would refuse it, and so does the
    lookup made when it appears (objects of one name in two namespaces overwrote each other in OPA)."""
    kopa = run_kopa(
        f"--opa-url={opa.api_url}", f"--namespaces={namespace}", f"--replicate-cluster={crd_group}/v1/gizmos"
    )
    wait_for(opa, "kubernetes/gizmos", lambda v: v == {}, "missing CRD loaded as empty")
    client.ApiextensionsV1Api(k8s).create_custom_resource_definition(crd(crd_group, "gizmos", "Gizmo"))
    body = {"apiVersion": f"{crd_group}/v1", "kind": "Gizmo", "metadata": {"name": "same"}}
    create_once_established(k8s, crd_group, namespace, "gizmos", body)
    wait_log(kopa, f"gizmos is namespaced; use --replicate={crd_group}/v1/gizmos")
    assert data(opa, "kubernetes/gizmos") == {}


def test_selector_and_field_list(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    def configmap(name: str, labels: dict[str, str]) -> client.V1ConfigMap:
        meta = client.V1ObjectMeta(name=name, labels=labels, annotations={"big": "x" * 100})
        return client.V1ConfigMap(metadata=meta, data={"k": "v"})

    core_v1.create_namespaced_config_map(namespace, configmap("chosen", {"test": namespace, "pick": "yes"}))
    core_v1.create_namespaced_config_map(namespace, configmap("other", {"test": namespace, "pick": "no"}))
    run_kopa(
        f"--opa-url={opa.api_url}",
        f"--namespaces={namespace}",
        "--replicate=v1/configmaps",
        f"--replicate-selector=v1/configmaps=test={namespace},pick in (yes)",
        "--replicate-fields=v1/configmaps=metadata.labels,data",
    )
    chosen = wait_for(opa, f"kubernetes/configmaps/{namespace}/chosen", bool, "selected configmap")
    assert chosen == {
        "kind": "ConfigMap",
        "apiVersion": "v1",
        "metadata": {"name": "chosen", "namespace": namespace, "labels": {"test": namespace, "pick": "yes"}},
        "data": {"k": "v"},
    }
    assert set(data(opa, f"kubernetes/configmaps/{namespace}")) == {"chosen"}
    # A label change that leaves the selection removes the object; one that enters it adds it.
    core_v1.patch_namespaced_config_map("chosen", namespace, {"metadata": {"labels": {"pick": "no"}}})
    core_v1.patch_namespaced_config_map("other", namespace, {"metadata": {"labels": {"pick": "yes"}}})
    wait_for(
        opa,
        f"kubernetes/configmaps/{namespace}",
        lambda ns: ns is not None and set(ns) == {"other"},
        "selection follows labels",
    )


def _create_many(core_v1: client.CoreV1Api, namespace: str, count: int, labels: dict[str, str]) -> None:
    payload = "x" * 1800  # about 2 KB per object, as in the benchmarks

    def create(i: int) -> None:
        body = client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=f"cm-{i:05d}", labels=labels),
            data={"payload": payload, "i": str(i)},
        )
        core_v1.create_namespaced_config_map(namespace, body)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(create, range(count)))


def test_thousands_of_objects_load_in_one_write_and_bursts_are_batched(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    count = 3000
    labels = {"bulk": namespace}
    _create_many(core_v1, namespace, count, labels)
    data_writes = opa_writes(opa, "v1/data")
    run_kopa(
        f"--opa-url={opa.api_url}",
        f"--namespaces={namespace}",
        "--replicate=v1/configmaps",
        f"--replicate-selector=v1/configmaps=bulk={namespace}",
    )
    wait_for(opa, f"kubernetes/configmaps/{namespace}", lambda ns: ns is not None and len(ns) == count, "all")
    wait_for(opa, "system/kopa/ready", lambda v: v is True, "readiness marker")
    # The whole collection went in one PUT; the others are the readiness marker, and the DELETE of a marker
    # a predecessor could have left (before the first batch).
    assert opa_writes(opa, "v1/data") - data_writes == 3

    # A burst: 200 objects updated 5 times each, as fast as the API server takes it.
    before = opa_writes(opa, "v1/data")
    names = [f"cm-{i:05d}" for i in range(200)]

    def update(name: str) -> None:
        for round_ in range(5):
            core_v1.patch_namespaced_config_map(name, namespace, {"data": {"round": str(round_)}})

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(update, names))
    wait_for(
        opa,
        f"kubernetes/configmaps/{namespace}",
        lambda ns: ns is not None and all(ns[n]["data"].get("round") == "4" for n in names),
        "burst replicated",
    )
    writes = opa_writes(opa, "v1/data") - before
    # Group commit: the updates that arrive while a write is in flight share the next write (here 400 to
    # 450 writes when measured; one per update without batching, as kube-mgmt does).
    assert writes <= 700, f"{writes} OPA writes for 1000 updates: coalescing and batching should cut them"


def test_watch_expiry_removes_objects_deleted_during_the_gap(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, kube: KubeCluster, namespace: str
) -> None:
    for name in ("keep", "lose"):
        core_v1.create_namespaced_config_map(
            namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, labels={"gap": namespace}))
        )
    kopa = run_kopa(
        f"--opa-url={opa.api_url}",
        f"--namespaces={namespace}",
        "--replicate=v1/configmaps",
        f"--replicate-selector=v1/configmaps=gap={namespace}",
    )
    wait_for(opa, f"kubernetes/configmaps/{namespace}", lambda ns: ns and set(ns) == {"keep", "lose"}, "both")
    with apiserver_restored(kube):
        kube.stop_apiserver()
        assert etcd_delete(kube, configmap_key(namespace, "lose")) == 1
        assert etcd_count(kube, configmap_key(namespace, "lose")) == 0
        kube.start_apiserver()
    wait_for(opa, f"kubernetes/configmaps/{namespace}", lambda ns: ns and set(ns) == {"keep"}, "relisted")
    wait_log(kopa, "expired (410 Gone); listing again", timeout=TIMEOUT)


def test_a_failing_collection_backs_off_and_never_blocks_the_others(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """kube-mgmt computes a backoff and never applies it: a tight loop while the write fails."""
    # A policy owns data.kubernetes.services, so OPA refuses to write the replicated collection there.
    opa.http().put("/v1/policies/squatter", 'package kubernetes\n\nservices := {"taken": true}\n')
    core_v1.create_namespaced_service(namespace, service("web"))
    kopa = run_kopa(
        f"--opa-url={opa.api_url}",
        f"--namespaces={namespace}",
        "--replicate=v1/services",
        "--replicate-cluster=v1/namespaces",
    )
    wait_for(opa, f"kubernetes/namespaces/{namespace}", bool, "the other collection loads")
    wait_log(kopa, "loading kubernetes/services into OPA failed")
    attempts = opa_writes(opa, "v1/data")
    wait_until(lambda: opa_writes(opa, "v1/data") >= attempts + 3, timeout=30, what="retries go on")
    started = time.monotonic()
    first = opa_writes(opa, "v1/data")
    wait_until(lambda: time.monotonic() - started > 3, timeout=10, what="three seconds of retries")
    assert opa_writes(opa, "v1/data") - first <= 10, "retries must back off, not spin"
    # The policy goes: the next retry succeeds.
    opa.http().delete("/v1/policies/squatter")
    wait_for(opa, f"kubernetes/services/{namespace}/web", bool, "services replicated after the conflict")


def test_a_put_opa_answers_404_is_a_failure_not_a_load(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """A value that is not an object at the replicate path (a leftover): OPA answers the collection's PUT
    404 resource_conflict. kopa took it for loaded, became ready, and OPA held no object."""
    opa.http().put("/v1/data/kubernetes", '"left-over"')
    core_v1.create_namespaced_service(namespace, service("web"))
    kopa = run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}", "--replicate=v1/services")
    wait_log(kopa, "loading kubernetes/services into OPA failed")
    assert "loaded kubernetes/services into OPA" not in log_text(kopa)
    assert get(kopa, "/readyz")[0] == 503
    opa.http().delete("/v1/data/kubernetes")
    wait_for(opa, f"kubernetes/services/{namespace}/web", bool, "services replicated once the path is free")
    wait_probe(kopa, "/readyz", 200)


def test_updates_that_change_nothing_write_nothing(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """A new field manager applying the same values changes only managedFields and resourceVersion."""
    labels = {"noop": namespace}
    meta = client.V1ObjectMeta(name="same", labels=labels)
    core_v1.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=meta, data={"k": "v"}))
    run_kopa(
        f"--opa-url={opa.api_url}",
        f"--namespaces={namespace}",
        "--replicate=v1/configmaps",
        f"--replicate-selector=v1/configmaps=noop={namespace}",
    )
    before_rv = wait_for(opa, f"kubernetes/configmaps/{namespace}/same", bool, "replicated")["metadata"]
    wait_for(opa, "system/kopa/ready", lambda v: v is True, "ready")
    writes = opa_writes(opa, "v1/data")
    apply = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "same", "labels": labels}}
    apply["data"] = {"k": "v"}
    after = core_v1.patch_namespaced_config_map(
        "same", namespace, apply, field_manager="someone-else", _content_type="application/apply-patch+yaml"
    )
    assert after.metadata and after.metadata.resource_version != before_rv["resourceVersion"], "no update"
    # A change that does matter, made after the no-op one, proves the no-op one has been through kopa.
    core_v1.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="marker", labels=labels))
    )
    wait_for(opa, f"kubernetes/configmaps/{namespace}/marker", bool, "marker replicated")
    assert opa_writes(opa, "v1/data") == writes + 1, "only the marker may have been written"
