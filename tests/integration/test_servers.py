"""The real servers behave as the rest of the suite assumes: the API server stores objects and enforces
RBAC, OPA (both shapes) takes policies and answers queries, and the secure OPA refuses strangers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from devstack.kube import KOPA_USER, api_client
from devstack.opa import OpaServer
from devstack.processes import wait_until

pytestmark = pytest.mark.integration


POLICY_ID = "kopa-test/servers"
POLICY = """\
package kopa.test.servers

default allow := false

allow if input.user == "alice"

greeting := sprintf("hello, %s", [input.user])

version := 1
"""


def test_configmap_round_trip(core_v1: client.CoreV1Api, namespace: str) -> None:
    body = client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="greeting", labels={"app": "kopa-test"}),
        data={"hello": "world"},
    )
    created = core_v1.create_namespaced_config_map(namespace, body)

    read = core_v1.read_namespaced_config_map("greeting", namespace)
    assert read.metadata is not None
    assert created.metadata is not None
    assert read.data == {"hello": "world"}
    assert read.metadata.labels == {"app": "kopa-test"}
    assert read.metadata.resource_version == created.metadata.resource_version
    listed = core_v1.list_namespaced_config_map(namespace, label_selector="app=kopa-test")
    assert [item.metadata.name for item in listed.items if item.metadata] == ["greeting"]


def test_service_account_token_is_subject_to_rbac(
    k8s: client.ApiClient, namespace: str, kubeconfig_for: Callable[..., Path]
) -> None:
    """The static ServiceAccount tokens authenticate, and RBAC (not the token) decides what they may do."""
    with api_client(kubeconfig_for(KOPA_USER, namespace)) as sa_client:
        as_kopa = client.CoreV1Api(sa_client)
        with pytest.raises(ApiException) as refused:
            as_kopa.list_namespaced_config_map(namespace)
        assert refused.value.status == 403
        assert KOPA_USER in str(refused.value.body)

        rbac = client.RbacAuthorizationV1Api(k8s)
        rbac.create_namespaced_role(
            namespace,
            client.V1Role(
                metadata=client.V1ObjectMeta(name="read-configmaps"),
                rules=[client.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["list"])],
            ),
        )
        rbac.create_namespaced_role_binding(
            namespace,
            client.V1RoleBinding(
                metadata=client.V1ObjectMeta(name="kopa-reads-configmaps"),
                role_ref=client.V1RoleRef(
                    api_group="rbac.authorization.k8s.io", kind="Role", name="read-configmaps"
                ),
                subjects=[client.RbacV1Subject(kind="ServiceAccount", name="kopa", namespace="kopa-system")],
            ),
        )

        def allowed() -> bool:
            # The RBAC authorizer reads roles from an informer, so a new binding takes a moment to apply.
            try:
                as_kopa.list_namespaced_config_map(namespace)
            except ApiException as exc:
                if exc.status == 403:
                    return False
                raise
            return True

        wait_until(allowed, timeout=10, what="the RoleBinding in effect")


def test_opa_policy_and_query(any_opa: OpaServer) -> None:
    """Runs once per flavour (any_opa is parametrized over plain and secure)."""
    api = any_opa.http()

    assert api.put(f"/v1/policies/{POLICY_ID}", POLICY) == {}

    assert api.get_json("/v1/data/kopa/test/servers/version") == {"result": 1}
    alice = api.post("/v1/data/kopa/test/servers", {"input": {"user": "alice"}})
    assert alice["result"] == {"allow": True, "greeting": "hello, alice", "version": 1}
    assert api.post("/v1/data/kopa/test/servers/allow", {"input": {"user": "bob"}}) == {"result": False}

    stored = api.get_json(f"/v1/policies/{POLICY_ID}")["result"]
    assert stored["id"] == POLICY_ID
    assert stored["raw"] == POLICY


def test_secure_opa_refuses_anonymous_writes_but_serves_health(secure_opa: OpaServer) -> None:
    anonymous = secure_opa.http(token=None)

    status, body = anonymous.request("PUT", f"/v1/policies/{POLICY_ID}", POLICY)
    # OPA's basic authorization answers a denied request with 401, whether or not a token was sent.
    assert status == 401
    assert body == {"code": "unauthorized", "message": "request rejected by administrative policy"}
    assert anonymous.request("GET", "/v1/data")[0] == 401

    assert anonymous.request("GET", "/health") == (200, {})
    # Nothing was stored by the refused write.
    assert secure_opa.http().request("GET", f"/v1/policies/{POLICY_ID}")[0] == 404


def test_secure_opa_rejects_a_wrong_token(secure_opa: OpaServer) -> None:
    impostor = secure_opa.http(token="not-the-token")

    status, body = impostor.request("PUT", f"/v1/policies/{POLICY_ID}", POLICY)
    assert status == 401
    assert body["code"] == "unauthorized"
    assert impostor.request("GET", "/v1/policies")[0] == 401
    # The right token still gets in, and sees only the authz policy OPA started with.
    policies = secure_opa.http().get_json("/v1/policies")["result"]
    assert [policy["id"] for policy in policies] == ["authz.rego"]
