"""The environment and the config file, and the precedence that merges them with the command line.

Precedence: flag > environment (`KOPA_<NAME>`) > YAML file (`--config`/`KOPA_CONFIG`) > default; a list
given at one level replaces the lower ones entirely. Every value given is validated, even one a higher
source overrides: a wrong value anywhere is a mistake.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import yaml

from app.settings.errors import SettingsError, bare, describe, shown, suggestion
from app.settings.flags import read_flags
from app.settings.given import Given, Where, checked, parse_value
from app.settings.model import (
    BundleSettings,
    ConfigMapSettings,
    LeaderElectionSettings,
    LoggingSettings,
    OpaSettings,
    ReplicationSettings,
    Settings,
)
from app.settings.options import BY_NAME, GROUPS, LEGACY_BY_NAME, OPTIONS
from app.settings.validators import (
    check_bundle_mode,
    check_opa_connection,
    resolve_leader_election,
    resolve_replication,
)


def read_environment(environ: Mapping[str, str]) -> dict[str, Given]:
    # Only known names are looked up: Kubernetes injects KOPA_PORT, KOPA_SERVICE_HOST and the like into
    # pods when a Service named kopa exists, and those must never stop kopa from starting.
    given: dict[str, Given] = {}
    for option in OPTIONS:
        if option.env and option.env_var in environ:
            where = Where(option.env_var)
            value = parse_value(option.kind, environ[option.env_var], where)
            given[option.name] = Given(checked(option, Given(value, where)), where)
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
                    None, None, f"key {shown(str(key))} given twice", key_node.start_mark
                )
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        return f"line {exc.problem_mark.line + 1}: {exc.problem}"
    # A ReaderError (bad encoding or character) names the stream "<byte string>": say nothing instead.
    return " ".join(str(exc).split()).replace(' in "<byte string>",', ",")


def read_file(path: str, named_by: Where) -> dict[str, Given]:
    try:
        with open(path, "rb") as stream:
            content = stream.read()
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise named_by.error(f"cannot read the config file: {reason}", path) from None
    try:
        document = yaml.load(content, Loader=_TextLoader)
    except yaml.YAMLError as exc:
        raise SettingsError(f"invalid config file {bare(path)}: {_yaml_problem(exc)}") from None
    except RecursionError:  # PyYAML's pure-Python loader recurses once per level
        raise SettingsError(f"invalid config file {bare(path)}: nested too deeply") from None
    if document is None or document == "":
        return {}
    if not isinstance(document, dict):
        raise SettingsError(
            f"invalid config file {bare(path)}: must be a mapping of setting names to values, "
            f"not {describe(document)}"
        )
    given: dict[str, Given] = {}
    for key, node in document.items():
        name = str(key)
        option = BY_NAME.get(name)
        if option is None or not option.in_file:
            raise SettingsError(f"unknown key {shown(name)} in config file {bare(path)}{_file_hint(name)}")
        where = Where(name, path)
        try:
            value = option.kind.from_yaml(node)
        except TypeError as exc:
            raise where.error(str(exc)) from None
        except ValueError as exc:
            raise where.error(str(exc), node if isinstance(node, str) else None) from None
        given[name] = Given(checked(option, Given(value, where)), where)
    return given


def _file_hint(name: str) -> str:
    option = BY_NAME.get(name)
    if option is not None:
        only = "a flag or " + option.env_var if option.env else "a flag"
        return f" ({option.flag} can only be given as {only})"
    legacy = LEGACY_BY_NAME.get(name)
    if legacy is not None and legacy.alias_of:
        return f" (it is the deprecated name of {legacy.alias_of})"
    return suggestion(name, [option.name for option in OPTIONS if option.in_file], "")


def load_settings(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    """Reads the settings from argv (without the program name), the environment and the config file.

    Raises HelpRequested for `--help`, SettingsError for anything invalid. Every value given is
    validated, even one a higher-precedence source overrides: a wrong value anywhere is a mistake.
    """
    flags = read_flags(argv)
    environment = read_environment(environ)
    config_given = flags.given.get("config") or environment.get("config")
    config_file = config_given.value if config_given and config_given.value else None
    from_file = read_file(config_file, config_given.where) if config_file and config_given else {}

    values: dict[str, Any] = {option.name: option.checked(option.default) for option in OPTIONS}
    for layer in (from_file, environment, flags.given):  # lowest precedence first; lists replace
        values.update({name: given.value for name, given in layer.items()})
    values.pop("help")
    values["config"] = config_file
    resolve_replication(values)
    check_opa_connection(values)
    check_bundle_mode(values)
    resolve_leader_election(values)
    sections: dict[str, dict[str, Any]] = {group.section: {} for group in GROUPS}
    for name, value in values.items():
        section, _, field = BY_NAME[name].attribute.rpartition(".")
        sections[section][field] = value
    return Settings(
        **sections[""],
        opa=OpaSettings(**sections["opa"]),
        configmaps=ConfigMapSettings(**sections["configmaps"]),
        replication=ReplicationSettings(**sections["replication"]),
        bundle=BundleSettings(**sections["bundle"]),
        leader_election=LeaderElectionSettings(**sections["leader_election"]),
        logging=LoggingSettings(**sections["logging"]),
        warnings=tuple(flags.warnings),
    )
