"""kopa's settings: one table of options from which flags, environment, config file and docs all derive.

Adding a setting is one `Option` entry in `OPTIONS` plus its field in `Settings` (a unit test checks the two
agree). Flags follow Go's pflag, because kube-mgmt users' manifests are written for it: `--x=v` and `--x v`,
booleans only as `--x` or `--x=false`, lists repeatable and comma-separated, no abbreviations.
Precedence: flag > environment (`KOPA_<NAME>`) > YAML file (`--config`/`KOPA_CONFIG`) > default; a list
given at one level replaces the lower ones entirely.
"""

from __future__ import annotations

import difflib
import json
import re
import textwrap
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar
from urllib.parse import urlsplit

import yaml

from app.kube.resources import GroupVersionResource

__all__ = [
    "BOOL",
    "OPTIONS",
    "STRING",
    "STRING_LIST",
    "HelpRequested",
    "Kind",
    "Option",
    "Settings",
    "SettingsError",
    "env_var",
    "example_config",
    "help_text",
    "load_settings",
]

T = TypeVar("T")

ENV_PREFIX = "KOPA_"


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


class SettingsError(Exception):
    """A setting is wrong; the message is one line naming it as the user wrote it, so the CLI can exit 2."""

    def __init__(self, message: str) -> None:
        # The CLI prints this as one log line: a stray newline from user input must not break that.
        super().__init__(" ".join(message.splitlines()))


class HelpRequested(Exception):
    """`--help` was given: the CLI prints `.text` and exits 0, without starting anything."""

    def __init__(self, text: str) -> None:
        super().__init__("help requested")
        self.text = text


# ---------------------------------------------------------------------------------------------------------
# Kinds: how one type of value is written on the command line, in the environment and in YAML.


class Kind(ABC, Generic[T]):
    """One type of setting. A new type (a duration, say) is one subclass; no parser changes."""

    #: False only for booleans: `--x` alone means true and `--x v` leaves `v` alone, as in pflag.
    takes_argument: ClassVar[bool] = True
    #: How the type is named in "must be ..." messages about a config file value of the wrong shape.
    noun: ClassVar[str]
    #: Said after the option's help text, for syntax the type adds (lists: repeatable).
    help_note: ClassVar[str] = ""

    @abstractmethod
    def parse(self, text: str) -> T:
        """Reads a flag's or environment variable's text; ValueError says what is wrong."""

    @abstractmethod
    def to_text(self, value: T) -> str:
        """Writes a value as a flag would take it, for help text and error messages."""

    def from_yaml(self, node: object) -> T:
        """The config file's scalars arrive as text (see _TextLoader), so they parse like flags."""
        if isinstance(node, str):
            return self.parse(node)
        raise TypeError(f"must be {self.noun}, not {_describe(node)}")

    def to_yaml(self, value: T) -> str:
        return json.dumps(self.to_text(value))  # a JSON string is a YAML double-quoted scalar

    def combine(self, earlier: T, later: T) -> T:
        """A repeated flag: the last one wins, as in pflag."""
        return later

    def flag_syntax(self, metavar: str) -> str:
        return f"={metavar}"


class _String(Kind[str]):
    noun = "a string"

    def parse(self, text: str) -> str:
        return text

    def to_text(self, value: str) -> str:
        return value


class _Bool(Kind[bool]):
    takes_argument = False
    noun = "a boolean"
    # Go's strconv.ParseBool, which pflag uses: kube-mgmt users may have written any of these.
    TRUE: ClassVar[frozenset[str]] = frozenset({"1", "t", "T", "TRUE", "true", "True"})
    FALSE: ClassVar[frozenset[str]] = frozenset({"0", "f", "F", "FALSE", "false", "False"})
    SPELLINGS: ClassVar[frozenset[str]] = TRUE | FALSE

    def parse(self, text: str) -> bool:
        if text in self.TRUE:
            return True
        if text in self.FALSE:
            return False
        raise ValueError("must be true or false")

    def to_text(self, value: bool) -> str:
        return "true" if value else "false"

    def from_yaml(self, node: object) -> bool:
        if isinstance(node, bool):  # an explicit `!!bool` tag
            return node
        return super().from_yaml(node)

    def to_yaml(self, value: bool) -> str:
        return self.to_text(value)

    def flag_syntax(self, metavar: str) -> str:
        return f"[={metavar}]" if metavar else ""


class _StringList(Kind[tuple[str, ...]]):
    noun = "a list of strings"
    help_note = "Repeatable; items are comma-separated."

    def parse(self, text: str) -> tuple[str, ...]:
        # Empty items are dropped, so `--x=` is the empty list and a trailing comma is harmless.
        return tuple(item for item in (part.strip() for part in text.split(",")) if item)

    def to_text(self, value: tuple[str, ...]) -> str:
        return ",".join(value)

    def from_yaml(self, node: object) -> tuple[str, ...]:
        if isinstance(node, list):
            for item in node:
                if not isinstance(item, str):
                    raise TypeError(f"must be {self.noun}, but an item is {_describe(item)}")
            return tuple(item for item in (part.strip() for part in node) if item)
        return super().from_yaml(node)

    def to_yaml(self, value: tuple[str, ...]) -> str:
        return json.dumps(list(value))  # a JSON array is a YAML flow sequence

    def combine(self, earlier: tuple[str, ...], later: tuple[str, ...]) -> tuple[str, ...]:
        return earlier + later

    def flag_syntax(self, metavar: str) -> str:
        return f"={metavar}[,{metavar}...]"


