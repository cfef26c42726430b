"""The hot paths tuned with the benchmarks (docs/benchmarks.md) still say and do the same thing."""

from __future__ import annotations

import tracemalloc
from collections.abc import Sequence
from typing import Any

import anyio
import orjson
import pytest

from app.model import ALL, Key, ObjectKey, WorkKey
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


async def test_wait_waiting_returns_once_enough_keys_wait() -> None:
    queue: WorkQueue[str] = WorkQueue("t")
    queue.add("a")
    with anyio.move_on_after(0.05) as scope:
        await queue.wait_waiting(2)
    assert scope.cancelled_caught
    async with anyio.create_task_group() as tg:

        async def add_later() -> None:
            await anyio.sleep(0.02)
            queue.add("b")
            queue.add("b")  # coalesced: still two keys
            queue.add("c")

        tg.start_soon(add_later)
        with anyio.fail_after(2):
            await queue.wait_waiting(3)
    assert len(queue) == 3


class Recorder:
    def __init__(self) -> None:
        self.calls: list[list[Key]] = []
        self._called = anyio.Event()

    async def apply(self, keys: Sequence[Key]) -> list[tuple[Key, Exception]]:
        self.calls.append(list(keys))
        self._called.set()
        self._called = anyio.Event()
        return []

    async def wait_calls(self, count: int) -> None:
        with anyio.fail_after(2):
            while len(self.calls) < count:
                await self._called.wait()


class _SameOpa:
    """An OPA that always answers as the same process."""

    async def config(self) -> dict[str, Any]:
        return {"labels": {"id": "one"}}


async def test_under_a_stream_a_full_batch_goes_out_without_waiting_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker, "BATCH_WINDOW", 30.0)  # only a full batch (or ALL) can end the wait
    queue: WorkQueue[WorkKey] = WorkQueue("opa")
    handler = Recorder()
    async with anyio.create_task_group() as tg:
        handlers: dict[str, worker.Handler] = {"s": handler}
        tg.start_soon(worker.run_worker, queue, handlers, OpaProcess(_SameOpa(), interval=1.0))
        queue.add(WorkKey("s", ObjectKey("ns", "first")))  # isolated: written at once
        await handler.wait_calls(1)
        queue.add(WorkKey("s", ObjectKey("ns", "k0")))
        await anyio.sleep(0.05)  # the writer holds k0, waiting for company
        assert len(handler.calls) == 1
        for i in range(1, worker.BATCH_TARGET):
            queue.add(WorkKey("s", ObjectKey("ns", f"k{i}")))
        await handler.wait_calls(2)
        assert len(handler.calls[1]) == worker.BATCH_TARGET
        queue.add(WorkKey("s", ALL))  # a whole load waits for nothing
        await handler.wait_calls(3)
        assert handler.calls[2] == [ALL]
        tg.cancel_scope.cancel()
