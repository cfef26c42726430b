"""The generated documentation: the --help text and config.example.yaml, both built from the options table.

Built rather than written, so that neither can leave an option out or state a default that is not the one
kopa uses; a unit test checks that config.example.yaml is this output.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

from app.settings.kinds import BOOL, STRING_LIST
from app.settings.options import BY_NAME, ENV_PREFIX, GROUPS, LEGACY, OPTIONS, Option

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
        f"{legacy.flag} is a deprecated name of --{legacy.alias_of}" for legacy in LEGACY if legacy.alias_of
    ]
    no_effect = [legacy.flag for legacy in LEGACY if legacy.no_effect]
    if no_effect:
        sentences.append(_verb(no_effect, "is accepted but has", "are accepted but have") + " no effect")
    for purpose in dict.fromkeys(legacy.unsupported for legacy in LEGACY if legacy.unsupported):
        flags = [legacy.flag for legacy in LEGACY if legacy.unsupported == purpose]
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
        out += ["", f"{group.title}:"]
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
    config = BY_NAME["config"]
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
        out += ["", f"# --- {group.title} ---"]
        for option in options:
            comment = f"{option.help} Flag {option.flag}, environment variable {option.env_var}."
            if option.default_text:
                comment += f" Default: {option.default_text}."
            out += ["", *_wrap(comment, "# "), f"{option.name}: {option.kind.to_yaml(option.default)}"]
    return "\n".join(out) + "\n"
