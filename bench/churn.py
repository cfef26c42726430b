"""(2) Churn: a steady stream of updates, the lag until OPA shows each one, OPA's writes, decision latency.

Method. An updater process merge-patches `data.seq` of K objects round-robin at a fixed rate (open loop:
update i is due at t_start + i/rate, whatever the answers' latency), writing a sequence number that grows
with every update (and across runs), and records when the API server acknowledged it (the PATCH
response). A sampler polls OPA every SAMPLE_INTERVAL for the K sequence numbers (one compiled policy, one
small answer) and notes, per object, each poll at which its number went up. Update i of object o counts
as visible at the first poll that shows o at seq >= i (a newer update makes the older one visible too:
that is what coalescing means). Its lag is that poll's answer time minus the acknowledgement: an upper
bound, too high by at most the resolution, the time from the previous poll's start to that answer (about
SAMPLE_INTERVAL plus one poll). An acknowledgement can reach the updater after kopa has already seen the
change in its watch: such a lag is negative, and is reported as it is.

Meanwhile a third process asks OPA for a decision that reads replicated data, DECISION_RATE times a
second, and records each one's latency. OPA's own /metrics count the write requests it served during the
run. At the end, once the updates have drained, OPA's copy of the whole collection is compared with a list
from the API server, object by object.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import http.client
import itertools
import multiprocessing
import random
import ssl
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from bench.common import JSON, KubeApi, Opa, cpu_seconds, percentile, poll_until, summary
from bench.dataset import FIELD_SELECTOR, PER_NAMESPACE, name_of, namespace_of, tree

if TYPE_CHECKING:  # the helper processes import this module: keep them light
    from bench.stack import Stack

SAMPLE_INTERVAL = 0.02
DECISION_RATE = 50
UPDATER_CONNECTIONS = 12


def churn_objects(n: int, objects: int) -> tuple[str, list[str]]:
    """The namespace and names of the churned objects: the first of the collection's last namespace."""
    first = (n - 1) // PER_NAMESPACE * PER_NAMESPACE
    return namespace_of(first), [name_of(first + i) for i in range(objects)]


def sample_policy(namespace: str, names: list[str]) -> str:
    listed = ", ".join(f'"{n}"' for n in names)
    return (
        "package benchsample\n\n"
        f"names := {{{listed}}}\n\n"
        f'seqs := {{name: to_number(data.kubernetes.configmaps["{namespace}"][name].data.seq) |'
        " some name in names}\n"
    )


DECISION_POLICY = """package benchdecision

default allow := false

allow if data.kubernetes.configmaps[input.namespace][input.name].data.owner == input.user
"""


# --- the updater process ---------------------------------------------------------------------------------


def updater_main(config: dict[str, Any], out: str, control: Connection) -> None:
    """Entry point of the updater process: writes [[object, seq, sent, acked, status], ...] to `out`."""
    rows = asyncio.run(_update(config, control))
    Path(out).write_bytes(orjson.dumps({"rows": rows, "cpu_seconds": time.process_time()}))


