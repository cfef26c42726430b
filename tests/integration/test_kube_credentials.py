"""Rotated credentials: after a 401, kopa loads its kubeconfig again (service-account tokens rotate)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kubernetes import client

from devstack.kube import KubeCluster
from devstack.opa import OpaServer
from tests.integration.conftest import KopaFactory
from tests.integration.helpers import DATA, put_configmap, wait_data, wait_log

pytestmark = pytest.mark.integration


def test_a_rotated_token_file_is_used_after_a_401(
    run_kopa: KopaFactory,
    kube: KubeCluster,
    opa: OpaServer,
    core_v1: client.CoreV1Api,
    *,
    namespace: str,
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("expired-token")
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    config = yaml.safe_load(kubeconfig.read_text())
    config["users"][0]["user"] = {"tokenFile": str(token_file)}
    kubeconfig.write_text(yaml.safe_dump(config))

    kopa = run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}", kubeconfig=kubeconfig)
    wait_log(kopa, "401 Unauthorized")  # the API server refuses the stale token
    token_file.write_text(kube.admin_token)  # the kubelet swaps in a fresh token
    put_configmap(core_v1, namespace, "d", {"x.json": '{"fresh": true}'}, DATA)
    wait_data(opa, f"{namespace}/d/x.json", {"fresh": True})
    wait_log(kopa, "reloaded Kubernetes credentials")
    assert kube.admin_token not in kopa.log_path.read_text()
