"""Rotated credentials: after a 401, kopa loads its kubeconfig again (service-account tokens rotate, exec
plugins' tokens expire)."""

from __future__ import annotations

import stat
import sys
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


def test_an_exec_plugin_is_run_again_after_a_401(
    run_kopa: KopaFactory,
    kube: KubeCluster,
    opa: OpaServer,
    core_v1: client.CoreV1Api,
    *,
    namespace: str,
    tmp_path: Path,
) -> None:
    """An exec plugin (EKS' aws, GKE's gke-gcloud-auth-plugin) whose token the API server stops taking is
    run again, and the new token used; the plugin gets the cluster when it asks (provideClusterInfo)."""
    token_file, calls = tmp_path / "issued-token", tmp_path / "calls"
    token_file.write_text("expired-token")
    plugin = tmp_path / "bin" / "token-plugin"
    plugin.parent.mkdir()
    plugin.write_text(
        f"#!{sys.executable}\n"
        "import json, os, pathlib\n"
        "info = json.loads(os.environ['KUBERNETES_EXEC_INFO'])\n"
        f"with open({str(calls)!r}, 'a') as calls:\n"
        "    calls.write(info['spec']['cluster']['server'] + '\\n')\n"
        f"token = pathlib.Path({str(token_file)!r}).read_text()\n"
        "print(json.dumps({'apiVersion': info['apiVersion'], 'kind': 'ExecCredential',"
        " 'status': {'token': token}}))\n"
    )
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    config = yaml.safe_load(kubeconfig.read_text())
    config["users"][0]["user"] = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": "./bin/token-plugin",  # relative to the kubeconfig, as kubectl resolves it
            "interactiveMode": "Never",
            "provideClusterInfo": True,
        }
    }
    kubeconfig.write_text(yaml.safe_dump(config))

    kopa = run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}", kubeconfig=kubeconfig)
    wait_log(kopa, "401 Unauthorized")  # the API server refuses the plugin's first token
    token_file.write_text(kube.admin_token)  # the plugin would now get a fresh one
    put_configmap(core_v1, namespace, "d", {"x.json": '{"exec": true}'}, DATA)
    wait_data(opa, f"{namespace}/d/x.json", {"exec": True})
    assert set(calls.read_text().split()) == {kube.url}
    assert len(calls.read_text().split()) >= 2, "the plugin was run again after the 401"
    assert kube.admin_token not in kopa.log_path.read_text()
