"""Settings: every source, every kind of value and every mistake a user can make, without any server.

The expected defaults are written out here rather than read from the table, so that changing a kube-mgmt
default by accident fails a test.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from app import settings
from app.kube.resources import GroupVersionResource
from app.settings import HelpRequested, Settings, SettingsError, help_text, load_settings

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config.example.yaml"

DEFAULTS: dict[str, Any] = {
    "kubeconfig": "",
    "opa": {
        "url": "http://localhost:8181/v1",
        "auth_token": "",
        "auth_token_file": "",
        "ca_file": "",
        "allow_insecure": False,
        "client_cert_file": "",
        "client_key_file": "",
        "check_interval": 1.0,
        "drift_check_interval": 60.0,
    },
    "configmaps": {
        "enable_policies": True,
        "policy_label": "openpolicyagent.org/policy",
        "policy_value": "rego",
        "enable_data": True,
        "data_label": "openpolicyagent.org/data",
        "data_value": "opa",
        "namespaces": (),
    },
    "replication": {
        "namespaced_resources": (),
        "cluster_resources": (),
        "path": "kubernetes",
        "ignore_namespaces": (),
        "keep_managed_fields": False,
        "selectors": (),
        "fields": (),
        "opa_config": "",
        "analysis_entrypoint": "main/main",
        "analysis_grace_period": 300.0,
    },
    "bundle": {
        "endpoint": "",
        "token_file": "",
        "tls_cert_file": "",
        "tls_key_file": "",
        "tls_ca_file": "",
        "reserved_roots": ("system",),
    },
    "leader_election": {
        "enabled": False,  # auto: off in push mode
        "namespace": "",
        "lease_name": "kopa",
        "lease_duration": 15.0,  # client-go's defaults
        "renew_deadline": 10.0,
        "retry_period": 2.0,
    },
    "logging": {"level": "info", "format": "text"},
    "health_endpoint": "0.0.0.0:8000",
    "shutdown_timeout": 10.0,
    "config_file": None,
    "warnings": (),
    "show_version": False,
}

FILE_OPTIONS = [option for option in settings.OPTIONS if option.in_file]
ENV_OPTIONS = [option for option in settings.OPTIONS if option.env]

WriteConfig = Callable[[str], str]


def option_named(name: str) -> settings.Option[Any]:
    return next(option for option in settings.OPTIONS if option.name == name)


def value_at(loaded: Settings, path: str) -> Any:
    """A setting by its path from Settings, as `Option.attribute` names it: `opa.url`, `kubeconfig`."""
    return operator.attrgetter(path)(loaded)


def flattened(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """DEFAULTS as {path: value}: `{"opa": {"url": u}}` is `{"opa.url": u}`."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat |= flattened(value, f"{prefix}{name}.")
        else:
            flat[prefix + name] = value
    return flat


def quoted(text: str) -> str:
    """A value as error messages show it (Go's %q style)."""
    return json.dumps(text, ensure_ascii=False)


def load(*argv: str, env: Mapping[str, str] | None = None) -> Settings:
    return load_settings(list(argv), env or {})


def error(argv: Sequence[str] = (), env: Mapping[str, str] | None = None) -> str:
    """The SettingsError message, checked to be the one line the CLI prints."""
    with pytest.raises(SettingsError) as info:
        load_settings(list(argv), env or {})
    message = str(info.value)
    assert "\n" not in message
    assert "Traceback" not in message
    return message


@pytest.fixture
def config(tmp_path: Path) -> WriteConfig:
    """Writes a config file and returns its path."""

    def write(text: str) -> str:
        path = tmp_path / "kopa.yaml"
        path.write_text(text, encoding="utf-8")
        return str(path)

    return write


# --- defaults and the table ------------------------------------------------------------------------------


def test_defaults_are_kube_mgmts() -> None:
    assert dataclasses.asdict(load()) == DEFAULTS


@pytest.mark.parametrize(("path", "expected"), sorted(flattened(DEFAULTS).items()))
def test_each_default(path: str, expected: Any) -> None:
    assert value_at(load(), path) == expected


def test_table_and_settings_agree() -> None:
    """Adding an option means a table entry and a Settings field; forgetting either fails here."""
    from_table = {option.attribute for option in settings.OPTIONS if option.name != "help"}
    assert from_table | {"warnings"} == set(flattened(dataclasses.asdict(load())))


def test_groups_and_settings_agree() -> None:
    """Each group's options are the fields of one part of Settings (or of Settings itself)."""
    for option in settings.OPTIONS:
        assert option.attribute.rpartition(".")[0] == option.group.section, option.name


def test_table_is_consistent() -> None:
    names = [option.name for option in settings.OPTIONS]
    assert len(names) == len(set(names))
    for option in settings.OPTIONS:
        assert option.group in settings.GROUPS, option.name
        assert option.help.strip(), option.name
        assert option.checked(option.default) == option.default, option.name


def test_no_env_var_collides_with_kubernetes_service_links() -> None:
    """A Service named kopa injects KOPA_PORT, KOPA_SERVICE_HOST, KOPA_PORT_<n>_TCP...: never ours."""
    for option in ENV_OPTIONS:
        var = option.env_var
        assert var not in ("KOPA_PORT", "KOPA_SERVICE_HOST", "KOPA_SERVICE_PORT"), var
        assert not var.startswith(("KOPA_PORT_", "KOPA_SERVICE_")), var


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        load().opa.url = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        load().kubeconfig = "x"  # type: ignore[misc]


# --- flags -----------------------------------------------------------------------------------------------

STRING_FLAGS = [
    ("kubeconfig", "/home/me/.kube/config", "kubeconfig", "/home/me/.kube/config"),
    ("opa-url", "https://opa.example:8443/v1", "opa.url", "https://opa.example:8443/v1"),
    ("log-level", "debug", "logging.level", "debug"),
    ("policy-label", "example.com/policy", "configmaps.policy_label", "example.com/policy"),
    ("policy-value", "111", "configmaps.policy_value", "111"),
    ("data-label", "asdasd/data", "configmaps.data_label", "asdasd/data"),
    ("data-value", "222", "configmaps.data_value", "222"),
]


@pytest.mark.parametrize(("name", "text", "path", "expected"), STRING_FLAGS)
def test_string_flag_with_equals(name: str, text: str, path: str, expected: str) -> None:
    assert value_at(load(f"--{name}={text}"), path) == expected


@pytest.mark.parametrize(("name", "text", "path", "expected"), STRING_FLAGS)
def test_string_flag_with_space(name: str, text: str, path: str, expected: str) -> None:
    assert value_at(load(f"--{name}", text), path) == expected


