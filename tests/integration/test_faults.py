"""Fault injection with real processes: kopa must make OPA right again on its own, whatever breaks.

Each scenario runs a seeded stream of ConfigMap changes (policies, data, and a replicated collection: see
tests/faults/workload.py) against kopa and the production-shape OPA (TLS from a test CA, token authz; kopa
with --opa-auth-token-file and --opa-ca-file), injects one kind of fault while the stream goes on, stops the
stream, and then waits until OPA, read over its REST API, equals a fresh list from the API server, object by
object (tests/faults/state.py says exactly what "equal" means). The figures go to docs/reliability.md,
written at the end of a full run by the session fixture below.

- OPA killed (SIGKILL) and restarted 12 times: at once, after an outage, and again during kopa's refill.
- The API server killed (SIGKILL) and stopped (SIGTERM), then started again against the same etcd.
- A proxy between kopa and OPA injecting latency, HTTP 500s and connection resets (tests/faults/proxy.py).
- No token of the run ever appears in anything kopa printed.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.certs import TestCA
from devstack.kube import KubeCluster
from devstack.opa import OpaServer
from devstack.processes import ManagedProcess, wait_until
from tests.faults.proxy import FaultProxy, FaultRates
from tests.faults.report import (
    REPORT,
    ApiOutage,
    OpaRestart,
    Scenario,
    full_run_passed,
    scan_for_secrets,
    write_document,
)
from tests.faults.state import OK, STATUS, Convergence, cluster_state, converge, differences, opa_state
from tests.faults.workload import (
    DATA,
    FAULT_LABEL,
    POLICY,
    KubeRest,
    Workload,
    configmaps_path,
    delete_configmap,
    put_configmap,
)
from tests.integration.conftest import KopaFactory
from tests.integration.helpers import apiserver_restored, secure_args, wait_log

pytestmark = pytest.mark.integration

SEED = 6  # the issue's number: any fixed value makes the stream and the proxy's faults repeatable
OPA_ROUNDS = 12
MODES = ("restarted at once", "down while updates go on", "killed again during the refill")
CONVERGE_TIMEOUT = 60.0  # covers kopa's capped backoffs (OPA writes, status writes, watches)
READY_TIMEOUT = 60.0
# An API server start (seconds here) plus kopa's watch backoff, which is capped at 30 s.
RESUME_TIMEOUT = 120.0


# --- the document, at the end of the session ------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def reliability_document(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, kube: KubeCluster
) -> Iterator[None]:
    """At the end of the session: searches every kopa log of the run for secrets, then writes
    docs/reliability.md if both reliability modules ran in full and passed."""
    yield
    REPORT.scan = scan_for_secrets(tmp_path_factory.getbasetemp(), kube.tokens.values())
    complete, why = full_run_passed(request.session)
    if complete and not REPORT.scan.leaks:
        message = f"reliability: wrote {write_document(REPORT)}"
    else:
        message = f"reliability: docs/reliability.md left as it is ({why or 'a secret leaked'})"
    # Said on the terminal, past pytest's capture of the (last) test's teardown.
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\n{message}")
    assert not REPORT.scan.leaks, "\n".join(REPORT.scan.leaks)


# --- helpers -----------------------------------------------------------------------------------------------


def production_args(opa_url: str, opa: OpaServer, namespace: str) -> list[str]:
    """kopa's flags for the production-shape OPA (its token file, the CA of its certificate) at opa_url."""
    return [
        f"--opa-url={opa_url}",
        *(a for a in secure_args(opa, namespace) if not a.startswith("--opa-url=")),
    ]


def replication_args(workload: Workload) -> list[str]:
    return ["--replicate=v1/configmaps", f"--replicate-selector=v1/configmaps={workload.selector}"]


def marker_ready(opa: OpaServer) -> bool:
    status, body = opa.http().request("GET", "/v1/data/system/kopa/ready")
    return status == 200 and isinstance(body, dict) and body.get("result") is True


