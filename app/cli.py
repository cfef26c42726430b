"""The `kopa` command: reads settings, wires the components together, runs them until a signal.

Nothing here decides behaviour; each component's module does. This is the only place that knows them all.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectSendStream

from app.configmaps.data import DataBook
from app.configmaps.policies import PolicyBook
from app.configmaps.status import StatusReporter
from app.configmaps.sync import ConfigMapStores, ConfigMapSync
from app.kube.client import KubeClient
from app.kube.config import KubeConfigError, load_connection
from app.logs import setup_logging
from app.metrics import Metrics, MetricSources
from app.opa.client import Observe, OpaClient
from app.opa.credentials import CredentialsError, OpaTls, StaticToken, TokenFile
from app.pipeline.liveness import Liveness
from app.pipeline.opa_watchdog import OpaWatchdog
from app.pipeline.readiness import Readiness, SourceState
from app.pipeline.supervisor import supervise
from app.pipeline.watcher import ALL, Collection, ObjectKey, Store, Watcher, same_resource_version
from app.pipeline.worker import Handler, OpaGate, WorkKey, run_worker
from app.pipeline.workqueue import WorkQueue
from app.replication.discovery import DiscoveryError, discover
from app.replication.replicator import ReplicatedResource, ReplicationOptions
from app.server.http import HealthServer, ServerError
from app.settings import HelpRequested, Settings, SettingsError, load_settings
from app.version import version_line

log = logging.getLogger("kopa")

# Producers wait (back-pressure) when this many changed keys are waiting for the dispatcher.
QUEUE_SIZE = 1024
# The writer loops at least every half second; this long without a loop means it is stuck.
PROGRESS_BOUND = 300.0
CONFIGMAPS = "configmaps"


def configmap_collections(settings: Settings, namespaces: Sequence[str]) -> list[tuple[str, Collection]]:
    """(source, collection) pairs: each namespace watched on its own, so namespaced RBAC suffices."""
    selectors = []
    if settings.enable_data:
        selectors.append(("data", f"{settings.data_label}={settings.data_value}"))
    if settings.enable_policies:
        selectors.append(("policies", f"{settings.policy_label}={settings.policy_value}"))
    pairs = []
    for source, selector in selectors:
        if list(namespaces) == ["*"]:
            pairs.append((source, Collection("/api/v1/configmaps", None, label_selector=selector)))
        else:
            for ns in namespaces:
                path = f"/api/v1/namespaces/{ns}/configmaps"
                pairs.append((source, Collection(path, ns, label_selector=selector)))
    return pairs


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


def _emitter(send: MemoryObjectSendStream[WorkKey], source: str) -> Callable[[ObjectKey], Awaitable[None]]:
    async def emit(key: ObjectKey) -> None:
        await send.send((source, key))

    return emit


def opa_client(settings: Settings, observe: Observe | None = None) -> OpaClient:
    """The OPA client with the token and TLS settings; raises CredentialsError for unusable ones."""

    token: Callable[[], str | None] = StaticToken(settings.opa_auth_token)
    if settings.opa_auth_token_file:
        token_file = TokenFile(settings.opa_auth_token_file)
        token_file.load()
        token = token_file
    tls = OpaTls(
        ca_file=settings.opa_ca_file,
        allow_insecure=settings.opa_allow_insecure,
        cert_file=settings.opa_client_cert_file,
        key_file=settings.opa_client_key_file,
    )
    tls.load()
    return OpaClient(settings.opa_url, token=token, ssl_context=tls, observe=observe)


async def run(settings: Settings) -> None:
    metrics = Metrics()
    liveness = Liveness()
    opa_connection = opa_client(settings, metrics.observe_opa)
    connection = await load_connection(settings.kubeconfig)
    namespaces = list(settings.namespaces) or [connection.namespace]
    log.info(
        "%s starting: OPA at %s, Kubernetes at %s, namespaces %s",
        version_line(),
        settings.opa_url,
        connection.host,
        ", ".join(namespaces),
    )
    async with (
        KubeClient(connection, reload=partial(load_connection, settings.kubeconfig)) as kube,
        opa_connection as opa,
    ):
        found = await discover(kube, settings.replicate, settings.replicate_cluster)
        send, receive = anyio.create_memory_object_stream[WorkKey](max_buffer_size=QUEUE_SIZE)
        queue: WorkQueue[WorkKey] = WorkQueue("opa", observer=metrics.queue_observer("opa"))
        gate = OpaGate(opa.healthy)

        # ConfigMaps: policies and data.
        stores: dict[str, Store[dict[str, Any]]] = {
            "data": Store("data", same_resource_version),
            "policies": Store("policies", same_resource_version),
        }
        collections = configmap_collections(settings, namespaces)
        watchers = [
            Watcher(kube, collection, stores[source], _emitter(send, CONFIGMAPS), dict)
            for source, collection in collections
        ]
        selected = ConfigMapStores(
            policies=stores["policies"] if settings.enable_policies else None,
            data=stores["data"] if settings.enable_data else None,
        )
        reporter = StatusReporter(kube, selected.lookup, observer=metrics.queue_observer("status"))
        configmaps = ConfigMapSync(PolicyBook(opa), DataBook(opa), reporter, selected)
        handlers: dict[str, Handler] = {CONFIGMAPS: configmaps}

        # Replicated resources.
        options = ReplicationOptions(
            path=settings.replicate_path.split("/"),
            ignore_namespaces=settings.replicate_ignore_namespaces,
            keep_managed_fields=settings.replicate_keep_managed_fields,
            selectors=dict(settings.replicate_selector),
            fields=dict(settings.replicate_fields),
        )
        resources = [
            ReplicatedResource(
                kube=kube,
                opa=opa,
                gvr=gvr,
                namespaced=gvr in settings.replicate,
                info=found[gvr],
                options=options,
                emit_for=partial(_emitter, send),
            )
            for gvr in (*settings.replicate, *settings.replicate_cluster)
        ]
        handlers.update({resource.source: resource.sync for resource in resources})

        readiness = Readiness(
            opa,
            pending=lambda: len(queue) + queue.in_flight + receive.statistics().current_buffer_used,
            opa_available=lambda: gate.available,
            sources=[SourceState(w.collection.describe(), w.synced.is_set) for w in watchers]
            + [r.state for r in resources],
        )

        async def on_opa_restart() -> None:
            configmaps.refill_pending = True
            readiness.on_opa_restart()
            for source in handlers:
                await send.send((source, ALL))

        watchdog = OpaWatchdog(opa, gate, settings.opa_check_interval, on_opa_restart)

        async def same_opa() -> bool:
            await watchdog.check()
            return not configmaps.refill_pending

        configmaps.policies.same_opa = same_opa

        async def opa_not_restarted() -> bool:
            before = watchdog.restarts
            await watchdog.check()
            return watchdog.restarts == before

        readiness.same_opa = opa_not_restarted

        metrics.sources = MetricSources(
            queues=[queue, reporter.queue],
            watches=lambda: [
                *(
                    (f"{src}:{c.namespace or '*'}", w.stats)
                    for (src, c), w in zip(collections, watchers, strict=True)
                ),
                *((r.source, r.watcher.stats) for r in resources if r.watcher is not None),
            ],
            replicated=[(str(r.gvr), r.store.__len__) for r in resources],
            policies_loaded=lambda: configmaps.policies.loaded_count,
            policies_failed=lambda: configmaps.policies.failed_count,
            data_documents=configmaps.data.document_count,
            opa_restarts=lambda: watchdog.restarts,
            ready=lambda: readiness.ready,
            opa_up=lambda: gate.available,
        )

        async def dispatch() -> None:
            async for key in receive:
                queue.add(key)

        async def after_batch() -> None:
            liveness.beat("OPA writer", PROGRESS_BOUND)
            await readiness.after_batch()

        server = health_server(settings, liveness, readiness, metrics) if settings.health_endpoint else None
        if server is not None:
            server.start()
        watch = partial(supervise, on_crash=liveness.crashed)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signal, tg, settings.shutdown_timeout)
            tg.start_soon(liveness.run_ticker)
            if server is not None:
                tg.start_soon(server.run)
            for watcher in watchers:
                tg.start_soon(watch, f"watch of {watcher.collection.describe()}", watcher.run)
            for resource in resources:
                tg.start_soon(watch, f"replication of {resource.gvr}", resource.run)
            tg.start_soon(watch, "dispatcher", dispatch)
            tg.start_soon(watch, "retry timer", queue.run_timer)
            tg.start_soon(watch, "OPA writer", partial(run_worker, queue, handlers, gate, after_batch))
            tg.start_soon(watch, "OPA watchdog", watchdog.run)
            tg.start_soon(watch, "status writer", reporter.run)
            tg.start_soon(watch, "status retry timer", reporter.queue.run_timer)
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        settings = load_settings(args, os.environ)
    except HelpRequested as help_:
        print(help_.text)
        sys.exit(0)
    except SettingsError as exc:
        print(f"kopa: {exc}", file=sys.stderr)
        sys.exit(2)
    if settings.show_version:
        print(version_line())
        sys.exit(0)
    setup_logging(settings.log_level, settings.log_format)
    for warning in settings.warnings:
        log.warning("%s", warning)
    try:
        anyio.run(run, settings)
    except (KubeConfigError, DiscoveryError, CredentialsError, ServerError) as exc:
        print(f"kopa: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        pass
