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
from app.pipeline.workqueue import Backoff
from tests.unit.fake_api import OUTAGE, PATH, FakeApi, WatchMode, serving

pytestmark = pytest.mark.anyio

WINDOW = 3.0  # seconds of watching measured
BOUND = 20  # requests in that window; a hot loop makes thousands


async def watch_for_a_while(
    mode: WatchMode, until: Callable[[FakeApi], bool] = lambda api: False, backoff: Backoff | None = None
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
            watcher = Watcher(
                client, Collection(PATH, "default"), store, "test", add, convert=convert, backoff=backoff
            )
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


async def test_a_watch_the_server_refuses_lists_again_at_each_retry() -> None:
    """RBAC with list but not watch: resuming the watch alone left the store as the first list had it, for
    good (kube-mgmt's reflector lists again)."""
    api, restarts = await watch_for_a_while(
        "forbidden", until=lambda api: api.watches >= 3, backoff=Backoff(base=0.05, cap=0.2)
    )
    assert api.lists >= 3 and api.lists in (api.watches, api.watches + 1), (api.lists, api.watches)
    assert restarts["error"] >= 2, restarts
    assert api.requests < 2 * BOUND, "refused watches must still back off"


async def test_a_410_after_an_outage_lists_again_at_once(caplog: pytest.LogCaptureFixture) -> None:
    """The backoff that connection failures built up during an outage does not delay the relist of the 410
    that follows it (that kept what was deleted meanwhile in OPA up to 30 s longer)."""
    caplog.set_level("INFO", logger="app.pipeline.watcher")
    api, restarts = await watch_for_a_while(
        "outage", until=lambda api: api.watches >= OUTAGE + 2, backoff=Backoff(base=0.05, cap=5)
    )
    assert restarts["gone"] == 1 and restarts["error"] == OUTAGE, restarts
    assert api.lists == 2, "the 410 lists again"
    expired = [r.getMessage() for r in caplog.records if "410 Gone" in r.getMessage()]
    assert expired == ["watch of configmaps in namespace default expired (410 Gone); listing again"], expired
