"""The chart as a platform engineer runs it in production (issue 17): it installs as its README says, its
webhook cannot deadlock the cluster, and its defaults survive node drains and rollouts.

Rendered output is checked here; what the API server can check (a webhook's namespaceSelector and
matchConditions) runs against the session's real kube-apiserver with a webhook that calls a loopback URL
only, scoped to namespaces this test makes.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from devstack import goyaml
from devstack.certs import TestCA
from devstack.demo import run_kubectl, webhook_is_loopback
from devstack.kube import KubeCluster
from devstack.processes import HOST, wait_until
from tests.conftest import API_TIMEOUT, namespace_name, require_binaries
from tests.integration.chart import (
    CHART,
    Helm,
    HelmError,
    LocalPod,
    Rendered,
    mounted_file,
    parse_quantity,
)

pytestmark = pytest.mark.integration

README = CHART / "README.md"


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(tmp_path_factory.mktemp("helm"))


def refusal(helm: Helm, values: dict[str, Any], *, image: bool = True) -> str:
    """What helm says when the chart refuses `values`."""
    with pytest.raises(HelmError) as refused:
        helm.template(values, image=image)
    return refused.value.result.stderr


# --- 1. the image -------------------------------------------------------------------------------------------


def test_the_kopa_image_is_required_and_the_message_says_how_to_make_it(helm: Helm) -> None:
    message = refusal(helm, {}, image=False)
    assert "mgmt.image.repository is required" in message, message
    assert "docker build" in message and "--set mgmt.image.repository=" in message, message


@pytest.mark.parametrize("repository", ["openpolicyagent/kube-mgmt", "docker.io/openpolicyagent/kube-mgmt"])
def test_kube_mgmts_own_image_is_refused(helm: Helm, repository: str) -> None:
    message = refusal(helm, {"mgmt": {"image": {"repository": repository, "tag": "9.0.0"}}}, image=False)
    assert "kube-mgmt's image" in message and "Set mgmt.image.repository" in message, message


def readme_commands() -> list[list[str]]:
    """The commands of the README's Install section, continuation lines joined, each split as sh would."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Install", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    joined = block.replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip()]


def test_the_readme_install_steps_render_with_the_image_they_build(helm: Helm) -> None:
    commands = readme_commands()
    (build,) = [c for c in commands if c[:2] == ["docker", "build"]]
    (install,) = [c for c in commands if c[:2] == ["helm", "install"]]
    built = build[build.index("-t") + 1]
    assert ["docker", "push", built] in commands
    assert {"COMMIT=$(git", "VERSION=0.1.0"} <= set(build), "the Dockerfile's build arguments"
    release, chart, *flags = install[2:]
    assert chart == "helm/kopa"
    namespace = next(f for f in flags if f.startswith("--namespace") or f == "--namespace")
    ns = flags[flags.index(namespace) + 1]
    sets = dict(flags[i + 1].split("=", 1) for i, f in enumerate(flags) if f == "--set")
    assert f"{sets['mgmt.image.repository']}:{sets['mgmt.image.tag']}" == built
    result = helm.run(
        "template", release, str(CHART), f"--namespace={ns}", *(f"--set={k}={v}" for k, v in sets.items())
    )
    rendered = Rendered.parse(result.stdout, ns)
    assert rendered.container("mgmt")["image"] == built
    assert rendered.container("init")["image"] == built


def notes(kube: KubeCluster, tmp_path: Path, values: dict[str, Any], namespace: str = "opa") -> str:
    """The chart's NOTES for `values` (helm renders NOTES.txt only on install: a client-side dry run, with
    the session's API server as the cluster helm asks for its version)."""
    helm = Helm(tmp_path / "notes-helm", kube.admin_kubeconfig)
    result = helm.run(
        "install", "kopa", str(CHART), f"--namespace={namespace}", "--dry-run=client", "--output=json",
        f"--values={helm.image_values()}", f"--values={helm.values_file(values)}",
    )  # fmt: skip
    text: str = json.loads(result.stdout)["info"]["notes"]
    return text


# --- 3. webhook safety --------------------------------------------------------------------------------------

CHART_CONDITIONS = [
    {
        "name": "not-a-lease",
        "expression": (
            "!(request.resource.group == 'coordination.k8s.io' && request.resource.resource == 'leases')"
        ),
    },
    {
        "name": "not-an-event",
        "expression": (
            "!(request.resource.resource == 'events' && request.resource.group in ['', 'events.k8s.io'])"
        ),
    },
]


def test_notes_warn_about_a_failing_webhook_and_name_what_it_never_sees(
    kube: KubeCluster, tmp_path: Path
) -> None:
    failing = notes(kube, tmp_path, {"admissionController": {"enabled": True, "failurePolicy": "Fail"}})
    assert "WARNING: failurePolicy Fail" in failing, failing
    assert "opa, kube-system, kube-node-lease" in failing and "leases and events" in failing, failing
    ignoring = notes(kube, tmp_path, {"admissionController": {"enabled": True}})
    assert "failurePolicy Ignore" in ignoring and "WARNING: failurePolicy" not in ignoring, ignoring


def webhook_of(rendered: Rendered) -> dict[str, Any]:
    (config,) = rendered.of_kind("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration")
    (webhook,) = config["webhooks"]
    hook: dict[str, Any] = webhook
    return hook


