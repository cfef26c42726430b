"""kopa's own kubeconfig reader against the real API server: client certificates (files and embedded), an
exec plugin that prints a client certificate, KUBECONFIG with several files, and the in-cluster
ServiceAccount token, rotated. The API server itself says whom it took kopa for (a SelfSubjectReview).

The exec plugin's token path, run by kopa as a process, is in test_kube_credentials.py; OIDC id-tokens are
bearer tokens like any other once read (tests/unit/test_kubeconfig.py refreshes them at a loopback
identity provider: this API server has no OIDC issuer configured).
"""

from __future__ import annotations

import base64
import os
import shutil
import stat
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from app.kube import config
from app.kube.client import KubeClient
from app.kube.config import KubeConnection, load_connection
from devstack.kube import ADMIN, KubeCluster
from devstack.processes import HOST

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

REVIEW = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}


async def whoami(connection: KubeConnection, reload: Any = None) -> str:
    """The username the API server authenticated `connection` as."""
    async with KubeClient(connection, reload=reload) as kube:
        review = await kube.create("/apis/authentication.k8s.io/v1/selfsubjectreviews", REVIEW)
    return str(review["status"]["userInfo"]["username"])


def write(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def single(kube: KubeCluster, user: dict[str, Any]) -> dict[str, Any]:
    """A kubeconfig document for the test cluster (its CA embedded) with this user."""
    ca = base64.b64encode(kube.ca_file.read_bytes()).decode()
    return {
        "current-context": "ctx",
        "clusters": [{"name": "c", "cluster": {"server": kube.url, "certificate-authority-data": ca}}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
        "users": [{"name": "u", "user": user}],
    }


@pytest.mark.parametrize("embedded", [False, True], ids=["relative-files", "embedded-data"])
async def test_a_client_certificate_is_who_kopa_is(
    kube: KubeCluster, tmp_path: Path, *, embedded: bool
) -> None:
    user = f"kopa-cert-{'data' if embedded else 'files'}"
    cert, key = kube.issue_client_certificate(user)
    if embedded:
        credentials = {
            "client-certificate-data": base64.b64encode(cert.read_bytes()).decode(),
            "client-key-data": base64.b64encode(key.read_bytes()).decode(),
        }
    else:  # relative to the kubeconfig, as kubectl resolves them
        (tmp_path / "certs").mkdir()
        shutil.copy(cert, tmp_path / "certs" / "tls.crt")
        shutil.copy(key, tmp_path / "certs" / "tls.key")
        credentials = {"client-certificate": "certs/tls.crt", "client-key": "certs/tls.key"}
    kubeconfig = write(tmp_path / "kubeconfig", single(kube, credentials))
    assert await whoami(await load_connection(str(kubeconfig), environ={})) == user


async def test_an_exec_plugin_that_prints_a_client_certificate(kube: KubeCluster, tmp_path: Path) -> None:
    cert, key = kube.issue_client_certificate("kopa-exec-cert")
    status = {"clientCertificateData": cert.read_text(), "clientKeyData": key.read_text()}
    plugin = tmp_path / "plugin"
    plugin.write_text(
        f"#!{sys.executable}\nimport json\n"
        f"print(json.dumps({{'apiVersion': 'client.authentication.k8s.io/v1beta1', 'kind': 'ExecCredential',"
        f" 'status': {status!r}}}))\n"
    )
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    exec_user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": str(plugin)}}
    kubeconfig = write(tmp_path / "kubeconfig", single(kube, exec_user))
    assert await whoami(await load_connection(str(kubeconfig), environ={})) == "kopa-exec-cert"


async def test_kubeconfig_files_merged_first_one_wins(kube: KubeCluster, tmp_path: Path) -> None:
    """The first file sets the context and the user; the second, the cluster, plus a user of the same name
    (ignored: the first definition wins whole) and a current-context (ignored too)."""
    first = single(kube, {"token": kube.admin_token})
    second = single(kube, {"token": "not-the-admin"})
    first.pop("clusters")
    second["current-context"] = "nowhere"
    files = [write(tmp_path / "a" / "config", first), write(tmp_path / "b" / "config", second)]
    listed = os.pathsep.join([str(tmp_path / "missing"), *map(str, files)])
    connection = await load_connection("", environ={"KUBECONFIG": listed})
    assert await whoami(connection) == ADMIN


async def test_in_cluster_a_rotated_service_account_token_is_read_after_a_401(
    kube: KubeCluster,
    core_v1: client.CoreV1Api,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    namespace: str,
) -> None:
    """kopa in a pod: the projected token the kubelet rotates, here a real one from the TokenRequest API."""
    core_v1.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="kopa"))
    )
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=600)
    )
    issued = core_v1.create_namespaced_service_account_token("kopa", namespace, request).status
    assert issued is not None and issued.token
    token = str(issued.token)
    account = tmp_path / "serviceaccount"
    account.mkdir()
    shutil.copy(kube.ca_file, account / "ca.crt")
    (account / "namespace").write_text(namespace)
    (account / "token").write_text("expired-token")
    monkeypatch.setattr(config, "SERVICE_ACCOUNT_DIR", account)
    environ = {"KUBERNETES_SERVICE_HOST": HOST, "KUBERNETES_SERVICE_PORT": str(kube.port)}

    connection = await load_connection("", environ=environ)
    assert connection.namespace == namespace
    (account / "token").write_text(token)  # the kubelet rotated it; kopa finds out at the 401

    who = await whoami(connection, reload=partial(load_connection, "", environ))
    assert who == f"system:serviceaccount:{namespace}:kopa"