async def _update(config: dict[str, Any], control: Connection) -> list[list[Any]]:
    names: list[str] = config["names"]
    rate: float = config["rate"]
    total = int(rate * config["duration"])
    base: int = config["seq_base"]  # above every number written before, so each run's numbers are new
    context = ssl.create_default_context(cafile=config["ca_file"])
    headers = {
        "Authorization": f"Bearer {config['token']}",
        "Content-Type": "application/merge-patch+json",
        "Accept": "application/json",
    }
    url = f"{config['server']}/api/v1/namespaces/{config['namespace']}/configmaps/"
    rows: list[list[Any]] = []
    indexes = itertools.count()
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=context, limit=UPDATER_CONNECTIONS),
        timeout=aiohttp.ClientTimeout(total=60),
    ) as session:

        async def warm(name: str) -> None:
            async with session.get(url + name, headers=headers) as resp:
                await resp.read()

        # Open every connection (TLS handshakes) before the clock starts, then wait for the start time.
        await asyncio.gather(*(warm(names[i % len(names)]) for i in range(UPDATER_CONNECTIONS)))
        control.send("ready")
        start: float = control.recv()

        async def worker() -> None:
            for i in indexes:
                if i >= total:
                    return
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                obj = i % len(names)
                seq = base + i + 1
                body = orjson.dumps({"data": {"seq": str(seq)}})
                sent = time.monotonic()
                async with session.patch(url + names[obj], data=body, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
                rows.append([obj, seq, sent, time.monotonic(), status])

        await asyncio.gather(*(worker() for _ in range(UPDATER_CONNECTIONS)))
    return rows


# --- the decision client process -------------------------------------------------------------------------


def decisions_main(config: dict[str, Any], out: str, control: Connection) -> None:
    """Entry point of the decision client: one keep-alive connection, writes [[sent, seconds], ...]."""
    names: list[str] = config["names"]
    rate: float = config["rate"]
    rng = random.Random(7)
    connection = http.client.HTTPConnection(config["host"], config["port"], timeout=30)

    def decide() -> float:
        name = rng.choice(names)
        body = orjson.dumps(
            {"input": {"namespace": config["namespace"], "name": name, "user": f"user-{rng.randrange(97)}"}}
        )
        sent = time.monotonic()
        connection.request("POST", "/v1/data/benchdecision/allow", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"decision: HTTP {response.status}")
        return sent

    decide()  # connected and warm before the clock starts
    control.send("ready")
    start: float = control.recv()
    end = start + config["seconds"]
    rows: list[list[float]] = []
    i = 0
    while (due := start + i / rate) < end:
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent = decide()
        rows.append([sent, time.monotonic() - sent])
        i += 1
    connection.close()
    Path(out).write_bytes(orjson.dumps({"rows": rows, "cpu_seconds": time.process_time()}))


# --- the sampler (in the bench process) ------------------------------------------------------------------


@dataclass
class Samples:
    # per object: (seq, poll sent, poll answered, previous poll sent), one entry per poll where seq went up
    changes: dict[str, list[tuple[int, float, float, float]]] = field(default_factory=dict)
    polls: int = 0
    poll_seconds: list[float] = field(default_factory=list)
    last: dict[str, int] = field(default_factory=dict)


async def sample(opa: Opa, until: float, samples: Samples) -> None:
    previous = time.monotonic()
    while True:
        sent = time.monotonic()
        if sent >= until:
            return
        value = await opa.data("benchsample/seqs")
        received = time.monotonic()
        samples.polls += 1
        samples.poll_seconds.append(received - sent)
        if isinstance(value, dict):
            for name, seq in value.items():
                if seq != samples.last.get(name):
                    samples.last[name] = int(seq)
                    samples.changes.setdefault(name, []).append((int(seq), sent, received, previous))
        previous = sent
        await asyncio.sleep(max(0.0, sent + SAMPLE_INTERVAL - time.monotonic()))


def lags(
    updates: list[list[Any]], names: list[str], samples: Samples
) -> tuple[list[float], list[float], int]:
    """Lag and resolution of each acknowledged update, and how many never became visible."""
    found: list[float] = []
    resolutions: list[float] = []
    missing = 0
    index = {name: [c[0] for c in samples.changes.get(name, [])] for name in names}
    for obj, seq, _sent, acked, status in updates:
        if status != 200:
            continue
        name = names[obj]
        at = bisect.bisect_left(index[name], seq)
        if at == len(index[name]):
            missing += 1
            continue
        _, _, received, previous = samples.changes[name][at]
        found.append(received - acked)
        resolutions.append(received - previous)
    return found, resolutions, missing


# --- one churn run -------------------------------------------------------------------------------------


@dataclass
class Helper:
    """A helper process (updater or decision client) and its end of the control pipe."""

    process: multiprocessing.process.BaseProcess
    control: Connection
    out: Path

    def result(self) -> Any:
        if self.process.exitcode != 0:
            raise RuntimeError(f"a churn helper process failed (exit code {self.process.exitcode})")
        return orjson.loads(self.out.read_bytes())


def _spawn(target: Any, config: dict[str, Any], out: Path) -> Helper:
    """Starts a helper in a fresh interpreter (spawn: nothing of the bench's event loop is inherited)."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=target, args=(config, str(out), theirs), daemon=True)
    process.start()
    return Helper(process, ours, out)


async def _start_together(helpers: list[Helper], lead: float = 0.3) -> float:
    """Waits until every helper is ready (imports done, connections open), then gives them one start time."""
    for helper in helpers:
        if not await asyncio.to_thread(helper.control.poll, 60):
            raise RuntimeError("a churn helper process did not get ready within 60 s")
        helper.control.recv()
    start = time.monotonic() + lead
    for helper in helpers:
        helper.control.send(start)
    return start


async def install_policies(opa: Opa, namespace: str, names: list[str]) -> None:
    await opa.put_policy("bench/sample.rego", sample_policy(namespace, names))
    await opa.put_policy("bench/decision.rego", DECISION_POLICY)


async def idle_decisions(stack: Stack, namespace: str, names: list[str], seconds: float) -> dict[str, Any]:
    """Decision latency with no churn, as a reference."""
    config = {
        "host": "127.0.0.1",
        "port": stack.opa.port,
        "namespace": namespace,
        "names": names,
        "rate": DECISION_RATE,
        "seconds": seconds,
    }
    helper = _spawn(decisions_main, config, stack.work / "decisions-idle.json")
    await _start_together([helper])
    await asyncio.to_thread(helper.process.join, seconds + 60)
    rows = helper.result()["rows"]
    return {"seconds": seconds, "decisions": summary([r[1] for r in rows], 1000, 2)}


async def equality(api: KubeApi, opa: Opa) -> dict[str, Any]:
    """Compares OPA's copy of the whole collection with the API server's, object by object."""
    items = await api.list_all("/api/v1/configmaps", FIELD_SELECTOR)
    expected = tree(items)
    status, payload = await opa.request("GET", "/v1/data/kubernetes/configmaps")
    actual: JSON = orjson.loads(payload).get("result") or {} if status == 200 else {}
    keys = {(ns, n) for ns, objs in expected.items() for n in objs}
    keys |= {(ns, n) for ns, objs in actual.items() for n in objs}
    differing = sum(1 for ns, n in keys if expected.get(ns, {}).get(n) != actual.get(ns, {}).get(n))
    return {"equal": differing == 0, "objects": len(items), "differing_objects": differing}


async def churn_run(
    stack: Stack, *, n: int, rate: float, seconds: float, objects: int, pids: dict[str, int], log: Any
) -> dict[str, Any]:
    """One run at `rate`; `pids` are the processes whose CPU use is reported (kopa, OPA, API server...)."""
    namespace, names = churn_objects(n, objects)
    work = stack.work
    async with stack.api() as api, stack.opa_client() as opa:
        await install_policies(opa, namespace, names)
        # Wait until OPA shows the current numbers, so that the sampler starts from a settled state.
        items = await api.list_all(f"/api/v1/namespaces/{namespace}/configmaps")
        current = {
            o["metadata"]["name"]: int(o["data"]["seq"]) for o in items if o["metadata"]["name"] in names
        }

        async def seqs() -> Any:
            return await opa.data("benchsample/seqs")

        await poll_until(
            seqs, lambda v: v == current, interval=0.05, within=60, what="OPA settled before churn"
        )
        base: dict[str, Any] = {"namespace": namespace, "names": names}
        updater = _spawn(
            updater_main,
            {
                **base,
                "rate": rate,
                "duration": seconds,
                "seq_base": max(current.values(), default=0),
                "server": stack.kube.url,
                "token": stack.kube.admin_token,
                "ca_file": str(stack.kube.ca_file),
            },
            work / f"updates-{rate:g}.json",
        )
        decisions = _spawn(
            decisions_main,
            {**base, "host": "127.0.0.1", "port": stack.opa.port, "rate": DECISION_RATE, "seconds": seconds},
            work / f"decisions-{rate:g}.json",
        )
        writes_before = await opa.writes()
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        bench_cpu_before = time.process_time()
        samples = Samples()
        sampler = asyncio.create_task(sample(opa, time.monotonic() + seconds + 180.0, samples))
        start = await _start_together([updater, decisions])
        await asyncio.to_thread(updater.process.join, seconds + 120)
        cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
        cpu["bench (sampler)"] = time.process_time() - bench_cpu_before
        window = time.monotonic() - start
        await asyncio.to_thread(decisions.process.join, 60)
        updater_out, decisions_out = updater.result(), decisions.result()
        updates, decided = updater_out["rows"], decisions_out["rows"]
        cpu["bench (updater)"] = updater_out["cpu_seconds"]
        cpu["bench (decisions)"] = decisions_out["cpu_seconds"]
        # Drain: the last acknowledged number of every object must show in OPA.
        final: dict[str, int] = {}
        for obj, seq, _s, _a, status in updates:
            if status == 200:
                final[names[obj]] = max(final.get(names[obj], 0), seq)

        async def drained() -> bool:
            return all(samples.last.get(name, 0) >= seq for name, seq in final.items())

        with contextlib.suppress(TimeoutError):  # what never showed is counted below
            await poll_until(drained, bool, interval=0.05, within=60, what="churn drained")
        sampler.cancel()
        writes = await opa.writes() - writes_before
        equal = await equality(api, opa)

    acked = [u for u in updates if u[4] == 200]
    if len(acked) < len(updates) * 0.99:
        statuses = sorted({u[4] for u in updates})
        raise RuntimeError(
            f"churn at {rate:g}/s: only {len(acked)} of {len(updates)} updates acked ({statuses})"
        )
    lag, resolution, missing = lags(updates, names, samples)
    duration = max(u[3] for u in acked) - start if acked else 0.0
    log(
        f"  {rate:g}/s: {len(acked)} updates acked, lag p50 {percentile(lag, 50) * 1000:.0f} ms"
        f" p99 {percentile(lag, 99) * 1000:.0f} ms, {writes} OPA writes, equal={equal['equal']}"
    )
    return {
        "rate": rate,
        "seconds": seconds,
        "objects": objects,
        "updates_sent": len(updates),
        "updates_acked": len(acked),
        "updates_failed": len(updates) - len(acked),
        "achieved_rate": round(len(acked) / duration, 1) if duration else 0.0,
        "ack_latency_ms": summary([u[3] - u[2] for u in acked], 1000, 2),
        "lag_ms": summary(lag, 1000, 2),
        "lag_min_ms": round(min(lag) * 1000, 2) if lag else None,
        "never_visible": missing,
        "resolution_ms": summary(resolution, 1000, 2),
        "sampler": {"polls": samples.polls, "poll_ms": summary(samples.poll_seconds, 1000, 2)},
        "opa_writes": writes,
        "opa_writes_per_update": round(writes / len(acked), 4) if acked else None,
        "decisions": summary([d[1] for d in decided], 1000, 2),
        "equality": equal,
        # CPU used during the updates (cores: CPU seconds per second of the run), per process.
        "cpu_cores": {name: round(used / window, 3) for name, used in cpu.items()},
        # For the plots, kept small (the JSON is committed): the lag's quantiles, and per second of the
        # run its median and maximum.
        **lag_profile([(u[3] - start, x * 1000) for u, x in _paired(updates, names, samples)]),
    }


def lag_profile(series: list[tuple[float, float]]) -> dict[str, Any]:
    """Quantiles of the lags (ms): every 1% up to p99, every 0.1% above; and [second, p50, max] per second."""
    lags = [lag for _, lag in series]
    steps = [q / 10 for q in range(0, 990, 10)] + [q / 10 for q in range(990, 1001)]
    per_second: dict[int, list[float]] = {}
    for at, lag in series:
        per_second.setdefault(int(at), []).append(lag)
    return {
        "lag_quantiles_ms": [[q, round(percentile(lags, q), 1)] for q in steps] if lags else [],
        "lag_per_second_ms": [
            [second, round(percentile(lags_then, 50), 1), round(max(lags_then), 1)]
            for second, lags_then in sorted(per_second.items())
        ],
    }


def _paired(updates: list[list[Any]], names: list[str], samples: Samples) -> list[tuple[list[Any], float]]:
    out = []
    index = {name: [c[0] for c in samples.changes.get(name, [])] for name in names}
    for update in updates:
        obj, seq, _sent, acked, status = update
        if status != 200:
            continue
        at = bisect.bisect_left(index[names[obj]], seq)
        if at < len(index[names[obj]]):
            out.append((update, samples.changes[names[obj]][at][2] - acked))
    return out
