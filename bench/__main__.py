"""`python -m bench`: the benchmarks of issues 9 and 12, against a local etcd + kube-apiserver + OPA, in order
(the phase names of --only in brackets):

  0. kopa with nothing to replicate (its baseline memory) [load];
  1. initial load of N = 1,000, then 10,000 ConfigMaps, kopa against the floor and Go kube-mgmt (and 4:
     peak RSS) [load];
  6. initial load of 200 policy modules of which 10 fail for good: time, and the policy PUTs (compiles) it
     costs OPA, kopa and kube-mgmt; then the PUTs one later change costs kopa [policies];
  2. churn at each rate, with decisions asked of OPA meanwhile, kopa and kube-mgmt side by side, several
     trials [churn];
  3. policy propagation [propagation];
  5. refill after OPA is killed and restarted (and 4: peak RSS after all of it); whether kube-mgmt
     refills [refill];
  7. the drift check: its cost per check (kopa and OPA CPU, OPA requests), with it off and then every
     second, and the time it takes to repair a policy, a data document and a namespace deleted in OPA
     [drift];
  8. bundle mode: one kopa feeding 10 OPAs, a change's lag to all of them and the bytes it costs; the API
     server's watches and the sidecars' memory, 1 kopa for 10 OPAs against 10 push-mode sidecars (and 10
     kube-mgmts); load and refill time against the number of policy modules, bundle mode and push mode
     [bundle].

Go kube-mgmt runs side by side, with the same flags, when its binary is found: --kube-mgmt PATH, the
environment variable KOPA_BENCH_KUBE_MGMT, or the tools cache (`scripts/build-servers.sh kube-mgmt`).
Without it the bench says so and runs kopa alone.

Results go to <out>/benchmarks.json, <out>/benchmarks/*.png and the generated part of <out>/benchmarks.md.
A run of some phases (--only) replaces only their figures there and keeps the others'. `--quick` is a
short smoke run (N = 1,000 only, short churn, few trials, 20 bundle changes, 20-80 modules) that writes
to the work directory instead, so it never replaces the published figures.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench import bundle, churn, dataset, drift, load, modules, policies, propagation, refill, report
from bench.common import load_average, poll_until, proc_memory
from bench.stack import KUBE_MGMT, Stack, find_kube_mgmt, py_spy
from devstack.binaries import read_versions, repo_root

STARTED = time.monotonic()
MB = 2**20
PHASES = ("load", "policies", "churn", "propagation", "refill", "drift", "bundle")
# The phases that replicate the N ConfigMaps of bench/dataset.py (the others bring their own objects).
OBJECT_PHASES = {"load", "churn", "propagation", "refill", "drift"}


def log(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


def machine() -> dict[str, Any]:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": f"{platform.system()} {platform.release()}",
    }


def git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=repo_root(), capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def meta() -> dict[str, Any]:
    versions = read_versions()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "kopa": {
            "commit": git("rev-parse", "--short", "HEAD") or "unknown",
            "dirty": bool(git("status", "--porcelain", "app")),
        },
        "versions": {
            "python": platform.python_version(),
            "aiohttp": importlib.metadata.version("aiohttp"),
            "orjson": importlib.metadata.version("orjson"),
            "anyio": importlib.metadata.version("anyio"),
            "opa": versions.get("OPA_VERSION", "?"),
            "kubernetes": versions.get("KUBERNETES_VERSION", "?"),
            "etcd": versions.get("ETCD_VERSION", "?"),
        },
    }


def run_info() -> dict[str, Any]:
    """When and on what a phase ran: a phase's figures may be merged into those of an earlier run."""
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "kopa": meta()["kopa"],
        "load_average_start": load_average(),
        "started": time.monotonic(),
    }


def finished(info: dict[str, Any]) -> dict[str, Any]:
    started = info.pop("started")
    return {**info, "load_average_end": load_average(), "seconds": round(time.monotonic() - started, 1)}


async def create_objects(stack: Stack, start: int, stop: int) -> None:
    began = time.monotonic()
    async with stack.api() as api:
        for ns in sorted({dataset.namespace_of(i) for i in range(start, stop)}):
            await api.ensure_namespace(ns)
        objects = [dataset.configmap(i) for i in range(start, stop)]
        await api.create_all(objects, dataset.path_of)
    log(f"created ConfigMaps {start:,}..{stop - 1:,} in {time.monotonic() - began:.1f} s")


async def json_size(stack: Stack) -> dict[str, int]:
    async with stack.api() as api:
        items = await api.list_all("/api/v1/configmaps", dataset.FIELD_SELECTOR)
    return dataset.json_size(items)


