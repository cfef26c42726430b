"""The options table: every setting once, with what each source, --help and config.example.yaml need.

Adding a setting is one `Option` entry in `OPTIONS` plus its field in `Settings` (a unit test checks the two
agree); its `Group` says both where --help lists it and which part of `Settings` holds it. `LEGACY` lists
the kube-mgmt flags kopa only recognises, so that existing manifests keep working or fail with a clear
message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from app.settings import validators
from app.settings.kinds import ASSIGNMENTS, BOOL, DURATION, STRING, STRING_LIST, Kind

T = TypeVar("T")

ENV_PREFIX = "KOPA_"


@dataclass(frozen=True)
class Group:
    """Options that belong together: a heading in --help and config.example.yaml, and a part of Settings."""

    title: str
    section: str = ""  # the Settings attribute holding its options' fields; "" = Settings itself
    prefix: str = ""  # left out of its options' field names: opa-url is settings.opa.url


KUBERNETES = Group("Connection to Kubernetes")
OPA = Group("Connection to OPA", section="opa", prefix="opa-")
POLICIES_AND_DATA = Group("Policies and data", section="configmaps")
REPLICATION = Group("Replication of Kubernetes resources", section="replication", prefix="replicate-")
BUNDLE = Group("Bundle mode", section="bundle", prefix="bundle-")
LEADER_ELECTION = Group("Leader election", section="leader_election", prefix="leader-election-")
LOGGING = Group("Logging", section="logging", prefix="log-")
OTHER = Group("Other")
GROUPS = (KUBERNETES, OPA, POLICIES_AND_DATA, REPLICATION, BUNDLE, LEADER_ELECTION, LOGGING, OTHER)


@dataclass(frozen=True)
class Option(Generic[T]):
    """One setting: everything each source, the help text and config.example.yaml need to know."""

    name: str  # the long flag without dashes; also the config file key
    kind: Kind[T]
    default: T
    help: str  # one or two sentences, used in --help and as the comment in config.example.yaml
    group: Group
    metavar: str = ""  # the value's placeholder in --help
    validate: Callable[[T], T] | None = None
    short: str = ""  # one letter, for `-v` style
    env: bool = True  # settable as KOPA_<NAME>
    in_file: bool = True  # settable as a key of the config file
    default_text: str | None = None  # words for the default where the value says little; "" hides it
    field_name: str = (
        ""  # its field in its group's section, when not the name (less the prefix) in snake case
    )
    secret: bool = False  # never quoted back in an error message

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def attribute(self) -> str:
        """Its path from Settings: `opa.url` for opa-url, `kubeconfig` for kubeconfig."""
        field = self.field_name or self.name.removeprefix(self.group.prefix).replace("-", "_")
        return f"{self.group.section}.{field}" if self.group.section else field

    @property
    def env_var(self) -> str:
        return env_var(self.name)

    def checked(self, value: T) -> T:
        return self.validate(value) if self.validate else value


def env_var(name: str) -> str:
    """`opa-url` → `KOPA_OPA_URL`."""
    return ENV_PREFIX + name.upper().replace("-", "_")


OPTIONS: tuple[Option[Any], ...] = (
    Option(
        "kubeconfig",
        STRING,
        "",
        "kubeconfig file to reach the Kubernetes API with. When empty, kopa uses KUBECONFIG, "
        "then the pod's service account, then ~/.kube/config.",
        KUBERNETES,
        metavar="PATH",
        default_text="none",
    ),
    Option(
        "opa-url",
        STRING,
        "http://localhost:8181/v1",
        "Base URL of OPA's REST API, including the /v1 path.",
        OPA,
        metavar="URL",
        validate=validators.http_url,
    ),
    Option(
        "opa-auth-token",
        STRING,
        "",
        "Bearer token for OPA's API. Prefer opa-auth-token-file: a flag shows in the process list.",
        OPA,
        metavar="TOKEN",
        default_text="none",
        secret=True,
        validate=validators.header_token,
    ),
    Option(
        "opa-auth-token-file",
        STRING,
        "",
        "File whose first line is the bearer token for OPA's API; re-read when it changes.",
        OPA,
        metavar="PATH",
        default_text="none",
    ),
    Option(
        "opa-ca-file",
        STRING,
        "",
        "PEM file of CA certificates that OPA's certificate may chain to, besides the system's; re-read "
        "when it changes.",
        OPA,
        metavar="PATH",
        default_text="none",
    ),
    Option(
        "opa-allow-insecure",
        BOOL,
        False,
        "Do not verify OPA's TLS certificate (for testing only).",
        OPA,
        metavar="BOOL",
    ),
    Option(
        "opa-client-cert-file",
        STRING,
        "",
        "PEM client certificate for mutual TLS with OPA (with opa-client-key-file).",
        OPA,
        metavar="PATH",
        default_text="none",
    ),
    Option(
        "opa-client-key-file",
        STRING,
        "",
        "PEM private key of opa-client-cert-file.",
        OPA,
        metavar="PATH",
        default_text="none",
    ),
    Option(
        "opa-check-interval",
        DURATION,
        1.0,
        "How often to ask OPA whether it restarted (its process id changes), to load everything again; at "
        "least 10ms.",
        OPA,
        metavar="DURATION",
        validate=validators.interval,
    ),
    Option(
        "drift-check-interval",
        DURATION,
        60.0,
        "How often to compare what OPA holds with kopa's copy and repair what differs (changes made "
        "behind kopa's back): every policy and data document, and one namespace of each replicated "
        "resource, in rotation. 0 turns it off; otherwise at least 10ms.",
        OPA,
        metavar="DURATION",
        validate=validators.interval_or_off,
    ),
    Option(
        "enable-policies",
        BOOL,
        True,
        "Load Rego policies from ConfigMaps labelled policy-label=policy-value.",
        POLICIES_AND_DATA,
        metavar="BOOL",
    ),
    Option(
        "policy-label",
        STRING,
        "openpolicyagent.org/policy",
        "Label key that marks a ConfigMap as holding policies.",
        POLICIES_AND_DATA,
        metavar="KEY",
        validate=validators.label_key,
    ),
    Option(
        "policy-value",
        STRING,
        "rego",
        "Value the policy label must have.",
        POLICIES_AND_DATA,
        metavar="VALUE",
        validate=validators.label_value,
    ),
    Option(
        "enable-data",
        BOOL,
        True,
        "Load JSON data from ConfigMaps labelled data-label=data-value.",
        POLICIES_AND_DATA,
        metavar="BOOL",
    ),
    Option(
        "data-label",
        STRING,
        "openpolicyagent.org/data",
        "Label key that marks a ConfigMap as holding JSON data.",
        POLICIES_AND_DATA,
        metavar="KEY",
        validate=validators.label_key,
    ),
    Option(
        "data-value",
        STRING,
        "opa",
        "Value the data label must have.",
        POLICIES_AND_DATA,
        metavar="VALUE",
        validate=validators.label_value,
    ),
    Option(
        "namespaces",
        STRING_LIST,
        (),
        "Namespaces to load policies and data from; * for all of them.",
        POLICIES_AND_DATA,
        metavar="NS",
        validate=validators.namespaces,
        default_text="kopa's own namespace",
    ),
    Option(
        "replicate",
        STRING_LIST,
        (),
        "Namespaced resources to replicate into OPA, as [group/]version/resource (e.g. v1/services, "
        "networking.k8s.io/v1/ingresses). Objects land at data.<path>.<resource>.<namespace>.<name>.",
        REPLICATION,
        metavar="GVR",
        validate=validators.resources,
        default_text="none",
        field_name="namespaced_resources",
    ),
    Option(
        "replicate-cluster",
        STRING_LIST,
        (),
        "Cluster-scoped resources to replicate into OPA (e.g. v1/namespaces), at "
        "data.<replicate-path>.<resource>.<name>.",
        REPLICATION,
        metavar="GVR",
        validate=validators.resources,
        default_text="none",
        field_name="cluster_resources",
    ),
    Option(
        "replicate-path",
        STRING,
        "kubernetes",
        "Where replicated resources go in OPA's data: a path of one or more segments.",
        REPLICATION,
        metavar="PATH",
        validate=validators.data_path,
    ),
    Option(
        "replicate-ignore-namespaces",
        STRING_LIST,
        (),
        "Namespaces whose objects are not replicated (filtered by the API server; cluster-scoped "
        "resources are not affected).",
        REPLICATION,
        metavar="NS",
        validate=validators.namespaces,
        default_text="none",
    ),
    Option(
        "replicate-keep-managed-fields",
        BOOL,
        False,
        "Keep metadata.managedFields in replicated objects (kopa drops it: it is often 40% of an object).",
        REPLICATION,
        metavar="BOOL",
    ),
    Option(
        "replicate-selector",
        ASSIGNMENTS,
        (),
        "Replicate only the objects of a resource that match a label selector, filtered by the API "
        "server, e.g. v1/pods=app=web,tier!=cache.",
        REPLICATION,
        metavar="GVR=SELECTOR",
        validate=validators.resource_assignments(validators.label_selector_errors),
        default_text="none",
        field_name="selectors",
    ),
    Option(
        "replicate-fields",
        ASSIGNMENTS,
        (),
        "Keep only these top-level or dotted fields of a resource's objects, e.g. "
        "v1/services=metadata.labels,spec.ports (name, namespace, kind and apiVersion are always kept).",
        REPLICATION,
        metavar="GVR=FIELDS",
        validate=validators.resource_assignments(validators.field_list_errors),
        default_text="none",
    ),
    Option(
        "opa-config",
        STRING,
        "",
        "Replicate automatically what the policies read: the OPA configuration file OPA runs with (its "
        "bundles are waited for); kopa analyses the policies OPA holds from the entrypoint and replicates "
        "every data.<replicate-path>.<resource> they read (kube-mgmt's auto mode).",
        REPLICATION,
        metavar="FILE",
        validate=validators.opa_config_file,
        default_text="off",
        field_name="opa_config",
    ),
    Option(
        "analysis-entrypoint",
        STRING,
        "main/main",
        "With --opa-config: the decision whose rules the analysis starts from, as a slash-separated "
        "path below data (ConfigMap policies are analysed whole, whatever queries them).",
        REPLICATION,
        metavar="PATH",
        validate=validators.data_path,
        field_name="analysis_entrypoint",
    ),
    Option(
        "analysis-grace-period",
        DURATION,
        300.0,
        "With --opa-config: how long a resource the policies no longer read keeps being replicated before "
        "kopa stops it and removes its data from OPA (a bundle that flaps costs no reload).",
        REPLICATION,
        metavar="DURATION",
        validate=validators.not_negative,
        field_name="analysis_grace_period",
    ),
    Option(
        "bundle-endpoint",
        STRING,
        "",
        "Bundle mode: serve OPA's bundle protocol at this address (GET /bundles/kopa) instead of writing "
        "into one OPA, so any number of OPAs can download what kopa holds; opa-url then names the private "
        "OPA that checks each policy before it enters the bundle. Empty: push mode.",
        BUNDLE,
        metavar="ADDR",
        validate=validators.address,
        default_text="off",
    ),
    Option(
        "bundle-token-file",
        STRING,
        "",
        "File whose first line is the bearer token OPAs must send to the bundle endpoint and its status "
        "service; re-read when it changes. Required in bundle mode unless bundle-tls-ca-file is given: "
        "with both, an OPA needs a client certificate and the token; with the CA file alone, the "
        "certificate only.",
        BUNDLE,
        metavar="PATH",
        default_text="none",
    ),
    Option(
        "bundle-tls-cert-file",
        STRING,
        "",
        "PEM certificate the bundle endpoint serves TLS with (with bundle-tls-key-file); without it, HTTP. "
        "Read again when it changes (checked at most once a second, on new connections).",
        BUNDLE,
        metavar="PATH",
        default_text="none",
    ),
    Option(
        "bundle-tls-key-file",
        STRING,
        "",
        "PEM private key of bundle-tls-cert-file.",
        BUNDLE,
        metavar="PATH",
        default_text="none",
    ),
    Option(
        "bundle-tls-ca-file",
        STRING,
        "",
        "PEM CA certificates for mutual TLS: the bundle endpoint then accepts only clients presenting a "
        "certificate signed by one of them (OPA's client_tls credentials), and trusts no other CA; read "
        "again when it changes. Needs bundle-tls-cert-file. With bundle-token-file too, an OPA needs both "
        "(OPA takes one credentials method per service: it then sends the token as a header).",
        BUNDLE,
        metavar="PATH",
        default_text="none",
    ),
    Option(
        "bundle-reserved-roots",
        STRING_LIST,
        ("system",),
        "Paths below data that belong to OPA itself or to other bundles (slash-separated): a policy whose "
        "package, or data whose path, overlaps one is refused, never put into kopa's bundle.",
        BUNDLE,
        metavar="PATH",
        validate=validators.data_paths,
    ),
    Option(
        "leader-election",
        STRING,
        "auto",
        "Let only the holder of a coordination.k8s.io Lease write statuses and Events, so that several "
        "kopa replicas never duplicate them: true, false, or auto (on in bundle mode, off in push mode, "
        "where each sidecar reports on its own OPA as kube-mgmt does).",
        LEADER_ELECTION,
        metavar="auto|true|false",
        validate=validators.leader_election,
        field_name="enabled",
    ),
    Option(
        "leader-election-namespace",
        STRING,
        "",
        "Namespace of the Lease.",
        LEADER_ELECTION,
        metavar="NS",
        validate=validators.namespace,
        default_text="kopa's own namespace",
    ),
    Option(
        "leader-election-lease-name",
        STRING,
        "kopa",
        "Name of the Lease; kopa replicas that share it elect one status writer.",
        LEADER_ELECTION,
        metavar="NAME",
        validate=validators.object_name,
    ),
    Option(
        "leader-election-lease-duration",
        DURATION,
        15.0,
        "How long the others wait, after the leader last renewed the Lease, before taking it over: a "
        "leader that dies is replaced within this plus the retry period.",
        LEADER_ELECTION,
        metavar="DURATION",
        validate=validators.positive,
    ),
    Option(
        "leader-election-renew-deadline",
        DURATION,
        10.0,
        "A leader that could not renew the Lease for this long stops writing (and tries to win it again).",
        LEADER_ELECTION,
        metavar="DURATION",
        validate=validators.positive,
    ),
    Option(
        "leader-election-retry-period",
        DURATION,
        2.0,
        "How often the leader renews the Lease, and the others try to acquire it; at least 10ms.",
        LEADER_ELECTION,
        metavar="DURATION",
        validate=validators.interval,
    ),
    Option(
        "log-level",
        STRING,
        "info",
        "Lowest severity of the messages to log: debug, info, warn or error.",
        LOGGING,
        metavar="LEVEL",
        validate=validators.log_level,
    ),
    Option(
        "log-format",
        STRING,
        "text",
        "text: readable lines; json: one JSON object per line, for log pipelines.",
        LOGGING,
        metavar="FORMAT",
        validate=validators.log_format,
    ),
    Option(
        "health-endpoint",
        STRING,
        "0.0.0.0:8000",
        "Address of the HTTP server for /healthz (liveness), /readyz and /health (readiness) and "
        "/metrics (Prometheus); 0.0.0.0, [::] or no host listen on IPv4 and IPv6. Empty turns it off.",
        OTHER,
        metavar="ADDR",
        validate=validators.address,
    ),
    Option(
        "shutdown-timeout",
        DURATION,
        10.0,
        "On SIGTERM or SIGINT, exit within this time, abandoning writes still in flight.",
        OTHER,
        metavar="DURATION",
        validate=validators.positive,
    ),
    Option(
        "config",
        STRING,
        "",
        "YAML file to read settings from (see below).",
        OTHER,
        metavar="PATH",
        in_file=False,
        default_text="none",
        field_name="config_file",
    ),
    Option(
        "version",
        BOOL,
        False,
        "Print the version and exit.",
        OTHER,
        short="v",
        env=False,
        in_file=False,
        default_text="",
        field_name="show_version",
    ),
    Option(
        "help",
        BOOL,
        False,
        "Print this help and exit.",
        OTHER,
        short="h",
        env=False,
        in_file=False,
        default_text="",
    ),
)


@dataclass(frozen=True)
class Legacy:
    """A kube-mgmt flag kopa only recognises, so that existing manifests keep working or fail clearly."""

    name: str
    kind: Kind[Any]
    alias_of: str = ""  # deprecated name: the value goes to that option
    no_effect: str = ""  # accepted with a warning: why it has no effect
    unsupported: str = ""  # start-up stops: what the flag was for

    @property
    def flag(self) -> str:
        return f"--{self.name}"


LEGACY: tuple[Legacy, ...] = (
    Legacy("policies", STRING_LIST, alias_of="namespaces"),
    Legacy("require-policy-label", BOOL, no_effect="kopa always selects policies by their label"),
    Legacy("replicate-resync", DURATION, alias_of="drift-check-interval"),
)

BY_NAME: dict[str, Option[Any]] = {option.name: option for option in OPTIONS}
BY_SHORT: dict[str, Option[Any]] = {option.short: option for option in OPTIONS if option.short}
LEGACY_BY_NAME: dict[str, Legacy] = {legacy.name: legacy for legacy in LEGACY}
