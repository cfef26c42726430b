"""kopa on an IPv6-only loopback: the API server, OPA and kopa's own probe server all on ::1.

An IPv6-only (or IPv6-first) cluster gives its pods only IPv6 addresses: the kubeconfig's server, the OPA
URL and the probe address are bracketed IPv6 literals. Everything here listens on ::1 and nothing on
127.0.0.1, so a code path that assumed IPv4 (or a URL without brackets) fails the test rather than taking
a detour. The API server here is one of its own (the session's listens on 127.0.0.1); etcd behind it stays
on 127.0.0.1, which kopa never talks to.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from app.http1 import url_host
from devstack.kube import KubeCluster, api_client
from devstack.opa import OpaServer
from devstack.processes import HOST6, free_port
from tests.integration.conftest import KopaFactory
from tests.integration.helpers import (
    DATA,
    OK,
    POLICY,
    get,
    metric,
    put_configmap,
    scrape,
    secure_args,
    wait_data,
    wait_policies,
    wait_probe,
    wait_status,
)

pytestmark = pytest.mark.integration

NAMESPACE = "ipv6-only"
POLICY_TEXT = 'package kopa.ipv6\n\nusers := data["ipv6-only"].settings["users.json"].names\n'


@pytest.fixture(scope="module")
def kube6(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    with KubeCluster(tmp_path_factory.mktemp("kube6"), host=HOST6) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def core6(kube6: KubeCluster) -> Iterator[client.CoreV1Api]:
    with api_client(kube6.admin_kubeconfig) as api:
        core = client.CoreV1Api(api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
        yield core


@pytest.fixture
def opa6(tmp_path: Path) -> Iterator[OpaServer]:
    with OpaServer.secure(tmp_path / "opa6", host=HOST6) as server:
        yield server


def test_kopa_syncs_and_refills_over_ipv6_only(
    run_kopa: KopaFactory, kube6: KubeCluster, core6: client.CoreV1Api, opa6: OpaServer
) -> None:
    """Policies, data and a replicated resource reach an OPA on [::1] (TLS, token) from an API server on
    [::1]; the status annotation comes back; a restarted OPA is refilled; the probes answer on [::1]."""
    assert kube6.url.startswith("https://[::1]:") and opa6.api_url.startswith("https://[::1]:")
    port = free_port()
    kopa = run_kopa(
        *secure_args(opa6, NAMESPACE),
        "--replicate=v1/serviceaccounts",
        f"--health-endpoint={url_host(HOST6)}:{port}",
        kubeconfig=kube6.admin_kubeconfig,
    )
    assert kopa.health_url == f"http://[::1]:{port}"

    put_configmap(core6, NAMESPACE, "settings", {"users.json": '{"names": ["alice"]}'}, DATA)
    put_configmap(core6, NAMESPACE, "authz", {"main.rego": POLICY_TEXT}, POLICY)
    account = client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="builder", labels={"team": "a"}))
    core6.create_namespaced_service_account(NAMESPACE, account)

    def in_sync() -> None:
        wait_status(core6, NAMESPACE, "authz", OK)
        wait_policies(opa6, {f"{NAMESPACE}/authz/main.rego"}, f"{NAMESPACE}/")
        wait_data(opa6, f"{NAMESPACE}/settings", {"users.json": {"names": ["alice"]}})
        wait_data(opa6, "kopa/ipv6/users", ["alice"])
        wait_data(opa6, f"kubernetes/serviceaccounts/{NAMESPACE}/builder/metadata/labels", {"team": "a"})

    in_sync()
    assert wait_probe(kopa, "/readyz", 200)
    status, _ = get(kopa, "/healthz")
    assert status == 200

    opa6.restart()  # an empty OPA on the same [::1] port: kopa notices and refills it
    in_sync()
    assert metric(scrape(kopa), "kopa_opa_restarts_total") >= 1
