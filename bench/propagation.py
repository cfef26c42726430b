"""(3) Policy propagation: a policy ConfigMap created -> OPA answering with the new policy.

Each trial creates a ConfigMap labelled openpolicyagent.org/policy=rego holding `answer := <i>` in a package
of its own, notes when the API server acknowledged the create, then polls OPA's data API for that answer
every POLL seconds. The lag is the answer time of the first poll that returns i, minus the acknowledgement
(an upper bound; the resolution is recorded). Trials are spaced so that each change arrives alone, as a
policy edit usually does (kopa batches only under a stream of changes).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.common import poll_until, summary
from bench.dataset import POLICY_LABEL, POLICY_NAMESPACE, labelled_configmap
from bench.stack import Stack

POLL = 0.005
GAP = 1.2  # seconds between one trial's answer and the next create


def policy_configmap(i: int) -> dict[str, Any]:
    return labelled_configmap(
        POLICY_NAMESPACE,
        f"policy-{i:03d}",
        POLICY_LABEL,
        {"main.rego": f"package benchprop.p{i:03d}\n\nanswer := {i}\n"},
    )


async def propagation(stack: Stack, trials: int, log: Any) -> dict[str, Any]:
    lags: list[float] = []
    resolutions: list[float] = []
    async with stack.api() as api, stack.opa_client() as opa:
        for i in range(trials):
            await asyncio.sleep(GAP)
            await api.checked(
                "POST", f"/api/v1/namespaces/{POLICY_NAMESPACE}/configmaps", policy_configmap(i)
            )
            acked = time.monotonic()

            async def answer(i: int = i) -> bool:
                return bool(await opa.data(f"benchprop/p{i:03d}/answer") == i)

            seen = await poll_until(answer, bool, interval=POLL, within=60, what=f"policy {i}")
            lags.append(seen.received - acked)
            resolutions.append(seen.resolution)
    result: dict[str, Any] = {
        "trials": trials,
        "gap_seconds": GAP,
        "lag_ms": summary(lags, 1000, 2),
        "resolution_ms": summary(resolutions, 1000, 2),
        "lags_ms": [round(x * 1000, 2) for x in lags],
    }
    log(f"  propagation: p50 {result['lag_ms']['p50']} ms, p99 {result['lag_ms']['p99']} ms")
    return result


async def create_policies(stack: Stack, count: int) -> None:
    """The policies of the propagation trials, created at once and waited for (when that phase is skipped)."""
    async with stack.api() as api, stack.opa_client() as opa:
        await api.create_all(
            [policy_configmap(i) for i in range(count)],
            lambda _: f"/api/v1/namespaces/{POLICY_NAMESPACE}/configmaps",
        )

        async def loaded() -> Any:
            return await opa.query("x := count(data.benchprop)")

        await poll_until(
            loaded, lambda v: v == count, interval=0.05, within=120, what=f"{count} policies loaded"
        )
