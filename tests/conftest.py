"""Shared fixtures: real etcd + kube-apiserver (one per session) and real OPA servers (one per test).

Servers come from devstack, which the demo uses too. A missing binary skips the tests that need it on a
developer machine, but fails them when CI=true: a CI run that silently skipped every integration test
would look green while testing nothing.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from devstack.binaries import MissingBinary, tool_path
from devstack.kube import KubeCluster, api_client
from devstack.opa import Flavour, OpaServer

# Timeout for each API call the fixtures make themselves, so a broken API server fails a teardown
# instead of hanging it.
API_TIMEOUT = 30


def in_ci() -> bool:
    """True when running under CI (CI=true, as .ci/run sets it)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require_binaries(*names: str) -> None:
    """Skips the requesting test if a server binary is not built, or fails it under CI."""
    try:
        for name in names:
            tool_path(name)
    except MissingBinary as exc:
        missing = exc.message
    else:
        return
    # Outside the except block, so the report shows the message alone, not a chained traceback.
    if in_ci():
        pytest.fail(f"{missing} (CI=true: a missing server binary fails, never skips)", pytrace=False)
    pytest.skip(missing)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests (anyio's pytest plugin) run on asyncio only, the loop kopa runs on."""
    return "asyncio"


# --- Kubernetes --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    """etcd + kube-apiserver for the whole session (starting them costs seconds to tens of seconds)."""
    require_binaries("etcd", "kube-apiserver")
    with KubeCluster(tmp_path_factory.mktemp("kube")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def k8s(kube: KubeCluster) -> Iterator[client.ApiClient]:
    """A synchronous admin ApiClient (group system:masters), configured from the admin kubeconfig."""
    with api_client(kube.admin_kubeconfig) as api:
        yield api


@pytest.fixture(scope="session")
def core_v1(k8s: client.ApiClient) -> client.CoreV1Api:
    """CoreV1Api as admin."""
    return client.CoreV1Api(k8s)


@pytest.fixture
def kubeconfig_for(kube: KubeCluster, tmp_path: Path) -> Callable[..., Path]:
    """Factory: kubeconfig_for(identity, namespace=None) writes a kubeconfig for a static-token identity
    (a username such as "system:serviceaccount:kopa-system:kopa", or "kopa-system:kopa") into tmp_path."""

    def write(identity: str, namespace: str | None = None) -> Path:
        token = kube.user_token(identity)
        slug = re.sub(r"[^a-z0-9]+", "-", identity.lower()).strip("-")
        return kube.write_kubeconfig(tmp_path / f"{slug}.kubeconfig", token=token, namespace=namespace)

    return write


def namespace_name(test_name: str) -> str:
    """A unique, valid namespace name (DNS label, <= 63 chars) that says which test made it."""
    slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower().removeprefix("test_")).strip("-")[:40].strip("-")
    return f"t-{slug or 'test'}-{secrets.token_hex(3)}"


# Collections emptied when a test's namespace is torn down: there is no namespace controller to do it, and
# leftovers would show up in every later test that watches a resource across all namespaces.
def _namespaced_collections(k8s: client.ApiClient) -> list[tuple[str, Callable[..., Any]]]:
    core = client.CoreV1Api(k8s)
    rbac = client.RbacAuthorizationV1Api(k8s)
    coordination = client.CoordinationV1Api(k8s)
    return [
        ("configmaps", core.delete_collection_namespaced_config_map),
        ("secrets", core.delete_collection_namespaced_secret),
        ("services", core.delete_collection_namespaced_service),
        ("endpoints", core.delete_collection_namespaced_endpoints),
        ("events", core.delete_collection_namespaced_event),
        ("pods", core.delete_collection_namespaced_pod),
        ("serviceaccounts", core.delete_collection_namespaced_service_account),
        ("rolebindings", rbac.delete_collection_namespaced_role_binding),
        ("roles", rbac.delete_collection_namespaced_role),
        ("leases", coordination.delete_collection_namespaced_lease),
        ("ingresses", client.NetworkingV1Api(k8s).delete_collection_namespaced_ingress),
    ]


@pytest.fixture
def namespace(
    request: pytest.FixtureRequest, k8s: client.ApiClient, core_v1: client.CoreV1Api
) -> Iterator[str]:
    """A fresh namespace for one test; afterwards the objects in it are deleted, then the namespace.

    The namespace itself stays Terminating (no controller-manager finalizes it); that is expected.
    """
    name = namespace_name(request.node.name)
    body = client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"kopa.test/test": "true"}))
    core_v1.create_namespace(body, _request_timeout=API_TIMEOUT)
    try:
        yield name
    finally:
        errors: list[str] = []
        for what, delete_collection in _namespaced_collections(k8s):
            try:
                delete_collection(name, grace_period_seconds=0, _request_timeout=API_TIMEOUT)
            except (ApiException, OSError) as exc:
                errors.append(f"deleting {what}: {exc}")
        try:
            core_v1.delete_namespace(name, _request_timeout=API_TIMEOUT)
        except ApiException as exc:
            if exc.status != 404:
                errors.append(f"deleting the namespace: {exc}")
        except OSError as exc:
            errors.append(f"deleting the namespace: {exc}")
        if errors:
            raise RuntimeError(f"cleaning up namespace {name} failed:\n" + "\n".join(errors))


# --- OPA ---------------------------------------------------------------------------------------------------


def _start_opa(work_dir: Path, flavour: Flavour) -> Iterator[OpaServer]:
    require_binaries("opa")
    with OpaServer(work_dir, flavour) as server:
        yield server


@pytest.fixture
def opa(tmp_path: Path) -> Iterator[OpaServer]:
    """OPA over plain HTTP without authentication (the development shape)."""
    yield from _start_opa(tmp_path / "opa-plain", "plain")


@pytest.fixture
def secure_opa(tmp_path: Path) -> Iterator[OpaServer]:
    """OPA in the production shape: TLS (own test CA), bearer token, anonymous access to /health only."""
    yield from _start_opa(tmp_path / "opa-secure", "secure")


@pytest.fixture(params=["plain", "secure"])
def opa_flavour(request: pytest.FixtureRequest) -> Flavour:
    """Parametrizes a test over both OPA shapes (use `any_opa` for the server itself)."""
    flavour: Flavour = request.param
    return flavour


@pytest.fixture
def any_opa(opa_flavour: Flavour, tmp_path: Path) -> Iterator[OpaServer]:
    """An OPA of each flavour in turn: the test runs once per flavour."""
    yield from _start_opa(tmp_path / f"opa-{opa_flavour}", opa_flavour)
