"""One coordination.k8s.io/v1 Lease: read it, create it, replace it if nobody changed it since it was read.

The adapter knows the Lease's shape and the API's optimistic concurrency (a replace carries the
resourceVersion it read; the API server answers 409 when the object changed since), nothing of elections.
Times are Kubernetes MicroTime strings (RFC 3339 with microseconds, UTC).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol
from urllib.parse import quote

import orjson

from app.kube.client import JSON, KubeApiError, KubeError

API = "/apis/coordination.k8s.io/v1"


class LeaseConflict(KubeError):
    """The Lease was created or changed by someone else since it was read: read it again."""


@dataclass(frozen=True)
class LeaseRecord:
    """The Lease's spec, as leader election reads and writes it."""

    holder: str  # holderIdentity; "" when nobody holds it (released)
    duration: int  # leaseDurationSeconds
    acquire_time: str  # MicroTime
    renew_time: str  # MicroTime
    transitions: int  # leaseTransitions

    def spec(self) -> JSON:
        return {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.duration,
            "acquireTime": self.acquire_time,
            "renewTime": self.renew_time,
            "leaseTransitions": self.transitions,
        }

    @classmethod
    def from_spec(cls, spec: JSON) -> LeaseRecord:
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration=int(spec.get("leaseDurationSeconds") or 0),
            acquire_time=str(spec.get("acquireTime") or ""),
            renew_time=str(spec.get("renewTime") or ""),
            transitions=int(spec.get("leaseTransitions") or 0),
        )


@dataclass(frozen=True)
class Lease:
    record: LeaseRecord
    resource_version: str


def micro_time(moment: datetime | None = None) -> str:
    """A Kubernetes MicroTime: 2006-01-02T15:04:05.000000Z."""
    return (moment or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class KubeRequests(Protocol):
    """What the adapter needs of KubeClient."""

    async def request(self, method: str, path: str, *, body: bytes | None = None) -> JSON: ...


class Leases:
    """The Lease `name` in `namespace`. Raises KubeUnavailable, KubeApiError (403 without RBAC), and
    LeaseConflict for a lost race."""

    def __init__(self, kube: KubeRequests, namespace: str, name: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self._collection = f"{API}/namespaces/{quote(namespace)}/leases"

    def describe(self) -> str:
        return f"lease {self.namespace}/{self.name}"

    async def get(self) -> Lease | None:
        """The Lease, or None when it does not exist."""
        try:
            return _lease(await self.kube.request("GET", f"{self._collection}/{quote(self.name)}"))
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, record: LeaseRecord) -> Lease:
        obj = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": record.spec(),
        }
        return await self._write("POST", self._collection, obj)

    async def update(self, record: LeaseRecord, resource_version: str) -> Lease:
        """Replaces the spec if the Lease is still at resource_version (else LeaseConflict)."""
        obj = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": resource_version,
            },
            "spec": record.spec(),
        }
        return await self._write("PUT", f"{self._collection}/{quote(self.name)}", obj)

    async def _write(self, method: str, path: str, obj: JSON) -> Lease:
        try:
            return _lease(await self.kube.request(method, path, body=orjson.dumps(obj)))
        except KubeApiError as exc:
            # 409: created or changed meanwhile; 404 on a replace: deleted meanwhile.
            if exc.status == 409 or (exc.status == 404 and method == "PUT"):
                raise LeaseConflict(f"{self.describe()} changed meanwhile") from exc
            raise


def _lease(obj: JSON) -> Lease:
    meta = obj.get("metadata") or {}
    return Lease(LeaseRecord.from_spec(obj.get("spec") or {}), str(meta.get("resourceVersion", "")))
