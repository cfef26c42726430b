"""kopa's settings: one table of options from which flags, environment, config file and docs all derive.

One module per job, each depending only on those above it:

- `errors`: how a mistake is told (one line naming the setting as the user wrote it);
- `kinds`: value types and how each is written on the command line, in the environment and in YAML;
- `validators`: checks of one value (Kubernetes' rules and wording), and of options that need each other;
- `options`: the table of options and their groups, and kube-mgmt's legacy flags;
- `model`: `Settings` and its parts, one per option group: what the rest of kopa sees;
- `given`: a value with where it was given, so that errors name the flag, variable or key;
- `docs`: --help and config.example.yaml, generated from the table;
- `flags`: the command line, with Go's pflag syntax as kube-mgmt users know it;
- `sources`: the environment, the config file, and the precedence that merges them with the flags.
"""

from app.settings.docs import example_config, help_text
from app.settings.errors import HelpRequested, SettingsError
from app.settings.kinds import ASSIGNMENTS, BOOL, DURATION, STRING, STRING_LIST, Kind
from app.settings.model import (
    BundleSettings,
    ConfigMapSettings,
    LeaderElectionSettings,
    LoggingSettings,
    OpaSettings,
    ReplicationSettings,
    Settings,
)
from app.settings.options import GROUPS, OPTIONS, Group, Option, env_var
from app.settings.sources import load_settings

__all__ = [
    "ASSIGNMENTS",
    "BOOL",
    "DURATION",
    "GROUPS",
    "OPTIONS",
    "STRING",
    "STRING_LIST",
    "BundleSettings",
    "ConfigMapSettings",
    "Group",
    "HelpRequested",
    "Kind",
    "LeaderElectionSettings",
    "LoggingSettings",
    "OpaSettings",
    "Option",
    "ReplicationSettings",
    "Settings",
    "SettingsError",
    "env_var",
    "example_config",
    "help_text",
    "load_settings",
]
