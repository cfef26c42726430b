"""The bundle's content: its revision (a content digest), the log of data changes that deltas are made of,
and the checks a module passes before it enters the bundle. The real OPAs' view of the same is in
tests/integration/test_bundle_mode.py."""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from app.bundle import tarball
from app.bundle.settle import Failure
from app.bundle.state import BundleState, Operation
from app.bundle.target import BundleTarget
from app.opa.client import OpaError, OpaUnavailable
from tests.unit.rego_model import RegoModel

pytestmark = pytest.mark.anyio

SERVICES = ["kubernetes", "services"]


def patch(*ops: dict[str, Any]) -> bytes:
    return orjson.dumps(list(ops))


async def test_the_revision_is_a_digest_of_the_content_not_of_its_history() -> None:
    """Two kopa replicas that reached the same state by different writes (one PUT of a collection, or a
    PUT and patches; modules in another order) serve the same revision, so one ETag is good for both."""
    one, two = BundleState(), BundleState()
    await one.put_data(SERVICES, b'{"ns":{"a":{"x":1},"b":{"y":[1,2]}}}')
    one.put_module("ns/cm/a.rego", "package a\n")
    one.put_module("ns/cm/b.rego", "package b\n")

    two.put_module("ns/cm/b.rego", "package b\n")
    await two.put_data(SERVICES, b'{"ns":{"a":{"x":0}}}')
    await two.patch_data(SERVICES, patch({"op": "add", "path": "/ns/b", "value": {"y": [1, 2]}}))
    two.put_module("ns/cm/a.rego", "package a\n")
    await two.patch_data(SERVICES, patch({"op": "replace", "path": "/ns/a/x", "value": 1}))

    assert one.current.revision == two.current.revision
    await two.patch_data(SERVICES, patch({"op": "replace", "path": "/ns/a/x", "value": 2}))
    assert one.current.revision != two.current.revision


async def test_writes_that_end_where_they_started_make_no_revision() -> None:
    state = BundleState()
    await state.put_data(["ns", "cm", "k"], b'{"a":1}')
    first = state.current
    await state.put_data(["ns", "cm", "k"], b'{"a":2}')
    await state.put_data(["ns", "cm", "k"], b'{"a":1}')
    assert state.current == first
    await state.put_data(["ns", "cm", "k"], b'{"a":1}')  # the same document: not even a change
    assert state.current == first


async def test_a_delta_carries_the_data_operations_since_the_base() -> None:
    state = BundleState()
    await state.put_data(SERVICES, b'{"ns":{"a":{"x":1}}}')
    base = state.current.revision
    await state.patch_data(SERVICES, patch({"op": "add", "path": "/ns/b", "value": {"y": 2}}))
    middle = state.current.revision
    await state.delete_data([*SERVICES, "ns", "a"])
    operations = state.since(base)
    assert operations == [
        Operation("upsert", ("kubernetes", "services", "ns", "b"), b'{"y":2}'),
        Operation("remove", ("kubernetes", "services", "ns", "a")),
    ]
    assert state.since(middle) == [Operation("remove", ("kubernetes", "services", "ns", "a"))]
    assert state.since(state.current.revision) == []


@pytest.mark.parametrize("change", ["module", "roots", "unknown base", "trimmed"])
async def test_a_snapshot_when_a_delta_cannot_do(change: str) -> None:
    """OPA refuses a delta that changes the roots, and a delta cannot carry policies; a base kopa does not
    know (another replica's, or one trimmed from the log) cannot be patched either."""
    state = BundleState(log_entries=3)
    await state.put_data(["ns", "cm", "k"], b'{"a":1}')
    base = state.current.revision
    await state.put_data(["ns", "cm", "k"], b'{"a":2}')
    if change == "module":
        state.put_module("ns/cm/p.rego", "package ns.policy\n")
    elif change == "roots":
        await state.put_data(["other", "cm", "k"], b"{}")
    elif change == "unknown base":
        base = "0" * 32
    else:
        for value in range(3, 6):
            await state.put_data(["ns", "cm", "k"], orjson.dumps({"a": value}))
            state.commit()
    assert state.since(base) is None


