"""The `kopa` command: reads settings, wires the components together, runs them until a signal.

Nothing here decides behaviour; each component's module does. This is the only place that knows them all.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from functools import partial

import anyio
from anyio.abc import TaskGroup

from app.configmaps.data import DataBook
from app.configmaps.policies import PolicyBook
from app.configmaps.status import StatusReporter
from app.configmaps.sync import ConfigMapStores, ConfigMapSync
from app.kube.client import KubeClient
from app.kube.config import KubeConfigError, load_connection
from app.logs import setup_logging
from app.opa.client import OpaClient
from app.pipeline.supervisor import supervise
from app.pipeline.watcher import Collection, ObjectKey, Store, Watcher
from app.pipeline.worker import OpaGate, run_worker
from app.pipeline.workqueue import WorkQueue
from app.settings import HelpRequested, Settings, SettingsError, load_settings
from app.version import version_line

log = logging.getLogger("kopa")

# Producers wait (back-pressure) when this many changed keys are waiting for the dispatcher.
QUEUE_SIZE = 1024


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


async def _stop_on_signal(tg: TaskGroup) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s; stopping", signal.Signals(signum).name)
            tg.cancel_scope.cancel()
            return


async def run(settings: Settings) -> None:
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
        OpaClient(settings.opa_url) as opa,
    ):
        stores = {"data": Store("data"), "policies": Store("policies")}
        send, receive = anyio.create_memory_object_stream[ObjectKey](max_buffer_size=QUEUE_SIZE)
        watchers = [
            Watcher(kube, collection, stores[source], send.send)
            for source, collection in configmap_collections(settings, namespaces)
        ]
        queue: WorkQueue[ObjectKey] = WorkQueue("configmaps")
        selected = ConfigMapStores(
            policies=stores["policies"] if settings.enable_policies else None,
            data=stores["data"] if settings.enable_data else None,
        )
        sync = ConfigMapSync(PolicyBook(opa), DataBook(opa), StatusReporter(kube, selected.lookup), selected)
        gate = OpaGate(opa.healthy)

        async def dispatch() -> None:
            async for key in receive:
                queue.add(key)

        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signal, tg)
            for watcher in watchers:
                tg.start_soon(supervise, f"watch of {watcher.collection.describe()}", watcher.run)
            tg.start_soon(supervise, "dispatcher", dispatch)
            tg.start_soon(supervise, "retry timer", queue.run_timer)
            tg.start_soon(supervise, "OPA writer", partial(run_worker, queue, sync.handle, gate))
            tg.start_soon(supervise, "status writer", sync.reporter.run)
            tg.start_soon(supervise, "status retry timer", sync.reporter.queue.run_timer)
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
    setup_logging(settings.log_level)
    for warning in settings.warnings:
        log.warning("%s", warning)
    try:
        anyio.run(run, settings)
    except KubeConfigError as exc:
        print(f"kopa: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        pass
