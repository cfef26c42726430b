"""PolicyBook against the in-memory OPA of tests/unit/fake_opa.py, which compiles just enough: a module
fails while a `data.needs.` path it reads names a package that no loaded module has."""

from __future__ import annotations

import pytest

from app.configmaps.policies import PolicyBook, data_refs, package_of
from app.model import ObjectKey
from app.opa.process import OpaProcess, OpaRestarted
from tests.unit.fake_opa import FakeOpa

pytestmark = pytest.mark.anyio


def book(opa: FakeOpa) -> PolicyBook:
    return PolicyBook(opa, OpaProcess(opa, interval=1.0), owns=lambda i: i.startswith("ns/"))


def test_references_and_packages_are_read_from_the_text() -> None:
    text = (
        "package a.b\n\nimport data.lib.x as y\n\nallow if data.needs.c[input.k]\nz := input.request.data\n"
    )
    assert package_of(text) == ("a", "b")
    assert data_refs(text) == [("lib", "x"), ("needs", "c")]
    assert data_refs("p := data[x]") == [()], "a dynamic reference may mean anything"


async def test_a_failing_module_is_retried_only_when_something_it_reads_appears() -> None:
    opa = FakeOpa()
    policies = book(opa)
    for i in range(10):
        await policies.set_configmap(
            ObjectKey("ns", f"bad{i}"), {"p.rego": f"package bad{i}\n\nx := data.needs.lib.v\n"}
        )
    for i in range(190):
        await policies.set_configmap(
            ObjectKey("ns", f"good{i}"), {"p.rego": f"package good{i}\n\nx := {i}\n"}
        )
    assert opa.puts == 200, "each module compiled once: unrelated loads do not retry the failed ones"
    assert policies.failed_count == 10

    await policies.set_configmap(ObjectKey("ns", "good0"), {"p.rego": "package good0\n\nx := -1\n"})
    assert opa.puts == 201, "an unrelated later change costs one compile"

    touched = await policies.set_configmap(
        ObjectKey("ns", "lib"), {"p.rego": "package needs.lib\n\nv := 1\n"}
    )
    assert policies.failed_count == 0
    assert opa.puts == 212, "the module they need appeared: each failed module is retried once"
    assert {ObjectKey("ns", f"bad{i}") for i in range(10)} <= touched


async def test_a_removed_dependency_that_returns_loads_its_dependents_again() -> None:
    opa = FakeOpa()
    policies = book(opa)
    await policies.set_configmap(ObjectKey("ns", "app"), {"p.rego": "package app\n\nx := data.needs.lib.v\n"})
    assert policies.failed_count == 1
    await policies.set_configmap(ObjectKey("ns", "lib"), {"p.rego": "package needs.lib\n\nv := 1\n"})
    assert policies.loaded_count == 2


async def test_a_compile_error_from_a_new_opa_process_is_not_believed() -> None:
    opa = FakeOpa()
    policies = book(opa)
    await policies.process.check()
    await policies.set_configmap(ObjectKey("ns", "lib"), {"p.rego": "package needs.lib\n\nv := 1\n"})
    opa.restart()  # OPA holds nothing, and has a new process id
    with pytest.raises(OpaRestarted):
        await policies.set_configmap(
            ObjectKey("ns", "app"), {"p.rego": "package app\n\nx := data.needs.lib.v\n"}
        )
    assert policies.failed_count == 0, "no error is recorded (nor reported) for the new OPA's emptiness"


async def test_the_drift_check_restores_kopas_modules_and_removes_only_owned_strangers() -> None:
    opa = FakeOpa()
    policies = book(opa)
    await policies.set_configmap(ObjectKey("ns", "cm"), {"a.rego": "package a\n", "b.rego": "package b\n"})
    del opa.policies["ns/cm/a.rego"]
    opa.policies["ns/cm/b.rego"] = "package b\n\nchanged := true\n"
    opa.policies["ns/ghost/x.rego"] = "package ghost\n"
    opa.policies["bootstrap.rego"] = "package system.authz\n"
    assert (await policies.check())[0] == 3
    assert opa.policies == {
        "ns/cm/a.rego": "package a\n",
        "ns/cm/b.rego": "package b\n",
        "bootstrap.rego": "package system.authz\n",
    }
    assert (await policies.check())[0] == 0
    assert policies.repairs == 3


async def test_editing_a_library_retries_its_failing_dependent_once() -> None:
    opa = FakeOpa()
    policies = book(opa)
    await policies.set_configmap(ObjectKey("ns", "lib"), {"p.rego": "package needs.lib\n\nv := 1\n"})
    await policies.set_configmap(ObjectKey("ns", "bad"), {"p.rego": "package bad\n\nx := data.needs\n"})
    opa.writes.clear()
    await policies.set_configmap(ObjectKey("ns", "lib"), {"p.rego": "package needs.lib\n\nv := 2\n"})
    assert [w for _, w in opa.writes] == ["policies/ns/lib/p.rego", "policies/ns/bad/p.rego"]