def wait_ready(opa: OpaServer) -> float:
    """Waits for kopa's readiness marker in OPA; returns when it was seen (time.monotonic())."""
    wait_until(
        lambda: marker_ready(opa),
        timeout=READY_TIMEOUT,
        what="kopa's readiness marker in OPA",
        interval=0.02,
        max_interval=0.05,
    )
    return time.monotonic()


def core_complete(opa: OpaServer, workload: Workload) -> bool:
    """Whether OPA holds the ConfigMaps that never change, as the workload made them."""
    http, ns = opa.http(), workload.namespace
    lib = http.request("GET", f"/v1/policies/{ns}/core-lib/lib.rego")[1]
    data = http.request("GET", f"/v1/data/{ns}/core-data/core.json")[1]
    plain = http.request("GET", f"/v1/data/kubernetes/configmaps/{ns}/core-plain/data")[1]
    core = workload.core
    return (
        isinstance(lib, dict)
        and (lib.get("result") or {}).get("raw") == workload.content("core-lib", core["core-lib"])["lib.rego"]
        and isinstance(data, dict)
        and data.get("result") == json.loads(workload.content("core-data", core["core-data"])["core.json"])
        and isinstance(plain, dict)
        and plain.get("result") == workload.content("core-plain", core["core-plain"])
    )


def refill_begun(opa: OpaServer, workload: Workload) -> bool:
    """core-lib was the first module kopa saw, so a refill loads it first."""
    return opa.http().request("GET", f"/v1/policies/{workload.namespace}/core-lib/lib.rego")[0] == 200


NO_FAULTS = FaultRates(latency=0, error_500=0, reset_before=0, reset_after=0)
WRITES = ("PUT", "PATCH", "DELETE")


def status_and_failures(api: KubeRest, namespace: str, name: str) -> tuple[str | None, list[str]]:
    """The ConfigMap's status annotation, and the notes of the LoadFailed Events about it."""
    meta = api.get(configmaps_path(namespace, name))["metadata"]
    events = api.get(f"/apis/events.k8s.io/v1/namespaces/{namespace}/events")["items"]
    notes = [
        str(e.get("note"))
        for e in events
        if (e.get("regarding") or {}).get("name") == name and e.get("reason") == "LoadFailed"
    ]
    return (meta.get("annotations") or {}).get(STATUS), notes


@contextlib.contextmanager
def kopa_behind_a_proxy(
    run_kopa: KopaFactory, opa: OpaServer, namespace: str, *extra: str, rates: FaultRates = NO_FAULTS
) -> Iterator[tuple[FaultProxy, ManagedProcess]]:
    """kopa in the production shape, talking to `opa` through a FaultProxy (no faults unless `rates`)."""
    with FaultProxy(*proxy_settings(opa), rates=rates, seed=SEED) as proxy:
        yield proxy, run_kopa(*production_args(f"{proxy.url}/v1", opa, namespace), *extra)


def proxy_settings(opa: OpaServer) -> tuple[str, Path, Path, Path]:
    """(upstream, upstream CA, certificate, key) for a FaultProxy in front of the production-shape OPA.

    The CA that issued OPA's certificate issues the proxy's, so kopa's --opa-ca-file trusts both.
    """
    assert opa.ca_file is not None
    cert, key = TestCA(Path(opa.ca_file).parent).issue("fault-proxy")
    return opa.url, Path(opa.ca_file), cert, key


def hold_the_writer(proxy: FaultProxy, api: KubeRest, namespace: str) -> None:
    """Holds kopa's writes to OPA and makes one (to the ConfigMap "trigger"), so the writer is busy in it
    until proxy.release(): what changes meanwhile waits in kopa's queue."""
    proxy.hold("writes", WRITES)
    put_configmap(api, namespace, "trigger", DATA, {"t.json": json.dumps({"at": time.time()})})
    wait_until(lambda: proxy.held("writes"), timeout=30, what="kopa's writer held in a write")


