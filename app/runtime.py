"""kopa assembled: the adapters, then the pipeline of the design, then the operations around it.

Read top to bottom, `run` is the design: watch producers (ConfigMaps, replicated resources) add keys to one
bounded queue; one writer takes them in batches and hands each source its keys (the per-key coalescing
and retries are the queue's); the sources make OPA match their stores and report back on the ConfigMaps
(the status writer); the OPA process check, liveness, readiness and the probe/metrics server watch it
all. Nothing here decides behaviour: each component's module does.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from app.configmaps.source import ConfigMapSource, Selection
from app.kube.client import KubeApiError, KubeClient, KubeUnavailable
from app.kube.config import KubeConnection, load_connection
from app.kube.resources import GroupVersionResource
from app.metrics import Metrics, MetricSources
from app.model import ALL, CHECK, WorkKey, whole_source
from app.opa.client import Observe, OpaClient
from app.opa.credentials import StaticToken, TokenFile, opa_tls
from app.opa.process import OpaProcess
from app.operations.liveness import Liveness, on_opa_request
from app.operations.readiness import Readiness
from app.operations.supervisor import supervise
from app.pipeline.periodic import every
from app.pipeline.worker import Footprint, Handler, run_worker
from app.pipeline.workqueue import WorkQueue
from app.replication.discovery import ResourceInfo, discover
from app.replication.replicator import ReplicationOptions
from app.replication.running import Replicators
from app.server.http import HealthServer
from app.settings import Settings
from app.version import version_line

# What only bundle mode, leader election and auto-replication use is imported when they are on: a third of
# kopa's imports, paid before its first request otherwise.
if TYPE_CHECKING:
    from app.bundle.compiler import BundleCompiler
    from app.bundle.state import BundleState
    from app.bundle.target import BundleTarget, Publication
    from app.operations.leader import LeaderElector
    from app.replication.auto import AutoReplication
    from app.server.bundle import BundleServer

log = logging.getLogger("kopa")

# Distinct keys waiting for the writer before a source's keys collapse into one whole-source load.
QUEUE_CAPACITY = 10_000
# The writer's loop turns at least every half second, and each of its OPA requests is bounded: this long
# without either means it is stuck.
PROGRESS_BOUND = 300.0


async def run(settings: Settings) -> None:
    metrics = Metrics()
    liveness = Liveness()
    connection = await load_connection(settings.kubeconfig)
    namespaces = list(settings.configmaps.namespaces) or [connection.namespace]
    log.info(
        "%s starting: %s at %s, Kubernetes at %s, namespaces %s",
        version_line(),
        "bundle mode, policies checked by the OPA" if settings.bundle.enabled else "OPA",
        settings.opa.url,
        connection.host,
        ", ".join(namespaces),
    )
    async with (
        KubeClient(connection, reload=partial(load_connection, settings.kubeconfig)) as kube,
        opa_client(settings, [metrics.observe_opa, on_opa_request]) as opa,
        WorkQueue[WorkKey](
            "opa", observer=metrics.queue_observer("opa"), capacity=QUEUE_CAPACITY, collapse=whole_source
        ) as queue,
    ):
        process = OpaProcess(opa, settings.opa.check_interval, watch=opa.until_closed)
        # Bundle mode: the handlers write into the bundle (each batch of policies compiled once by the OPA
        # at --opa-url first, which downloads it as a candidate bundle), which the bundle server hands to
        # the OPAs; push mode: straight into that OPA.
        mode = await bundle_mode(settings, opa) if settings.bundle.enabled else None
        bundle = mode.state if mode is not None else None
        compiler = mode.compiler if mode is not None else None
        target = mode.target if mode is not None else None
        bundle_server = mode.server if mode is not None else None
        # Several replicas: only the holder of the Lease writes statuses and Events.
        elector = leader_elector(settings, kube, connection) if settings.leader_election.enabled else None

        # Producers: each keeps its source's store and adds changed keys to the queue.
        configmaps = ConfigMapSource(
            kube=kube,
            opa=target or opa,
            process=process,
            selection=configmap_selection(settings, namespaces),
            add=queue.add,
            status_observer=metrics.queue_observer("status"),
            leader=elector,
            settler=target,
        )
        if elector is not None:
            elector.on_started_leading(configmaps.reporter.resync)
        # The writer's handlers, one per source; replicated resources add and remove theirs as they come
        # and go. A new OPA process gets every source again.
        handlers: dict[str, Handler] = {configmaps.name: configmaps.sync}
        component = partial(supervise, on_crash=liveness.crashed)
        # Where each source writes in OPA, so that a refill can load a collection beside the policies.
        footprints: dict[str, Footprint] = {configmaps.name: configmaps.sync.footprint}
        replication = settings.replication
        replicators = Replicators(
            kube=kube,
            opa=target or opa,
            process=process,
            options=replication_options(settings),
            add=queue.add,
            handlers=handlers,
            footprints=footprints,
            supervise=component,
        )
        found = await discover_at_start(kube, replication.namespaced_resources, replication.cluster_resources)
        for gvr in (*replication.namespaced_resources, *replication.cluster_resources):
            namespaced = gvr in replication.namespaced_resources
            replicators.start(gvr, namespaced, (found or {}).get(gvr), looked_up=found is not None)
        auto = auto_replication(
            settings, opa=opa, kube=kube, process=process, replicators=replicators, configmaps=configmaps
        )

        async def refill() -> None:
            for source in list(handlers):
                queue.add(WorkKey(source, ALL))

        process.on_restart(refill)

        readiness = Readiness(
            mode.publication() if mode is not None else opa,
            process,
            pending=lambda: queue.pending,
            retrying=lambda: queue.failing,
            sources=lambda: [
                *configmaps.states,
                *replicators.states(),
                *([auto.state] if auto is not None else []),
            ],
            details=lambda: {
                **(auto.report() if auto is not None else {}),
                **({"leaderElection": elector.report()} if elector is not None else {}),
                # Which revision each OPA runs (their status reports); never holds readiness.
                **(bundle_server.fleet.report(time.time()) if bundle_server is not None else {}),
            },
        )
        metrics.sources = MetricSources(
            queues=[queue, configmaps.reporter.queue],
            watches=lambda: [*configmaps.watch_stats(), *replicators.watch_stats()],
            replicated=replicators.sizes,
            analysis=auto.counts if auto is not None else list,
            analysis_problems=auto.problems if auto is not None else lambda: None,
            policies_loaded=lambda: configmaps.sync.policies.loaded_count,
            policies_failed=lambda: configmaps.sync.policies.failed_count,
            data_documents=configmaps.sync.data.document_count,
            opa_restarts=lambda: process.restarts,
            opa_refusals=lambda: process.refusals,
            drift_repaired=lambda: {
                "policy": configmaps.sync.policies.repairs,
                "data": configmaps.sync.data.repairs,
                "replicated": replicators.repairs(),
            },
            bundle=bundle_server.stats if bundle_server is not None else None,
            bundle_compiles=lambda: compiler.compiles if compiler is not None else 0,
            fleet=bundle_server.fleet if bundle_server is not None else None,
            ready=lambda: readiness.ready,
            opa_up=lambda: process.available,
            leader=lambda: configmaps.reporter.writing,
        )
        writer = partial(
            run_worker,
            queue,
            handlers,
            process,
            readiness.after_batch,
            partial(liveness.beat, "OPA writer", PROGRESS_BOUND),
            footprints=footprints,
        )
        server = health_server(settings, liveness, readiness, metrics) if settings.health_endpoint else None
        if server is not None:
            server.start()

        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signal, tg, settings.shutdown_timeout)
            tg.start_soon(liveness.run_ticker)
            if server is not None:
                tg.start_soon(server.run)
            if bundle_server is not None:
                tg.start_soon(bundle_server.run)
            for watcher in configmaps.watchers:
                tg.start_soon(component, f"watch of {watcher.collection.describe()}", watcher.run)
            tg.start_soon(replicators.run)
            if auto is not None:
                tg.start_soon(component, "policy analysis", auto.run)
            tg.start_soon(component, "OPA writer", writer)
            tg.start_soon(component, "status writer", configmaps.reporter.run)
            if elector is not None:
                tg.start_soon(component, "leader election", elector.run)
            tg.start_soon(component, "OPA process check", process.run)
            # In bundle mode nothing else writes the bundle, and OPA refuses API writes under its roots.
            if settings.opa.drift_check_interval > 0 and bundle is None:
                checks = lambda: [WorkKey(source, CHECK) for source in handlers]  # noqa: E731
                drift = partial(every, settings.opa.drift_check_interval, queue.add, checks)
                tg.start_soon(component, "drift check", drift)
    log.info("stopped")


async def discover_at_start(
    kube: KubeClient, namespaced: Sequence[GroupVersionResource], cluster: Sequence[GroupVersionResource]
) -> dict[GroupVersionResource, ResourceInfo | None] | None:
    """The replicated resources as the API server serves them; None when it cannot be asked now (kopa
    starts anyway, its probes up, and each replicator asks until it answers)."""
    try:
        return await discover(kube, namespaced, cluster)
    except (KubeUnavailable, KubeApiError) as exc:
        log.warning("could not look up the resources to replicate (%s); trying again until it answers", exc)
        return None


def reserved_roots(settings: Settings) -> list[list[str]]:
    return [root.split("/") for root in settings.bundle.reserved_roots]


@dataclass
class BundleMode:
    """Bundle mode's parts: the bundle, the compiler that checks each batch of policies, the handlers'
    target that writes into both, and the bundle endpoint."""

    state: BundleState
    compiler: BundleCompiler
    target: BundleTarget
    server: BundleServer

    def publication(self) -> Publication:
        from app.bundle.target import Publication

        return Publication(self.state)


async def bundle_mode(settings: Settings, opa: OpaClient) -> BundleMode:
    """The bundle endpoint bound; raises CredentialsError or ServerError (one line) when it cannot be."""
    from app.bundle.compiler import BundleCompiler
    from app.bundle.state import BundleState
    from app.bundle.target import BundleTarget
    from app.server.bundle import BundleServer, reloading_server_tls

    state = BundleState(reserved_roots(settings))
    compiler = BundleCompiler(opa)
    b = settings.bundle
    token = TokenFile(b.token_file, setting="--bundle-token-file") if b.token_file else None
    if token is not None:
        token.load()
    # Without a token file the settings require a CA: client certificates alone authenticate the OPAs.
    tls = reloading_server_tls(b.tls_cert_file, b.tls_key_file, b.tls_ca_file) if b.tls_cert_file else None
    host, _, port = b.endpoint.rpartition(":")
    server = BundleServer(
        state, host.strip("[]"), int(port), token=token, tls=tls, candidates=compiler.candidates
    )
    await server.start()
    return BundleMode(state, compiler, BundleTarget(state, compiler), server)


def leader_elector(settings: Settings, kube: KubeClient, connection: KubeConnection) -> LeaderElector:
    """The election of the status writer, over the Lease in --leader-election-namespace (default: kopa's
    own namespace)."""
    from app.kube.leases import Leases
    from app.operations.leader import LeaderElector, Timing, default_identity

    le = settings.leader_election
    leases = Leases(kube, le.namespace or connection.namespace, le.lease_name)
    elector = LeaderElector(
        leases, default_identity(), Timing(le.lease_duration, le.renew_deadline, le.retry_period)
    )
    log.info("leader election on: %s, as %s", leases.describe(), elector.identity)
    return elector


def configmap_selection(settings: Settings, namespaces: list[str]) -> Selection:
    c = settings.configmaps
    return Selection(
        policies=f"{c.policy_label}={c.policy_value}" if c.enable_policies else "",
        data=f"{c.data_label}={c.data_value}" if c.enable_data else "",
        namespaces=namespaces,
    )


def auto_replication(
    settings: Settings,
    *,
    opa: OpaClient,
    kube: KubeClient,
    process: OpaProcess,
    replicators: Replicators,
    configmaps: ConfigMapSource,
) -> AutoReplication | None:
    """The policy analysis, when --opa-config is given."""
    replication = settings.replication
    if not replication.opa_config:
        return None
    from app.opa.configuration import bundle_names
    from app.replication.auto import AutoReplication, AutoSettings

    auto = AutoSettings(
        entrypoint=replication.analysis_entrypoint.split("/"),
        prefix=replication.path.split("/"),
        grace=replication.analysis_grace_period,
        bundles=bundle_names(replication.opa_config),
        given=(*replication.namespaced_resources, *replication.cluster_resources),
    )
    log.info(
        "replicating what the policies read from %s (bundles: %s)",
        "data." + ".".join(auto.entrypoint),
        ", ".join(auto.bundles) or "none named",
    )
    return AutoReplication(
        opa=opa,
        kube=kube,
        process=process,
        replicators=replicators,
        settings=auto,
        configmap_policies=configmaps.sync.policies.held,
    )


def replication_options(settings: Settings) -> ReplicationOptions:
    return ReplicationOptions(
        path=settings.replication.path.split("/"),
        ignore_namespaces=settings.replication.ignore_namespaces,
        keep_managed_fields=settings.replication.keep_managed_fields,
        selectors=dict(settings.replication.selectors),
        fields=dict(settings.replication.fields),
    )


def opa_client(settings: Settings, observe: list[Observe]) -> OpaClient:
    """The OPA client with the token and TLS settings; raises CredentialsError for unusable ones."""
    token: Callable[[], str | None] = StaticToken(settings.opa.auth_token)
    if settings.opa.auth_token_file:
        token_file = TokenFile(settings.opa.auth_token_file)
        token_file.load()
        token = token_file
    tls = opa_tls(
        ca_file=settings.opa.ca_file,
        allow_insecure=settings.opa.allow_insecure,
        cert_file=settings.opa.client_cert_file,
        key_file=settings.opa.client_key_file,
    )
    tls.load()
    return OpaClient(settings.opa.url, token=token, ssl_context=tls, observe=observe)


def health_server(
    settings: Settings, liveness: Liveness, readiness: Readiness, metrics: Metrics
) -> HealthServer:
    host, _, port = settings.health_endpoint.rpartition(":")
    return HealthServer(
        host.strip("[]") or "0.0.0.0",
        int(port),
        liveness=liveness.check,
        readiness=lambda: (readiness.ready, readiness.report()),
        metrics=metrics.render,
        health=partial(_kube_mgmt_health, liveness, readiness),
    )


def _kube_mgmt_health(liveness: Liveness, readiness: Readiness) -> tuple[bool, dict[str, Any]]:
    """kube-mgmt's /health: 503 until the first load is done, then as /healthz. opa-kube-mgmt's chart probes
    it for liveness as well as readiness, so an OPA outage after the start must not fail it: the kubelet
    would restart kopa while it waits for OPA, and the refill would wait for kopa."""
    if readiness.loaded_epoch is None:
        return readiness.ready, readiness.report()
    return liveness.check()


async def _stop_on_signal(tg: TaskGroup, grace: float) -> None:
    """SIGTERM or SIGINT: cancel everything (writes in flight are abandoned: they are idempotent and are
    redone by the next kopa); should anything hang, exit anyway once the timeout has passed."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s; stopping", signal.Signals(signum).name)
            timer = threading.Timer(grace, _exit_now, args=(grace,))
            timer.daemon = True
            timer.start()
            tg.cancel_scope.cancel()
            return


def _exit_now(grace: float) -> None:
    log.warning("shutdown took longer than %gs; exiting now", grace)
    logging.shutdown()
    os._exit(0)