def test_repeated_string_flag_last_wins() -> None:
    assert load("--data-value=a", "--data-value", "b").configmaps.data_value == "b"


def test_space_form_takes_the_next_argument_even_with_a_dash() -> None:
    """pflag does; a value may start with '-'."""
    assert load("--kubeconfig", "-odd-name").kubeconfig == "-odd-name"


def test_value_may_contain_equals() -> None:
    assert load("--kubeconfig=/a=b").kubeconfig == "/a=b"


def test_empty_string_flag() -> None:
    assert load("--kubeconfig=").kubeconfig == ""
    assert load("--kubeconfig", "").kubeconfig == ""


def test_flag_needs_an_argument_at_the_end() -> None:
    assert error(["--opa-url"]) == "flag needs an argument: --opa-url"


@pytest.mark.parametrize("name", ["enable-policies", "enable-data"])
@pytest.mark.parametrize("text", ["1", "t", "T", "TRUE", "true", "True"])
def test_bool_flag_true_spellings(name: str, text: str) -> None:
    env = {settings.env_var(name): "false"}
    assert value_at(load(f"--{name}={text}", env=env), option_named(name).attribute) is True


@pytest.mark.parametrize("name", ["enable-policies", "enable-data"])
@pytest.mark.parametrize("text", ["0", "f", "F", "FALSE", "false", "False"])
def test_bool_flag_false_spellings(name: str, text: str) -> None:
    assert value_at(load(f"--{name}={text}"), option_named(name).attribute) is False


@pytest.mark.parametrize("name", ["enable-policies", "enable-data"])
def test_bare_bool_flag_means_true(name: str) -> None:
    env = {settings.env_var(name): "false"}
    assert value_at(load(f"--{name}", env=env), option_named(name).attribute) is True


@pytest.mark.parametrize("text", ["yes", "no", "on", "", "2", "tRuE"])
def test_bad_bool_flag(text: str) -> None:
    assert error([f"--enable-data={text}"]) == f'invalid --enable-data "{text}": must be true or false'


@pytest.mark.parametrize("text", ["false", "true", "0"])
def test_bool_flag_does_not_take_the_next_argument(text: str) -> None:
    """As pflag: `--enable-data false` is the flag, then a stray positional argument."""
    message = error(["--enable-data", text])
    assert message.startswith(f'unexpected argument "{text}": kopa takes no positional arguments')
    assert f"--enable-data={text}" in message


def test_repeated_bool_flag_last_wins() -> None:
    assert load("--enable-data=false", "--enable-data").configmaps.enable_data is True
    assert load("--enable-data", "--enable-data=false").configmaps.enable_data is False


def test_list_flag_repeated_and_comma_separated() -> None:
    assert load("--namespaces=a,b", "--namespaces", "c").configmaps.namespaces == ("a", "b", "c")


def test_list_flag_strips_whitespace_and_empty_items() -> None:
    assert load("--namespaces= a , b,,c, ").configmaps.namespaces == ("a", "b", "c")


def test_list_flag_drops_repeats() -> None:
    assert load("--namespaces=a,b", "--namespaces=a").configmaps.namespaces == ("a", "b")


@pytest.mark.parametrize("argv", [["--namespaces="], ["--namespaces", ""], ["--namespaces= , "]])
def test_empty_list_flag(argv: list[str]) -> None:
    assert load(*argv, env={"KOPA_NAMESPACES": "a"}).configmaps.namespaces == ()


def test_empty_list_flag_then_more() -> None:
    assert load("--namespaces=", "--namespaces=a").configmaps.namespaces == ("a",)


def test_all_namespaces() -> None:
    assert load("--namespaces=*").configmaps.namespaces == ("*",)
    assert load("--namespaces=*", "--namespaces=*").configmaps.namespaces == ("*",)


@pytest.mark.parametrize("argv", [["--version"], ["-v"], ["--version=true"], ["-v=1"]])
def test_version(argv: list[str]) -> None:
    assert load(*argv).show_version is True


def test_version_false() -> None:
    assert load("--version=false").show_version is False


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["--help=true"], ["--opa-url=http://x", "-h"]])
def test_help(argv: list[str]) -> None:
    with pytest.raises(HelpRequested) as info:
        load(*argv)
    assert info.value.text == help_text()


def test_help_wins_over_later_mistakes() -> None:
    with pytest.raises(HelpRequested):
        load("--help", "--no-such-flag", "positional")


def test_help_false_is_no_help() -> None:
    assert load("--help=false") == load()


def test_double_dash_alone_ends_flags() -> None:
    assert load("--enable-data=false", "--").configmaps.enable_data is False


@pytest.mark.parametrize(
    "argv",
    [["extra"], ["--enable-data=false", "extra"], ["-"], ["--", "extra"], ["--", "--opa-url=http://x"]],
)
def test_positional_arguments_are_errors(argv: list[str]) -> None:
    assert "kopa takes no positional arguments" in error(argv)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--foo"], "unknown flag --foo"),
        (["--foo=bar"], "unknown flag --foo"),
        (["-x"], "unknown flag -x"),
        (["--opa"], "unknown flag --opa"),  # no abbreviations
        (["--namespace=a"], "unknown flag --namespace (did you mean --namespaces?)"),
        (["--opa-ulr=http://x"], "unknown flag --opa-ulr (did you mean --opa-url?)"),
        (["-opa-url=http://x"], "unknown flag -opa-url (long flags take two dashes)"),
        (["---opa-url=http://x"], "unknown flag ---opa-url"),
        (["--OPA-URL=http://x"], "unknown flag --OPA-URL"),
    ],
)
def test_unknown_flags(argv: list[str], expected: str) -> None:
    assert error(argv).startswith(expected)


def test_unknown_flag_with_odd_characters_stays_one_line() -> None:
    assert error(["--a\nb"]) == 'unknown flag "--a\\nb"'


# --- environment -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "text", "path", "expected"), STRING_FLAGS)
def test_env_strings(name: str, text: str, path: str, expected: str) -> None:
    assert value_at(load(env={settings.env_var(name): text}), path) == expected


def test_env_var_names() -> None:
    assert settings.env_var("opa-url") == "KOPA_OPA_URL"
    assert settings.env_var("replicate-ignore-namespaces") == "KOPA_REPLICATE_IGNORE_NAMESPACES"
    for option in ENV_OPTIONS:
        assert option.env_var == "KOPA_" + option.name.upper().replace("-", "_")
    assert {o.name for o in settings.OPTIONS} - {o.name for o in ENV_OPTIONS} == {"version", "help"}