def test_the_webhook_never_sees_its_own_namespace_the_control_plane_leases_or_events(helm: Helm) -> None:
    webhook = webhook_of(helm.template({"admissionController": {"enabled": True}}, namespace="opa"))
    assert webhook["namespaceSelector"] == {
        "matchExpressions": [
            {"key": "openpolicyagent.org/webhook", "operator": "NotIn", "values": ["ignore"]},
            {
                "key": "kubernetes.io/metadata.name",
                "operator": "NotIn",
                "values": ["opa", "kube-system", "kube-node-lease"],
            },
        ]
    }
    assert webhook["matchConditions"] == CHART_CONDITIONS


def test_a_users_namespace_selector_and_conditions_combine_with_the_charts(helm: Helm) -> None:
    mine = {"key": "team", "operator": "Exists"}
    condition = {"name": "not-dry-run", "expression": "!request.dryRun"}
    values = {
        "admissionController": {
            "enabled": True,
            "namespaceSelector": {"matchLabels": {"env": "prod"}, "matchExpressions": [mine]},
            "excludedNamespaces": ["kube-system", "opa", "monitoring"],
            "matchConditions": [condition],
        }
    }
    webhook = webhook_of(helm.template(values, namespace="opa"))
    assert webhook["namespaceSelector"] == {
        "matchLabels": {"env": "prod"},
        "matchExpressions": [
            mine,
            {
                "key": "kubernetes.io/metadata.name",
                "operator": "NotIn",
                "values": ["opa", "kube-system", "monitoring"],
            },
        ],
    }
    assert webhook["matchConditions"] == [*CHART_CONDITIONS, condition]
    # A selector without expressions (helm merges maps: the default's list goes only when replaced) still
    # excludes the release's namespace.
    values["admissionController"].update(namespaceSelector={"matchExpressions": []}, excludedNamespaces=[])
    webhook = webhook_of(helm.template(values, namespace="opa"))
    assert webhook["namespaceSelector"] == {
        "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["opa"]}]
    }


class Recorder:
    """An HTTPS admission webhook on 127.0.0.1 that allows everything and records what it was asked:
    (namespace, group, resource, name) of each AdmissionReview."""

    def __init__(self, tmp_path: Path) -> None:
        ca = TestCA(tmp_path / "webhook-ca")
        cert, key = ca.issue("webhook", ips=[HOST], dns=[])
        self.ca_pem = ca.ca_file.read_text(encoding="utf-8")
        self.seen: list[tuple[str, str, str, str]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                request = review["request"]
                resource = request["resource"]
                recorder.seen.append(
                    (
                        request.get("namespace", ""),
                        resource["group"],
                        resource["resource"],
                        request.get("name", ""),
                    )
                )
                body = json.dumps(
                    {**review, "response": {"uid": request["uid"], "allowed": True}, "request": None}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://{HOST}:{self.server.server_address[1]}"

    @contextlib.contextmanager
    def running(self) -> Iterator[Recorder]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
            thread.join(timeout=10)


def lease(name: str) -> client.V1Lease:
    return client.V1Lease(
        metadata=client.V1ObjectMeta(name=name), spec=client.V1LeaseSpec(holder_identity="node")
    )


def configmap(name: str) -> client.V1ConfigMap:
    return client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name), data={"a": "b"})


def event(name: str, namespace: str) -> client.CoreV1Event:
    return client.CoreV1Event(
        metadata=client.V1ObjectMeta(name=name),
        involved_object=client.V1ObjectReference(kind="ConfigMap", name="x", namespace=namespace),
        reason="Test",
        message="test",
        type="Normal",
    )


