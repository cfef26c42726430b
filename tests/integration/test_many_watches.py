"""Many watches must never starve kopa's requests to the API server.

aiohttp speaks HTTP/1.1, so every open watch holds a connection. With 100 namespaces (a policy and a data
watch each) and 10 replicated resources, kopa holds 210 watches; lists, status patches and Events must still
get through, and the namespaces at the end of --namespaces must load like the first. With one shared pool of
32 connections they never did, and kopa stayed unready without saying why.
"""

from __future__ import annotations

import json
import resource
import urllib.request
from collections.abc import Iterator

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from devstack.opa import OpaServer
from devstack.processes import wait_until
from tests.conftest import API_TIMEOUT
from tests.integration.conftest import KopaFactory
from tests.integration.helpers import DATA, OK, data, put_configmap, wait_data, wait_status

pytestmark = pytest.mark.integration

NAMESPACES = 100
WITH_DATA = 3  # the last namespaces of the list get a data ConfigMap
REPLICATE = [
    "v1/services",
    "v1/endpoints",
    "v1/serviceaccounts",
    "v1/limitranges",
    "v1/resourcequotas",
    "v1/persistentvolumeclaims",
    "v1/podtemplates",
    "v1/replicationcontrollers",
    "apps/v1/deployments",
    "apps/v1/statefulsets",
]
TIMEOUT = 45.0
OPEN_FILES = 150  # the soft limit kopa starts with: fewer than its watches


@pytest.fixture
def many_namespaces(core_v1: client.CoreV1Api, namespace: str) -> Iterator[list[str]]:
    """The test's own namespace plus 99 more it creates here, and deletes (with what it put there) after.

    Deleted namespaces stay Terminating: this API server runs no controller-manager to finalize them.
    """
    extra = [f"{namespace}-{i:02d}" for i in range(1, NAMESPACES)]
    created: list[str] = []
    try:
        for name in extra:
            meta = client.V1ObjectMeta(name=name, labels={"kopa.test/test": "true"})
            core_v1.create_namespace(client.V1Namespace(metadata=meta), _request_timeout=API_TIMEOUT)
            created.append(name)
        yield [namespace, *extra]
    finally:
        errors: list[str] = []
        for name in created:
            try:
                if name in extra[-WITH_DATA:]:
                    for delete in (
                        core_v1.delete_collection_namespaced_config_map,
                        core_v1.delete_collection_namespaced_service_account,
                        core_v1.delete_collection_namespaced_event,
                    ):
                        delete(name, grace_period_seconds=0, _request_timeout=API_TIMEOUT)
                core_v1.delete_namespace(name, _request_timeout=API_TIMEOUT)
            except ApiException as exc:
                if exc.status != 404:
                    errors.append(f"{name}: {exc.status} {exc.reason}")
        if errors:
            raise RuntimeError("cleaning up namespaces failed: " + "; ".join(errors))


def ready(health_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{health_url}/readyz", timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def test_the_last_of_100_namespaces_and_10_replicated_resources_load_under_a_low_open_files_limit(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, many_namespaces: list[str]
) -> None:
    last = many_namespaces[-WITH_DATA:]
    for ns in last:
        put_configmap(core_v1, ns, "d", {"x.json": json.dumps({"ns": ns})}, DATA)
    account = client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="replicated"))
    core_v1.create_namespaced_service_account(last[-1], account, _request_timeout=API_TIMEOUT)

    # Started with a soft limit of open files below what 210 watches need (a container's default is
    # 1024, which about 500 namespaces used up): kopa raises it to the hard limit, as Go programs do.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, hard))
    try:
        kopa = run_kopa(
            f"--opa-url={opa.api_url}",
            f"--namespaces={','.join(many_namespaces)}",
            *(f"--replicate={gvr}" for gvr in REPLICATE),
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for ns in last:
        wait_data(opa, f"{ns}/d/x.json", {"ns": ns})
    for ns in last:
        wait_status(core_v1, ns, "d", OK)  # a merge patch per ConfigMap, while 210 watches are open
    wait_until(
        lambda: data(opa, f"kubernetes/serviceaccounts/{last[-1]}/replicated") is not None,
        timeout=TIMEOUT,
        what="the replicated ServiceAccount in OPA",
    )
    wait_until(lambda: ready(kopa.health_url), timeout=TIMEOUT, what="kopa ready (/readyz 200)")
