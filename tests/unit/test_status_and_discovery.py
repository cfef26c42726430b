"""The status writer, the ConfigMap selection and replication's discovery, against fakes of the Protocols
they declare for the Kubernetes API (StatusApi, Discovery)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from app.configmaps.source import Selection
from app.configmaps.status import OK, STATUS_ANNOTATION, StatusReporter
from app.kube.client import JSON, KubeApiError, KubeUnavailable
from app.kube.resources import GroupVersionResource
from app.model import ObjectKey
from app.replication.discovery import DiscoveryError, discover

pytestmark = pytest.mark.anyio

CM = ObjectKey("ns", "cm")


class FakeKube:
    """Records patches and Events; fails the next `fail` calls with KubeUnavailable."""

    def __init__(self) -> None:
        self.patches: list[tuple[str, JSON]] = []
        self.events: list[JSON] = []
        self.fail = 0
        self.discovery: dict[str, JSON] = {}

    async def merge_patch(self, path: str, patch: JSON) -> JSON:
        if self.fail:
            self.fail -= 1
            raise KubeUnavailable("PATCH: HTTP 503")
        self.patches.append((path, patch))
        return {}

    async def create(self, path: str, obj: JSON) -> JSON:
        self.events.append(obj)
        return {}

    async def get(self, path: str) -> JSON:
        if path not in self.discovery:
            raise KubeApiError(404, "NotFound", "the server could not find the requested resource")
        return self.discovery[path]


def configmap(annotation: str | None = None) -> dict[str, Any]:
    annotations = {STATUS_ANNOTATION: annotation} if annotation is not None else {}
    return {"metadata": {"namespace": "ns", "name": "cm", "uid": "u1", "annotations": annotations}}


async def test_the_status_is_written_only_when_it_changes_with_an_event_per_transition() -> None:
    kube = FakeKube()
    current = {CM: configmap(OK)}
    reporter = StatusReporter(kube, current.get)
    error = {"code": "rego_parse_error", "message": "unexpected eof"}
    async with reporter.queue:
        reporter.report(CM, [], "LoadPolicy")  # already ok on the ConfigMap: nothing to write
        await reporter._next()
        assert kube.patches == []
        reporter.report(CM, [error], "LoadPolicy")
        await reporter._next()
        reporter.report(CM, [], "LoadPolicy")
        await reporter._next()
    values = [p[1]["metadata"]["annotations"][STATUS_ANNOTATION] for p in kube.patches]
    assert values[1] == OK and "rego_parse_error" in values[0]
    assert [(e["type"], e["reason"]) for e in kube.events] == [
        ("Warning", "LoadFailed"),
        ("Normal", "LoadRecovered"),
    ]


async def test_a_status_write_that_fails_is_retried_with_backoff() -> None:
    kube = FakeKube()
    kube.fail = 1
    reporter = StatusReporter(kube, {CM: configmap()}.get)
    reporter.queue.backoff.base = 0.01
    async with reporter.queue:
        reporter.report(CM, [], "LoadData")
        await reporter._next()
        assert kube.patches == [] and reporter.queue.failing == 1
        await reporter._next()  # handed out again once its delay passed
    assert len(kube.patches) == 1 and reporter.queue.failing == 0


async def test_a_status_write_that_keeps_failing_the_same_way_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kube = FakeKube()
    kube.fail = 3
    reporter = StatusReporter(kube, {CM: configmap()}.get)
    reporter.queue.backoff.base = 0.001
    with caplog.at_level(logging.DEBUG, logger="app.configmaps.status"):
        async with reporter.queue:
            reporter.report(CM, [], "LoadData")
            for _ in range(4):
                await reporter._next()
    assert len(kube.patches) == 1
    levels = [r.levelname for r in caplog.records if "writing the status" in r.getMessage()]
    assert levels == ["WARNING", "DEBUG", "DEBUG", "INFO"]


def test_the_selection_names_each_namespace_and_what_kopa_owns() -> None:
    selection = Selection(policies="p=rego", data="d=opa", namespaces=["a", "b"])
    paths = [(kind, c.path, c.label_selector) for kind, c in selection.collections()]
    assert paths == [
        ("data", "/api/v1/namespaces/a/configmaps", "d=opa"),
        ("data", "/api/v1/namespaces/b/configmaps", "d=opa"),
        ("policies", "/api/v1/namespaces/a/configmaps", "p=rego"),
        ("policies", "/api/v1/namespaces/b/configmaps", "p=rego"),
    ]
    assert selection.owns_policy("a/cm/p.rego")
    assert not selection.owns_policy("c/cm/p.rego"), "a namespace kopa does not watch"
    assert not selection.owns_policy("authz.rego") and not selection.owns_policy("/policies/authz.rego")
    every = Selection(policies="p=rego", data="", namespaces=["*"])
    assert [c.path for _, c in every.collections()] == ["/api/v1/configmaps"]
    assert every.owns_policy("any/cm/p.rego")


async def test_discovery_refuses_a_wrong_scope_and_tolerates_a_missing_crd() -> None:
    kube = FakeKube()
    kube.discovery["/api/v1"] = {"resources": [{"name": "services", "namespaced": True, "kind": "Service"}]}
    services = GroupVersionResource.parse("v1/services")
    widgets = GroupVersionResource.parse("example.com/v1/widgets")
    found = await discover(kube, [services, widgets], [])
    info = found[services]
    assert info is not None and info.kind == "Service"
    assert found[widgets] is None, "not installed yet: replicated once it appears"
    with pytest.raises(DiscoveryError, match="services is namespaced; use --replicate=v1/services"):
        await discover(kube, [], [services])


async def test_discovery_refuses_a_core_resource_that_does_not_exist_and_names_the_nearest() -> None:
    kube = FakeKube()
    kube.discovery["/api/v1"] = {
        "resources": [
            {"name": "services", "namespaced": True, "kind": "Service"},
            {"name": "services/status", "namespaced": True, "kind": "Service"},
        ]
    }
    typo = GroupVersionResource.parse("v1/service")
    with pytest.raises(
        DiscoveryError, match=r"the core group v1 has no resource service \(did you mean v1/services\?\)"
    ):
        await discover(kube, [typo], [])
    with pytest.raises(DiscoveryError, match=r"the core group v2 has no resource services$"):
        await discover(kube, [GroupVersionResource.parse("v2/services")], [])
