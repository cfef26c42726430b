"""Naming Kubernetes resources the way kube-mgmt's --replicate flags do: `[group/]version/resource`."""

from __future__ import annotations

import re
from dataclasses import dataclass

# What the API server accepts for a group (a DNS subdomain), a version and a resource's plural (DNS labels).
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# A Kubernetes API version (v1, v2beta1): never the name of a group.
_VERSION = re.compile(r"v[0-9]+((alpha|beta)[0-9]+)?")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
EXAMPLES = "e.g. v1/services or networking.k8s.io/v1/ingresses"


@dataclass(frozen=True, order=True)
class GroupVersionResource:
    group: str  # "" for the core group
    version: str
    resource: str  # the plural, lower-cased, e.g. "services"

    @classmethod
    def parse(cls, text: str) -> GroupVersionResource:
        """Raises ValueError for a malformed value, or a part that no API server could serve."""
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or any(not p for p in parts):
            raise ValueError(f"must be [group/]version/resource, {EXAMPLES}")
        if len(parts) == 2:
            parts.insert(0, "")
        # Lower-cased as kube-mgmt does (V1/Services): the API server's names are all lower-case.
        group, version, resource = parts[0].lower(), parts[1].lower(), parts[2].lower()
        if _VERSION.fullmatch(group):
            # v1/pods/status read as group v1: a subresource, which has no objects of its own to replicate.
            raise ValueError(f"{version}/{resource} is a subresource; replicate {group}/{version} instead")
        if group and not _SUBDOMAIN.fullmatch(group):
            raise ValueError(f"the group {group!r} is not a DNS subdomain, {EXAMPLES}")
        if not _LABEL.fullmatch(version):
            raise ValueError(f"the version {version!r} is not a lower-case name such as v1 or v1beta1")
        if not _LABEL.fullmatch(resource):
            raise ValueError(f"the resource {resource!r} is not a plural resource name, {EXAMPLES}")
        return cls(group, version, resource)

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
