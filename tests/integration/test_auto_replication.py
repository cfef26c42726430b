"""Automatic replication (--opa-config): kopa replicates what the policies in OPA read, against a real OPA
that activates real bundles (built by `opa build`, served from a file or a loopback HTTP bundle server).

Replicated resources found by analysis are cluster-wide, so other tests' objects may show up beside this
test's: every assertion looks at this test's namespaces (or at names it chose).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from devstack.binaries import tool_path
from devstack.opa import OpaServer
from devstack.processes import wait_until
from tests.integration.conftest import KopaFactory
from tests.integration.helpers import (
    POLICY,
    TIMEOUT,
    data,
    get,
    log_text,
    metric,
    put_configmap,
    scrape,
    wait_log,
)
from tests.integration.test_replication import (
    crd,
    crd_group,
    create_once_established,
    other_namespace,
    service,
    wait_for,
)

__all__ = ["crd_group", "other_namespace"]  # fixtures shared with test_replication

MAIN_SERVICES = """package main

import rego.v1

main if {
    some ns, name
    data.kubernetes.services[ns][name].metadata.labels == "foo"
}
"""


def build_bundle(directory: Path, files: dict[str, str], roots: list[str], revision: str = "") -> Path:
    """`opa build` of these Rego files into directory/bundle.tar.gz (a manifest with these roots)."""
    source = directory / "src"
    source.mkdir(parents=True, exist_ok=True)
    for old in source.glob("*.rego"):
        old.unlink()
    for name, text in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text)
    (source / ".manifest").write_text(json.dumps({"roots": roots, "revision": revision}))
    out = directory / "bundle.tar.gz"
    # Built from inside the source, so that module ids are `<bundle>/<path in the bundle>`, as a bundle
    # service's would be (from outside, the source's absolute path became part of each id).
    subprocess.run(
        [tool_path("opa"), "build", "-b", ".", "-o", str(out.resolve())], check=True, timeout=60, cwd=source
    )
    return out


class BundleServer:
    """A loopback HTTP server for one bundle file, with ETags, as a bundle service would serve it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = server.path.read_bytes()
                etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
                if self.headers.get("If-None-Match") == etag:
                    self.send_response(304)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> BundleServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def opa_with_config(tmp_path: Path, config: dict[str, Any]) -> tuple[OpaServer, Path]:
    """An OPA (plain) to start (`with`) with this configuration file, which kopa gets as --opa-config."""
    config_file = tmp_path / "opa-config.yaml"
    config_file.write_text(json.dumps(config))  # JSON is YAML
    server = OpaServer(tmp_path / "opa-auto", "plain", extra_args=("--config-file", str(config_file)))
    return server, config_file


def opa_with_file_bundle(tmp_path: Path, main: str) -> tuple[OpaServer, Path]:
    """kube-mgmt's e2e shape: one bundle `test` read from a file, roots ["main"], this main.rego."""
    bundle = build_bundle(tmp_path / "bundle", {"main.rego": main}, ["main"])
    return opa_with_config(tmp_path, {"bundles": {"test": {"resource": f"file://{bundle}"}}})


@pytest.fixture
def opa_file_bundle(tmp_path: Path) -> Iterator[tuple[OpaServer, Path]]:
    """opa_with_file_bundle with the main.rego of kube-mgmt's e2e test, started."""
    server, config_file = opa_with_file_bundle(tmp_path, MAIN_SERVICES)
    with server:
        yield server, config_file


def analysis_of(kopa: Any) -> dict[str, Any]:
    _, body = get(kopa, "/readyz")
    section: dict[str, Any] = json.loads(body).get("analysis") or {}
    return section


def wait_analysis(kopa: Any, check: Any, what: str) -> dict[str, Any]:
    def current() -> dict[str, Any] | None:
        section = analysis_of(kopa)
        return section if check(section) else None

    result: dict[str, Any] = wait_until(current, timeout=TIMEOUT, what=what)
    return result


