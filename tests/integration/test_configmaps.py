"""Policies and data from ConfigMaps, end to end: real kube-apiserver, real OPA, kopa as a process.

Includes kube-mgmt's own end-to-end scenarios (default, labels, multi) with its exact annotation strings,
and a test for each of kube-mgmt's ConfigMap defects that kopa fixes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubernetes import client

from devstack.opa import OpaServer
from devstack.processes import wait_until
from tests.integration.conftest import KopaFactory
from tests.integration.helpers import (
    DATA,
    OK,
    POLICY,
    annotations_of,
    data,
    error_of,
    log_text,
    metric,
    opa_writes,
    policy_ids,
    put_configmap,
    scrape,
    status_of,
    wait_data,
    wait_log,
    wait_policies,
    wait_probe,
    wait_status,
)
from tests.integration.test_auto_replication import build_bundle, opa_with_config

pytestmark = pytest.mark.integration

INCLUDE_REGO = """package include

allow if input.hello == "world"
"""


def test_kube_mgmt_default_scenario(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    put_configmap(core_v1, namespace, "policy-include", {"include.rego": INCLUDE_REGO}, POLICY)
    put_configmap(
        core_v1,
        namespace,
        "policy-qwerty",
        {"q.rego": "package qwerty\n\nx := 1\n"},
        {"openpolicyagent.org/policy": "qwerty"},
    )
    put_configmap(core_v1, namespace, "policy-unlabelled", {"u.rego": "package unlabelled\n\nx := 1\n"})
    put_configmap(core_v1, namespace, "data-include", {"include.json": '{"inKey": "inValue"}'}, DATA)

    assert wait_status(core_v1, namespace, "policy-include") == OK
    assert wait_status(core_v1, namespace, "data-include") == OK
    assert f"{namespace}/policy-include/include.rego" in policy_ids(opa)
    answer = opa.http().post("/v1/data/include/allow", {"input": {"hello": "world"}})
    assert answer["result"] is True
    assert data(opa, namespace) == {"data-include": {"include.json": {"inKey": "inValue"}}}
    ours = {i for i in policy_ids(opa) if i.startswith(f"{namespace}/")}
    assert ours == {f"{namespace}/policy-include/include.rego"}, "qwerty and unlabelled must be ignored"
    assert status_of(core_v1, namespace, "policy-qwerty") is None
    assert status_of(core_v1, namespace, "policy-unlabelled") is None


def test_kube_mgmt_labels_scenario(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    run_kopa(
        f"--opa-url={opa.api_url}",
        f"--namespaces={namespace}",
        "--policy-label=qweqwe/policy",
        "--policy-value=111",
        "--data-label=asdasd/data",
        "--data-value=222",
    )
    put_configmap(core_v1, namespace, "default-policy", {"d.rego": "package dflt\n\nx := 1\n"}, POLICY)
    put_configmap(core_v1, namespace, "default-data", {"d.json": "{}"}, DATA)
    put_configmap(
        core_v1, namespace, "policy-include", {"include.rego": INCLUDE_REGO}, {"qweqwe/policy": "111"}
    )
    put_configmap(
        core_v1, namespace, "data-include", {"include.json": '{"inKey":"inValue"}'}, {"asdasd/data": "222"}
    )

    assert wait_status(core_v1, namespace, "policy-include") == OK
    assert wait_status(core_v1, namespace, "data-include") == OK
    assert {i for i in policy_ids(opa) if i.startswith(f"{namespace}/")} == {
        f"{namespace}/policy-include/include.rego"
    }
    assert data(opa, namespace) == {"data-include": {"include.json": {"inKey": "inValue"}}}
    assert status_of(core_v1, namespace, "default-policy") is None
    assert status_of(core_v1, namespace, "default-data") is None


def test_empty_label_values_select_configmaps_labelled_with_an_empty_value(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """`--data-value=` selects `openpolicyagent.org/data: ""`, as kube-mgmt's selector does."""
    run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}", "--policy-value=", "--data-value=")
    put_configmap(core_v1, namespace, "empty", {"e.json": '{"e": 1}'}, {"openpolicyagent.org/data": ""})
    put_configmap(core_v1, namespace, "opa-valued", {"o.json": "{}"}, DATA)
    assert wait_status(core_v1, namespace, "empty") == OK
    assert data(opa, namespace) == {"empty": {"e.json": {"e": 1}}}
    assert status_of(core_v1, namespace, "opa-valued") is None


