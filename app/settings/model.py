"""What kopa runs with: the settings after every source is read, validated and normalised.

The rest of kopa sees only these frozen dataclasses, never where a value came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app.kube.resources import GroupVersionResource


@dataclass(frozen=True)
class Settings:
    """What kopa runs with, validated and normalised, whatever source each value came from."""

    kubeconfig: str  # "" = not given
    opa_url: str  # trailing "/" trimmed
    log_level: str  # "debug" | "info" | "warn" | "error"
    enable_policies: bool
    policy_label: str
    policy_value: str
    enable_data: bool
    data_label: str
    data_value: str
    namespaces: tuple[str, ...]  # () = not given (kopa watches its own namespace); ("*",) = all
    opa_check_interval: float  # seconds
    drift_check_interval: float  # seconds; 0 = off
    health_endpoint: str  # "host:port" of the probe and metrics server; "" = off
    log_format: str  # "text" | "json"
    shutdown_timeout: float  # seconds
    opa_auth_token: str = field(repr=False)  # never logged: repr leaves it out
    opa_auth_token_file: str
    opa_ca_file: str
    opa_allow_insecure: bool
    opa_client_cert_file: str
    opa_client_key_file: str
    replicate: tuple[GroupVersionResource, ...]  # namespaced resources to replicate
    replicate_cluster: tuple[GroupVersionResource, ...]  # cluster-scoped resources to replicate
    replicate_path: str  # slash-separated path under data/ in OPA
    replicate_ignore_namespaces: tuple[str, ...]
    replicate_keep_managed_fields: bool
    replicate_selector: tuple[tuple[GroupVersionResource, str], ...]  # (resource, label selector)
    replicate_fields: tuple[tuple[GroupVersionResource, tuple[str, ...]], ...]  # (resource, fields kept)
    config_file: str | None
    warnings: tuple[str, ...]  # logged by the CLI once logging is configured
    show_version: bool
