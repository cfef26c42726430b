"""Randomized differential test: whatever happens, kopa brings OPA back to what the cluster says.

The promise tested: after any sequence of changes to policies, data and replicated objects, mixed with
faults, OPA (read over its REST API) equals a fresh list from the API server, object by object
(tests/faults/state.py says exactly what "equal" means; kopa's own copy is never consulted), and kopa
stayed healthy all along: its `/healthz` answered 200 every time a background thread asked (a 503 would
have made the kubelet restart it), and its process never exited.

One run: kopa against the production-shape OPA (TLS, token authz; kopa reads its token from a file of its
own, see `token-refused`), replicating ConfigMaps and Services that carry the workload's label
(tests/faults/workload.py). Each step draws an op kind from the enabled OPS with a seeded generator and
applies it; after every fault, and after a random tenth of the other steps, the test waits (with a
deadline, never a fixed sleep) until OPA equals a fresh list, and records how long that took. At the end
it waits once more and then compares again: 0 differences.

Op kinds (the names KOPA_DIFF_OPS takes):

- changes (tests/faults/workload.py applies them): `policy-update`, `policy-keys` (a key added or
  removed), `data-update`, `data-keys`, `replica-update` (a ConfigMap only replicated), `service-update`
  (a replicated Service), `delete-or-create` (any of them deleted, or created again), `label-toggle` (kopa's
  label removed or put back), `policy-data-switch` (policy <-> data), `both-labels` (the policy label
  added to or removed from a data ConfigMap: data wins, as in kube-mgmt);
- faults: `opa-restart` (SIGKILL, then started at once or after some changes), `kopa-restart` (kopa
  SIGKILLed or stopped, changes made while no kopa runs, then a new kopa beside the same OPA),
  `apiserver-restart`
  (SIGKILL or SIGTERM, then started against the same etcd; capped, it costs seconds on 2 cores),
  `token-refused` (kopa's token file made wrong until OPA has refused kopa a few times, changes going on
  meanwhile, then right again);
- writes into OPA behind kopa's back, with OPA's token: `drift-policy-put` (a module kopa owns changed),
  `drift-policy-delete` (one deleted), `drift-data-put` (a document kopa owns changed),
  `drift-replica-delete` (the namespace's replicated ConfigMaps deleted).

Kinds in PENDING_FIXES fail on today's kopa and are left out unless named in KOPA_DIFF_OPS.

Environment:

- `KOPA_DIFF_SEED`: the seed (default SEED). The ops, and everything each op draws, depend only on the
  seed and on the enabled kinds, never on timing, so a seed replays the same sequence.
- `KOPA_DIFF_OPS`: comma-separated op kinds, or `all`; default: every kind but PENDING_FIXES.
- `KOPA_DIFF_STEPS`: how many steps (default STEPS, or unbounded when KOPA_DIFF_MINUTES is set).
- `KOPA_DIFF_MINUTES`: steps until this many minutes have passed, then writes the figures into
  docs/reliability.md (its own section): what `make soak` does (SOAK_MINUTES, default 30).

A failure says the seed, the kinds and the step it failed at, how to replay it, and the step log, e.g.:

    KOPA_DIFF_SEED=7 KOPA_DIFF_OPS=all KOPA_DIFF_STEPS=42 .venv/bin/python -m pytest \\
        tests/integration/test_differential.py
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType

import pytest

from devstack.kopa import KopaProcess
from devstack.kube import KubeCluster
from devstack.opa import OpaServer
from devstack.processes import http_status, wait_until
from tests.faults.report import Soak, write_soak
from tests.faults.state import CONFIGMAPS, SERVICES, cluster_state, converge, differences, opa_state
from tests.faults.workload import Workload
from tests.integration.conftest import KopaFactory
from tests.integration.helpers import apiserver_restored, secure_args

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Op:
    name: str
    weight: int  # how often it is drawn, relative to the others
    change: str = ""  # the workload's kind of change it applies; "" for a fault (a method of Run)


OPS: tuple[Op, ...] = (
    Op("policy-update", 4, "update policy"),
    Op("policy-keys", 2, "add or remove a policy key"),
    Op("data-update", 3, "update data"),
    Op("data-keys", 2, "add or remove a data key"),
    Op("replica-update", 2, "update replicated-only"),
    Op("service-update", 2, "update a service"),
    Op("delete-or-create", 3, "delete or recreate"),
    Op("label-toggle", 2, "remove or restore the kopa label"),
    Op("policy-data-switch", 2, "switch between policy and data"),
    Op("both-labels", 1, "add or remove the policy label on data (data wins)"),
    Op("opa-restart", 1),
    Op("kopa-restart", 1),
    Op("apiserver-restart", 1),
    Op("token-refused", 1),
    Op("drift-policy-put", 1),
    Op("drift-policy-delete", 1),
    Op("drift-data-put", 1),
    Op("drift-replica-delete", 1),
)

# Op kinds that fail on today's main, left out of the default run so that it passes. Remove an entry when
# the fix it waits for lands (and the test then covers it):
PENDING_FIXES: frozenset[str] = frozenset()  # kinds kopa is known to fail today: none

SEED = 1
DRIFT_CHECK_INTERVAL = "1s"
STEPS = 400  # the CI run: about 2 minutes here (2 cores), kopa's and OPA's start included
CHECK_CHANCE = 0.1  # after a step that is not a fault, the chance of a comparison
CONVERGE_TIMEOUT = 60.0  # covers kopa's capped backoffs (OPA writes, status writes)
# An API server start (seconds here) plus kopa's watch backoff, which is capped at 30 s.
RESUME_TIMEOUT = 120.0
APISERVER_RESTARTS_EVERY = 10 * 60.0  # at most one per 10 minutes of soak, and one in the CI run
REFUSALS_TIMEOUT = 120.0
DRIFT = "# written into OPA behind kopa's back\n"


def _env(name: str) -> str:
    return os.environ.get(f"KOPA_DIFF_{name}", "").strip()


def enabled_ops() -> tuple[Op, ...]:
    """KOPA_DIFF_OPS's kinds (`all`: every kind), or by default every kind but PENDING_FIXES."""
    given = _env("OPS")
    if not given:
        return tuple(op for op in OPS if op.name not in PENDING_FIXES)
    names = {n.strip() for n in given.split(",") if n.strip()}
    if names == {"all"}:
        return OPS
    unknown = names - {op.name for op in OPS}
    if unknown:
        raise ValueError(
            f"unknown op kinds in KOPA_DIFF_OPS: {sorted(unknown)}; known: {[o.name for o in OPS]}"
        )
    return tuple(op for op in OPS if op.name in names)