@pytest.mark.parametrize(("text", "expected"), [("false", False), ("0", False), ("True", True), ("t", True)])
def test_env_bool(text: str, expected: bool) -> None:
    loaded = load(env={"KOPA_ENABLE_POLICIES": text, "KOPA_ENABLE_DATA": text})
    assert (loaded.configmaps.enable_policies, loaded.configmaps.enable_data) == (expected, expected)


@pytest.mark.parametrize("text", ["", "yes", " true"])
def test_env_bad_bool(text: str) -> None:
    assert (
        error(env={"KOPA_ENABLE_DATA": text}) == f'invalid KOPA_ENABLE_DATA "{text}": must be true or false'
    )


@pytest.mark.parametrize(
    ("text", "expected"), [("a", ("a",)), ("a, b ,c", ("a", "b", "c")), ("", ()), ("*", ("*",))]
)
def test_env_list(text: str, expected: tuple[str, ...]) -> None:
    assert load(env={"KOPA_NAMESPACES": text}).configmaps.namespaces == expected


def test_env_config_names_the_file(config: WriteConfig) -> None:
    path = config("data-value: from-file\n")
    loaded = load(env={"KOPA_CONFIG": path})
    assert (loaded.configmaps.data_value, loaded.config_file) == ("from-file", path)


def test_unknown_kopa_env_vars_are_ignored() -> None:
    """Kubernetes injects service links for a Service named kopa; they must never stop kopa."""
    env = {
        "KOPA_PORT": "tcp://10.0.0.7:8000",
        "KOPA_PORT_8000_TCP": "tcp://10.0.0.7:8000",
        "KOPA_PORT_8000_TCP_ADDR": "10.0.0.7",
        "KOPA_PORT_8000_TCP_PORT": "8000",
        "KOPA_PORT_8000_TCP_PROTO": "tcp",
        "KOPA_SERVICE_HOST": "10.0.0.7",
        "KOPA_SERVICE_PORT": "8000",
        "KOPA_SERVICE_PORT_HTTP": "8000",
        "KOPA_SOMETHING_NEW": "???",
        "KOPA_POLICIES": "Not A Namespace",  # flag-only alias
        "KOPA_VERSION": "1.2.3",  # flag-only
        "KOPA_HELP": "x",  # flag-only
        "kopa_opa_url": "ftp://lower-case-is-not-ours",
        "OPA_URL": "ftp://not-ours",
    }
    assert load(env=env) == load()


# --- config file -----------------------------------------------------------------------------------------


def test_file_every_kind(config: WriteConfig) -> None:
    path = config(
        "kubeconfig: /etc/kube.conf\n"
        "opa-url: https://opa:8181/v1/\n"
        "log-level: WARNING\n"
        "enable-policies: false\n"
        "policy-label: example.com/p\n"
        "policy-value: '111'\n"
        "enable-data: false\n"
        "data-label: example.com/d\n"
        "data-value: d\n"
        "namespaces: [team-a, team-b]\n"
    )
    assert flattened(dataclasses.asdict(load(f"--config={path}"))) == flattened(DEFAULTS) | {
        "kubeconfig": "/etc/kube.conf",
        "opa.url": "https://opa:8181/v1",
        "logging.level": "warn",
        "configmaps.enable_policies": False,
        "configmaps.policy_label": "example.com/p",
        "configmaps.policy_value": "111",
        "configmaps.enable_data": False,
        "configmaps.data_label": "example.com/d",
        "configmaps.data_value": "d",
        "configmaps.namespaces": ("team-a", "team-b"),
        "config_file": path,
    }


def test_file_via_space_form(config: WriteConfig) -> None:
    path = config("data-value: x\n")
    assert load("--config", path).configmaps.data_value == "x"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("false", False),
        ("'false'", False),
        ("0", False),
        ("t", True),
        ("!!bool false", False),
    ],
)
def test_file_bool(config: WriteConfig, text: str, expected: bool) -> None:
    assert load(f"--config={config(f'enable-data: {text}')}").configmaps.enable_data is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[a, b]", ("a", "b")),
        ("\n  - a\n  - b\n", ("a", "b")),
        ("a, b", ("a", "b")),
        ("'a,b'", ("a", "b")),
        ("[]", ()),
        ("''", ()),
        ("", ()),
        ("['*']", ("*",)),
        ("[0123, 42]", ("0123", "42")),
    ],
)
def test_file_list(config: WriteConfig, text: str, expected: tuple[str, ...]) -> None:
    assert load(f"--config={config(f'namespaces: {text}')}").configmaps.namespaces == expected


@pytest.mark.parametrize(
    ("text", "expected"), [("111", "111"), ("010", "010"), ("1e3", "1e3"), ("'12'", "12")]
)
def test_file_values_are_read_as_written(config: WriteConfig, text: str, expected: str) -> None:
    """YAML would make 010 the number 8; a label value must stay the text the user wrote."""
    assert load(f"--config={config(f'policy-value: {text}')}").configmaps.policy_value == expected


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_empty_file_sets_nothing(config: WriteConfig, text: str) -> None:
    path = config(text)
    assert load(f"--config={path}") == dataclasses.replace(load(), config_file=path)


def test_empty_config_flag_means_no_file(config: WriteConfig) -> None:
    path = config("data-value: from-file\n")
    loaded = load("--config=", env={"KOPA_CONFIG": path})
    assert (loaded.configmaps.data_value, loaded.config_file) == ("opa", None)