def test_the_api_server_never_sends_a_node_lease_an_event_or_the_releases_own_namespace_to_opa(
    helm: Helm, kube: KubeCluster, k8s: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    """The chart's webhook, created for real with a loopback URL and failurePolicy Fail, scoped by the
    user's selector to this test's namespaces and kube-node-lease: the chart's exclusions still keep
    kube-node-lease, the release's namespace, leases and events away; a ConfigMap elsewhere is sent."""
    require_binaries("kubectl")
    core = client.CoreV1Api(k8s)
    leases = client.CoordinationV1Api(k8s)
    release_ns = namespace_name("release")
    core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=release_ns)), _request_timeout=API_TIMEOUT
    )
    recorder = Recorder(tmp_path)
    scope = [namespace, release_ns, "kube-node-lease"]
    values = {
        "admissionController": {
            "enabled": True,
            "url": recorder.url,
            "failurePolicy": "Fail",
            "timeoutSeconds": 5,
            "namespaceSelector": {
                "matchExpressions": [
                    {"key": "kubernetes.io/metadata.name", "operator": "In", "values": scope}
                ]
            },
        },
        "generateCerts": False,
        "CA": recorder.ca_pem,
        "cert": "unused",
        "key": "unused",
    }
    (config,) = helm.template(values, release="kopa", namespace=release_ns).of_kind(
        "ValidatingWebhookConfiguration"
    )
    assert webhook_is_loopback(config), config
    config["metadata"]["name"] = f"{release_ns}-kopa"
    name = f"{release_ns}-kopa"
    node_lease = f"kopa-test-node-{release_ns[-6:]}"
    admin = kube.admin_kubeconfig
    with recorder.running():
        try:
            created = run_kubectl(admin, "create", "-f", "-", stdin=goyaml.dump(config))
            assert created.returncode == 0, created.stderr
            # The webhook is in effect once a ConfigMap in scope reaches the recorder (the API server
            # loads webhook configurations asynchronously).
            probes = iter(range(1000))

            def sent() -> bool:
                core.create_namespaced_config_map(namespace, configmap(f"probe-{next(probes)}"))
                return any(seen[2] == "configmaps" and seen[0] == namespace for seen in recorder.seen)

            wait_until(sent, timeout=30, what="the webhook configuration in effect")
            recorder.seen.clear()

            leases.create_namespaced_lease("kube-node-lease", lease(node_lease))
            leases.patch_namespaced_lease(
                node_lease, "kube-node-lease", {"spec": {"holderIdentity": "again"}}
            )
            core.create_namespaced_config_map("kube-node-lease", configmap(node_lease))
            core.create_namespaced_config_map(release_ns, configmap("opa-own"))
            leases.create_namespaced_lease(namespace, lease("app-lease"))
            core.create_namespaced_event(namespace, event("app-event", namespace))
            # events.k8s.io/v1 (kubectl: the Python client rewrites eventTime's microseconds away).
            event_v1 = {
                "apiVersion": "events.k8s.io/v1",
                "kind": "Event",
                "metadata": {"name": "app-event-v1", "namespace": namespace},
                "eventTime": "2026-01-01T00:00:00.000000Z",
                "reportingController": "kopa.test/chart",
                "reportingInstance": "test",
                "action": "Test",
                "reason": "Test",
                "type": "Normal",
                "regarding": {"kind": "ConfigMap", "name": "x", "namespace": namespace},
            }
            created = run_kubectl(admin, "create", "-f", "-", stdin=json.dumps(event_v1))
            assert created.returncode == 0, created.stderr
            assert recorder.seen == [], "sent to OPA: " + repr(recorder.seen)
            core.create_namespaced_config_map(namespace, configmap("after"))
            assert recorder.seen == [(namespace, "", "configmaps", "after")]
        finally:
            run_kubectl(admin, "delete", "validatingwebhookconfiguration", name, "--ignore-not-found")
            with contextlib.suppress(client.ApiException):
                leases.delete_namespaced_lease(node_lease, "kube-node-lease")
            with contextlib.suppress(client.ApiException):
                core.delete_namespaced_config_map(node_lease, "kube-node-lease")
            with contextlib.suppress(client.ApiException):
                core.delete_namespaced_config_map("opa-own", release_ns)
            with contextlib.suppress(client.ApiException):
                core.delete_namespace(release_ns)


# --- 4. high availability -----------------------------------------------------------------------------------


def test_defaults_spread_the_pods_and_never_block_a_drain_or_a_rollout(helm: Helm) -> None:
    rendered = helm.template({"replicas": 3})
    (spread,) = rendered.pod_spec["topologySpreadConstraints"]
    assert spread == {
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": rendered.deployment["spec"]["selector"]["matchLabels"]},
        "matchLabelKeys": ["pod-template-hash"],
    }
    pdb = rendered.one("PodDisruptionBudget")["spec"]
    assert pdb == {
        "maxUnavailable": 1,
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
        "selector": {"matchLabels": rendered.deployment["spec"]["selector"]["matchLabels"]},
    }
    # OPA keeps answering after SIGTERM until the endpoints drop the pod, within the pod's grace period.
    args = rendered.args("opa")
    wait = int(next(a for a in args if a.startswith("--shutdown-wait-period=")).split("=")[1])
    grace = int(next(a for a in args if a.startswith("--shutdown-grace-period=")).split("=")[1])
    assert wait >= 5
    assert wait + grace <= rendered.pod_spec["terminationGracePeriodSeconds"]
    # With one replica the PDB still lets a drain evict the pod.
    assert helm.template().one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_spread_and_pdb_of_the_users_replace_the_charts(helm: Helm) -> None:
    zone = {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule"}
    rendered = helm.template(
        {"replicas": 3, "topologySpreadConstraints": [zone], "podDisruptionBudget": {"minAvailable": 2}}
    )
    assert rendered.pod_spec["topologySpreadConstraints"] == [zone]
    pdb = rendered.one("PodDisruptionBudget")["spec"]
    assert pdb["minAvailable"] == 2 and "maxUnavailable" not in pdb
    assert not helm.template({"podDisruptionBudget": {"enabled": False}}).of_kind("PodDisruptionBudget")


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"podDisruptionBudget": {"minAvailable": 1}}, "would block every node drain"),
        ({"replicas": 2, "podDisruptionBudget": {"minAvailable": 2}}, "would block every node drain"),
        (
            {"shutdownWaitPeriod": 25, "terminationGracePeriodSeconds": 30},
            "exceed terminationGracePeriodSeconds",
        ),
    ],
)
def test_values_that_would_block_drains_or_cut_shutdown_short_are_refused(
    helm: Helm, values: dict[str, Any], complaint: str
) -> None:
    assert complaint in refusal(helm, values)


# --- 10. a ServiceMonitor with nothing to scrape ------------------------------------------------------------


