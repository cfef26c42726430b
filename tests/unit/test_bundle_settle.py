"""Which module changes enter the bundle (app/bundle/settle.py): push mode's outcomes, with one compile of the
candidate when it is clean and a few more when it is not. Compiles are counted with an in-memory model of
OPA's compiler (tests/unit/rego_model.py)."""

from __future__ import annotations

import pytest

from app.bundle.settle import Outcome, settle
from tests.unit.rego_model import RegoModel

pytestmark = pytest.mark.anyio


def rule(package: str, name: str = "allow", body: str = "true") -> str:
    return f"package {package}\n{name} := {body}\n"


async def test_a_clean_batch_costs_one_compile_however_many_modules() -> None:
    model = RegoModel()
    changes = [(f"ns/cm{i}/p.rego", rule(f"p{i}")) for i in range(300)]
    accepted, outcomes = await settle({}, changes, model.compile)
    assert len(model.compiles) == 1
    assert accepted == dict(changes)
    assert all(o.error is None for o in outcomes)


async def test_broken_modules_are_refused_in_a_few_compiles_and_the_rest_enters() -> None:
    """A parse error, then (once it is out) an undefined reference, and a module that needed the broken
    one: three rounds, not one compile per module."""
    model = RegoModel()
    changes = [(f"ns/cm{i}/p.rego", rule(f"p{i}")) for i in range(200)]
    changes += [
        ("ns/bad/parse.rego", "package bad\nPARSE ERROR\n"),
        ("ns/bad/ref.rego", rule("ref", body="data.nowhere.x")),
        ("ns/bad/needs-ref.rego", rule("needsref", body="data.ref.allow")),
    ]
    accepted, outcomes = await settle({}, changes, model.compile)
    refused = {o.id: o.error for o in outcomes if o.error is not None}
    assert set(refused) == {"ns/bad/parse.rego", "ns/bad/ref.rego", "ns/bad/needs-ref.rego"}
    assert refused["ns/bad/parse.rego"]["errors"][0]["code"] == "rego_parse_error"
    assert refused["ns/bad/ref.rego"] == {
        "code": "invalid_parameter",
        "message": "error(s) occurred while compiling module(s)",
        "errors": [model_error("rego_type_error", "undefined ref: data.nowhere.x", "ns/bad/ref.rego")],
    }
    assert len(accepted) == 200 and not set(refused) & set(accepted)
    assert len(model.compiles) <= 4


def model_error(code: str, message: str, module_id: str) -> dict[str, object]:
    return {"code": code, "message": message, "location": {"file": module_id, "row": 1, "col": 1}}


async def test_a_changed_module_that_fails_keeps_its_previous_text() -> None:
    model = RegoModel()
    held = {"ns/a/p.rego": rule("a"), "ns/b/p.rego": rule("b")}
    accepted, outcomes = await settle(
        held, [("ns/a/p.rego", rule("a", body="data.nowhere.x"))], model.compile
    )
    assert accepted == held
    assert outcomes[0].held == rule("a") and outcomes[0].error is not None


async def test_a_new_module_conflicting_with_a_held_one_is_refused_even_when_opa_names_the_held_one() -> None:
    """OPA names the module whose id sorts first; push mode refuses the one that came later."""
    model = RegoModel()
    held = {"ns/z/p.rego": rule("a", "f")} | {f"ns/other{i}/p.rego": rule(f"o{i}") for i in range(40)}
    late = ("ns/a/p.rego", "package a\nf(x) := x\n")
    accepted, outcomes = await settle(held, [late, ("ns/new/p.rego", rule("new"))], model.compile)
    assert accepted == held | {"ns/new/p.rego": rule("new")}
    assert [o.id for o in outcomes if o.error is not None] == ["ns/a/p.rego"]
    assert len(model.compiles) <= 4


async def test_between_two_new_conflicting_modules_the_first_in_order_wins() -> None:
    model = RegoModel()
    changes = [(f"ns/cm{i}/p.rego", rule(f"p{i}")) for i in range(100)]
    changes.insert(10, ("ns/zz/first.rego", rule("shared", "f")))
    changes.insert(60, ("ns/aa/later.rego", "package shared\nf(x) := x\n"))
    accepted, outcomes = await settle({}, changes, model.compile)
    assert "ns/zz/first.rego" in accepted and "ns/aa/later.rego" not in accepted
    assert [o.id for o in outcomes if o.error is not None] == ["ns/aa/later.rego"]
    assert len(model.compiles) <= 12  # one failing compile, then a bisection of 102 changes


async def test_removing_a_module_others_need_unloads_them_first_with_the_reason() -> None:
    model = RegoModel()
    held = {
        "ns/lib/p.rego": rule("lib"),
        "ns/user/p.rego": rule("user", body="data.lib.allow"),
        "ns/other/p.rego": rule("other"),
    }
    accepted, outcomes = await settle(held, [("ns/lib/p.rego", None)], model.compile)
    assert accepted == {"ns/other/p.rego": rule("other")}
    assert Outcome("ns/lib/p.rego", None) in outcomes
    assert (
        Outcome(
            "ns/user/p.rego",
            None,
            {
                "code": "invalid_operation",
                "message": "unloaded because it depends on ns/lib/p.rego, which was removed",
            },
        )
        in outcomes
    )


async def test_a_module_needing_one_that_comes_later_in_the_batch_still_enters() -> None:
    """When the in-order path runs (a conflict forces it), a module tried before the one it needs is tried
    again at the end, as push mode retries a failed module when one it may need is loaded."""
    model = RegoModel()
    held = {"ns/z/p.rego": rule("c", "f")}
    changes = [
        ("ns/user/p.rego", rule("user", body="data.lib.allow")),
        ("ns/a/conflict.rego", "package c\nf(x) := x\n"),
        ("ns/lib/p.rego", rule("lib")),
    ]
    accepted, outcomes = await settle(held, changes, model.compile)
    assert set(accepted) == {"ns/z/p.rego", "ns/user/p.rego", "ns/lib/p.rego"}
    assert [o.id for o in outcomes if o.error is not None] == ["ns/a/conflict.rego"]
