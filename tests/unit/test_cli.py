"""The kopa command as a user meets it: version, help, and one-line errors with exit code 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def kopa(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KOPA_")}
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
        check=False,
    )


@pytest.mark.parametrize("flag", ["--version", "-v"])
def test_version_prints_the_version_and_the_git_commit(flag: str) -> None:
    result = kopa(flag)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"kopa \S+ \(git [0-9a-f]{7,40}\)\n", result.stdout), result.stdout


def test_the_console_script_starts_the_same_program() -> None:
    script = os.path.join(os.path.dirname(sys.executable), "kopa")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0
    assert result.stdout == kopa("--version").stdout


def test_help_reads_well_and_exits_0() -> None:
    result = kopa("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: kopa")
    assert "--opa-url" in result.stdout and "KOPA_" in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--bogus"], {}, "--bogus"),
        (["--opa-url=ftp://x"], {}, "--opa-url"),
        (["--policy-label=-foo"], {}, "--policy-label"),
        (["--enable-data=maybe"], {}, "--enable-data"),
        (["--opa-config=/x.yaml"], {}, "--opa-config"),
        ([], {"KOPA_NAMESPACES": "Not_A_Namespace"}, "KOPA_NAMESPACES"),
        (["--config=/does/not/exist.yaml"], {}, "/does/not/exist.yaml"),
    ],
)
def test_an_invalid_setting_stops_start_up_with_one_line(
    args: list[str], env: dict[str, str], named: str
) -> None:
    result = kopa(*args, env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kopa: ") and named in lines[0]
    assert "Traceback" not in result.stderr


def test_a_missing_kubeconfig_is_one_line() -> None:
    result = kopa("--kubeconfig=/does/not/exist", "--namespaces=default")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "/does/not/exist" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_a_malformed_kubeconfig_is_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "kubeconfig"
    broken.write_text("apiVersion: v1\nkind: Config\n")
    result = kopa(f"--kubeconfig={broken}", "--namespaces=default")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and str(broken) in lines[0], result.stderr


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one line that says why kopa stopped (log lines before it, such as "starting", aside)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("kopa: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_deeply_nested_yaml_is_one_line(tmp_path: Path) -> None:
    deep = "[" * 5000 + "]" * 5000
    config, opa_config = tmp_path / "kopa.yaml", tmp_path / "opa.yaml"
    config.write_text(f"namespaces: {deep}\n")
    opa_config.write_text(f"bundles: {deep}\n")
    assert "nested too deeply" in one_line_error(kopa(f"--config={config}"))
    assert "nested too deeply" in one_line_error(kopa(f"--opa-config={opa_config}"))


def kubeconfig(tmp_path: Path, server: str, cluster: str = "") -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters:\n- name: k\n  cluster:\n    server: {server}\n{cluster}"
        "users:\n- name: u\n  user:\n    token: abc\n"
        "contexts:\n- name: c\n  context: {cluster: k, user: u}\n"
    )
    return path


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("secr\u00e9t\n", "the token must be printable ASCII"),
        ("\ntoken-on-line-2\n", "its first line is empty"),
    ],
)
def test_an_unusable_token_file_is_one_line_without_the_token(
    tmp_path: Path, content: str, expected: str
) -> None:
    token = tmp_path / "token"
    token.write_text(content)
    line = one_line_error(
        kopa(f"--kubeconfig={kubeconfig(tmp_path, 'https://127.0.0.1:1')}", f"--opa-auth-token-file={token}")
    )
    assert f"invalid --opa-auth-token-file {token}: {expected}" in line
    assert "secr" not in line and "line-2" not in line