def resources_of(section: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = section.get("resources") or {}
    return found


def wait_ready(kopa: Any) -> dict[str, Any]:
    def current() -> dict[str, Any] | None:
        code, body = get(kopa, "/readyz")
        return json.loads(body) if code == 200 else None

    result: dict[str, Any] = wait_until(current, timeout=TIMEOUT, what="kopa ready")
    return result


def auto_args(opa: OpaServer, config_file: Path, *extra: str) -> list[str]:
    return [
        f"--opa-url={opa.api_url}",
        f"--opa-config={config_file}",
        "--enable-policies=false",
        "--enable-data=false",
        *extra,
    ]


def test_kube_mgmts_e2e_scenario_replicates_the_services_the_bundle_reads(
    run_kopa: KopaFactory,
    opa_file_bundle: tuple[OpaServer, Path],
    core_v1: client.CoreV1Api,
    namespace: str,
    other_namespace: str,
) -> None:
    """opa-kube-mgmt's replicate_auto e2e: same flags (its chart passes --opa-config and the ignored
    namespace); the services of the other namespaces appear in OPA, the ignored one's do not."""
    opa, config_file = opa_file_bundle
    core_v1.create_namespaced_service(namespace, service("web"))
    core_v1.create_namespaced_service(namespace, service("db"))
    core_v1.create_namespaced_service(other_namespace, service("hidden"))
    kopa = run_kopa(*auto_args(opa, config_file, f"--replicate-ignore-namespaces={other_namespace}"))
    ready = wait_ready(kopa)
    wait_for(opa, f"kubernetes/services/{namespace}", lambda v: v and len(v) == 2, "services replicated")
    assert data(opa, f"kubernetes/services/{other_namespace}") is None
    section = ready["analysis"]
    assert section["entrypoint"] == "data.main.main" and section["entrypointFound"] is True
    assert resources_of(section)["services"] == {"state": "replicating", "resource": "v1/services"}
    assert ready["sources"]["replicate:v1/services"] == {"ready": True}
    samples = scrape(kopa)
    assert metric(samples, "kopa_analysis_resources", resource="v1/services", state="replicating") == 1
    wait_log(kopa, "policy analysis: entrypoint data.main.main; replicating: v1/services")
    # Replication follows the cluster as static replication does.
    core_v1.create_namespaced_service(namespace, service("cache"))
    wait_for(opa, f"kubernetes/services/{namespace}/cache", bool, "a new service replicated")


def test_a_new_bundle_revision_starts_what_it_reads_and_removes_what_it_no_longer_reads(
    run_kopa: KopaFactory, tmp_path: Path, k8s: client.ApiClient, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """Revision 1 reads services, revision 2 ingresses through an import alias: ingresses start; services
    stop once the grace period has passed and their collection leaves OPA."""
    networking = client.NetworkingV1Api(k8s)
    core_v1.create_namespaced_service(namespace, service("web"))
    ingress: Any = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "front"}}
    ingress["spec"] = {"defaultBackend": {"service": {"name": "web", "port": {"number": 80}}}}
    networking.create_namespaced_ingress(namespace, ingress)
    bundle = build_bundle(tmp_path / "bundle", {"main.rego": MAIN_SERVICES}, ["main"], revision="r1")
    second = """package main

import rego.v1
import data.kubernetes.ingresses as ing

main if {
    some ns
    count(ing[ns]) > 0
}
"""
    with BundleServer(bundle) as bundles:
        config = {
            "services": {"bundles": {"url": bundles.url}},
            "bundles": {
                "test": {
                    "service": "bundles",
                    "resource": "/bundle.tar.gz",
                    "polling": {"min_delay_seconds": 1, "max_delay_seconds": 1},
                }
            },
        }
        opa, config_file = opa_with_config(tmp_path, config)
        with opa:
            kopa = run_kopa(*auto_args(opa, config_file, "--analysis-grace-period=2s"))
            wait_ready(kopa)
            wait_for(opa, f"kubernetes/services/{namespace}/web", bool, "services replicated for r1")
            assert data(opa, "kubernetes/ingresses") is None

            build_bundle(tmp_path / "bundle", {"main.rego": second}, ["main"], revision="r2")
            wait_for(opa, f"kubernetes/ingresses/{namespace}/front", bool, "ingresses replicated for r2")
            section = wait_analysis(
                kopa, lambda s: "services" not in resources_of(s), "services no longer in the analysis"
            )
            assert resources_of(section)["ingresses"]["state"] == "replicating"
            wait_for(opa, "kubernetes/services", lambda v: v is None, "services removed from OPA")
            wait_log(kopa, "policies no longer read v1/services")
            # Removed for good: a change to a service writes nothing back.
            core_v1.create_namespaced_service(namespace, service("late"))
            wait_for(opa, f"kubernetes/ingresses/{namespace}/front", bool, "ingresses still there")
            assert data(opa, "kubernetes/services") is None