def test_a_service_monitor_with_nothing_to_scrape_is_refused(helm: Helm) -> None:
    values = {
        "serviceMonitor": {"enabled": True},
        "mgmt": {"enabled": False},
        "prometheus": {"enabled": False},
    }
    message = refusal(helm, values)
    assert "serviceMonitor.enabled has nothing to scrape" in message and "prometheus.enabled=true" in message
    values["prometheus"] = {"enabled": True}
    rendered = helm.template(values)
    (endpoint,) = rendered.one("ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == "opa-metrics"
    assert [p["name"] for p in rendered.one("Service", "kopa-metrics")["spec"]["ports"]] == ["opa-metrics"]


# --- 7. memory ----------------------------------------------------------------------------------------------


def test_every_container_has_memory_requests_and_limits_and_opa_a_gomemlimit(
    helm: Helm, tmp_path: Path
) -> None:
    rendered = helm.template()
    for item in rendered.containers():
        resources = item["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), item["name"]
        assert "memory" in resources["limits"], item["name"]
        assert parse_quantity(resources["limits"]["memory"]) >= parse_quantity(
            resources["requests"]["memory"]
        )
    (gomemlimit,) = [e for e in rendered.container("opa")["env"] if e["name"] == "GOMEMLIMIT"]
    assert gomemlimit["valueFrom"] == {
        "resourceFieldRef": {"containerName": "opa", "resource": "limits.memory", "divisor": "1"}
    }
    # What the kubelet gives OPA: the limit in bytes, a number Go's runtime reads as bytes.
    assert LocalPod(rendered, tmp_path / "pod").env("opa")["GOMEMLIMIT"] == str(2**30)
    # A limit of the user's is followed; without one the variable is left to the node's capacity.
    mine = helm.template(
        {"resources": {"limits": {"memory": "768Mi"}}, "extraEnv": [{"name": "A", "value": "b"}]}
    )
    assert LocalPod(mine, tmp_path / "mine").env("opa") == {"GOMEMLIMIT": str(768 * 2**20), "A": "b"}
    unlimited = helm.template({"resources": {"limits": None}})
    assert "limits" not in unlimited.container("opa")["resources"]
    assert "GOMEMLIMIT" not in LocalPod(unlimited, tmp_path / "unlimited").env("opa")


@pytest.mark.parametrize(
    ("quantity", "value"), [("1Gi", 2**30), ("512Mi", 2**29), ("1G", 10**9), ("1500m", 2), ("64", 64)]
)
def test_quantities_read_as_the_kubelet_gives_them(quantity: str, value: int) -> None:
    assert parse_quantity(quantity) == value


# --- 8. GitOps: tls.existingSecret --------------------------------------------------------------------------


def test_with_an_existing_tls_secret_every_render_is_the_same(helm: Helm) -> None:
    """Argo CD renders with `helm template` on every sync: generateCerts makes a new CA each time (the
    pods would restart on every sync); tls.existingSecret (or cert-manager) renders the same bytes."""
    ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    values = {"tls": {"existingSecret": "opa-tls"}, "CA": ca, "admissionController": {"enabled": True}}
    assert helm.template(values).text == helm.template(values).text
    assert helm.template(values={}).text != helm.template(values={}).text, (
        "generateCerts: a new CA each render"
    )
    certificate = {"certManager": {"enabled": True}, "admissionController": {"enabled": True}}
    assert helm.template(certificate).text == helm.template(certificate).text


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"tls": {"existingSecret": "opa-tls"}, "admissionController": {"enabled": True}}, "needs CA"),
        ({"tls": {"existingSecret": "opa-tls"}, "certManager": {"enabled": True}}, "choose one"),
    ],
)
def test_an_existing_tls_secret_needs_its_ca_for_the_webhook_and_excludes_cert_manager(
    helm: Helm, values: dict[str, Any], complaint: str
) -> None:
    assert complaint in refusal(helm, values)


# --- 5. the API token for kopa's container only -------------------------------------------------------------


def test_only_kopas_container_gets_a_projected_expiring_token(helm: Helm) -> None:
    rendered = helm.template()
    assert rendered.pod_spec["automountServiceAccountToken"] is False
    (volume,) = [v for v in rendered.pod_spec["volumes"] if v["name"] == "kube-api-access"]
    sources = volume["projected"]["sources"]
    assert sources[0] == {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}
    assert sources[1]["configMap"] == {
        "name": "kube-root-ca.crt",
        "items": [{"key": "ca.crt", "path": "ca.crt"}],
    }
    assert sources[2]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"] == "metadata.namespace"
    for item in rendered.containers():
        mounts = [m for m in item.get("volumeMounts", []) if m["name"] == "kube-api-access"]
        if item["name"] == "mgmt":
            assert mounts == [
                {
                    "name": "kube-api-access",
                    "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                    "readOnly": True,
                }
            ]
        else:
            assert mounts == [], f"{item['name']} must not get kopa's API credentials"
    off = helm.template({"mgmt": {"enabled": False}})
    assert not [v for v in off.pod_spec["volumes"] if v["name"] == "kube-api-access"]


# --- 6. NetworkPolicy and open doors ------------------------------------------------------------------------


def test_network_policy_is_off_by_default_and_open_to_the_webhook_when_on(helm: Helm) -> None:
    assert not helm.template().of_kind("NetworkPolicy")
    policy = helm.template({"networkPolicy": {"enabled": True}}).one("NetworkPolicy")["spec"]
    assert policy["ingress"] == [{"ports": [{"port": "opa", "protocol": "TCP"}]}], (
        "OPA's port from anywhere (the API server), metrics from no one but the node"
    )


