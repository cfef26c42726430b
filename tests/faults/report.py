"""The figures of the fault-injection suite, and docs/reliability.md written from them.

The tests of tests/integration/test_faults.py and test_bad_input.py record what they tried into REPORT (one
per pytest process) as they go. At the end of the session, test_faults.py's session fixture writes
docs/reliability.md, but only after a full run of both modules in which every one of their tests passed:
a partial run (-k, one file) or a failing one leaves the committed file alone and says so.

`make soak` (tests/integration/test_differential.py run for SOAK_MINUTES) writes its own section, the last
one of the document, with write_soak(); each writer keeps the other's part of the file as it is.
"""

from __future__ import annotations

import os
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devstack.binaries import read_versions, repo_root

DOC = Path("docs") / "reliability.md"
SOAK_HEADING = "## Randomized differential soak"  # the soak's section, always the last of the document
MODULES = ("test_faults", "test_bad_input")  # the modules whose tests the document reports


@dataclass(frozen=True)
class OpaRestart:
    mode: str  # how OPA went down and came back
    down_seconds: float  # from SIGKILL until the new OPA answered /health
    ready_seconds: float | None  # from /health answering until kopa's marker said ready (None: killed again)
    core_complete: bool  # when the marker appeared, OPA held the ConfigMaps that never change


@dataclass(frozen=True)
class ApiOutage:
    how: str
    down_seconds: float  # from the kill or stop until /readyz answered again
    resume_seconds: float  # from /readyz answering until a change made then was in OPA


@dataclass(frozen=True)
class Scenario:
    name: str
    changes: Counter[str]  # workload changes applied, by kind
    retries: int  # workload calls that failed because the API server was down, and were repeated
    converge_seconds: float  # from the end of the stream until OPA equalled a fresh list
    compared: int  # objects compared at the end: policies + data documents + replicated objects
    differences: int  # left after convergence: always 0 in a passing run
    false_alarms: int  # LoadFailed Events recorded although every input was valid


@dataclass(frozen=True)
class BadInput:
    what: str
    reported: str  # what kopa said on the ConfigMap (or what happened)


@dataclass(frozen=True)
class SecretScan:
    logs: int
    bytes: int
    secrets: int
    leaks: list[str]


