"""Finds the server binaries that scripts/build-servers.sh builds and caches outside the repository.

The versions come from scripts/versions.env, the same file the build script reads, so the tests always run
the binaries of the versions the repository names, never whatever happens to be on PATH.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["TOOLS", "MissingBinary", "read_versions", "repo_root", "tool_path", "tools_dir"]

# name -> (version key in versions.env, path under the tools dir with "{version}" filled in)
TOOLS: dict[str, tuple[str, str]] = {
    "opa": ("OPA_VERSION", "opa-{version}/opa"),
    "etcd": ("ETCD_VERSION", "etcd-{version}/etcd"),
    "kube-apiserver": ("KUBERNETES_VERSION", "kubernetes-{version}/kube-apiserver"),
    "kubectl": ("KUBERNETES_VERSION", "kubernetes-{version}/kubectl"),
    "helm": ("HELM_VERSION", "helm-{version}/helm"),
    "kube-score": ("KUBE_SCORE_VERSION", "kube-score-{version}/kube-score"),
    "kube-mgmt": ("KUBE_MGMT_VERSION", "kube-mgmt-{version}/kube-mgmt"),
}

BUILD_HINT = "run `scripts/build-servers.sh` (or `make servers`) to build it"


class MissingBinary(Exception):
    """A server binary is not built yet; the message says which one and how to build it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def repo_root() -> Path:
    """The repository checkout this package lives in (devstack/ sits at its top level)."""
    return Path(__file__).resolve().parent.parent


def read_versions(path: Path | None = None) -> dict[str, str]:
    """Parses versions.env (KEY=VALUE lines, # comments) the way the build script's `source` sees it."""
    path = path or repo_root() / "scripts" / "versions.env"
    versions: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.split(" #", 1)[0].strip().strip("'\"")
        versions[key.strip().removeprefix("export ").strip()] = value
    return versions


def tools_dir() -> Path:
    """Where the build script puts binaries: same default chain as scripts/build-servers.sh."""
    explicit = os.environ.get("KOPA_TOOLS_DIR")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "kopa" / "tools"


def tool_path(name: str) -> Path:
    """The executable for `name` at the version versions.env pins; raises MissingBinary if not built."""
    try:
        key, template = TOOLS[name]
    except KeyError:
        raise ValueError(f"unknown tool {name!r}; expected one of {', '.join(sorted(TOOLS))}") from None
    versions = read_versions()
    version = versions.get(key)
    if not version:
        raise MissingBinary(f"{key} is not set in scripts/versions.env, so {name} cannot be located")
    path = tools_dir() / template.format(version=version)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise MissingBinary(f"{name} {version} is not built (expected {path}); {BUILD_HINT}")
    return path
