"""kopa's Helm chart (helm/kopa): lint, renders over a matrix of values, the values schema, every rendered
object checked by the real kube-apiserver (server-side dry-run), and a real install and upgrade.

Objects of kinds whose CRDs are not installed here (prometheus-operator's ServiceMonitor, cert-manager's
Certificate and Issuer) cannot be dry-run; they are listed as unchecked (UNCHECKED_KINDS, also named in the
chart's README) and only checked structurally below. A webhook configuration that names a Service is
only ever dry-run, never created (the API server would call a cluster IP); the one created for real uses
a loopback URL, is scoped to the test's namespace and matches no resource anyone creates.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from app.settings import OPTIONS
from devstack import goyaml
from devstack.certs import TestCA
from devstack.demo import run_kubectl
from devstack.kube import KubeCluster
from devstack.processes import free_port
from tests.conftest import require_binaries
from tests.integration.chart import (
    CHART,
    CLUSTER_SCOPED,
    Helm,
    HelmError,
    Rendered,
    dashboard_metric_names,
    mounted_file,
    opa_image_tag,
)

pytestmark = pytest.mark.integration

# Kinds from CRDs that cannot be installed here: validated structurally only, never by the API server.
UNCHECKED_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
}

# Every flag kopa has or is getting; the chart must pass no other.
# Every flag kopa takes: the chart must pass no other.
KOPA_FLAGS = {option.name for option in OPTIONS}

KOPA_METRICS = {
    "workqueue_depth", "workqueue_adds_total", "workqueue_queue_duration_seconds",
    "workqueue_work_duration_seconds", "workqueue_unfinished_work_seconds",
    "workqueue_longest_running_processor_seconds", "workqueue_retries_total", "kopa_opa_requests_total",
    "kopa_opa_request_duration_seconds", "kopa_updates_coalesced_total", "kopa_watch_restarts_total",
    "kopa_replicated_objects", "kopa_policies_loaded", "kopa_policies_failed", "kopa_data_documents_loaded",
    "kopa_full_syncs_total", "kopa_last_full_sync_timestamp_seconds", "kopa_opa_restarts_total", "kopa_ready",
    "kopa_opa_up",
}  # fmt: skip

REPLICATION = {
    "namespace": ["v1/services", "apps/v1/deployments", "stable.example.com/v1/crontabs"],
    "cluster": [
        "v1/namespaces",
        "rbac.authorization.k8s.io/v1/clusterroles",
        "example.com/v1/clusterwidgets",
    ],
    "ignoreNs": ["kube-system", "ignore-me"],
    "selectors": {"v1/services": "team=payments,tier!=test"},
    "fields": {"v1/namespaces": ["metadata.labels", "metadata.name"]},
}

# Auto-replication: OPA's configuration names a bundle (its policies are what kopa analyses), and auto mode
# may read what autoRead lists, besides the statically replicated services.
AUTO_OPA = {
    "services": {"bundles": {"url": "https://bundles.example.com"}},
    "bundles": {"authz": {"service": "bundles", "resource": "bundles/authz.tar.gz"}},
}
AUTO_READ = [
    {"apiGroups": [""], "resources": ["services", "namespaces"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses"]},
]
READ = ["get", "list", "watch"]

MASK_POLICY = 'package system.log\n\nmask contains "/input/request/object/data"\n'

CASES = [
    "defaults",
    "two-namespaces",
    "authz-off",
    "https-off",
    "all-namespaces",
    "replication",
    "auto-replication",
    "webhook-on",
    "webhook-url",
    "cert-manager",
    "cert-manager-issuer",
    "existing-token",
    "user-certs",
    "existing-tls",
    "network-policy",
    "observability",
    "mgmt-off",
    "bundle",
]


def case_values(case: str, namespace: str, user_tls: dict[str, str]) -> dict[str, Any]:
    """The values of one matrix case for a release in `namespace`."""
    values: dict[str, dict[str, Any]] = {
        "defaults": {},
        "two-namespaces": {"mgmt": {"namespaces": [namespace, "default"]}},
        # kopa as a Deployment serving the bundle to OPA pods, with the webhook and replication on.
        "bundle": {
            "mode": "bundle",
            "replicas": 3,
            "mgmt": {"replicate": REPLICATION},
            "admissionController": {"enabled": True},
        },
        "authz-off": {"authz": {"enabled": False}},
        "https-off": {"useHttps": False},
        "all-namespaces": {"mgmt": {"namespaces": ["*"]}},
        "replication": {"mgmt": {"replicate": REPLICATION}},
        "auto-replication": {
            "opa": AUTO_OPA,
            "mgmt": {"replicate": {"auto": True, "autoRead": AUTO_READ, "namespace": ["v1/services"]}},
        },
        "webhook-on": {"admissionController": {"enabled": True}},
        "webhook-url": {
            "admissionController": {
                "enabled": True,
                "url": "https://127.0.0.1:9443",
                "path": "/v0/data/kubernetes/admission/main",
                "kind": "MutatingWebhookConfiguration",
                "failurePolicy": "Fail",
            }
        },
        "cert-manager": {"certManager": {"enabled": True}, "admissionController": {"enabled": True}},
        "cert-manager-issuer": {
            "certManager": {"enabled": True, "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}
        },
        "existing-token": {"authz": {"mgmtToken": {"secretName": "opa-token", "secretKey": "token"}}},
        "user-certs": {"generateCerts": False, **user_tls},
        "network-policy": {
            "networkPolicy": {
                "enabled": True,
                "opaFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
            },
            "prometheus": {"enabled": True},
        },
        "existing-tls": {
            "tls": {"existingSecret": "opa-tls"},
            "CA": user_tls["CA"],
            "admissionController": {"enabled": True},
        },
        "observability": {
            "serviceMonitor": {"enabled": True, "additionalLabels": {"release": "prometheus"}},
            "prometheus": {"enabled": True},
            "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "OPA"}},
            "podDisruptionBudget": {"enabled": True},
            "opa": {"decision_logs": {"console": True}},
            "bootstrapPolicies": {"mask": MASK_POLICY},
            "rbac": {"extraRules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]},
            "replicas": 2,
        },
        "mgmt-off": {"mgmt": {"enabled": False}},
    }
    return values[case]


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """helm without a cluster: lint and template."""
    return Helm(tmp_path_factory.mktemp("helm"))


@pytest.fixture(scope="session")
def user_tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA and a certificate for OPA's Service (and 127.0.0.1) as a user would bring them."""
    ca = TestCA(tmp_path_factory.mktemp("user-ca"))
    cert, key = ca.issue("kopa.kopa-system.svc", ips=["127.0.0.1"], dns=["kopa.kopa-system.svc"])
    return {"CA": ca.ca_file.read_text(), "cert": cert.read_text(), "key": key.read_text()}


