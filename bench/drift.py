"""(7) The drift check: what one check costs, and how soon it repairs what was changed behind kopa's back.

Each tick of --drift-check-interval, kopa's writer GETs /v1/policies and compares every module, GETs every
data document at its own path, and reads one namespace subtree of each replicated collection (in rotation;
ad-hoc queries, POST /v1/query: its keys, then its objects in slices), writing back whatever differs. Its
cost is measured as a difference: the main bench's state (N replicated ConfigMaps, the propagation
policies, DATA_DOCS data ConfigMaps) is loaded by a kopa with the check off (`--drift-check-interval=0`),
then by one checking every `interval` seconds, and each is left alone for `seconds` while a decision client
asks OPA 50 decisions a second. Per window: kopa's and OPA's CPU seconds (/proc/<pid>/stat), and OPA's own
count and time of the reads it served (its /metrics: GETs on v1/policies and v1/data, POSTs on v1/query;
the decisions are POSTs on v1/data). The number of checks is the number of GET /v1/policies OPA served
(one per check); the cost of a check is the difference between the windows, divided by that. The bytes a
check reads are the sizes of OPA's answers to GETs of the same documents, made once by the bench (recv()
on a socket escapes /proc/<pid>/io's accounting).

Repair: with the check every `interval` seconds, the bench deletes in OPA one policy, one data document and
one whole namespace subtree of the replicated collection, then polls OPA every POLL seconds until each is
back. A policy or data document is compared on every check; a namespace only once every `namespaces`
checks. The namespace is drawn at random: the check goes through them in order, so deleting the next in
line after a repair would always measure the shortest wait.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import orjson

from bench import churn
from bench.common import Opa, RequestCount, cpu_seconds, poll_until, summary, summed
from bench.dataset import PER_NAMESPACE, POLICY_NAMESPACE, REPLICATE_PATH, namespace_of
from bench.propagation import policy_configmap
from bench.stack import Stack

DATA_DOCS = 10
DATA_KEY = "config.json"
SETTLE = 3.0  # seconds after kopa is loaded before a window starts (its start-up work done)
POLL = 0.02


def data_configmap(i: int) -> dict[str, Any]:
    """A data ConfigMap of about 1 KB of JSON: kopa keeps it at data.<ns>.<name>.config.json."""
    doc = {"team": f"team-{i}", "limits": {f"quota-{k:02d}": k * i for k in range(40)}}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"drift-data-{i:02d}",
            "namespace": POLICY_NAMESPACE,
            "labels": {"openpolicyagent.org/data": "opa"},
        },
        "data": {DATA_KEY: orjson.dumps(doc).decode()},
    }


READS = {"policies": ("v1/policies", "get"), "data": ("v1/data", "get"), "queries": ("v1/query", "post")}


def _reads(metrics: list[RequestCount]) -> dict[str, RequestCount]:
    """The reads OPA served, whatever their status (kopa's check makes only these; the bench makes none of
    them during a window)."""

    def served(read: tuple[str, str]) -> Callable[[RequestCount], bool]:
        return lambda s: (s.handler, s.method) == read

    return {kind: summed(metrics, RequestCount(*read, 0), served(read)) for kind, read in READS.items()}


async def _snapshot(opa: Opa, kopa_pid: int, opa_pid: int) -> dict[str, Any]:
    reads = _reads(await opa.request_metrics())
    return {
        "time": time.monotonic(),
        "kopa_cpu": cpu_seconds(kopa_pid),
        "opa_cpu": cpu_seconds(opa_pid),
        "gets": {k: (v.count, v.seconds) for k, v in reads.items()},
        "writes": await opa.writes(),
    }


def _window(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    gets = {
        k: {
            "count": after["gets"][k][0] - before["gets"][k][0],
            "seconds": round(after["gets"][k][1] - before["gets"][k][1], 4),
        }
        for k in after["gets"]
    }
    return {
        "seconds": round(after["time"] - before["time"], 3),
        "kopa_cpu_seconds": round(after["kopa_cpu"] - before["kopa_cpu"], 3),
        "opa_cpu_seconds": round(after["opa_cpu"] - before["opa_cpu"], 3),
        "opa_gets": gets,
        "opa_writes": after["writes"] - before["writes"],
        "checks": gets["policies"]["count"],
    }


async def answer_sizes(opa: Opa) -> dict[str, int]:
    """The bytes of OPA's answers to what one check reads, as the bench reads them once: the policy list,
    one namespace subtree (all are alike), and the data documents together."""
    subtree = f"/v1/data/{'/'.join(REPLICATE_PATH)}/{namespace_of(0)}"
    sizes = {
        "policies": len((await opa.request("GET", "/v1/policies"))[1]),
        "subtree": len((await opa.request("GET", subtree))[1]),
        "data_documents": 0,
    }
    for i in range(DATA_DOCS):
        path = f"/v1/data/{POLICY_NAMESPACE}/drift-data-{i:02d}/{DATA_KEY}"
        sizes["data_documents"] += len((await opa.request("GET", path))[1])
    sizes["check"] = sum(sizes.values())
    return sizes


async def _loaded(opa: Opa, n: int, policies: int) -> None:
    async def done() -> bool:
        return bool(
            await opa.data("system/kopa/ready")
            and await opa.query("x := sum([count(objs) | objs := data.kubernetes.configmaps[_]])") == n
            and await opa.query("x := count(data.benchprop)") == policies
            and await opa.data(f"{POLICY_NAMESPACE}/drift-data-{DATA_DOCS - 1:02d}/{DATA_KEY}")
        )

    await poll_until(done, bool, interval=0.1, within=300, what="drift kopa loaded")


async def _repair(opa: Opa, trial: int, ns: str, policies: int, log: Any) -> dict[str, float]:
    """Deletes a policy, a data document and a namespace subtree in OPA; seconds until each is back."""
    subtree = "/".join([*REPLICATE_PATH, ns])
    policy = f"{POLICY_NAMESPACE}/{policy_configmap(trial % policies)['metadata']['name']}/main.rego"
    data = f"{POLICY_NAMESPACE}/drift-data-{trial % DATA_DOCS:02d}/{DATA_KEY}"
    start = time.monotonic()
    for path in (f"/v1/policies/{policy}", f"/v1/data/{data}", f"/v1/data/{subtree}"):
        status, payload = await opa.request("DELETE", path)
        if status not in (200, 204):
            raise RuntimeError(f"DELETE {path}: HTTP {status}: {payload[:200]!r}")
    deleted = time.monotonic()

    async def policy_back() -> bool:
        status, _ = await opa.request("GET", f"/v1/policies/{policy}")
        return status == 200

    async def data_back() -> bool:
        return await opa.data(data) is not None

    async def subtree_back() -> bool:
        return bool(await opa.query(f'x := count(data.{".".join(REPLICATE_PATH)}["{ns}"])') == PER_NAMESPACE)

    seen = await asyncio.gather(
        *(
            poll_until(p, bool, interval=POLL, within=120, what=w)
            for p, w in ((policy_back, policy), (data_back, data), (subtree_back, subtree))
        )
    )
    times = {
        k: round(s.received - start, 3) for k, s in zip(("policy", "data", "subtree"), seen, strict=True)
    }
    times["deleting"] = round(deleted - start, 3)
    log(
        f"  repair {trial + 1}: policy {times['policy']:.2f} s, data {times['data']:.2f} s,"
        f" namespace {ns} {times['subtree']:.2f} s"
    )
    return times


async def drift(
    stack: Stack,
    *,
    n: int,
    policies: int,
    interval: float,
    seconds: float,
    repairs: int,
    log: Any,
) -> dict[str, Any]:
    namespaces = (n + PER_NAMESPACE - 1) // PER_NAMESPACE
    decision_ns, names = churn.churn_objects(n, 300)
    async with stack.api() as api:
        await api.create_all(
            [data_configmap(i) for i in range(DATA_DOCS)],
            lambda _: f"/api/v1/namespaces/{POLICY_NAMESPACE}/configmaps",
        )
    result: dict[str, Any] = {
        "n": n,
        "namespaces": namespaces,
        "policies": policies,
        "data_documents": DATA_DOCS,
        "interval_seconds": interval,
        "window_seconds": seconds,
    }
    async with stack.opa_client() as opa:
        await churn.install_policies(opa, decision_ns, names)
        for label, value in (("off", "0"), ("on", f"{interval:g}s")):
            kopa = stack.kopa(f"drift-{label}", f"--drift-check-interval={value}")
            kopa.start()
            await _loaded(opa, n, policies)
            if label == "off":
                result["answer_bytes"] = await answer_sizes(opa)
            await asyncio.sleep(SETTLE)
            assert kopa.pid is not None and stack.opa.pid is not None
            before = await _snapshot(opa, kopa.pid, stack.opa.pid)
            decisions = await churn.idle_decisions(stack, decision_ns, names, seconds)
            after = await _snapshot(opa, kopa.pid, stack.opa.pid)
            window = _window(before, after)
            window["decisions_ms"] = decisions["decisions"]
            result[label] = window
            log(
                f"  drift check {label}: {window['checks']} checks in {window['seconds']:.1f} s,"
                f" kopa CPU {window['kopa_cpu_seconds']:.2f} s, OPA CPU {window['opa_cpu_seconds']:.2f} s,"
                f" decision p99 {decisions['decisions']['p99']:.2f} ms"
            )
            if label == "on":
                # The namespace at random: the check goes through them in order, so the next one after a
                # repair would always be found at once, and one drawn at random waits 0 to `namespaces`
                # intervals, uniformly.
                rng = random.Random(12)
                trials = []
                for t in range(repairs):
                    ns = namespace_of(rng.randrange(namespaces) * PER_NAMESPACE)
                    trials.append(await _repair(opa, t, ns, policies, log))
                result["repairs"] = trials
                result["repair_seconds"] = {
                    k: summary([t[k] for t in trials], 1, 3) for k in ("policy", "data", "subtree")
                }
            stack.stop_kopa(kopa)
    result["per_check"] = per_check(result)
    return result


def per_check(result: dict[str, Any]) -> dict[str, Any]:
    """One check's cost: the window with checks minus the one without (scaled to the same length)."""
    on, off = result["on"], result["off"]
    checks = on["checks"]
    if not checks:
        return {}
    scale = on["seconds"] / off["seconds"]

    def extra(key: str) -> float:
        return float(on[key] - off[key] * scale) / float(checks)

    gets = on["opa_gets"]
    kopa_cpu = extra("kopa_cpu_seconds")
    return {
        "kopa_cpu_ms": round(kopa_cpu * 1000, 2),
        "opa_cpu_ms": round(extra("opa_cpu_seconds") * 1000, 2),
        "answer_bytes": result["answer_bytes"]["check"],
        "opa_requests": round(sum(g["count"] for g in gets.values()) / checks, 2),
        "opa_request_ms": round(sum(g["seconds"] for g in gets.values()) / checks * 1000, 2),
        "opa_writes": round(on["opa_writes"] / checks, 3),
        # at the default --drift-check-interval of 60 s
        "kopa_core_percent_at_60s": round(kopa_cpu / 60 * 100, 4),
        "opa_core_percent_at_60s": round(extra("opa_cpu_seconds") / 60 * 100, 4),
    }