def test_config_flag_wins_over_env(config: WriteConfig, tmp_path: Path) -> None:
    path = config("data-value: from-flag-file\n")
    assert (
        load(f"--config={path}", env={"KOPA_CONFIG": str(tmp_path / "nope")}).configmaps.data_value
        == "from-flag-file"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("foo: 1", 'unknown key "foo" in config file {path}'),
        ("opa_url: http://x", 'unknown key "opa_url" in config file {path} (did you mean opa-url?)'),
        ("--opa-url: http://x", 'unknown key "--opa-url" in config file {path}'),
        ("policies: [a]", 'unknown key "policies" in config file {path} (it is the deprecated name of'),
        ("require-policy-label: true", 'unknown key "require-policy-label" in config file {path}'),
        ("config: other.yaml", 'unknown key "config" in config file {path} (--config can only be given as'),
        ("version: true", 'unknown key "version" in config file {path} (--version can only be given as a'),
        ("help: true", 'unknown key "help" in config file {path}'),
    ],
)
def test_file_unknown_keys(config: WriteConfig, text: str, expected: str) -> None:
    path = config(text)
    assert error([f"--config={path}"]).startswith(expected.format(path=path))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("opa-url: [http://x]", "invalid opa-url in {path}: must be a string, not a list"),
        ("opa-url: {a: b}", "invalid opa-url in {path}: must be a string, not a mapping"),
        ("kubeconfig: !!int 3", "invalid kubeconfig in {path}: must be a string, not a value of type int"),
        ("enable-data: [true]", "invalid enable-data in {path}: must be a boolean, not a list"),
        ("enable-data: yes", 'invalid enable-data "yes" in {path}: must be true or false'),
        ("namespaces: {a: b}", "invalid namespaces in {path}: must be a list of strings, not a mapping"),
        (
            "namespaces: [[a]]",
            "invalid namespaces in {path}: must be a list of strings, but an item is a list",
        ),
        (
            "namespaces: [!!null x]",
            "invalid namespaces in {path}: must be a list of strings, but an item is null",
        ),
    ],
)
def test_file_wrong_types(config: WriteConfig, text: str, expected: str) -> None:
    path = config(text)
    assert error([f"--config={path}"]) == expected.format(path=path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("opa-url: http://x\n  bad: indent\n", "invalid config file {path}: line 2: "),
        ("a: [1, 2\n", "invalid config file {path}: line 2: "),
        (
            "data-value: x\ndata-value: y\n",
            'invalid config file {path}: line 2: key "data-value" given twice',
        ),
        (
            "- opa-url\n",
            "invalid config file {path}: must be a mapping of setting names to values, not a list",
        ),
        ("just text\n", "invalid config file {path}: must be a mapping of setting names to values, not text"),
        ("? [a]\n: b\n", "invalid config file {path}: line 1: "),
        ("a: \x07\n", "invalid config file {path}: "),
    ],
)
def test_file_broken(config: WriteConfig, text: str, expected: str) -> None:
    path = config(text)
    assert error([f"--config={path}"]).startswith(expected.format(path=path))


def test_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"data-value: \xe9\n")
    assert error([f"--config={path}"]).startswith(f"invalid config file {path}: ")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    expected = f'invalid {{}} "{path}": cannot read the config file: No such file or directory'
    assert error([f"--config={path}"]) == expected.format("--config")
    assert error(env={"KOPA_CONFIG": str(path)}) == expected.format("KOPA_CONFIG")


def test_file_is_a_directory(tmp_path: Path) -> None:
    assert error([f"--config={tmp_path}"]).endswith("cannot read the config file: Is a directory")


# --- precedence ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("use_file", "use_env", "use_flag", "expected"),
    [
        (False, False, False, "opa"),
        (True, False, False, "file"),
        (False, True, False, "env"),
        (True, True, False, "env"),
        (False, False, True, "flag"),
        (True, False, True, "flag"),
        (False, True, True, "flag"),
        (True, True, True, "flag"),
    ],
)
def test_precedence(
    config: WriteConfig, use_file: bool, use_env: bool, use_flag: bool, expected: str
) -> None:
    argv = ["--data-value=flag"] if use_flag else []
    env = {"KOPA_DATA_VALUE": "env"} if use_env else {}
    if use_file:
        argv.append(f"--config={config('data-value: file')}")
    assert load(*argv, env=env).configmaps.data_value == expected


def test_bool_precedence(config: WriteConfig) -> None:
    path = config("enable-data: false\n")
    assert load(f"--config={path}").configmaps.enable_data is False
    assert load(f"--config={path}", env={"KOPA_ENABLE_DATA": "true"}).configmaps.enable_data is True
    assert (
        load(f"--config={path}", "--enable-data=false", env={"KOPA_ENABLE_DATA": "1"}).configmaps.enable_data
        is False
    )


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], {}, ("a", "b")),
        ([], {"KOPA_NAMESPACES": "c"}, ("c",)),
        ([], {"KOPA_NAMESPACES": ""}, ()),
        (["--namespaces=d"], {"KOPA_NAMESPACES": "c"}, ("d",)),
        (["--namespaces=d"], {}, ("d",)),
        (["--namespaces="], {"KOPA_NAMESPACES": "c"}, ()),
        (["--namespaces=*"], {"KOPA_NAMESPACES": "c"}, ("*",)),
    ],
)
def test_lists_replace_lower_levels(
    config: WriteConfig, argv: list[str], env: dict[str, str], expected: tuple[str, ...]
) -> None:
    path = config("namespaces: [a, b]\n")
    assert load(f"--config={path}", *argv, env=env).configmaps.namespaces == expected


def test_star_at_one_level_and_names_at_another_is_fine(config: WriteConfig) -> None:
    """Lists replace, they never merge: `*` in the file and a name in a flag is just that name."""
    path = config("namespaces: ['*']\n")
    assert load(f"--config={path}", "--namespaces=a").configmaps.namespaces == ("a",)


def test_overridden_values_are_still_validated(config: WriteConfig) -> None:
    """A wrong value anywhere is a mistake worth stopping for, even when a flag overrides it."""
    assert error(["--opa-url=http://x"], {"KOPA_OPA_URL": "ftp://y"}).startswith(
        'invalid KOPA_OPA_URL "ftp://y"'
    )
    path = config("log-level: loud\n")
    assert error([f"--config={path}", "--log-level=info"]).startswith(f'invalid log-level "loud" in {path}')


# --- validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://localhost:8181/v1", "http://localhost:8181/v1"),
        ("http://localhost:8181/v1/", "http://localhost:8181/v1"),
        ("https://opa.example//", "https://opa.example"),
        ("HTTPS://OPA:443/v1", "HTTPS://OPA:443/v1"),
        ("http://127.0.0.1:8181/v1", "http://127.0.0.1:8181/v1"),
        ("http://[::1]:8181/v1", "http://[::1]:8181/v1"),
    ],
)
def test_good_urls(text: str, expected: str) -> None:
    assert load(f"--opa-url={text}").opa.url == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "localhost:8181",
        "opa/v1",
        "ftp://opa/v1",
        "file:///tmp/x",
        "http://",
        "http:///v1",
        "http://:8181/v1",
        "http://opa:notaport/v1",
        "http://opa:99999/v1",
        "http://opa/v1?x=1",
        "http://opa/v1#frag",
        "http://op a/v1",
        "http://opa/v1\n",
    ],
)
def test_bad_urls(text: str) -> None:
    assert error([f"--opa-url={text}"]).startswith(f"invalid --opa-url {quoted(text)}: must ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("debug", "debug"),
        ("DEBUG", "debug"),
        ("info", "info"),
        ("Info", "info"),
        ("warn", "warn"),
        ("warning", "warn"),
        ("WARNING", "warn"),
        ("error", "error"),
        ("ERROR", "error"),
    ],
)
def test_log_levels(text: str, expected: str) -> None:
    assert load(f"--log-level={text}").logging.level == expected


