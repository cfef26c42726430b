"""Validators: each takes a parsed value and returns it normalised, or raises ValueError saying why.

Label keys, label values and namespaces are checked as Kubernetes checks them
(k8s.io/apimachinery/pkg/util/validation), with its own wording, so that a typo stops start-up with the
message kubectl would give rather than failing every list call later. The last two functions check
options that depend on each other, once every source has been merged.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from app.kube.resources import GroupVersionResource
from app.opa.configuration import bundle_names
from app.opa.credentials import NOT_HEADER_SAFE, is_header_safe
from app.settings.errors import BadItem, SettingsError, shown
from app.settings.kinds import BOOL


def http_url(value: str) -> str:
    if not value or any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("must be an http or https URL with a host, e.g. http://localhost:8181/v1")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        if parts.netloc.count(":") > 1 and "[" not in parts.netloc:
            raise ValueError("an IPv6 address goes in brackets, e.g. http://[::1]:8181/v1") from None
        raise ValueError(f"must be an http or https URL: {exc}") from exc
    if parts.username is not None or parts.password is not None:
        # Quoted without them: the message must not show a password.
        shown = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()
        raise BadItem(shown, "must not carry credentials: OPA takes a bearer token (--opa-auth-token-file)")
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http or https URL with a host, e.g. http://localhost:8181/v1")
    if "?" in value or "#" in value:
        raise ValueError("must not have a query or fragment: kopa appends API paths to it")
    return value.rstrip("/")


def header_token(value: str) -> str:
    """A token sent in an HTTP header: a line break would end the header (and start another)."""
    if not is_header_safe(value):
        raise ValueError(NOT_HEADER_SAFE)
    return value


_LOG_LEVELS = {"debug": "debug", "info": "info", "warn": "warn", "warning": "warn", "error": "error"}


def log_level(value: str) -> str:
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


def label_key(value: str) -> str:
    errors = _qualified_name_errors(value)
    if errors:
        raise ValueError("; ".join(errors))
    return value


def _short_name_errors(value: str, fmt: str, rule: str, *examples: str, alternative: str = "") -> list[str]:
    """Kubernetes' two checks of a label value or an RFC 1123 label: 63 characters at most, and the format."""
    errors = []
    if len(value) > 63:
        errors.append("must be no more than 63 characters")
    if not re.fullmatch(fmt, value):
        errors.append(_regex_error(rule, fmt, *examples) + alternative)
    return errors


def label_value(value: str) -> str:
    # An empty value is a label value like any other: key= selects the ConfigMaps labelled `key: ""`, as
    # kube-mgmt's selector does.
    if not value:
        return value
    errors = _short_name_errors(
        value,
        _QUALIFIED_NAME_FMT,
        "a valid label value must consist of alphanumeric characters, '-', '_' or '.', "
        "and must start and end with an alphanumeric character",
        "MyValue",
        "my_value",
        "12345",
    )
    if errors:
        raise ValueError("; ".join(errors))
    return value


def _namespace_errors(name: str, alternative: str = "") -> list[str]:
    return _short_name_errors(
        name,
        _DNS1123_LABEL_FMT,
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
        "and must start and end with an alphanumeric character",
        "my-name",
        "123-abc",
        alternative=alternative,
    )


def namespaces(value: tuple[str, ...]) -> tuple[str, ...]:
    for name in value:
        if name == "*":
            continue
        errors = _namespace_errors(name, alternative=", or '*' for all namespaces")
        if errors:
            raise BadItem(name, "; ".join(errors))
    if "*" in value and any(name != "*" for name in value):
        raise ValueError('"*" (all namespaces) cannot be combined with namespace names')
    return tuple(dict.fromkeys(value))  # drop repeats, keep order


def namespace(value: str) -> str:
    """One namespace name; empty means kopa's own."""
    errors = _namespace_errors(value) if value else []
    if errors:
        raise ValueError("; ".join(errors))
    return value


