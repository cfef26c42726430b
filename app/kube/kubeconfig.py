"""The kubeconfig, read as kubectl reads it: one file, or the files of KUBECONFIG merged.

kopa needs only what the current context selects: one cluster entry, one user entry and a namespace. It
reads them with PyYAML rather than the official client's loaders, because importing those loads the whole
`kubernetes` package (its generated API models) first: 0.3 to 0.7 s and 20 MB of every kopa's start, for a
few dozen lines of YAML (docs/benchmarks.md).

Merging follows kubectl (https://kubernetes.io/docs/concepts/configuration/organize-cluster-access-kubeconfig/):
files that do not exist are skipped, the first file to set `current-context` wins, and the first file to
define a cluster, user or context of a given name wins it whole. A relative path in an entry (a CA file, a
client certificate, a token file, an exec plugin's command) is relative to the file that defined the entry.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SECTIONS = (("clusters", "cluster"), ("users", "user"), ("contexts", "context"))


class KubeconfigInvalid(ValueError):
    """The kubeconfig does not say where the API server is or who kopa is; str() is one line."""


@dataclass(frozen=True)
class Entry:
    """One named cluster or user of a kubeconfig, and the directory its relative paths start from."""

    name: str
    fields: Mapping[str, Any]
    base: Path

    def text(self, key: str) -> str:
        """A string field ("" when absent); anything else is a mistake in the file, named here."""
        value = self.fields.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise KubeconfigInvalid(f"{key} of {self.name!r} must be a string")
        return value

    def path(self, key: str) -> Path | None:
        """A file named by a field, made absolute against the file that defined this entry."""
        name = self.text(key)
        return self.base / Path(name).expanduser() if name else None


@dataclass(frozen=True)
class Selected:
    """What the current context selects: its cluster, its user (no fields if it names none), its namespace."""

    cluster: Entry
    user: Entry
    namespace: str


def kubeconfig_files(kubeconfig_env: str) -> list[Path]:
    """The files a KUBECONFIG value lists, in order: no empty items, no repeats, no missing files."""
    files: list[Path] = []
    for item in kubeconfig_env.split(os.pathsep):
        path = Path(item).expanduser() if item else None
        if path is not None and path not in files and path.is_file():
            files.append(path)
    return files


def read_kubeconfig(files: Sequence[Path]) -> Selected:
    """Reads and merges `files` (kubectl's rules, above) and resolves their current context."""
    current = ""
    named: dict[str, dict[str, Entry]] = {section: {} for section, _ in SECTIONS}
    for path in files:
        doc = _load(path)
        if not current and isinstance(doc.get("current-context"), str):
            current = doc["current-context"]
        for section, field in SECTIONS:
            for item in _items(doc, section, path):
                named[section].setdefault(item["name"], _entry(item, field, path))
    if not current:
        raise KubeconfigInvalid("no current-context is set")
    context = named["contexts"].get(current)
    if context is None:
        raise KubeconfigInvalid(f"the current-context {current!r} is not among the contexts")
    cluster = named["clusters"].get(context.text("cluster"))
    if cluster is None:
        raise KubeconfigInvalid(
            f"context {current!r} names cluster {context.text('cluster')!r}, which is not there"
        )
    user_name = context.text("user")
    user = named["users"].get(user_name) if user_name else Entry("", {}, cluster.base)
    if user is None:
        raise KubeconfigInvalid(f"context {current!r} names user {user_name!r}, which is not there")
    return Selected(cluster=cluster, user=user, namespace=context.text("namespace") or "default")


def _load(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.load(path.read_bytes(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        where = f" (line {exc.problem_mark.line + 1})" if exc.problem_mark else ""
        raise KubeconfigInvalid(f"{path} is not valid YAML: {exc.problem}{where}") from None
    except yaml.YAMLError as exc:
        raise KubeconfigInvalid(f"{path} is not valid YAML: {exc}") from None
    if doc is None:
        return {}  # an empty file sets nothing, as with kubectl
    if not isinstance(doc, dict):
        raise KubeconfigInvalid(f"{path} is not a kubeconfig (a YAML mapping)")
    return doc


def _items(doc: Mapping[str, Any], section: str, path: Path) -> list[dict[str, Any]]:
    items = doc.get(section) or []
    if not isinstance(items, list) or not all(
        isinstance(item, dict) and isinstance(item.get("name"), str) for item in items
    ):
        raise KubeconfigInvalid(f"{section} in {path} must be a list of entries with a name")
    return items


def _entry(item: Mapping[str, Any], field: str, path: Path) -> Entry:
    fields = item.get(field) or {}
    if not isinstance(fields, dict):
        raise KubeconfigInvalid(f"{field} of {item['name']!r} in {path} must be a mapping")
    return Entry(name=item["name"], fields=fields, base=path.parent.absolute())