def test_notes_warn_about_an_open_api_and_cluster_wide_configmap_patch(
    kube: KubeCluster, tmp_path: Path
) -> None:
    open_api = notes(kube, tmp_path, {"authz": {"enabled": False}})
    assert "WARNING: authz.enabled=false: OPA's API is open" in open_api, open_api
    assert "networkPolicy.enabled" in open_api
    everywhere = notes(kube, tmp_path, {"mgmt": {"namespaces": ["*"]}})
    assert "patch every ConfigMap in the cluster, kube-system" in everywhere, everywhere
    default = notes(kube, tmp_path, {})
    assert "WARNING" not in default and "NOTE:" not in default, default


# --- 9. the Grafana dashboard -------------------------------------------------------------------------------

DASHBOARD = CHART / "dashboards" / "kopa.json"
# A metric selector in a PromQL expression: a metric name and its {...} matchers.
SELECTOR = re.compile(r"\b((?:kopa|workqueue)_[a-z0-9_]+)(\{[^}]*\})?")


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def test_every_query_selects_only_the_series_of_kopas_pods() -> None:
    """workqueue_* is also what every client-go controller exports: each query must select by the pod
    variable, whose values (All included) come from a metric only kopa has."""
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    for name in ("namespace", "pod"):
        variable = variables[name]
        assert "allValue" not in variable, f"${name}'s All must mean the listed values, not .*"
        assert variable["query"]["query"].startswith("label_values(kopa_ready"), variable["query"]
    targets = [t for p in board["panels"] if p["type"] != "row" for t in p["targets"]]
    assert targets
    for target in targets:
        selectors = SELECTOR.findall(target["expr"])
        assert selectors, target["expr"]
        for metric, matchers in selectors:
            assert 'namespace=~"$namespace"' in matchers and 'pod=~"$pod"' in matchers, (
                metric,
                target["expr"],
            )


def test_stat_panels_do_not_count_a_replicated_gauge_once_per_pod() -> None:
    for panel in dashboard()["panels"]:
        if panel["type"] != "stat":
            continue
        for target in panel["targets"]:
            expr = target["expr"]
            gauge = not re.search(r"_total\b", expr)
            if gauge:
                assert not expr.startswith("sum("), (panel["title"], expr)


def test_the_dashboard_shows_readiness_and_opa_up_per_pod() -> None:
    exprs = {p["title"]: p["targets"][0]["expr"] for p in dashboard()["panels"] if p["type"] == "timeseries"}
    assert exprs["kopa ready, by pod"].startswith("max by (pod) (kopa_ready{")
    assert exprs["OPA up, by pod"].startswith("max by (pod) (kopa_opa_up{")


# --- 2. opa-kube-mgmt's values ------------------------------------------------------------------------------

