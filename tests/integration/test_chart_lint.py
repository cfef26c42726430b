"""A real Kubernetes manifest checker on the chart's rendered output: kube-score (built from the Go module
proxy like the other servers, scripts/build-servers.sh) scores every values case of the chart's test matrix
(tests/integration/test_helm.py). A finding is either fixed in the chart or accepted in ACCEPTED, with its
reason, and each accepted finding is listed with that reason in the chart's README ("kube-score").
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from devstack.binaries import tool_path
from devstack.certs import TestCA
from tests.conftest import require_binaries
from tests.integration.chart import CHART, Helm
from tests.integration.test_helm import CASES, case_values

pytestmark = pytest.mark.integration

KUBERNETES_VERSION = "v1.34"

# The chart's deliberate choices kube-score disagrees with: (check id, summary) -> the README's reason.
# The README's kube-score table names each check id and summary.
ACCEPTED: dict[tuple[str, str], str] = {
    ("container-image-pull-policy", "ImagePullPolicy is not set to Always"): (
        "images are pinned by tag (or digest): IfNotPresent, as kube-mgmt's chart, pulls once per node"
    ),
    ("pod-networkpolicy", "The pod does not have a matching NetworkPolicy"): (
        "networkPolicy.enabled is off by default: which peers may reach OPA depends on the cluster"
    ),
    ("pod-networkpolicy", "The pod does not have a matching egress NetworkPolicy"): (
        "the chart's NetworkPolicy leaves egress open: kopa reaches the API server, OPA may download bundles"
    ),
    ("deployment-has-host-podantiaffinity", "Deployment does not have a host podAntiAffinity set"): (
        "the chart spreads pods over nodes with a soft topology spread constraint instead"
    ),
    ("deployment-replicas", "Deployment few replicas"): (
        "replicas defaults to 1 as in kube-mgmt's chart; run 2 or more with a Fail webhook"
    ),
}

# Flags: no CPU limits on purpose (throttling delays webhook answers; the README's Sizing says so).
FLAGS = ["--ignore-container-cpu-limit", f"--kubernetes-version={KUBERNETES_VERSION}"]


def findings(manifest: Path) -> set[tuple[str, str, str]]:
    """(object, check id, summary) of every finding kube-score reports on `manifest`."""
    result = subprocess.run(
        [str(tool_path("kube-score")), "score", *FLAGS, "--output-format=json", str(manifest)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.stdout, result.stderr
    found: set[tuple[str, str, str]] = set()
    report: list[dict[str, Any]] = json.loads(result.stdout)
    for obj in report:
        for check in obj["checks"]:
            if check.get("skipped") or check["grade"] >= 10:
                continue
            for comment in check.get("comments") or [{"summary": check["check"]["name"]}]:
                found.add((obj["object_name"], check["check"]["id"], comment["summary"]))
    return found


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    require_binaries("helm", "kube-score")
    return Helm(tmp_path_factory.mktemp("helm"))


@pytest.fixture(scope="module")
def user_tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    ca = TestCA(tmp_path_factory.mktemp("user-ca"))
    cert, key = ca.issue("kopa.kopa-system.svc", ips=["127.0.0.1"], dns=["kopa.kopa-system.svc"])
    return {"CA": ca.ca_file.read_text(), "cert": cert.read_text(), "key": key.read_text()}


@pytest.mark.parametrize("case", CASES)
def test_kube_score_finds_nothing_but_the_accepted(
    helm: Helm, case: str, user_tls: dict[str, str], tmp_path: Path
) -> None:
    rendered = helm.template(case_values(case, "kopa-system", user_tls), namespace="kopa-system")
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(rendered.text, encoding="utf-8")
    unexpected = sorted(f for f in findings(manifest) if (f[1], f[2]) not in ACCEPTED)
    assert unexpected == [], unexpected


def test_kube_score_sees_a_broken_manifest(helm: Helm, tmp_path: Path) -> None:
    """The checker really checks: a pod without limits and with a writable root is reported."""
    rendered = helm.template(
        {"resources": {"limits": None}, "containerSecurityContext": {"readOnlyRootFilesystem": False}}
    )
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(rendered.text, encoding="utf-8")
    checks = {f[1] for f in findings(manifest)}
    assert {"container-resources", "container-security-context-readonlyrootfilesystem"} <= checks, checks


def test_the_readme_lists_every_accepted_finding_with_its_reason() -> None:
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    section = readme.split("## kube-score", 1)[1].split("\n## ", 1)[0]
    for check, summary in ACCEPTED:
        rows = [line for line in section.splitlines() if line.startswith(f"| `{check}` | {summary} | ")]
        assert rows, f"the README's kube-score section does not list {check}: {summary}"
    assert "--ignore-container-cpu-limit" in section
