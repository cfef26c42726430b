"""(8) Bundle mode, continued: load time against the number of policy modules, bundle mode and push mode.

Modules of RULES rules each (`package benchload.mNNN`: allow, deny and limit rules on the input), one per
ConfigMap in bench-modules, a namespace only these runs load. The counts grow (50, 100, 200, 300 by
default; the ConfigMaps of the next count are added to those already there), and each run starts from
nothing:
- bundle mode: a fresh validation OPA, kopa in bundle mode started at t0 (loading bench-modules, no
  replication), and one OPA downloading the bundle, started once kopa's port listens. Initial load: t0
  until that OPA answers for every module (`count([p | data.benchload[p].loaded])`, polled every POLL).
  Refill: once kopa's work queues are empty (its statuses written), that OPA killed (SIGKILL) and started
  again, empty; from the new process's spawn until the same; BUNDLE_REFILLS times, the median reported (a
  refill costs about a second here, and one slow start would bend the curve).
- push mode: a fresh OPA and kopa as its sidecar, the same way: initial load from kopa's start, refill from
  the new OPA process's spawn (kopa notices it and loads everything again), once (it costs as much as the
  initial load).
Each PUT makes OPA compile every module it holds, so push mode's time grows with the square of the count;
in bundle mode the validation OPA compiles each candidate bundle once, and so does an OPA activating the
bundle.

Budget: the first two counts of each mode always run; a later one only when the mode's last run (initial
plus refill), grown with the square of the count (what a quadratic would take), fits in what is left of
`budget` seconds for the whole sweep (0: no budget), so that push mode's loads cannot take the phase much
past 8 minutes. The counts skipped are recorded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.bundle import bundle_kopa, config_opa, fleet_opa_config, kopa_idle, listening
from bench.common import Opa, median, poll_until
from bench.dataset import MODULES_NAMESPACE, POLICY_LABEL, labelled_configmap
from bench.stack import Stack

RULES = 20
PACKAGE = "benchload"
LOADED_QUERY = f"x := count([p | data.{PACKAGE}[p].loaded])"
POLL = 0.05
WITHIN = 900.0  # seconds one load may take
BUNDLE_REFILLS = 3
ALWAYS = 2  # counts of each mode run whatever the budget (a growth exponent needs two)
MODES = ("bundle", "push")


def module_text(i: int) -> str:
    """RULES rules: `loaded`, and allow / deny / limit rules that read the input only."""
    rules = [f"package {PACKAGE}.m{i:03d}\n\nimport rego.v1\n\nloaded := true\n"]
    for r in range(RULES - 1):
        if r % 3 == 0:
            rules.append(
                f'allow_{r:02d} if {{\n\tinput.user == "user-{i}-{r}"\n'
                f'\tinput.action in {{"get", "list"}}\n}}\n'
            )
        elif r % 3 == 1:
            rules.append(
                f'deny contains msg if {{\n\tinput.kind == "k{r}"\n\tnot allow_{r - 1:02d}\n'
                f'\tmsg := sprintf("m{i:03d}/{r}: %v", [input.user])\n}}\n'
            )
        else:
            rules.append(f"limit_{r:02d} := input.limits.l{r} if input.limits.l{r} < {r * 10}\n")
    return "\n".join(rules)


def module_configmap(i: int) -> dict[str, Any]:
    return labelled_configmap(
        MODULES_NAMESPACE, f"mod-{i:03d}", POLICY_LABEL, {"policy.rego": module_text(i)}
    )


def worth_running(done: list[dict[str, Any]], count: int, left: float) -> bool:
    """Whether a mode's run at `count` modules fits in the `left` seconds of the budget (see the module
    docstring)."""
    if len(done) < ALWAYS:
        return True
    last = done[-1]
    projected: float = (last["initial"] + last["refill"]) * (count / last["modules"]) ** 2
    return projected <= left


async def _complete(opa: Opa, count: int, since: float, what: str) -> float:
    """Seconds from `since` until OPA answers for all `count` modules."""

    async def loaded() -> Any:
        return await opa.query(LOADED_QUERY)

    seen = await poll_until(loaded, lambda v: v == count, interval=POLL, within=WITHIN, what=what)
    return round(seen.received - since, 3)


async def push_run(stack: Stack, token: Path, count: int) -> dict[str, float]:
    """kopa as the sidecar of the stack's OPA: initial load, then refill after OPA's restart."""
    stack.fresh_opa()
    kopa = stack.kopa(f"modules-push-{count}", namespaces=MODULES_NAMESPACE, replicate=False)
    async with stack.opa_client() as opa:
        t0 = time.monotonic()
        kopa.start()
        try:
            initial = await _complete(opa, count, t0, f"push mode: {count} modules loaded")
            await kopa_idle(kopa)
            stack.opa.kill()
            spawned = time.monotonic()
            stack.opa.process.start()
            refill = await _complete(opa, count, spawned, f"push mode: {count} modules refilled")
        finally:
            stack.stop_kopa(kopa)
    return {"initial": initial, "refill": refill}


async def bundle_run(stack: Stack, token: Path, count: int) -> dict[str, Any]:
    """kopa in bundle mode and one OPA downloading its bundle: initial load, then refill after a restart."""
    bundle = bundle_kopa(stack, f"modules-{count}", token, MODULES_NAMESPACE, replicate=False)
    server = config_opa(stack.work / f"modules-opa-{count}", fleet_opa_config(bundle.url, token))
    try:
        t0 = time.monotonic()
        bundle.kopa.start()
        await listening(bundle.port, bundle.kopa)
        server.start()
        async with Opa(server.url) as opa:
            initial = await _complete(opa, count, t0, f"bundle mode: {count} modules loaded")
            await kopa_idle(bundle.kopa)
            refills = []
            for _ in range(BUNDLE_REFILLS):
                server.kill()
                spawned = time.monotonic()
                server.process.start()
                refills.append(await _complete(opa, count, spawned, f"bundle mode: {count} modules refilled"))
    finally:
        server.stop()
        bundle.stop(stack)
    return {"initial": initial, "refill": median(refills), "refills": refills}


RUNS: dict[str, Callable[[Stack, Path, int], Awaitable[dict[str, Any]]]] = {
    "bundle": bundle_run,
    "push": push_run,
}


async def module_curves(
    stack: Stack, token: Path, counts: list[int], budget: float, log: Any
) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    skipped: dict[str, list[int]] = {mode: [] for mode in MODES}
    created = 0
    began = time.monotonic()
    async with stack.api() as api:
        await api.ensure_namespace(MODULES_NAMESPACE)
    for count in sorted(counts):
        async with stack.api() as api:
            await api.create_all(
                [module_configmap(i) for i in range(created, count)],
                lambda _: f"/api/v1/namespaces/{MODULES_NAMESPACE}/configmaps",
            )
        created = count
        for mode in MODES:
            left = budget - (time.monotonic() - began) if budget > 0 else math.inf
            if not worth_running(runs[mode], count, left):
                skipped[mode].append(count)
                log(f"  modules: {mode} mode at {count} skipped (projected past the {budget:g} s budget)")
                continue
            found = await RUNS[mode](stack, token, count)
            runs[mode].append({"modules": count, **found})
            log(
                f"  modules: {mode} mode, {count}: initial {found['initial']:.2f} s,"
                f" refill {found['refill']:.2f} s"
            )
    return {
        "rules_per_module": RULES,
        "budget_seconds": budget,
        "seconds": round(time.monotonic() - began, 1),
        "runs": runs,
        "skipped": skipped,
    }