class _Duration(Kind[float]):
    """Go's duration syntax, as kube-mgmt's flags take it (`10s`, `1m30s`, `500ms`), or plain seconds."""

    noun = "a duration"
    UNITS: ClassVar[dict[str, float]] = {
        "ns": 1e-9,
        "us": 1e-6,
        "µs": 1e-6,
        "ms": 1e-3,
        "s": 1.0,
        "m": 60.0,
        "h": 3600.0,
    }
    PART: ClassVar[re.Pattern[str]] = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")

    def parse(self, text: str) -> float:
        value = text.strip()
        try:
            seconds = float(value)
        except ValueError:
            pos, seconds = 0, 0.0
            for match in self.PART.finditer(value):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * self.UNITS[match.group(2)]
                pos = match.end()
            if pos != len(value) or not value:
                raise ValueError("must be a duration such as 10s, 1m30s or 500ms") from None
        if seconds < 0:
            raise ValueError("must not be negative")
        return seconds

    def to_text(self, value: float) -> str:
        return f"{value:g}s"


class _Assignments(Kind[tuple[tuple[str, str], ...]]):
    """Repeatable `NAME=VALUE` items whose values may hold commas (label selectors, field lists).

    A flag or a config file list item is one assignment; in the environment, assignments are separated by
    semicolons, since commas belong to the values.
    """

    noun = "a list of NAME=VALUE strings"
    help_note = "Repeatable; in the environment, separate items with ';'."

    def parse(self, text: str) -> tuple[tuple[str, str], ...]:
        items = []
        for part in (p.strip() for p in text.split(";")):
            if not part:
                continue
            name, sep, value = part.partition("=")
            if not sep or not name.strip():
                raise _BadItem(part, "must be RESOURCE=VALUE, e.g. v1/services=app=web")
            items.append((name.strip(), value.strip()))
        return tuple(items)

    def to_text(self, value: tuple[tuple[str, str], ...]) -> str:
        return ";".join(f"{name}={val}" for name, val in value)

    def from_yaml(self, node: object) -> tuple[tuple[str, str], ...]:
        if isinstance(node, list):
            items: tuple[tuple[str, str], ...] = ()
            for item in node:
                if not isinstance(item, str):
                    raise TypeError(f"must be {self.noun}, but an item is {_describe(item)}")
                items += self.parse(item)
            return items
        return super().from_yaml(node)

    def to_yaml(self, value: tuple[tuple[str, str], ...]) -> str:
        return json.dumps([f"{name}={val}" for name, val in value])

    def combine(
        self, earlier: tuple[tuple[str, str], ...], later: tuple[tuple[str, str], ...]
    ) -> tuple[tuple[str, str], ...]:
        return earlier + later

    def flag_syntax(self, metavar: str) -> str:
        return f"={metavar}"


STRING: Kind[str] = _String()
BOOL: Kind[bool] = _Bool()
STRING_LIST: Kind[tuple[str, ...]] = _StringList()
ASSIGNMENTS: Kind[tuple[tuple[str, str], ...]] = _Assignments()
DURATION: Kind[float] = _Duration()


def _describe(node: object) -> str:
    if node is None:
        return "null"
    if isinstance(node, dict):
        return "a mapping"
    if isinstance(node, list):
        return "a list"
    if isinstance(node, bool):
        return "a boolean"
    if isinstance(node, str):
        return "text"
    return f"a value of type {type(node).__name__}"


# ---------------------------------------------------------------------------------------------------------
# Validators: take the parsed value, return it normalised, or raise ValueError with the reason.


class _BadItem(ValueError):
    """A list item is invalid: the message then quotes that item rather than the whole list."""

    def __init__(self, item: str, reason: str) -> None:
        super().__init__(reason)
        self.item = item


def _http_url(value: str) -> str:
    if not value or any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("must be an http or https URL with a host, e.g. http://localhost:8181/v1")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        raise ValueError(f"must be an http or https URL: {exc}") from exc
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http or https URL with a host, e.g. http://localhost:8181/v1")
    if "?" in value or "#" in value:
        raise ValueError("must not have a query or fragment: kopa appends API paths to it")
    return value.rstrip("/")


_LOG_LEVELS = {"debug": "debug", "info": "info", "warn": "warn", "warning": "warn", "error": "error"}


def _log_level(value: str) -> str:
    try:
        return _LOG_LEVELS[value.strip().lower()]
    except KeyError:
        raise ValueError("must be one of debug, info, warn, error") from None


