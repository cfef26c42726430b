"""(2) Churn: a steady stream of updates, the lag until OPA shows each one, OPA's writes, decision latency.

Method. An updater process merge-patches `data.seq` of K objects round-robin at a fixed rate (open loop:
update i is due at t_start + i/rate, whatever the answers' latency), writing a sequence number that grows
with every update (and across runs), and records when the API server acknowledged it (the PATCH
response). A sampler process polls OPA every SAMPLE_INTERVAL (1 ms, start to start; one keep-alive
connection) for the K sequence numbers (one compiled policy, one small answer) and notes, per object,
each poll at which its number went up. Update i of object o counts
as visible at the first poll that shows o at seq >= i (a newer update makes the older one visible too:
that is what coalescing means). Its lag is that poll's answer time minus the acknowledgement: an upper
bound, too high by at most the resolution, the time from the previous poll's start to that answer (about
SAMPLE_INTERVAL plus one poll). What the sampler costs OPA is measured on its own (`sampler_cost`): OPA's
CPU and the decision latency over a few quiet seconds without it and with it. An acknowledgement can
reach the updater after kopa has already seen the change in its watch: such a lag is negative, and is
reported as it is.

Meanwhile a third process asks OPA for a decision that reads replicated data, DECISION_RATE times a
second, and records each one's latency. OPA's own /metrics count the write requests it served during the
run. At the end, once the updates have drained, OPA's copy of the whole collection is compared with a list
from the API server, object by object.

The phase (`churn_phase`) runs the sidecars (kopa, and Go kube-mgmt when it is there) side by side at each
rate, each run against a fresh OPA holding the N objects and a freshly started sidecar, the first side
alternating from trial to trial, and repeats that for several trials, so that a drift of the machine hits
both sides.
"""

from __future__ import annotations

import asyncio
import bisect
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

from bench import wire
from bench.common import JSON, KubeApi, Opa, cpu_seconds, percentile, poll_until, proc_memory, summary
from bench.dataset import COUNT_QUERY, FIELD_SELECTOR, PER_NAMESPACE, name_of, namespace_of, tree

if TYPE_CHECKING:  # the helper processes import this module: keep them light
    from bench.stack import Stack

SAMPLE_INTERVAL = 0.001
# Updates per run at the least: a slow rate runs longer than --churn-seconds (10/s: 50 s), so that a run's
# p50 is known to about 0.1 ms. With 200 updates, trials of one sidecar differed by 0.4 ms, as much as
# kopa and kube-mgmt differ at that rate.
MIN_UPDATES = 500
DECISION_RATE = 50
UPDATER_CONNECTIONS = 12


def churn_objects(n: int, objects: int) -> tuple[str, list[str]]:
    """The namespace and names of the churned objects: the first of the collection's last namespace."""
    first = (n - 1) // PER_NAMESPACE * PER_NAMESPACE
    return namespace_of(first), [name_of(first + i) for i in range(objects)]


