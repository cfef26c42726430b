"""CollectionSync against the in-memory OPA (tests/unit/fake_opa.py): the patch it builds, what it does when
OPA refuses a patch, and the drift check."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from app.model import ALL, CHECK, ObjectKey, Store
from app.opa.process import OpaProcess
from app.replication.collection import CollectionSync
from app.replication.objects import Replica, converter, same_content
from tests.unit.fake_opa import FakeOpa

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
        self.sync = CollectionSync(self.opa, self.process, PATH, self.store, namespaced)

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
    assert await c.sync.apply([CHECK]) == []
    assert await c.sync.apply([CHECK]) == []
    assert await c.in_opa() == c.expected()
    assert c.sync.repairs == 2
    assert await c.sync.apply([CHECK]) == []
    assert c.sync.repairs == 2, "nothing to repair: nothing written"


async def test_a_cluster_scoped_collection_is_checked_and_rewritten_whole() -> None:
    c = Cluster(namespaced=False)
    c.put({"metadata": {"name": "n1"}})
    await c.sync.apply([ALL])
    await c.opa.delete_data([*PATH, "n1"])
    assert await c.sync.apply([CHECK]) == []
    assert await c.in_opa() == {"n1": c.expected()[""]["n1"]}