def kubectl(kube: KubeCluster, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    require_binaries("kubectl")
    return run_kubectl(kube.admin_kubeconfig, *args, stdin=stdin, timeout=120)


# --- lint and schema ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    ["defaults", "replication", "auto-replication", "webhook-on", "observability", "mgmt-off", "bundle"],
)
def test_helm_lint_is_clean(helm: Helm, case: str, user_tls: dict[str, str]) -> None:
    values = helm.values_file(case_values(case, "kopa-system", user_tls))
    image = helm.image_values()
    result = helm.run(
        "lint", str(CHART), "--strict", f"--values={image}", f"--values={values}", "--namespace=kopa-system"
    )
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    findings = [line for line in result.stdout.splitlines() if re.match(r"\[(INFO|WARNING|ERROR)\]", line)]
    assert findings == [], result.stdout


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"port": "8181"}, "port"),
        ({"replicas": -1}, "replicas"),
        ({"useHttps": "yes"}, "useHttps"),
        ({"authz": {"enabled": 1}}, "authz"),
        ({"mgmt": {"namespaces": "default"}}, "namespaces"),
        ({"mgmt": {"namespaces": ["Not_A_Namespace"]}}, "namespaces"),
        ({"mgmt": {"replicate": {"namespace": ["services"]}}}, "namespace"),
        ({"mgmt": {"replicate": {"cluster": "v1/namespaces"}}}, "cluster"),
        ({"mgmt": {"logLevel": "loud"}}, "logLevel"),
        ({"mgmt": {"healthPort": 70000}}, "healthPort"),
        ({"admissionController": {"url": "http://opa.example.com"}}, "url"),
        ({"admissionController": {"failurePolicy": "Sometimes"}}, "failurePolicy"),
        ({"admissionController": {"path": "no-slash"}}, "path"),
        ({"serviceMonitor": {"enabled": "true"}}, "serviceMonitor"),
        ({"bootstrapPolicies": {"x": {"not": "rego"}}}, "bootstrapPolicies"),
        ({"extraArgs": "--foo"}, "extraArgs"),
        ({"certManager": {"issuerRef": {"kind": "Vault"}}}, "kind"),
        ({"nonsense": True}, "nonsense"),
        ({"opa": True}, "opa"),
        ({"opa": "decision_logs: {}"}, "opa"),
        ({"mgmt": {"replicas": 2}}, "replicas"),
        ({"mgmt": {"replicate": {"auto": "yes"}}}, "auto"),
        ({"mgmt": {"replicate": {"autoRead": {"apiGroups": [""], "resources": ["pods"]}}}}, "autoRead"),
        ({"mgmt": {"replicate": {"autoRead": [{"resources": ["pods"]}]}}}, "apiGroups"),
        ({"mgmt": {"replicate": {"autoRead": [{"apiGroups": [""], "resources": []}]}}}, "resources"),
        (
            {
                "mgmt": {
                    "replicate": {"autoRead": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]}]}
                }
            },
            "verbs",
        ),
    ],
)
def test_values_schema_rejects_wrong_types_and_unknown_keys(
    helm: Helm, values: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(HelmError) as refused:
        helm.template(values)
    output = refused.value.result.stderr
    assert "values don't meet the specifications of the schema" in output, output
    assert complaint in output, output


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"generateCerts": False}, "needs CA, cert and key"),
        ({"useHttps": False, "admissionController": {"enabled": True}}, "needs useHttps"),
        ({"mgmt": {"replicate": {"selectors": {"v1/pods": "a=b"}}}}, "not replicated"),
        ({"mgmt": {"replicate": {"namespace": ["v1/pods"], "cluster": ["v1/pods"]}}}, "either namespaced"),
        ({"bootstrapPolicies": {"authz": "package x"}}, "the chart's own"),
        ({"mgmt": {"replicate": {"auto": True}}}, "mgmt.replicate.auto needs opa"),
        (
            {
                "opa": AUTO_OPA,
                "mgmt": {"replicate": {"auto": True, "autoRead": [{"apiGroups": [""], "resources": ["*"]}]}},
            },
            "a wildcard would grant Secrets",
        ),
        (
            {
                "opa": AUTO_OPA,
                "mgmt": {
                    "replicate": {"auto": True, "autoRead": [{"apiGroups": ["*"], "resources": ["pods"]}]}
                },
            },
            "a wildcard would grant Secrets",
        ),
        ({"mode": "bundle", "mgmt": {"enabled": False}}, "mode: bundle needs mgmt.enabled"),
        (
            {"mode": "bundle", "opa": AUTO_OPA, "mgmt": {"replicate": {"auto": True}}},
            "not available with mode: bundle yet",
        ),
        ({"mode": "bundle", "serviceMonitor": {"enabled": True}}, "do not cover kopa's own pods"),
        ({"mode": "bundle", "opa": {"services": [{"name": "x"}]}}, "write opa.services as a map"),
    ],
)
def test_chart_refuses_contradictory_values(helm: Helm, values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(HelmError) as refused:
        helm.template(values)
    assert complaint in refused.value.result.stderr


# --- the matrix --------------------------------------------------------------------------------------------


def check_invariants(r: Rendered) -> None:
    """What holds for every render."""
    for obj in r.objects:
        meta = obj["metadata"]
        assert meta["labels"]["app.kubernetes.io/instance"] == "kopa", meta
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in meta, meta
        else:
            assert meta.get("namespace"), f"{obj['kind']} {meta['name']} has no namespace"
    pod = r.pod_spec
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert "enabled" not in pod["securityContext"]
    for item in r.containers():
        sc = item["securityContext"]
        where = f"container {item['name']}"
        assert sc["runAsNonRoot"] is True, where
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["readOnlyRootFilesystem"] is True, where
        assert sc["capabilities"]["drop"] == ["ALL"], where
        assert sc.get("privileged") is not True, where
        assert {"cpu", "memory"} <= set(item["resources"]["requests"]), where
        for mount in item.get("volumeMounts", []):
            assert any(v["name"] == mount["name"] for v in pod["volumes"]), f"{where}: {mount}"
    assert r.container("opa")["image"] == f"openpolicyagent/opa:{opa_image_tag()}"
    for volume in pod["volumes"]:
        if "configMap" in volume:
            assert r.find("ConfigMap", volume["configMap"]["name"]), volume
        if "secret" in volume:
            name = volume["secret"]["secretName"]
            certificates = [c["spec"]["secretName"] for c in r.of_kind("Certificate")]
            assert r.find("Secret", name) or name in certificates or name in ("opa-token", "opa-tls"), volume
    opa_args = r.args("opa")
    assert opa_args[:2] == ["run", "--server"]
    (addr,) = r.flag_values("opa", "addr")
    opa_port = int(addr.rsplit(":", 1)[1])
    assert any(p["containerPort"] == opa_port and p["name"] == "opa" for p in r.container("opa")["ports"])
    service = r.one("Service", "kopa")
    assert service["spec"]["ports"][0]["targetPort"] == "opa"
    assert (
        service["spec"]["selector"].items() <= r.deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    annotations = r.deployment["spec"]["template"]["metadata"]["annotations"]
    assert {"checksum/bootstrap", "checksum/tls"} <= set(annotations)
    assert r.container("opa")["livenessProbe"]["httpGet"]["path"] == "/health"
    if not r.has_container("mgmt"):
        return
    kopa = r.container("mgmt")
    flags = {arg.removeprefix("--").split("=", 1)[0] for arg in r.args("mgmt")}
    assert flags <= KOPA_FLAGS, flags - KOPA_FLAGS
    (opa_url,) = r.flag_values("mgmt", "opa-url")
    assert opa_url.endswith(f"://127.0.0.1:{opa_port}/v1")
    (health,) = r.flag_values("mgmt", "health-endpoint")
    health_port = int(health.rsplit(":", 1)[1])
    assert kopa["ports"] == [{"name": "health", "containerPort": health_port}]
    for probe, path in (
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ):
        assert kopa[probe]["httpGet"] == {"path": path, "port": "health"}, probe
    assert r.container("opa")["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert "kopa-health.rego" in r.one("ConfigMap", "kopa-bootstrap")["data"]
    assert r.pod_spec["serviceAccountName"] == "kopa"
    assert r.pod_spec["automountServiceAccountToken"] is False, "only kopa's container gets a token"
    (namespaces,) = r.flag_values("mgmt", "namespaces")
    assert namespaces


def rules_of(obj: dict[str, Any]) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = obj["rules"]
    return rules


CONFIGMAP_RULES = [
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
]


def check_case(case: str, r: Rendered, user_tls: dict[str, str]) -> None:
    ns = r.namespace
    bootstrap = r.one("ConfigMap", "kopa-bootstrap")["data"]
    webhooks = r.of_kind("ValidatingWebhookConfiguration") + r.of_kind("MutatingWebhookConfiguration")
    if case not in ("webhook-on", "webhook-url", "cert-manager", "existing-tls", "bundle"):
        assert webhooks == [], "the webhook is off by default"
    if case in ("defaults", "two-namespaces", "authz-off", "https-off", "existing-token", "user-certs"):
        assert not r.of_kind("ClusterRole"), (
            "no ClusterRole unless namespaces is * or something is replicated"
        )
    if case == "bundle":
        check_bundle_mode(r)
    if case == "defaults":
        assert r.kinds() == [
            "ConfigMap",
            "Deployment",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Secret",
            "Service",
            "ServiceAccount",
        ]
        role = r.one("Role")
        assert role["metadata"]["namespace"] == ns
        assert rules_of(role) == CONFIGMAP_RULES
        binding = r.one("RoleBinding")
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kopa", "namespace": ns}]
        assert r.flag_values("mgmt", "namespaces") == [ns]
        assert r.flag_values("mgmt", "opa-ca-file") == ["/certs/ca.crt"]
        assert r.flag_values("mgmt", "opa-auth-token-file") == ["/mgmt-token/mgmt-token"]
        assert "--opa-allow-insecure" not in r.args("mgmt")
        assert {"--authentication=token", "--authorization=basic", "/bootstrap"} <= set(r.args("opa"))
        assert not any(a.startswith("--tls-cert-refresh-period") for a in r.args("opa"))
        assert "authz.rego.tmpl" in bootstrap
        secret = r.secret_data("kopa-cert")
        assert set(secret) == {"ca.crt", "tls.crt", "tls.key"}
        assert r.container("opa")["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
        token_mounts = [
            m["name"] for c in r.containers() for m in c.get("volumeMounts", []) if m["name"] == "mgmt-token"
        ]
        assert len(token_mounts) == 2, "only the init container and kopa see the token"
        assert not any(m["name"] == "mgmt-token" for m in r.container("opa")["volumeMounts"])
    elif case == "two-namespaces":
        roles = {role["metadata"]["namespace"]: role for role in r.of_kind("Role")}
        assert set(roles) == {ns, "default"}
        assert {b["metadata"]["namespace"] for b in r.of_kind("RoleBinding")} == {ns, "default"}
        assert r.flag_values("mgmt", "namespaces") == [f"{ns},default"]
    elif case == "authz-off":
        assert not {"--authentication=token", "--authorization=basic"} & set(r.args("opa"))
        assert not r.flag_values("mgmt", "opa-auth-token-file")
        assert "authz.rego.tmpl" not in bootstrap
        assert {e["name"]: e["value"] for e in r.container("init")["env"]}["AUTHZ"] == "false"
    elif case == "https-off":
        assert not r.of_kind("Secret")
        assert r.flag_values("mgmt", "opa-url")[0].startswith("http://")
        assert not r.flag_values("mgmt", "opa-ca-file")
        assert not any(a.startswith("--tls") for a in r.args("opa"))
        assert r.container("opa")["readinessProbe"]["httpGet"]["scheme"] == "HTTP"
        assert not any(v["name"] == "certs" for v in r.pod_spec["volumes"])
        assert r.one("Service")["spec"]["ports"][0]["name"] == "http"
    elif case == "all-namespaces":
        assert not r.of_kind("Role") and not r.of_kind("RoleBinding")
        role = r.one("ClusterRole")
        assert rules_of(role) == CONFIGMAP_RULES
        assert r.one("ClusterRoleBinding")["roleRef"]["name"] == role["metadata"]["name"]
        assert r.flag_values("mgmt", "namespaces") == ["*"]
    elif case == "replication":
        replicate = r.one("ClusterRole", f"{ns}-kopa-replicate")
        assert rules_of(replicate) == [
            {"apiGroups": [""], "resources": ["namespaces", "services"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "watch"]},
            {
                "apiGroups": ["example.com"],
                "resources": ["clusterwidgets"],
                "verbs": ["get", "list", "watch"],
            },
            {
                "apiGroups": ["rbac.authorization.k8s.io"],
                "resources": ["clusterroles"],
                "verbs": ["get", "list", "watch"],
            },
            {
                "apiGroups": ["stable.example.com"],
                "resources": ["crontabs"],
                "verbs": ["get", "list", "watch"],
            },
        ]
        assert r.one("ClusterRoleBinding", f"{ns}-kopa-replicate")["subjects"][0]["name"] == "kopa"
        assert r.flag_values("mgmt", "replicate") == REPLICATION["namespace"]
        assert r.flag_values("mgmt", "replicate-cluster") == REPLICATION["cluster"]
        assert r.flag_values("mgmt", "replicate-ignore-namespaces") == ["kube-system,ignore-me"]
        assert r.flag_values("mgmt", "replicate-selector") == ["v1/services=team=payments,tier!=test"]
        assert r.flag_values("mgmt", "replicate-fields") == ["v1/namespaces=metadata.labels,metadata.name"]
        assert r.flag_values("mgmt", "replicate-path") == ["kubernetes"]
        assert r.one("Role")["metadata"]["namespace"] == ns, "ConfigMaps stay namespaced"
    elif case == "auto-replication":
        check_auto_replication(r)
    elif case == "webhook-on":
        (webhook,) = r.one("ValidatingWebhookConfiguration")["webhooks"]
        ca = r.secret_data("kopa-cert")["ca.crt"]
        assert base64.b64decode(webhook["clientConfig"]["caBundle"]) == ca
        assert webhook["clientConfig"]["service"] == {
            "name": "kopa",
            "namespace": ns,
            "port": 8181,
            "path": "/",
        }
        assert webhook["failurePolicy"] == "Ignore"
        assert webhook["sideEffects"] == "None"
        assert 'input.path == [""]' in bootstrap["authz.rego.tmpl"]
    elif case == "webhook-url":
        (webhook,) = r.one("MutatingWebhookConfiguration")["webhooks"]
        assert webhook["clientConfig"]["url"] == "https://127.0.0.1:9443/v0/data/kubernetes/admission/main"
        assert "service" not in webhook["clientConfig"]
        assert webhook["failurePolicy"] == "Fail"
        assert 'input.path == ["v0","data","kubernetes","admission","main"]' in bootstrap["authz.rego.tmpl"]
    elif case == "cert-manager":
        assert not r.of_kind("Secret"), "cert-manager writes the TLS Secret"
        serving = r.one("Certificate", "kopa-cert")["spec"]
        assert serving["secretName"] == "kopa-cert"
        assert serving["ipAddresses"] == ["127.0.0.1"]
        assert f"kopa.{ns}.svc" in serving["dnsNames"]
        assert serving["issuerRef"] == {"name": "kopa-ca", "kind": "Issuer"}
        ca_cert = r.one("Certificate", "kopa-ca")["spec"]
        assert ca_cert["isCA"] is True
        assert ca_cert["issuerRef"]["name"] == "kopa-selfsigned"
        assert r.one("Issuer", "kopa-ca")["spec"] == {"ca": {"secretName": ca_cert["secretName"]}}
        assert r.one("Issuer", "kopa-selfsigned")["spec"] == {"selfSigned": {}}
        config = r.one("ValidatingWebhookConfiguration")
        assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{ns}/kopa-cert"
        assert "caBundle" not in config["webhooks"][0]["clientConfig"]
        assert any(v.get("secret", {}).get("secretName") == "kopa-cert" for v in r.pod_spec["volumes"])
        assert "--tls-cert-refresh-period=1h" in r.args("opa"), "renewed certificates are picked up"
    elif case == "cert-manager-issuer":
        assert [c["metadata"]["name"] for c in r.of_kind("Certificate")] == ["kopa-cert"]
        assert not r.of_kind("Issuer")
        assert r.one("Certificate")["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer"}
    elif case == "existing-token":
        volume = next(v for v in r.pod_spec["volumes"] if v["name"] == "mgmt-token-source")
        assert volume["secret"] == {"secretName": "opa-token", "items": [{"key": "token", "path": "token"}]}
        env = {e["name"]: e["value"] for e in r.container("init")["env"]}
        assert env["TOKEN_FILE"] == "/mgmt-token-source/token"
        assert not any(m["name"] == "mgmt-token-source" for m in r.container("mgmt")["volumeMounts"])
    elif case == "user-certs":
        secret = r.secret_data("kopa-cert")
        assert secret["ca.crt"].decode() == user_tls["CA"]
        assert secret["tls.crt"].decode() == user_tls["cert"]
        assert secret["tls.key"].decode() == user_tls["key"]
    elif case == "network-policy":
        policy = r.one("NetworkPolicy")["spec"]
        assert policy["podSelector"] == r.deployment["spec"]["selector"]
        assert policy["policyTypes"] == ["Ingress"]
        opa_rule, metrics_rule = policy["ingress"]
        assert opa_rule == {
            "ports": [{"port": "opa", "protocol": "TCP"}],
            "from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
        }
        assert [p["port"] for p in metrics_rule["ports"]] == ["health", "diag"]
        assert metrics_rule["from"] == [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]
        names = {p["name"] for c in r.containers() for p in c.get("ports", [])}
        assert {"opa", "health", "diag"} <= names, "the policy's named ports exist"
    elif case == "existing-tls":
        assert not r.of_kind("Secret"), "the chart makes no certificate"
        certs = next(v for v in r.pod_spec["volumes"] if v["name"] == "certs")
        assert certs["secret"] == {"secretName": "opa-tls"}
        (webhook,) = r.one("ValidatingWebhookConfiguration")["webhooks"]
        assert base64.b64decode(webhook["clientConfig"]["caBundle"]).decode() == user_tls["CA"]
        assert "--tls-cert-refresh-period=1h" in r.args("opa"), "a renewed certificate is picked up"
    elif case == "observability":
        monitor = r.one("ServiceMonitor")
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
        metrics_service = r.one("Service", "kopa-metrics")
        service_ports = {p["name"]: p for p in metrics_service["spec"]["ports"]}
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["kopa-metrics", "opa-metrics"]
        assert set(service_ports) == {"kopa-metrics", "opa-metrics"}
        assert service_ports["kopa-metrics"]["targetPort"] == "health"
        assert service_ports["opa-metrics"]["targetPort"] == "diag"
        assert (
            monitor["spec"]["selector"]["matchLabels"].items()
            <= metrics_service["metadata"]["labels"].items()
        )
        assert (
            not monitor["spec"]["selector"]["matchLabels"].items()
            <= r.one("Service", "kopa")["metadata"]["labels"].items()
        )
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [ns]}
        assert "--diagnostic-addr=http://0.0.0.0:8182" in r.args("opa")
        assert 'input.path == ["metrics"]' in bootstrap["authz.rego.tmpl"]
        dashboard = r.one("ConfigMap", "kopa-dashboard")
        assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert dashboard["metadata"]["annotations"] == {"grafana_folder": "OPA"}
        assert json.loads(dashboard["data"]["kopa.json"])["uid"] == "kopa-overview"
        assert r.one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
        config = yaml.safe_load(r.secret_data("kopa-config")["config.yaml"])
        assert config == {"decision_logs": {"console": True}}
        assert "--config-file=/config/config.yaml" in r.args("opa")
        assert "mask.rego" in bootstrap
        assert rules_of(r.one("ClusterRole", f"{ns}-kopa-extra")) == [
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}
        ]
        assert r.deployment["spec"]["replicas"] == 2
        assert "checksum/config" in r.deployment["spec"]["template"]["metadata"]["annotations"]
    elif case == "mgmt-off":
        assert [c["name"] for c in r.containers()] == ["init", "opa"]
        assert not [
            o for o in r.objects if o["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
        ]
        assert r.container("opa")["readinessProbe"]["httpGet"]["path"] == "/health?plugins"
        assert r.pod_spec["automountServiceAccountToken"] is False
        assert "kopa-health.rego" not in bootstrap


def check_auto_replication(r: Rendered) -> None:
    """kopa reads OPA's own configuration file, from the same Secret, read-only; auto mode may read exactly
    what autoRead lists, with read verbs only; static replication keeps its own rules."""
    ns = r.namespace
    (opa_config,) = r.flag_values("mgmt", "opa-config")
    (config_file,) = r.flag_values("opa", "config-file")
    assert opa_config == config_file, "kopa reads the file OPA reads"
    kopa_volume, kopa_key, kopa_read_only = mounted_file(r, "mgmt", opa_config)
    opa_volume, opa_key, _ = mounted_file(r, "opa", config_file)
    assert (kopa_volume, kopa_key) == (opa_volume, opa_key), "the same volume and key as OPA's"
    assert kopa_read_only, "kopa cannot write OPA's configuration"
    assert kopa_volume["secret"]["secretName"] == "kopa-config"
    assert yaml.safe_load(r.secret_data("kopa-config")[kopa_key]) == AUTO_OPA
    assert not r.flag_values("mgmt", "analysis-entrypoint"), "kopa's default, kube-mgmt's main/main"
    auto = r.one("ClusterRole", f"{ns}-kopa-auto")
    assert rules_of(auto) == [{**rule, "verbs": READ} for rule in AUTO_READ]
    binding = r.one("ClusterRoleBinding", f"{ns}-kopa-auto")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": auto["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kopa", "namespace": ns}]
    assert rules_of(r.one("ClusterRole", f"{ns}-kopa-replicate")) == [
        {"apiGroups": [""], "resources": ["services"], "verbs": READ}
    ]
    assert r.flag_values("mgmt", "replicate") == ["v1/services"]
    granted = [rule for role in r.of_kind("ClusterRole", "Role") for rule in rules_of(role)]
    assert not [rule for rule in granted if "secrets" in rule["resources"] or "*" in rule["resources"]]


def check_bundle_mode(r: Rendered) -> None:
    """kopa as a Deployment of its own, serving the bundle the OPA pods download from its Service with the
    token and long polling; a validation OPA on loopback in kopa's pod; the Lease granted by name."""
    ns = r.namespace
    assert not r.has_container("mgmt"), "no sidecar in bundle mode"
    assert r.container("opa")["readinessProbe"]["httpGet"]["path"] == "/health?bundles"
    assert r.deployment["spec"]["replicas"] == 3
    config = yaml.safe_load(r.secret_data("kopa-config")["config.yaml"])
    service = config["services"]["kopa"]
    assert service["url"] == f"https://kopa-mgmt.{ns}.svc:8443"
    assert service["tls"] == {"ca_cert": "/certs/ca.crt"}
    bundle = config["bundles"]["kopa"]
    assert (bundle["service"], bundle["resource"]) == ("kopa", "bundles/kopa")
    assert bundle["polling"]["long_polling_timeout_seconds"] == 30
    assert config["status"] == {"service": "kopa"}, "the OPAs report their revision to kopa"
    volume, key, read_only = mounted_file(r, "opa", service["credentials"]["bearer"]["token_path"])
    assert (volume["secret"]["secretName"], key, read_only) == ("kopa-bundle-token", "token", True)
    assert r.secret_data("kopa-bundle-token")["token"]
    bootstrap = r.one("ConfigMap", "kopa-bootstrap")["data"]
    assert "authz.rego.tmpl" in bootstrap and "kopa-health.rego" not in bootstrap

    kopa = r.mgmt_deployment
    assert kopa["spec"]["replicas"] == 2
    pod = kopa["spec"]["template"]
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    args = containers["mgmt"]["args"]
    assert {
        "--opa-url=http://127.0.0.1:8181/v1",
        "--bundle-endpoint=0.0.0.0:8443",
        "--bundle-token-file=/bundle-token/token",
        "--bundle-reserved-roots=system",
        "--bundle-tls-cert-file=/certs/tls.crt",
        "--leader-election=true",
        "--leader-election-lease-name=kopa",
    } <= set(args)
    flags = {arg.removeprefix("--").split("=", 1)[0] for arg in args}
    assert flags <= KOPA_FLAGS, flags - KOPA_FLAGS
    assert "--addr=127.0.0.1:8181" in containers["opa-validation"]["args"], "the validation OPA: loopback"
    labels = pod["metadata"]["labels"]
    kopa_service = r.one("Service", "kopa-mgmt")
    assert kopa_service["spec"]["selector"].items() <= labels.items()
    assert kopa_service["spec"]["ports"] == [
        {"name": "bundle", "port": 8443, "targetPort": "bundle", "protocol": "TCP"}
    ]
    assert not r.one("Service", "kopa")["spec"]["selector"].items() <= labels.items(), "OPA's Service"
    budget = r.one("PodDisruptionBudget", "kopa-mgmt")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert rules_of(r.one("Role", "kopa-leader-election")) == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["kopa"],
         "verbs": ["get", "update"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    ]  # fmt: skip
    (webhook,) = r.one("ValidatingWebhookConfiguration")["webhooks"]
    assert webhook["clientConfig"]["service"]["name"] == "kopa", "the webhook calls the OPA pods"


@pytest.mark.parametrize("case", CASES)
def test_helm_template_matrix(helm: Helm, case: str, user_tls: dict[str, str]) -> None:
    rendered = helm.template(case_values(case, "kopa-system", user_tls), namespace="kopa-system")
    check_invariants(rendered)
    check_case(case, rendered, user_tls)


def test_auto_read_is_granted_only_with_auto_and_changing_it_restarts_no_pod(helm: Helm) -> None:
    plain = {"useHttps": False, "opa": AUTO_OPA}  # no generated certificate: two renders can be compared
    off = helm.template({**plain, "mgmt": {"replicate": {"autoRead": AUTO_READ}}})
    assert not off.find("ClusterRole", "kopa-system-kopa-auto"), "autoRead alone grants nothing"
    assert not off.flag_values("mgmt", "opa-config")
    assert not any(m["name"] == "config" for m in off.container("mgmt")["volumeMounts"]), (
        "without auto, kopa does not see OPA's configuration"
    )
    nothing = helm.template({**plain, "mgmt": {"replicate": {"auto": True}}})
    assert not nothing.of_kind("ClusterRole"), "no empty ClusterRole"
    assert nothing.flag_values("mgmt", "opa-config") == ["/config/config.yaml"]
    more = helm.template({**plain, "mgmt": {"replicate": {"auto": True, "autoRead": AUTO_READ}}})
    assert more.deployment == nothing.deployment, "a new grant is an RBAC change only: the pods stay"


def test_bundle_mode_keeps_a_status_service_given_in_opa(helm: Helm) -> None:
    """OPA reports to one status service: the OPAs report to kopa unless opa.status names another."""
    status = {"service": "control-plane", "console": True}
    services = {"control-plane": {"url": "https://cp.example.com"}}
    rendered = helm.template(
        {"mode": "bundle", "useHttps": False, "opa": {"services": services, "status": status}}
    )
    config = yaml.safe_load(rendered.secret_data("kopa-config")["config.yaml"])
    assert config["status"] == status
    assert set(config["services"]) == {"control-plane", "kopa"}


def test_chart_ships_the_opa_version_kopa_is_tested_against() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert values["image"]["tag"] == opa_image_tag(), "keep image.tag equal to OPA_VERSION in versions.env"
    assert chart["annotations"]["kopa/opa-version"] == opa_image_tag()


def test_generated_certificate_serves_the_service_and_loopback(helm: Helm, tmp_path: Path) -> None:
    """The generated certificate names the Service and IP 127.0.0.1 (where kopa verifies OPA), and its CA
    is the one the webhook's caBundle carries."""
    rendered = helm.template({"admissionController": {"enabled": True}}, namespace="opa")
    secret = rendered.secret_data("kopa-cert")
    (tmp_path / "tls.crt").write_bytes(secret["tls.crt"])
    (tmp_path / "ca.crt").write_bytes(secret["ca.crt"])
    text = subprocess.run(
        ["openssl", "x509", "-in", str(tmp_path / "tls.crt"), "-noout", "-text"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    for name in (
        "DNS:kopa.opa.svc",
        "DNS:kopa.opa",
        "DNS:kopa.opa.svc.cluster.local",
        "IP Address:127.0.0.1",
    ):
        assert name in text, text
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "tls.crt")],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    (webhook,) = rendered.one("ValidatingWebhookConfiguration")["webhooks"]
    assert base64.b64decode(webhook["clientConfig"]["caBundle"]) == secret["ca.crt"]


def test_dashboard_charts_every_kopa_metric_and_nothing_else() -> None:
    dashboard = json.loads((CHART / "dashboards" / "kopa.json").read_text(encoding="utf-8"))
    used = dashboard_metric_names(dashboard)
    base = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert base == KOPA_METRICS, (sorted(base - KOPA_METRICS), sorted(KOPA_METRICS - base))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert 'pod=~"$pod"' in target["expr"], (panel["title"], target["expr"])
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# Sections of values.yaml whose keys the README's table names one by one; other maps are free-form
# (probes, resources, selectors, OPA's configuration).
SECTIONS = {
    "", "image", "authz", "prometheus", "mgmt", "mgmt.replicate", "certManager", "admissionController",
    "rbac", "serviceAccount", "service", "serviceMonitor", "grafanaDashboard", "podDisruptionBudget",
    "hostNetwork", "tls", "networkPolicy",
}  # fmt: skip


def test_chart_readme_documents_every_value_and_the_unchecked_kinds() -> None:
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))

    def keys(node: Any, prefix: str) -> Iterator[str]:
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else key
            if path in SECTIONS and isinstance(value, dict):
                yield from keys(value, path)
            else:
                yield path

    missing = [key for key in keys(values, "") if f"`{key}`" not in readme]
    assert missing == [], f"keys of values.yaml the chart's README does not describe: {missing}"
    for api_version, kind in UNCHECKED_KINDS:
        assert f"`{kind}`" in readme, kind
        assert api_version.split("/")[0] in readme, api_version


# --- the real API server -----------------------------------------------------------------------------------


def is_unchecked(obj: dict[str, Any]) -> bool:
    return (obj["apiVersion"], obj["kind"]) in UNCHECKED_KINDS


@pytest.mark.parametrize("case", CASES)
def test_every_rendered_object_passes_server_side_dry_run(
    helm: Helm, kube: KubeCluster, namespace: str, case: str, user_tls: dict[str, str]
) -> None:
    rendered = helm.template(case_values(case, namespace, user_tls), namespace=namespace)
    checked = [obj for obj in rendered.objects if not is_unchecked(obj)]
    unchecked = [obj for obj in rendered.objects if is_unchecked(obj)]
    manifest = goyaml.dump_all(checked, sort_keys=False)
    result = kubectl(kube, "create", "--dry-run=server", "-o", "name", "-f", "-", stdin=manifest)
    assert result.returncode == 0, result.stderr
    names = result.stdout.split()
    assert len(names) == len(checked), names
    if unchecked:
        print(  # the test's output lists what the API server could not check
            f"{case}: unchecked (CRD not installed here): "
            + ", ".join(f"{o['kind']}/{o['metadata']['name']}" for o in unchecked)
        )


def installed_secret(core_v1: client.CoreV1Api, namespace: str) -> dict[str, str]:
    secret = core_v1.read_namespaced_secret("kopa-cert", namespace)
    return {key: str(value) for key, value in (secret.data or {}).items()}


@pytest.fixture
def helm_kube(kube: KubeCluster, tmp_path: Path) -> Helm:
    """helm with the admin kubeconfig of the session's cluster."""
    return Helm(tmp_path / "helm", kube.admin_kubeconfig)


def test_install_then_upgrade_keeps_the_certificate_and_the_ca_bundle(
    helm_kube: Helm, kube: KubeCluster, namespace: str, core_v1: client.CoreV1Api, k8s: client.ApiClient
) -> None:
    apps = client.AppsV1Api(k8s)
    admission = client.AdmissionregistrationV1Api(k8s)
    chart = str(CHART)
    base = helm_kube.values_file({"mgmt": {"namespaces": [namespace]}})
    image = helm_kube.image_values()
    release = [
        "kopa",
        chart,
        f"--namespace={namespace}",
        f"--values={image}",
        f"--values={base}",
        "--timeout=60s",
    ]

    def deployment() -> Any:
        return apps.read_namespaced_deployment("kopa", namespace)

    try:
        helm_kube.run("install", *release)
        secret = installed_secret(core_v1, namespace)
        assert set(secret) == {"ca.crt", "tls.crt", "tls.key"}
        first = deployment()
        checksum = first.spec.template.metadata.annotations["checksum/tls"]

        # The same values again: nothing in the Deployment changes, so no pod would restart.
        helm_kube.run("upgrade", *release)
        assert installed_secret(core_v1, namespace) == secret
        assert deployment().metadata.generation == first.metadata.generation

        # A real change: the Deployment changes, the certificate and its checksum do not.
        helm_kube.run("upgrade", *release, "--set=mgmt.logLevel=debug")
        assert installed_secret(core_v1, namespace) == secret
        changed = deployment()
        assert changed.metadata.generation > first.metadata.generation
        assert changed.spec.template.metadata.annotations["checksum/tls"] == checksum
        kopa = next(c for c in changed.spec.template.spec.containers if c.name == "mgmt")
        assert "--log-level=debug" in kopa.args

        # The webhook pointing at the Service, rendered against the live release (lookup works with
        # --dry-run=server) but never created: its caBundle is the CA the release keeps.
        preview = helm_kube.run(
            "upgrade", *release, "--set=admissionController.enabled=true", "--dry-run=server", "--output=json"
        )
        manifest = list(yaml.safe_load_all(json.loads(preview.stdout)["manifest"]))
        (config,) = [o for o in manifest if o and o["kind"] == "ValidatingWebhookConfiguration"]
        assert config["webhooks"][0]["clientConfig"]["service"]["name"] == "kopa"
        assert config["webhooks"][0]["clientConfig"]["caBundle"] == secret["ca.crt"]
        (tls,) = [o for o in manifest if o and o["kind"] == "Secret" and o["metadata"]["name"] == "kopa-cert"]
        assert tls["data"] == secret
        with pytest.raises(client.ApiException) as absent:
            admission.read_validating_webhook_configuration(f"{namespace}-kopa")
        assert absent.value.status == 404

        # A webhook created for real: a loopback URL nothing listens on, only for this test's namespace,
        # and only for a resource nobody creates, so the API server never calls it.
        webhook = helm_kube.values_file(
            {
                "admissionController": {
                    "enabled": True,
                    "url": f"https://127.0.0.1:{free_port()}",
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                    "rules": [
                        {
                            "operations": ["CREATE"],
                            "apiGroups": ["kopa.test.invalid"],
                            "apiVersions": ["v1"],
                            "resources": ["nothing"],
                        }
                    ],
                }
            },
            "webhook",
        )
        helm_kube.run("upgrade", *release, f"--values={webhook}")
        live = admission.read_validating_webhook_configuration(f"{namespace}-kopa").webhooks
        assert live is not None
        ca_bundle = live[0].client_config.ca_bundle
        assert ca_bundle == secret["ca.crt"]
        helm_kube.run("upgrade", *release, f"--values={webhook}", "--set=mgmt.logLevel=warn")
        again = admission.read_validating_webhook_configuration(f"{namespace}-kopa").webhooks
        assert again is not None
        assert again[0].client_config.ca_bundle == ca_bundle
        assert installed_secret(core_v1, namespace) == secret
    finally:
        helm_kube.run("uninstall", "kopa", f"--namespace={namespace}", "--timeout=60s", check=False)
    with pytest.raises(client.ApiException) as gone:
        admission.read_validating_webhook_configuration(f"{namespace}-kopa")
    assert gone.value.status == 404


def test_a_fresh_install_makes_a_new_certificate(
    helm_kube: Helm, namespace: str, core_v1: client.CoreV1Api, helm: Helm
) -> None:
    """lookup reuses only this release's own Secret: another install (or `helm template`) gets its own CA."""
    try:
        helm_kube.run(
            "install", "kopa", str(CHART), f"--namespace={namespace}", f"--values={helm_kube.image_values()}"
        )
        installed = installed_secret(core_v1, namespace)
    finally:
        helm_kube.run("uninstall", "kopa", f"--namespace={namespace}", check=False)
    offline = helm.template(namespace=namespace).secret_data("kopa-cert")
    assert base64.b64decode(installed["ca.crt"]) != offline["ca.crt"]
