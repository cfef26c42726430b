"""Two kopa replicas in bundle mode against one API server: both serve the bundle, one writes statuses.

Each replica has its own validation OPA (as each kopa pod of the chart does) and its own bundle and health
ports; leader election is on by default in bundle mode, on a Lease in the test's namespace, with short
durations so that failover fits a test: lease 3 s, renew deadline 2 s, retry 0.5 s.
"""

from __future__ import annotations

import json
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from devstack.kopa import KopaProcess
from devstack.opa import OpaServer, kopa_service
from devstack.processes import HOST, free_port, wait_until
from tests.conftest import require_binaries
from tests.integration.conftest import KopaFactory
from tests.integration.helpers import (
    OK,
    POLICY,
    TIMEOUT,
    get,
    metric,
    put_configmap,
    scrape,
    status_of,
    wait_probe,
    wait_status,
)

pytestmark = pytest.mark.integration

LEASE, RENEW, RETRY = 3.0, 2.0, 0.5
SLACK = 2.0  # process scheduling, watch delivery and API round trips on a shared 2-core machine
BAD = "package team.bad\n\nallow := no_such_func(1)\n"


@dataclass
class Replicas:
    """The two kopa replicas, by who leads."""

    kopas: list[KopaProcess]

    def election(self, kopa: KopaProcess) -> dict[str, Any]:
        report: dict[str, Any] = json.loads(get(kopa, "/readyz")[1])["leaderElection"]
        return report

    def leader(self) -> KopaProcess:
        """The one replica that leads, once exactly one does (and the other knows it as the holder)."""

        def one() -> KopaProcess | None:
            running = [k for k in self.kopas if k.running]
            reports = [self.election(k) for k in running]
            leading = [k for k, r in zip(running, reports, strict=True) if r["leading"]]
            if len(leading) != 1:
                return None
            holder = self.election(leading[0])["identity"]
            return leading[0] if all(r["holder"] == holder for r in reports) else None

        found: KopaProcess = wait_until(one, timeout=TIMEOUT, what="exactly one leading replica")
        return found

    def other(self, kopa: KopaProcess) -> KopaProcess:
        return next(k for k in self.kopas if k is not kopa)


ReplicasFactory = Callable[..., Replicas]


@pytest.fixture
def start_replicas(run_kopa: KopaFactory, namespace: str, tmp_path: Path) -> Iterator[ReplicasFactory]:
    """Factory: start_replicas(lease=3.0, renew=2.0) starts two kopas in bundle mode, each with its own
    validation OPA, electing on the Lease `kopa` in the test's namespace; both ready."""
    require_binaries("opa")
    started: list[OpaServer] = []

    def start(lease: float = LEASE, renew: float = RENEW) -> Replicas:
        token_file = tmp_path / "bundle-token"
        token_file.write_text(secrets.token_urlsafe(24) + "\n", encoding="utf-8")
        kopas = []
        for i in range(2):
            port = free_port()
            service = kopa_service(f"http://{HOST}:{port}", {"bearer": {"token_path": str(token_file)}})
            validation = OpaServer.validation(tmp_path / f"opa-validation-{i}", service)
            started.append(validation)
            validation.start()
            kopas.append(
                run_kopa(
                    f"--opa-url={validation.api_url}",
                    f"--namespaces={namespace}",
                    f"--bundle-endpoint={HOST}:{port}",
                    f"--bundle-token-file={token_file}",
                    f"--leader-election-namespace={namespace}",
                    f"--leader-election-lease-duration={lease}s",
                    f"--leader-election-renew-deadline={renew}s",
                    f"--leader-election-retry-period={RETRY}s",
                )
            )
        for kopa in kopas:
            wait_probe(kopa, "/readyz", 200)
        return Replicas(kopas)

    yield start
    for server in started:
        server.stop()


def load_failed_events(core_v1: client.CoreV1Api, namespace: str, name: str) -> list[client.CoreV1Event]:
    return [
        e
        for e in core_v1.list_namespaced_event(namespace).items
        if e.reason == "LoadFailed" and e.involved_object.name == name
    ]


def settled(kopa: KopaProcess, failed: int) -> bool:
    """kopa has reached the status of `failed` failing modules and its status writer has nothing left to do
    (written, or, not leading, left alone)."""
    samples = scrape(kopa)
    return (
        metric(samples, "kopa_policies_failed") == failed
        and metric(samples, "workqueue_depth", name="status") == 0
        and metric(samples, "workqueue_unfinished_work_seconds", name="status") == 0
    )


