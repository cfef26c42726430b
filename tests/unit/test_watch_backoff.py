"""A watch that ends at once, or that keeps answering 410, must not restart in a hot loop; a watch that
breaks resumes where it was.

The real Watcher and KubeClient run against a loopback fake API server (tests/unit/fake_api.py): a real
kube-apiserver cannot be made to misbehave this way on demand. The rate is measured over a fixed window.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

from app.kube.client import KubeClient
from app.kube.config import KubeConnection
from app.model import Store, WorkKey
from app.pipeline.watcher import Collection, Watcher, same_resource_version
from tests.unit.fake_api import PATH, FakeApi, WatchMode, serving

pytestmark = pytest.mark.anyio

WINDOW = 3.0  # seconds of watching measured
BOUND = 20  # requests in that window; a hot loop makes thousands


async def watch_for_a_while(
    mode: WatchMode, until: Callable[[FakeApi], bool] = lambda api: False
) -> tuple[FakeApi, dict[str, int]]:
    """Runs one Watcher for WINDOW seconds, or until `until(api)`, against a fake answering watches per
    `mode`."""
    async with serving(FakeApi(mode)) as api:
        connection = KubeConnection(
            host=api.url, authorization=None, ssl_context=False, namespace="default", source="test"
        )

        def add(work: WorkKey) -> None:
            pass

        def convert(obj: dict[str, Any]) -> dict[str, Any]:
            return obj

        store: Store[dict[str, Any]] = Store("test", same_resource_version)
        async with KubeClient(connection) as client:
            watcher = Watcher(client, Collection(PATH, "default"), store, "test", add, convert=convert)
            with anyio.move_on_after(WINDOW):
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(watcher.run)
                    while not until(api):
                        api.watch_opened.clear()
                        await api.watch_opened.wait()
                    tasks.cancel_scope.cancel()
        return api, watcher.stats.restarts


async def test_a_watch_that_ends_at_once_is_backed_off_and_counted() -> None:
    api, restarts = await watch_for_a_while("empty")
    assert api.watches < BOUND, f"{api.watches} watches in {WINDOW}s: restarted in a hot loop"
    assert api.lists == 1, "a watch that ends cleanly resumes; it does not list again"
    assert restarts.get("closed_early", 0) >= 2, restarts
    assert restarts.get("closed", 0) == 0, restarts


async def test_a_watch_that_keeps_answering_410_spaces_its_relists() -> None:
    api, restarts = await watch_for_a_while("gone")
    assert api.requests < BOUND, f"{api.lists} lists and {api.watches} watches in {WINDOW}s"
    assert restarts.get("gone", 0) >= 2, restarts
    assert restarts["gone"] == api.watches or restarts["gone"] == api.watches - 1, (restarts, api.watches)


async def test_a_watch_that_breaks_resumes_from_the_last_resource_version_it_saw() -> None:
    api, restarts = await watch_for_a_while("break", until=lambda api: api.watches >= 2)
    assert api.watched_from[:2] == ["5", "7"], "the second watch did not start where the first broke off"
    assert api.lists == 1, "a broken watch resumes; it does not list again"
    assert restarts["error"] >= 1, restarts
