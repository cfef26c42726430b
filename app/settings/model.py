"""What kopa runs with: the settings after every source is read, validated and normalised.

The rest of kopa sees only these frozen dataclasses, never where a value came from. Their parts follow the
option groups (`options.GROUPS`): `settings.opa.url` is --opa-url, `settings.replication.path` is
--replicate-path; the options of the Kubernetes and "Other" groups are fields of `Settings` itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app.kube.resources import GroupVersionResource


@dataclass(frozen=True)
class OpaSettings:
    """How to reach OPA, and how often to check on it."""

    url: str  # trailing "/" trimmed
    auth_token: str = field(repr=False)  # never logged: repr leaves it out
    auth_token_file: str
    ca_file: str
    allow_insecure: bool
    client_cert_file: str
    client_key_file: str
    check_interval: float  # seconds
    drift_check_interval: float  # seconds; 0 = off


@dataclass(frozen=True)
class ConfigMapSettings:
    """Which ConfigMaps hold the policies and the data kopa loads into OPA."""

    enable_policies: bool
    policy_label: str
    policy_value: str
    enable_data: bool
    data_label: str
    data_value: str
    namespaces: tuple[str, ...]  # () = not given (kopa watches its own namespace); ("*",) = all


@dataclass(frozen=True)
class ReplicationSettings:
    """Which Kubernetes resources kopa replicates into OPA's data, where, and what it keeps of them."""

    namespaced_resources: tuple[GroupVersionResource, ...]  # --replicate
    cluster_resources: tuple[GroupVersionResource, ...]  # --replicate-cluster
    path: str  # slash-separated path under data/ in OPA
    ignore_namespaces: tuple[str, ...]
    keep_managed_fields: bool
    selectors: tuple[tuple[GroupVersionResource, str], ...]  # (resource, label selector)
    fields: tuple[tuple[GroupVersionResource, tuple[str, ...]], ...]  # (resource, fields kept)
    opa_config: str  # --opa-config: "" = no automatic replication
    analysis_entrypoint: str  # slash-separated path below data
    analysis_grace_period: float  # seconds


@dataclass(frozen=True)
class BundleSettings:
    """Bundle mode: where kopa serves its bundle, who may fetch it (token, client certificates), and which
    roots are not kopa's."""

    endpoint: str  # "host:port"; "" = push mode
    token_file: str
    tls_cert_file: str
    tls_key_file: str
    tls_ca_file: str  # "" = no client certificates asked for
    reserved_roots: tuple[str, ...]  # slash-separated paths below data

    @property
    def enabled(self) -> bool:
        return bool(self.endpoint)


@dataclass(frozen=True)
class LeaderElectionSettings:
    """Which Lease elects the one kopa replica that writes statuses and Events, and its timing."""

    enabled: bool  # "auto" resolved: on in bundle mode
    namespace: str  # "" = kopa's own namespace
    lease_name: str
    lease_duration: float  # seconds
    renew_deadline: float  # seconds
    retry_period: float  # seconds


@dataclass(frozen=True)
class LoggingSettings:
    """How much kopa logs, and in which form."""

    level: str  # "debug" | "info" | "warn" | "error"
    format: str  # "text" | "json"


@dataclass(frozen=True)
class Settings:
    """Everything kopa runs with, validated and normalised, whatever source each value came from."""

    kubeconfig: str  # "" = not given
    opa: OpaSettings
    configmaps: ConfigMapSettings
    replication: ReplicationSettings
    bundle: BundleSettings
    leader_election: LeaderElectionSettings
    logging: LoggingSettings
    health_endpoint: str  # "host:port" of the probe and metrics server; "" = off
    shutdown_timeout: float  # seconds
    config_file: str | None
    warnings: tuple[str, ...]  # logged by the CLI once logging is configured
    show_version: bool
