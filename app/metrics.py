"""Prometheus metrics: the workqueue names Kubernetes operators already chart, and kopa's own.

Counters and gauges are read from the components when Prometheus scrapes (the components keep plain
numbers and know nothing of Prometheus); only latencies are observed as they happen, into histograms.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.pipeline.watcher import WatchStats
from app.pipeline.workqueue import WorkQueue

if TYPE_CHECKING:  # bundle mode's, imported only when it is on
    from app.bundle.fleet import Fleet
    from app.server.bundle import BundleStats

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class MetricSources:
    """What the collector reads at scrape time; the CLI fills it in as it builds the components."""

    queues: list[WorkQueue[Any]] = field(default_factory=list)
    watches: Callable[[], list[tuple[str, WatchStats]]] = list  # (source, stats), asked at each scrape
    replicated: Callable[[], list[tuple[str, int]]] = list  # (resource, objects held)
    analysis: Callable[[], list[tuple[str, str]]] = list  # (resource, state) found by the policy analysis
    # (entrypoint found, references without a constant plural), None when the analysis is off or not run
    analysis_problems: Callable[[], tuple[bool, int] | None] = lambda: None
    policies_loaded: Callable[[], int] = lambda: 0
    policies_failed: Callable[[], int] = lambda: 0
    data_documents: Callable[[], int] = lambda: 0
    opa_restarts: Callable[[], int] = lambda: 0
    opa_refusals: Callable[[], int] = lambda: 0
    drift_repaired: Callable[[], dict[str, int]] = dict  # kind -> repairs
    bundle: BundleStats | None = None  # the bundle endpoint's answers, in bundle mode
    bundle_compiles: Callable[[], int] = lambda: 0  # candidates the validation OPA compiled, in bundle mode
    fleet: Fleet | None = None  # the OPAs reporting their status to the bundle endpoint, in bundle mode
    ready: Callable[[], bool] = lambda: False
    opa_up: Callable[[], bool] = lambda: False
    leader: Callable[[], bool] = lambda: True  # writes statuses and Events (leads, or no election)


class _QueueLatency:
    """The WorkQueue observer for one queue: feeds its two histograms."""

    def __init__(self, queued: Histogram, worked: Histogram, name: str) -> None:
        self._queued = queued.labels(name=name)
        self._worked = worked.labels(name=name)

    def queued(self, seconds: float) -> None:
        self._queued.observe(seconds)

    def worked(self, seconds: float) -> None:
        self._worked.observe(seconds)


class Metrics(Collector):
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.sources = MetricSources()
        self._queue_duration = Histogram(
            "workqueue_queue_duration_seconds",
            "How long a key waits in the workqueue before it is processed.",
            ["name"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._work_duration = Histogram(
            "workqueue_work_duration_seconds",
            "How long processing a key takes.",
            ["name"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._opa_duration = Histogram(
            "kopa_opa_request_duration_seconds",
            "Latency of requests to OPA's REST API.",
            ["endpoint", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._opa_requests: dict[tuple[str, str, str], int] = {}
        self.registry.register(self)

    def queue_observer(self, name: str) -> _QueueLatency:
        return _QueueLatency(self._queue_duration, self._work_duration, name)

    def observe_opa(self, endpoint: str, method: str, code: str, seconds: float) -> None:
        key = (endpoint, method, code)
        self._opa_requests[key] = self._opa_requests.get(key, 0) + 1
        self._opa_duration.labels(endpoint=endpoint, method=method).observe(seconds)

    def render(self) -> bytes:
        """Call it on the event loop that changes the sources (the HTTP server does): they take no locks."""
        return generate_latest(self.registry)

    def describe(self) -> Iterable[Metric]:
        return []  # collected freshly each scrape; nothing to declare up front

    def collect(self) -> Iterable[Metric]:
        s = self.sources
        now = time.monotonic()
        yield from self._queue_metrics(s.queues, now)

        requests = CounterMetricFamily(
            "kopa_opa_requests",
            "Requests to OPA's REST API, by endpoint, method and status code.",
            labels=["endpoint", "method", "code"],
        )
        for (endpoint, method, code), count in sorted(self._opa_requests.items()):
            requests.add_metric([endpoint, method, code], count)
        yield requests

        restarts = CounterMetricFamily(
            "kopa_watch_restarts",
            "Watches started again, by reason: closed (the server ended the watch, restarted at once), "
            "closed_early (ended within 1 s without an event; backed off), gone (410, listed again; "
            "backed off when it repeats), timeout and error (backed off).",
            labels=["source", "reason"],
        )
        full_syncs = CounterMetricFamily(
            "kopa_full_syncs", "Complete lists of a source from the API server.", labels=["source"]
        )
        last_sync = GaugeMetricFamily(
            "kopa_last_full_sync_timestamp_seconds",
            "When a source was last listed completely (Unix time).",
            labels=["source"],
        )
        for source, stats in s.watches():
            for reason, count in sorted(stats.restarts.items()):
                restarts.add_metric([source, reason], count)
            full_syncs.add_metric([source], stats.lists)
            if stats.last_list is not None:
                last_sync.add_metric([source], stats.last_list)
        yield from (restarts, full_syncs, last_sync)

        replicated = GaugeMetricFamily(
            "kopa_replicated_objects", "Objects kopa holds of each replicated resource.", labels=["resource"]
        )
        for resource, size in s.replicated():
            replicated.add_metric([resource], size)
        yield replicated
        analysed = GaugeMetricFamily(
            "kopa_analysis_resources",
            "Resources the policies read (--opa-config), by state: replicating, given (by --replicate), "
            "unresolved, ambiguous, forbidden (RBAC), unreferenced (no longer read, removed after the grace "
            "period).",
            labels=["resource", "state"],
        )
        for resource, state in s.analysis():
            analysed.add_metric([resource, state], 1)
        yield analysed
        problems = s.analysis_problems()
        if problems is not None:
            found, unbounded = problems
            yield GaugeMetricFamily(
                "kopa_analysis_entrypoint_found",
                "1 when the policies OPA holds define --analysis-entrypoint.",
                value=float(found),
            )
            yield GaugeMetricFamily(
                "kopa_analysis_unbounded_references",
                "References under the replicate path whose resource is not a constant (not replicated).",
                value=unbounded,
            )
        yield GaugeMetricFamily(
            "kopa_policies_loaded", "Rego modules loaded in OPA.", value=s.policies_loaded()
        )
        yield GaugeMetricFamily(
            "kopa_policies_failed",
            "Rego modules that OPA refused (see their ConfigMap's status).",
            value=s.policies_failed(),
        )
        yield GaugeMetricFamily(
            "kopa_data_documents_loaded",
            "JSON documents from data ConfigMaps loaded in OPA.",
            value=s.data_documents(),
        )
        yield CounterMetricFamily(
            "kopa_opa_restarts", "New OPA processes detected (each one is refilled).", value=s.opa_restarts()
        )
        yield CounterMetricFamily(
            "kopa_opa_credentials_refused",
            "Times OPA started refusing kopa's credentials (401/403); each is waited out like an outage.",
            value=s.opa_refusals(),
        )
        drift = CounterMetricFamily(
            "kopa_drift_repaired",
            "Differences between OPA and kopa's copy found by the drift check and repaired, by kind "
            "(policy, data, replicated).",
            labels=["kind"],
        )
        for kind, count in sorted(s.drift_repaired().items()):
            drift.add_metric([kind], count)
        yield drift
        if s.bundle is not None:
            responses = CounterMetricFamily(
                "kopa_bundle_responses",
                "Answers of the bundle endpoint, by kind (snapshot, delta, not_modified, unauthorized, "
                "unavailable; candidate and candidate_not_modified to the validation OPA).",
                labels=["kind"],
            )
            sent = CounterMetricFamily(
                "kopa_bundle_sent_bytes", "Bytes of bundles sent, by kind (snapshot, delta).", labels=["kind"]
            )
            for kind, count in sorted(s.bundle.responses.items()):
                responses.add_metric([kind], count)
            for kind, count in sorted(s.bundle.sent_bytes.items()):
                if kind in ("snapshot", "delta"):
                    sent.add_metric([kind], count)
            yield from (responses, sent)
            compiles = CounterMetricFamily(
                "kopa_bundle_compiles",
                "Candidate bundles the validation OPA compiled to check policies (one per batch when they "
                "compile; a few more to find the modules that do not).",
            )
            compiles.add_metric([], s.bundle_compiles())
            yield compiles
            yield GaugeMetricFamily(
                "kopa_bundle_requests_held",
                "Bundle requests held now: long polls, and requests waiting for the first complete load.",
                value=float(s.bundle.held),
            )
            reports = CounterMetricFamily(
                "kopa_bundle_status_reports",
                "Status reports the OPAs sent, by result (accepted, unauthorized, invalid).",
                labels=["result"],
            )
            for result, count in sorted(s.bundle.status_reports.items()):
                reports.add_metric([result], count)
            yield reports
        if s.fleet is not None:
            wall = time.time()
            opas = GaugeMetricFamily(
                "kopa_bundle_opas",
                "OPAs reporting their status to this kopa, by state: current (they run kopa's current "
                "revision), behind (another revision, or none yet), failing (their last download or "
                "activation failed).",
                labels=["state"],
            )
            for state, count in s.fleet.counts(wall).items():
                opas.add_metric([state], count)
            yield opas
            yield GaugeMetricFamily(
                "kopa_bundle_opa_lag_seconds",
                "How long the OPA longest off kopa's current revision (behind or failing) has been so; 0 "
                "when every OPA runs it.",
                value=s.fleet.max_lag(wall),
            )
        yield GaugeMetricFamily(
            "kopa_ready", "1 when OPA holds everything kopa should have put there.", value=float(s.ready())
        )
        yield GaugeMetricFamily("kopa_opa_up", "1 when OPA answers kopa.", value=float(s.opa_up()))
        yield GaugeMetricFamily(
            "kopa_leader",
            "1 when this kopa writes statuses and Events: it holds the Lease, or leader election is off.",
            value=float(s.leader()),
        )

    @staticmethod
    def _queue_metrics(queues: Sequence[WorkQueue[Any]], now: float) -> Iterable[Metric]:
        depth = GaugeMetricFamily("workqueue_depth", "Keys waiting in the workqueue.", labels=["name"])
        adds = CounterMetricFamily("workqueue_adds", "Keys added to the workqueue.", labels=["name"])
        retries = CounterMetricFamily("workqueue_retries", "Keys requeued after a failure.", labels=["name"])
        coalesced = CounterMetricFamily(
            "kopa_updates_coalesced",
            "Adds of a key that was already waiting: updates that cost no extra write.",
            labels=["name"],
        )
        unfinished = GaugeMetricFamily(
            "workqueue_unfinished_work_seconds",
            "Seconds of work in progress that has not finished.",
            labels=["name"],
        )
        longest = GaugeMetricFamily(
            "workqueue_longest_running_processor_seconds",
            "How long the longest running key has been in work.",
            labels=["name"],
        )
        for queue in queues:
            stats = queue.stats
            running = [now - started for started in list(stats.started_at.values())]
            depth.add_metric([queue.name], len(queue))
            adds.add_metric([queue.name], stats.adds)
            retries.add_metric([queue.name], stats.retries)
            coalesced.add_metric([queue.name], stats.coalesced)
            unfinished.add_metric([queue.name], sum(running))
            longest.add_metric([queue.name], max(running, default=0.0))
        yield from (depth, adds, retries, coalesced, unfinished, longest)
