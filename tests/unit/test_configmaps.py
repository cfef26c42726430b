"""The ConfigMap domain without servers: the status value, the data book, and the sync that decides what a
ConfigMap is now. OPA is the in-memory fake of tests/unit/fake_opa.py; the status writer is the real
StatusReporter, whose queue is read here instead of written to an API server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest

from app.configmaps.data import DataBook, parse_document
from app.configmaps.ledger import LEDGER_PATH, Ledger
from app.configmaps.policies import PolicyBook
from app.configmaps.status import MAX_STATUS_BYTES, OK, StatusReporter, _summary, status_value
from app.configmaps.sync import ConfigMapStores, ConfigMapSync
from app.model import ALL, CHECK, ObjectKey, Store
from app.opa.client import OpaUnauthorized
from app.opa.process import OpaProcess
from app.pipeline.watcher import same_resource_version
from tests.unit.fake_opa import FakeOpa

pytestmark = pytest.mark.anyio

CM = ObjectKey("ns", "cm")
LEDGER = list(LEDGER_PATH)


# --- the status annotation -------------------------------------------------------------------------------


def test_the_status_is_kube_mgmts_byte_for_byte() -> None:
    assert status_value([]) == OK == '{"status":"ok"}'
    one = {"code": "rego_parse_error", "message": "unexpected eof"}
    assert (
        status_value([one])
        == '{"status":"error","error":{"code":"rego_parse_error","message":"unexpected eof"}}'
    )
    assert orjson.loads(status_value([one, one]))["error"] == [one, one]
    # Go's encoder escapes <, >, & and the two line separators (OPA's messages quote Rego: `x := <VALUE>`).
    quoting = {"code": "rego_parse_error", "message": "expected x := <VALUE> && y\u2028\u2029é"}
    assert status_value([quoting]) == (
        '{"status":"error","error":{"code":"rego_parse_error",'
        '"message":"expected x := \\u003cVALUE\\u003e \\u0026\\u0026 y\\u2028\\u2029é"}}'
    )
    assert orjson.loads(status_value([quoting]))["error"] == quoting


def test_an_event_note_fits_the_api_servers_limit_in_bytes() -> None:
    """The API server counts bytes (1024): a note of 1000 two-byte characters was refused."""
    note = _summary(status_value([{"code": "rego_type_error", "message": "é" * 3000}]))
    assert len(note.encode()) <= 1024 and note.endswith("... (truncated)")
    assert note.startswith("é" * 100)
    assert _summary(status_value([{"code": "c", "message": "short"}])) == "short"


def test_a_status_with_many_large_errors_stays_within_its_budget() -> None:
    big = {"code": "x", "message": "m" * 10_000, "errors": [{"message": "d" * 3000}] * 10}
    value = status_value([big] * 20)
    assert len(value) <= MAX_STATUS_BYTES + 200
    shown = orjson.loads(value)["error"]
    assert shown[-1]["code"] == "truncated"


# --- data --------------------------------------------------------------------------------------------------


def test_only_json_objects_are_data() -> None:
    assert parse_document("k", '{"a": 1}') == (b'{"a":1}', None)
    assert parse_document("k", "[1]")[1] == {
        "code": "invalid_data",
        "message": "key k: must be a JSON object, got an array",
    }
    assert parse_document("k", "{")[1]["code"] == "invalid_data"  # type: ignore[index]


async def test_a_key_that_stops_parsing_keeps_its_last_good_value() -> None:
    opa = FakeOpa()
    book = DataBook(opa)
    await book.set_configmap(CM, {"a.json": '{"v": 1}', "b.json": '{"w": 2}'})
    await book.set_configmap(CM, {"a.json": "{broken", "b.json": '{"w": 2}'})
    assert await opa.get_data(["ns", "cm"]) == {"a.json": {"v": 1}, "b.json": {"w": 2}}
    assert set(book.errors_of(CM)) == {"a.json"}
    await book.set_configmap(CM, {"b.json": '{"w": 2}'})
    assert await opa.get_data(["ns", "cm"]) == {"b.json": {"w": 2}}, "a removed key is removed"
    await book.set_configmap(CM, {})
    assert await opa.get_data(["ns"]) == {}, "exactly its own subtree goes"


async def test_the_data_drift_check_reads_each_document_and_rewrites_what_differs() -> None:
    opa = FakeOpa()
    book = DataBook(opa)
    texts = {"a.json": '{"v": 1}', "b.json": '{"w": 2.0}'}
    await book.set_configmap(CM, texts)
    await opa.put_data(["ns", "cm", "a.json"], b'{"v": "changed"}')
    assert await book.check(lambda key: texts) == 1
    assert await opa.get_data(["ns", "cm", "a.json"]) == {"v": 1}
    assert await book.check(lambda key: texts) == 0, "2.0 and 2 are the same number"
    assert not [w for w in opa.writes if w[1].startswith("ns/cm/b")][1:], "b never rewritten"


async def test_keys_are_written_one_by_one_beside_what_else_is_on_the_path() -> None:
    """A data ConfigMap `kubernetes/services` shares its path with `--replicate=v1/services`: a PUT of its
    subtree whole wiped the replicated collection. Keys a previous kopa wrote (the ledger) and that the
    ConfigMap no longer has are removed, nothing else."""
    opa = FakeOpa()
    configmap = ObjectKey("kubernetes", "services")
    await opa.put_data(["kubernetes", "services", "default"], b'{"svc": {"kind": "Service"}}')
    await opa.put_data(["kubernetes", "services", "old.json"], b'{"old": true}')
    book = DataBook(opa)
    book.inherited = {configmap: frozenset({"old.json", "x.json"})}
    await book.set_configmap(configmap, {"x.json": '{"v": 1}'})
    assert await opa.get_data(["kubernetes", "services"]) == {
        "default": {"svc": {"kind": "Service"}},
        "x.json": {"v": 1},
    }
    assert book.inherited == {}
    assert book.documented() == {configmap: frozenset({"x.json"})}


async def test_the_ledger_names_the_data_configmaps_and_the_next_kopa_removes_what_is_gone() -> None:
    """Before its first write a kopa reads what its predecessor wrote into OPA's ledger; once every watch
    has listed (the CHECK), the ConfigMaps no store holds any more are removed whole, and keys removed
    meanwhile go; the ledger then names exactly what is written. Namespaces not watched now are kept."""
    first = ConfigMaps(ledger=True)
    kept, gone, unwatched = ObjectKey("ns", "kept"), ObjectKey("ns", "gone"), ObjectKey("away", "cm")
    for key in (kept, gone, unwatched):
        first.put(first.data, key, {"d.json": '{"v": 1}', "e.json": "{}"})
    await first.sync.apply([kept, gone, unwatched])
    both = ["d.json", "e.json"]
    assert await first.opa.get_data(LEDGER) == {
        "dataConfigMaps": {"away/cm": both, "ns/gone": both, "ns/kept": both}
    }

    second = ConfigMaps(ledger=True, opa=first.opa, owns=lambda key: key.namespace == "ns")
    second.put(second.data, kept, {"d.json": '{"v": 2}'})
    second.sync.listed = lambda: False
    await second.sync.apply([ALL, CHECK])
    assert await second.opa.get_data(["ns", "gone"]) is not None, "not removed before every watch listed"
    second.sync.listed = lambda: True
    await second.sync.apply([CHECK])
    assert await second.opa.get_data(["ns"]) == {"kept": {"d.json": {"v": 2}}}
    assert await second.opa.get_data(["away", "cm"]) == {"d.json": {"v": 1}, "e.json": {}}
    assert await second.opa.get_data(LEDGER) == {"dataConfigMaps": {"away/cm": both, "ns/kept": ["d.json"]}}


async def test_a_ledger_that_opa_refuses_is_said_once_and_data_loads_without_it() -> None:
    """A bundle that owns `system` (a decision-log mask, say): the ledger cannot be written there, and
    that must not keep a single data ConfigMap out of OPA."""
    c = ConfigMaps(ledger=True)
    c.opa.refuse_writes_under = "system"
    await c.sync.apply([c.put(c.data, CM, {"d.json": '{"v": 1}'})])
    assert await c.opa.get_data(["ns", "cm"]) == {"d.json": {"v": 1}}
    assert c.status(CM) == OK
    await c.sync.apply([c.put(c.data, ObjectKey("ns", "more"), {"d.json": "{}"})])
    assert [w for w in c.opa.writes if w[1].startswith("system")] == [("PUT", "system/kopa_ledger")]


# --- the sync ----------------------------------------------------------------------------------------------


class ConfigMaps:
    def __init__(
        self,
        *,
        ledger: bool = False,
        opa: FakeOpa | None = None,
        owns: Callable[[ObjectKey], bool] = lambda key: True,
    ) -> None:
        self.opa = opa or FakeOpa()
        self.process = OpaProcess(self.opa, interval=1.0)
        self.data: Store[dict[str, Any]] = Store("data", same_resource_version)
        self.policies: Store[dict[str, Any]] = Store("policies", same_resource_version)
        stores = ConfigMapStores(policies=self.policies, data=self.data)
        self.reporter = StatusReporter(None, stores.lookup)  # type: ignore[arg-type]  # never started
        books = PolicyBook(self.opa, self.process), DataBook(self.opa)
        book = Ledger(self.opa) if ledger else None
        self.sync = ConfigMapSync(*books, self.reporter, stores, self.process, ledger=book, owns=owns)
        self.version = 0

    def put(self, store: Store[dict[str, Any]], key: ObjectKey, data: dict[str, str]) -> ObjectKey:
        self.version += 1
        meta = {"namespace": key.namespace, "name": key.name, "resourceVersion": str(self.version)}
        store.put(key, {"metadata": meta, "data": data})
        return key

    def status(self, key: ObjectKey) -> str:
        return self.reporter._wanted[key][0]


async def test_a_configmap_relabelled_from_policy_to_data_never_holds_both() -> None:
    c = ConfigMaps()
    await c.sync.apply([c.put(c.policies, CM, {"p.rego": "package p\n"})])
    assert c.opa.policies == {"ns/cm/p.rego": "package p\n"}
    c.policies.pop(CM)
    await c.sync.apply([c.put(c.data, CM, {"d.json": "{}"})])
    assert c.opa.policies == {}
    assert await c.opa.get_data(["ns", "cm"]) == {"d.json": {}}
    assert c.status(CM) == OK


async def test_a_new_opa_process_is_refilled_in_first_seen_order_then_the_changes_apply() -> None:
    c = ConfigMaps()
    await c.sync.apply([c.put(c.policies, ObjectKey("ns", "lib"), {"p.rego": "package needs.lib\n"})])
    await c.sync.apply([c.put(c.policies, CM, {"p.rego": "package app\nx := data.needs.lib.v\n"})])
    await c.sync.apply([c.put(c.data, ObjectKey("ns", "d"), {"d.json": '{"n": 1}'})])
    await c.process.check()
    c.opa.restart()
    await c.process.check()
    changed = c.put(c.data, ObjectKey("ns", "d"), {"d.json": '{"n": 2}'})
    assert await c.sync.apply([ALL, changed]) == []
    assert set(c.opa.policies) == {"ns/lib/p.rego", "ns/cm/p.rego"}
    assert await c.opa.get_data(["ns", "d"]) == {"d.json": {"n": 2}}


async def test_all_without_a_restart_syncs_every_configmap_known_and_check_repairs() -> None:
    c = ConfigMaps()
    c.put(c.data, ObjectKey("ns", "a"), {"d.json": "{}"})
    c.put(c.policies, ObjectKey("ns", "b"), {"p.rego": "package b\n"})
    assert await c.sync.apply([ALL]) == [], "the queue collapsed these keys into ALL"
    assert await c.opa.get_data(["ns", "a"]) == {"d.json": {}}
    assert c.opa.policies == {"ns/b/p.rego": "package b\n"}
    await c.opa.delete_policy("ns/b/p.rego")
    assert await c.sync.apply([CHECK]) == []
    assert c.opa.policies == {"ns/b/p.rego": "package b\n"}


async def test_a_refill_cut_short_starts_again_from_the_beginning() -> None:
    """Found by the differential test: a refill interrupted by a refused token counted as done, so the
    modules it had not reached yet stayed out of OPA for good."""
    c = ConfigMaps()
    names = [ObjectKey("ns", f"p{i}") for i in range(3)]
    for i, key in enumerate(names):
        await c.sync.apply([c.put(c.policies, key, {"p.rego": f"package p{i}\n"})])
    await c.process.check()
    c.opa.restart()
    await c.process.check()
    c.opa.refuse_token_after = 1  # OPA takes one module, then refuses kopa's token for a while
    with pytest.raises(OpaUnauthorized):
        await c.sync.apply([ALL])
    c.opa.refuse_token_after = None
    assert await c.sync.apply([ALL]) == []
    assert set(c.opa.policies) == {f"ns/p{i}/p.rego" for i in range(3)}


async def test_all_after_a_restart_also_brings_changes_the_books_have_not_seen() -> None:
    """Found by the differential test: a change folded into ALL while OPA restarted was lost, because the
    refill loads what the books hold and the change was only in the store."""
    c = ConfigMaps()
    key = ObjectKey("ns", "p")
    await c.sync.apply([c.put(c.policies, key, {"p.rego": "package p\n\nv := 0\n"})])
    await c.process.check()
    c.opa.restart()
    await c.process.check()
    c.put(c.policies, key, {"p.rego": "package p\n\nv := 1\n"})  # its key folded into the queued ALL
    assert await c.sync.apply([ALL]) == []
    assert c.opa.policies == {"ns/p/p.rego": "package p\n\nv := 1\n"}


async def test_the_footprint_is_every_package_and_every_data_configmap() -> None:
    """What the writer compares with a collection's path before loading both at once (worker._lanes):
    modules in the book and policy ConfigMaps not loaded yet, data ConfigMaps in OPA and in the store."""
    c = ConfigMaps()
    await c.sync.apply([c.put(c.policies, ObjectKey("ns", "lib"), {"p.rego": "package team.lib\n"})])
    await c.sync.apply([c.put(c.data, ObjectKey("ns", "loaded"), {"d.json": "{}"})])
    c.put(c.policies, ObjectKey("ns", "new"), {"a.rego": "# a comment\npackage team.app.x\n"})
    c.put(c.data, ObjectKey("other", "new"), {"d.json": "{}"})
    footprint = c.sync.footprint()
    assert footprint is not None
    assert sorted(footprint) == [
        ("ns", "loaded"),
        ("other", "new"),
        ("team", "app", "x"),
        ("team", "lib"),
    ]
    c.put(c.policies, ObjectKey("ns", "broken"), {"b.rego": "not rego at all\n"})
    assert c.sync.footprint() is None, "a module whose package cannot be read could be anywhere"
