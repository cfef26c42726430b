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
from collections.abc import Callable
from functools import partial

import anyio
from anyio.abc import TaskGroup

from app.configmaps.source import ConfigMapSource, Selection
from app.kube.client import KubeClient
from app.kube.config import load_connection
from app.metrics import Metrics, MetricSources
from app.model import ALL, CHECK, DataPath, WorkKey, whole_source
from app.opa.client import Observe, OpaClient
from app.opa.credentials import OpaTls, StaticToken, TokenFile
from app.opa.process import OpaProcess
from app.operations.liveness import Liveness, on_opa_request
from app.operations.readiness import Readiness
from app.operations.supervisor import supervise
from app.pipeline.periodic import every
from app.pipeline.worker import Footprint, Handler, run_worker
from app.pipeline.workqueue import WorkQueue
from app.replication.discovery import discover
from app.replication.replicator import ReplicatedResource, ReplicationOptions
from app.server.http import HealthServer
from app.settings import Settings
from app.version import version_line

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
        "%s starting: OPA at %s, Kubernetes at %s, namespaces %s",
        version_line(),
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

        # Producers: each keeps its source's store and adds changed keys to the queue.
        configmaps = ConfigMapSource(
            kube=kube,
            opa=opa,
            process=process,
            selection=configmap_selection(settings, namespaces),
            add=queue.add,
            status_observer=metrics.queue_observer("status"),
        )
        replication = settings.replication
        found = await discover(kube, replication.namespaced_resources, replication.cluster_resources)
        resources = [
            ReplicatedResource(
                kube=kube,
                opa=opa,
                process=process,
                gvr=gvr,
                namespaced=gvr in replication.namespaced_resources,
                info=found[gvr],
                options=replication_options(settings),
                add=queue.add,
            )
            for gvr in (*replication.namespaced_resources, *replication.cluster_resources)
        ]

        # The writer's handlers, one per source; a new OPA process gets every source again.
        handlers: dict[str, Handler] = {configmaps.name: configmaps.sync}
        handlers.update({resource.source: resource.sync for resource in resources})
        # Where each source writes in OPA, so that a refill can load a collection beside the policies.
        footprints: dict[str, Footprint] = {configmaps.name: configmaps.sync.footprint}
        footprints.update({r.source: collection_footprint(tuple(r.sync.path)) for r in resources})

        async def refill() -> None:
            for source in handlers:
                queue.add(WorkKey(source, ALL))

        process.on_restart(refill)

        readiness = Readiness(
            opa,
            process,
            pending=lambda: queue.pending,
            retrying=lambda: queue.failing,
            sources=configmaps.states + [r.state for r in resources],
        )
        metrics.sources = MetricSources(
            queues=[queue, configmaps.reporter.queue],
            watches=lambda: [
                *configmaps.watch_stats(),
                *((r.source, r.watcher.stats) for r in resources if r.watcher is not None),
            ],
            replicated=[(str(r.gvr), r.store.__len__) for r in resources],
            policies_loaded=lambda: configmaps.sync.policies.loaded_count,
            policies_failed=lambda: configmaps.sync.policies.failed_count,
            data_documents=configmaps.sync.data.document_count,
            opa_restarts=lambda: process.restarts,
            opa_refusals=lambda: process.refusals,
            drift_repaired=lambda: {
                "policy": configmaps.sync.policies.repairs,
                "data": configmaps.sync.data.repairs,
                "replicated": sum(r.sync.repairs for r in resources),
            },
            ready=lambda: readiness.ready,
            opa_up=lambda: process.available,
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

        component = partial(supervise, on_crash=liveness.crashed)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signal, tg, settings.shutdown_timeout)
            tg.start_soon(liveness.run_ticker)
            if server is not None:
                tg.start_soon(server.run)
            for watcher in configmaps.watchers:
                tg.start_soon(component, f"watch of {watcher.collection.describe()}", watcher.run)
            for resource in resources:
                tg.start_soon(component, f"replication of {resource.gvr}", resource.run)
            tg.start_soon(component, "OPA writer", writer)
            tg.start_soon(component, "status writer", configmaps.reporter.run)
            tg.start_soon(component, "OPA process check", process.run)
            if settings.opa.drift_check_interval > 0:
                checks = [WorkKey(source, CHECK) for source in handlers]
                drift = partial(every, settings.opa.drift_check_interval, queue.add, checks)
                tg.start_soon(component, "drift check", drift)
    log.info("stopped")


def configmap_selection(settings: Settings, namespaces: list[str]) -> Selection:
    c = settings.configmaps
    return Selection(
        policies=f"{c.policy_label}={c.policy_value}" if c.enable_policies else "",
        data=f"{c.data_label}={c.data_value}" if c.enable_data else "",
        namespaces=namespaces,
    )


def collection_footprint(path: DataPath) -> Footprint:
    """A replicated collection writes under its own path in OPA, and nowhere else."""
    return lambda: [path]


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
    tls = OpaTls(
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
    )


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