# opa-kube-mgmt 11.0.7's values files, as fixtures of this test: the same keys and values (its default
# values.yaml, then its e2e directories' values.yaml).
KUBE_MGMT_DEFAULTS: dict[str, Any] = {
    "opa": {},
    "certManager": {
        "enabled": False,
        "rootCACertificateDuration": "43800h",
        "servingCertificateDuration": "8760h",
    },
    "prometheus": {"enabled": False, "port": 8182},
    "serviceMonitor": {"enabled": False, "interval": "15s", "additionalLabels": {}},
    "service": {"annotations": {}},
    "annotations": {},
    "bootstrapPolicies": {},
    "admissionController": {
        "enabled": False,
        "kind": "ValidatingWebhookConfiguration",
        "failurePolicy": "Ignore",
        "namespaceSelector": {
            "matchExpressions": [
                {"key": "openpolicyagent.org/webhook", "operator": "NotIn", "values": ["ignore"]}
            ]
        },
        "sideEffect": "None",
        "rules": [{"operations": ["*"], "apiGroups": ["*"], "apiVersions": ["*"], "resources": ["*"]}],
    },
    "generateCerts": True,
    "CA": "",
    "cert": "",
    "key": "",
    "podDisruptionBudget": {"enabled": False, "minAvailable": 1},
    "authz": {"enabled": True},
    "hostNetwork": {"enabled": False},
    "image": {"repository": "openpolicyagent/opa", "tag": "1.16.1", "pullPolicy": "IfNotPresent"},
    "imagePullSecrets": [],
    "useHttps": True,
    "port": 8181,
    "extraArgs": [],
    "extraEnv": [],
    "mgmt": {
        "enabled": True,
        "image": {"repository": "openpolicyagent/kube-mgmt", "tag": "", "pullPolicy": "IfNotPresent"},
        "extraArgs": [],
        "extraEnv": [],
        "resources": {},
        "namespaces": [],
        "startupProbe": {
            "failureThreshold": 5,
            "httpGet": {"path": "/health", "port": 8181, "scheme": "HTTPS"},
            "initialDelaySeconds": 20,
            "successThreshold": 1,
            "timeoutSeconds": 10,
        },
        "data": {"enabled": True},
        "policies": {"enabled": True},
        "replicate": {"cluster": [], "namespace": [], "path": "kubernetes", "ignoreNs": [], "auto": False},
    },
    "logLevel": "info",
    "logFormat": "json",
    "replicas": 1,
    "affinity": {},
    "tolerations": [],
    "nodeSelector": {},
    "topologySpreadConstraints": [],
    "resources": {},
    "rbac": {"create": True, "extraRules": []},
    "serviceAccount": {"create": True, "annotations": {}, "name": None},
    "sar": {
        "enabled": False,
        "image": {"repository": "lachlanevenson/k8s-kubectl", "tag": "latest", "pullPolicy": "IfNotPresent"},
        "resources": {},
    },
    "securityContext": {"enabled": False, "runAsNonRoot": True, "runAsUser": 1},
    "deploymentStrategy": {},
    "extraContainers": [],
    "extraVolumes": [],
    "extraVolumeMounts": [],
    "extraPorts": [],
}
PLAIN = {"useHttps": False, "opa": None, "authz": {"enabled": False}}
HTTP_STARTUP = {"startupProbe": {"httpGet": {"scheme": "HTTP"}}}
SERVICES_RULE = [{"apiGroups": [""], "resources": ["services"], "verbs": ["*"]}]
KUBE_MGMT_E2E: dict[str, dict[str, Any]] = {
    "custom_config": {
        "opa": {
            "services": {"controller": {"url": "https://www.openpolicyagent.org"}},
            "bundles": {
                "quickstart": {
                    "service": "controller",
                    "resource": "/external-resources/bundles/helm-kubernetes-quickstart",
                }
            },
            "default_decision": "/helm_kubernetes_quickstart/main",
        }
    },
    "custom_mgmt_token": {
        "e2eMgmtTokenSecret": True,
        "opa": {"replicas": 2},
        "authz": {"enabled": True, "mgmtToken": {"secretName": "mgmt-token-secret"}},
    },
    "default": {},
    "labels": {
        **PLAIN,
        "mgmt": {
            **HTTP_STARTUP,
            "extraArgs": [
                "--policy-label=qweqwe/policy",
                "--policy-value=111",
                "--data-label=asdasd/data",
                "--data-value=222",
                "--log-level=debug",
            ],
        },
    },
    "multi": {**PLAIN, "mgmt": {**HTTP_STARTUP, "extraArgs": ["--log-level=debug"]}},
    "replicate": {
        **PLAIN,
        "mgmt": {
            "data": {"enabled": False},
            "policies": {"enabled": False},
            **HTTP_STARTUP,
            "replicate": {"ignoreNs": ["ignore-me"], "namespace": ["v1/services"]},
            "extraArgs": ["--log-level=debug"],
        },
        "rbac": {"extraRules": SERVICES_RULE},
    },
    "replicate_auto": {
        **PLAIN,
        "opa": {"bundles": {"test": {"resource": "file:///bundle/bundle.tar.gz"}}},
        "mgmt": {
            "data": {"enabled": False},
            "policies": {"enabled": False},
            **HTTP_STARTUP,
            "replicate": {"ignoreNs": ["ignore-me"], "auto": True},
            "extraArgs": ["--log-level=debug"],
        },
        "rbac": {"extraRules": SERVICES_RULE},
        "extraVolumes": [{"name": "bundle-vol", "configMap": {"name": "bundle"}}],
        "extraVolumeMounts": [{"name": "bundle-vol", "mountPath": "/bundle"}],
    },
}
# What a platform team runs: HA, a failing-closed webhook, cert-manager, monitoring, replication, and rules
# written for kube-mgmt's pods (app: <fullname>).
PRODUCTION: dict[str, Any] = {
    "replicas": 3,
    "mgmt": {
        "namespaces": ["opa", "policies"],
        "replicate": {"cluster": ["v1/namespaces"], "namespace": ["networking.k8s.io/v1/ingresses"]},
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
    },
    "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
    "admissionController": {"enabled": True, "failurePolicy": "Fail", "timeoutSeconds": 5},
    "certManager": {"enabled": True},
    "prometheus": {"enabled": True},
    "serviceMonitor": {"enabled": True, "additionalLabels": {"release": "kube-prometheus-stack"}},
    "grafanaDashboard": {"enabled": True},
    "networkPolicy": {
        "enabled": True,
        "metricsFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ],
    },
    "priorityClassName": "system-cluster-critical",
    "affinity": {
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {
                        "matchExpressions": [{"key": "app", "operator": "In", "values": ["opa-kopa"]}]
                    },
                    "topologyKey": "kubernetes.io/hostname",
                }
            ]
        }
    },
    "service": {"trafficDistribution": "PreferClose"},
    "extraVolumes": [{"name": "ca-bundle", "configMap": {"name": "corporate-ca"}}],
    "extraVolumeMounts": [{"name": "ca-bundle", "mountPath": "/etc/corporate-ca", "readOnly": True}],
}
KOPA_IMAGE = {"mgmt": {"image": {"repository": "registry.example.com/kopa", "tag": "0.1.0"}}}


def kube_mgmt_cases() -> dict[str, list[dict[str, Any]]]:
    """Values files in helm's order: kube-mgmt's defaults, then an e2e file, then the kopa image."""
    cases = {
        f"e2e-{name}": [KUBE_MGMT_DEFAULTS, values, KOPA_IMAGE] for name, values in KUBE_MGMT_E2E.items()
    }
    cases["defaults"] = [KUBE_MGMT_DEFAULTS, KOPA_IMAGE]
    cases["production"] = [PRODUCTION, KOPA_IMAGE]
    return cases


def render_files(
    helm: Helm, files: list[dict[str, Any]], namespace: str = "opa", release: str = "opa"
) -> Rendered:
    paths = [helm.values_file(values, f"file{i}") for i, values in enumerate(files)]
    return helm.template(release=release, namespace=namespace, values_files=paths, image=False)