def test_a_crd_created_after_start_and_an_unresolvable_plural(
    *,
    run_kopa: KopaFactory,
    tmp_path: Path,
    k8s: client.ApiClient,
    core_v1: client.CoreV1Api,
    namespace: str,
    crd_group: str,
) -> None:
    """A plural that does not resolve is reported and holds nothing up (kube-mgmt stops every change);
    once its CRD is installed, discovery finds it and it is replicated."""
    policy = """package main

import rego.v1

main if {
    data.kubernetes.services[_][_]
    data.kubernetes.nosuchthings[_][_]
    data.kubernetes.sprockets[_][_]
}
"""
    core_v1.create_namespaced_service(namespace, service("web"))
    opa, config_file = opa_with_file_bundle(tmp_path, policy)
    with opa:
        kopa = run_kopa(*auto_args(opa, config_file))
        ready = wait_ready(kopa)
        wait_for(opa, f"kubernetes/services/{namespace}/web", bool, "the resolvable plural replicated")
        found = resources_of(ready["analysis"])
        assert found["nosuchthings"]["state"] == "unresolved"
        assert "no resource named nosuchthings" in found["nosuchthings"]["reason"]
        assert (
            metric(scrape(kopa), "kopa_analysis_resources", resource="nosuchthings", state="unresolved") == 1
        )

        client.ApiextensionsV1Api(k8s).create_custom_resource_definition(
            crd(crd_group, "sprockets", "Sprocket")
        )
        body = {"apiVersion": f"{crd_group}/v1", "kind": "Sprocket", "metadata": {"name": "s1"}}
        create_once_established(k8s, crd_group, namespace, "sprockets", body)
        sprocket = wait_for(opa, f"kubernetes/sprockets/{namespace}/s1", bool, "CRD found later replicated")
        assert sprocket["kind"] == "Sprocket"
        section = wait_analysis(
            kopa, lambda s: resources_of(s)["sprockets"]["state"] == "replicating", "sprockets replicating"
        )
        assert resources_of(section)["sprockets"]["resource"] == f"{crd_group}/v1/sprockets"
        assert resources_of(section)["nosuchthings"]["state"] == "unresolved"


def test_a_configmap_policy_is_analysed_whole_without_a_bundle(
    run_kopa: KopaFactory, tmp_path: Path, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """kube-mgmt analyses bundles only: a ConfigMap policy that reads namespaces gets nothing. kopa
    analyses every ConfigMap policy it loads, whatever queries it, and the entrypoint is then missing."""
    opa, config_file = opa_with_config(tmp_path, {})
    with opa:
        kopa = run_kopa(
            f"--opa-url={opa.api_url}", f"--opa-config={config_file}", f"--namespaces={namespace}"
        )
        policy = """package kubernetes.admission

import rego.v1

deny contains msg if {
    not data.kubernetes.namespaces[input.request.namespace].metadata.labels.team
    msg := "namespace has no team"
}
"""
        put_configmap(core_v1, namespace, "admission", {"admission.rego": policy}, POLICY)
        found = wait_for(opa, f"kubernetes/namespaces/{namespace}", bool, "namespaces replicated")
        assert found["metadata"]["name"] == namespace
        ready = wait_ready(kopa)
        section = ready["analysis"]
        assert section["entrypointFound"] is False
        # The policy's own package lies below the replicate path: it is a rule, not a resource.
        assert set(resources_of(section)) == {"namespaces"}
        wait_log(kopa, "entrypoint data.main.main not found")
        # The policy removed: analysed again, namespaces no longer read (kept for the grace period).
        core_v1.delete_namespaced_config_map("admission", namespace)
        wait_analysis(
            kopa,
            lambda s: resources_of(s).get("namespaces", {}).get("state") == "unreferenced",
            "namespaces unreferenced once the policy is gone",
        )


def test_an_ambiguous_plural_is_an_error_naming_both_unless_replicate_chooses(
    run_kopa: KopaFactory, tmp_path: Path, core_v1: client.CoreV1Api, namespace: str
) -> None:
    policy = "package main\n\nimport rego.v1\n\nmain if { count(data.kubernetes.events) >= 0 }\n"
    opa, config_file = opa_with_file_bundle(tmp_path, policy)
    with opa:
        kopa = run_kopa(*auto_args(opa, config_file))
        ready = wait_ready(kopa)
        events = resources_of(ready["analysis"])["events"]
        assert events["state"] == "ambiguous"
        assert "v1/events and events.k8s.io/v1/events" in events["reason"]
        assert "--replicate" in events["reason"]
        assert data(opa, "kubernetes/events") is None

        chosen = run_kopa(*auto_args(opa, config_file, "--replicate=v1/events"))
        ready = wait_ready(chosen)
        assert resources_of(ready["analysis"])["events"]["state"] == "given"
        assert data(opa, "kubernetes/events") is not None


LIMITED = "kopa-system:restricted"  # a ServiceAccount identity of the test cluster with no other grants


@pytest.fixture
def limited_identity(k8s: client.ApiClient, namespace: str) -> Iterator[str]:
    """LIMITED may read services, cluster-wide, and nothing else (pods notably)."""
    name = f"kopa-limited-{namespace}"
    rbac = client.RbacAuthorizationV1Api(k8s)
    role: Any = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [{"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"]}],
    }
    sa_namespace, _, sa_name = LIMITED.partition(":")
    binding: Any = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "namespace": sa_namespace, "name": sa_name}],
    }
    rbac.create_cluster_role(role)
    rbac.create_cluster_role_binding(binding)
    try:
        yield LIMITED
    finally:
        rbac.delete_cluster_role_binding(name)
        rbac.delete_cluster_role(name)


