"""(1) Initial load and (4) memory: kopa from its start to OPA holding all N objects, next to the floor.

Each run starts from an empty OPA (a new process). kopa, or the floor script, is started as a process at
t0; the bench polls OPA every 20 ms with a count of data.kubernetes.configmaps and stops at the first poll
that counts N. The time reported is that poll's answer minus t0 (an upper bound; the resolution, from the
previous poll's start, is recorded too). Runs of the floor, the lean floor, kopa and (when it is there) Go
kube-mgmt with the same flags alternate, so that any drift of the machine hits all of them. Each sidecar's
peak RSS (VmHWM) is read one second after its load is in OPA.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from typing import Any

import orjson

from bench.common import Opa, cpu_seconds, load_average, median, poll_until, proc_memory
from bench.dataset import COUNT_QUERY, FIELD_SELECTOR
from bench.stack import KOPA, KUBE_MGMT, Stack

POLL = 0.02


async def _until_count(
    opa: Opa, n: int, t0: float, what: str, process: subprocess.Popen[bytes] | None = None
) -> dict[str, float]:
    async def count() -> Any:
        if process is not None and process.poll() not in (None, 0):
            error = process.stderr.read().decode(errors="replace")[-2000:] if process.stderr else ""
            raise RuntimeError(f"{what}: the process failed with exit code {process.returncode}: {error}")
        return await opa.query(COUNT_QUERY)

    seen = await poll_until(count, lambda v: v == n, interval=POLL, within=300, what=what)
    return {"seconds": round(seen.received - t0, 4), "resolution": round(seen.resolution, 4)}


async def sidecar_run(stack: Stack, n: int, name: str, side: str = KOPA) -> dict[str, Any]:
    stack.fresh_opa()
    async with stack.opa_client() as opa:
        process = stack.sidecar(side, name)
        t0 = time.monotonic()
        process.start()
        try:
            result: dict[str, Any] = await _until_count(opa, n, t0, f"{side} loading {n} objects")
            if process.pid is not None:
                result["cpu_seconds"] = round(cpu_seconds(process.pid), 3)
            result["load_average"] = load_average()
            await asyncio.sleep(1.0)
            if process.pid is not None and (stack.profile_dir is None or side != KOPA):
                memory = proc_memory(process.pid)
                result["vmhwm_bytes"] = memory["VmHWM"]
                result["vmrss_bytes"] = memory["VmRSS"]
        finally:
            stack.stop_sidecar(process)
    return result


async def floor_run(stack: Stack, n: int, lean: bool = False) -> dict[str, Any]:
    stack.fresh_opa()
    async with stack.opa_client() as opa:
        t0 = time.monotonic()
        process = stack.floor(FIELD_SELECTOR, lean)
        try:
            result: dict[str, Any] = await _until_count(opa, n, t0, f"floor loading {n} objects", process)
            result["load_average"] = load_average()
            out, err = await asyncio.to_thread(process.communicate, timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if process.returncode != 0:
            raise RuntimeError(f"the floor script failed: {err.decode(errors='replace')[-2000:]}")
        result["breakdown"] = orjson.loads(out.strip().splitlines()[-1])
        result["cpu_seconds"] = result["breakdown"]["cpu_seconds"]
    return result


async def initial_load(stack: Stack, n: int, repeats: int, log: Any) -> dict[str, Any]:
    kopa: list[dict[str, Any]] = []
    floor: list[dict[str, Any]] = []
    lean: list[dict[str, Any]] = []
    peer: list[dict[str, Any]] = []
    for i in range(repeats):
        floor.append(await floor_run(stack, n))
        lean.append(await floor_run(stack, n, lean=True))
        log(f"  N={n} floor run {i + 1}: {floor[-1]['seconds']:.2f} s (lean {lean[-1]['seconds']:.2f} s)")
        kopa.append(await sidecar_run(stack, n, f"load-{n}-{i + 1}"))
        log(f"  N={n} kopa run {i + 1}: {kopa[-1]['seconds']:.2f} s")
        if KUBE_MGMT in stack.sides:
            peer.append(await sidecar_run(stack, n, f"load-{n}-{i + 1}", KUBE_MGMT))
            log(f"  N={n} kube-mgmt run {i + 1}: {peer[-1]['seconds']:.2f} s")
    kopa_s = median([r["seconds"] for r in kopa])
    floor_s = median([r["seconds"] for r in floor])
    lean_s = median([r["seconds"] for r in lean])
    peaks = [r["vmhwm_bytes"] for r in kopa if "vmhwm_bytes" in r]
    kopa_cpu = median([r["cpu_seconds"] for r in kopa if "cpu_seconds" in r])
    floor_cpu = median([r["cpu_seconds"] for r in floor])
    side_by_side: dict[str, Any] = {}
    if peer:
        peer_s = median([r["seconds"] for r in peer])
        peer_peaks = [r["vmhwm_bytes"] for r in peer if "vmhwm_bytes" in r]
        side_by_side = {
            "kube_mgmt_seconds": round(peer_s, 3),
            "kube_mgmt_ratio": round(kopa_s / peer_s, 3),  # kopa / kube-mgmt
            "kube_mgmt_cpu_seconds": round(median([r["cpu_seconds"] for r in peer if "cpu_seconds" in r]), 3),
            "kube_mgmt_runs": peer,
            "kube_mgmt_peak_rss_bytes": max(peer_peaks) if peer_peaks else None,
        }
    return {
        **side_by_side,
        "n": n,
        "repeats": repeats,
        "kopa_seconds": round(kopa_s, 3),
        "floor_seconds": round(floor_s, 3),
        "ratio": round(kopa_s / floor_s, 3),
        "lean_floor_seconds": round(lean_s, 3),
        "lean_ratio": round(kopa_s / lean_s, 3),
        "lean_floor_runs": lean,
        # Each kopa run against the floor run just before it: less exposed to a machine that changes pace.
        "paired_ratios": [round(k["seconds"] / f["seconds"], 3) for k, f in zip(kopa, floor, strict=True)],
        "kopa_cpu_seconds": round(kopa_cpu, 3),
        "floor_cpu_seconds": round(floor_cpu, 3),
        "kopa_runs": kopa,
        "floor_runs": floor,
        "kopa_peak_rss_bytes": max(peaks) if peaks else None,
        "kopa_peak_rss_median_bytes": int(median(peaks)) if peaks else None,
    }
