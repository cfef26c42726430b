"""OPA ends up equal to the cluster even when OPA is changed or refuses kopa for a while (issue 12).

- A JSON Patch that OPA refuses (404: part of the tree was deleted behind kopa's back) makes kopa write the
  namespace again from its own copy; nothing is recorded as written that OPA did not accept.
- While OPA refuses kopa's token, kopa says so once, is not ready, and when OPA accepts it again kopa is
  ready only once everything queued meanwhile is in OPA.
- The drift check repairs policies, data and replicated objects changed in OPA behind kopa's back, and
  touches nothing kopa does not own.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from kubernetes import client

from devstack.opa import AUTHZ_POLICY_ID, OpaServer, authz_policy
from devstack.processes import wait_until
from tests.integration.conftest import KopaFactory
from tests.integration.helpers import (
    DATA,
    POLICY,
    data,
    get,
    log_text,
    metric,
    policy_ids,
    put_configmap,
    scrape,
    wait_data,
    wait_probe,
    wait_status,
)
from tests.integration.test_replication import service, wait_for

pytestmark = pytest.mark.integration

TIMEOUT = 60.0


def test_a_refused_patch_rewrites_the_namespace_from_kopas_copy(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    for name in ("a", "b"):
        core_v1.create_namespaced_service(namespace, service(name))
    run_kopa(
        f"--opa-url={opa.api_url}",
        f"--namespaces={namespace}",
        "--replicate=v1/services",
        "--drift-check-interval=0",  # the patch path alone must repair it
    )
    wait_for(opa, f"kubernetes/services/{namespace}", lambda v: set(v or {}) == {"a", "b"}, "a and b in OPA")

    opa.http().delete(f"/v1/data/kubernetes/services/{namespace}")  # behind kopa's back
    core_v1.patch_namespaced_service("a", namespace, {"metadata": {"labels": {"changed": "yes"}}})

    def converged(value: dict[str, dict[str, object]] | None) -> bool:
        if set(value or {}) != {"a", "b"}:
            return False
        labels = value["a"]["metadata"].get("labels") or {}  # type: ignore[index, union-attr]
        return labels == {"changed": "yes"}

    wait_for(opa, f"kubernetes/services/{namespace}", converged, "namespace rewritten from kopa's copy")


def test_a_refused_token_is_an_outage_and_readiness_waits_for_every_retry(
    run_kopa: KopaFactory, secure_opa: OpaServer, core_v1: client.CoreV1Api, namespace: str, tmp_path: Path
) -> None:
    assert secure_opa.token_file is not None and secure_opa.ca_file is not None
    token_file = tmp_path / "token"
    shutil.copy(secure_opa.token_file, token_file)
    put_configmap(core_v1, namespace, "first", {"x.json": '{"n": 0}'}, DATA)
    kopa = run_kopa(
        f"--opa-url={secure_opa.api_url}",
        f"--opa-auth-token-file={token_file}",
        f"--opa-ca-file={secure_opa.ca_file}",
        f"--namespaces={namespace}",
    )
    wait_probe(kopa, "/readyz", 200)

    token_file.write_text("not-the-token\n")
    body = wait_probe(kopa, "/readyz", 503)
    assert any("refuses kopa's credentials (HTTP 401)" in r for r in body["reasons"]), body
    names = [f"during-{i}" for i in range(5)]
    for i, name in enumerate(names):
        put_configmap(core_v1, namespace, name, {"x.json": f'{{"n": {i + 1}}}'}, DATA)
    # The changes reach kopa, which waits; OPA stays as it was and /readyz says why, for a while.
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        status, _ = get(kopa, "/readyz")
        assert status == 503
        time.sleep(0.1)
    assert data(secure_opa, namespace) == {"first": {"x.json": {"n": 0}}}
    text = log_text(kopa)
    assert text.count("OPA refuses kopa's credentials") == 1, "the refusal is logged once"
    assert "keys to OPA failed" not in text, "no warning per batch"
    assert "could not write the readiness marker" not in text
    assert metric(scrape(kopa), "kopa_opa_credentials_refused_total") == 1

    shutil.copy(secure_opa.token_file, token_file)
    # The first moment kopa says ready again, OPA holds everything.
    wait_until(lambda: get(kopa, "/readyz")[0] == 200, timeout=TIMEOUT, max_interval=0.02, what="ready again")
    expected = {"first": {"x.json": {"n": 0}}} | {n: {"x.json": {"n": i + 1}} for i, n in enumerate(names)}
    assert data(secure_opa, namespace) == expected
    assert "OPA accepts kopa's credentials again" in log_text(kopa)


def test_the_drift_check_repairs_what_was_changed_behind_kopas_back(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    rules = {
        "a.rego": "package drift.a\n\nx := 1\n",
        "b.rego": "package drift.b\n\ny := 2\n",
    }
    put_configmap(core_v1, namespace, "rules", rules, POLICY)
    put_configmap(core_v1, namespace, "facts", {"f.json": '{"v": 1}'}, DATA)
    core_v1.create_namespaced_service(namespace, service("web"))
    kopa = run_kopa(
        f"--opa-url={opa.api_url}",
        f"--namespaces={namespace}",
        "--replicate=v1/services",
        "--drift-check-interval=1s",
    )
    wait_status(core_v1, namespace, "rules")
    wait_data(opa, f"{namespace}/facts/f.json", {"v": 1})
    web = wait_for(opa, f"kubernetes/services/{namespace}/web", bool, "web replicated")

    http = opa.http()
    ids = {f"{namespace}/rules/a.rego", f"{namespace}/rules/b.rego"}
    http.delete(f"/v1/policies/{namespace}/rules/a.rego")
    http.put(f"/v1/policies/{namespace}/rules/b.rego", "package drift.b\n\ny := 3\n", "text/plain")
    http.put(f"/v1/policies/{namespace}/ghost/x.rego", "package ghost\n\nz := 1\n", "text/plain")
    http.put("/v1/policies/bootstrap.rego", "package bootstrap\n\nkept := true\n", "text/plain")
    http.put(f"/v1/data/{namespace}/facts/f.json", {"v": "changed"})
    http.put(f"/v1/data/kubernetes/services/{namespace}/web", {**web, "spec": {}})
    stray = f"{namespace}-stray"  # a namespace the cluster has no service in
    http.put(f"/v1/data/kubernetes/services/{stray}", {"ghost": {"metadata": {"name": "ghost"}}})
    http.put("/v1/data/someone/else", {"mine": True})

    def repaired() -> bool:
        raws = {p["id"]: p["raw"] for p in http.get_json("/v1/policies")["result"]}
        return (
            {i for i in raws if i.startswith(f"{namespace}/")} == ids
            and raws[f"{namespace}/rules/b.rego"] == rules["b.rego"]
            and data(opa, f"{namespace}/facts/f.json") == {"v": 1}
            and data(opa, f"kubernetes/services/{namespace}/web") == web
            and data(opa, f"kubernetes/services/{stray}") is None
        )

    wait_until(repaired, timeout=TIMEOUT, what="OPA repaired by the drift check")
    assert "bootstrap.rego" in policy_ids(opa), "a policy kopa does not own is left alone"
    assert data(opa, "someone/else") == {"mine": True}, "data kopa does not own is left alone"
    samples = scrape(kopa)
    assert metric(samples, "kopa_drift_repaired_total", kind="policy") >= 3
    assert metric(samples, "kopa_drift_repaired_total", kind="data") >= 1
    assert metric(samples, "kopa_drift_repaired_total", kind="replicated") >= 1
    assert log_text(kopa).count(f"drift: policy {namespace}/rules/a.rego") == 1, "each repair logged once"


def test_the_drift_check_reads_whole_namespaces_from_an_opa_that_refuses_kopas_queries(
    run_kopa: KopaFactory, secure_opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """kube-mgmt only ever used OPA's data and policy APIs, so an authorization policy written for it may
    refuse kopa's token the query API: the drift check then GETs each namespace whole, and still repairs."""
    assert secure_opa.token_file is not None and secure_opa.ca_file is not None
    assert secure_opa.token is not None
    http = secure_opa.http()
    token = json.dumps(secure_opa.token)
    admitted = authz_policy(secure_opa.token).replace(
        f"allow if input.identity == {token}",
        f'allow if {{\n\tinput.identity == {token}\n\tinput.path != ["v1", "query"]\n}}',
    )
    assert admitted != authz_policy(secure_opa.token)
    http.put(f"/v1/policies/{AUTHZ_POLICY_ID}", admitted, "text/plain")
    core_v1.create_namespaced_service(namespace, service("web"))
    kopa = run_kopa(
        f"--opa-url={secure_opa.api_url}",
        f"--opa-auth-token-file={secure_opa.token_file}",
        f"--opa-ca-file={secure_opa.ca_file}",
        f"--namespaces={namespace}",
        "--replicate=v1/services",
        "--drift-check-interval=1s",
    )
    web = wait_for(secure_opa, f"kubernetes/services/{namespace}/web", bool, "web replicated")
    http.put(f"/v1/data/kubernetes/services/{namespace}/web", {**web, "spec": {}})
    stray = f"{namespace}-stray"  # a namespace the cluster has no service in
    http.put(f"/v1/data/kubernetes/services/{stray}", {"ghost": {"metadata": {"name": "ghost"}}})
    wait_until(
        lambda: data(secure_opa, f"kubernetes/services/{namespace}/web") == web,
        timeout=TIMEOUT,
        what="web repaired by the drift check",
    )
    text = log_text(kopa)
    assert text.count("OPA refuses kopa's queries") == 1, "said once"
    assert "refuses kopa's credentials" not in text, "not taken for a refused token"
    assert get(kopa, "/readyz")[0] == 200
