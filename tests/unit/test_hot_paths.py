"""The hot paths tuned with the benchmarks (docs/benchmarks.md) still say and do the same thing."""

from __future__ import annotations

import tracemalloc
from collections.abc import Sequence
from functools import partial
from typing import Any

import anyio
import orjson
import pytest

from app.model import ALL, DataPath, Key, ObjectKey, WorkKey
from app.opa.client import OpaUnavailable
from app.opa.process import OpaProcess
from app.pipeline import worker
from app.pipeline.workqueue import WorkQueue
from app.replication.collection import CHUNK, _document
from app.replication.objects import converter, right_sized

pytestmark = pytest.mark.anyio


def test_stored_bodies_own_only_their_length() -> None:
    body = orjson.dumps({"data": {"k": "x" * 2000}})
    tracemalloc.start()
    try:
        copies = [right_sized(body) for _ in range(100)]
        size, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(c == body for c in copies)
    assert size < 100 * (len(body) + 200), "orjson's rounded-up buffer must not be kept"


def test_a_converted_object_is_compact_json_without_managed_fields() -> None:
    convert = converter("ConfigMap", "v1", keep_managed_fields=False)
    obj = {"metadata": {"name": "a", "resourceVersion": "7", "managedFields": [{}]}, "data": {"k": "v"}}
    replica = convert(obj)
    assert orjson.loads(replica.body) == {
        "metadata": {"name": "a", "resourceVersion": "7"},
        "data": {"k": "v"},
        "kind": "ConfigMap",
        "apiVersion": "v1",
    }
    again = convert({"metadata": {"name": "a", "resourceVersion": "8"}, "data": {"k": "v"}})
    assert again.digest == replica.digest, "a new resourceVersion alone is no change"
    # A watch event's object has kind and apiVersion first; a list's item has none (added at the end).
    watched = {"kind": "ConfigMap", "apiVersion": "v1", "data": {"k": "v"}, "metadata": {"name": "a"}}
    assert convert(watched).digest == replica.digest, "the same object in another key order is no change"


async def _whole(groups: dict[str, dict[str, bytes]], namespaced: bool) -> tuple[bytes, list[int]]:
    pieces = [piece async for piece in _document(groups, namespaced)]
    return b"".join(pieces), [len(p) for p in pieces]


async def test_a_streamed_collection_is_the_document_of_its_stored_objects() -> None:
    groups = {
        "a": {"x": b'{"k":1}', "y/z~": b'{"k":"\\u00e9"}'},
        "b": {"q": b"[]"},
    }
    whole, _ = await _whole(groups, namespaced=True)
    assert orjson.loads(whole) == {"a": {"x": {"k": 1}, "y/z~": {"k": "é"}}, "b": {"q": []}}
    whole, _ = await _whole({"": {"x": b"1", "y": b"2"}}, namespaced=False)
    assert orjson.loads(whole) == {"x": 1, "y": 2}
    for namespaced in (True, False):
        whole, _ = await _whole({}, namespaced)
        assert orjson.loads(whole) == {}


async def test_a_large_collection_is_sent_in_pieces_of_about_chunk_bytes() -> None:
    body = orjson.dumps({"v": "x" * 2000})
    groups = {f"ns{i}": {f"n{j}": body for j in range(300)} for i in range(3)}
    whole, sizes = await _whole(groups, namespaced=True)
    assert orjson.loads(whole)["ns2"]["n299"] == {"v": "x" * 2000}
    assert len(sizes) > 3
    assert max(sizes) < CHUNK + 2 * len(body)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[list[Key]] = []
        self._called = anyio.Event()
        self.hold: anyio.Event | None = None  # when set, the next write waits for it (a write in flight)

    async def apply(self, keys: Sequence[Key]) -> list[tuple[Key, Exception]]:
        self.calls.append(list(keys))
        self._called.set()
        self._called = anyio.Event()
        if self.hold is not None:
            hold, self.hold = self.hold, None
            await hold.wait()
        return []

    async def wait_calls(self, count: int) -> None:
        with anyio.fail_after(2):
            while len(self.calls) < count:
                await self._called.wait()


class _SameOpa:
    """An OPA that always answers as the same process."""

    async def config(self) -> dict[str, Any]:
        return {"labels": {"id": "one"}}