def test_only_the_leader_writes_statuses_and_events(
    start_replicas: ReplicasFactory, core_v1: client.CoreV1Api, namespace: str
) -> None:
    replicas = start_replicas()
    leader = replicas.leader()
    follower = replicas.other(leader)
    assert metric(scrape(leader), "kopa_leader") == 1
    assert metric(scrape(follower), "kopa_leader") == 0

    put_configmap(core_v1, namespace, "bad", {"bad.rego": BAD}, POLICY)
    assert "no_such_func" in wait_status(core_v1, namespace, "bad", lambda s: "error" in s)
    for kopa in replicas.kopas:
        wait_until(lambda kopa=kopa: settled(kopa, 1), timeout=TIMEOUT, what=f"{kopa} settled")  # type: ignore[misc]
    events = load_failed_events(core_v1, namespace, "bad")
    assert len(events) == 1, [e.metadata.name for e in events]
    written = f"configmap {namespace}/bad: "
    assert written in leader.log_path.read_text(errors="replace")
    assert written not in follower.log_path.read_text(errors="replace")

    # Fixed: one LoadRecovered, from the leader alone.
    put_configmap(core_v1, namespace, "bad", {"bad.rego": "package team.bad\n\nallow := false\n"}, POLICY)
    assert wait_status(core_v1, namespace, "bad") == OK
    for kopa in replicas.kopas:
        wait_until(lambda kopa=kopa: settled(kopa, 0), timeout=TIMEOUT, what=f"{kopa} settled")  # type: ignore[misc]
    recovered = [
        e
        for e in core_v1.list_namespaced_event(namespace).items
        if e.reason == "LoadRecovered" and e.involved_object.name == "bad"
    ]
    assert len(recovered) == 1
    assert len(load_failed_events(core_v1, namespace, "bad")) == 1


def test_a_killed_leader_is_replaced_within_the_lease_duration_plus_the_retry_period(
    start_replicas: ReplicasFactory, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """SIGKILL: no release; the other replica waits out the lease, then writes the statuses, and the status
    the old leader wrote is not written (nor its Event recorded) again."""
    replicas = start_replicas()
    leader = replicas.leader()
    follower = replicas.other(leader)
    put_configmap(core_v1, namespace, "bad", {"bad.rego": BAD}, POLICY)
    wait_status(core_v1, namespace, "bad", lambda s: "error" in s)
    wait_until(lambda: settled(follower, 1), timeout=TIMEOUT, what="the follower settled")

    leader.kill()
    leader.expected_exit = -signal.SIGKILL
    killed = time.monotonic()
    put_configmap(core_v1, namespace, "later", {"later.rego": BAD.replace("team.bad", "team.later")}, POLICY)
    wait_until(
        lambda: "error" in (status_of(core_v1, namespace, "later") or ""),
        timeout=LEASE + RETRY + SLACK,
        what="the status of a ConfigMap changed after the leader died",
    )
    assert time.monotonic() - killed >= LEASE - RETRY  # the lease was waited out: nobody released it
    assert replicas.leader() is follower
    wait_until(lambda: settled(follower, 2), timeout=TIMEOUT, what="the new leader settled")
    assert len(load_failed_events(core_v1, namespace, "later")) == 1
    assert len(load_failed_events(core_v1, namespace, "bad")) == 1  # the old leader's, not repeated


def test_a_clean_stop_hands_the_lease_over_at_once(
    start_replicas: ReplicasFactory, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """SIGTERM: the leader releases the Lease, so the other takes over at its next retry, long before a
    lease of 20 s could expire."""
    replicas = start_replicas(lease=20.0, renew=10.0)
    leader = replicas.leader()
    follower = replicas.other(leader)
    assert leader.stop() == 0
    stopped = time.monotonic()
    assert "released lease" in leader.log_path.read_text(errors="replace")
    put_configmap(core_v1, namespace, "bad", {"bad.rego": BAD}, POLICY)
    wait_until(
        lambda: "error" in (status_of(core_v1, namespace, "bad") or ""),
        timeout=RETRY + SLACK,
        what="the status written by the replica that took over",
    )
    assert time.monotonic() - stopped < 20.0
    assert replicas.leader() is follower
    assert len(load_failed_events(core_v1, namespace, "bad")) == 1