def object_name(value: str) -> str:
    """A Kubernetes object name (RFC 1123 subdomain), as a Lease's name must be."""
    if len(value) > 253 or not re.fullmatch(_DNS1123_SUBDOMAIN_FMT, value):
        raise ValueError(
            _regex_error(
                "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
                "'.', and must start and end with an alphanumeric character",
                _DNS1123_SUBDOMAIN_FMT,
                "example.com",
            )
        )
    return value


def leader_election(value: str) -> str:
    """auto, or a boolean as Go's strconv.ParseBool reads it (kube-mgmt users write booleans that way)."""
    text = value.strip()
    if text.lower() == "auto":
        return "auto"
    try:
        return BOOL.to_text(BOOL.parse(text))
    except ValueError:
        raise ValueError("must be auto, true or false") from None


def address(value: str) -> str:
    """host:port, :port or [v6]:port; empty turns the server off."""
    if not value:
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be HOST:PORT or :PORT with a port from 1 to 65535, or empty to turn it off")
    if host.startswith("[") != host.endswith("]") or any(c.isspace() or c in "/?#" for c in host):
        raise ValueError("has an invalid host; use an IP address or a name, e.g. 0.0.0.0:8000")
    return value


def log_format(value: str) -> str:
    if value.strip().lower() not in ("text", "json"):
        raise ValueError("must be text or json")
    return value.strip().lower()


def positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be more than zero")
    return value


def not_negative(value: float) -> float:
    if value < 0:
        raise ValueError("must not be negative")
    return value


# The shortest pause accepted between turns of a loop that calls a server (OPA, the API server): shorter
# ones only keep a core and the server busy (1ns made the OPA check a tight loop).
SHORTEST_INTERVAL = 0.01


def interval(value: float) -> float:
    if value < SHORTEST_INTERVAL:
        raise ValueError("must be at least 10ms")
    return value


def interval_or_off(value: float) -> float:
    """An interval where 0 turns the loop off."""
    return value if value == 0 else interval(not_negative(value))


def resources(value: tuple[str, ...]) -> tuple[str, ...]:
    for item in value:
        try:
            GroupVersionResource.parse(item)
        except ValueError as exc:
            raise BadItem(item, str(exc)) from None
    return tuple(dict.fromkeys(value))


def opa_config_file(value: str) -> str:
    """A file OPA's configuration can be read from (checked at start-up, read again by kopa later)."""
    if value:
        bundle_names(value)  # OpaConfigError (a ValueError) carries the one-line reason
    return value


def data_path(value: str) -> str:
    segments = value.strip("/").split("/")
    if not value.strip("/") or any(not s or s.strip() != s for s in segments):
        raise ValueError("must be a path of one or more non-empty segments, e.g. kubernetes or cluster/state")
    return "/".join(segments)


def data_paths(value: tuple[str, ...]) -> tuple[str, ...]:
    checked = []
    for item in value:
        try:
            checked.append(data_path(item))
        except ValueError as exc:
            raise BadItem(item, str(exc)) from None
    return tuple(dict.fromkeys(checked))


_SELECTOR_REQUIREMENT = re.compile(
    r"\s*(!?[^\s=!,()]+)"  # key, or !key (does not exist); checked as a qualified name below
    r"(?:\s*(==|=|!=)\s*([-A-Za-z0-9_.]*)"  # equality
    r"|\s+(in|notin)\s*\(\s*([-A-Za-z0-9_.]*(?:\s*,\s*[-A-Za-z0-9_.]*)*)\s*\))?\s*"  # set
)


def label_selector_errors(selector: str) -> str | None:
    """Checks a label selector's grammar, so a typo stops start-up instead of failing every list call."""
    rest = selector.strip()
    if not rest:
        return "must not be empty"
    while rest:
        match = _SELECTOR_REQUIREMENT.match(rest)
        if not match or match.end() == 0:
            return f"is not a valid label selector near {shown(rest[:30])}"
        key, op = match.group(1), match.group(2) or match.group(4)
        if key.startswith("!") and op:
            return f"is not a valid label selector: {key} cannot take an operator"
        problems = _qualified_name_errors(key.lstrip("!"))
        if problems:
            return f"has an invalid label key {shown(key.lstrip('!'))}: {problems[0]}"
        rest = rest[match.end() :]
        if rest.startswith(","):
            rest = rest[1:]
            if not rest.strip():
                return "is not a valid label selector: it ends with a comma"
        elif rest:
            return f"is not a valid label selector near {shown(rest[:30])}"
    return None


