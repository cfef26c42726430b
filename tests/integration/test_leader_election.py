"""The Lease election of the status writer, against the real API server.

The elector's state machine is driven by two (or three) electors in one event loop, each with its own
identity, on a Lease in the test's namespace, with short durations (lease 3 s, renew deadline 2 s, retry
0.5 s). Faults the API server cannot produce on demand (a renewal that hangs, one that fails) are injected by
a wrapper around the real Lease adapter; everything else is the API server's own behaviour (409 on a stale
resourceVersion, 404 for a missing Lease).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio.abc import TaskGroup
from kubernetes import client

from app.kube.client import KubeClient, KubeUnavailable
from app.kube.config import load_connection
from app.kube.leases import Lease, LeaseRecord, Leases
from app.operations.leader import LeaderElector, Timing
from devstack.kube import KubeCluster
from tests.unit.polling import until

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

TIMING = Timing(lease_duration=3.0, renew_deadline=2.0, retry_period=0.5)
SLACK = 1.0  # scheduling and API round trips on a shared 2-core machine


class Faulty:
    """The real Lease adapter, until told to fail (`broken`: KubeUnavailable) or to hang (`stuck`)."""

    def __init__(self, leases: Leases) -> None:
        self.leases = leases
        self.broken = False
        self.stuck = False

    async def _fault(self) -> None:
        if self.stuck:
            await anyio.sleep_forever()
        if self.broken:
            raise KubeUnavailable("injected: API server unreachable")

    async def get(self) -> Lease | None:
        await self._fault()
        return await self.leases.get()

    async def create(self, record: LeaseRecord) -> Lease:
        await self._fault()
        return await self.leases.create(record)

    async def update(self, record: LeaseRecord, resource_version: str) -> Lease:
        await self._fault()
        return await self.leases.update(record, resource_version)

    def describe(self) -> str:
        return self.leases.describe()


@pytest.fixture
async def kube_client(kube: KubeCluster) -> AsyncIterator[KubeClient]:
    async with KubeClient(await load_connection(str(kube.admin_kubeconfig))) as kube_api:
        yield kube_api


@asynccontextmanager
async def electors(kube_api: KubeClient, namespace: str, *names: str) -> AsyncIterator[dict[str, Elected]]:
    """Runs one elector per name on the Lease `kopa` of the namespace; all stopped (and released) at exit."""
    async with anyio.create_task_group() as tg:
        running = {
            name: Elected.start(tg, Faulty(Leases(kube_api, namespace, "kopa")), name) for name in names
        }
        yield running
        for one in running.values():
            one.scope.cancel()


class Elected:
    """One elector running in its own cancel scope (cancelling it is a clean stop)."""

    def __init__(self, elector: LeaderElector, faults: Faulty) -> None:
        self.elector = elector
        self.faults = faults
        self.scope = anyio.CancelScope()
        self.led = 0  # times it became leader

    @classmethod
    def start(cls, tg: TaskGroup, faults: Faulty, identity: str) -> Elected:
        one = cls(LeaderElector(faults, identity, TIMING), faults)
        one.elector.on_started_leading(one._became_leader)
        tg.start_soon(one._run)
        return one

    def _became_leader(self) -> None:
        self.led += 1

    async def _run(self) -> None:
        with self.scope:
            await self.elector.run()


def lease_spec(coordination: client.CoordinationV1Api, namespace: str) -> client.V1LeaseSpec:
    spec = coordination.read_namespaced_lease("kopa", namespace).spec
    assert spec is not None
    return spec


def holder(coordination: client.CoordinationV1Api, namespace: str) -> str:
    return lease_spec(coordination, namespace).holder_identity or ""


@pytest.fixture
def coordination(k8s: client.ApiClient) -> client.CoordinationV1Api:
    return client.CoordinationV1Api(k8s)


async def only_leader(running: dict[str, Elected], within: float) -> str:
    def one() -> bool:
        return sum(e.elector.leading for e in running.values()) == 1

    await until(one, within=within)
    return next(name for name, e in running.items() if e.elector.leading)


async def test_one_of_three_leads_and_holds_the_lease(
    kube_client: KubeClient, namespace: str, coordination: client.CoordinationV1Api
) -> None:
    """Three candidates race for a Lease that does not exist: the API server lets one create it, and the
    others, seeing it held and renewed, never take it."""
    async with electors(kube_client, namespace, "a", "b", "c") as running:
        leader = await only_leader(running, within=TIMING.retry_period + SLACK)
        assert holder(coordination, namespace) == leader
        # Several lease durations later, still the same single leader, renewing.
        started = time.monotonic()
        while time.monotonic() - started < 2 * TIMING.lease_duration:
            assert [n for n, e in running.items() if e.elector.leading] == [leader]
            await anyio.sleep(0.1)
        assert all(e.led == (1 if n == leader else 0) for n, e in running.items())
        assert all(e.elector.holder == leader for e in running.values())
        lease = lease_spec(coordination, namespace)
        assert lease.lease_duration_seconds == 3
        assert lease.lease_transitions == 0


async def test_a_clean_stop_releases_the_lease_and_the_other_takes_over_at_once(
    kube_client: KubeClient, namespace: str, coordination: client.CoordinationV1Api
) -> None:
    async with electors(kube_client, namespace, "a", "b") as running:
        leader = await only_leader(running, within=TIMING.retry_period + SLACK)
        other = "b" if leader == "a" else "a"
        stopped = time.monotonic()
        running[leader].scope.cancel()
        await until(lambda: running[other].elector.leading, within=TIMING.lease_duration)
        # Sooner than the lease could have expired: the release let it in.
        assert time.monotonic() - stopped < TIMING.retry_period + SLACK < TIMING.lease_duration
        assert not running[leader].elector.leading
        assert holder(coordination, namespace) == other
        assert lease_spec(coordination, namespace).lease_transitions == 1


async def test_a_leader_that_cannot_renew_stops_within_the_renew_deadline(
    kube_client: KubeClient, namespace: str, coordination: client.CoordinationV1Api
) -> None:
    """A renewal that hangs (no answer, no error) does not keep the leader writing: it stops leading within
    the renew deadline, before the other may take over (after the lease duration), which then does within
    the lease duration plus one retry period of the last renewal."""
    async with electors(kube_client, namespace, "a", "b") as running:
        leader = await only_leader(running, within=TIMING.retry_period + SLACK)
        other = "b" if leader == "a" else "a"
        cut = time.monotonic()
        running[leader].faults.stuck = True
        await until(lambda: not running[leader].elector.leading, within=TIMING.renew_deadline + SLACK)
        assert not running[other].elector.leading, "two leaders at once"
        await until(
            lambda: running[other].elector.leading, within=TIMING.lease_duration + TIMING.retry_period + SLACK
        )
        assert time.monotonic() - cut >= TIMING.lease_duration - TIMING.retry_period
        assert holder(coordination, namespace) == other

        # The old leader, its API reachable again, sees the Lease held and stays a follower.
        running[leader].faults.stuck = False
        started = time.monotonic()
        while time.monotonic() - started < TIMING.lease_duration:
            assert running[other].elector.leading and not running[leader].elector.leading
            await anyio.sleep(0.1)


async def test_an_unreachable_api_server_stops_the_leader_and_it_leads_again_when_back(
    kube_client: KubeClient, namespace: str, coordination: client.CoordinationV1Api
) -> None:
    """Alone, a leader whose renewals fail stops leading after the renew deadline; when the API server answers
    again it finds its own record (no one took it) and leads again, re-syncing (the listener runs again)."""
    async with electors(kube_client, namespace, "a") as running:
        only = running["a"]
        await until(lambda: only.elector.leading, within=TIMING.retry_period + SLACK)
        only.faults.broken = True
        await until(lambda: not only.elector.leading, within=TIMING.renew_deadline + SLACK)
        assert only.elector.report()["problem"] == "injected: API server unreachable"
        only.faults.broken = False
        await until(lambda: only.elector.leading, within=TIMING.lease_duration + TIMING.retry_period + SLACK)
        assert only.led == 2
        assert "problem" not in only.elector.report()
        assert holder(coordination, namespace) == "a"