@pytest.mark.parametrize("text", ["", "trace", "fatal", "verbose", "critical"])
def test_bad_log_levels(text: str) -> None:
    assert error([f"--log-level={text}"]) == (
        f'invalid --log-level "{text}": must be one of debug, info, warn, error'
    )


@pytest.mark.parametrize(
    "text",
    [
        "a",
        "MyName",
        "my.name",
        "123-abc",
        "a_b",
        "example.com/MyName",
        "openpolicyagent.org/policy",
        "qweqwe/policy",
        "x" * 63,
        ("a" * 63 + ".") * 3 + "a" * 61 + "/n",  # prefix of 253
    ],
)
@pytest.mark.parametrize("flag", ["--policy-label", "--data-label"])
def test_good_label_keys(flag: str, text: str) -> None:
    assert value_at(load(f"{flag}={text}"), option_named(flag[2:]).attribute) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("-foo", "name part must consist of alphanumeric characters"),
        ("foo-", "name part must consist of alphanumeric characters"),
        ("", "name part must be non-empty"),
        ("x" * 64, "name part must be no more than 63 characters"),
        ("a/b/c", "a qualified name must consist of"),
        ("/name", "prefix part must be non-empty"),
        ("example.com/", "name part must be non-empty"),
        ("Example.com/name", "prefix part a lowercase RFC 1123 subdomain must consist of"),
        ("-x.com/name", "prefix part a lowercase RFC 1123 subdomain must consist of"),
        (("a" * 63 + ".") * 4 + "/n", "prefix part must be no more than 253 characters"),
        ("a b", "name part must consist of"),
        ("é", "name part must consist of"),
    ],
)
@pytest.mark.parametrize("flag", ["--policy-label", "--data-label"])
def test_bad_label_keys(flag: str, text: str, reason: str) -> None:
    assert error([f"{flag}={text}"]).startswith(f"invalid {flag} {quoted(text)}: {reason}")


def test_bad_label_key_has_kubernetes_wording() -> None:
    assert error(["--policy-label=-foo"]) == (
        'invalid --policy-label "-foo": '
        "name part must consist of alphanumeric characters, '-', '_' or '.', "
        "and must start and end with an alphanumeric character (e.g. 'MyName', or 'my.name', or '123-abc', "
        "regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
    )


@pytest.mark.parametrize("text", ["rego", "opa", "111", "My_Value.1", "v" * 63, ""])
@pytest.mark.parametrize("flag", ["--policy-value", "--data-value"])
def test_good_label_values(flag: str, text: str) -> None:
    assert value_at(load(f"{flag}={text}"), option_named(flag[2:]).attribute) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("-x", "a valid label value must consist of alphanumeric characters"),
        ("x_", "a valid label value must consist of alphanumeric characters"),
        ("a/b", "a valid label value must consist of alphanumeric characters"),
        ("v" * 64, "must be no more than 63 characters"),
    ],
)
@pytest.mark.parametrize("flag", ["--policy-value", "--data-value"])
def test_bad_label_values(flag: str, text: str, reason: str) -> None:
    assert error([f"{flag}={text}"]).startswith(f"invalid {flag} {quoted(text)}: {reason}")


@pytest.mark.parametrize("text", ["default", "kube-system", "a", "0123", "n" * 63, "a-b-c"])
def test_good_namespaces(text: str) -> None:
    assert load(f"--namespaces={text}").configmaps.namespaces == (text,)


@pytest.mark.parametrize("text", ["Foo", "a_b", "-a", "a-", "a.b", "n" * 64, "**", "a*"])
def test_bad_namespaces(text: str) -> None:
    message = error([f"--namespaces=ok,{text}"])
    assert message.startswith(f'invalid --namespaces "{text}": ')
    assert "RFC 1123 label" in message or "no more than 63" in message


@pytest.mark.parametrize("argv", [["--namespaces=*,a"], ["--namespaces=a", "--namespaces=*"]])
def test_star_with_names_is_an_error(argv: list[str]) -> None:
    assert "cannot be combined" in error(argv)


def test_star_with_names_in_env_and_file(config: WriteConfig) -> None:
    assert error(env={"KOPA_NAMESPACES": "*,a"}).startswith('invalid KOPA_NAMESPACES "*,a": ')
    path = config("namespaces: ['*', a]\n")
    assert error([f"--config={path}"]).startswith(f'invalid namespaces "*,a" in {path}: ')


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("opa-url", "ftp://x"),
        ("log-level", "loud"),
        ("policy-label", "-foo"),
        ("policy-value", "-foo"),
        ("data-label", "-foo"),
        ("data-value", "-foo"),
        ("namespaces", "Foo"),
        ("enable-policies", "maybe"),
        ("enable-data", "maybe"),
    ],
)
def test_errors_name_the_setting_as_written(config: WriteConfig, key: str, bad: str) -> None:
    assert error([f"--{key}={bad}"]).startswith(f'invalid --{key} "{bad}": ')
    if option_named(key).kind.takes_argument:
        assert error([f"--{key}", bad]).startswith(f'invalid --{key} "{bad}": ')
    assert error(env={settings.env_var(key): bad}).startswith(f'invalid {settings.env_var(key)} "{bad}": ')
    path = config(f"{key}: '{bad}'\n")
    assert error([f"--config={path}"]).startswith(f'invalid {key} "{bad}" in {path}: ')


def test_error_for_short_flag_names_the_short_flag() -> None:
    assert error(["-v=maybe"]) == 'invalid -v "maybe": must be true or false'


def test_settings_error_is_always_one_line() -> None:
    assert str(SettingsError("a\nb\r\nc")) == "a b c"


def test_odd_values_are_quoted_on_one_line() -> None:
    assert error(["--policy-value=a\nb"]).startswith('invalid --policy-value "a\\nb": ')


# --- kube-mgmt compatibility -----------------------------------------------------------------------------


def test_policies_is_a_deprecated_alias() -> None:
    loaded = load("--policies=a,b", "--policies", "c")
    assert loaded.configmaps.namespaces == ("a", "b", "c")
    assert loaded.warnings == ("--policies is deprecated: use --namespaces",)