def start_scenario(run_kopa: KopaFactory, opa_url: str, opa: OpaServer, workload: Workload) -> None:
    """Creates the workload's ConfigMaps, starts kopa, and waits until OPA holds them all."""
    workload.setup()
    run_kopa(*production_args(opa_url, opa, workload.namespace), *replication_args(workload))
    converge(workload.api, opa, workload.namespace, workload.selector, timeout=CONVERGE_TIMEOUT)
    wait_ready(opa)


def finish_scenario(name: str, opa: OpaServer, workload: Workload) -> Convergence:
    """Once the stream has stopped: waits until OPA equals a fresh list, compares once more (the figure
    recorded as the differences found), and records the scenario. Every input was valid, so there must
    be no LoadFailed Event; and no annotation or Event may hold OPA's token."""
    end = converge(workload.api, opa, workload.namespace, workload.selector, timeout=CONVERGE_TIMEOUT)
    expected = cluster_state(workload.api, workload.namespace, workload.selector)
    found = differences(expected, opa_state(opa, workload.namespace))
    events = workload.api.get(f"/apis/events.k8s.io/v1/namespaces/{workload.namespace}/events")["items"]
    false_alarms = sum(1 for e in events if e.get("reason") == "LoadFailed")  # every input was valid
    REPORT.scenarios.append(
        Scenario(
            name,
            workload.changes.copy(),
            workload.retries,
            end.seconds,
            expected.size(),
            len(found),
            false_alarms,
        )
    )
    assert not found, "OPA drifted from the cluster after it had matched:\n" + "\n".join(found)
    assert not false_alarms, f"{false_alarms} LoadFailed Events, although every input was valid"
    configmaps = json.dumps(workload.api.get(configmaps_path(workload.namespace)))
    assert opa.token and opa.token not in configmaps + json.dumps(events), "the token leaked into the cluster"
    return end


# --- OPA killed and restarted -------------------------------------------------------------------------


def restart_opa(opa: OpaServer, workload: Workload, mode: str) -> list[OpaRestart]:
    """Kills OPA and brings it back in one of MODES; returns the restarts it made (two when killed again)."""
    made: list[OpaRestart] = []
    killed = time.monotonic()
    opa.kill()
    if mode == "down while updates go on":
        workload.wait_for_changes(10)
    opa.start()
    up = time.monotonic()
    if mode == "killed again during the refill":
        wait_until(
            lambda: refill_begun(opa, workload),
            timeout=READY_TIMEOUT,
            what="kopa refilling OPA",
            interval=0.005,
            max_interval=0.01,
        )
        if not marker_ready(opa):
            made.append(OpaRestart(mode, up - killed, None, False))
            killed = time.monotonic()
            opa.kill()
            opa.start()
            up = time.monotonic()
            mode = "restarted at once"
    ready = wait_ready(opa)
    made.append(OpaRestart(mode, up - killed, ready - up, core_complete(opa, workload)))
    return made


def test_opa_killed_and_restarted_during_updates(
    run_kopa: KopaFactory, secure_opa: OpaServer, kube: KubeCluster, namespace: str
) -> None:
    workload = Workload(kube, namespace, seed=SEED)
    start_scenario(run_kopa, secure_opa.api_url, secure_opa, workload)
    restarts: list[OpaRestart] = []
    workload.start()
    try:
        for round_ in range(OPA_ROUNDS):
            workload.wait_for_changes(5)
            restarts += restart_opa(secure_opa, workload, MODES[round_ % len(MODES)])
    finally:
        workload.stop()
    finish_scenario("OPA killed and restarted", secure_opa, workload)
    REPORT.restarts += restarts
    assert len(restarts) >= 10
    incomplete = [r for r in restarts if r.ready_seconds is not None and not r.core_complete]
    assert not incomplete, f"the readiness marker came before the refill was done: {incomplete}"