@dataclass
class Reliability:
    restarts: list[OpaRestart] = field(default_factory=list)
    outages: list[ApiOutage] = field(default_factory=list)
    scenarios: list[Scenario] = field(default_factory=list)
    proxy: dict[str, Any] = field(default_factory=dict)
    bad_inputs: list[BadInput] = field(default_factory=list)
    scan: SecretScan | None = None

    def bad_input(self, what: str, reported: str) -> None:
        self.bad_inputs.append(BadInput(what, " ".join(reported.split())))

    # rendering

    def render(self) -> str:
        versions = read_versions()
        ready = [r.ready_seconds for r in self.restarts if r.ready_seconds is not None]
        down = [r.down_seconds for r in self.restarts]
        counts = self.proxy.get("counts", {})
        rates = self.proxy.get("rates", {})
        injected = sum(int(counts.get(k, 0)) for k in ("error_500", "reset_before", "reset_after"))
        updates = sum(sum(s.changes.values()) for s in self.scenarios)
        differences = sum(s.differences for s in self.scenarios)
        lines = [
            "# Reliability",
            "",
            "<!-- Written by the fault-injection suite (tests/integration/test_faults.py and",
            "     test_bad_input.py) at the end of every full run in which all their tests pass, except",
            "     the last section, which `make soak` writes. Do not edit by hand. -->",
            "",
            _para(f"""What kopa was put through on the last full run of its fault-injection suite, and how it
                came out. Everything ran as real processes on loopback: etcd and kube-apiserver
                {versions.get("KUBERNETES_VERSION", "?")}, OPA {versions.get("OPA_VERSION", "?")} in the
                production shape (TLS from a test CA, bearer-token authentication, a `system.authz` policy),
                and kopa with `--opa-auth-token-file` and `--opa-ca-file`, on a machine with
                {os.cpu_count()} CPUs."""),
            "",
            "## Summary",
            "",
            "| | |",
            "|---|---|",
            f"| OPA restarts survived (SIGKILL, during a stream of updates) | {len(self.restarts)} |",
            f"| time from OPA's restart to kopa's readiness marker (min / median / max) | {_spread(ready)} |",
            f"| API server outages survived (SIGKILL and SIGTERM, during updates) | {len(self.outages)} |",
            f"| faults injected between kopa and OPA (HTTP 500s, connection resets) | {injected} |",
            f"| updates applied while faults were injected | {updates} |",
            f"| bad inputs tried | {len(self.bad_inputs)} |",
            f"| differences between OPA and the cluster at the end | {differences} |",
            "",
            "## How the end state is compared",
            "",
            _para("""At the end of each scenario the stream of updates stops and the suite waits until OPA,
                read over its REST API, equals a fresh list from the API server, object by object; it never
                looks at kopa's own copy. Policies: the ids under the test's namespace and each module's raw
                text, byte for byte. Data: every document under `data.<namespace>` against the parsed JSON
                of every key of every data ConfigMap. Replicated objects: `data.kubernetes.configmaps` against
                the ConfigMaps the replication selector matches, with `kind` and `apiVersion` filled in,
                `metadata.managedFields` dropped and `metadata.resourceVersion` ignored on both sides (kopa
                skips writes whose only change is the resourceVersion). Status: every selected ConfigMap says
                `{"status":"ok"}`. Once they match, a second fresh comparison gives the differences
                below."""),
            "",
            "| scenario | updates | API calls repeated | converged after | objects compared | differences "
            "| LoadFailed Events (all input valid) |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in self.scenarios:
            lines.append(
                f"| {s.name} | {sum(s.changes.values())} | {s.retries} | {s.converge_seconds:.2f} s "
                f"| {s.compared} | {s.differences} | {s.false_alarms} |"
            )
        kinds = Counter[str]()
        for s in self.scenarios:
            kinds.update(s.changes)
        lines += ["", "Updates by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + "."]
        lines += [
            "",
            "## OPA killed and restarted",
            "",
            _para("""OPA is killed with SIGKILL while the updates go on, in three ways in turn: restarted at
                once (faster than kopa's 1 s check interval), kept down while updates go on, and killed
                again while kopa is refilling it. Readiness is measured from the moment the new OPA answers
                `/health` until `data.system.kopa.ready` is true; at that moment OPA must already hold the
                ConfigMaps that never change (the refill is done before the marker is written)."""),
            "",
            f"- restarts: {len(self.restarts)}; OPA down for {_spread(down)} (kill until `/health` answers)",
            f"- readiness after a restart: {_spread(ready)} over {len(ready)} measured restarts",
            f"- killed again during a refill: {sum(1 for r in self.restarts if r.ready_seconds is None)}",
            "- unchanged ConfigMaps complete when the marker appeared: "
            f"{sum(r.core_complete for r in self.restarts if r.ready_seconds is not None)} of {len(ready)}",
            "",
            "| # | how | down | ready after |",
            "|---|---|---|---|",
        ]
        for i, r in enumerate(self.restarts, 1):
            after = f"{r.ready_seconds:.2f} s" if r.ready_seconds is not None else "killed again"
            lines.append(f"| {i} | {r.mode} | {r.down_seconds:.2f} s | {after} |")
        lines += [
            "",
            "## API server killed and stopped",
            "",
            _para("""The API server is killed (SIGKILL) or stopped (SIGTERM) while the updates go on, then
                started again against the same etcd. Resumed: from `/readyz` answering until a ConfigMap
                changed at that moment is in OPA (kopa's watches back off while the API server is
                away)."""),
            "",
            "| # | how | down | resumed after |",
            "|---|---|---|---|",
        ]
        for i, o in enumerate(self.outages, 1):
            lines.append(f"| {i} | {o.how} | {o.down_seconds:.2f} s | {o.resume_seconds:.2f} s |")
        lines += [
            "",
            "## A faulty link to OPA",
            "",
            _para(f"""kopa talks to OPA through a loopback proxy that terminates TLS with a certificate from
                the test CA and forwards to OPA over TLS, drawing a fault per request from a seeded generator
                (seed {self.proxy.get("seed", "?")}): latency up to {rates.get("max_latency", "?")} s for
                {_pct(rates.get("latency"))} of requests, and, exclusively, an HTTP 500 from the proxy
                ({_pct(rates.get("error_500"))}), a connection reset before OPA sees the request
                ({_pct(rates.get("reset_before"))}) or after OPA applied it, so the answer is lost
                ({_pct(rates.get("reset_after"))}). Faults go on until OPA equals the cluster."""),
            "",
            "| requests | delayed | HTTP 500 | reset before OPA | reset after OPA applied it |",
            "|---|---|---|---|---|",
            f"| {counts.get('requests', 0)} | {counts.get('latency', 0)} | {counts.get('error_500', 0)} "
            f"| {counts.get('reset_before', 0)} | {counts.get('reset_after', 0)} |",
            "",
            "## Bad input",
            "",
            _para("""Each is applied next to a healthy policy and data ConfigMap, which must stay loaded; kopa
                must not crash or log a traceback. What kopa wrote on the ConfigMap
                (`openpolicyagent.org/kube-mgmt-status`; each failure also gets a `LoadFailed` Event):"""),
            "",
            "| input | what kopa reported |",
            "|---|---|",
        ]
        lines += [f"| {_cell(b.what)} | {_cell(b.reported)} |" for b in self.bad_inputs]
        if self.scan is not None:
            lines += [
                "",
                "## Secrets in kopa's output",
                "",
                _para(f"""Every log kopa wrote during the run ({self.scan.logs} files,
                    {self.scan.bytes / 1e6:.1f} MB, at debug level) was searched for every OPA and API server
                    token of the run ({self.scan.secrets} secrets): {len(self.scan.leaks)} found."""),
            ]
        return "\n".join(lines) + "\n"


def _para(text: str) -> str:
    """One paragraph on one line (Markdown does not care; diffs of the document stay readable)."""
    return " ".join(text.split())


def _spread(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f} s"


def _pct(rate: object) -> str:
    return f"{float(rate) * 100:.0f}%" if isinstance(rate, int | float) else "?"


def _cell(text: str) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 220 else text[:217] + "..."


REPORT = Reliability()


# --- secrets in kopa's output -------------------------------------------------------------------------------


def scan_for_secrets(root: Path, extra_secrets: Iterable[str]) -> SecretScan:
    """Searches every kopa log under `root` (kopa*.log) for every token file's token there and the extras.

    Token files are the secure OPAs' `opa-token` and the rotated `token` files the tests write.
    """
    secrets = {s for s in extra_secrets if len(s) >= 16}
    for path in root.rglob("*token"):
        if path.is_file():
            first = path.read_text(errors="replace").strip().splitlines()
            if first and len(first[0].strip()) >= 16:
                secrets.add(first[0].strip())
    logs = sorted(p for p in root.rglob("kopa*.log") if p.is_file())
    leaks: list[str] = []
    size = 0
    for log in logs:
        text = log.read_text(errors="replace")
        size += len(text)
        leaks += [f"{log}: a secret of {len(s)} characters" for s in secrets if s in text]
    return SecretScan(len(logs), size, len(secrets), leaks)


# --- the end of the session ---------------------------------------------------------------------------------


def _ours(item: pytest.Item) -> bool:
    module = getattr(item, "module", None)
    return module is not None and module.__name__.rsplit(".", 1)[-1] in MODULES


def full_run_passed(session: pytest.Session) -> tuple[bool, str]:
    """(True, "") when every test of both modules was selected and passed; else (False, why not)."""
    items = [item for item in session.items if _ours(item)]
    modules = {getattr(item, "module") for item in items}  # noqa: B009 - mypy: Item has no .module
    if {m.__name__.rsplit(".", 1)[-1] for m in modules} != set(MODULES):
        return False, "not every reliability module ran"
    defined = {
        (m.__name__, name)
        for m in modules
        for name, obj in vars(m).items()
        if name.startswith("test_") and callable(obj)
    }
    selected = {(getattr(i, "module").__name__, getattr(i, "originalname", i.name)) for i in items}  # noqa: B009
    if selected != defined:
        return False, "only some reliability tests were selected"
    reporter: Any = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return False, "no terminal reporter to tell which tests passed"
    passed = {r.nodeid for r in reporter.stats.get("passed", []) if r.when == "call"}
    missing = [i.nodeid for i in items if i.nodeid not in passed]
    if missing:
        return False, f"{len(missing)} reliability tests did not pass (e.g. {missing[0]})"
    return True, ""


def _split(path: Path) -> tuple[str, str]:
    """The document as it is now: (everything before the soak's section, the soak's section)."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    at = text.find(SOAK_HEADING)
    return (text, "") if at < 0 else (text[:at], text[at:])


def write_document(report: Reliability, root: Path | None = None) -> Path:
    """Writes the fault suite's part of the document, keeping the soak's section."""
    path = (root or repo_root()) / DOC
    soak = _split(path)[1]
    path.write_text(report.render() + ("\n" + soak if soak else ""), encoding="utf-8")
    return path


# --- the randomized differential soak (make soak) ----------------------------------------------------------


@dataclass
class Soak:
    """What one run of tests/integration/test_differential.py did, and how it came out."""

    seed: int
    seconds: float  # wall time of the steps and checks (kopa's and OPA's start not included)
    steps: int
    ops: Counter[str]  # steps by op kind
    faults: int  # steps that were faults (OPA or API server restarts, a refused token, writes behind kopa)
    checks: int  # comparisons of OPA with a fresh list, each waited for until equal
    converged: dict[str, list[float]]  # seconds until OPA matched, after each kind of fault ("changes": none)
    differences: int  # found by the last fresh comparison: always 0 in a passing run
    liveness_failures: int  # /healthz answers other than 200 (or none at all) while kopa ran
    left_out: list[str]  # op kinds not run (PENDING_FIXES, or KOPA_DIFF_OPS)

    def render(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.ops.items()))
        lines = [
            SOAK_HEADING,
            "",
            _para(f"""`make soak` ran the randomized differential test
                (tests/integration/test_differential.py) for {self.seconds / 60:.1f} minutes with seed
                {self.seed}: a seeded sequence of changes to policies, data and replicated objects
                (ConfigMaps and Services) mixed with faults, OPA compared after every fault, after some of
                the other steps and at the end with a fresh list from the API server (waiting until equal,
                then once more), and kopa's `/healthz` polled throughout. The same seed replays the same
                sequence: `KOPA_DIFF_SEED={self.seed} make soak`."""),
            "",
            "| | |",
            "|---|---|",
            f"| steps run | {self.steps} |",
            f"| faults injected | {self.faults} |",
            f"| comparisons with a fresh list (each waited for until equal) | {self.checks} |",
            f"| differences between OPA and the cluster at the end | {self.differences} |",
            f"| `/healthz` failures (kopa would have been restarted) | {self.liveness_failures} |",
            f"| seed | {self.seed} |",
            "",
            f"Steps by kind: {ops}.",
            "",
            f"Not run (left out by PENDING_FIXES or KOPA_DIFF_OPS): {', '.join(self.left_out) or 'none'}.",
            "",
            "| converged after | times | p50 | max |",
            "|---|---|---|---|",
        ]
        for kind, times in sorted(self.converged.items()):
            lines.append(f"| {kind} | {len(times)} | {statistics.median(times):.2f} s | {max(times):.2f} s |")
        return "\n".join(lines) + "\n"


def write_soak(soak: Soak, root: Path | None = None) -> Path:
    """Writes (or replaces) the soak's section at the end of the document, keeping the rest."""
    path = (root or repo_root()) / DOC
    before = _split(path)[0].rstrip("\n")
    path.write_text((before + "\n\n" if before else "") + soak.render(), encoding="utf-8")
    return path
