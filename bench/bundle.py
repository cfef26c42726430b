"""(8) Bundle mode (issue 16): one kopa serving its bundle to a fleet of OPAs, against push mode's sidecars.

The stack: `objects` Services (headless, small) in SERVICE_NAMESPACES namespaces, and one data ConfigMap in
bench-bundle; kopa in bundle mode replicates v1/services and loads policies and data from bench-bundle,
with its private validation OPA at --opa-url (started from `validation_opa_config`, before kopa, so that its
config names kopa's bundle port); `opas` OPAs (`opa run --server`, kopa as their bundle service, long
polling, the token from a file) download the bundle.

- Fan-out: from kopa's start until every OPA holds every object; then `changes` changes one at a time,
  alternately an annotation of a Service (a replicated object) and the data ConfigMap's JSON, each made
  through the API server and followed by the prober process (`bench/probe.py`) polling every OPA about every
  millisecond until each answers with it. The lag of a change is the answer of the last OPA minus the
  API server's acknowledgement. kopa's /metrics before and after the series say how the changes travelled
  (`kopa_bundle_responses_total{kind}`: snapshot or delta) and their bytes (`kopa_bundle_sent_bytes_total`);
  /proc/<pid>/stat the CPU that kopa, the OPAs and the validation OPA used meanwhile.
- Bytes: a delta's bytes per OPA and per change, against the snapshot each OPA downloaded at start.
- Watches and memory: the watches open on the API server (its /metrics, `apiserver_longrunning_requests`
  with verb WATCH, less those open before the topology started) and the sidecars' RSS, for 1 kopa feeding
  `opas` OPAs, then `opas` push-mode kopas each writing into its own OPA, then (when its binary is there)
  `opas` Go kube-mgmt sidecars the same way; each loaded with the same Services and data ConfigMap.
- Load against the number of policy modules: bench/modules.py, which shares this module's stack.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import probe
from bench.churn import spawn_helper, start_together
from bench.common import KubeApi, Opa, cpu_seconds, poll_until, proc_memory, summary
from bench.dataset import BUNDLE_NAMESPACE, DATA_LABEL, labelled_configmap
from bench.stack import KOPA, KUBE_MGMT, Stack
from devstack.kopa import KopaProcess
from devstack.opa import OpaServer
from devstack.processes import HOST, ManagedProcess, free_port

SERVICE_NAMESPACES = 4
ANNOTATION = "benchseq"
DATA_CONFIGMAP = "bundle-data"
DATA_KEY = "seq.json"
BUNDLE = "kopa"  # the bundle kopa serves, at <url>/bundles/kopa
VALIDATION_BUNDLE = "kopa-validation"  # the candidate bundle the validation OPA is to download
POLL = 0.02
# The downloading OPAs' polling: long polls of 60 s, and a retry within 1 s of an error (kopa not up yet).
POLLING = {"min_delay_seconds": 1, "max_delay_seconds": 1, "long_polling_timeout_seconds": 60}
SERVICES_QUERY = "x := sum([count(s) | s := data.kubernetes.services[_]])"
DATA_PATH = f"{BUNDLE_NAMESPACE}/{DATA_CONFIGMAP}/{DATA_KEY}/seq"


def service_namespace(i: int) -> str:
    return f"bench-svc-{i % SERVICE_NAMESPACES:02d}"


def service(i: int) -> dict[str, Any]:
    """A headless Service (no cluster IP to allocate): about 560 bytes of JSON as kopa replicates it."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": f"svc-{i:04d}",
            "namespace": service_namespace(i),
            "labels": {"app.kubernetes.io/name": "bench", "team": f"team-{i % 16}"},
        },
        "spec": {"clusterIP": "None", "selector": {"app": f"app-{i}"}, "ports": [{"port": 80 + i % 7}]},
    }


def data_configmap(seq: int) -> dict[str, Any]:
    return labelled_configmap(
        BUNDLE_NAMESPACE, DATA_CONFIGMAP, DATA_LABEL, {DATA_KEY: orjson.dumps({"seq": seq}).decode()}
    )