MINUTES = float(_env("MINUTES") or 0)  # > 0: the soak


# --- kopa's liveness, watched from a thread ----------------------------------------------------------------


class Liveness:
    """Asks kopa's /healthz every `interval` seconds while the run goes on; keeps every answer but 200.
    While the run restarts kopa itself (`swapping`), nothing is asked."""

    def __init__(self, kopa: KopaProcess, interval: float = 0.25) -> None:
        self.kopa = kopa
        self.interval = interval
        self.polls = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()  # held by each poll, and by a swap of kopa
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(self.interval):
            at = f"at {time.monotonic() - started:.1f} s"
            with self._lock:
                if not self.kopa.running:
                    self.failures.append(f"{at}: kopa exited with {self.kopa.returncode}")
                    return
                try:
                    status, body = http_status(f"{self.kopa.health_url}/healthz", timeout=5.0)
                except OSError as exc:
                    self.failures.append(f"{at}: no answer ({exc!r})")
                    continue
                self.polls += 1
                if status != 200:
                    self.failures.append(f"{at}: HTTP {status}: {body[:300]!r}")

    @contextlib.contextmanager
    def swapping(self) -> Iterator[None]:
        """No polls while kopa is stopped on purpose and a new one started (set as `kopa` meanwhile)."""
        with self._lock:
            yield

    def __enter__(self) -> Liveness:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def refusals(kopa: KopaProcess) -> int:
    """How many of kopa's requests OPA refused (401/403), from kopa's own /metrics."""
    _, body = http_status(f"{kopa.health_url}/metrics", timeout=5.0)
    found = re.findall(rb'^kopa_opa_requests_total\{[^}]*code="40[13]"[^}]*\} (\S+)$', body, re.MULTILINE)
    return int(sum(float(n) for n in found))