# --- API server killed and stopped -----------------------------------------------------------------------


def test_api_server_killed_and_stopped_during_updates(
    run_kopa: KopaFactory, secure_opa: OpaServer, kube: KubeCluster, namespace: str
) -> None:
    workload = Workload(kube, namespace, seed=SEED + 1)
    start_scenario(run_kopa, secure_opa.api_url, secure_opa, workload)
    outages: list[ApiOutage] = []
    workload.start()
    try:
        with apiserver_restored(kube):
            for i, how in enumerate(("SIGKILL", "SIGTERM", "SIGKILL")):
                workload.wait_for_changes(10)
                down = time.monotonic()
                if how == "SIGKILL":
                    kube.apiserver.kill()
                else:
                    kube.stop_apiserver()
                kube.start_apiserver()
                up = time.monotonic()
                # A change made now reaches OPA only once kopa watches again.
                doc = {"outage": i, "how": how}
                labels = {**DATA, FAULT_LABEL: namespace}
                put_configmap(workload.api, namespace, f"probe-{i}", labels, {"probe.json": json.dumps(doc)})
                path = f"/v1/data/{namespace}/probe-{i}/probe.json"
                wait_until(
                    lambda: secure_opa.http().get_json(path).get("result") == doc,  # noqa: B023 - used at once
                    timeout=RESUME_TIMEOUT,
                    what=f"the change made after outage {i} in OPA",
                )
                outages.append(ApiOutage(how, up - down, time.monotonic() - up))
    finally:
        workload.stop()
    finish_scenario("API server killed and stopped", secure_opa, workload)
    REPORT.outages += outages
    assert workload.retries > 0, "the workload never met the outage: the test tested nothing"


# --- a faulty link to OPA -----------------------------------------------------------------------------


def test_latency_500s_and_resets_between_kopa_and_opa(
    run_kopa: KopaFactory, secure_opa: OpaServer, kube: KubeCluster, namespace: str
) -> None:
    rates = FaultRates()
    workload = Workload(kube, namespace, seed=SEED + 2)
    workload.setup()
    replicate = replication_args(workload)
    with kopa_behind_a_proxy(run_kopa, secure_opa, namespace, *replicate, rates=rates) as (proxy, _):
        converge(workload.api, secure_opa, namespace, workload.selector, timeout=CONVERGE_TIMEOUT)
        workload.start()
        try:
            workload.wait_for_changes(200, timeout=120)
        finally:
            workload.stop()
        # Faults go on while kopa catches up: converging is part of what is tested.
        finish_scenario("latency, 500s and resets between kopa and OPA", secure_opa, workload)
        counts = dict(proxy.counts)
    REPORT.proxy = {"seed": SEED, "rates": vars(rates), "counts": counts}
    for fault in ("error_500", "reset_before", "reset_after", "latency"):
        assert counts.get(fault, 0) > 0, f"no {fault} was injected: {counts}"


# --- defects this suite found, each with a deterministic repro -----------------------------------------


