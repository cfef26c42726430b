"""The chart's pod, run on this machine (devstack/chart.py's LocalPod does a kubelet's part): the
init container's script, OPA with the chart's arguments and authz policy, and kopa with the chart's
arguments, as the chart's ServiceAccount holding only the chart's RBAC.

The ServiceAccount is the static-token identity system:serviceaccount:kopa-system:kopa: the chart is
rendered into namespace kopa-system with serviceAccount.name=kopa, so its RoleBindings and
ClusterRoleBindings name exactly that identity, and only its RBAC objects are created (the Roles in the
test's namespace; ClusterRoles only where the values call for them, deleted afterwards).
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from devstack import goyaml
from devstack.demo import run_kubectl
from devstack.kube import KOPA_USER, KubeCluster, api_client
from devstack.opa import OpaHttp, OpaServer
from devstack.processes import HOST, ManagedProcess, free_port, http_status, wait_until
from tests.conftest import require_binaries
from tests.integration.chart import (
    CHART,
    Helm,
    LocalPod,
    Rendered,
    dashboard_metric_names,
    exposed,
    rbac_objects,
)
from tests.integration.conftest import KopaFactory

pytestmark = pytest.mark.integration

TIMEOUT = 30.0
STATUS = "openpolicyagent.org/kube-mgmt-status"
OK = '{"status":"ok"}'
POLICY_LABEL = {"openpolicyagent.org/policy": "rego"}
HELLO = 'package kubernetes.example\n\ngreeting := "Hello, Kubernetes!"\n'
BROKEN = "package broken\n\nthis is not rego\n"

# The webhook's decision at OPA's default path (POST /): data.system.main.
ADMISSION_POLICY = """package system