def test_a_resource_kopa_may_not_read_is_reported_and_does_not_hold_readiness(
    *,
    run_kopa: KopaFactory,
    tmp_path: Path,
    core_v1: client.CoreV1Api,
    namespace: str,
    limited_identity: str,
    kubeconfig_for: Any,
) -> None:
    policy = """package main

import rego.v1

main if {
    data.kubernetes.services[_][_]
    data.kubernetes.pods[_][_]
}
"""
    core_v1.create_namespaced_service(namespace, service("web"))
    opa, config_file = opa_with_file_bundle(tmp_path, policy)
    with opa:
        kopa = run_kopa(*auto_args(opa, config_file), kubeconfig=kubeconfig_for(limited_identity))
        wait_for(opa, f"kubernetes/services/{namespace}/web", bool, "the readable resource replicated")
        ready = wait_ready(kopa)
        pods = resources_of(ready["analysis"])["pods"]
        assert pods["state"] == "forbidden" and pods["resource"] == "v1/pods"
        assert "not readable" in pods["reason"] and "forbidden" in pods["reason"]
        assert ready["sources"]["replicate:v1/pods"]["holdsReadiness"] is False
        assert metric(scrape(kopa), "kopa_analysis_resources", resource="v1/pods", state="forbidden") == 1
        assert log_text(kopa).count("watch of pods in all namespaces failed (403") == 1


def test_a_missing_entrypoint_is_reported_and_kopa_still_gets_ready(
    run_kopa: KopaFactory, opa_file_bundle: tuple[OpaServer, Path], namespace: str
) -> None:
    opa, config_file = opa_file_bundle
    kopa = run_kopa(*auto_args(opa, config_file, "--analysis-entrypoint=system/main"))
    ready = wait_ready(kopa)
    section = ready["analysis"]
    assert section["entrypoint"] == "data.system.main" and section["entrypointFound"] is False
    assert resources_of(section) == {}
    wait_log(kopa, "entrypoint data.system.main not found")
    assert metric(scrape(kopa), "kopa_analysis_entrypoint_found") == 0


def test_kopa_waits_for_the_configured_bundle_before_it_says_ready(
    run_kopa: KopaFactory, tmp_path: Path, namespace: str
) -> None:
    """A bundle OPA has not activated holds readiness, and /readyz says which."""
    missing = tmp_path / "not-there.tar.gz"
    opa, config_file = opa_with_config(tmp_path, {"bundles": {"later": {"resource": f"file://{missing}"}}})
    with opa:
        kopa = run_kopa(*auto_args(opa, config_file))
        section = wait_analysis(kopa, lambda s: s.get("waitingForBundles") == ["later"], "waiting for later")
        assert "state" in section
        code, _ = get(kopa, "/readyz")
        assert code == 503


def test_after_an_opa_restart_the_analysis_runs_again_and_the_data_comes_back(
    run_kopa: KopaFactory, opa_file_bundle: tuple[OpaServer, Path], core_v1: client.CoreV1Api, namespace: str
) -> None:
    opa, config_file = opa_file_bundle
    core_v1.create_namespaced_service(namespace, service("web"))
    kopa = run_kopa(*auto_args(opa, config_file))
    wait_ready(kopa)
    wait_for(opa, f"kubernetes/services/{namespace}/web", bool, "services replicated")
    wait_log(kopa, "policy analysis ran on 1 modules (OPA epoch 0)")
    opa.restart()  # empty: the bundle is activated again, kopa's data is gone
    wait_for(opa, f"kubernetes/services/{namespace}/web", bool, "services back in the new OPA")
    wait_log(kopa, "policy analysis ran on 1 modules (OPA epoch 1)")
    ready = wait_ready(kopa)
    assert resources_of(ready["analysis"])["services"]["state"] == "replicating"
    assert ready["analysis"]["entrypointFound"] is True