# Kubernetes' own validation (k8s.io/apimachinery/pkg/util/validation), messages worded as there.
_QUALIFIED_NAME_FMT = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_DNS1123_LABEL_FMT = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN_FMT = _DNS1123_LABEL_FMT + r"(\." + _DNS1123_LABEL_FMT + ")*"


def _regex_error(message: str, fmt: str, *examples: str) -> str:
    shown = ", or ".join(f"'{example}'" for example in examples)
    return f"{message} (e.g. {shown}, regex used for validation is '{fmt}')"


_NAME_PART_RULE = _regex_error(
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric "
    "character",
    _QUALIFIED_NAME_FMT,
    "MyName",
    "my.name",
    "123-abc",
)


def _qualified_name_errors(value: str) -> list[str]:
    """Kubernetes' validation of a label key (a qualified name), with its own wording."""
    parts = value.split("/")
    if len(parts) > 2:
        return [
            "a qualified name "
            + _NAME_PART_RULE
            + " with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        ]
    errors: list[str] = []
    name = parts[-1]
    if len(parts) == 2:
        prefix = parts[0]
        if not prefix:
            errors.append("prefix part must be non-empty")
        else:
            if len(prefix) > 253:
                errors.append("prefix part must be no more than 253 characters")
            if not re.fullmatch(_DNS1123_SUBDOMAIN_FMT, prefix):
                errors.append(
                    "prefix part "
                    + _regex_error(
                        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
                        "'-' or '.', and must start and end with an alphanumeric character",
                        _DNS1123_SUBDOMAIN_FMT,
                        "example.com",
                    )
                )
    if not name:
        errors.append("name part must be non-empty")
    elif len(name) > 63:
        errors.append("name part must be no more than 63 characters")
    if not re.fullmatch(_QUALIFIED_NAME_FMT, name):
        errors.append("name part " + _NAME_PART_RULE)
    return errors


def _label_key(value: str) -> str:
    errors = _qualified_name_errors(value)
    if errors:
        raise ValueError("; ".join(errors))
    return value


def _label_value(value: str) -> str:
    # Kubernetes allows an empty label value, but kopa selects ConfigMaps by key=value: empty selects nothing.
    if not value:
        raise ValueError("must not be empty")
    errors = []
    if len(value) > 63:
        errors.append("must be no more than 63 characters")
    if not re.fullmatch(_QUALIFIED_NAME_FMT, value):
        errors.append(
            _regex_error(
                "a valid label value must consist of alphanumeric characters, '-', '_' or '.', "
                "and must start and end with an alphanumeric character",
                _QUALIFIED_NAME_FMT,
                "MyValue",
                "my_value",
                "12345",
            )
        )
    if errors:
        raise ValueError("; ".join(errors))
    return value


def _namespaces(value: tuple[str, ...]) -> tuple[str, ...]:
    for name in value:
        if name == "*":
            continue
        errors = []
        if len(name) > 63:
            errors.append("must be no more than 63 characters")
        if not re.fullmatch(_DNS1123_LABEL_FMT, name):
            errors.append(
                _regex_error(
                    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
                    "and must start and end with an alphanumeric character",
                    _DNS1123_LABEL_FMT,
                    "my-name",
                    "123-abc",
                )
                + ", or '*' for all namespaces"
            )
        if errors:
            raise _BadItem(name, "; ".join(errors))
    if "*" in value and any(name != "*" for name in value):
        raise ValueError('"*" (all namespaces) cannot be combined with namespace names')
    return tuple(dict.fromkeys(value))  # drop repeats, keep order


def _address(value: str) -> str:
    """host:port, :port or [v6]:port; empty turns the server off."""
    if not value:
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be HOST:PORT or :PORT with a port from 1 to 65535, or empty to turn it off")
    if host.startswith("[") != host.endswith("]") or any(c.isspace() or c in "/?#" for c in host):
        raise ValueError("has an invalid host; use an IP address or a name, e.g. 0.0.0.0:8000")
    return value


def _log_format(value: str) -> str:
    if value.strip().lower() not in ("text", "json"):
        raise ValueError("must be text or json")
    return value.strip().lower()


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be more than zero")
    return value


def _resources(value: tuple[str, ...]) -> tuple[str, ...]:
    for item in value:
        try:
            GroupVersionResource.parse(item)
        except ValueError as exc:
            raise _BadItem(item, str(exc)) from None
    return tuple(dict.fromkeys(value))


def _data_path(value: str) -> str:
    segments = value.strip("/").split("/")
    if not value.strip("/") or any(not s or s.strip() != s for s in segments):
        raise ValueError("must be a path of one or more non-empty segments, e.g. kubernetes or cluster/state")
    return "/".join(segments)


_SELECTOR_REQUIREMENT = re.compile(
    r"\s*(!?[^\s=!,()]+)"  # key, or !key (does not exist); checked as a qualified name below
    r"(?:\s*(==|=|!=)\s*([-A-Za-z0-9_.]*)"  # equality
    r"|\s+(in|notin)\s*\(\s*([-A-Za-z0-9_.]*(?:\s*,\s*[-A-Za-z0-9_.]*)*)\s*\))?\s*"  # set
)


def _label_selector_errors(selector: str) -> str | None:
    """Checks a label selector's grammar, so a typo stops start-up instead of failing every list call."""
    rest = selector.strip()
    if not rest:
        return "must not be empty"
    while rest:
        match = _SELECTOR_REQUIREMENT.match(rest)
        if not match or match.end() == 0:
            return f"is not a valid label selector near {_shown(rest[:30])}"
        key, op = match.group(1), match.group(2) or match.group(4)
        if key.startswith("!") and op:
            return f"is not a valid label selector: {key} cannot take an operator"
        problems = _qualified_name_errors(key.lstrip("!"))
        if problems:
            return f"has an invalid label key {_shown(key.lstrip('!'))}: {problems[0]}"
        rest = rest[match.end() :]
        if rest.startswith(","):
            rest = rest[1:]
            if not rest.strip():
                return "is not a valid label selector: it ends with a comma"
        elif rest:
            return f"is not a valid label selector near {_shown(rest[:30])}"
    return None


def _resource_assignments(
    check_value: Callable[[str], str | None],
) -> Callable[[tuple[tuple[str, str], ...]], tuple[tuple[str, str], ...]]:
    def validate(value: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        for name, assigned in value:
            try:
                GroupVersionResource.parse(name)
            except ValueError as exc:
                raise _BadItem(f"{name}={assigned}", f"resource {exc}") from None
            problem = check_value(assigned)
            if problem:
                raise _BadItem(f"{name}={assigned}", problem)
        return value

    return validate


def _field_list_errors(fields: str) -> str | None:
    items = [f.strip() for f in fields.split(",")]
    if not fields.strip() or any(not f for f in items):
        return "must list one or more fields, e.g. metadata.labels,spec.rules"
    for item in items:
        if any(not part for part in item.split(".")):
            return f"has an invalid field {_shown(item)}: dotted names need a name between the dots"
    return None


# ---------------------------------------------------------------------------------------------------------
# The table.

KUBERNETES = "Connection to Kubernetes"
OPA = "Connection to OPA"
POLICIES_AND_DATA = "Policies and data"
REPLICATION = "Replication of Kubernetes resources"
LOGGING = "Logging"
OTHER = "Other"
GROUPS = (KUBERNETES, OPA, POLICIES_AND_DATA, REPLICATION, LOGGING, OTHER)


@dataclass(frozen=True)
class Option(Generic[T]):
    """One setting: everything each source, the help text and config.example.yaml need to know."""

    name: str  # the long flag without dashes; also the config file key
    kind: Kind[T]
    default: T
    help: str  # one or two sentences, used in --help and as the comment in config.example.yaml
    group: str
    metavar: str = ""  # the value's placeholder in --help
    validate: Callable[[T], T] | None = None
    short: str = ""  # one letter, for `-v` style
    env: bool = True  # settable as KOPA_<NAME>
    in_file: bool = True  # settable as a key of the config file
    default_text: str | None = None  # words for the default where the value says little; "" hides it
    field_name: str = ""  # its Settings attribute, when not the name in snake case
    secret: bool = False  # never quoted back in an error message

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def attribute(self) -> str:
        return self.field_name or self.name.replace("-", "_")

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
        validate=_http_url,
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
        "How often to ask OPA whether it restarted (its process id changes), to load everything again.",
        OPA,
        metavar="DURATION",
        validate=_positive,
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
        validate=_label_key,
    ),
    Option(
        "policy-value",
        STRING,
        "rego",
        "Value the policy label must have.",
        POLICIES_AND_DATA,
        metavar="VALUE",
        validate=_label_value,
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
        validate=_label_key,
    ),
    Option(
        "data-value",
        STRING,
        "opa",
        "Value the data label must have.",
        POLICIES_AND_DATA,
        metavar="VALUE",
        validate=_label_value,
    ),
    Option(
        "namespaces",
        STRING_LIST,
        (),
        "Namespaces to load policies and data from; * for all of them.",
        POLICIES_AND_DATA,
        metavar="NS",
        validate=_namespaces,
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
        validate=_resources,
        default_text="none",
    ),
    Option(
        "replicate-cluster",
        STRING_LIST,
        (),
        "Cluster-scoped resources to replicate into OPA (e.g. v1/namespaces), at "
        "data.<replicate-path>.<resource>.<name>.",
        REPLICATION,
        metavar="GVR",
        validate=_resources,
        default_text="none",
    ),
    Option(
        "replicate-path",
        STRING,
        "kubernetes",
        "Where replicated resources go in OPA's data: a path of one or more segments.",
        REPLICATION,
        metavar="PATH",
        validate=_data_path,
    ),
    Option(
        "replicate-ignore-namespaces",
        STRING_LIST,
        (),
        "Namespaces whose objects are not replicated (filtered by the API server; cluster-scoped "
        "resources are not affected).",
        REPLICATION,
        metavar="NS",
        validate=_namespaces,
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
        validate=_resource_assignments(_label_selector_errors),
        default_text="none",
    ),
    Option(
        "replicate-fields",
        ASSIGNMENTS,
        (),
        "Keep only these top-level or dotted fields of a resource's objects, e.g. "
        "v1/services=metadata.labels,spec.ports (name, namespace, kind and apiVersion are always kept).",
        REPLICATION,
        metavar="GVR=FIELDS",
        validate=_resource_assignments(_field_list_errors),
        default_text="none",
    ),
    Option(
        "log-level",
        STRING,
        "info",
        "Lowest severity of the messages to log: debug, info, warn or error.",
        LOGGING,
        metavar="LEVEL",
        validate=_log_level,
    ),
    Option(
        "log-format",
        STRING,
        "text",
        "text: readable lines; json: one JSON object per line, for log pipelines.",
        LOGGING,
        metavar="FORMAT",
        validate=_log_format,
    ),
    Option(
        "health-endpoint",
        STRING,
        "0.0.0.0:8000",
        "Address of the HTTP server for /healthz (liveness), /readyz and /health (readiness) and "
        "/metrics (Prometheus); 0.0.0.0, [::] or no host listen on IPv4 and IPv6. Empty turns it off.",
        OTHER,
        metavar="ADDR",
        validate=_address,
    ),
    Option(
        "shutdown-timeout",
        DURATION,
        10.0,
        "On SIGTERM or SIGINT, exit within this time, abandoning writes still in flight.",
        OTHER,
        metavar="DURATION",
        validate=_positive,
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
class _Legacy:
    """A kube-mgmt flag kopa only recognises, so that existing manifests keep working or fail clearly."""

    name: str
    kind: Kind[Any]
    alias_of: str = ""  # deprecated name: the value goes to that option
    no_effect: str = ""  # accepted with a warning: why it has no effect
    unsupported: str = ""  # start-up stops: what the flag was for

    @property
    def flag(self) -> str:
        return f"--{self.name}"


_LEGACY: tuple[_Legacy, ...] = (
    _Legacy("policies", STRING_LIST, alias_of="namespaces"),
    _Legacy("require-policy-label", BOOL, no_effect="kopa always selects policies by their label"),
    _Legacy("replicate-resync", STRING, no_effect="kopa does not resync replicated resources periodically"),
    _Legacy("opa-config", STRING, unsupported="automatic replication from bundle analysis"),
    _Legacy("analysis-entrypoint", STRING, unsupported="automatic replication from bundle analysis"),
)

_BY_NAME: dict[str, Option[Any]] = {option.name: option for option in OPTIONS}
_BY_SHORT: dict[str, Option[Any]] = {option.short: option for option in OPTIONS if option.short}
_LEGACY_BY_NAME: dict[str, _Legacy] = {legacy.name: legacy for legacy in _LEGACY}


# ---------------------------------------------------------------------------------------------------------
# Loading.


def _shown(text: str) -> str:
    """User text inside a message: quoted (Go %q style) so that the message stays one readable line."""
    return json.dumps(text, ensure_ascii=False)


def _bare(text: str) -> str:
    """A name or path the user typed: as is when plain, quoted when it has spaces or control characters."""
    if text and all(c.isprintable() and not c.isspace() for c in text):
        return text
    return _shown(text)


def _suggestion(name: str, candidates: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.75)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


@dataclass(frozen=True)
class _Where:
    """Where a value was given, to name the setting as the user wrote it."""

    name: str  # `--opa-url`, `-v`, `KOPA_OPA_URL` or `opa-url`
    file: str = ""  # for a config file key: the file

    def error(self, reason: str, value: str | None = None) -> SettingsError:
        shown = "" if value is None else f" {_shown(value)}"
        place = f" in {_bare(self.file)}" if self.file else ""
        return SettingsError(f"invalid {_bare(self.name)}{shown}{place}: {reason}")


@dataclass
class _Given:
    value: Any
    where: _Where


def _checked(option: Option[Any], given: _Given) -> Any:
    try:
        return option.checked(given.value)
    except _BadItem as exc:
        raise given.where.error(str(exc), exc.item) from None
    except ValueError as exc:
        shown = None if option.secret else option.kind.to_text(given.value)
        raise given.where.error(str(exc), shown) from None


def _parse(kind: Kind[Any], text: str, where: _Where) -> Any:
    try:
        return kind.parse(text)
    except ValueError as exc:
        raise where.error(str(exc), text) from None


@dataclass
class _FlagResult:
    given: dict[str, _Given] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Flag:
    """What a flag on the command line stands for."""

    kind: Kind[Any]
    option: Option[Any] | None  # None: a kube-mgmt flag accepted without effect
    legacy: _Legacy | None = None

    @property
    def long_name(self) -> str:
        return self.legacy.flag if self.legacy else self.option.flag if self.option else ""


def _all_flags() -> list[str]:
    return [option.flag for option in OPTIONS] + [legacy.flag for legacy in _LEGACY]


def _resolve(dashes: str, name: str) -> _Flag:
    spelled = dashes + name
    if dashes == "-":
        option = _BY_SHORT.get(name)
        if option is None:
            hint = " (long flags take two dashes)" if f"-{spelled}" in _all_flags() else ""
            raise SettingsError(f"unknown flag {_bare(spelled)}{hint}")
        return _Flag(option.kind, option)
    option = _BY_NAME.get(name)
    if option is not None:
        return _Flag(option.kind, option)
    legacy = _LEGACY_BY_NAME.get(name)
    if legacy is None:
        raise SettingsError(f"unknown flag {_bare(spelled)}{_suggestion(spelled, _all_flags(), '')}")
    if legacy.unsupported:
        raise SettingsError(f"{legacy.flag} is not supported yet (kube-mgmt's {legacy.unsupported})")
    return _Flag(legacy.kind, _BY_NAME[legacy.alias_of] if legacy.alias_of else None, legacy)


def _legacy_warning(legacy: _Legacy) -> str:
    if legacy.alias_of:
        return f"{legacy.flag} is deprecated: use --{legacy.alias_of}"
    return f"{legacy.flag} has no effect: {legacy.no_effect}; remove it"


def _read_flags(argv: Sequence[str]) -> _FlagResult:
    result = _FlagResult()
    raw: dict[str, _Given] = {}  # before validation, so that a repeated list flag adds up first
    long_names: dict[str, str] = {}  # option name -> the long flag that set it (its own, or an alias)
    args = list(argv)
    previous_bool = ""
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":  # pflag: the end of flags; what follows is positional, and kopa takes none
            if i < len(args):
                raise SettingsError(
                    f"unexpected argument {_shown(args[i])}: kopa takes no positional arguments"
                )
            break
        if not arg.startswith("-") or arg == "-":
            hint = ""
            if previous_bool and arg in _Bool.SPELLINGS:
                hint = f" (a boolean flag takes its value after '=': {previous_bool}={arg})"
            raise SettingsError(
                f"unexpected argument {_shown(arg)}: kopa takes no positional arguments{hint}"
            )

        dashes = "--" if arg.startswith("--") else "-"
        name, has_value, text = arg[len(dashes) :].partition("=")
        where = _Where(dashes + name)
        flag = _resolve(dashes, name)
        previous_bool = ""
        if not flag.kind.takes_argument:
            previous_bool = where.name
            text = text if has_value else "true"
        elif not has_value:
            if i >= len(args):
                raise SettingsError(f"flag needs an argument: {_bare(where.name)}")
            text = args[i]
            i += 1
        value = _parse(flag.kind, text, where)

        if flag.legacy and _legacy_warning(flag.legacy) not in result.warnings:
            result.warnings.append(_legacy_warning(flag.legacy))
        option = flag.option
        if option is None:
            continue
        if option.name == "help" and value:
            raise HelpRequested(help_text())
        first = long_names.setdefault(option.name, flag.long_name)
        if first != flag.long_name:
            alias = first if first != option.flag else flag.long_name
            raise SettingsError(
                f"{first} and {flag.long_name} both given: {alias} is the deprecated name of "
                f"{option.flag}; keep only {option.flag}"
            )
        earlier = raw.get(option.name)
        if earlier is not None:
            value = option.kind.combine(earlier.value, value)
        raw[option.name] = _Given(value, where)

    for name, given in raw.items():
        result.given[name] = _Given(_checked(_BY_NAME[name], given), given.where)
    return result


def _read_environment(environ: Mapping[str, str]) -> dict[str, _Given]:
    # Only known names are looked up: Kubernetes injects KOPA_PORT, KOPA_SERVICE_HOST and the like into
    # pods when a Service named kopa exists, and those must never stop kopa from starting.
    given: dict[str, _Given] = {}
    for option in OPTIONS:
        if option.env and option.env_var in environ:
            where = _Where(option.env_var)
            value = _parse(option.kind, environ[option.env_var], where)
            given[option.name] = _Given(_checked(option, _Given(value, where)), where)
    return given


class _TextLoader(yaml.SafeLoader):
    """YAML without implicit typing: `111`, `010` or `2024-01-01` stay the text the user wrote.

    A label value `111` or a namespace `0123` must not turn into a number and back into other text. Each
    Kind then reads the text as it would from a flag (booleans: true/false and Go's other spellings).
    Duplicate keys are errors rather than a silent last-one-wins.
    """

    yaml_implicit_resolvers: dict[Any, Any] = {}  # noqa: RUF012 - PyYAML's own class-level table

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {_shown(str(key))} given twice", key_node.start_mark
                )
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        return f"line {exc.problem_mark.line + 1}: {exc.problem}"
    # A ReaderError (bad encoding or character) names the stream "<byte string>": say nothing instead.
    return " ".join(str(exc).split()).replace(' in "<byte string>",', ",")


def _read_file(path: str, named_by: _Where) -> dict[str, _Given]:
    try:
        with open(path, "rb") as stream:
            content = stream.read()
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise named_by.error(f"cannot read the config file: {reason}", path) from None
    try:
        document = yaml.load(content, Loader=_TextLoader)
    except yaml.YAMLError as exc:
        raise SettingsError(f"invalid config file {_bare(path)}: {_yaml_problem(exc)}") from None
    if document is None or document == "":
        return {}
    if not isinstance(document, dict):
        raise SettingsError(
            f"invalid config file {_bare(path)}: must be a mapping of setting names to values, "
            f"not {_describe(document)}"
        )
    given: dict[str, _Given] = {}
    for key, node in document.items():
        name = str(key)
        option = _BY_NAME.get(name)
        if option is None or not option.in_file:
            raise SettingsError(f"unknown key {_shown(name)} in config file {_bare(path)}{_file_hint(name)}")
        where = _Where(name, path)
        try:
            value = option.kind.from_yaml(node)
        except TypeError as exc:
            raise where.error(str(exc)) from None
        except ValueError as exc:
            raise where.error(str(exc), node if isinstance(node, str) else None) from None
        given[name] = _Given(_checked(option, _Given(value, where)), where)
    return given


def _file_hint(name: str) -> str:
    option = _BY_NAME.get(name)
    if option is not None:
        only = "a flag or " + option.env_var if option.env else "a flag"
        return f" ({option.flag} can only be given as {only})"
    legacy = _LEGACY_BY_NAME.get(name)
    if legacy is not None and legacy.alias_of:
        return f" (it is the deprecated name of {legacy.alias_of})"
    return _suggestion(name, [option.name for option in OPTIONS if option.in_file], "")


def _opa_connection(values: dict[str, Any]) -> None:
    """Settings that exclude or need each other, as kube-mgmt defines them (plus mutual TLS)."""
    pairs = [("opa-auth-token", "opa-auth-token-file"), ("opa-ca-file", "opa-allow-insecure")]
    for one, other in pairs:
        if values[one] and values[other]:
            raise SettingsError(f"invalid --{other}: cannot be combined with --{one}; give one of them")
    cert, key = values["opa-client-cert-file"], values["opa-client-key-file"]
    if bool(cert) != bool(key):
        missing = "--opa-client-key-file" if cert else "--opa-client-cert-file"
        given = "--opa-client-cert-file" if cert else "--opa-client-key-file"
        raise SettingsError(f"invalid {given}: mutual TLS needs {missing} too")


def _replication(values: dict[str, Any]) -> None:
    """Turns the replication settings into resources, and checks that they agree with each other."""
    namespaced = tuple(GroupVersionResource.parse(v) for v in values["replicate"])
    cluster = tuple(GroupVersionResource.parse(v) for v in values["replicate-cluster"])
    both = set(namespaced) & set(cluster)
    if both:
        raise SettingsError(
            f"invalid --replicate-cluster: {sorted(map(str, both))[0]} is also given with --replicate; "
            "a resource is either namespaced or cluster-scoped"
        )
    replicated = set(namespaced) | set(cluster)

    def per_resource(name: str) -> dict[GroupVersionResource, str]:
        found: dict[GroupVersionResource, str] = {}
        for resource_text, value in values[name]:
            resource = GroupVersionResource.parse(resource_text)
            if resource not in replicated:
                raise SettingsError(
                    f"invalid --{name} {_shown(resource_text + '=' + value)}: {resource} is not replicated "
                    "(add it with --replicate or --replicate-cluster)"
                )
            if resource in found:
                raise SettingsError(f"invalid --{name}: {resource} is given more than once")
            found[resource] = value
        return found

    values["replicate"] = namespaced
    values["replicate-cluster"] = cluster
    values["replicate-selector"] = tuple(per_resource("replicate-selector").items())
    values["replicate-fields"] = tuple(
        (resource, tuple(f.strip() for f in fields.split(",")))
        for resource, fields in per_resource("replicate-fields").items()
    )


def load_settings(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    """Reads the settings from argv (without the program name), the environment and the config file.

    Raises HelpRequested for `--help`, SettingsError for anything invalid. Every value given is
    validated, even one a higher-precedence source overrides: a wrong value anywhere is a mistake.
    """
    flags = _read_flags(argv)
    environment = _read_environment(environ)
    config_given = flags.given.get("config") or environment.get("config")
    config_file = config_given.value if config_given and config_given.value else None
    from_file = _read_file(config_file, config_given.where) if config_file and config_given else {}

    values: dict[str, Any] = {option.name: option.checked(option.default) for option in OPTIONS}
    for layer in (from_file, environment, flags.given):  # lowest precedence first; lists replace
        values.update({name: given.value for name, given in layer.items()})
    values.pop("help")
    values["config"] = config_file
    _replication(values)
    _opa_connection(values)
    return Settings(
        **{_BY_NAME[name].attribute: value for name, value in values.items()},
        warnings=tuple(flags.warnings),
    )


# ---------------------------------------------------------------------------------------------------------
# Documentation.

_WIDTH = 80
_COLUMN = 32


def _default_words(option: Option[Any]) -> str:
    if option.default_text is not None:
        return option.default_text
    return option.kind.to_text(option.default) or '""'


def _wrap(text: str, indent: str = "", width: int = _WIDTH) -> list[str]:
    # Never break inside a flag or key such as --enable-data.
    return textwrap.wrap(
        text,
        width,
        initial_indent=indent,
        subsequent_indent=indent,
        break_on_hyphens=False,
        break_long_words=False,
    )


def _listed(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _verb(items: Sequence[str], one: str, many: str) -> str:
    return f"{_listed(items)} {one if len(items) == 1 else many}"


def _legacy_paragraph() -> str:
    sentences = [
        f"{legacy.flag} is a deprecated name of --{legacy.alias_of}" for legacy in _LEGACY if legacy.alias_of
    ]
    no_effect = [legacy.flag for legacy in _LEGACY if legacy.no_effect]
    if no_effect:
        sentences.append(_verb(no_effect, "is accepted but has", "are accepted but have") + " no effect")
    for purpose in dict.fromkeys(legacy.unsupported for legacy in _LEGACY if legacy.unsupported):
        flags = [legacy.flag for legacy in _LEGACY if legacy.unsupported == purpose]
        sentences.append(f"{_verb(flags, 'is', 'are')} not supported yet ({purpose})")
    return "For kube-mgmt's users: " + "; ".join(sentences) + "."


def help_text() -> str:
    """The --help text, built from OPTIONS so that it can never leave an option out."""
    out = [
        "Usage: kopa [OPTION]...",
        "",
        *_wrap(
            "kopa keeps an Open Policy Agent (OPA) in sync with a Kubernetes cluster: it loads the Rego "
            "policies and JSON data kept in labelled ConfigMaps into OPA through its REST API, keeps them "
            "up to date as the ConfigMaps change, and writes the outcome back to each ConfigMap as an "
            "annotation. It also replicates chosen Kubernetes resources into OPA's data, refills OPA when it "
            "restarts, and serves health, readiness and Prometheus metrics. It is a drop-in successor to "
            "kube-mgmt and takes the same flags."
        ),
    ]
    for group in GROUPS:
        out += ["", f"{group}:"]
        for option in (option for option in OPTIONS if option.group == group):
            short = f"-{option.short}, " if option.short else "    "
            left = f"  {short}{option.flag}{option.kind.flag_syntax(option.metavar)}"
            words = [option.help]
            if option.kind.help_note:
                words.append(option.kind.help_note)
            default = _default_words(option)
            if default:
                words.append(f"(default: {default})")
            lines = _wrap(" ".join(words), width=_WIDTH - _COLUMN)
            if len(left) + 2 > _COLUMN:  # too long to share a line with its description
                out.append(left)
                left = ""
            out.append(left.ljust(_COLUMN) + lines[0])
            out += [" " * _COLUMN + line for line in lines[1:]]

    env_bool = next(option for option in OPTIONS if option.env and option.kind is BOOL)
    env_list = next(option for option in OPTIONS if option.env and option.kind is STRING_LIST)
    not_env = [option.flag for option in OPTIONS if not option.env]
    not_in_file = [option.flag for option in OPTIONS if not option.in_file]
    config = _BY_NAME["config"]
    paragraphs = [
        f"Every option but {_listed(not_env)} can also be set in the environment as {ENV_PREFIX} and its "
        f"name in upper case with '_' for '-', e.g. {env_bool.env_var}=false or {env_list.env_var}=a,b. "
        f"Every option but {_listed(not_in_file)} can also be set in the YAML file named by {config.flag} "
        f"or {config.env_var}, as a key that is the option's name without dashes (config.example.yaml "
        "shows them all). A flag wins over the environment, and the environment over the file; a list "
        "given in one of them replaces any list given in the ones below it.",
        "Booleans are true or false (or 1, t, T, TRUE, True, 0, f, F, FALSE, False); a boolean flag takes "
        f"its value after '=', as in {env_bool.flag}=false. Lists are comma-separated, and an empty value "
        "is an empty list.",
        _legacy_paragraph(),
    ]
    for paragraph in paragraphs:
        out += ["", *_wrap(paragraph)]
    return "\n".join(out) + "\n"


def example_config() -> str:
    """The text of config.example.yaml: every file key, its meaning, and its default as the value."""
    out = [
        "# kopa's settings file, read when named by --config=PATH or KOPA_CONFIG=PATH.",
        "#",
        *_wrap(
            "Every key is optional, and each value below is the default, so this file as it stands "
            "changes nothing. A KOPA_* environment variable overrides a key, and a command-line flag "
            "overrides both; a list given there replaces the list given here. Values are read as text, as "
            "on the command line: quoting is optional, booleans are true or false, and a list may also be "
            "written as comma-separated text.",
            "# ",
        ),
    ]
    for group in GROUPS:
        options = [option for option in OPTIONS if option.group == group and option.in_file]
        if not options:
            continue
        out += ["", f"# --- {group} ---"]
        for option in options:
            comment = f"{option.help} Flag {option.flag}, environment variable {option.env_var}."
            if option.default_text:
                comment += f" Default: {option.default_text}."
            out += ["", *_wrap(comment, "# "), f"{option.name}: {option.kind.to_yaml(option.default)}"]
    return "\n".join(out) + "\n"