main := {
	"apiVersion": "admission.k8s.io/v1",
	"kind": "AdmissionReview",
	"response": {"uid": input.request.uid, "allowed": true},
}
"""
ADMISSION_REVIEW = {
    "apiVersion": "admission.k8s.io/v1",
    "kind": "AdmissionReview",
    "request": {"uid": "0f6a-uid", "operation": "CREATE", "object": {"kind": "Pod"}},
}


@pytest.fixture
def helm(tmp_path: Path) -> Helm:
    return Helm(tmp_path / "helm")


def start_opa(pod: LocalPod) -> ManagedProcess:
    """OPA as the chart runs it, once the init container has filled its bootstrap directory."""
    pod.run_init()
    process = pod.opa_process().start()
    url, ca = pod.opa_url(), pod.ca_file()
    process.wait_ready(lambda: http_status(f"{url}/health", ca_file=ca)[0] == 200, timeout=30, what="healthy")
    return process


def opa_client(pod: LocalPod, token: str | None) -> OpaHttp:
    return OpaHttp(pod.opa_url(), ca_file=pod.ca_file(), token=token)


# --- the authz policy in a real OPA ------------------------------------------------------------------------


@pytest.mark.parametrize("token_source", ["generated", "existing-secret"])
def test_authz_policy_locks_opa_but_lets_the_webhook_and_probes_in(
    helm: Helm, tmp_path: Path, token_source: str
) -> None:
    values: dict[str, Any] = {"prometheus": {"enabled": True}}
    secrets_given: dict[str, dict[str, str]] = {}
    if token_source == "existing-secret":
        values["authz"] = {"mgmtToken": {"secretName": "opa-token", "secretKey": "token"}}
        secrets_given["opa-token"] = {"token": "s3cr3t-from-a-Secret\nsecond line is ignored\n"}
    pod = LocalPod(helm.template(values), tmp_path / "pod", secrets=secrets_given)
    opa = start_opa(pod)
    try:
        token = pod.token()
        if token_source == "existing-secret":
            assert token == "s3cr3t-from-a-Secret"
        else:
            assert len(token) == 32
            assert int(token, 16) >= 0
        anonymous = opa_client(pod, None)
        admin = opa_client(pod, token)
        stranger = opa_client(pod, "not-the-token")

        # Anonymous writes and reads of the API are refused, and so is a wrong token.
        assert anonymous.request("PUT", "/v1/policies/evil", "package evil\n\nx := 1\n")[0] == 401
        assert anonymous.request("PUT", "/v1/data/x", {"a": 1})[0] == 401
        assert anonymous.request("GET", "/v1/data")[0] == 401
        assert anonymous.request("GET", "/v1/policies")[0] == 401
        assert anonymous.request("POST", "/v1/data/system/main", {"input": {}})[0] == 401
        assert stranger.request("PUT", "/v1/policies/evil", "package evil\n\nx := 1\n")[0] == 401

        # The token may do everything.
        assert admin.request("PUT", "/v1/policies/admission", ADMISSION_POLICY)[0] == 200
        ids = {p["id"].rsplit("/", 1)[-1] for p in admin.get_json("/v1/policies")["result"]}
        assert ids == {"admission", "authz.rego", "kopa-health.rego"}

        # The webhook's decision (POST /, OPA's default decision data.system.main) needs no token.
        status, answer = anonymous.request("POST", "/", ADMISSION_REVIEW)
        assert status == 200, answer
        assert answer["response"] == {"uid": "0f6a-uid", "allowed": True}

        # Probes and Prometheus need no token either.
        assert anonymous.request("GET", "/health")[0] == 200
        assert anonymous.request("GET", "/health/live")[0] == 200
        assert anonymous.request("GET", "/metrics")[0] == 200
        diag = pod.port(8182)
        assert http_status(f"http://{HOST}:{diag}/metrics")[0] == 200

        # Readiness follows kopa's marker, which only a token holder can write.
        assert anonymous.request("GET", "/health/ready")[0] != 200
        assert anonymous.request("PUT", "/v1/data/system/kopa", {"ready": True})[0] == 401
        assert anonymous.request("GET", "/health/ready")[0] != 200
        assert admin.request("PUT", "/v1/data/system/kopa", {"ready": True})[0] == 204
        assert anonymous.request("GET", "/health/ready")[0] == 200
        assert admin.request("PUT", "/v1/data/system/kopa", {"ready": False})[0] == 204
        assert anonymous.request("GET", "/health/ready")[0] != 200
    finally:
        opa.stop()


def test_authz_policy_follows_the_webhook_path_and_keeps_metrics_private(helm: Helm, tmp_path: Path) -> None:
    values = {"admissionController": {"path": "/v0/data/kubernetes/admission/main"}}
    pod = LocalPod(helm.template(values), tmp_path / "pod")
    opa = start_opa(pod)
    try:
        anonymous = opa_client(pod, None)
        admin = opa_client(pod, pod.token())
        rule = 'package kubernetes.admission\n\nmain := {"allowed": input.request.uid != ""}\n'
        assert admin.request("PUT", "/v1/policies/admission", rule)[0] == 200

        # The v0 API takes the AdmissionReview as it is and answers with the document, as a webhook needs.
        status, answer = anonymous.request("POST", "/v0/data/kubernetes/admission/main", ADMISSION_REVIEW)
        assert status == 200, answer
        assert answer == {"allowed": True}
        assert anonymous.request("POST", "/", ADMISSION_REVIEW)[0] == 401
        assert anonymous.request("GET", "/v1/data/kubernetes/admission")[0] == 401
        assert anonymous.request("POST", "/v1/data/kubernetes", {"input": {}})[0] == 401
        assert anonymous.request("GET", "/metrics")[0] == 401, "prometheus.enabled is off"
        assert anonymous.request("GET", "/health")[0] == 200
    finally:
        opa.stop()


# --- kopa with the chart's RBAC ----------------------------------------------------------------------------


@pytest.fixture
def chart_rbac(kube: KubeCluster, k8s: client.ApiClient) -> Iterator[Callable[[Rendered, str], None]]:
    """apply(rendered, namespace): creates the render's RBAC objects (Roles in `namespace`, cluster-scoped
    ones), waits until they are in effect, and deletes the cluster-scoped ones after the test."""
    require_binaries("kubectl")
    created: list[tuple[str, str]] = []

    def kubectl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_kubectl(kube.admin_kubeconfig, *args, stdin=stdin)

    def apply(rendered: Rendered, namespace: str) -> None:
        objects = rbac_objects(rendered)
        for obj in objects:
            where = obj["metadata"].get("namespace")
            assert where in (None, namespace), f"{obj['kind']} {obj['metadata']['name']} would go to {where}"
            if where is None:
                created.append((obj["kind"].lower(), obj["metadata"]["name"]))
        result = kubectl("create", "-f", "-", stdin=goyaml.dump_all(objects))
        assert result.returncode == 0, result.stderr

    yield apply
    for kind, name in created:
        kubectl("delete", kind, name, "--ignore-not-found")


def chart_for_kopa_user(helm: Helm, namespace: str, values: dict[str, Any] | None = None) -> Rendered:
    """The chart as installed in kopa-system with ServiceAccount kopa: the static identity KOPA_USER."""
    base: dict[str, Any] = {"serviceAccount": {"name": "kopa"}, "mgmt": {"namespaces": [namespace]}}
    for key, value in (values or {}).items():
        base[key] = {**base.get(key, {}), **value}
    rendered = helm.template(base, release=f"kopa-{secrets.token_hex(3)}", namespace="kopa-system")
    (subject,) = {json.dumps(s) for b in rbac_objects(rendered) if "subjects" in b for s in b["subjects"]}
    assert json.loads(subject) == {"kind": "ServiceAccount", "name": "kopa", "namespace": "kopa-system"}
    assert KOPA_USER == "system:serviceaccount:kopa-system:kopa"
    return rendered


def wait_allowed(check: Callable[[], object], what: str) -> None:
    """The RBAC authorizer reads roles from an informer: a new binding takes a moment to apply."""

    def allowed() -> bool:
        try:
            check()
        except client.ApiException as exc:
            if exc.status == 403:
                return False
            raise
        return True

    wait_until(allowed, timeout=TIMEOUT, what=what)


def assert_forbidden(call: Callable[[], object]) -> None:
    with pytest.raises(client.ApiException) as refused:
        call()
    assert refused.value.status == 403, refused.value


def put_configmap(core: client.CoreV1Api, ns: str, name: str, data: dict[str, str]) -> None:
    body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, labels=POLICY_LABEL), data=data)
    core.create_namespaced_config_map(ns, body)


def wait_status(core: client.CoreV1Api, ns: str, name: str, check: Callable[[str], bool]) -> str:
    def current() -> str | None:
        meta = core.read_namespaced_config_map(name, ns).metadata
        value = (meta.annotations or {}).get(STATUS) if meta else None
        return value if value is not None and check(value) else None

    found: str = wait_until(current, timeout=TIMEOUT, what=f"status of {ns}/{name}")
    return found


def event_reasons(k8s: client.ApiClient, ns: str) -> set[tuple[str | None, str | None]]:
    events = client.EventsV1Api(k8s).list_namespaced_event(ns).items
    return {(e.regarding.name if e.regarding else None, e.reason) for e in events}


# Flags of the chart's kopa arguments that concern only the Kubernetes side (what RBAC governs).
KUBE_SIDE_FLAGS = ("--namespaces=", "--enable-policies=", "--policy-", "--enable-data=", "--data-")


def test_kopa_with_only_the_charts_rbac_syncs_configmaps_and_cannot_read_secrets(
    *,
    helm: Helm,
    chart_rbac: Callable[[Rendered, str], None],
    run_kopa: KopaFactory,
    opa: OpaServer,
    namespace: str,
    k8s: client.ApiClient,
    kubeconfig_for: Callable[..., Path],
) -> None:
    rendered = chart_for_kopa_user(helm, namespace)
    assert not rendered.of_kind("ClusterRole"), "watching one namespace needs no ClusterRole"
    chart_rbac(rendered, namespace)
    core = client.CoreV1Api(k8s)
    with api_client(kubeconfig_for(KOPA_USER, namespace)) as as_kopa:
        kopa_core = client.CoreV1Api(as_kopa)
        wait_allowed(lambda: kopa_core.list_namespaced_config_map(namespace), "the chart's Role in effect")

        # The chart's kopa arguments for the Kubernetes side, against a plain OPA here.
        kube_args = [a for a in rendered.args("mgmt") if a.startswith(KUBE_SIDE_FLAGS)]
        assert f"--namespaces={namespace}" in kube_args
        kopa = run_kopa(
            *kube_args, f"--opa-url={opa.api_url}", kubeconfig=kubeconfig_for(KOPA_USER, namespace)
        )

        put_configmap(core, namespace, "hello", {"example.rego": HELLO})
        put_configmap(core, namespace, "broken", {"broken.rego": BROKEN})
        assert wait_status(core, namespace, "hello", lambda v: v == OK) == OK
        assert json.loads(wait_status(core, namespace, "broken", lambda v: v != OK))["status"] == "error"
        greeting = opa.http().get_json("/v1/data/kubernetes/example/greeting")
        assert greeting == {"result": "Hello, Kubernetes!"}
        wait_until(
            lambda: ("broken", "LoadFailed") in event_reasons(k8s, namespace),
            timeout=TIMEOUT,
            what="a LoadFailed Event on the broken ConfigMap",
        )

        # Secrets stay out of reach, and so do ConfigMaps of namespaces kopa does not watch.
        core.create_namespaced_secret(
            namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="db"), string_data={"pw": "x"})
        )
        assert_forbidden(lambda: kopa_core.read_namespaced_secret("db", namespace))
        assert_forbidden(lambda: kopa_core.list_namespaced_secret(namespace))
        assert_forbidden(kopa_core.list_secret_for_all_namespaces)
        assert_forbidden(lambda: kopa_core.list_namespaced_config_map("default"))
        assert_forbidden(kopa_core.list_config_map_for_all_namespaces)
        assert_forbidden(lambda: kopa_core.delete_namespaced_config_map("hello", namespace))
    log = kopa.log_path.read_text(errors="replace")
    assert "forbidden" not in log.lower(), "kopa was refused something the chart's RBAC should grant"


def create_crd(k8s: client.ApiClient, group: str) -> str:
    """A namespaced CRD `widgets.<group>` (served, established); returns its name."""
    api = client.ApiextensionsV1Api(k8s)
    name = f"widgets.{group}"
    api.create_custom_resource_definition(
        client.V1CustomResourceDefinition(
            metadata=client.V1ObjectMeta(name=name),
            spec=client.V1CustomResourceDefinitionSpec(
                group=group,
                scope="Namespaced",
                names=client.V1CustomResourceDefinitionNames(
                    plural="widgets", singular="widget", kind="Widget"
                ),
                versions=[
                    client.V1CustomResourceDefinitionVersion(
                        name="v1",
                        served=True,
                        storage=True,
                        schema=client.V1CustomResourceValidation(
                            open_apiv3_schema=client.V1JSONSchemaProps(
                                type="object", x_kubernetes_preserve_unknown_fields=True
                            )
                        ),
                    )
                ],
            ),
        )
    )

    def established() -> bool:
        crd = api.read_custom_resource_definition(name)
        conditions = crd.status.conditions if crd.status else None
        return any(c.type == "Established" and c.status == "True" for c in conditions or [])

    wait_until(established, timeout=TIMEOUT, what=f"CRD {name} established")
    return name


@pytest.fixture
def widgets_group(k8s: client.ApiClient) -> Iterator[str]:
    """A CRD group of this test's own (widgets.<group>), deleted afterwards."""
    group = f"t{secrets.token_hex(3)}.kopa.test"
    name = create_crd(k8s, group)
    yield group
    client.ApiextensionsV1Api(k8s).delete_custom_resource_definition(name)


