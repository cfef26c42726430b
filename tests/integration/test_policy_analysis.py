"""The policy analysis against the ASTs a real OPA gives (GET /v1/policies): its JSON shape is not a
documented contract, so these tests pin kopa's walk to the OPA version kopa is tested with."""

from __future__ import annotations

from typing import Any

import pytest

from app.replication.analysis import Analysis, analyse
from devstack.opa import OpaServer


def analysed(
    opa: OpaServer, modules: dict[str, str], entrypoint: str = "main/main", **kwargs: Any
) -> Analysis:
    http = opa.http()
    for policy_id, text in modules.items():
        http.put(f"/v1/policies/{policy_id}", text, "text/plain")
    policies = http.get_json("/v1/policies")["result"]
    return analyse(policies, entrypoint=entrypoint.split("/"), prefix=["kubernetes"], **kwargs)


LIB = """package lib

import rego.v1

owner(ns) := data.kubernetes.namespaces[ns].metadata.labels.owner

unused := data.kubernetes.secrets
"""


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("some ns, name\n    data.kubernetes.services[ns][name]", {"services"}),
        ("import_alias", {"ingresses"}),
        ("every p in data.kubernetes.pods { p.spec }", {"pods"}),
        ("xs := [x | some x in data.kubernetes.nodes]\n    count(xs) > 0", {"nodes"}),
        ("s := {k: v | some k, v in data.kubernetes.configmaps}\n    count(s) > 0", {"configmaps"}),
        ('lib.owner(input.ns) == "me"', {"namespaces"}),
        ("helper", {"deployments"}),
        ("allow with input as data.kubernetes.endpoints", {"endpoints", "leases"}),
        ("true", set()),
    ],
    ids=[
        "some",
        "import-alias",
        "every",
        "comprehension",
        "object-comprehension",
        "function-in-package",
        "rule-in-same-package",
        "with",
        "nothing",
    ],
)
def test_what_the_entrypoint_reads(opa: OpaServer, body: str, expected: set[str]) -> None:
    imports = "import rego.v1\nimport data.lib\n"
    if body == "import_alias":
        imports += "import data.kubernetes.ingresses as ing\n"
        body = "ing[_][_]"
    main = f"""package main

{imports}
main if {{
    {body}
}}

helper if data.kubernetes.deployments[_][_].spec.replicas > 1

allow if data.kubernetes.leases[input.ns]
"""
    result = analysed(opa, {"lib": LIB, "main": main})
    assert result.entrypoint_found
    assert result.plurals == expected  # never secrets: `unused` is not reached
    assert result.unbounded == []


def test_a_reference_without_a_constant_plural_is_reported_not_guessed(opa: OpaServer) -> None:
    main = """package main

import rego.v1

main if {
    data.kubernetes[input.kind][_][_]
    data.kubernetes.services
}
"""
    result = analysed(opa, {"main": main})
    assert result.plurals == {"services"}
    assert result.unbounded == ["main: data.kubernetes[_][_][_]"]


def test_packages_below_the_replicate_path_are_rules_not_resources(opa: OpaServer) -> None:
    """kube-mgmt's classic layout: policies in package kubernetes.admission next to data.kubernetes.pods."""
    admission = """package kubernetes.admission

import rego.v1

deny contains "no" if data.kubernetes.pods[input.ns][input.name].spec.hostNetwork
"""
    main = "package main\n\nimport rego.v1\n\nmain := data.kubernetes.admission.deny\n"
    result = analysed(opa, {"admission": admission, "main": main})
    assert result.plurals == {"pods"}


def test_roots_are_analysed_whole_and_a_missing_entrypoint_is_said(opa: OpaServer) -> None:
    cm = (
        "package team.checks\n\nimport rego.v1\n\nbad contains n if some n, _ in data.kubernetes.namespaces\n"
    )
    result = analysed(opa, {"ns/cm/checks.rego": cm, "lib": LIB}, roots={"ns/cm/checks.rego"})
    assert not result.entrypoint_found
    assert result.plurals == {"namespaces"}


def test_a_custom_entrypoint_and_rules_in_other_packages(opa: OpaServer) -> None:
    system = """package system

import rego.v1

main := {"allowed": data.policies.allow}
"""
    policies = "package policies\n\nimport rego.v1\n\nallow if data.kubernetes.networkpolicies[_]\n"
    result = analysed(opa, {"system": system, "policies": policies}, entrypoint="system/main")
    assert result.entrypoint_found and result.plurals == {"networkpolicies"}