def sample_policy(namespace: str, names: list[str]) -> str:
    """The sampler's probe: the objects' sequence numbers in the order of `names`, as one string (the
    cheapest answer for OPA to evaluate and encode: about 5 us an object, measured, plus the request)."""
    listed = ", ".join(f'"{n}"' for n in names)
    return (
        "package benchsample\n\n"
        f'seqs := concat(",", [data.kubernetes.configmaps["{namespace}"][name].data.seq |'
        f" some name in [{listed}]])\n"
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


# --- the sampler process ---------------------------------------------------------------------------------


def sampler_main(config: dict[str, Any], out: str, control: Connection) -> None:
    """Entry point of the sampler: polls OPA every SAMPLE_INTERVAL (start to start) on one keep-alive
    connection until told to stop, or told the final numbers and all of them are visible (or `drain` s
    passed). Writes {changes: {name: [[seq, sent, received, previous sent], ...]}, polls, poll_seconds}."""
    connection = http.client.HTTPConnection(config["host"], config["port"], timeout=30)
    interval: float = config["interval"]
    names: list[str] = config["names"]
    changes: dict[str, list[list[float]]] = {}
    last: dict[str, int] = {}
    poll_seconds: list[float] = []
    final: dict[str, int] | None = None
    deadline = float("inf")
    previous = time.monotonic()
    ready = False
    while True:
        sent = time.monotonic()
        connection.request("GET", "/v1/data/benchsample/seqs")
        response = connection.getresponse()
        payload = response.read()
        received = time.monotonic()
        poll_seconds.append(received - sent)
        value = orjson.loads(payload).get("result") if response.status == 200 else None
        if isinstance(value, str):
            for name, seq in zip(names, map(int, value.split(",")), strict=True):
                if seq != last.get(name):
                    last[name] = seq
                    changes.setdefault(name, []).append([seq, sent, received, previous])
        previous = sent
        if not ready:
            control.send("ready")
            ready = True
        if control.poll():
            message = control.recv()
            if message is None:
                break
            final, deadline = message["final"], time.monotonic() + message["drain"]
        if final is not None and (
            all(last.get(name, 0) >= seq for name, seq in final.items()) or time.monotonic() > deadline
        ):
            break
        delay = sent + interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    connection.close()
    Path(out).write_bytes(
        orjson.dumps(
            {
                "changes": changes,
                "last": last,
                "poll_seconds": poll_seconds,
                "cpu_seconds": time.process_time(),
            }
        )
    )


@dataclass
class Samples:
    # per object: (seq, poll sent, poll answered, previous poll sent), one entry per poll where seq went up
    changes: dict[str, list[tuple[int, float, float, float]]] = field(default_factory=dict)
    polls: int = 0
    poll_seconds: list[float] = field(default_factory=list)
    last: dict[str, int] = field(default_factory=dict)
    cpu_seconds: float = 0.0

    @classmethod
    def of(cls, found: dict[str, Any]) -> Samples:
        return cls(
            changes={k: [(int(c[0]), c[1], c[2], c[3]) for c in v] for k, v in found["changes"].items()},
            polls=len(found["poll_seconds"]),
            poll_seconds=found["poll_seconds"],
            last=found["last"],
            cpu_seconds=found["cpu_seconds"],
        )


def _sampler(stack: Stack, work: Path, name: str, names: list[str]) -> Helper:
    config = {"host": "127.0.0.1", "port": stack.opa.port, "interval": SAMPLE_INTERVAL, "names": names}
    return spawn_helper(sampler_main, config, work / f"samples-{name}.json")


async def _ready(helper: Helper) -> None:
    if not await asyncio.to_thread(helper.control.poll, 60):
        raise RuntimeError("the churn sampler did not get ready within 60 s")
    helper.control.recv()


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
    """A helper process (updater, decision client, sampler, or the bundle phase's prober) and its end of the
    control pipe."""

    process: multiprocessing.process.BaseProcess
    control: Connection
    out: Path

    def result(self) -> Any:
        if self.process.exitcode != 0:
            raise RuntimeError(f"a helper process failed (exit code {self.process.exitcode})")
        return orjson.loads(self.out.read_bytes())


def spawn_helper(target: Any, config: dict[str, Any], out: Path) -> Helper:
    """Starts a helper in a fresh interpreter (spawn: nothing of the bench's event loop is inherited)."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=target, args=(config, str(out), theirs), daemon=True)
    process.start()
    return Helper(process, ours, out)


async def start_together(helpers: list[Helper], lead: float = 0.3) -> float:
    """Waits until every helper is ready (imports done, connections open), then gives them one start time."""
    for helper in helpers:
        if not await asyncio.to_thread(helper.control.poll, 60):
            raise RuntimeError("a helper process did not get ready within 60 s")
        helper.control.recv()
    start = time.monotonic() + lead
    for helper in helpers:
        helper.control.send(start)
    return start


async def install_policies(opa: Opa, namespace: str, names: list[str]) -> None:
    await opa.put_policy("bench/sample.rego", sample_policy(namespace, names))
    await opa.put_policy("bench/decision.rego", DECISION_POLICY)


async def idle_decisions(
    stack: Stack, namespace: str, names: list[str], seconds: float, with_sampler: bool = False
) -> dict[str, Any]:
    """Decision latency with no churn, as a reference; with the churn's sampler polling meanwhile, what
    the sampler costs OPA (its CPU, and the decisions' latency)."""
    config = {
        "host": "127.0.0.1",
        "port": stack.opa.port,
        "namespace": namespace,
        "names": names,
        "rate": DECISION_RATE,
        "seconds": seconds,
    }
    helper = spawn_helper(decisions_main, config, stack.work / "decisions-idle.json")
    sampler = _sampler(stack, stack.work, "idle", names) if with_sampler else None
    if sampler is not None:
        await _ready(sampler)
    opa_cpu = cpu_seconds(stack.opa.pid) if stack.opa.pid else 0.0
    start = await start_together([helper])
    await asyncio.to_thread(helper.process.join, seconds + 60)
    opa_cores = ((cpu_seconds(stack.opa.pid) if stack.opa.pid else 0.0) - opa_cpu) / (
        time.monotonic() - start
    )
    rows = helper.result()["rows"]
    result = {
        "seconds": seconds,
        "decisions": summary([r[1] for r in rows], 1000, 2),
        "opa_cpu_cores": round(opa_cores, 3),
    }
    if sampler is not None:
        sampler.control.send(None)
        await asyncio.to_thread(sampler.process.join, 30)
        samples = Samples.of(sampler.result())
        result["sampler"] = {
            "interval_ms": SAMPLE_INTERVAL * 1000,
            "polls": samples.polls,
            "poll_ms": summary(samples.poll_seconds, 1000, 3),
            "cpu_seconds": round(samples.cpu_seconds, 3),
        }
    return result


def _content(obj: Any) -> Any:
    """What both sidecars must replicate alike (their metadata differ: kopa drops managedFields): the
    objects are compared on their data, labels and resourceVersion."""
    if not isinstance(obj, dict):
        return obj
    meta = obj.get("metadata") or {}
    return (obj.get("data"), meta.get("labels"), meta.get("resourceVersion"))


async def equality(api: KubeApi, opa: Opa) -> dict[str, Any]:
    """Compares OPA's copy of the whole collection with the API server's, object by object."""
    items = await api.list_all("/api/v1/configmaps", FIELD_SELECTOR)
    expected = {ns: {n: _content(o) for n, o in objs.items()} for ns, objs in tree(items).items()}
    status, payload = await opa.request("GET", "/v1/data/kubernetes/configmaps")
    found: JSON = orjson.loads(payload).get("result") or {} if status == 200 else {}
    actual = {ns: {n: _content(o) for n, o in objs.items()} for ns, objs in found.items()}
    keys = {(ns, n) for ns, objs in expected.items() for n in objs}
    keys |= {(ns, n) for ns, objs in actual.items() for n in objs}
    differing = sum(1 for ns, n in keys if expected.get(ns, {}).get(n) != actual.get(ns, {}).get(n))
    return {"equal": differing == 0, "objects": len(items), "differing_objects": differing}


async def churn_run(
    stack: Stack,
    *,
    n: int,
    rate: float,
    seconds: float,
    objects: int,
    pids: dict[str, int],
    log: Any,
    sidecar: int | None = None,
) -> dict[str, Any]:
    """One run at `rate`; `pids` are the processes whose CPU use is reported (kopa, OPA, API server...).
    With the `sidecar`'s pid, its own latency is also taken on the wire (bench/wire.py)."""
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

        expected = ",".join(str(current[name]) for name in names)
        await poll_until(
            seqs, lambda v: v == expected, interval=0.05, within=60, what="OPA settled before churn"
        )
        base: dict[str, Any] = {"namespace": namespace, "names": names}
        updater = spawn_helper(
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
        decisions = spawn_helper(
            decisions_main,
            {**base, "host": "127.0.0.1", "port": stack.opa.port, "rate": DECISION_RATE, "seconds": seconds},
            work / f"decisions-{rate:g}.json",
        )
        sampler = _sampler(stack, work, f"{rate:g}", names)
        await _ready(sampler)
        capture = ports = None
        if sidecar is not None:
            capture = spawn_helper(
                wire.capture_main,
                {"api_port": stack.kube.port, "opa_port": stack.opa.port},
                work / f"wire-{rate:g}.json",
            )
            await _ready(capture)
            ports = wire.local_ports(sidecar)
        writes_before = await opa.write_time()
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        start = await start_together([updater, decisions])
        updater_ports = wire.local_ports(updater.process.pid) if capture and updater.process.pid else set()
        await asyncio.to_thread(updater.process.join, seconds + 120)
        cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
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

        # what never showed is counted below
        sampler.control.send({"final": final, "drain": 60.0})
        await asyncio.to_thread(sampler.process.join, 120)
        samples = Samples.of(sampler.result())
        cpu["bench (sampler)"] = samples.cpu_seconds
        written = await opa.write_time()
        delays: list[float] | None = None
        delivery: list[float] | None = None
        if capture is not None and ports is not None and sidecar is not None:
            ports |= wire.local_ports(sidecar)
            capture.control.send(None)
            await asyncio.to_thread(capture.process.join, 30)
            rows = capture.result()
            delays = wire.sidecar_delays(rows, ports)
            delivery = wire.delivery_offsets(rows, ports, updater_ports)
        writes = written.count - writes_before.count
        write_seconds = written.seconds - writes_before.seconds
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
        f" p99 {percentile(lag, 99) * 1000:.0f} ms, {writes} OPA writes"
        f" ({write_seconds / max(writes, 1) * 1000:.2f} ms each in OPA), equal={equal['equal']}"
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
        # OPA's own time per write, from reading the request to answering (its write lock included).
        "opa_write_ms": round(write_seconds / writes * 1000, 3) if writes else None,
        # The sidecar's own time, watch event to write, on the wire (None: not captured; bench/wire.py).
        "wire_ms": summary(delays, 1000, 3) if delays is not None else None,
        # The watch event's packet relative to the API server's answer to the update (negative: before it).
        "delivery_ms": summary(delivery, 1000, 3) if delivery else None,
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


# --- the phase: at each rate the sidecars side by side, several trials ----------------------------------


async def churn_phase(
    stack: Stack,
    *,
    n: int,
    rates: list[float],
    seconds: float,
    objects: int,
    trials: int,
    min_updates: int = MIN_UPDATES,
    log: Any,
) -> dict[str, Any]:
    """Trial after trial, at each rate (for `seconds`, or longer for `min_updates`) each sidecar in turn,
    started afresh against a fresh OPA holding the N objects.

    Returns {"churn": [run, ...] (each with its "side" and "trial"), "decisions_idle": ...,
    "sampler_cost": ..., "churn_peak_rss_bytes": {side: bytes}}.
    """
    namespace, names = churn_objects(n, objects)
    no_capture = wire.unavailable()
    if no_capture:
        log(f"  the sidecars' own latency on the wire is not measured: {no_capture}")
    out: dict[str, Any] = {
        "churn": [],
        "churn_peak_rss_bytes": {},
        "churn_min_updates": min_updates,
        "wire_unavailable": no_capture,
    }
    shape = _Shape(n, namespace, names, seconds, objects, min_updates, no_capture)
    for trial in range(1, trials + 1):
        # Side by side at each rate, the first side alternating from trial to trial: a slow spell of the
        # machine (minutes long on this one) then hits both sides of a comparison, not one side's rates.
        sides = stack.sides if trial % 2 else stack.sides[::-1]
        for rate in rates:
            for side in sides:
                await _one_run(stack, out, side, trial, rate, shape=shape, log=log)
    return out


@dataclass(frozen=True)
class _Shape:
    """What every run of the phase shares."""

    n: int
    namespace: str
    names: list[str]
    seconds: float
    objects: int
    min_updates: int
    no_capture: str | None


async def _one_run(
    stack: Stack, out: dict[str, Any], side: str, trial: int, rate: float, *, shape: _Shape, log: Any
) -> None:
    """One run: a fresh OPA, the sidecar started and loaded with the N objects, the churn at one rate."""
    stack.fresh_opa()
    process = stack.sidecar(side, f"churn-{trial}-{rate:g}")
    process.start()
    try:
        async with stack.opa_client() as opa:

            async def count() -> Any:
                return await opa.query(COUNT_QUERY)

            await poll_until(count, lambda v: v == shape.n, interval=0.05, within=300, what=f"{side} loaded")
            await install_policies(opa, shape.namespace, shape.names)
        if "sampler_cost" not in out:
            quiet = await idle_decisions(stack, shape.namespace, shape.names, 5.0)
            sampled = await idle_decisions(stack, shape.namespace, shape.names, 5.0, with_sampler=True)
            out["decisions_idle"] = quiet
            out["sampler_cost"] = {"without": quiet, "with": sampled}
            log(
                f"  no churn: decision p99 {quiet['decisions']['p99']:.2f} ms, OPA"
                f" {quiet['opa_cpu_cores']:.3f} cores; with the sampler"
                f" ({sampled['sampler']['poll_ms']['p50']:.2f} ms a poll):"
                f" {sampled['decisions']['p99']:.2f} ms, OPA {sampled['opa_cpu_cores']:.3f} cores"
            )
        assert process.pid is not None and stack.opa.pid is not None
        pids = {
            side: process.pid,
            "OPA": stack.opa.pid,
            "kube-apiserver": stack.kube.apiserver.pid,
            "etcd": stack.kube.etcd.pid,
        }
        duration = max(shape.seconds, shape.min_updates / rate)
        log(f"  trial {trial}, {side}: {rate:g} updates/s for {duration:g} s, {shape.objects} objects")
        run = await churn_run(
            stack,
            n=shape.n,
            rate=rate,
            seconds=duration,
            objects=shape.objects,
            pids={k: v for k, v in pids.items() if v is not None},
            log=log,
            sidecar=process.pid if shape.no_capture is None else None,
        )
        out["churn"].append({"side": side, "trial": trial, **run})
        if process.pid is not None and (side != "kopa" or stack.profile_dir is None):
            peak = proc_memory(process.pid)["VmHWM"]
            out["churn_peak_rss_bytes"][side] = max(peak, out["churn_peak_rss_bytes"].get(side, 0))
    finally:
        stack.stop_sidecar(process)
