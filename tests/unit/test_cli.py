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