async def test_a_patch_applies_all_or_nothing() -> None:
    """As OPA: 404 when an operation's path is missing, and nothing of the patch stays."""
    state = BundleState()
    await state.put_data(SERVICES, b'{"ns":{"a":{"x":1}}}')
    before = state.current
    bad = patch(
        {"op": "remove", "path": "/ns/a"},
        {"op": "add", "path": "/gone/b", "value": {}},
    )
    with pytest.raises(OpaError) as info:
        await state.patch_data(SERVICES, bad)
    assert info.value.status == 404
    assert await state.get_data(SERVICES) == {"ns": {"a": {"x": 1}}}
    assert state.current == before
    assert not await state.delete_data(["not", "there"])


async def test_roots_are_the_first_segments_of_what_the_bundle_holds() -> None:
    state = BundleState()
    assert not state.current.roots  # OPA takes "roots": [] as owning nothing (not everything, as no roots)
    await state.put_data(SERVICES, b"{}")
    await state.put_data(["team-a", "settings", "k.json"], b"{}")
    state.put_module("team-a/cm/p.rego", "# comment\npackage admission.pods\n")
    assert state.current.roots == ("admission", "kubernetes", "team-a")


def files_of(body: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(body))) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


async def test_bundle_files() -> None:
    """OPA reads only `.rego` files as modules: ids get the suffix when their key has none."""
    state = BundleState()
    state.put_module("ns/cm/plain", "package a\n")
    state.put_module("ns/cm/b.rego", "package b\n")
    state.put_module("ns/cm/c", "package c\n")
    state.put_module("ns/cm/c.rego", "package c2\n")
    await state.put_data(["ns", "cm2", "k"], b'{"v":1}')
    current = state.current
    files = files_of(tarball.snapshot(current.revision, current.roots, state.modules, state.data))
    assert orjson.loads(files["/.manifest"]) == {
        "revision": current.revision,
        "roots": ["a", "b", "c", "c2", "ns"],
    }
    assert orjson.loads(files["/data.json"]) == {"ns": {"cm2": {"k": {"v": 1}}}}
    assert files["/ns/cm/plain.rego"] == b"package a\n"
    assert files["/ns/cm/b.rego"] == b"package b\n"
    assert files["/ns/cm/c/module.rego"] == b"package c\n"
    assert files["/ns/cm/c.rego"] == b"package c2\n"

    delta = files_of(tarball.delta("r2", current.roots, [Operation("upsert", ("a/b", "~c"), b"1")]))
    assert set(delta) == {"/.manifest", "/patch.json"}
    assert orjson.loads(delta["/patch.json"]) == {"data": [{"op": "upsert", "path": "/a~1b/~0c", "value": 1}]}


def target(reserved: Sequence[Sequence[str]] = (("system",),)) -> tuple[BundleTarget, RegoModel]:
    model = RegoModel()
    return BundleTarget(BundleState(reserved), model), model


async def test_modules_enter_the_bundle_when_settled_and_only_those_that_compile() -> None:
    bundle, _ = target()
    await bundle.put_policy("ns/cm/ok.rego", "package ok\nallow := true\n")
    await bundle.put_policy("ns/cm/bad.rego", "package bad\nx := data.nowhere.y\n")
    assert bundle.state.modules == {}  # staged, not yet decided
    outcomes = await bundle.settle()
    assert bundle.state.modules == {"ns/cm/ok.rego": "package ok\nallow := true\n"}
    assert [o.id for o in outcomes if o.error is not None] == ["ns/cm/bad.rego"]
    assert await bundle.delete_policy("ns/cm/ok.rego")
    assert not await bundle.delete_policy("ns/cm/bad.rego")  # never entered
    await bundle.settle()
    assert bundle.state.modules == {}


async def test_writes_stay_staged_when_the_validation_opa_cannot_say() -> None:
    bundle, model = target()
    await bundle.put_policy("ns/cm/ok.rego", "package ok\n")

    async def unavailable(modules: object) -> list[Failure]:
        raise OpaUnavailable("validation OPA unreachable")

    model.compile = unavailable  # type: ignore[method-assign]
    with pytest.raises(OpaUnavailable):
        await bundle.settle()
    assert bundle.state.modules == {}
    del model.compile
    assert [o.id for o in await bundle.settle()] == ["ns/cm/ok.rego"]
    assert bundle.state.modules == {"ns/cm/ok.rego": "package ok\n"}


async def test_writing_what_the_bundle_holds_again_compiles_nothing() -> None:
    """A restarted validation OPA makes the book load every module again: nothing changes, no compile."""
    bundle, model = target()
    await bundle.put_policy("ns/cm/ok.rego", "package ok\n")
    await bundle.settle()
    compiles = len(model.compiles)
    await bundle.put_policy("ns/cm/ok.rego", "package ok\n")
    assert [(o.id, o.held, o.error) for o in await bundle.settle()] == [
        ("ns/cm/ok.rego", "package ok\n", None)
    ]
    assert len(model.compiles) == compiles


