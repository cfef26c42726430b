"""Naming Kubernetes resources the way kube-mgmt's --replicate flags do: `[group/]version/resource`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class GroupVersionResource:
    group: str  # "" for the core group
    version: str
    resource: str  # the plural, lower-cased, e.g. "services"

    @classmethod
    def parse(cls, text: str) -> GroupVersionResource:
        """Raises ValueError with kube-mgmt's wording for a malformed value."""
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or any(not p for p in parts):
            raise ValueError("must be [group/]version/resource (format: group/version/kind)")
        if len(parts) == 2:
            parts.insert(0, "")
        group, version, resource = parts
        return cls(group.lower(), version, resource.lower())

    @property
    def api_path(self) -> str:
        """Where this group/version lives on the API server."""
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def collection_path(self, namespace: str | None = None) -> str:
        if namespace:
            return f"{self.api_path}/namespaces/{namespace}/{self.resource}"
        return f"{self.api_path}/{self.resource}"

    def __str__(self) -> str:
        return (
            f"{self.group}/{self.version}/{self.resource}"
            if self.group
            else f"{self.version}/{self.resource}"
        )