def test_policies_is_validated_as_namespaces() -> None:
    assert error(["--policies=Foo"]).startswith('invalid --policies "Foo": ')


@pytest.mark.parametrize(
    "argv",
    [
        ["--policies=a", "--namespaces=b"],
        ["--namespaces=b", "--policies=a"],
        ["--namespaces=", "--policies="],
    ],
)
def test_policies_and_namespaces_together_is_an_error(argv: list[str]) -> None:
    message = error(argv)
    assert "--policies" in message
    assert "--namespaces" in message
    assert "both given" in message


def test_policies_flag_wins_over_namespaces_env() -> None:
    assert load("--policies=a", env={"KOPA_NAMESPACES": "b"}).configmaps.namespaces == ("a",)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--require-policy-label"], "--require-policy-label"),
        (["--require-policy-label=true"], "--require-policy-label"),
        (["--require-policy-label=false"], "--require-policy-label"),
    ],
)
def test_flags_without_effect_warn(argv: list[str], flag: str) -> None:
    loaded = load(*argv)
    assert len(loaded.warnings) == 1
    assert loaded.warnings[0].startswith(f"{flag} has no effect")
    assert dataclasses.replace(loaded, warnings=()) == load()


def test_each_warning_is_given_once() -> None:
    loaded = load("--require-policy-label", "--require-policy-label", "--policies=a", "--policies=b")
    assert len(loaded.warnings) == 2


def test_flag_without_effect_still_follows_bool_syntax() -> None:
    assert "positional" in error(["--require-policy-label", "true"])
    assert error(["--require-policy-label=maybe"]).startswith('invalid --require-policy-label "maybe"')
    assert error(["--replicate-resync"]) == "flag needs an argument: --replicate-resync"


def test_replicate_resync_is_the_kube_mgmt_name_of_the_drift_check() -> None:
    loaded = load("--replicate-resync=2m")
    assert loaded.opa.drift_check_interval == 120.0
    assert loaded.warnings == ("--replicate-resync is deprecated: use --drift-check-interval",)
    assert load("--drift-check-interval=0").opa.drift_check_interval == 0.0
    assert load().opa.drift_check_interval == 60.0
    assert error(["--drift-check-interval=-1s"]).startswith('invalid --drift-check-interval "-1s"')


def test_auto_replication_flags_take_kube_mgmts_meaning(tmp_path: Path) -> None:
    config = tmp_path / "opa.yaml"
    config.write_text("bundles:\n  test:\n    resource: file:///bundle/bundle.tar.gz\n")
    loaded = load(f"--opa-config={config}", "--analysis-entrypoint", "/system/main/")
    assert loaded.replication.opa_config == str(config)
    assert loaded.replication.analysis_entrypoint == "system/main"
    assert load("--opa-config=").replication.opa_config == ""
    assert load("--analysis-grace-period=30s").replication.analysis_grace_period == 30.0


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "cannot read"),
        ("bundles: [", "is not valid YAML (line 1)"),
        ("- a\n- b\n", "must hold a mapping"),
    ],
)
def test_an_unusable_opa_config_stops_start_up_naming_it(
    tmp_path: Path, content: str | None, reason: str
) -> None:
    config = tmp_path / "opa.yaml"
    if content is not None:
        config.write_text(content)
    message = error([f"--opa-config={config}"])
    assert message.startswith(f'invalid --opa-config "{config}": ')
    assert reason in message
    assert "\n" not in message


# --- documentation ---------------------------------------------------------------------------------------


def test_config_example_is_generated_from_the_table() -> None:
    assert EXAMPLE.read_text(encoding="utf-8") == settings.example_config(), (
        "config.example.yaml is stale; regenerate it with: .venv/bin/python -c "
        "\"from app.settings import example_config; print(example_config(), end='')\" > config.example.yaml"
    )


def test_config_example_loads_as_the_defaults() -> None:
    loaded = load(f"--config={EXAMPLE}")
    assert dataclasses.replace(loaded, config_file=None) == load()


@pytest.mark.parametrize("option", FILE_OPTIONS, ids=lambda option: option.name)
def test_config_example_documents_every_key(option: settings.Option[Any]) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    assert f"\n{option.name}: " in text
    assert option.env_var in text
    assert option.flag in text


@pytest.mark.parametrize("option", settings.OPTIONS, ids=lambda option: option.name)
def test_help_mentions_every_option(option: settings.Option[Any]) -> None:
    text = help_text()
    assert option.flag in text
    if option.short:
        assert f"-{option.short}, {option.flag}" in text


@pytest.mark.parametrize(
    "flag",
    ["--policies", "--require-policy-label", "--replicate-resync", "--opa-config", "--analysis-entrypoint"],
)
def test_help_mentions_kube_mgmt_flags(flag: str) -> None:
    assert flag in help_text()


def test_help_layout() -> None:
    text = help_text()
    assert text.startswith("Usage: kopa [OPTION]...\n\n")
    assert all(len(line) <= 80 for line in text.splitlines())
    positions = [text.index(f"\n{group.title}:\n") for group in settings.GROUPS]
    assert positions == sorted(positions)
    for default in (
        "(default: http://localhost:8181/v1)",
        "(default: info)",
        "(default: rego)",
        "(default: true)",
    ):
        assert default in " ".join(text.split())
    assert "KOPA_" in text
    assert "config.example.yaml" in text


# --- replication -----------------------------------------------------------------------------------------

GVR = GroupVersionResource


def test_replicate_flags_parse_resources_as_kube_mgmt_writes_them() -> None:
    loaded = load(
        "--replicate=v1/services,networking.k8s.io/v1/Ingresses",
        "--replicate",
        "apps/v1/deployments",
        "--replicate-cluster=v1/namespaces",
        "--replicate-path=/cluster/state/",
        "--replicate-ignore-namespaces=kube-system,ignore-me",
        "--replicate-keep-managed-fields",
    )
    assert loaded.replication.namespaced_resources == (
        GVR("", "v1", "services"),
        GVR("networking.k8s.io", "v1", "ingresses"),
        GVR("apps", "v1", "deployments"),
    )
    assert loaded.replication.cluster_resources == (GVR("", "v1", "namespaces"),)
    assert loaded.replication.path == "cluster/state"
    assert loaded.replication.ignore_namespaces == ("kube-system", "ignore-me")
    assert loaded.replication.keep_managed_fields is True