# --- one run ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    """The steps of one seeded run, what they did, and the comparisons made along the way."""

    seed: int
    ops: tuple[Op, ...]
    workload: Workload
    opa: OpaServer
    kube: KubeCluster
    kopa: KopaProcess
    token_file: Path
    liveness: Liveness
    start_kopa: Callable[[], KopaProcess]
    rng: random.Random = field(init=False)
    log: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    converged: dict[str, list[float]] = field(default_factory=dict)
    checks: int = 0
    apiserver_cap: int = 1

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    @property
    def steps(self) -> int:
        return sum(self.counts.values())

    @property
    def faults(self) -> int:
        return sum(n for name, n in self.counts.items() if not self._op(name).change)

    def _op(self, name: str) -> Op:
        return next(op for op in OPS if op.name == name)

    def draw(self) -> Op:
        ops = [
            op
            for op in self.ops
            if op.name != "apiserver-restart" or self.counts[op.name] < self.apiserver_cap
        ]
        return self.rng.choices(ops, [op.weight for op in ops])[0]

    def change(self) -> str:
        """Applies one change of an enabled kind (none enabled: one drawn from the workload's own mix)."""
        changes = [op for op in self.ops if op.change]
        if not changes:
            return self.workload.step()
        return self.workload.step(self.rng.choices(changes, [op.weight for op in changes])[0].change)

    def step(self) -> None:
        op = self.draw()
        check = self.rng.random() < CHECK_CHANCE  # drawn every step, so the sequence never depends on it
        self.log.append(f"{self.steps + 1:5d} {op.name}: ")
        self.counts[op.name] += 1
        if op.change:
            self.log[-1] += self.workload.step(op.change)
        else:
            self.log[-1] += getattr(self, "op_" + op.name.replace("-", "_"))()
        if not op.change or check:
            self.check("changes" if op.change else op.name)

    def check(self, after: str, timeout: float = CONVERGE_TIMEOUT) -> None:
        """Waits until OPA equals a fresh list; records how long that took after `after`."""
        assert self.kopa.running, f"kopa exited with {self.kopa.returncode}"
        assert not self.liveness.failures, "kopa's /healthz failed:\n" + "\n".join(self.liveness.failures)
        if after == "apiserver-restart":
            timeout = RESUME_TIMEOUT
        workload = self.workload
        end = converge(
            workload.api,
            self.opa,
            workload.namespace,
            workload.selector,
            timeout=timeout,
            replicated=REPLICATED,
        )
        self.checks += 1
        self.converged.setdefault(after, []).append(end.seconds)
        self.log.append(f"      equal after {end.seconds:.2f} s ({end.compared.size()} objects)")

    # faults

    def changes(self, count: int) -> str:
        """Applies `count` changes of the enabled kinds; their lines for the step log."""
        return "".join(f"\n        {self.change()}" for _ in range(count))

    def op_opa_restart(self) -> str:
        down_for = self.rng.choice([0, 0, 1, 3])  # changes made while OPA is down
        self.opa.kill()
        done = self.changes(down_for)
        self.opa.start()
        return f"SIGKILL, started again after {down_for} changes{done}"

    def op_kopa_restart(self) -> str:
        """The sidecar restarts (a crash, an OOM kill, a new image), OPA runs on with what it holds."""
        how = self.rng.choice(["SIGKILL", "SIGTERM"])
        down_for = self.rng.randint(1, 4)  # changes made while no kopa runs
        with self.liveness.swapping():
            if how == "SIGKILL":
                self.kopa.kill()
                self.kopa.expected_exit = -signal.SIGKILL
            else:
                assert self.kopa.stop() == 0, self.kopa.tail_log(30)
            done = self.changes(down_for)
            self.kopa = self.liveness.kopa = self.start_kopa()
            # Polled again, and stopped by a later restart, once it serves its probes.
            wait_until(
                lambda: http_status(f"{self.kopa.health_url}/healthz")[0] == 200,
                timeout=CONVERGE_TIMEOUT,
                what="the new kopa's /healthz",
                process=self.kopa,
            )
        return f"{how}, a new kopa after {down_for} changes{done}"

    def op_apiserver_restart(self) -> str:
        how = self.rng.choice(["SIGKILL", "SIGTERM"])
        after = self.rng.randint(1, 3)  # changes made at once: kopa must watch again to see them
        started = time.monotonic()
        with apiserver_restored(self.kube):
            if how == "SIGKILL":
                self.kube.apiserver.kill()
            else:
                self.kube.stop_apiserver()
            self.kube.start_apiserver()
        took = time.monotonic() - started
        return f"{how}, ready again after {took:.1f} s, then {after} changes{self.changes(after)}"

    def op_token_refused(self) -> str:
        """kopa's token file made wrong until OPA has refused kopa `wanted` times, then right again;
        changes go on meanwhile, and OPA is sometimes restarted while it refuses kopa."""
        right = self.token_file.read_text()
        before = refusals(self.kopa)
        wanted = self.rng.choice([1, 2, 3, 5, 10, 20])
        count = self.rng.randint(1, 4)
        restart = self.rng.random() < 0.25
        self.token_file.write_text("refused-" + right[::-1])
        try:
            done = self.changes(count)
            wait_until(
                lambda: refusals(self.kopa) >= before + wanted,
                timeout=REFUSALS_TIMEOUT,
                what=f"OPA refusing kopa's token {wanted} times",
            )
            if restart:
                self.opa.kill()
                self.opa.start()
        finally:
            self.token_file.write_text(right)
        again = ", OPA restarted meanwhile" if restart else ""
        return f"refused {wanted} times{again}, {count} changes meanwhile{done}"

    # writes into OPA behind kopa's back

    def _pick(self, kind: str) -> str | None:
        """A ConfigMap the cluster has as `kind` now (policy or data), or None."""
        names = sorted(
            name
            for name, m in self.workload.members.items()
            if m.exists and m.labelled and m.kind == kind and not (kind == "policy" and m.both)
        )
        return self.rng.choice(names) if names else None

    def op_drift_policy_put(self) -> str:
        name = self._pick("policy")
        if name is None:
            return "no policy to change"
        text = self.workload.content(name, self.workload.members[name])["m.rego"] + DRIFT
        self.opa.http().put(f"/v1/policies/{self.workload.namespace}/{name}/m.rego", text)
        return f"{name}/m.rego changed in OPA"

    def op_drift_policy_delete(self) -> str:
        name = self._pick("policy")
        if name is None:
            return "no policy to delete"
        status, _ = self.opa.http().request("DELETE", f"/v1/policies/{self.workload.namespace}/{name}/m.rego")
        return f"{name}/m.rego deleted from OPA (HTTP {status})"

    def op_drift_data_put(self) -> str:
        name = self._pick("data")
        if name is None:
            return "no data to change"
        self.opa.http().put(f"/v1/data/{self.workload.namespace}/{name}/d.json", {"written": DRIFT})
        return f"{name}/d.json changed in OPA"

    def op_drift_replica_delete(self) -> str:
        status, _ = self.opa.http().request(
            "DELETE", f"/v1/data/kubernetes/configmaps/{self.workload.namespace}"
        )
        return f"data.kubernetes.configmaps.<namespace> deleted from OPA (HTTP {status})"

    # the story, for a failure

    def replay(self, failure: BaseException, log_file: Path) -> str:
        names = ",".join(op.name for op in self.ops)
        minutes = f"KOPA_DIFF_MINUTES={MINUTES:g} " if MINUTES else ""  # it sets the API server's cap
        shown = self.log[-80:]
        return (
            f"{failure}\n\n"
            f"seed {self.seed}, failed at step {self.steps}; replay with:\n"
            f"  KOPA_DIFF_SEED={self.seed} KOPA_DIFF_OPS={names} KOPA_DIFF_STEPS={self.steps} {minutes}"
            ".venv/bin/python -m pytest tests/integration/test_differential.py\n"
            f"liveness failures: {self.liveness.failures or 'none'}\n"
            f"step log ({len(self.log)} lines, all in {log_file}; the last {len(shown)}):\n"
            + "\n".join(shown)
        )