MULTI_A = """package multi

import data.multilib

allow if multilib.is_world(input.hello)
"""
MULTI_B = """package multilib

is_world(x) if x == "world"
"""
MULTI_FAIL = """package multifail

allow if undefined_function(input.x)
"""


def test_kube_mgmt_multi_scenario_and_unload_reload_on_label(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    put_configmap(core_v1, namespace, "multi-file-policy", {"a.rego": MULTI_A, "b.rego": MULTI_B}, POLICY)
    put_configmap(core_v1, namespace, "multi-file-fail-policy", {"f.rego": MULTI_FAIL}, POLICY)

    assert wait_status(core_v1, namespace, "multi-file-policy") == OK
    assert opa.http().post("/v1/data/multi/allow", {"input": {"hello": "world"}})["result"] is True
    failed = error_of(wait_status(core_v1, namespace, "multi-file-fail-policy", lambda v: v != OK))
    assert failed["code"] == "invalid_parameter"
    assert any("undefined_function" in e["message"] for e in failed["errors"])
    assert failed["errors"][0]["location"]["file"] == f"{namespace}/multi-file-fail-policy/f.rego"

    # Removing the label unloads both modules; adding it back loads them again.
    both = {f"{namespace}/multi-file-policy/a.rego", f"{namespace}/multi-file-policy/b.rego"}
    put_configmap(core_v1, namespace, "multi-file-policy", {"a.rego": MULTI_A, "b.rego": MULTI_B}, None)
    wait_policies(opa, set(), f"{namespace}/multi-file-policy/")
    put_configmap(core_v1, namespace, "multi-file-policy", {"a.rego": MULTI_A, "b.rego": MULTI_B}, POLICY)
    wait_policies(opa, both, f"{namespace}/multi-file-policy/")
    assert opa.http().post("/v1/data/multi/allow", {"input": {"hello": "world"}})["result"] is True


def test_hello_world_from_kube_mgmt_guide(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    hello = 'package kubernetes\n\nexample := "Hello, Kubernetes!"\n'
    put_configmap(core_v1, namespace, "hello-world", {"example.rego": hello}, POLICY)
    wait_data(opa, "kubernetes/example", "Hello, Kubernetes!")


def test_dependencies_across_configmaps_resolve_in_any_order(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    user = f"package dep{namespace.replace('-', '')}.user\n\nimport data.lib{namespace.replace('-', '')}\n\n"
    user += f'allow if lib{namespace.replace("-", "")}.greet(input.name) == "hi bob"\n'
    lib = f'package lib{namespace.replace("-", "")}\n\ngreet(n) := concat(" ", ["hi", n])\n'
    put_configmap(core_v1, namespace, "user", {"user.rego": user}, POLICY)
    failed = error_of(wait_status(core_v1, namespace, "user", lambda v: v != OK))
    assert "greet" in json.dumps(failed)
    # The library arrives later, in another ConfigMap: the user module loads with no action from anyone.
    put_configmap(core_v1, namespace, "lib", {"lib.rego": lib}, POLICY)
    assert wait_status(core_v1, namespace, "user") == OK
    assert wait_status(core_v1, namespace, "lib") == OK
    pkg = f"dep{namespace.replace('-', '')}/user/allow"
    assert opa.http().post(f"/v1/data/{pkg}", {"input": {"name": "bob"}})["result"] is True
    # kube-mgmt's shared retries annotation is gone: retry state lives in memory.
    assert "openpolicyagent.org/kube-mgmt-retries" not in annotations_of(core_v1, namespace, "user")

    # Events tell the story: the failure, then the recovery.
    events = client.EventsV1Api(core_v1.api_client).list_namespaced_event(namespace).items
    reasons = [(e.regarding.name if e.regarding else None, e.reason, e.type) for e in events]
    assert ("user", "LoadFailed", "Warning") in reasons
    assert ("user", "LoadRecovered", "Normal") in reasons


def test_removing_the_library_unloads_its_dependents_and_reports_them(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    tag = namespace.replace("-", "")
    lib = f"package lib{tag}\n\ndouble(x) := x * 2\n"
    user = f"package use{tag}\n\nimport data.lib{tag}\n\nfour := lib{tag}.double(2)\n"
    put_configmap(core_v1, namespace, "lib", {"lib.rego": lib}, POLICY)
    put_configmap(core_v1, namespace, "user", {"user.rego": user}, POLICY)
    wait_data(opa, f"use{tag}/four", 4)
    core_v1.delete_namespaced_config_map("lib", namespace)
    wait_policies(opa, set(), f"{namespace}/")
    error_of(wait_status(core_v1, namespace, "user", lambda v: v != OK))
    # And back: the user module loads again once its library does.
    put_configmap(core_v1, namespace, "lib", {"lib.rego": lib}, POLICY)
    assert wait_status(core_v1, namespace, "user") == OK
    wait_data(opa, f"use{tag}/four", 4)


def test_a_key_removed_from_a_configmap_is_removed_from_opa(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """kube-mgmt defect: keys removed from a still-labelled ConfigMap stayed loaded."""
    run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    tag = namespace.replace("-", "")
    two = {"a.rego": f"package {tag}.a\n\nx := 1\n", "b.rego": f"package {tag}.b\n\nx := 2\n"}
    put_configmap(core_v1, namespace, "pols", two, POLICY)
    wait_policies(opa, {f"{namespace}/pols/a.rego", f"{namespace}/pols/b.rego"}, f"{namespace}/")
    put_configmap(core_v1, namespace, "pols", {"a.rego": two["a.rego"]}, POLICY)
    wait_policies(opa, {f"{namespace}/pols/a.rego"}, f"{namespace}/")

    put_configmap(core_v1, namespace, "docs", {"x.json": '{"x": 1}', "y.json": '{"y": 2}'}, DATA)
    wait_data(opa, f"{namespace}/docs", {"x.json": {"x": 1}, "y.json": {"y": 2}})
    put_configmap(core_v1, namespace, "docs", {"y.json": '{"y": 3}'}, DATA)
    wait_data(opa, f"{namespace}/docs", {"y.json": {"y": 3}})


def test_deleting_a_data_configmap_removes_exactly_its_subtree(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """kube-mgmt defect: deleting a data ConfigMap with several keys could wipe the whole data root."""
    opa.http().put("/v1/data/unrelated", {"keep": True})
    run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    keys = {f"k{i}.json": json.dumps({"i": i}) for i in range(3)}
    put_configmap(core_v1, namespace, "several", keys, DATA)
    put_configmap(core_v1, namespace, "other", {"o.json": '{"o": true}'}, DATA)
    wait_data(opa, f"{namespace}/several", {k: json.loads(v) for k, v in keys.items()})
    wait_data(opa, f"{namespace}/other", {"o.json": {"o": True}})
    core_v1.delete_namespaced_config_map("several", namespace)
    wait_data(opa, namespace, {"other": {"o.json": {"o": True}}})
    assert data(opa, "unrelated") == {"keep": True}


def test_data_errors_name_the_key_and_spare_the_good_keys(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    put_configmap(core_v1, namespace, "one-bad", {"good.json": '{"a": 1}', "bad.json": "{not json"}, DATA)
    single = error_of(wait_status(core_v1, namespace, "one-bad", lambda v: v != OK))
    assert single["code"] == "invalid_data"
    assert "bad.json" in single["message"]
    wait_data(opa, f"{namespace}/one-bad", {"good.json": {"a": 1}})

    put_configmap(
        core_v1, namespace, "two-bad", {"arr.json": "[1, 2]", "num.json": "3", "ok.json": "{}"}, DATA
    )
    several = error_of(wait_status(core_v1, namespace, "two-bad", lambda v: v != OK))
    assert isinstance(several, list)
    assert [e["code"] for e in several] == ["invalid_data", "invalid_data"]
    assert "arr.json" in several[0]["message"] and "array" in several[0]["message"]
    assert "num.json" in several[1]["message"]
    wait_data(opa, f"{namespace}/two-bad", {"ok.json": {}})

    # Fixing the data clears the error.
    put_configmap(core_v1, namespace, "one-bad", {"good.json": '{"a": 1}', "bad.json": '{"b": 2}'}, DATA)
    assert wait_status(core_v1, namespace, "one-bad") == OK
    wait_data(opa, f"{namespace}/one-bad", {"good.json": {"a": 1}, "bad.json": {"b": 2}})


def test_data_wins_when_both_labels_are_present_and_relabelling_switches(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    body = {"x.json": '{"v": 1}'}
    put_configmap(core_v1, namespace, "both", body, {**POLICY, **DATA})
    wait_data(opa, f"{namespace}/both", {"x.json": {"v": 1}})
    assert wait_status(core_v1, namespace, "both") == OK
    assert not {i for i in policy_ids(opa) if i.startswith(f"{namespace}/")}

    rego = {"p.rego": f"package {namespace.replace('-', '')}\n\nv := 1\n"}
    put_configmap(core_v1, namespace, "both", rego, POLICY)
    wait_policies(opa, {f"{namespace}/both/p.rego"}, f"{namespace}/")
    wait_data(opa, f"{namespace}/both", None)


def test_own_annotation_writes_do_not_reload(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    put_configmap(
        core_v1, namespace, "quiet", {"q.rego": f"package {namespace.replace('-', '')}\n\nq := 1\n"}, POLICY
    )
    assert wait_status(core_v1, namespace, "quiet") == OK
    writes = opa_writes(opa, "v1/policies")
    # A change kopa must see (a label it does not select on) proves the watch delivered everything since.
    core_v1.patch_namespaced_config_map("quiet", namespace, {"metadata": {"labels": {"touched": "yes"}}})
    marker = f"{namespace}/marker/m.rego"
    put_configmap(core_v1, namespace, "marker", {"m.rego": "package marker\n\nm := 1\n"}, POLICY)
    wait_policies(opa, {f"{namespace}/quiet/q.rego", marker}, f"{namespace}/")
    assert wait_status(core_v1, namespace, "marker") == OK
    assert opa_writes(opa, "v1/policies") == writes + 1, "only the marker's module may have been written"


def test_a_status_removed_by_a_replace_is_written_again(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """`kubectl replace`, or a GitOps tool that replaces, sends the ConfigMap without kopa's annotation."""
    run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    package = namespace.replace("-", "")
    put_configmap(core_v1, namespace, "good", {"g.rego": f"package {package}\n\ng := 1\n"}, POLICY)
    put_configmap(core_v1, namespace, "bad", {"b.rego": "package broken\n\nnot rego {\n"}, POLICY)
    assert wait_status(core_v1, namespace, "good") == OK
    error = wait_status(core_v1, namespace, "bad", lambda v: v != OK)
    for name in ("good", "bad"):
        current = core_v1.read_namespaced_config_map(name, namespace)
        assert current.metadata is not None
        current.metadata.annotations = {}
        core_v1.replace_namespaced_config_map(name, namespace, current)
    assert wait_status(core_v1, namespace, "good") == OK
    assert wait_status(core_v1, namespace, "bad", lambda v: v != OK) == error


def test_two_sidecars_whose_opas_disagree_each_say_their_status_once(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str, tmp_path: Path
) -> None:
    """Two push-mode replicas, each beside its own OPA, can take different modules of a conflicting pair
    (which one fails depends on the order each saw them). Each writes its status once: rewriting the other's
    made both patch the annotation, and record Events, about 200 times a second without end."""
    package = namespace.replace("-", "")
    run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    put_configmap(core_v1, namespace, "z-first", {"f.rego": f"package {package}\n\nf := 1\n"}, POLICY)
    assert wait_status(core_v1, namespace, "z-first") == OK
    put_configmap(core_v1, namespace, "a-second", {"f.rego": f"package {package}\n\nf(x) := 2\n"}, POLICY)
    wait_status(core_v1, namespace, "a-second", lambda v: v != OK)
    with OpaServer(tmp_path / "opa-2", "plain") as second:
        # The second lists the ConfigMaps in name order: a-second loads, z-first is the one that fails.
        run_kopa(f"--opa-url={second.api_url}", f"--namespaces={namespace}")
        wait_status(core_v1, namespace, "z-first", lambda v: v != OK)
        # Both sidecars agree on this one; once its status is written, each has seen the other's patches.
        put_configmap(core_v1, namespace, "barrier", {"b.rego": f"package {package}.b\n\nb := 1\n"}, POLICY)
        assert wait_status(core_v1, namespace, "barrier") == OK
        assert status_of(core_v1, namespace, "z-first") != OK
        assert status_of(core_v1, namespace, "a-second") == OK
        events = client.EventsV1Api(core_v1.api_client).list_namespaced_event(namespace).items
        told = sorted(
            (e.regarding.name, e.reason)
            for e in events
            if e.regarding is not None and e.regarding.name in ("z-first", "a-second")
        )
        # The first sidecar: a-second failed. The second: a-second recovered, z-first failed.
        assert told == [("a-second", "LoadFailed"), ("a-second", "LoadRecovered"), ("z-first", "LoadFailed")]


def test_a_policy_and_a_data_configmap_on_one_path_resolve_when_either_goes(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """A module whose package defines a data ConfigMap's path, and the ConfigMap: the later one is refused.
    Once the other goes it loads (it stayed refused, its status quoting the deleted object, for good)."""
    ns = namespace.replace("-", "")[:50]  # a namespace a Rego package can name
    core_v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    try:
        run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={ns}")
        # The policy first: the data ConfigMap is refused, then loads when the policy goes.
        put_configmap(core_v1, ns, "dr-pol", {"p.rego": f'package {ns}["dr"]\n\nk := 1\n'}, POLICY)
        assert wait_status(core_v1, ns, "dr-pol") == OK
        put_configmap(core_v1, ns, "dr", {"k": '{"v": 1}'}, DATA)
        wait_status(core_v1, ns, "dr", lambda v: v != OK)
        core_v1.delete_namespaced_config_map("dr-pol", ns)
        assert wait_status(core_v1, ns, "dr") == OK
        wait_data(opa, f"{ns}/dr/k", {"v": 1})
        # The data first: the policy is refused, then loads when the data ConfigMap goes.
        put_configmap(core_v1, ns, "ds", {"k": '{"v": 2}'}, DATA)
        assert wait_status(core_v1, ns, "ds") == OK
        put_configmap(core_v1, ns, "ds-pol", {"p.rego": f'package {ns}["ds"]\n\nk := 3\n'}, POLICY)
        wait_status(core_v1, ns, "ds-pol", lambda v: v != OK)
        core_v1.delete_namespaced_config_map("ds", ns)
        assert wait_status(core_v1, ns, "ds-pol") == OK
        wait_data(opa, f"{ns}/ds/k", 3)
    finally:
        core_v1.delete_collection_namespaced_config_map(ns)
        core_v1.delete_namespace(ns)


def test_several_namespaces_and_all_namespaces(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    other = f"{namespace}-b"
    core_v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
    try:
        run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace},{other}")
        put_configmap(core_v1, namespace, "d", {"x.json": '{"n": 1}'}, DATA)
        put_configmap(core_v1, other, "d", {"x.json": '{"n": 2}'}, DATA)
        wait_data(opa, f"{namespace}/d/x.json", {"n": 1})
        wait_data(opa, f"{other}/d/x.json", {"n": 2})
    finally:
        core_v1.delete_collection_namespaced_config_map(other)
        core_v1.delete_namespace(other)


def test_all_namespaces_with_star(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    run_kopa(f"--opa-url={opa.api_url}", "--namespaces=*")
    put_configmap(core_v1, namespace, "d", {"x.json": '{"star": true}'}, DATA)
    wait_data(opa, f"{namespace}/d/x.json", {"star": True})


def test_disabled_policies_and_data_are_not_loaded(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}", "--enable-policies=false")
    put_configmap(core_v1, namespace, "p", {"p.rego": "package disabledpol\n\nx := 1\n"}, POLICY)
    put_configmap(core_v1, namespace, "d", {"x.json": '{"d": 1}'}, DATA)
    wait_data(opa, f"{namespace}/d/x.json", {"d": 1})
    assert status_of(core_v1, namespace, "p") is None
    assert not {i for i in policy_ids(opa) if i.startswith(f"{namespace}/")}


def test_opa_down_at_start_loads_everything_once_it_is_up(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    opa.stop()
    run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    put_configmap(core_v1, namespace, "early", {"e.json": '{"early": true}'}, DATA)
    put_configmap(core_v1, namespace, "early-policy", {"e.rego": "package early\n\ne := true\n"}, POLICY)
    opa.start()
    wait_data(opa, f"{namespace}/early/e.json", {"early": True})
    wait_data(opa, "early/e", True)
    assert wait_status(core_v1, namespace, "early-policy") == OK


def test_binary_data_only_is_reported(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    body = client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="binary", labels=POLICY), binary_data={"p.rego": "cGFja2FnZSB4"}
    )
    core_v1.create_namespaced_config_map(namespace, body)
    failed = error_of(wait_status(core_v1, namespace, "binary", lambda v: v != OK))
    assert "binaryData" in failed["message"] and "p.rego" in failed["message"]


def test_parse_errors_wait_for_their_own_change_compile_errors_retry_on_any_change(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """No timed retries of OPA's 4xx: a module is tried again only when something could have fixed it."""
    run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    tag = namespace.replace("-", "")
    put_configmap(core_v1, namespace, "broken", {"b.rego": "package broken\n\nthis is not rego {\n"}, POLICY)
    parse = error_of(wait_status(core_v1, namespace, "broken", lambda v: v != OK))
    assert parse["errors"][0]["code"] == "rego_parse_error"
    put_configmap(
        core_v1, namespace, "needy", {"n.rego": f"package {tag}.n\n\nx := data.fn{tag}.f(1)\n"}, POLICY
    )
    error_of(wait_status(core_v1, namespace, "needy", lambda v: v != OK))

    before = opa_writes(opa, "v1/policies")
    put_configmap(core_v1, namespace, "fn", {"f.rego": f"package fn{tag}\n\nf(x) := x + 1\n"}, POLICY)
    assert wait_status(core_v1, namespace, "needy") == OK
    wait_data(opa, f"{tag}/n/x", 2)
    # fn's module and needy's retry: two writes. The module with a parse error was not tried again.
    assert opa_writes(opa, "v1/policies") == before + 2
    assert error_of(status_of(core_v1, namespace, "broken") or "")["errors"][0]["code"] == "rego_parse_error"


def test_an_opa_whose_bundle_owns_system_and_a_namespace_path_gets_every_configmap(
    run_kopa: KopaFactory, core_v1: client.CoreV1Api, namespace: str, tmp_path: Path
) -> None:
    """A bundle with the roots `system` (a decision-log mask) and `lib`, a namespace kopa watches: OPA
    refuses kopa's readiness marker and ledger under `system`, and the removal of the bundle's module
    `lib/x/lib.rego`, which has the form of kopa's ids. Data stayed out of OPA for good (the ledger's
    refusal failed every batch), kopa never became ready (the marker's), and the drift check tried to
    remove the bundle's module at every pass."""
    files = {
        "mask.rego": 'package system.log\n\nmask contains "/input/password"\n',
        "x/lib.rego": "package lib.x\n\nanswer := 42\n",
    }
    bundle = build_bundle(tmp_path / "bundle", files, ["system", "lib"])
    server, _ = opa_with_config(tmp_path, {"bundles": {"lib": {"resource": f"file://{bundle}"}}})
    with server:
        wait_data(server, "lib/x/answer", 42)
        kopa = run_kopa(
            f"--opa-url={server.api_url}", f"--namespaces={namespace},lib", "--drift-check-interval=200ms"
        )
        put_configmap(core_v1, namespace, "d", {"x.json": '{"v": 1}'}, DATA)
        put_configmap(core_v1, namespace, "p", {"p.rego": "package bundled.owner\n\nv := 1\n"}, POLICY)
        wait_data(server, f"{namespace}/d/x.json", {"v": 1})
        assert wait_status(core_v1, namespace, "d") == OK
        assert wait_status(core_v1, namespace, "p") == OK
        wait_probe(kopa, "/readyz", 200)
        wait_log(kopa, "policy lib/x/lib.rego belongs to one of OPA's bundles; left alone")

        def checks() -> float:  # each drift check reads OPA's policies
            return metric(scrape(kopa), "kopa_opa_requests_total", endpoint="policies", method="GET")

        before = checks()
        wait_until(lambda: checks() >= before + 3, timeout=30, what="three more drift checks")
        assert {"lib/x/lib.rego", "lib/mask.rego"} <= policy_ids(server)
        assert metric(scrape(kopa), "kopa_drift_repaired_total", kind="policy") == 0
        log = log_text(kopa)
        assert log.count("left alone") == 1
        assert "refused kopa's ledger" in log and "refused the readiness marker" in log
