"""A value as a source gives it, with where it was given: what lets every error name the setting as written.

The command line, the environment and the config file hand their values on as `Given`; `checked` runs the
option's validator on one and turns a ValueError into a SettingsError about that flag, variable or key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.settings.errors import BadItem, SettingsError, bare, shown
from app.settings.kinds import Kind
from app.settings.options import Option


@dataclass(frozen=True)
class Where:
    """Where a value was given, to name the setting as the user wrote it."""

    name: str  # `--opa-url`, `-v`, `KOPA_OPA_URL` or `opa-url`
    file: str = ""  # for a config file key: the file

    def error(self, reason: str, value: str | None = None) -> SettingsError:
        quoted = "" if value is None else f" {shown(value)}"
        place = f" in {bare(self.file)}" if self.file else ""
        return SettingsError(f"invalid {bare(self.name)}{quoted}{place}: {reason}")


@dataclass
class Given:
    value: Any
    where: Where


def checked(option: Option[Any], given: Given) -> Any:
    try:
        return option.checked(given.value)
    except BadItem as exc:
        raise given.where.error(str(exc), exc.item) from None
    except ValueError as exc:
        text = None if option.secret else option.kind.to_text(given.value)
        raise given.where.error(str(exc), text) from None


def parse_value(kind: Kind[Any], text: str, where: Where) -> Any:
    try:
        return kind.parse(text)
    except ValueError as exc:
        raise where.error(str(exc), text) from None