@pytest.mark.parametrize("text", ["services", "v1/", "/v1/services", "a/b/c/d", "v1//services"])
def test_malformed_resources_are_rejected_with_the_form_and_an_example(text: str) -> None:
    message = error([f"--replicate={text}"])
    assert message.startswith("invalid --replicate")
    assert "must be [group/]version/resource, e.g. v1/services" in message


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("v1/my services", "the resource 'my services'"),
        ("v1/services.", "the resource 'services.'"),
        ("bad_group.io/v1/widgets", "the group 'bad_group.io'"),
        ("example.com/v_1/widgets", "the version 'v_1'"),
    ],
)
def test_resources_no_api_server_could_serve_are_rejected(text: str, part: str) -> None:
    message = error([f"--replicate={text}"])
    assert message.startswith("invalid --replicate") and part in message


def test_resources_are_accepted_as_the_api_names_them() -> None:
    loaded = load(
        "--replicate=v1/services",
        "--replicate=networking.k8s.io/v1/ingresses",
        "--replicate=a-b.example.com/v1beta1/my-widgets",
        "--replicate=Apps/V1/Deployments",  # lower-cased, as kube-mgmt does
    )
    assert [str(r) for r in loaded.replication.namespaced_resources] == [
        "v1/services",
        "networking.k8s.io/v1/ingresses",
        "a-b.example.com/v1beta1/my-widgets",
        "apps/v1/deployments",
    ]


def test_a_resource_cannot_be_both_namespaced_and_cluster_scoped() -> None:
    message = error(["--replicate=v1/pods", "--replicate-cluster=v1/pods"])
    assert "--replicate-cluster" in message and "v1/pods" in message


def test_selector_and_fields_keep_their_commas() -> None:
    loaded = load(
        "--replicate=v1/pods,networking.k8s.io/v1/ingresses",
        "--replicate-selector=v1/pods=app=web,tier notin (cache, db),!legacy",
        "--replicate-fields=networking.k8s.io/v1/ingresses=metadata.labels,spec.rules",
    )
    assert loaded.replication.selectors == (
        (GVR("", "v1", "pods"), "app=web,tier notin (cache, db),!legacy"),
    )
    assert loaded.replication.fields == (
        (GVR("networking.k8s.io", "v1", "ingresses"), ("metadata.labels", "spec.rules")),
    )


def test_selector_and_fields_from_env_and_file(config: WriteConfig) -> None:
    env = {
        "KOPA_REPLICATE": "v1/pods,v1/services",
        "KOPA_REPLICATE_SELECTOR": "v1/pods=app=web,env in (prod);v1/services=team",
    }
    loaded = load(env=env)
    assert loaded.replication.selectors == (
        (GVR("", "v1", "pods"), "app=web,env in (prod)"),
        (GVR("", "v1", "services"), "team"),
    )
    path = config("replicate: [v1/pods]\nreplicate-fields: ['v1/pods=metadata.labels,spec.containers']\n")
    assert load(f"--config={path}").replication.fields == (
        (GVR("", "v1", "pods"), ("metadata.labels", "spec.containers")),
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--replicate-selector=v1/pods=app=web"], "v1/pods is not replicated"),
        (["--replicate=v1/pods", "--replicate-selector=v1/pods=app in (a"], "not a valid label selector"),
        (["--replicate=v1/pods", "--replicate-selector=v1/pods=-bad=x"], "invalid label key"),
        (["--replicate=v1/pods", "--replicate-selector=v1/pods"], "RESOURCE=VALUE"),
        (["--replicate=v1/pods", "--replicate-selector=pods=a=b"], "must be [group/]version/resource"),
        (["--replicate=v1/pods", "--replicate-fields=v1/pods="], "one or more fields"),
        (["--replicate=v1/pods", "--replicate-fields=v1/pods=spec..x"], "between the dots"),
        (
            ["--replicate=v1/pods", "--replicate-fields=v1/pods=spec", "--replicate-fields=v1/pods=status"],
            "more than once",
        ),
        (["--replicate-path="], "non-empty segments"),
        (["--replicate-ignore-namespaces=Bad_NS"], "RFC 1123"),
    ],
)
def test_bad_replication_settings(argv: list[str], expected: str) -> None:
    assert expected in error(argv)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("500ms", 0.5), ("1m30s", 90.0), ("2", 2.0), ("1.5s", 1.5), ("1h", 3600.0)],
)
def test_durations_take_go_syntax(text: str, seconds: float) -> None:
    assert load(f"--opa-check-interval={text}").opa.check_interval == seconds
    assert load(env={"KOPA_OPA_CHECK_INTERVAL": text}).opa.check_interval == seconds


@pytest.mark.parametrize("text", ["", "1x", "s", "1s2", "-1s", "0s", "1 s", "nan", "inf", "-inf", "1e400"])
def test_bad_durations(text: str) -> None:
    assert error([f"--opa-check-interval={text}"]).startswith("invalid --opa-check-interval")


@pytest.mark.parametrize(
    "argv",
    [
        ["--shutdown-timeout=8761h"],
        ["--leader-election=true", "--leader-election-lease-duration=99999999999h"],
    ],
)
def test_durations_are_at_most_a_year(argv: list[str]) -> None:
    assert "must be at most 8760h (a year)" in error(argv)
    assert load("--drift-check-interval=8760h").opa.drift_check_interval == 8760 * 3600
    assert "must be at most 8760h" in error(env={"KOPA_SHUTDOWN_TIMEOUT": "1e12"})


@pytest.mark.parametrize(
    "argv",
    [
        ["--opa-check-interval=1ns"],
        ["--opa-check-interval=9ms"],
        ["--drift-check-interval=1us"],
        ["--replicate-resync=1ns"],
        ["--leader-election=true", "--leader-election-retry-period=1ns"],
    ],
)
def test_loops_are_paced_at_least_10ms_apart(argv: list[str]) -> None:
    """A pause of 1ns between checks made a tight loop of requests to OPA or the API server."""
    message = error(argv)
    assert message.startswith(f"invalid {argv[-1].split('=')[0]}") and "must be at least 10ms" in message
    assert load("--opa-check-interval=10ms", "--drift-check-interval=0").opa.drift_check_interval == 0.0


# --- the link to OPA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--opa-auth-token=t", "--opa-auth-token-file=/f"], "cannot be combined with --opa-auth-token"),
        (["--opa-ca-file=/ca", "--opa-allow-insecure"], "cannot be combined with --opa-ca-file"),
        (["--opa-client-cert-file=/c"], "needs --opa-client-key-file too"),
        (["--opa-client-key-file=/k"], "needs --opa-client-cert-file too"),
    ],
)
def test_opa_connection_settings_that_exclude_or_need_each_other(argv: list[str], expected: str) -> None:
    assert expected in error(argv)