# --- the OPAs' configurations ------------------------------------------------------------------------------


def _bundle_service(url: str, token_file: Path) -> dict[str, Any]:
    return {"url": url, "credentials": {"bearer": {"token_path": str(token_file)}}}


def fleet_opa_config(url: str, token_file: Path) -> dict[str, Any]:
    """An OPA that downloads kopa's bundle from `url` (its bundle endpoint), as the chart configures one."""
    return {
        "services": {"kopa": _bundle_service(url, token_file)},
        "bundles": {BUNDLE: {"service": "kopa", "resource": f"bundles/{BUNDLE}", "polling": POLLING}},
    }


def validation_opa_config(url: str, token_file: Path) -> dict[str, Any]:
    """kopa's private validation OPA (--opa-url), as README's "Bundle mode" gives it: it downloads the
    candidate bundles kopa serves it, so that a batch of modules is compiled once by OPA's own bundle plugin,
    and its status plugin is on, for kopa to read the outcome. The one place that shapes it."""
    return {
        "services": {"kopa": _bundle_service(url, token_file)},
        "bundles": {
            VALIDATION_BUNDLE: {
                "service": "kopa",
                "resource": f"bundles/{VALIDATION_BUNDLE}",
                "polling": POLLING,
            }
        },
        "status": {"prometheus": True},
    }


def config_opa(work: Path, config: dict[str, Any]) -> OpaServer:
    """A plain OPA (not started) run with `config` as its config file; logs errors only."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_bytes(orjson.dumps(config, option=orjson.OPT_INDENT_2))
    return OpaServer(work, "plain", extra_args=("--config-file=config.json",))


@dataclass
class BundleKopa:
    """kopa in bundle mode (not started) and its validation OPA (started)."""

    kopa: KopaProcess
    validation: OpaServer
    url: str  # the bundle service's URL, for the OPAs' config
    port: int

    def stop(self, stack: Stack) -> None:
        stack.stop_kopa(self.kopa)
        self.validation.stop()


def bundle_kopa(stack: Stack, name: str, token_file: Path, namespaces: str, replicate: bool) -> BundleKopa:
    """kopa in bundle mode on a port picked first, so that its validation OPA's config can name it."""
    port = free_port()
    url = f"http://{HOST}:{port}"
    validation = config_opa(stack.work / f"validation-{name}", validation_opa_config(url, token_file))
    validation.start()
    kopa = stack.kopa(
        name,
        f"--bundle-endpoint={HOST}:{port}",
        f"--bundle-token-file={token_file}",
        f"--leader-election-namespace={namespaces}",
        namespaces=namespaces,
        replicate=replicate,
        resource="v1/services",
        opa_url=validation.api_url,
    )
    return BundleKopa(kopa, validation, url, port)


def bundle_token(stack: Stack) -> Path:
    """The file of the token the OPAs send to kopa's bundle endpoint (one for the phase)."""
    path = stack.work / "bundle-token"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(24) + "\n")
        path.chmod(0o600)
    return path


async def listening(port: int, process: ManagedProcess, within: float = 60) -> None:
    """kopa's bundle port accepts connections (kopa binds it before its tasks start)."""

    async def connects() -> bool:
        if not process.running:
            raise RuntimeError(f"{process.name} exited: {process.tail_log(20)}")
        try:
            _, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            return False
        writer.close()
        await writer.wait_closed()
        return True

    await poll_until(connects, bool, interval=POLL, within=within, what=f"port {port} listening")