def test_changes_waiting_behind_a_refill_are_not_lost(
    run_kopa: KopaFactory, secure_opa: OpaServer, kube: KubeCluster, namespace: str
) -> None:
    """Changes that wait in kopa's queue while OPA restarts must reach the new OPA too.

    Found by the restart scenario (a deleted policy stayed in OPA, an updated one stayed old, for good).
    ConfigMapSync.apply, given a batch holding the refill key ALL and other keys, refills from kopa's
    PolicyBook and returns without handling the other keys: the worker then forgets them. Under a stream
    of updates, keys often share the refill's batch. Here the proxy holds kopa's writer in one write while
    three policy changes are queued and OPA restarts, so the refill and the changes share a batch every time.
    """
    api = KubeRest(kube)
    tag = "f" + namespace.replace("-", "")
    selector = f"{FAULT_LABEL}={namespace}"  # nothing is replicated here

    def policy(name: str, n: int) -> dict[str, str]:
        return {"p.rego": f"package {tag}.{name}\n\nv := {n}\n"}

    with kopa_behind_a_proxy(run_kopa, secure_opa, namespace, "--opa-check-interval=200ms") as (proxy, kopa):
        put_configmap(api, namespace, "keep", POLICY, policy("keep", 1))
        put_configmap(api, namespace, "gone", POLICY, policy("gone", 1))
        converge(api, secure_opa, namespace, selector, timeout=CONVERGE_TIMEOUT)

        hold_the_writer(proxy, api, namespace)
        # Queued behind the held write: an update, a deletion and a creation; then OPA restarts.
        put_configmap(api, namespace, "keep", POLICY, policy("keep", 2))
        delete_configmap(api, namespace, "gone")
        put_configmap(api, namespace, "new", POLICY, policy("new", 1))
        secure_opa.kill()
        secure_opa.start()
        wait_log(kopa, "OPA restarted")
        proxy.release()
        converge(api, secure_opa, namespace, selector, timeout=30)


def test_data_written_before_a_restart_was_noticed_is_removed_with_its_key(
    run_kopa: KopaFactory, secure_opa: OpaServer, kube: KubeCluster, namespace: str
) -> None:
    """A data key kopa wrote into a restarted OPA before it noticed the restart must go when it is removed.

    Found by the restart scenario (a removed key stayed in OPA for good). The refill starts with
    DataBook.reset(), which forgets every key kopa wrote, as if the new OPA were empty; but kopa may have
    written into it before the watchdog noticed the restart. A key removed after that is then never
    deleted. The proxy holds the watchdog in one check so that the write lands in the new OPA first.
    """
    api = KubeRest(kube)
    selector = f"{FAULT_LABEL}={namespace}"
    with kopa_behind_a_proxy(run_kopa, secure_opa, namespace, "--opa-check-interval=200ms") as (proxy, kopa):
        put_configmap(api, namespace, "d", DATA, {"a.json": '{"v": 1}', "b.json": '{"v": 1}'})
        converge(api, secure_opa, namespace, selector, timeout=CONVERGE_TIMEOUT)

        proxy.hold("watchdog", ["GET"], "/v1/config")
        wait_until(lambda: proxy.held("watchdog"), timeout=30, what="kopa's OPA watchdog held in a check")
        secure_opa.kill()
        secure_opa.start()
        put_configmap(api, namespace, "d", DATA, {"a.json": '{"v": 2}', "b.json": '{"v": 2}'})
        wait_until(
            lambda: secure_opa.http().get_json(f"/v1/data/{namespace}/d/b.json").get("result") == {"v": 2},
            timeout=30,
            what="b.json written into the new OPA before kopa noticed the restart",
        )
        hold_the_writer(proxy, api, namespace)
        put_configmap(api, namespace, "d", DATA, {"a.json": '{"v": 2}'})  # b.json removed
        proxy.release("watchdog")
        wait_log(kopa, "OPA restarted")
        proxy.release()
        converge(api, secure_opa, namespace, selector, timeout=30)


def test_a_configmap_deleted_and_created_again_gets_its_status(
    run_kopa: KopaFactory, secure_opa: OpaServer, kube: KubeCluster, namespace: str
) -> None:
    """A ConfigMap deleted and created again must carry kopa's status annotation.

    Found by the restart and proxy scenarios (ConfigMaps without any status at the end). StatusReporter
    remembers what it last wrote per namespace/name (`_written`) and skips a write of the same value. When
    the deletion and the creation reach kopa's queue together, they make one sync: kopa never sees the
    ConfigMap gone, never forgets, and takes the new object, which has no annotation, for one that already
    says ok. The proxy holds kopa's writer so the two changes always share a sync.
    """
    api = KubeRest(kube)
    selector = f"{FAULT_LABEL}={namespace}"
    with kopa_behind_a_proxy(run_kopa, secure_opa, namespace) as (proxy, _):
        put_configmap(api, namespace, "c", DATA, {"c.json": '{"c": 1}'})
        converge(api, secure_opa, namespace, selector, timeout=CONVERGE_TIMEOUT)

        hold_the_writer(proxy, api, namespace)
        delete_configmap(api, namespace, "c")
        put_configmap(api, namespace, "c", DATA, {"c.json": '{"c": 1}'})
        proxy.release()
        converge(api, secure_opa, namespace, selector, timeout=30)