def test_chart_pod_end_to_end(
    *,
    helm: Helm,
    chart_rbac: Callable[[Rendered, str], None],
    run_kopa: KopaFactory,
    namespace: str,
    k8s: client.ApiClient,
    kubeconfig_for: Callable[..., Path],
    widgets_group: str,
    tmp_path: Path,
) -> None:
    """OPA and kopa exactly as the chart configures them (TLS with the chart's certificate, the token, the
    authz and readiness policies), kopa as the chart's ServiceAccount with only the chart's RBAC: it loads
    policies, replicates namespaced, cluster-scoped and custom resources, writes annotations and Events, and
    OPA turns ready only after kopa's first full load."""
    replicate = {"namespace": ["v1/services", f"{widgets_group}/v1/widgets"], "cluster": ["v1/namespaces"]}
    rendered = chart_for_kopa_user(
        helm, namespace, {"mgmt": {"namespaces": [namespace], "replicate": replicate}}
    )
    chart_rbac(rendered, namespace)
    core = client.CoreV1Api(k8s)
    with api_client(kubeconfig_for(KOPA_USER, namespace)) as as_kopa:
        kopa_core = client.CoreV1Api(as_kopa)
        wait_allowed(
            lambda: kopa_core.list_service_for_all_namespaces(limit=1), "the chart's ClusterRole in effect"
        )
        wait_allowed(lambda: kopa_core.list_namespaced_config_map(namespace), "the chart's Role in effect")

        put_configmap(core, namespace, "hello", {"example.rego": HELLO})
        core.create_namespaced_service(
            namespace,
            client.V1Service(
                metadata=client.V1ObjectMeta(name="web"),
                spec=client.V1ServiceSpec(ports=[client.V1ServicePort(port=80)]),
            ),
        )
        client.CustomObjectsApi(k8s).create_namespaced_custom_object(
            widgets_group,
            "v1",
            namespace,
            "widgets",
            {"apiVersion": f"{widgets_group}/v1", "kind": "Widget", "metadata": {"name": "w1"}, "size": 3},
        )

        pod = LocalPod(rendered, tmp_path / "pod")
        opa = start_opa(pod)
        try:
            anonymous = opa_client(pod, None)
            admin = opa_client(pod, pod.token())
            assert anonymous.request("GET", "/health/ready")[0] != 200, "OPA is not ready before kopa's load"

            kopa = run_kopa(*pod.args("mgmt"), kubeconfig=kubeconfig_for(KOPA_USER, namespace))
            health = f"http://{HOST}:{pod.port(8000)}"

            wait_until(
                lambda: anonymous.request("GET", "/health/ready")[0] == 200,
                timeout=TIMEOUT,
                what="OPA ready (kopa's marker after its first full load)",
                process=kopa,
            )
            assert admin.get_json("/v1/data/system/kopa")["result"]["ready"] is True
            assert http_status(f"{health}/healthz")[0] == 200
            assert http_status(f"{health}/readyz")[0] == 200

            # Loaded once ready: policies, and all three kinds of replicated resources.
            assert admin.get_json("/v1/data/kubernetes/example/greeting") == {"result": "Hello, Kubernetes!"}
            assert wait_status(core, namespace, "hello", lambda v: v == OK) == OK
            kube_data = admin.get_json("/v1/data/kubernetes")["result"]
            assert kube_data["services"][namespace]["web"]["spec"]["ports"][0]["port"] == 80
            assert kube_data["widgets"][namespace]["w1"]["size"] == 3
            assert namespace in kube_data["namespaces"]

            # Changes keep flowing; failures are reported on the ConfigMap and as Events.
            put_configmap(core, namespace, "broken", {"broken.rego": BROKEN})
            assert json.loads(wait_status(core, namespace, "broken", lambda v: v != OK))["status"] == "error"
            wait_until(
                lambda: ("broken", "LoadFailed") in event_reasons(k8s, namespace),
                timeout=TIMEOUT,
                what="a LoadFailed Event",
            )
            core.delete_namespaced_service("web", namespace)
            wait_until(
                lambda: (
                    "web" not in admin.get_json("/v1/data/kubernetes/services")["result"].get(namespace, {})
                ),
                timeout=TIMEOUT,
                what="the deleted Service gone from OPA",
            )

            # OPA stays locked, and kopa's identity cannot read Secrets.
            assert anonymous.request("PUT", "/v1/policies/evil", "package evil\n\nx := 1\n")[0] == 401
            assert_forbidden(lambda: kopa_core.list_namespaced_secret(namespace))
            assert_forbidden(lambda: kopa_core.list_namespaced_pod(namespace))
        finally:
            opa.stop()
    log = kopa.log_path.read_text(errors="replace")
    assert "forbidden" not in log.lower(), "kopa was refused something the chart's RBAC should grant"


