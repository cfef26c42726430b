"""kube-mgmt's most reported defect: OPA restarts empty and nothing refills it. kopa refills it."""

from __future__ import annotations

import time
from collections.abc import Callable
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
    data,
    get,
    policy_ids,
    put_configmap,
    secure_args,
    status_of,
    wait_data,
    wait_log,
    wait_probe,
    wait_status,
)

pytestmark = pytest.mark.integration


def test_opa_killed_and_restarted_is_refilled_from_kopas_copy(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    tag = namespace.replace("-", "")
    kopa = run_kopa(
        f"--opa-url={opa.api_url}",
        f"--namespaces={namespace}",
        "--replicate=v1/services",
        "--opa-check-interval=200ms",
    )
    lib = f"package lib{tag}\n\ntwice(x) := x * 2\n"
    user = f"package use{tag}\n\nimport data.lib{tag}\n\nfour := lib{tag}.twice(2)\n"
    put_configmap(core_v1, namespace, "user", {"user.rego": user}, POLICY)  # depends on lib, loaded later
    put_configmap(core_v1, namespace, "lib", {"lib.rego": lib}, POLICY)
    put_configmap(core_v1, namespace, "doc", {"d.json": '{"x": 1}'}, DATA)
    core_v1.create_namespaced_service(
        namespace,
        client.V1Service(
            metadata=client.V1ObjectMeta(name="svc"),
            spec=client.V1ServiceSpec(ports=[client.V1ServicePort(port=80)]),
        ),
    )
    assert wait_status(core_v1, namespace, "user") == OK
    wait_data(opa, f"use{tag}/four", 4)
    wait_data(opa, "system/kopa/ready", True)
    wait_until(
        lambda: data(opa, f"kubernetes/services/{namespace}/svc"), timeout=30, what="service replicated"
    )
    before = {i for i in policy_ids(opa) if i.startswith(namespace)}

    for round_ in range(3):
        opa.kill()
        opa.start()
        wait_data(opa, "system/kopa/ready", True)
        assert {i for i in policy_ids(opa) if i.startswith(namespace)} == before, f"round {round_}"
        assert data(opa, f"use{tag}/four") == 4
        assert data(opa, f"{namespace}/doc/d.json") == {"x": 1}
        assert data(opa, "system/kopa_ledger/dataConfigMaps") == {f"{namespace}/doc": ["d.json"]}
        assert data(opa, f"kubernetes/services/{namespace}/svc")["kind"] == "Service"
    wait_log(kopa, "OPA restarted")


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_restart_is_noticed_when_opa_exits_not_at_the_next_check(
    run_kopa: KopaFactory, any_opa: OpaServer, core_v1: client.CoreV1Api, namespace: str, how: str
) -> None:
    """OPA's exit closes the idle connection kopa keeps open to it, and kopa checks at once: with a check
    interval of a minute, the new process is refilled within seconds, over TLS with a token too. A
    graceful stop (SIGTERM) is not held up by that connection."""
    opa = any_opa
    plain = [f"--opa-url={opa.api_url}", f"--namespaces={namespace}"]
    args = secure_args(opa, namespace) if opa.flavour == "secure" else plain
    kopa = run_kopa(*args, "--opa-check-interval=60s")
    put_configmap(core_v1, namespace, "doc", {"d.json": '{"x": 1}'}, DATA)
    wait_data(opa, "system/kopa/ready", True)
    wait_data(opa, f"{namespace}/doc/d.json", {"x": 1})

    started = time.monotonic()
    if how == "killed":
        opa.kill()
    else:
        opa.process.stop()
        assert time.monotonic() - started < 5, "OPA's graceful stop waited for kopa's idle connection"
    opa.start()
    wait_data(opa, "system/kopa/ready", True)
    assert time.monotonic() - started < 20, (
        "noticed by the periodic check (60 s), not by the closed connection"
    )
    assert data(opa, f"{namespace}/doc/d.json") == {"x": 1}
    wait_log(kopa, "OPA restarted")


def test_after_an_opa_restart_the_same_modules_are_in_force(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """Which module of a conflicting pair wins, and a last good text kept while its ConfigMap's text is
    refused, survive an OPA restart. The refill went in the order kopa first saw the modules, failing ones
    included (the other module of the pair won), and tried only the refused text (a `deny` rule vanished)."""
    tag = namespace.replace("-", "")
    run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}", "--opa-check-interval=200ms")
    put_configmap(core_v1, namespace, "fl-a", {"a.rego": f"package flp{tag}\n\nf(x) := \n"}, POLICY)
    parse_error = wait_status(core_v1, namespace, "fl-a", lambda v: v != OK)
    put_configmap(core_v1, namespace, "fl-b", {"b.rego": f"package flp{tag}\n\nf := 2\n"}, POLICY)
    assert wait_status(core_v1, namespace, "fl-b") == OK
    put_configmap(core_v1, namespace, "fl-a", {"a.rego": f"package flp{tag}\n\nf(x) := 1\n"}, POLICY)
    conflict = wait_status(core_v1, namespace, "fl-a", lambda v: v not in (OK, parse_error))
    put_configmap(core_v1, namespace, "guard", {"g.rego": f"package guard{tag}\n\ndeny := true\n"}, POLICY)
    assert wait_status(core_v1, namespace, "guard") == OK
    put_configmap(core_v1, namespace, "guard", {"g.rego": f"package guard{tag}\n\ndeny := \n"}, POLICY)
    refused = wait_status(core_v1, namespace, "guard", lambda v: v != OK)
    assert data(opa, f"flp{tag}/f") == 2 and data(opa, f"guard{tag}/deny") is True

    opa.kill()
    opa.start()
    wait_data(opa, "system/kopa/ready", True)
    assert data(opa, f"flp{tag}/f") == 2, "fl-b, in force before the restart, is in force after it"
    assert data(opa, f"guard{tag}/deny") is True, "the last good text of guard is in force again"
    assert status_of(core_v1, namespace, "fl-b") == OK
    assert status_of(core_v1, namespace, "fl-a") == conflict
    assert status_of(core_v1, namespace, "guard") == refused


def test_a_kopa_restarted_beside_a_running_opa_cleans_up_after_its_predecessor(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """The sidecar restarts, OPA keeps running. A library whose ConfigMap was deleted meanwhile is removed,
    with the module that needs it unloaded and reported (it stayed, and said ok, for good); a module whose
    ConfigMap now holds a refused text keeps the text OPA holds (the drift check deleted it)."""
    tag = namespace.replace("-", "")
    args = (f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    first = run_kopa(*args)
    lib = f"package lib{tag}\n\ntwice(x) := x * 2\n"
    user = f"package use{tag}\n\nimport data.lib{tag}\n\nfour := lib{tag}.twice(2)\n"
    put_configmap(core_v1, namespace, "lib", {"lib.rego": lib}, POLICY)
    put_configmap(core_v1, namespace, "user", {"user.rego": user}, POLICY)
    put_configmap(core_v1, namespace, "guard", {"g.rego": f"package guard{tag}\n\ndeny := true\n"}, POLICY)
    for name in ("lib", "user", "guard"):
        assert wait_status(core_v1, namespace, name) == OK
    assert first.stop() == 0

    core_v1.delete_namespaced_config_map("lib", namespace)
    put_configmap(core_v1, namespace, "guard", {"g.rego": f"package guard{tag}\n\ndeny := \n"}, POLICY)
    second = run_kopa(*args)
    wait_probe(second, "/readyz", 200)
    assert f"{namespace}/lib/lib.rego" not in policy_ids(opa)
    assert "unloaded because it depends on" in wait_status(core_v1, namespace, "user", lambda v: v != OK)
    assert data(opa, f"use{tag}/four") is None
    assert wait_status(core_v1, namespace, "guard", lambda v: v != OK)
    assert f"{namespace}/guard/g.rego" in policy_ids(opa)
    assert data(opa, f"guard{tag}/deny") is True


@pytest.mark.parametrize("ending", ["stopped", "killed"])
def test_a_kopa_restarted_beside_a_running_opa_removes_the_data_its_predecessor_left(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str, ending: str
) -> None:
    """Data ConfigMaps changed while no kopa ran: one deleted, one that lost a key. OPA kept the deleted one's
    documents and the lost key for good (nothing in OPA said whose they were). The ledger in OPA names the
    ConfigMaps kopa wrote, so the next kopa removes exactly those; a document someone else wrote beside
    them stays, and so do the documents of a namespace kopa no longer watches."""
    other = f"{namespace}-unwatched"
    core_v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
    try:
        first = run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace},{other}")
        put_configmap(core_v1, namespace, "gone", {"a.json": '{"a": 1}'}, DATA)
        put_configmap(core_v1, namespace, "trimmed", {"a.json": '{"a": 1}', "b.json": '{"b": 2}'}, DATA)
        put_configmap(core_v1, namespace, "kept", {"k.json": '{"k": 3}'}, DATA)
        put_configmap(core_v1, other, "elsewhere", {"e.json": '{"e": 4}'}, DATA)
        opa.http().put(f"/v1/data/{namespace}/theirs", {"x": 1})  # not from a ConfigMap: not kopa's
        wait_data(opa, f"{namespace}/kept", {"k.json": {"k": 3}})
        wait_data(opa, f"{other}/elsewhere", {"e.json": {"e": 4}})
        for name in ("gone", "trimmed"):
            assert data(opa, f"{namespace}/{name}/a.json") == {"a": 1}
        if ending == "killed":
            first.kill()
            first.expected_exit = -9
        else:
            assert first.stop() == 0

        core_v1.delete_namespaced_config_map("gone", namespace)
        core_v1.delete_namespaced_config_map("elsewhere", other)
        put_configmap(core_v1, namespace, "trimmed", {"a.json": '{"a": 1}'}, DATA)
        second = run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
        wait_probe(second, "/readyz", 200)
        wait_until(lambda: data(opa, f"{namespace}/gone") is None, timeout=30, what="the deleted one removed")
        assert data(opa, f"{namespace}/trimmed") == {"a.json": {"a": 1}}
        assert data(opa, f"{namespace}/kept") == {"k.json": {"k": 3}}
        assert data(opa, f"{namespace}/theirs") == {"x": 1}
        assert data(opa, f"{other}/elsewhere") == {"e.json": {"e": 4}}  # not watched now: left alone
        assert data(opa, "system/kopa_ledger/dataConfigMaps") == {
            f"{namespace}/kept": ["k.json"],
            f"{namespace}/trimmed": ["a.json"],
            f"{other}/elsewhere": ["e.json"],
        }
    finally:
        core_v1.delete_namespace(other)


def test_a_restarted_kopa_takes_back_its_predecessors_readiness_marker(
    run_kopa: KopaFactory,
    opa: OpaServer,
    core_v1: client.CoreV1Api,
    namespace: str,
    kubeconfig_for: Callable[..., Path],
) -> None:
    """OPA's readiness check (the chart's system.health policy) reads the marker: left by the previous
    kopa, it said ready while the new one, unable to list anything, had loaded nothing."""
    args = (f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    first = run_kopa(*args)
    wait_data(opa, "system/kopa/ready", True)
    assert first.stop() == 0
    second = run_kopa(*args, kubeconfig=kubeconfig_for("kopa-system:restricted"))  # may list nothing
    wait_until(lambda: data(opa, "system/kopa") is None, timeout=30, what="the old marker taken back")
    assert get(second, "/readyz")[0] == 503