async def idle_memory(stack: Stack) -> int:
    """Peak RSS of a kopa that replicates an empty collection (its baseline)."""
    kopa = stack.kopa("idle")
    kopa.start()
    try:
        async with stack.opa_client() as opa:

            async def marker() -> Any:
                return await opa.data("system/kopa/ready")

            await poll_until(marker, lambda v: v is True, interval=0.05, within=60, what="idle kopa ready")
        await asyncio.sleep(1.0)
        assert kopa.pid is not None
        return proc_memory(kopa.pid)["VmHWM"]
    finally:
        stack.stop_kopa(kopa)


async def run(opts: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    phases = set(opts.only)
    options = {k: v for k, v in vars(opts).items() if k not in ("out", "work", "profile", "kube_mgmt")}
    results: dict[str, Any] = {"meta": meta(), "options": options}
    results["meta"]["kube_mgmt"] = opts.kube_mgmt_found
    results["load_average"] = {"start": load_average()}
    sizes: list[int] = opts.sizes
    async with stack.api() as api:
        await api.ensure_namespace(dataset.POLICY_NAMESPACE)
    if stack.profile_dir is None and "load" in phases:
        results["kopa_idle_rss_bytes"] = await idle_memory(stack)
        log(f"idle kopa: peak RSS {results['kopa_idle_rss_bytes'] / 2**20:.0f} MB")

    results["initial_load"] = []
    results["memory"] = []
    created = 0
    wanted = sizes if "load" in phases else sizes[-1:] if phases & OBJECT_PHASES else []
    for n in wanted:
        await create_objects(stack, created, n)
        created = n
        if "load" not in phases:
            break
        size = await json_size(stack)
        log(f"N={n}: replicated JSON {size['collection_bytes'] / MB:.1f} MB; initial load runs")
        result = await load.initial_load(stack, n, opts.repeats, log)
        result["json"] = size
        results["initial_load"].append(result)
        if result["kopa_peak_rss_bytes"]:
            results["memory"].append(
                memory_entry(
                    n,
                    size,
                    result["kopa_peak_rss_bytes"],
                    max(r["vmrss_bytes"] for r in result["kopa_runs"]),
                    "after its initial load",
                )
            )
        log(
            f"N={n}: kopa {result['kopa_seconds']:.2f} s, floor {result['floor_seconds']:.2f} s,"
            f" ratio {result['ratio']:.2f}"
        )

    if "policies" in phases:
        log(f"policy load: {opts.policy_modules} modules, one in twenty failing for good")
        info = run_info()
        section = await policies.policy_load(stack, opts.policy_modules, log)
        results["policies"] = {"run": finished(info), **section}

    if "churn" in phases:
        log(
            f"churn at {', '.join(f'{r:g}' for r in opts.rates)} updates/s, {opts.churn_seconds:g} s each,"
            f" {opts.churn_trials} trials of {' and '.join(stack.sides)}"
        )
        info = run_info()
        section = await churn.churn_phase(
            stack,
            n=sizes[-1],
            rates=opts.rates,
            seconds=opts.churn_seconds,
            objects=opts.churn_objects,
            trials=opts.churn_trials,
            min_updates=opts.churn_min_updates,
            log=log,
        )
        section["churn_run"] = finished(info)
        results.update(section)
        kopa_peak = section["churn_peak_rss_bytes"].get("kopa")
        if kopa_peak:
            size = await json_size(stack)
            results["memory"].append(memory_entry(sizes[-1], size, kopa_peak, kopa_peak, "after churn"))
    if phases & {"propagation", "refill", "drift"}:
        await long_running(opts, stack, sizes[-1], results)
    if "bundle" in phases:
        log(
            f"bundle mode: {opts.bundle_opas} OPAs, {opts.bundle_objects:,} Services,"
            f" {opts.bundle_changes} changes; modules {', '.join(map(str, opts.module_counts))}"
        )
        info = run_info()
        section = await bundle.bundle_phase(
            stack,
            opas=opts.bundle_opas,
            objects=opts.bundle_objects,
            changes_count=opts.bundle_changes,
            log=log,
        )
        section["modules"] = await modules.module_curves(
            stack, bundle.bundle_token(stack), opts.module_counts, opts.module_budget, log
        )
        results["bundle"] = {"run": finished(info), **section}
    results["load_average"]["end"] = load_average()
    results["elapsed_seconds"] = round(time.monotonic() - STARTED, 1)
    return results


def memory_entry(n: int, size: dict[str, int], peak: int, rss: int, when: str) -> dict[str, Any]:
    return {
        "n": n,
        "json_bytes": size["collection_bytes"],
        "peak_rss_bytes": peak,
        "rss_bytes": rss,
        "budget_bytes": int(1.5 * size["collection_bytes"] + 50 * MB),
        "when": when,
    }


async def long_running(opts: argparse.Namespace, stack: Stack, n: int, results: dict[str, Any]) -> None:
    """Churn, propagation and refill, against one kopa that holds all N objects."""
    phases = set(opts.only)
    stack.fresh_opa()
    kopa = stack.kopa("main")
    kopa.start()
    async with stack.opa_client() as opa:

        async def loaded() -> Any:
            return await opa.data("system/kopa/ready") and await opa.query(dataset.COUNT_QUERY) == n

        await poll_until(loaded, bool, interval=0.05, within=300, what="main kopa loaded")
    if "propagation" in phases:
        log(f"policy propagation, {opts.trials} trials")
        results["propagation"] = await propagation.propagation(stack, opts.trials, log)
    elif phases & {"refill", "drift"}:
        await propagation.create_policies(stack, opts.trials)

    if "refill" in phases:
        log(f"refill: OPA killed and restarted {opts.refills} times")
        results["refill"] = await refill.refill(
            stack, kopa, n=n, policies=opts.trials, rounds=opts.refills, log=log
        )
    done = ", ".join(p for p in ("propagation", "refill") if p in phases)
    if kopa.pid is not None and stack.profile_dir is None and done:
        memory = proc_memory(kopa.pid)
        size = await json_size(stack)
        results["memory"].append(memory_entry(n, size, memory["VmHWM"], memory["VmRSS"], f"after {done}"))
    stack.stop_kopa(kopa)
    if "refill" in phases and KUBE_MGMT in stack.sides:
        log("refill: does kube-mgmt refill an OPA that was killed and restarted?")
        results["refill"]["kube_mgmt"] = await refill.peer_refill(
            stack, n=n, policies=opts.trials, wait=opts.peer_refill_wait, log=log
        )

    if "drift" in phases:
        log(
            f"drift check: {opts.drift_seconds:g} s with it off, {opts.drift_seconds:g} s every"
            f" {opts.drift_interval:g} s, then {opts.repairs} repairs"
        )
        info = run_info()
        section = await drift.drift(
            stack,
            n=n,
            policies=opts.trials,
            interval=opts.drift_interval,
            seconds=opts.drift_seconds,
            repairs=opts.repairs,
            log=log,
        )
        results["drift"] = {"run": finished(info), **section}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument(
        "--quick", action="store_true", help="a short smoke run; writes to the work directory"
    )
    parser.add_argument("--sizes", type=ints, default=None, help="initial-load sizes (default 1000,10000)")
    parser.add_argument("--repeats", type=int, default=None, help="initial-load runs per size and side (3)")
    parser.add_argument("--rates", type=floats, default=None, help="churn rates, updates/s (10,50,200,400)")
    parser.add_argument("--churn-seconds", type=float, default=None, help="seconds per churn run (20)")
    parser.add_argument(
        "--churn-trials", type=int, default=None, help="churn trials, each every sidecar and rate (6)"
    )
    parser.add_argument(
        "--kube-mgmt",
        default=None,
        help="Go kube-mgmt's binary (default: $KOPA_BENCH_KUBE_MGMT, else the tools cache)",
    )
    parser.add_argument(
        "--no-kube-mgmt", action="store_true", help="run kopa alone even when kube-mgmt is there"
    )
    parser.add_argument(
        "--peer-refill-wait",
        type=float,
        default=15.0,
        help="how long the bench waits for kube-mgmt to refill a restarted OPA, s (15)",
    )
    parser.add_argument(
        "--churn-min-updates",
        type=int,
        default=None,
        help=f"updates per churn run at the least: slow rates run longer ({churn.MIN_UPDATES}; quick: 0)",
    )
    parser.add_argument("--churn-objects", type=int, default=100, help="objects the churn updates (100)")
    parser.add_argument("--trials", type=int, default=None, help="policy propagation trials (100)")
    parser.add_argument("--refills", type=int, default=None, help="OPA kill/restart rounds (3)")
    parser.add_argument(
        "--policy-modules", type=int, default=None, help="modules of the policy load, 1 in 20 failing (200)"
    )
    parser.add_argument(
        "--drift-interval", type=float, default=1.0, help="drift check interval while measured, s (1)"
    )
    parser.add_argument(
        "--drift-seconds", type=float, default=None, help="seconds with the drift check off, then on (20)"
    )
    parser.add_argument("--repairs", type=int, default=None, help="drift repairs timed (4)")
    parser.add_argument("--bundle-opas", type=int, default=10, help="OPAs downloading kopa's bundle (10)")
    parser.add_argument(
        "--bundle-objects", type=int, default=1000, help="Services the bundle phase replicates (1000)"
    )
    parser.add_argument(
        "--bundle-changes", type=int, default=None, help="changes of the bundle fan-out (100)"
    )
    parser.add_argument(
        "--module-counts", type=ints, default=None, help="policy modules per load run (50,100,200,300)"
    )
    parser.add_argument(
        "--module-budget",
        type=float,
        default=360.0,
        help="seconds for the module-count runs: past the first two counts, a run that would not fit is"
        " skipped (360; 0: no budget)",
    )
    parser.add_argument(
        "--only",
        type=lambda s: s.split(","),
        default=list(PHASES),
        help=f"phases to run ({','.join(PHASES)})",
    )
    parser.add_argument("--out", type=Path, default=None, help="where benchmarks.{json,md} go (docs/)")
    parser.add_argument("--work", type=Path, default=None, help="work directory (a new temp dir)")
    parser.add_argument(
        "--report", type=Path, default=None, help="only write the plots and the doc again from this JSON"
    )
    parser.add_argument("--profile", type=Path, default=None, help="run kopa under py-spy; flame graphs here")
    opts = parser.parse_args(argv)
    quick = opts.quick
    defaults: dict[str, Any] = {
        "sizes": [1000] if quick else [1000, 10000],
        "repeats": 1 if quick else 3,
        "rates": [10.0, 50.0, 200.0, 400.0],
        "churn_seconds": 8.0 if quick else 20.0,
        "churn_trials": 1 if quick else 6,
        "churn_min_updates": 0 if quick else churn.MIN_UPDATES,
        "trials": 20 if quick else 100,
        "refills": 2 if quick else 3,
        "policy_modules": 60 if quick else 200,
        "drift_seconds": 8.0 if quick else 20.0,
        "repairs": 1 if quick else 4,
        "bundle_changes": 20 if quick else 100,
        "module_counts": [20, 40, 80] if quick else [50, 100, 200, 300],
    }
    for key, value in defaults.items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    opts.sizes = sorted(opts.sizes)
    unknown = set(opts.only) - set(PHASES)
    if unknown:
        parser.error(f"--only: unknown phases {', '.join(sorted(unknown))}; choose from {', '.join(PHASES)}")
    return opts


def write(results: dict[str, Any], out: Path, phases: list[str] | None = None) -> None:
    """Writes the results; a run of some phases (`phases`) keeps the other phases' published figures."""
    previous = out / "benchmarks.json"
    if phases is not None and previous.exists():
        results = report.merge(orjson.loads(previous.read_bytes()), results, phases)
    report.write_json(results, out / "benchmarks.json")
    images = report.plots(results, out / "benchmarks")
    report.write_markdown(out / "benchmarks.md", report.generated_markdown(results, images, "benchmarks"))
    for v in report.verdicts(results):
        log(f"{'met   ' if v['met'] else 'MISSED'} {v['target']}: {v['measured']}")
    log(f"wrote {out / 'benchmarks.json'}, {out / 'benchmarks.md'} and {len(images)} plots")


def main() -> None:
    opts = parse(sys.argv[1:])
    if opts.report is not None:
        write(orjson.loads(opts.report.read_bytes()), opts.out or opts.report.parent)
        return
    work = opts.work or Path(tempfile.mkdtemp(prefix="kopa-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    out: Path = opts.out or (work if opts.quick else repo_root() / "docs")
    if opts.profile is not None and not py_spy():
        sys.exit("--profile needs py-spy (pip install py-spy into the venv; it is not a dependency)")
    log(f"work directory {work}; results to {out}")
    binary, where = find_kube_mgmt(opts.kube_mgmt)
    if opts.no_kube_mgmt:
        binary, where = None, "not run (--no-kube-mgmt)"
    if binary is None:
        log(f"kube-mgmt: {where}; kopa runs alone")
        opts.kube_mgmt_found = {"found": False, "why": where}
    else:
        log(f"kube-mgmt: {where}; it runs side by side with kopa, with the same flags")
        opts.kube_mgmt_found = {
            "found": True,
            "binary": str(binary),
            "version": read_versions().get("KUBE_MGMT_VERSION"),
        }
    stack = Stack(work, profile_dir=opts.profile, kube_mgmt=binary)
    stack.start()
    try:
        results = asyncio.run(run(opts, stack))
    finally:
        stack.stop()
    write(results, out, opts.only)


if __name__ == "__main__":
    main()
