"""OPA's own configuration file (the one `opa run -c` reads), for what kopa needs of it: the bundle names.

With --opa-config kopa analyses the policies OPA holds; the bundles the configuration names tell it what
to wait for before the first analysis (an OPA that has not activated its bundle yet has no entrypoint).
kopa never downloads the bundles itself: OPA already has them, and their services' credentials stay OPA's.
"""

from __future__ import annotations

from pathlib import Path

import yaml


class OpaConfigError(ValueError):
    """The file cannot be used; str() is one line for the user."""


def bundle_names(path: str) -> tuple[str, ...]:
    """The names of the bundles the configuration activates: `bundles:` keys, or the legacy `bundle:`'s
    name. A configuration with `discovery` names its bundles elsewhere: none to wait for."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise OpaConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise OpaConfigError(f"{path} is not valid YAML{where}") from None
    except RecursionError:  # PyYAML's pure-Python loader recurses once per level
        raise OpaConfigError(f"{path} is not valid YAML: nested too deeply") from None
    if config is None:
        return ()
    if not isinstance(config, dict):
        raise OpaConfigError(f"{path} must hold a mapping (OPA's configuration), not {type(config).__name__}")
    bundles = config.get("bundles")
    if isinstance(bundles, dict):
        return tuple(str(name) for name in bundles)
    legacy = config.get("bundle")
    if isinstance(legacy, dict) and legacy.get("name"):
        return (str(legacy["name"]),)
    return ()