def test_the_readiness_marker_is_never_written_into_an_opa_missing_a_module(
    run_kopa: KopaFactory, secure_opa: OpaServer, kube: KubeCluster, namespace: str
) -> None:
    """kopa must not tell OPA it is ready while OPA lacks a module kopa loaded.

    Found by the restart scenario (now and then, the marker appeared in an OPA that lacked the module that
    never changes). If OPA restarts while kopa is loading it, the rest of the load goes to the new OPA
    (the client retries the refused connection into it), and the marker follows before the watchdog has
    noticed the restart: the new OPA says ready without the modules loaded before the restart. A check of
    OPA's process id before writing the marker would catch it. Here the proxy holds the load at its
    second module while OPA restarts, and holds the marker's write so the test can look at OPA right then;
    the one-minute check interval keeps the watchdog from noticing (the default 1 s leaves a shorter
    window of the same kind).
    """
    api = KubeRest(kube)
    tag = "f" + namespace.replace("-", "")
    for name in ("a", "b"):  # listed in name order, so kopa loads a first
        put_configmap(api, namespace, name, POLICY, {"p.rego": f"package {tag}.{name}\n\nv := 1\n"})
    with FaultProxy(*proxy_settings(secure_opa), rates=NO_FAULTS, seed=SEED) as proxy:
        proxy.hold("b", ["PUT"], f"/v1/policies/{namespace}/b/")
        run_kopa(*production_args(f"{proxy.url}/v1", secure_opa, namespace), "--opa-check-interval=1m")
        wait_until(lambda: proxy.held("b"), timeout=30, what="kopa's load held at module b")
        assert secure_opa.http().request("GET", f"/v1/policies/{namespace}/a/p.rego")[0] == 200
        secure_opa.kill()
        secure_opa.start()  # empty: module a is gone
        proxy.hold("marker", ["PUT"], "/v1/data/system/kopa")
        proxy.release("b")
        wait_until(lambda: proxy.held("marker"), timeout=CONVERGE_TIMEOUT, what="kopa writing its marker")
        held = {p["id"] for p in secure_opa.http().get_json("/v1/policies")["result"]}
        proxy.release()
        assert f"{namespace}/a/p.rego" in held, f"kopa declared OPA ready while it held only {sorted(held)}"


