"""(6) Policy load with modules that fail for good: how many compiles the retries cost.

Every policy PUT makes OPA compile every module it holds, so what a failing module costs is the PUTs it
causes. The set: LIBS library modules (`package benchpol.lib.lNN`, a few functions), and application
modules (`package benchpol.app.pNNN`, a few rules each) that call one library's functions. One in twenty
application modules calls a function its library does not define (`data.benchpol.lib.lNN.nope(...)`, a
typo): OPA 1.16 refuses it at PUT time ("undefined function"), and will refuse it however often it is
tried. (A mere reference to an undefined rule, or to a `data.` path no module defines, is not refused: OPA
takes it for base data.) Each ConfigMap (labelled openpolicyagent.org/policy=rego, in a namespace of its
own that nothing else watches) holds one module.

The ConfigMaps are created first; then a fresh OPA and a kopa loading only that namespace are started, and
the time runs from kopa's process start until OPA holds every good module and every ConfigMap carries its
final status annotation (ok, or the error for the failing ones). OPA's own /metrics count the policy PUTs.
Then one module is edited that no failing module depends on (expected: 1 PUT), and one library that one
failing module calls (expected: 1 PUT, plus one retry of that module).

When Go kube-mgmt is there, it loads the same ConfigMaps first, with the same flags, into a fresh OPA
(initial load only); the ConfigMaps are deleted and created again before each sidecar, so that neither
finds the other's status annotations.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from bench.common import Opa, poll_until
from bench.dataset import RULES_NAMESPACE as NAMESPACE
from bench.stack import KOPA, KUBE_MGMT, Stack
from devstack.processes import ManagedProcess

LIBS = 10
KEY = "policy.rego"
STATUS_ANNOTATION = "openpolicyagent.org/kube-mgmt-status"
SETTLE = 1.0  # seconds of quiet after a change before its PUTs are counted (late retries included)
LOADED_QUERY = "x := count(data.benchpol.lib) + count(data.benchpol.app)"


def lib_text(lib: int, version: int = 1) -> str:
    return f"""package benchpol.lib.l{lib:02d}

import rego.v1

loaded := true

version := {version}

allowed_user(user) if startswith(user, "user-")

allowed_action(action) if action in {{"get", "list", "watch"}}

score(x) := (x * 7) % 13
"""


def app_text(index: int, lib: int, failing: bool, version: int = 1) -> str:
    check = "nope" if failing else "allowed_user"  # nope: a function the library does not define
    return f"""package benchpol.app.p{index:03d}

import rego.v1

loaded := true

version := {version}

default allow := false

allow if {{
\tdata.benchpol.lib.l{lib:02d}.{check}(input.user)
\tdata.benchpol.lib.l{lib:02d}.allowed_action(input.action)
}}

deny contains msg if {{
\tnot allow
\tmsg := sprintf("p{index:03d}: %v may not %v", [input.user, input.action])
}}

weight := data.benchpol.lib.l{lib:02d}.score({index})
"""


def failing_indexes(apps: int, failing: int) -> list[int]:
    """Application modules that fail, spread evenly over the set (so over the load order too)."""
    step = apps // failing
    return [k * step + step // 2 for k in range(failing)]


def configmap(name: str, text: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {"openpolicyagent.org/policy": "rego"},
        },
        "data": {KEY: text},
    }


def module_set(modules: int, failing: int) -> dict[str, Any]:
    """The ConfigMaps, which fail, and which library each application module calls."""
    apps = modules - LIBS
    bad = set(failing_indexes(apps, failing))
    objects = [configmap(f"lib-{lib:02d}", lib_text(lib)) for lib in range(LIBS)]
    lib_of = {i: i % LIBS for i in range(apps)}
    objects += [configmap(f"pol-{i:03d}", app_text(i, lib_of[i], i in bad)) for i in range(apps)]
    return {"objects": objects, "bad": bad, "lib_of": lib_of, "apps": apps}


async def policy_puts(opa: Opa) -> dict[str, int]:
    """PUTs OPA counted on v1/policies, by outcome (its own /metrics)."""
    counts = {"accepted": 0, "refused": 0}
    for sample in await opa.request_metrics():
        if sample.handler == "v1/policies" and sample.method == "put":
            counts["accepted" if sample.code < 300 else "refused"] += sample.count
    return counts


async def reset(made: dict[str, Any], stack: Stack) -> None:
    """The namespace's ConfigMaps deleted and created again: as first written, without status annotations."""
    async with stack.api() as api:
        await api.ensure_namespace(NAMESPACE)
        await api.checked("DELETE", f"/api/v1/namespaces/{NAMESPACE}/configmaps")

        async def gone() -> int:
            page = await api.checked("GET", f"/api/v1/namespaces/{NAMESPACE}/configmaps")
            return len(page.get("items") or [])

        await poll_until(gone, lambda c: c == 0, interval=0.1, within=60, what="policy ConfigMaps deleted")
        await api.create_all(made["objects"], lambda _: f"/api/v1/namespaces/{NAMESPACE}/configmaps")