def test_kube_mgmts_default_values_name_its_image_and_are_refused_with_what_to_set(helm: Helm) -> None:
    with pytest.raises(HelmError) as refused:
        render_files(helm, [KUBE_MGMT_DEFAULTS])
    message = refused.value.result.stderr
    assert (
        "openpolicyagent/kube-mgmt, kube-mgmt's image" in message and "Set mgmt.image.repository" in message
    )


@pytest.mark.parametrize("case", sorted(kube_mgmt_cases()))
def test_kube_mgmt_values_render_and_pass_server_side_dry_run(
    helm: Helm, kube: KubeCluster, namespace: str, case: str
) -> None:
    require_binaries("kubectl")
    # The production file's watched namespaces, as namespaces this API server has.
    here = {"mgmt": {"namespaces": [namespace, "default"]}} if case == "production" else {}
    rendered = render_files(helm, [*kube_mgmt_cases()[case], here], namespace=namespace)
    assert rendered.container("mgmt")["image"] == "registry.example.com/kopa:0.1.0"
    checked = [
        o
        for o in rendered.objects
        if o["apiVersion"].split("/")[0] not in ("monitoring.coreos.com", "cert-manager.io")
        and o["kind"] not in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration")
    ]
    webhooks = [o for o in rendered.objects if o["kind"].endswith("WebhookConfiguration")]
    manifest = goyaml.dump_all(checked + webhooks, sort_keys=False)
    # --dry-run=server: the webhook names a Service, so it is never created.
    result = run_kubectl(
        kube.admin_kubeconfig, "create", "--dry-run=server", "-o", "name", "-f", "-", stdin=manifest
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == len(checked) + len(webhooks)


def test_kube_mgmt_values_are_implemented_or_warned_about(
    helm: Helm, kube: KubeCluster, tmp_path: Path
) -> None:
    auto = render_files(helm, kube_mgmt_cases()["e2e-replicate_auto"])
    bundle_mount = {"name": "bundle-vol", "mountPath": "/bundle"}
    assert bundle_mount in auto.container("opa")["volumeMounts"]
    assert bundle_mount in auto.container("mgmt")["volumeMounts"], "extraVolumeMounts reach kopa too"
    check_reads_opas_configuration(auto)
    production = render_files(helm, kube_mgmt_cases()["production"])
    assert production.one("Service", "opa-kopa")["spec"]["trafficDistribution"] == "PreferClose"
    assert production.one("Service", "opa-kopa")["spec"]["ports"][0]["port"] == 8181, "kube-mgmt's port"
    labels = production.deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["app"] == "opa-kopa", "kube-mgmt's label: rules written for its pods match"
    assert "app" not in production.deployment["spec"]["selector"]["matchLabels"]
    webhook = webhook_of(production)
    assert webhook["timeoutSeconds"] == 5
    dns = helm.template(
        {"dnsPolicyOverride": "Default", "timeoutSeconds": 7, "admissionController": {"enabled": True}}
    )
    assert dns.pod_spec["dnsPolicy"] == "Default"
    assert webhook_of(dns)["timeoutSeconds"] == 7, "kube-mgmt's top-level timeoutSeconds wins when set"
    warned = notes(
        kube,
        tmp_path,
        {
            "mgmt": {"startupProbe": KUBE_MGMT_DEFAULTS["mgmt"]["startupProbe"]},
            "sar": {"enabled": True},
            "e2eMgmtTokenSecret": True,
        },
    )
    for warning in (
        "sar.enabled is ignored",
        "e2eMgmtTokenSecret",
        "probes port 8181",
    ):
        assert warning in warned, warned


# --- 10. auto-replication (issue 15) ------------------------------------------------------------------------


def check_reads_opas_configuration(rendered: Rendered) -> None:
    """kopa's --opa-config is the file OPA's --config-file names, mounted read-only from the same volume."""
    (opa_config,) = rendered.flag_values("mgmt", "opa-config")
    (config_file,) = rendered.flag_values("opa", "config-file")
    assert opa_config == config_file
    kopa_volume, kopa_key, read_only = mounted_file(rendered, "mgmt", opa_config)
    assert (kopa_volume, kopa_key) == mounted_file(rendered, "opa", config_file)[:2]
    assert read_only
    assert kopa_key in rendered.secret_data(kopa_volume["secret"]["secretName"])


def probe_target(rendered: Rendered, probe: dict[str, Any]) -> tuple[str, str, str]:
    """(the container whose port a probe of the pod reaches, its path, its scheme)."""
    http_get = probe["httpGet"]
    for item in rendered.pod_spec["containers"]:
        for port in item.get("ports", []):
            if http_get["port"] in (port.get("name"), port["containerPort"]):
                return item["name"], http_get["path"], http_get.get("scheme", "HTTP")
    raise AssertionError(f"no container of the pod listens on {http_get['port']}")


# Paths each container of the pod answers a probe on: kopa's own (/health is kube-mgmt's, answered as
# /readyz: test_operations.py), OPA's /health and its custom /health/ready.
PROBE_PATHS = {"mgmt": {"/healthz", "/readyz", "/health"}, "opa": {"/health", "/health/ready"}}


@pytest.mark.parametrize("over", ["the chart's defaults", "kube-mgmt's defaults"])
def test_kube_mgmts_auto_replication_values_install_with_a_server_dry_run(
    kube: KubeCluster, namespace: str, tmp_path: Path, over: str
) -> None:
    """opa-kube-mgmt's e2e values for auto mode, as its users have them (alone, or over its default values
    file): `helm install --dry-run=server` against the real API server, then every object it would create
    through the API server's own dry-run."""
    require_binaries("kubectl")
    e2e = [KUBE_MGMT_E2E["replicate_auto"], KOPA_IMAGE]
    layers = [KUBE_MGMT_DEFAULTS, *e2e] if over == "kube-mgmt's defaults" else e2e
    helm = Helm(tmp_path / "helm", kube.admin_kubeconfig)
    files = [helm.values_file(values, f"file{i}") for i, values in enumerate(layers)]
    result = helm.run(
        "install", "opa", str(CHART), f"--namespace={namespace}", "--dry-run=server", "--output=json",
        *(f"--values={path}" for path in files),
    )  # fmt: skip
    release = json.loads(result.stdout)
    rendered = Rendered.parse(release["manifest"], namespace)
    check_reads_opas_configuration(rendered)
    assert yaml.safe_load(rendered.secret_data("opa-kopa-config")["config.yaml"]) == {
        "bundles": {"test": {"resource": "file:///bundle/bundle.tar.gz"}}
    }
    assert rendered.flag_values("mgmt", "replicate-ignore-namespaces") == ["ignore-me"]
    assert "--log-level=debug" in rendered.args("mgmt")
    # Its services are granted through rbac.extraRules, as in its e2e test; autoRead is empty: no role.
    assert rendered.one("ClusterRole", f"{namespace}-opa-kopa-extra")["rules"] == SERVICES_RULE
    assert not rendered.find("ClusterRole", f"{namespace}-opa-kopa-auto")
    # Its startup probe (HTTP) reaches something that answers it: kopa's /healthz over the chart's
    # defaults, OPA's /health (plain HTTP here) over kube-mgmt's.
    where, path, scheme = probe_target(rendered, rendered.container("mgmt")["startupProbe"])
    assert path in PROBE_PATHS[where] and scheme == "HTTP", (where, path, scheme)
    assert where == ("mgmt" if over == "the chart's defaults" else "opa")
    notes_text = release["info"]["notes"]
    assert "Auto-replication is on" in notes_text, notes_text
    assert "services (core group): * (rbac.extraRules)" in notes_text, notes_text
    assert "WARNING: mgmt.replicate.auto" not in notes_text, notes_text
    created = run_kubectl(
        kube.admin_kubeconfig, "create", "--dry-run=server", "-o", "name", "-f", "-",
        stdin=goyaml.dump_all(rendered.objects, sort_keys=False),
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert len(created.stdout.split()) == len(rendered.objects)


def test_notes_say_what_auto_mode_may_read_and_warn_when_nothing(kube: KubeCluster, tmp_path: Path) -> None:
    opa = {"bundles": {"main": {"resource": "file:///bundle/bundle.tar.gz"}}}
    read = [
        {"apiGroups": [""], "resources": ["services", "namespaces"]},
        {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses"]},
    ]
    granted = notes(
        kube,
        tmp_path,
        {"opa": opa, "mgmt": {"replicate": {"auto": True, "autoRead": read, "cluster": ["v1/nodes"]}}},
    )
    for line in (
        "  - services, namespaces (core group): get, list, watch (mgmt.replicate.autoRead)",
        "  - ingresses (networking.k8s.io): get, list, watch (mgmt.replicate.autoRead)",
        "  - v1/nodes: get, list, watch (mgmt.replicate.cluster)",
    ):
        assert line in granted.splitlines(), granted
    assert "/config/config.yaml" in granted
    words = " ".join(granted.split())
    assert 'kopa reports it as "not readable (403)" in /readyz and its logs, and replicates the rest' in words
    assert "The chart grants no Secrets unless you list them." in words
    assert "WARNING" not in granted and "accepted and ignored" not in granted, granted
    nothing = notes(kube, tmp_path, {"opa": opa, "mgmt": {"replicate": {"auto": True}}})
    assert "WARNING: mgmt.replicate.auto is on but the chart grants it nothing to read" in nothing, nothing
    # Rules of rbac.extraRules that list and watch count; one that only gets does not.
    extra = notes(
        kube,
        tmp_path,
        {
            "opa": opa,
            "mgmt": {"replicate": {"auto": True}},
            "rbac": {"extraRules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]},
        },
    )
    assert "grants it nothing to read" in extra and "nodes" not in extra, extra
    off = notes(kube, tmp_path, {"mgmt": {"replicate": {"autoRead": read}}})
    assert "NOTE: mgmt.replicate.autoRead is set but mgmt.replicate.auto is off" in off, off
    assert "Auto-replication" not in off


def test_kube_mgmts_health_path_on_kopas_port_still_probes_kopa(kube: KubeCluster, tmp_path: Path) -> None:
    """opa-kube-mgmt's auto mode probed kube-mgmt's /health on port 8000: in kopa's values those probes
    reach kopa, which answers /health as kube-mgmt does, and NOTES do not take them for probes of OPA."""
    health = {"httpGet": {"path": "/health", "port": 8000}, "periodSeconds": 10}
    values = {"mgmt": {"startupProbe": health, "readinessProbe": health}}
    rendered = Helm(tmp_path / "helm").template(values)
    for probe in ("startupProbe", "readinessProbe"):
        where, path, _ = probe_target(rendered, rendered.container("mgmt")[probe])
        assert (where, path) == ("mgmt", "/health"), probe
    assert "probes port" not in notes(kube, tmp_path, values)