def resource_assignments(
    check_value: Callable[[str], str | None],
) -> Callable[[tuple[tuple[str, str], ...]], tuple[tuple[str, str], ...]]:
    def validate(value: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        for name, assigned in value:
            try:
                GroupVersionResource.parse(name)
            except ValueError as exc:
                raise BadItem(f"{name}={assigned}", f"resource {exc}") from None
            problem = check_value(assigned)
            if problem:
                raise BadItem(f"{name}={assigned}", problem)
        return value

    return validate


def field_list_errors(fields: str) -> str | None:
    items = [f.strip() for f in fields.split(",")]
    if not fields.strip() or any(not f for f in items):
        return "must list one or more fields, e.g. metadata.labels,spec.rules"
    for item in items:
        if any(not part for part in item.split(".")):
            return f"has an invalid field {shown(item)}: dotted names need a name between the dots"
    return None


# Across options: after the sources are merged, with flag names in the messages.


def check_opa_connection(values: dict[str, Any]) -> None:
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


def check_bundle_mode(values: dict[str, Any]) -> None:
    """Bundle mode needs its token or client certificates; TLS needs both files, and mutual TLS needs TLS;
    what bundle mode does not do yet stops start-up."""
    cert, key = values["bundle-tls-cert-file"], values["bundle-tls-key-file"]
    if bool(cert) != bool(key):
        missing = "--bundle-tls-key-file" if cert else "--bundle-tls-cert-file"
        given = "--bundle-tls-cert-file" if cert else "--bundle-tls-key-file"
        raise SettingsError(f"invalid {given}: TLS needs {missing} too")
    if values["bundle-tls-ca-file"] and not cert:
        raise SettingsError(
            "invalid --bundle-tls-ca-file: mutual TLS needs --bundle-tls-cert-file and --bundle-tls-key-file"
        )
    if not values["bundle-endpoint"]:
        return
    if not values["bundle-token-file"] and not values["bundle-tls-ca-file"]:
        raise SettingsError(
            "invalid --bundle-endpoint: bundle mode needs --bundle-token-file (OPAs must send it), or "
            "--bundle-tls-ca-file (OPAs must present a client certificate)"
        )
    if values["opa-config"]:
        raise SettingsError(
            "invalid --opa-config: automatic replication is not available in bundle mode yet "
            "(give the resources with --replicate)"
        )
    first = values["replicate-path"].split("/")
    for root in values["bundle-reserved-roots"]:
        segments = root.split("/")
        if segments[: len(first)] == first[: len(segments)]:
            raise SettingsError(
                f"invalid --replicate-path {shown(values['replicate-path'])}: it overlaps the reserved root "
                f"{shown(root)} (--bundle-reserved-roots)"
            )


def resolve_leader_election(values: dict[str, Any]) -> None:
    """auto becomes on in bundle mode; the timing must be client-go's valid shape (a leader renews
    several times within its deadline, and gives up before the others may take over)."""
    mode = values["leader-election"]
    values["leader-election"] = bool(values["bundle-endpoint"]) if mode == "auto" else mode == "true"
    duration = values["leader-election-lease-duration"]
    deadline = values["leader-election-renew-deadline"]
    retry = values["leader-election-retry-period"]
    if deadline >= duration:
        raise SettingsError(
            "invalid --leader-election-renew-deadline: must be shorter than --leader-election-lease-duration"
        )
    if retry * 1.2 >= deadline:
        raise SettingsError(
            "invalid --leader-election-retry-period: must be shorter than --leader-election-renew-deadline "
            "divided by 1.2"
        )


def resolve_replication(values: dict[str, Any]) -> None:
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
                    f"invalid --{name} {shown(resource_text + '=' + value)}: {resource} is not replicated "
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