@pytest.mark.parametrize("token", ["line\nX-Evil: 1", "tab\there", "secr\u00e9t", "euro\u20ac"])
def test_a_token_that_cannot_go_in_a_header_is_refused_unquoted(token: str) -> None:
    message = error([f"--opa-auth-token={token}"])
    assert message.startswith("invalid --opa-auth-token: must be printable ASCII")
    assert token not in message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://user:pa55word@opa:8181/v1", 'invalid --opa-url "http://***@opa:8181/v1": must not carry'),
        ("http://s3cr3tuser@opa:8181/v1", 'invalid --opa-url "http://***@opa:8181/v1": must not carry'),
        ("http://::1:8181/v1", "an IPv6 address goes in brackets, e.g. http://[::1]:8181/v1"),
    ],
)
def test_opa_urls_with_credentials_or_a_bare_ipv6_address(url: str, expected: str) -> None:
    message = error([f"--opa-url={url}"])
    assert expected in message
    assert "pa55word" not in message and "s3cr3tuser" not in message


def test_the_token_is_never_shown() -> None:
    secret = "s3cr3t-token-value"
    loaded = load(f"--opa-auth-token={secret}")
    assert loaded.opa.auth_token == secret
    assert secret not in repr(loaded)
    assert secret not in error([f"--opa-auth-token={secret}", "--opa-auth-token-file=/f"])


# --- operations --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["0.0.0.0:8000", ":8000", "127.0.0.1:1", "[::]:9000", "localhost:65535", ""])
def test_health_endpoint_addresses(text: str) -> None:
    assert load(f"--health-endpoint={text}").health_endpoint == text


@pytest.mark.parametrize("text", ["8000", "host:0", "host:65536", "host:port", "a b:80", "[::1:80"])
def test_bad_health_endpoints(text: str) -> None:
    assert error([f"--health-endpoint={text}"]).startswith("invalid --health-endpoint")


def test_log_format_and_shutdown_timeout() -> None:
    loaded = load("--log-format=JSON", "--shutdown-timeout=2s500ms")
    assert loaded.logging.format == "json"
    assert loaded.shutdown_timeout == 2.5
    assert "must be text or json" in error(["--log-format=xml"])


# --- bundle mode -------------------------------------------------------------------------------------------


def test_bundle_mode_settings() -> None:
    loaded = load(
        "--bundle-endpoint=:8443",
        "--bundle-token-file=/t",
        "--bundle-reserved-roots=system,/other/bundle/",
    )
    assert loaded.bundle.enabled
    assert loaded.bundle.reserved_roots == ("system", "other/bundle")
    assert not load().bundle.enabled
    # Client certificates alone may authenticate the OPAs: no token file then.
    mutual = load(
        "--bundle-endpoint=:8443",
        "--bundle-tls-cert-file=/c",
        "--bundle-tls-key-file=/k",
        "--bundle-tls-ca-file=/ca",
    )
    assert (mutual.bundle.token_file, mutual.bundle.tls_ca_file) == ("", "/ca")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bundle-endpoint=:8443"], "bundle mode needs --bundle-token-file"),
        (["--bundle-tls-cert-file=/c"], "TLS needs --bundle-tls-key-file too"),
        (
            ["--bundle-tls-ca-file=/ca"],
            "invalid --bundle-tls-ca-file: mutual TLS needs --bundle-tls-cert-file",
        ),
        (
            ["--bundle-endpoint=:8443", "--bundle-token-file=/t", "--replicate-path=system/kube"],
            'overlaps the reserved root "system"',
        ),
        (["--bundle-reserved-roots=a//b"], "invalid --bundle-reserved-roots"),
    ],
)
def test_bundle_mode_refusals(argv: list[str], message: str) -> None:
    """Bundle mode without its token (or client certificates), TLS with one file, mutual TLS without TLS, and
    what bundle mode cannot do yet stop start-up with one line naming the setting."""
    assert message in error(argv)


def test_bundle_mode_refuses_automatic_replication(tmp_path: Path) -> None:
    opa_config = tmp_path / "opa.yaml"
    opa_config.write_text("bundles: {}\n", encoding="utf-8")
    message = error(["--bundle-endpoint=:8443", "--bundle-token-file=/t", f"--opa-config={opa_config}"])
    assert message.startswith("invalid --opa-config: automatic replication is not available in bundle mode")


# --- leader election ---------------------------------------------------------------------------------------

BUNDLE_MODE = ("--bundle-endpoint=:8443", "--bundle-token-file=/t")


@pytest.mark.parametrize(
    ("argv", "enabled"),
    [
        ((), False),
        (BUNDLE_MODE, True),
        (("--leader-election=true",), True),
        (("--leader-election=T",), True),
        ((*BUNDLE_MODE, "--leader-election=false"), False),
        ((*BUNDLE_MODE, "--leader-election=AUTO"), True),
    ],
)
def test_leader_election_is_on_by_default_in_bundle_mode_only(argv: tuple[str, ...], enabled: bool) -> None:
    """Push mode's sidecars each report on their own OPA, as kube-mgmt's do (and existing installs grant no
    Lease RBAC); bundle mode's replicas all report the same, so only one of them may write."""
    assert load(*argv).leader_election.enabled is enabled


def test_leader_election_settings() -> None:
    loaded = load(
        "--leader-election-namespace=kopa-system",
        "--leader-election-lease-name=kopa.example",
        "--leader-election-lease-duration=3s",
        "--leader-election-renew-deadline=2s",
        "--leader-election-retry-period=500ms",
    ).leader_election
    assert (loaded.namespace, loaded.lease_name) == ("kopa-system", "kopa.example")
    assert (loaded.lease_duration, loaded.renew_deadline, loaded.retry_period) == (3.0, 2.0, 0.5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--leader-election=maybe"], 'invalid --leader-election "maybe": must be auto, true or false'),
        (["--leader-election-namespace=*"], "invalid --leader-election-namespace"),
        (["--leader-election-lease-name=Kopa"], "RFC 1123 subdomain"),
        (["--leader-election-renew-deadline=15s"], "must be shorter than --leader-election-lease-duration"),
        (["--leader-election-retry-period=9s"], "must be shorter than --leader-election-renew-deadline"),
        (["--leader-election-retry-period=0"], "must be at least 10ms"),
    ],
)
def test_leader_election_refusals(argv: list[str], message: str) -> None:
    """client-go's shape: the leader gives up before the others may take over, and renews several times
    within its deadline."""
    assert message in error(argv)