REPLICATED = (CONFIGMAPS, SERVICES)


def kopa_args(opa: OpaServer, workload: Workload, token_file: Path) -> list[str]:
    """kopa for the production-shape OPA, its token read from `token_file`, replicating both resources."""
    args = [a for a in secure_args(opa, workload.namespace) if not a.startswith("--opa-auth-token-file=")]
    for resource in REPLICATED:
        gvr = f"v1/{resource.plural}"
        args += [f"--replicate={gvr}", f"--replicate-selector={gvr}={workload.selector}"]
    # The drift check repairs writes made behind kopa's back; at its default (60 s) a comparison would wait.
    return [*args, f"--opa-auth-token-file={token_file}", f"--drift-check-interval={DRIFT_CHECK_INTERVAL}"]


def load_failures(workload: Workload) -> list[str]:
    """The LoadFailed Events in the workload's namespace: none, since all its input is valid (a refused
    token or a restarted OPA is never the ConfigMap's fault)."""
    events = workload.api.get(f"/apis/events.k8s.io/v1/namespaces/{workload.namespace}/events")["items"]
    return [
        f"{(e.get('regarding') or {}).get('name')}: {e.get('note')}"
        for e in events
        if e.get("reason") == "LoadFailed"
    ]


def _timeout() -> float:
    return MINUTES * 60 + 600 if MINUTES else 600