# --- the dashboard against a live kopa ---------------------------------------------------------------------


def test_every_dashboard_metric_exists_on_a_live_kopa(
    run_kopa: KopaFactory, opa: OpaServer, namespace: str, core_v1: client.CoreV1Api
) -> None:
    dashboard = json.loads((CHART / "dashboards" / "kopa.json").read_text(encoding="utf-8"))
    wanted = dashboard_metric_names(dashboard)
    assert wanted
    port = free_port()
    kopa = run_kopa(
        f"--opa-url={opa.api_url}",
        f"--namespaces={namespace}",
        "--replicate=v1/services",
        f"--health-endpoint={HOST}:{port}",
    )

    def scrape() -> str | None:
        status, body = http_status(f"http://{HOST}:{port}/metrics")
        return body.decode() if status == 200 else None

    wait_until(scrape, timeout=TIMEOUT, what="kopa's /metrics", process=kopa)
    put_configmap(core_v1, namespace, "hello", {"example.rego": HELLO})
    wait_status(core_v1, namespace, "hello", lambda v: v == OK)
    exposition: str = wait_until(scrape, timeout=TIMEOUT, what="kopa's /metrics", process=kopa)
    missing = sorted(name for name in wanted if not exposed(exposition, name))
    assert missing == [], f"the dashboard queries metrics kopa does not expose: {missing}"
