"""kopa in a pod: the Helm chart mounts a projected ServiceAccount token into kopa's container only, and the
kubelet rotates that token file. load_connection reads the in-cluster token afresh on every load, so the
reload after a 401 (tests/unit/test_kube_reload.py, tests/integration/test_kube_credentials.py) picks up
the rotated token."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.kube import config
from devstack.certs import TestCA

pytestmark = pytest.mark.anyio


async def test_an_in_cluster_load_reads_the_rotated_projected_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "ca.crt").write_bytes(TestCA(tmp_path / "ca").ca_file.read_bytes())
    (account / "namespace").write_text("opa\n")
    token = account / "token"
    token.write_text("first-token")
    monkeypatch.setattr(config, "SERVICE_ACCOUNT_DIR", account)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    monkeypatch.delenv("KUBECONFIG", raising=False)

    first = await config.load_connection("")
    assert first.source == "in-cluster service account"
    assert first.namespace == "opa"
    assert (first.authorization or "").lower() == "bearer first-token"

    token.write_text("rotated-token")  # the kubelet swaps the projected token's file
    second = await config.load_connection("")
    assert (second.authorization or "").lower() == "bearer rotated-token"
    assert second.tls_fingerprint == first.tls_fingerprint, "only the token changed: sessions are kept"
