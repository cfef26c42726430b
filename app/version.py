"""The version kopa reports: the git tag it was built from, and the commit."""

from __future__ import annotations

import importlib


def version_info() -> tuple[str, str]:
    """Returns (version, commit). Both come from the file setuptools-scm writes at build time."""
    try:
        _version = importlib.import_module("app._version")
    except ImportError:  # a source tree that was never installed
        return "0.0.0", "unknown"
    # setuptools-scm writes git's describe-style node ("g" + abbreviated sha); kube-mgmt prints the sha.
    commit = str(getattr(_version, "commit_id", None) or "unknown").removeprefix("g")
    return str(_version.version), commit


def version_line() -> str:
    """kube-mgmt prints `Version: x, Git: sha`; kopa says the same in its own words."""
    version, commit = version_info()
    return f"kopa {version} (git {commit})"