@pytest.mark.parametrize("package", ["system.authz", "system", "other.bundle.deep"])
async def test_a_package_in_a_reserved_root_is_refused_with_a_reason(package: str) -> None:
    bundle, _ = target(reserved=[("system",), ("other", "bundle")])
    with pytest.raises(OpaError) as info:
        await bundle.put_policy("ns/cm/p.rego", f"package {package}\n")
    assert info.value.code == "bundle_root_error"
    assert "reserved for OPA itself or for other bundles" in info.value.message
    assert "--bundle-reserved-roots" in info.value.message
    assert await bundle.settle() == []
    assert bundle.state.modules == {}


async def test_roots_stay_clear_of_reserved_roots() -> None:
    """Content beside a reserved root gets a root of its own below their common prefix, so kopa's bundle
    and the other one never overlap (OPA would refuse to activate either)."""
    bundle, _ = target(reserved=[("system",), ("other", "bundle")])
    await bundle.put_policy("ns/cm/p.rego", "package other.bundles.x\n")
    await bundle.settle()
    await bundle.put_data(["other", "cm", "k"], b"{}")
    await bundle.put_data(["ns", "cm", "k"], b"{}")
    assert bundle.state.current.roots == ("ns", "other/bundles", "other/cm")
    with pytest.raises(OpaError):
        await bundle.put_policy("ns/cm/q.rego", "package other\n")  # its root would hold other.bundle


async def test_data_in_a_reserved_root_is_refused() -> None:
    bundle, _ = target()
    with pytest.raises(OpaError) as info:
        await bundle.put_data(["system", "cm", "k"], b"{}")
    assert "data.system.cm.k overlaps data.system" in info.value.message
    assert bundle.state.data == {}


async def test_a_module_whose_rule_lies_where_data_is_is_refused_in_opas_words() -> None:
    """OPA refuses a bundle whose rule lies at a data path (or below data that is not an object), so such
    a module never enters: its ConfigMap says why, as a PUT in push mode would."""
    bundle, _ = target()
    await bundle.put_data(["team", "settings"], b'{"mode": "strict"}')
    await bundle.put_data(["team", "flag"], b"true")
    await bundle.put_policy("ns/cm/at.rego", "package team\nsettings := 1\n")
    await bundle.put_policy("ns/cm/below.rego", "package team.flag\nx := 1\n")
    await bundle.put_policy("ns/cm/fine.rego", "package team.rules\nallow := true\n")
    outcomes = {o.id: o for o in await bundle.settle()}
    assert set(bundle.state.modules) == {"ns/cm/fine.rego"}
    at = outcomes["ns/cm/at.rego"].error
    assert (
        at is not None and at["errors"][0]["message"] == "conflicting rule for data path team/settings found"
    )
    below = outcomes["ns/cm/below.rego"].error
    assert below is not None and "team/flag/x" in below["errors"][0]["message"]


async def test_a_data_write_that_would_collide_with_a_rule_is_refused_and_changes_nothing() -> None:
    bundle, _ = target()
    await bundle.put_policy("ns/cm/p.rego", "package team.rules\nallow := true\n")
    await bundle.settle()
    for path, document in [
        (["team", "rules", "allow"], b"1"),
        (["team", "rules", "allow", "deeper"], b"1"),
        (["team", "rules"], b'{"allow": false}'),
        (["team"], b'{"rules": 3}'),
    ]:
        with pytest.raises(OpaError) as info:
            await bundle.put_data(path, document)
        assert "conflicting rule for data path" in info.value.message
        assert "ns/cm/p.rego" in info.value.message
    with pytest.raises(OpaError):
        await bundle.patch_data(["team"], patch({"op": "add", "path": "/rules/allow", "value": 1}))
    assert bundle.state.data == {}
    await bundle.put_data(["team", "rules", "other"], b"1")  # beside the rule: fine
    await bundle.put_data(["team", "more"], b'{"rules": 1}')
    assert bundle.state.data == {"team": {"rules": {"other": 1}, "more": {"rules": 1}}}
    assert await bundle.delete_policy("ns/cm/p.rego")
    await bundle.settle()
    await bundle.put_data(["team", "rules", "allow"], b"1")  # the rule is gone
