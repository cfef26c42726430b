"""Operating kopa: probes, metrics, logs and shutdown, on a running kopa with real activity."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from kubernetes import client

from app.opa.client import CHECK_TIMEOUT
from devstack.kopa import KopaProcess
from devstack.opa import OpaServer
from devstack.processes import free_port, wait_until
from tests.integration.conftest import KopaFactory
from tests.integration.helpers import (
    DATA,
    POLICY,
    data,
    get,
    metric,
    put_configmap,
    scrape,
    secure_args,
    wait_data,
    wait_probe,
)

pytestmark = pytest.mark.integration

# Every metric the README lists; the dashboard of the Helm chart queries these.
METRICS = [
    "workqueue_depth",
    "workqueue_adds_total",
    "workqueue_queue_duration_seconds_bucket",
    "workqueue_work_duration_seconds_bucket",
    "workqueue_unfinished_work_seconds",
    "workqueue_longest_running_processor_seconds",
    "workqueue_retries_total",
    "kopa_opa_requests_total",
    "kopa_opa_request_duration_seconds_bucket",
    "kopa_updates_coalesced_total",
    "kopa_watch_restarts_total",
    "kopa_replicated_objects",
    "kopa_policies_loaded",
    "kopa_policies_failed",
    "kopa_data_documents_loaded",
    "kopa_full_syncs_total",
    "kopa_last_full_sync_timestamp_seconds",
    "kopa_opa_restarts_total",
    "kopa_opa_credentials_refused_total",
    "kopa_drift_repaired_total",
    "kopa_ready",
    "kopa_opa_up",
]


def depth(kopa: KopaProcess) -> float:
    return metric(scrape(kopa), "workqueue_depth", name="opa")


def test_readiness_follows_the_first_load_and_opa(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    opa.stop()
    kopa = run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}", "--opa-check-interval=200ms")
    put_configmap(core_v1, namespace, "d", {"x.json": '{"a": 1}'}, DATA)
    body = wait_probe(kopa, "/readyz", 503)
    assert body["ready"] is False and body["reasons"]
    assert wait_probe(kopa, "/health", 503)["ready"] is False, "/health: not before the first load"
    opa.start()
    body = wait_probe(kopa, "/readyz", 200)
    assert body["ready"] is True
    assert all(source["ready"] for source in body["sources"].values())
    assert wait_probe(kopa, "/health", 200)["alive"] is True
    assert data(opa, f"{namespace}/d/x.json") == {"a": 1}
    opa.stop()
    body = wait_probe(kopa, "/readyz", 503)
    assert "OPA is unreachable" in body["reasons"]
    assert wait_probe(kopa, "/healthz", 200)["alive"] is True, "liveness does not depend on OPA"
    # opa-kube-mgmt's chart probes kube-mgmt's /health for liveness too: once loaded, it answers as /healthz,
    # so an OPA outage does not get kopa restarted (kube-mgmt's /health stays 200 after its first load).
    assert wait_probe(kopa, "/health", 200)["alive"] is True
    opa.start()
    wait_probe(kopa, "/readyz", 200)


def test_every_metric_is_present_and_moves_with_activity(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    kopa = run_kopa(
        f"--opa-url={opa.api_url}",
        f"--namespaces={namespace}",
        "--replicate=v1/configmaps",
        f"--replicate-selector=v1/configmaps=burst={namespace}",
    )
    put_configmap(core_v1, namespace, "p", {"p.rego": "package metrics.test\n\nx := 1\n"}, POLICY)
    put_configmap(core_v1, namespace, "d", {"x.json": "{}"}, DATA)
    wait_probe(kopa, "/readyz", 200)
    samples = scrape(kopa)
    missing = [name for name in METRICS if not any(s.split("{")[0] == name for s in samples)]
    assert not missing, f"metrics missing: {missing}"
    assert metric(samples, "kopa_policies_loaded") >= 1
    assert metric(samples, "kopa_data_documents_loaded") >= 1
    assert metric(samples, "kopa_full_syncs_total") >= 3
    assert metric(samples, "kopa_opa_requests_total", endpoint="policies", method="PUT", code="200") >= 1
    assert metric(samples, "kopa_ready") == 1

    # A burst: the depth rises while it lasts and returns to 0; one key updated many times coalesces.
    depths: list[float] = []
    stop = threading.Event()

    def watch_depth() -> None:
        while not stop.is_set():
            depths.append(depth(kopa))

    labels = {"burst": namespace}

    def create(i: int) -> None:
        meta = client.V1ObjectMeta(name=f"b-{i}", labels=labels)
        core_v1.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=meta, data={"i": str(i)}))

    def hammer() -> None:
        # OPA paused: b-0's write waits (in flight or queued), so its later changes coalesce whatever the
        # timing (with OPA answering, each change can be written before the next one arrives).
        assert opa.pid is not None
        os.kill(opa.pid, signal.SIGSTOP)
        try:
            for round_ in range(60):
                core_v1.patch_namespaced_config_map("b-0", namespace, {"data": {"round": str(round_)}})
            wait_until(
                lambda: metric(scrape(kopa), "kopa_updates_coalesced_total", name="opa") > 0,
                timeout=30,
                what="b-0's changes coalesced while OPA was paused",
            )
        finally:
            os.kill(opa.pid, signal.SIGCONT)

    watcher = threading.Thread(target=watch_depth)
    watcher.start()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(create, range(800)))
            pool.submit(hammer).result()
            list(
                pool.map(
                    lambda i: core_v1.patch_namespaced_config_map(
                        f"b-{i}", namespace, {"data": {"again": "yes"}}
                    ),
                    range(800),
                )
            )
        wait_until(
            lambda: len(data(opa, f"kubernetes/configmaps/{namespace}") or {}) == 800,
            timeout=60,
            what="burst replicated",
        )
        wait_until(
            lambda: metric(scrape(kopa), "workqueue_depth", name="opa") == 0, timeout=30, what="depth 0"
        )
    finally:
        stop.set()
        watcher.join()
    after = scrape(kopa)
    assert max(depths) > 0, "the depth never rose during the burst"
    assert metric(after, "kopa_updates_coalesced_total", name="opa") > 0
    assert metric(after, "workqueue_adds_total", name="opa") > metric(
        samples, "workqueue_adds_total", name="opa"
    )
    assert metric(after, "kopa_replicated_objects", resource="v1/configmaps") == 800
    assert metric(after, "workqueue_work_duration_seconds_count", name="opa") > 0


def test_a_refused_token_is_counted_and_reported(
    run_kopa: KopaFactory, secure_opa: OpaServer, core_v1: client.CoreV1Api, namespace: str, tmp_path: Path
) -> None:
    """A wrong token: OPA is up (its /health answers) but refuses kopa, which waits, as for an outage."""
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token\n")
    args = secure_args(secure_opa, namespace)
    args[1] = f"--opa-auth-token-file={wrong}"
    kopa = run_kopa(*args)
    put_configmap(core_v1, namespace, "d", {"x.json": "{}"}, DATA)
    wait_until(
        lambda: metric(scrape(kopa), "kopa_opa_credentials_refused_total") == 1, timeout=30, what="refusal"
    )
    samples = scrape(kopa)
    assert metric(samples, "kopa_opa_requests_total", code="401") >= 1
    assert metric(samples, "kopa_opa_up") == 1, "OPA answers; it is not down"
    body = wait_probe(kopa, "/readyz", 503)
    assert "OPA refuses kopa's credentials (HTTP 401)" in body["reasons"]
    # The right token arrives (a rotated Secret): everything loads.
    wrong.write_text(f"{secure_opa.token}\n")
    wait_probe(kopa, "/readyz", 200)


def test_healthz_fails_while_the_event_loop_is_blocked(
    run_kopa: KopaFactory, secure_opa: OpaServer, namespace: str, tmp_path: Path
) -> None:
    """A real cause: the token file sits on a filesystem that hangs (a FIFO nobody writes to), so the
    read that kopa does on its event loop blocks it. /healthz, served from its own thread, says so."""
    token_file = tmp_path / "token"
    token_file.write_text(f"{secure_opa.token}\n")
    args = secure_args(secure_opa, namespace)
    args[1] = f"--opa-auth-token-file={token_file}"
    kopa = run_kopa(*args, "--opa-check-interval=200ms")
    assert wait_probe(kopa, "/healthz", 200)["alive"] is True
    fifo, same_fifo, healthy = tmp_path / "hung", tmp_path / "hung-too", tmp_path / "token-again"
    os.mkfifo(fifo)
    os.link(fifo, same_fifo)  # a second name, to release the reader once the token path is healthy again
    os.replace(fifo, token_file)
    body = wait_probe(kopa, "/healthz", 503, timeout=30)
    assert any(p.startswith("event loop blocked") for p in body["problems"]), body
    # The filesystem recovers: the token path is a plain file again, and the hung read completes.
    healthy.write_text(f"{secure_opa.token}\n")
    os.replace(healthy, token_file)
    with open(same_fifo, "w") as writer:
        writer.write(f"{secure_opa.token}\n")
    assert wait_probe(kopa, "/healthz", 200)["alive"] is True


def test_json_logs_parse_and_never_contain_the_token(
    run_kopa: KopaFactory, secure_opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    kopa = run_kopa(*secure_args(secure_opa, namespace), "--log-format=json")
    put_configmap(core_v1, namespace, "bad", {"b.rego": "package x\n\nnot rego {\n"}, POLICY)
    put_configmap(core_v1, namespace, "good", {"g.rego": "package jsonlogs\n\nx := 1\n"}, POLICY)
    wait_data(secure_opa, "jsonlogs/x", 1)
    wait_probe(kopa, "/readyz", 200)
    kopa.stop()
    lines = [line for line in kopa.log_path.read_text().splitlines() if line and not line.startswith("===")]
    assert len(lines) > 5
    for line in lines:
        entry = json.loads(line)
        assert {"time", "level", "logger", "msg"} <= set(entry)
    assert any(json.loads(line)["level"] == "warning" and "bad" in json.loads(line)["msg"] for line in lines)
    assert secure_opa.token and secure_opa.token not in kopa.log_path.read_text()


def test_sigterm_exits_0_within_the_shutdown_timeout_even_with_a_write_hanging(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    kopa = run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}", "--shutdown-timeout=3s")
    wait_probe(kopa, "/readyz", 200)
    assert opa.pid is not None
    os.kill(opa.pid, signal.SIGSTOP)  # OPA hangs: kopa's next write never gets an answer
    try:
        put_configmap(core_v1, namespace, "d", {"x.json": "{}"}, DATA)
        wait_until(
            lambda: metric(scrape(kopa), "workqueue_longest_running_processor_seconds", name="opa") > 0.5,
            timeout=30,
            what="a write in flight to the hung OPA",
        )
        started = time.monotonic()
        assert kopa.pid is not None
        os.kill(kopa.pid, signal.SIGTERM)
        code = kopa.wait(timeout=10)
        elapsed = time.monotonic() - started
    finally:
        os.kill(opa.pid, signal.SIGCONT)
    assert code == 0
    assert elapsed < 3.5, f"took {elapsed:.1f}s"
    assert re.search(r"received SIGTERM; stopping", kopa.log_path.read_text())


def test_a_hung_opa_makes_kopa_unready_within_seconds_and_it_catches_up_after(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """OPA stopped (SIGSTOP: the port still accepts connections, nothing answers). kopa said ready, and
    `kopa_opa_up` 1, for the two minutes of a write's timeout; its check of OPA now gives up sooner."""
    kopa = run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    wait_probe(kopa, "/readyz", 200)
    assert opa.pid is not None
    os.kill(opa.pid, signal.SIGSTOP)
    try:
        put_configmap(core_v1, namespace, "d", {"x.json": '{"v": 1}'}, DATA)
        stopped = time.monotonic()
        body = wait_probe(kopa, "/readyz", 503, timeout=CHECK_TIMEOUT + 20)
        assert time.monotonic() - stopped < CHECK_TIMEOUT + 10
        assert "OPA is unreachable" in body["reasons"]
        assert f"GET {opa.api_url}/config: no answer within {CHECK_TIMEOUT:g} s" in kopa.log_path.read_text()
        assert metric(scrape(kopa), "kopa_opa_up") == 0
        assert get(kopa, "/healthz")[0] == 200, "waiting for OPA is not kopa's failure"
    finally:
        os.kill(opa.pid, signal.SIGCONT)
    wait_data(opa, f"{namespace}/d/x.json", {"v": 1})
    wait_probe(kopa, "/readyz", 200)


def test_an_empty_health_endpoint_turns_the_server_off(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    port = free_port()
    kopa = run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}", "--health-endpoint=")
    put_configmap(core_v1, namespace, "d", {"x.json": '{"on": true}'}, DATA)
    wait_data(opa, f"{namespace}/d/x.json", {"on": True})
    assert kopa.health_url == ""
    assert "serving /healthz" not in kopa.log_path.read_text()
    busy = run_kopa(
        f"--opa-url={opa.api_url}", f"--namespaces={namespace}", f"--health-endpoint=127.0.0.1:{port}"
    )
    wait_probe(busy, "/healthz", 200)
    clash = run_kopa(
        f"--opa-url={opa.api_url}",
        f"--namespaces={namespace}",
        f"--health-endpoint=127.0.0.1:{port}",
        expect_exit=2,
    )
    assert clash.wait(timeout=30) == 2
    assert f"invalid --health-endpoint 127.0.0.1:{port}: cannot listen" in clash.log_path.read_text()