async def initial(
    stack: Stack, side: str, made: dict[str, Any], modules: int, within: float
) -> tuple[dict[str, Any], ManagedProcess]:
    """One sidecar's initial load of the module set into a fresh OPA; returns it still running."""
    failing = len(made["bad"])
    names_bad = {f"pol-{i:03d}" for i in made["bad"]}
    good = modules - failing
    stack.fresh_opa()
    process = stack.sidecar(side, "policies", namespaces=NAMESPACE, replicate=False)
    async with stack.api() as api, stack.opa_client() as opa:
        before = await policy_puts(opa)
        t0 = time.monotonic()
        process.start()

        async def loaded() -> Any:
            return await opa.query(LOADED_QUERY)

        async def statuses() -> dict[str, str]:
            page = await api.checked("GET", f"/api/v1/namespaces/{NAMESPACE}/configmaps")
            out: dict[str, str] = {}
            for item in page.get("items") or []:
                raw = (item["metadata"].get("annotations") or {}).get(STATUS_ANNOTATION)
                if raw:
                    out[item["metadata"]["name"]] = raw
            return out

        def final(found: dict[str, str]) -> bool:
            if len(found) != modules:
                return False
            return all((orjson.loads(v)["status"] == "error") == (k in names_bad) for k, v in found.items())

        try:
            seen_loaded, seen_status = await asyncio.gather(
                poll_until(loaded, lambda v: v == good, interval=0.05, within=within, what=f"{good} modules"),
                poll_until(statuses, final, interval=0.1, within=within, what="status annotations"),
            )
        except BaseException:
            stack.stop_sidecar(process)
            raise
        await asyncio.sleep(SETTLE)
        after = await policy_puts(opa)
    example = orjson.loads(seen_status.value[min(names_bad)]).get("error") or {}
    if isinstance(example, list):
        example = example[0] if example else {}
    return {
        "loaded_seconds": round(seen_loaded.received - t0, 3),
        "statuses_seconds": round(seen_status.received - t0, 3),
        "seconds": round(max(seen_loaded.received, seen_status.received) - t0, 3),
        "resolution_seconds": round(max(seen_loaded.resolution, seen_status.resolution), 3),
        "puts": after["accepted"] + after["refused"] - before["accepted"] - before["refused"],
        "puts_accepted": after["accepted"] - before["accepted"],
        "puts_refused": after["refused"] - before["refused"],
        # each failing module calls one library: the most it may be retried is once per load of it
        "puts_bound": modules + failing * 1,
        "example_error": example.get("errors", [example])[0].get("message", "")
        if isinstance(example, dict)
        else str(example),
    }, process


async def policy_load(stack: Stack, modules: int, log: Any) -> dict[str, Any]:
    failing = max(1, modules // 20)
    made = module_set(modules, failing)
    result: dict[str, Any] = {"modules": modules, "failing": failing, "libraries": LIBS}
    if KUBE_MGMT in stack.sides:
        # Go kube-mgmt first, with the same flags, on the same ConfigMaps (statuses removed before each).
        await reset(made, stack)
        try:
            peer, process = await initial(stack, KUBE_MGMT, made, modules, within=180)
        except TimeoutError as exc:
            result["kube_mgmt"] = {"error": str(exc)}
            log(f"  policies: kube-mgmt did not finish: {exc}")
        else:
            stack.stop_sidecar(process)
            result["kube_mgmt"] = peer
            log(
                f"  policies: kube-mgmt: loaded in {peer['loaded_seconds']:.2f} s, statuses at"
                f" {peer['statuses_seconds']:.2f} s, {peer['puts']} PUTs"
            )
    await reset(made, stack)
    result["initial"], kopa = await initial(stack, KOPA, made, modules, within=600)
    good = modules - failing
    log(
        f"  policies: {good} loaded in {result['initial']['loaded_seconds']:.2f} s, statuses at"
        f" {result['initial']['statuses_seconds']:.2f} s, {result['initial']['puts']} PUTs"
    )
    async with stack.api() as api, stack.opa_client() as opa:

        async def edit(name: str, text: str, package: str, expected_puts: int) -> dict[str, Any]:
            start = await policy_puts(opa)
            await api.checked(
                "PATCH",
                f"/api/v1/namespaces/{NAMESPACE}/configmaps/{name}",
                {"data": {KEY: text}},
                content_type="application/merge-patch+json",
            )
            acked = time.monotonic()

            async def version() -> Any:
                return await opa.data(f"{package.replace('.', '/')}/version")

            seen = await poll_until(version, lambda v: v == 2, interval=0.01, within=60, what=name)
            await asyncio.sleep(SETTLE)
            end = await policy_puts(opa)
            puts = sum(end.values()) - sum(start.values())
            return {
                "configmap": name,
                "seconds": round(seen.received - acked, 3),
                "puts": puts,
                "expected_puts": expected_puts,
            }

        unrelated = next(i for i in range(made["apps"]) if i not in made["bad"])
        result["unrelated_change"] = await edit(
            f"pol-{unrelated:03d}",
            app_text(unrelated, made["lib_of"][unrelated], False, version=2),
            f"benchpol.app.p{unrelated:03d}",
            1,
        )
        lib = made["lib_of"][min(made["bad"])]
        dependents = sum(1 for i in made["bad"] if made["lib_of"][i] == lib)
        result["related_change"] = await edit(
            f"lib-{lib:02d}", lib_text(lib, version=2), f"benchpol.lib.l{lib:02d}", 1 + dependents
        )
        log(
            f"  policies: an unrelated change cost {result['unrelated_change']['puts']} PUTs, a change"
            f" to a library {dependents} failing module(s) call cost {result['related_change']['puts']}"
        )
    stack.stop_sidecar(kopa)
    return result
