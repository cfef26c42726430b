"""CollectionSync against the in-memory OPA (tests/unit/fake_opa.py): the patch it builds, what it does when
OPA refuses a patch, and the drift check (its read off the writer's path, its repairs through the writer)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import orjson
import pytest

from app.model import ALL, CHECK, Key, ObjectKey, Store, WorkKey
from app.opa.process import OpaProcess
from app.pipeline.worker import run_worker
from app.pipeline.workqueue import WorkQueue
from app.replication import collection
from app.replication.collection import CollectionSync
from app.replication.objects import Replica, converter, same_content
from tests.unit.fake_opa import FakeOpa
from tests.unit.polling import until

pytestmark = pytest.mark.anyio

PATH = ["kubernetes", "services"]
convert = converter("Service", "v1", keep_managed_fields=False)


def service(ns: str, name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"namespace": ns, "name": name, "labels": labels}, "spec": {"ports": [{"port": 80}]}}


class Cluster:
    """The store as a watcher keeps it, and the collection that writes it into the fake OPA."""

    def __init__(self, namespaced: bool = True) -> None:
        self.opa = FakeOpa()
        self.process = OpaProcess(self.opa, interval=1.0)
        self.store: Store[Replica] = Store("services", same_content)
        self.queued: list[Key] = []  # what the collection queued for the writer: a drift check's repairs
        self.sync = CollectionSync(self.opa, self.process, PATH, self.store, namespaced, self.queued.append)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """run_checks, which owns the drift checks' reads, runs meanwhile."""
        async with anyio.create_task_group() as tg:
            await tg.start(self.sync.run_checks)
            yield
            tg.cancel_scope.cancel()

    async def check(self) -> None:
        """One drift check as kopa runs it: CHECK in the writer, the read and compare beside it, then
        the writer's turn for what the check queued."""
        assert await self.sync.apply([CHECK]) == []
        await until(lambda: not self.sync.checking)
        queued, self.queued[:] = self.queued[:], []
        assert await self.sync.apply(queued) == []

    def put(self, obj: dict[str, Any]) -> ObjectKey:
        key = ObjectKey.of(obj)
        self.store.put(key, convert(obj))
        return key

    def delete(self, ns: str, name: str) -> ObjectKey:
        key = ObjectKey(ns, name)
        self.store.pop(key)
        return key

    def expected(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for key, replica in self.store.items():
            found.setdefault(key.namespace, {})[key.name] = orjson.loads(replica.body)
        return found

    async def in_opa(self) -> Any:
        return await self.opa.get_data(PATH)


async def test_changes_become_one_patch_and_namespaces_come_and_go_whole() -> None:
    c = Cluster()
    c.put(service("a", "web"))
    assert await c.sync.apply([ALL]) == []
    keys = [c.put(service("a", "api")), c.put(service("b", "db")), c.delete("a", "web")]
    writes = len(c.opa.writes)
    assert await c.sync.apply(keys) == []
    assert c.opa.writes[writes:] == [("PATCH", "kubernetes/services")], "one patch for three changes"
    assert await c.in_opa() == c.expected()
    assert await c.sync.apply([c.delete("b", "db")]) == []
    assert "b" not in await c.in_opa(), "a namespace whose last object goes is removed whole"


async def test_a_patch_opa_refuses_rewrites_the_namespaces_from_kopas_copy() -> None:
    c = Cluster()
    for name in ("web", "api"):
        c.put(service("a", name))
    await c.sync.apply([ALL])
    del c.opa.data["kubernetes"]["services"]["a"]  # behind kopa's back
    key = c.put(service("a", "web", changed="yes"))
    assert await c.sync.apply([key]) == []
    assert await c.in_opa() == c.expected(), "OPA's 404 was not taken for success"
    assert c.sync.applied == {k: r.digest for k, r in c.store.items()}


async def test_a_namespace_opa_keeps_refusing_fails_alone_and_is_rewritten_on_its_next_change() -> None:
    c = Cluster()
    c.put(service("a", "web"))
    c.put(service("b", "db"))
    await c.sync.apply([ALL])
    c.opa.refuse_writes_under = "kubernetes/services"
    bad, good = c.put(service("a", "web", v="2")), c.put(service("b", "db", v="2"))
    failures = await c.sync.apply([bad, good])
    assert {key for key, _ in failures} == {bad, good}, "nothing recorded that OPA did not accept"
    assert c.sync.unknown == {"a", "b"}
    c.opa.refuse_writes_under = None
    assert await c.sync.apply([bad]) == []
    assert c.sync.unknown == {"b"}
    assert (await c.in_opa())["a"] == c.expected()["a"]


async def test_a_new_opa_process_gets_the_whole_collection_before_any_patch() -> None:
    c = Cluster()
    c.put(service("a", "web"))
    await c.sync.apply([ALL])
    await c.process.check()
    c.opa.restart()
    await c.process.check()
    assert not c.sync.loaded
    key = c.put(service("a", "api"))
    assert await c.sync.apply([key]) == []
    assert await c.in_opa() == c.expected()
    assert c.sync.full_syncs == 2


async def test_the_drift_check_repairs_one_namespace_per_call_in_rotation() -> None:
    c = Cluster()
    for ns in ("a", "b"):
        c.put(service(ns, "web"))
    await c.sync.apply([ALL])
    c.opa.data["kubernetes"]["services"]["a"]["web"]["spec"] = {}
    c.opa.data["kubernetes"]["services"]["b"]["stranger"] = {"x": 1}
    async with c.running():
        await c.check()
        await c.check()
        assert await c.in_opa() == c.expected()
        assert c.sync.repairs == 2
        await c.check()
    assert c.sync.repairs == 2, "nothing to repair: nothing written"
    assert c.opa.reads[:2] == ["kubernetes/services/a", "kubernetes/services/b"]


async def test_the_drift_check_reads_a_large_namespace_in_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither OPA nor kopa holds a whole namespace at once for a check: its keys, then slices of about
    READ_BYTES (kopa's sizes of the objects); a difference in the last slice, and an object kopa never
    wrote, are found all the same."""
    c = Cluster()
    for i in range(10):
        c.put(service("a", f"s{i}"))
    await c.sync.apply([ALL])
    size = len(c.store.get(ObjectKey("a", "s0")).body)  # type: ignore[union-attr]
    monkeypatch.setattr(collection, "READ_BYTES", 3 * size)
    c.opa.data["kubernetes"]["services"]["a"]["s9"]["spec"] = {}
    async with c.running():
        await c.check()
        assert (c.sync.repairs, c.opa.slices) == (1, [3, 3, 3, 1])
        assert await c.in_opa() == c.expected()
        c.opa.data["kubernetes"]["services"]["a"]["stranger"] = {"x": 1}
        await c.check()  # the list of namespaces
        await c.check()  # a again
    assert c.sync.repairs == 2
    assert await c.in_opa() == c.expected()


async def test_an_opa_that_refuses_queries_is_read_whole() -> None:
    """kube-mgmt only ever used OPA's data and policy APIs, so an authorization policy may let kopa's token
    use nothing else: the drift check then GETs each namespace whole, from then on, and still repairs."""
    c = Cluster()
    c.put(service("a", "web"))
    await c.sync.apply([ALL])
    c.opa.refuse_queries = True
    for _ in range(2):
        c.opa.data["kubernetes"]["services"]["a"]["web"]["spec"] = {}
        async with c.running():
            await c.check()
        assert await c.in_opa() == c.expected()
    assert (c.sync.repairs, c.opa.slices) == (2, [])
    assert c.opa.reads.count("kubernetes/services/a") == 2, "one GET of the namespace per check"


async def test_a_difference_the_drift_check_finds_is_repaired_through_the_writer() -> None:
    c = Cluster()
    c.put(service("a", "web"))
    c.put(service("a", "api"))
    await c.sync.apply([ALL])
    c.opa.data["kubernetes"]["services"]["a"]["web"]["spec"] = {}
    async with c.running():
        writes = len(c.opa.writes)
        assert await c.sync.apply([CHECK]) == []
        await until(lambda: not c.sync.checking)
    assert c.opa.writes[writes:] == [], "the check itself writes nothing"
    assert (c.sync.repairs, c.sync.unknown, c.queued) == (1, {"a"}, [ObjectKey("a", "web")])
    assert await c.sync.apply(c.queued) == []
    assert c.opa.writes[writes:] == [("PUT", "kubernetes/services/a")], "written again whole, by the writer"
    assert await c.in_opa() == c.expected()
    assert not c.sync.unknown


async def test_a_namespace_written_during_the_read_is_not_taken_for_drift() -> None:
    """The read answers what OPA held before the write: the object written meanwhile counts for nothing,
    the rest of the namespace is compared."""
    c = Cluster()
    c.put(service("a", "web"))
    c.put(service("a", "api"))
    await c.sync.apply([ALL])
    async with c.running():
        c.opa.read_gate = anyio.Event()
        assert await c.sync.apply([CHECK]) == []
        await until(lambda: bool(c.opa.reads))
        assert await c.sync.apply([c.put(service("a", "web", v="2"))]) == []
        c.opa.read_gate.set()
        await until(lambda: not c.sync.checking)
    assert (c.sync.repairs, c.sync.unknown, c.queued) == (0, set(), [])


async def test_a_check_whose_namespace_is_written_whole_meanwhile_counts_for_nothing_and_is_done_again() -> (
    None
):
    c = Cluster()
    c.put(service("a", "web"))
    c.put(service("b", "db"))
    await c.sync.apply([ALL])
    c.opa.data["kubernetes"]["services"]["a"]["stranger"] = {"x": 1}
    async with c.running():
        c.opa.read_gate = anyio.Event()
        assert await c.sync.apply([CHECK]) == []
        await until(lambda: bool(c.opa.reads))
        assert await c.sync.apply([ALL]) == []  # the collection written whole: the stranger is gone
        c.opa.read_gate.set()
        await until(lambda: not c.sync.checking)
        assert (c.sync.repairs, c.queued) == (0, []), "what the read saw is no longer in OPA"
        await c.check()
        await c.check()
    assert c.opa.reads == ["kubernetes/services/a", "kubernetes/services/a", "kubernetes/services/b"]
    assert c.sync.repairs == 0


async def test_the_writer_is_not_held_up_while_a_drift_check_reads() -> None:
    c = Cluster()
    c.put(service("a", "web"))
    await c.sync.apply([ALL])
    queue: WorkQueue[WorkKey] = WorkQueue("opa")
    async with c.running(), anyio.create_task_group() as tg:
        tg.start_soon(run_worker, queue, {"services": c.sync}, c.process)
        c.opa.read_gate = anyio.Event()
        queue.add(WorkKey("services", CHECK))
        await until(lambda: bool(c.opa.reads))
        queue.add(WorkKey("services", c.put(service("a", "api"))))
        await until(lambda: "api" in c.opa.data["kubernetes"]["services"]["a"])
        assert c.sync.checking, "written while the check's read was in flight"
        c.opa.read_gate.set()
        await until(lambda: not c.sync.checking)
        tg.cancel_scope.cancel()
    assert c.sync.repairs == 0


async def test_what_kopa_does_not_write_is_not_drift() -> None:
    """A new resourceVersion with the same content (the watcher stores it, queues nothing), and content
    that OPA got from a write kopa could not confirm (it timed out) while the key waits to be written."""
    c = Cluster()
    c.put(service("a", "web"))
    c.put(service("a", "api"))
    await c.sync.apply([ALL])
    moved = service("a", "web")
    moved["metadata"]["resourceVersion"] = "42"
    assert not c.store.put(ObjectKey("a", "web"), convert(moved))
    pending = c.put(service("a", "api", v="2"))
    c.opa.data["kubernetes"]["services"]["a"]["api"] = orjson.loads(c.store.get(pending).body)  # type: ignore[union-attr]
    async with c.running():
        await c.check()
    assert c.sync.repairs == 0


async def test_a_check_that_reads_a_new_opa_process_is_not_drift() -> None:
    """The new process is empty: its refill is due, not a repair of one namespace."""
    c = Cluster()
    c.put(service("a", "web"))
    await c.sync.apply([ALL])
    await c.process.check()
    c.opa.restart()  # not noticed yet
    async with c.running():
        assert await c.sync.apply([CHECK]) == []
        await until(lambda: not c.sync.checking)
    assert (c.sync.repairs, c.queued, c.sync.loaded) == (0, [], False)


async def namespaces_checked(c: Cluster) -> None:
    """Namespaces a and b loaded and checked once each (run with c.running()): the next check reads the
    collection's list of namespaces."""
    c.put(service("a", "web"))
    c.put(service("b", "db"))
    await c.sync.apply([ALL])
    await c.check()
    await c.check()
    assert c.sync.repairs == 0


@pytest.mark.parametrize("change", ["a stray namespace", "a namespace deleted"])
async def test_the_list_of_namespaces_removes_a_stray_and_writes_a_missing_namespace_again(
    change: str,
) -> None:
    """Once per rotation the drift check reads the collection's namespaces: one written behind kopa's back,
    where the cluster has no object, is removed; one deleted behind its back is written again."""
    c = Cluster()
    async with c.running():
        await namespaces_checked(c)
        held = c.opa.data["kubernetes"]["services"]
        if change == "a stray namespace":
            held["stray"] = {"ghost": {"metadata": {"name": "ghost"}}}
        else:
            del held["b"]
        await c.check()
        assert c.opa.reads[-1] == "kubernetes/services", "the third check read the list of namespaces"
    assert await c.in_opa() == c.expected()
    assert (c.sync.repairs, c.sync.unknown) == (1, set())


async def test_a_namespace_removed_while_the_list_is_read_is_not_a_stray() -> None:
    """The read answers what OPA held before the writer removed the namespace's last object."""
    c = Cluster()
    async with c.running():
        await namespaces_checked(c)
        c.opa.read_gate = anyio.Event()
        assert await c.sync.apply([CHECK]) == []
        await until(lambda: c.opa.reads[-1:] == ["kubernetes/services"])
        assert await c.sync.apply([c.delete("b", "db")]) == []
        c.opa.read_gate.set()
        await until(lambda: not c.sync.checking)
    assert (c.sync.repairs, c.queued) == (0, []), "b went whole while the list was read"
    assert await c.in_opa() == c.expected()


async def test_a_cluster_scoped_collection_is_checked_and_rewritten_whole() -> None:
    c = Cluster(namespaced=False)
    c.put({"metadata": {"name": "n1"}})
    await c.sync.apply([ALL])
    await c.opa.delete_data([*PATH, "n1"])
    async with c.running():
        await c.check()
    assert c.sync.repairs == 1
    assert await c.in_opa() == {"n1": c.expected()[""]["n1"]}
