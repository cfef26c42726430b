"""(5) Refill: OPA killed (SIGKILL) and started again, empty, while kopa holds N objects and the policies.

Timeline of one round, polled (OPA every POLL seconds, kopa every READYZ_POLL) from the moment the new OPA
process is spawned:
  healthy    OPA's /health answers 200 (the new process is up, and empty);
  noticed    the first of kopa's policies is back in OPA (kopa noticed the new process and began: it loads
             the policies first, then the data, then writes the marker);
  marker     data.system.kopa.ready is true again in OPA (what OPA's own readiness check waits for);
  readyz     kopa's /readyz answers 200 again, after it had answered 503 for this restart.
After each round the bench checks that OPA holds all N objects and every policy.

Go kube-mgmt, when it is there, gets one round of its own (`peer_refill`): loaded with the same N objects
and policies, OPA killed and started again, and the bench waits a while for anything to come back.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from bench.common import Opa, poll_until, summary
from bench.dataset import COUNT_QUERY
from bench.stack import KUBE_MGMT, Stack
from devstack.kopa import KopaProcess

POLL = 0.02  # OPA: each poller stops once its condition holds
READYZ_POLL = 0.05  # kopa's /readyz is served on kopa's own thread: polled gently, not to slow kopa down
POLICY_COUNT_QUERY = "x := count(data.benchprop)"


async def _status(session: aiohttp.ClientSession, url: str) -> int:
    try:
        async with session.get(url) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, OSError):
        return 0


async def refill_round(
    stack: Stack, kopa: KopaProcess, opa: Opa, session: aiohttp.ClientSession
) -> dict[str, Any]:
    readyz = kopa.health_url + "/readyz"
    stack.opa.kill()
    spawned = time.monotonic()
    stack.opa.process.start()

    async def healthy() -> bool:
        return await opa.healthy()

    async def noticed() -> Any:
        return await opa.query(POLICY_COUNT_QUERY)

    async def marker() -> Any:
        return await opa.data("system/kopa/ready")

    async def kopa_ready() -> float:
        async def status() -> int:
            return await _status(session, readyz)

        await poll_until(status, lambda s: s == 503, interval=READYZ_POLL, within=30, what="/readyz 503")
        ready = await poll_until(
            status, lambda s: s == 200, interval=READYZ_POLL, within=120, what="/readyz 200"
        )
        return ready.received

    async def first(probe: Any, done: Any, what: str) -> float:
        return (await poll_until(probe, done, interval=POLL, within=120, what=what)).received

    up, seen, marked, ready = await asyncio.gather(
        first(healthy, bool, "OPA healthy"),
        first(noticed, lambda v: isinstance(v, int) and v > 0, "first policy back"),
        first(marker, lambda v: v is True, "readiness marker"),
        kopa_ready(),
    )
    return {
        "healthy": round(up - spawned, 4),
        "noticed": round(seen - spawned, 4),
        "marker": round(marked - spawned, 4),
        "readyz": round(ready - spawned, 4),
        "marker_after_healthy": round(marked - up, 4),
        "marker_after_noticed": round(marked - seen, 4),
        "objects": await opa.query(COUNT_QUERY),
        "policies": await opa.query(POLICY_COUNT_QUERY),
    }


async def refill(
    stack: Stack, kopa: KopaProcess, *, n: int, policies: int, rounds: int, log: Any
) -> dict[str, Any]:
    results = []
    async with (
        stack.opa_client() as opa,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
    ):
        for i in range(rounds):
            await asyncio.sleep(2.0)
            result = await refill_round(stack, kopa, opa, session)
            if result["objects"] != n or result["policies"] != policies:
                raise RuntimeError(
                    f"refill round {i + 1}: OPA holds {result} after the marker, not {n}/{policies}"
                )
            results.append(result)
            log(
                f"  refill {i + 1}: healthy {result['healthy']:.2f} s, noticed {result['noticed']:.2f} s,"
                f" marker {result['marker']:.2f} s, /readyz {result['readyz']:.2f} s"
            )
    keys = ("healthy", "noticed", "marker", "readyz", "marker_after_healthy", "marker_after_noticed")
    return {
        "n": n,
        "policies": policies,
        "rounds": results,
        "summary_seconds": {k: summary([r[k] for r in results], 1, 3) for k in keys},
    }


async def peer_refill(stack: Stack, *, n: int, policies: int, wait: float, log: Any) -> dict[str, Any]:
    """Go kube-mgmt holding N objects and the policies; OPA killed and started again, as in a round: does
    anything come back within `wait` seconds of the new OPA answering /health?"""
    stack.fresh_opa()
    process = stack.sidecar(KUBE_MGMT, "refill")
    process.start()
    try:
        async with stack.opa_client() as opa:

            async def loaded() -> Any:
                return await opa.query(COUNT_QUERY) == n and await opa.query(POLICY_COUNT_QUERY) == policies

            await poll_until(loaded, bool, interval=0.05, within=300, what="kube-mgmt loaded")
            await asyncio.sleep(2.0)
            stack.opa.kill()
            spawned = time.monotonic()
            stack.opa.process.start()

            async def healthy() -> bool:
                return await opa.healthy()

            up = (await poll_until(healthy, bool, interval=POLL, within=120, what="OPA healthy")).received

            async def anything() -> Any:
                return (await opa.query(POLICY_COUNT_QUERY) or 0) + (await opa.query(COUNT_QUERY) or 0)

            try:
                seen = await poll_until(anything, lambda v: v > 0, interval=POLL, within=wait, what="refill")
                noticed: float | None = round(seen.received - spawned, 4)
            except TimeoutError:
                noticed = None
            result = {
                "healthy": round(up - spawned, 4),
                "waited_seconds": wait,
                "noticed": noticed,
                "objects_after_wait": await opa.query(COUNT_QUERY) or 0,
                "policies_after_wait": await opa.query(POLICY_COUNT_QUERY) or 0,
            }
    finally:
        stack.stop_sidecar(process)
    log(
        f"  kube-mgmt: {'refilled from ' + format(noticed, '.2f') + ' s' if noticed else 'nothing back'}"
        f" {wait:g} s after OPA was healthy again ({result['objects_after_wait']} objects,"
        f" {result['policies_after_wait']} policies)"
    )
    return result