def test_a_valid_policy_is_not_reported_failed_because_opa_restarted(
    run_kopa: KopaFactory, secure_opa: OpaServer, kube: KubeCluster, namespace: str
) -> None:
    """A restart kopa has not noticed yet must not turn a valid policy's status into an error.

    Found by the restart scenario (dozens of LoadFailed Warnings on valid policies, each "recovered" a
    moment later). Between OPA's restart and the watchdog's next check, kopa writes changed modules into
    the new, empty OPA; a module that imports another then fails to compile ("undefined function"), and
    kopa reports that on the ConfigMap and in an Event as if the user's policy were broken. With the
    default 1 s check interval the window is up to a second (longer under load); a one-minute interval
    makes it certain here.
    """
    api = KubeRest(kube)
    tag = "f" + namespace.replace("-", "")
    lib = {"lib.rego": f"package {tag}.lib\n\ntwice(x) := x * 2\n"}

    def user(n: int) -> dict[str, str]:
        return {"user.rego": f"package {tag}.user\n\nimport data.{tag}.lib\n\nv := lib.twice({n})\n"}

    run_kopa(
        f"--opa-url={secure_opa.api_url}",
        f"--opa-auth-token-file={secure_opa.token_file}",
        f"--opa-ca-file={secure_opa.ca_file}",
        f"--namespaces={namespace}",
        "--opa-check-interval=1m",
    )
    put_configmap(api, namespace, "lib", POLICY, lib)
    put_configmap(api, namespace, "user", POLICY, user(1))
    converge(api, secure_opa, namespace, f"{FAULT_LABEL}={namespace}", timeout=CONVERGE_TIMEOUT)

    secure_opa.kill()
    secure_opa.start()
    put_configmap(api, namespace, "user", POLICY, user(2))

    def handled() -> bool:
        status, _ = status_and_failures(api, namespace, "user")
        held = secure_opa.http().request("GET", f"/v1/policies/{namespace}/user/user.rego")[1]
        loaded = isinstance(held, dict) and (held.get("result") or {}).get("raw") == user(2)["user.rego"]
        return status != OK or loaded

    wait_until(handled, timeout=CONVERGE_TIMEOUT, what="kopa handling the change to user")
    status, failures = status_and_failures(api, namespace, "user")
    assert status == OK and not failures, f"a valid policy was reported failed: {status}; events: {failures}"


# --- secrets ----------------------------------------------------------------------------------------------


def test_no_token_appears_in_anything_kopa_printed(
    run_kopa: KopaFactory,
    secure_opa: OpaServer,
    kube: KubeCluster,
    namespace: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Every kopa log of the session so far (all at debug level), against every token of the session.

    Its own kopa first goes through the paths most likely to print a token: loads, a failing policy, and
    a rotated token that OPA refuses (401s) and then accepts again. The session fixture above repeats the
    search over the whole run's logs at the very end.
    """
    assert secure_opa.token is not None
    # Named *token, so the search below takes what it holds for a secret too.
    token_file = tmp_path_factory.mktemp("rotation") / "rotated-token"
    token_file.write_text(secure_opa.token + "\n")
    args = production_args(secure_opa.api_url, secure_opa, namespace)
    kopa = run_kopa(
        *[a for a in args if not a.startswith("--opa-auth-token-file")], f"--opa-auth-token-file={token_file}"
    )
    api = KubeRest(kube)
    put_configmap(
        api, namespace, "p", POLICY, {"p.rego": f"package f{namespace.replace('-', '')}\n\nx := 1\n"}
    )
    put_configmap(api, namespace, "broken", POLICY, {"p.rego": "package broken\n\nnot rego {\n"})
    wait_until(
        lambda: (
            status_and_failures(api, namespace, "p")[0] == OK
            and status_and_failures(api, namespace, "broken")[1]
        ),
        timeout=CONVERGE_TIMEOUT,
        what="p loaded and broken reported",
    )
    refused = "refused-" + secure_opa.token[::-1]
    token_file.write_text(refused + "\n")
    put_configmap(
        api, namespace, "q", POLICY, {"p.rego": f"package q{namespace.replace('-', '')}\n\nx := 1\n"}
    )
    wait_log(kopa, "OPA refuses kopa's credentials")
    token_file.write_text(secure_opa.token + "\n")
    wait_until(
        lambda: secure_opa.http().request("GET", f"/v1/policies/{namespace}/q/p.rego")[0] == 200,
        timeout=CONVERGE_TIMEOUT,
        what="kopa loading again once the token is right",
    )
    scan = scan_for_secrets(tmp_path_factory.getbasetemp(), [*kube.tokens.values(), refused])
    assert scan.secrets >= len(kube.tokens) + 2, "the OPA tokens were not found to search for"
    assert not scan.leaks, "\n".join(scan.leaks)