@pytest.mark.timeout(_timeout())
def test_opa_equals_the_cluster_after_random_changes_and_faults(
    run_kopa: KopaFactory, secure_opa: OpaServer, kube: KubeCluster, namespace: str, tmp_path: Path
) -> None:
    seed = int(_env("SEED") or SEED)
    steps = int(_env("STEPS") or (0 if MINUTES else STEPS))  # 0: until the minutes are up
    workload = Workload(kube, namespace, seed=seed, size=4, services=3)
    workload.setup()
    assert secure_opa.token is not None
    token_file = tmp_path / "kopa-token"
    token_file.write_text(secure_opa.token + "\n")
    start_kopa = partial(run_kopa, *kopa_args(secure_opa, workload, token_file))
    kopa = start_kopa()
    converge(
        workload.api,
        secure_opa,
        namespace,
        workload.selector,
        timeout=CONVERGE_TIMEOUT,
        replicated=REPLICATED,
    )

    log_file = tmp_path / "steps.log"
    started = time.monotonic()
    deadline = started + MINUTES * 60 if MINUTES else float("inf")
    with Liveness(kopa) as liveness:
        run = Run(seed, enabled_ops(), workload, secure_opa, kube, kopa, token_file, liveness, start_kopa)
        run.apiserver_cap = max(1, int(MINUTES * 60 // APISERVER_RESTARTS_EVERY))
        try:
            while (not steps or run.steps < steps) and time.monotonic() < deadline:
                run.step()
            run.check("end")
            expected = cluster_state(workload.api, namespace, workload.selector, REPLICATED)
            found = differences(expected, opa_state(secure_opa, namespace, REPLICATED))
            assert not found, "OPA drifted from the cluster after it had matched:\n" + "\n".join(found)
            failed = load_failures(workload)
            assert not failed, "LoadFailed Events, although every input was valid:\n" + "\n".join(failed)
        except Exception as exc:
            log_file.write_text("\n".join(run.log) + "\n")
            raise AssertionError(run.replay(exc, log_file)) from None
    log_file.write_text("\n".join(run.log) + "\n")
    print(
        f"\nseed {seed}: {run.steps} steps ({run.faults} faults), {run.checks} comparisons; log in {log_file}"
    )
    assert run.kopa.running, f"kopa exited with {run.kopa.returncode}"
    assert liveness.polls > 0, "kopa's /healthz was never asked"
    assert not liveness.failures, f"kopa's /healthz failed (seed {seed}):\n" + "\n".join(liveness.failures)
    if MINUTES:
        soak = Soak(
            seed=seed,
            seconds=time.monotonic() - started,
            steps=run.steps,
            ops=run.counts.copy(),
            faults=run.faults,
            checks=run.checks,
            converged=run.converged,
            differences=len(found),
            liveness_failures=len(liveness.failures),
            left_out=sorted({op.name for op in OPS} - {op.name for op in run.ops}),
        )
        print(f"\nsoak: wrote {write_soak(soak)}")