async def test_group_commit_writes_at_once_and_batches_what_arrived_during_a_write() -> None:
    queue: WorkQueue[WorkKey] = WorkQueue("opa")
    handler = Recorder()
    async with anyio.create_task_group() as tg:
        handlers: dict[str, worker.Handler] = {"s": handler}
        tg.start_soon(worker.run_worker, queue, handlers, OpaProcess(_SameOpa(), interval=1.0))
        release = handler.hold = anyio.Event()  # the first write stays in flight until released
        queue.add(WorkKey("s", ObjectKey("ns", "first")))
        await handler.wait_calls(1)  # written at once: nothing waits for company
        for i in range(5):
            queue.add(WorkKey("s", ObjectKey("ns", f"k{i}")))
            queue.add(WorkKey("s", ObjectKey("ns", f"k{i}")))  # coalesced while waiting
        await anyio.sleep(0.05)
        assert len(handler.calls) == 1  # one write at a time
        release.set()
        await handler.wait_calls(2)
        assert handler.calls[1] == [ObjectKey("ns", f"k{i}") for i in range(5)]  # all that arrived, one write
        queue.add(WorkKey("s", ObjectKey("ns", "later")))  # the writer is idle again: at once
        await handler.wait_calls(3)
        assert handler.calls[2] == [ObjectKey("ns", "later")]
        queue.add(WorkKey("s", ALL))
        await handler.wait_calls(4)
        assert handler.calls[3] == [ALL]
        tg.cancel_scope.cancel()


def footprint(paths: list[DataPath] | None) -> worker.Footprint:
    return lambda: paths


async def refill_batch(configmaps: list[DataPath] | None, collection: list[DataPath]) -> bool:
    """Both sources queued whole, as after an OPA restart, with the ConfigMaps' write held in flight: True
    when the collection was written meanwhile (beside it), False when it waited for it."""
    queue: WorkQueue[WorkKey] = WorkQueue("opa")
    queue.add(WorkKey("configmaps", ALL))
    queue.add(WorkKey("replicate:v1/configmaps", ALL))
    first, second = Recorder(), Recorder()
    release = first.hold = anyio.Event()
    handlers: dict[str, worker.Handler] = {"configmaps": first, "replicate:v1/configmaps": second}
    footprints = {"configmaps": footprint(configmaps), "replicate:v1/configmaps": footprint(collection)}
    async with anyio.create_task_group() as tg:
        process = OpaProcess(_SameOpa(), interval=1.0)
        tg.start_soon(partial(worker.run_worker, queue, handlers, process, footprints=footprints))
        await first.wait_calls(1)
        with anyio.move_on_after(0.2):
            await second.wait_calls(1)
        beside = len(second.calls) == 1
        release.set()
        await second.wait_calls(1)
        tg.cancel_scope.cancel()
    return beside


async def test_a_refill_writes_a_collection_beside_the_policies_when_they_cannot_meet() -> None:
    """OPA decodes the collection's body while it compiles the policies (on another core)."""
    assert await refill_batch([("benchprop", "p001"), ("team-a", "settings")], [("kubernetes", "configmaps")])


@pytest.mark.parametrize(
    "configmaps",
    [
        [("kubernetes",)],  # package kubernetes: a rule `configmaps` would conflict with the collection
        [("kubernetes", "configmaps", "team-a")],  # a policy or data document inside the collection
        None,  # a package kopa could not read
    ],
)
async def test_a_refill_keeps_the_order_when_the_writes_could_meet(configmaps: list[DataPath] | None) -> None:
    """Policies, then data, then collections, so that a conflict fails the same way every time."""
    assert not await refill_batch(configmaps, [("kubernetes", "configmaps")])


class Failing(Recorder):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def apply(self, keys: Sequence[Key]) -> list[tuple[Key, Exception]]:
        await super().apply(keys)
        raise self.error


async def test_an_outage_met_beside_fails_the_whole_batch() -> None:
    """Either lane meeting an outage makes the batch wait it out and go again, as in one lane."""
    grouped: dict[str, list[Key]] = {"configmaps": [ALL], "collection": [ALL]}
    collection = Failing(OpaUnavailable("PUT data/kubernetes/configmaps: connection refused"))
    handlers: dict[str, worker.Handler] = {"configmaps": Recorder(), "collection": collection}
    footprints = {
        "configmaps": footprint([("lib",)]),
        "collection": footprint([("kubernetes", "configmaps")]),
    }
    with pytest.raises(OpaUnavailable):
        await worker._apply(handlers, grouped, footprints)
    assert collection.calls == [[ALL]]


async def test_a_nudge_wakes_a_waiting_batch_empty_and_keys_still_come() -> None:
    """The writer's idle tick: get_batch returns nothing, and the next call waits for keys as before."""
    queue: WorkQueue[str] = WorkQueue("q")
    async with anyio.create_task_group() as tg:
        got: list[list[str]] = []

        async def take() -> None:
            got.append(await queue.get_batch(10))

        tg.start_soon(take)
        await anyio.wait_all_tasks_blocked()
        queue.nudge()
        await anyio.wait_all_tasks_blocked()  # take() has returned: nothing else wakes it
        assert got == [[]]
        queue.add("a")
        assert await queue.get_batch(10) == ["a"]