async def kopa_metrics(kopa: KopaProcess) -> dict[str, float]:
    """kopa's /metrics, one value per series name with its labels (`name{labels}`)."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(kopa.health_url + "/metrics") as resp,
    ):
        text = await resp.text()
    return prometheus_samples(text)


async def kopa_idle(kopa: KopaProcess, within: float = 300) -> None:
    """kopa's work queues are empty and nothing is in work (its statuses written, say)."""

    async def busy() -> float:
        metrics = await kopa_metrics(kopa)
        return sum(
            v
            for k, v in metrics.items()
            if k.startswith(("workqueue_depth{", "workqueue_unfinished_work_seconds{"))
        )

    await poll_until(busy, lambda b: b == 0, interval=0.1, within=within, what="kopa idle")


def prometheus_samples(text: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def bundle_counts(metrics: dict[str, float], name: str) -> dict[str, float]:
    """The kopa_bundle_* counter `name` by kind."""
    prefix = f'{name}{{kind="'
    return {k[len(prefix) : -2]: v for k, v in metrics.items() if k.startswith(prefix)}


# --- watches on the API server ---------------------------------------------------------------------------


async def open_watches(api: KubeApi) -> dict[str, int]:
    """Watches open now on the API server, by resource."""
    status, payload = await api.request("GET", "/metrics")
    if status != 200:
        raise RuntimeError(f"the API server's /metrics: HTTP {status}")
    return watches_in(payload.decode())


def watches_in(text: str) -> dict[str, int]:
    """Watches the API server's /metrics count (apiserver_longrunning_requests, verb WATCH), by resource."""
    found: dict[str, int] = {}
    for key, value in prometheus_samples(text).items():
        if key.startswith("apiserver_longrunning_requests{") and 'verb="WATCH"' in key:
            resource = key.split('resource="', 1)[1].split('"', 1)[0]
            found[resource] = found.get(resource, 0) + int(value)
    return found


def watches_over(now: dict[str, int], baseline: dict[str, int]) -> dict[str, int]:
    changed = {r: n - baseline.get(r, 0) for r, n in now.items()}
    return {r: n for r, n in changed.items() if n}


async def steady_watches(api: KubeApi, baseline: dict[str, int], within: float = 60) -> dict[str, int]:
    """The watches over the baseline once the count has not moved for STEADY_READS reads 0.2 s apart."""
    reads: list[dict[str, int]] = []

    async def read() -> list[dict[str, int]]:
        reads.append(watches_over(await open_watches(api), baseline))
        return reads[-STEADY_READS:]

    def steady(last: list[dict[str, int]]) -> bool:
        return len(last) == STEADY_READS and all(r == last[0] for r in last)

    await poll_until(read, steady, interval=0.2, within=within, what="the API server's watches steady")
    return reads[-1]


STEADY_READS = 5


# --- the fleets --------------------------------------------------------------------------------------------


async def until_loaded(servers: Sequence[OpaServer], objects: int, seq: int, within: float = 300) -> float:
    """Every OPA holds the `objects` Services and the data ConfigMap at `seq`; when the last one did."""

    async def one(server: OpaServer) -> float:
        async with Opa(server.url) as opa:

            async def loaded() -> bool:
                return bool(await opa.query(SERVICES_QUERY) == objects and await opa.data(DATA_PATH) == seq)

            return (
                await poll_until(loaded, bool, interval=POLL, within=within, what=f"{server} loaded")
            ).received

    return max(await asyncio.gather(*(one(s) for s in servers)))


def memory_of(processes: Sequence[ManagedProcess]) -> dict[str, int]:
    """Summed VmRSS and VmHWM of running processes."""
    rss = hwm = 0
    for process in processes:
        assert process.pid is not None, f"{process.name} is not running"
        found = proc_memory(process.pid)
        rss += found["VmRSS"]
        hwm += found["VmHWM"]
    return {"rss_bytes": rss, "peak_rss_bytes": hwm}


def cpu_of(processes: Sequence[ManagedProcess]) -> float:
    return sum(cpu_seconds(p.pid) for p in processes if p.pid is not None)


@dataclass
class Fleet:
    """kopa in bundle mode and the OPAs that download its bundle."""

    bundle: BundleKopa
    opas: list[OpaServer] = field(default_factory=list)

    def stop(self, stack: Stack) -> None:
        for opa in self.opas:
            opa.stop()
        self.bundle.stop(stack)


def changes(count: int, objects: int) -> list[dict[str, Any]]:
    """Alternately a Service's annotation and the data ConfigMap's JSON; each with a new number."""
    made: list[dict[str, Any]] = []
    for k in range(count):
        seq = k + 1
        if k % 2 == 0:
            i = (k * 37) % objects
            ns, name = service_namespace(i), f"svc-{i:04d}"
            made.append(
                {
                    "kind": "service",
                    "api_path": f"/api/v1/namespaces/{ns}/services/{name}",
                    "patch": {"metadata": {"annotations": {ANNOTATION: str(seq)}}},
                    "opa_path": f"kubernetes/services/{ns}/{name}/metadata/annotations/{ANNOTATION}",
                    "expected": str(seq),
                }
            )
        else:
            made.append(
                {
                    "kind": "data",
                    "api_path": f"/api/v1/namespaces/{BUNDLE_NAMESPACE}/configmaps/{DATA_CONFIGMAP}",
                    "patch": {"data": {DATA_KEY: orjson.dumps({"seq": seq}).decode()}},
                    "opa_path": DATA_PATH,
                    "expected": seq,
                }
            )
    return made


async def series(stack: Stack, fleet: Fleet, made: list[dict[str, Any]]) -> dict[str, Any]:
    """The changes, one at a time, followed by the prober; lags from each PATCH's acknowledgement."""
    config = {
        "host": HOST,
        "port": stack.kube.port,
        "ca_file": str(stack.kube.ca_file),
        "token": stack.kube.admin_token,
        "opa_ports": [opa.port for opa in fleet.opas],
        "changes": made,
    }
    helper = spawn_helper(probe.prober_main, config, stack.work / "bundle-probe.json")
    await start_together([helper], lead=0.0)
    await asyncio.to_thread(helper.process.join)
    found = helper.result()
    everyone: list[float] = []
    each: list[float] = []
    resolution: list[float] = []
    last_poll: list[float] = []
    missed = 0
    by_kind: dict[str, list[float]] = {}
    for change, row in zip(made, found["rows"], strict=True):
        seen = row["seen"]
        if any(s is None for s in seen):
            missed += 1
            continue
        lags = [answered - row["acked"] for answered, _, _ in seen]
        everyone.append(max(lags))
        by_kind.setdefault(change["kind"], []).append(max(lags))
        each += lags
        resolution += [answered - previous for answered, previous, _ in seen]
        last_poll += [answered - polled for answered, _, polled in seen]
    return {
        "changes": len(made),
        "missed": missed,
        "lag_all_ms": summary(everyone, 1000, 2),
        "lag_each_ms": summary(each, 1000, 2),
        "lag_all_by_kind_ms": {k: summary(v, 1000, 2) for k, v in by_kind.items()},
        "resolution_ms": summary(resolution, 1000, 3),
        # the poll that saw the change, from its sending to its answer: one sent while OPA activated the
        # delta waited for the activation, so its answer is when OPA had the change
        "last_poll_ms": summary(last_poll, 1000, 3),
        "lags_all_ms": [round(x * 1000, 2) for x in everyone],
        "prober_cpu_seconds": round(found["cpu_seconds"], 3),
        "gap_seconds": probe.GAP,
        "interval_ms": probe.INTERVAL * 1000,
    }


async def fanout(
    stack: Stack, token: Path, *, opas: int, objects: int, count: int, log: Any
) -> tuple[dict[str, Any], Fleet]:
    """Fleet start and load, then the series of changes; returns the figures and the fleet, still running."""
    bundle = bundle_kopa(stack, "bundle", token, BUNDLE_NAMESPACE, replicate=True)
    fleet = Fleet(bundle)
    try:
        t0 = time.monotonic()
        bundle.kopa.start()
        await listening(bundle.port, bundle.kopa)
        for i in range(opas):
            server = config_opa(stack.work / f"fleet-opa-{i}", fleet_opa_config(bundle.url, token))
            fleet.opas.append(server)
            server.start()
        loaded = await until_loaded(fleet.opas, objects, 0)
        kopa = bundle.kopa
        assert kopa.pid is not None
        loaded_cpu = cpu_seconds(kopa.pid)
        log(f"  bundle: kopa and {opas} OPAs loaded {objects:,} Services in {loaded - t0:.2f} s")
        async with Opa(fleet.opas[0].url) as opa:
            _, payload = await opa.request("GET", "/v1/data/kubernetes/services")
        data_bytes = len(orjson.dumps(orjson.loads(payload)["result"]))
        start = await kopa_metrics(kopa)
        before = {
            "time": time.monotonic(),
            "kopa": cpu_seconds(kopa.pid),
            "opas": cpu_of([o.process for o in fleet.opas]),
            "validation": cpu_of([bundle.validation.process]),
        }
        made = changes(count, objects)
        figures = await series(stack, fleet, made)
        end = await kopa_metrics(kopa)
        seconds = time.monotonic() - before["time"]
        cpu = {
            "kopa": cpu_seconds(kopa.pid) - before["kopa"],
            "opas": cpu_of([o.process for o in fleet.opas]) - before["opas"],
            "validation": cpu_of([bundle.validation.process]) - before["validation"],
        }
    except BaseException:
        fleet.stop(stack)
        raise
    responses = {
        kind: n - bundle_counts(start, "kopa_bundle_responses_total").get(kind, 0)
        for kind, n in bundle_counts(end, "kopa_bundle_responses_total").items()
    }
    sent = {
        kind: n - bundle_counts(start, "kopa_bundle_sent_bytes_total").get(kind, 0)
        for kind, n in bundle_counts(end, "kopa_bundle_sent_bytes_total").items()
    }
    initial_responses = bundle_counts(start, "kopa_bundle_responses_total")
    initial_bytes = bundle_counts(start, "kopa_bundle_sent_bytes_total")
    snapshots = initial_responses.get("snapshot", 0)
    deltas = responses.get("delta", 0)
    result = {
        "opas": opas,
        "objects": objects,
        "data_bytes": data_bytes,
        "loaded_seconds": round(loaded - t0, 3),
        "kopa_cpu_seconds_loaded": round(loaded_cpu, 3),
        "initial_responses": initial_responses,
        "snapshot_bytes": round(initial_bytes.get("snapshot", 0) / snapshots) if snapshots else None,
        **figures,
        "series_seconds": round(seconds, 2),
        "cpu_seconds": {k: round(v, 3) for k, v in cpu.items()},
        "cpu_cores": {k: round(v / seconds, 3) for k, v in cpu.items()},
        "responses": responses,
        "sent_bytes": sent,
        "delta_bytes": round(sent.get("delta", 0) / deltas) if deltas else None,
        "data_seq": max((c["expected"] for c in made if c["kind"] == "data"), default=0),  # where it ends
    }
    log(
        f"  bundle: {count} changes to all {opas} OPAs: p50 {result['lag_all_ms'].get('p50')} ms,"
        f" p99 {result['lag_all_ms'].get('p99')} ms, {result['missed']} missed; {deltas:g} deltas,"
        f" {responses.get('snapshot', 0):g} snapshots; a delta {result['delta_bytes']} bytes, the snapshot"
        f" {result['snapshot_bytes']} bytes"
    )
    return result, fleet


async def sidecar_topology(
    stack: Stack, side: str, opas: list[OpaServer], *, objects: int, seq: int, baseline: dict[str, int]
) -> dict[str, Any]:
    """One sidecar (kopa in push mode, or kube-mgmt) per OPA: watches and memory once all are loaded."""
    sidecars = [
        stack.sidecar(side, f"push-{i}", BUNDLE_NAMESPACE, resource="v1/services", opa_url=opa.api_url)
        for i, opa in enumerate(opas)
    ]
    t0 = time.monotonic()
    for sidecar in sidecars:
        sidecar.start()
    try:
        loaded = await until_loaded(opas, objects, seq)
        async with stack.api() as api:
            watches = await steady_watches(api, baseline)
        result = {
            "sidecars": len(sidecars),
            "loaded_seconds": round(loaded - t0, 3),
            "watches": watches,
            "watches_total": sum(watches.values()),
            **memory_of(sidecars),
            "cpu_seconds": round(cpu_of(sidecars), 3),
        }
    finally:
        for sidecar in sidecars:
            stack.stop_sidecar(sidecar)
    return result


async def back_to(stack: Stack, baseline: dict[str, int]) -> None:
    """The watches of a stopped topology are gone (so the next one starts from the same baseline)."""
    async with stack.api() as api:

        async def over() -> dict[str, int]:
            return watches_over(await open_watches(api), baseline)

        await poll_until(over, lambda w: not w, interval=0.2, within=60, what="the watches closed")


async def create_objects(stack: Stack, objects: int) -> None:
    async with stack.api() as api:
        for ns in sorted({service_namespace(i) for i in range(objects)} | {BUNDLE_NAMESPACE}):
            await api.ensure_namespace(ns)
        await api.create_all(
            [service(i) for i in range(objects)],
            lambda obj: f"/api/v1/namespaces/{obj['metadata']['namespace']}/services",
        )
        await api.create_all(
            [data_configmap(0)], lambda _: f"/api/v1/namespaces/{BUNDLE_NAMESPACE}/configmaps"
        )


async def bundle_phase(
    stack: Stack,
    *,
    opas: int,
    objects: int,
    changes_count: int,
    log: Any,
) -> dict[str, Any]:
    """Fan-out, bytes, watches and memory (the load against the number of modules: bench/modules.py)."""
    began = time.monotonic()
    await create_objects(stack, objects)
    log(f"  bundle: created {objects:,} Services in {time.monotonic() - began:.1f} s")
    token = bundle_token(stack)
    async with stack.api() as api:
        baseline = await open_watches(api)
    result: dict[str, Any] = {"watch_baseline": baseline}
    topologies: dict[str, Any] = {}
    result["fanout"], fleet = await fanout(
        stack, token, opas=opas, objects=objects, count=changes_count, log=log
    )
    try:
        async with stack.api() as api:
            watches = await steady_watches(api, baseline)
        topologies["bundle"] = {
            "sidecars": 1,
            "watches": watches,
            "watches_total": sum(watches.values()),
            **memory_of([fleet.bundle.kopa]),
            "validation_opa": memory_of([fleet.bundle.validation.process]),
            "loaded_seconds": result["fanout"]["loaded_seconds"],
            "cpu_seconds": result["fanout"]["kopa_cpu_seconds_loaded"],
        }
    finally:
        fleet.stop(stack)
    await back_to(stack, baseline)
    seq = result["fanout"]["data_seq"]
    plain = [OpaServer.plain(stack.work / f"push-opa-{i}") for i in range(opas)]
    try:
        for server in plain:
            server.start()
        topologies[KOPA] = await sidecar_topology(
            stack, KOPA, plain, objects=objects, seq=seq, baseline=baseline
        )
        await back_to(stack, baseline)
        if KUBE_MGMT in stack.sides:
            for server in plain:
                server.restart()
            topologies[KUBE_MGMT] = await sidecar_topology(
                stack, KUBE_MGMT, plain, objects=objects, seq=seq, baseline=baseline
            )
            await back_to(stack, baseline)
    finally:
        for server in plain:
            server.stop()
    result["topologies"] = topologies
    log(
        "  bundle: watches on the API server: "
        + ", ".join(
            f"{side} {t['watches_total']} ({t['rss_bytes'] / 2**20:.0f} MB RSS)"
            for side, t in topologies.items()
        )
    )
    return result
