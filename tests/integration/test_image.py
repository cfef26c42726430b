"""The container image, built without a container engine: the Dockerfile's own RUN commands, run by /bin/sh
on a copy of the build context (what .dockerignore lets through), with the image's paths (/src, /wheels,
/opt/kopa) mapped to temporary directories. Each stage gets its own directories, as each gets its own
filesystem in a real build.

Dependencies come from PyPI through pip's cache, so after the first run this takes well under a minute.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from devstack.binaries import repo_root
from tests.dockerfile import Dockerfile, DockerIgnore, Stage, apply_copy, copy_of

pytestmark = pytest.mark.integration

REPO = repo_root()
VERSION = "9.8.7"
COMMIT = "0123abc"
# Image paths the Dockerfile's commands use, mapped into a stage's temporary root.
IMAGE_PATHS = ("/opt/kopa", "/wheels", "/unit-tests-passed", "/src")


@dataclass
class StageRoot:
    """A stage's filesystem: `root`/src stands for /src, `root`/opt/kopa for /opt/kopa, and so on."""

    root: Path

    def local(self, image_path: str) -> Path:
        return self.root / image_path.lstrip("/")

    def rewrite(self, command: str) -> str:
        alternatives = "|".join(re.escape(p) for p in IMAGE_PATHS)
        return re.sub(
            rf"(?<![\w.])({alternatives})(?=[/\s\"']|$)", lambda m: str(self.local(m.group(1))), command
        )

    def run(self, command: str, *, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """One RUN of the Dockerfile, as `/bin/sh -c` runs it, with the build arguments set."""
        assert cwd.is_relative_to(self.root), "RUN commands only ever run inside the stage's own root"
        python_dir = Path(sys.executable).parent  # `python` on PATH, as in the python image
        env = {
            "PATH": f"{python_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": os.environ.get("HOME", str(self.root)),
            "VERSION": VERSION,
            "COMMIT": COMMIT,
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            **{k: v for k, v in os.environ.items() if k.startswith(("PIP_", "SSL_", "REQUESTS_CA"))},
        }
        env.pop("PIP_NO_CACHE_DIR", None)  # the image build skips pip's cache; here it saves the downloads
        result = subprocess.run(
            ["/bin/sh", "-c", self.rewrite(command)],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert result.returncode == 0, (
            f"RUN {command}\nfailed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
        return result


def build_stage(stage: Stage, root: StageRoot, dockerfile: Dockerfile) -> None:
    """A stage's COPYs from the build context and its RUNs, in order, in the stage's working directory."""
    ignore = DockerIgnore.read(REPO / ".dockerignore")
    workdir = dockerfile.workdir(stage)
    root.local(workdir).mkdir(parents=True, exist_ok=True)
    for item in stage.instructions:
        if item.keyword == "COPY" and "from" not in item.flags:
            copy = copy_of(item)
            destination = os.path.normpath(os.path.join(workdir, copy.dest))
            apply_copy(REPO, copy, root.local(destination), ignore)
        elif item.keyword == "RUN":
            root.run(item.value, cwd=root.local(workdir))
        else:
            assert item.keyword in ("ARG", "ENV", "WORKDIR"), f"line {item.line}: {item.keyword} not emulated"


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile.read(REPO / "Dockerfile")


@pytest.fixture(scope="module")
def image_venv(dockerfile: Dockerfile, tmp_path_factory: pytest.TempPathFactory) -> StageRoot:
    """The `build` stage, then the `venv` stage on its result: the /opt/kopa the image carries."""
    root = StageRoot(tmp_path_factory.mktemp("image"))
    build_stage(dockerfile.stage("build"), root, dockerfile)
    build_stage(dockerfile.stage("venv"), root, dockerfile)
    return root


def clean_env() -> dict[str, str]:
    """What a container starts with: no PYTHONPATH, no virtualenv, no KOPA_ settings of the developer."""
    keep = {"PATH", "HOME", "LANG", "LC_ALL"}
    return {k: v for k, v in os.environ.items() if k in keep} | {"PYTHONUNBUFFERED": "1"}


def test_the_wheel_holds_the_package_and_its_version(image_venv: StageRoot) -> None:
    (wheel,) = image_venv.local("/wheels").glob("kopa-*.whl")
    assert wheel.name == f"kopa-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        version_file = archive.read("app/_version.py").decode()
        metadata = archive.read(f"kopa-{VERSION}.dist-info/METADATA").decode()
        entry_points = archive.read(f"kopa-{VERSION}.dist-info/entry_points.txt").decode()
    assert {name.split("/", 1)[0] for name in names} == {"app", f"kopa-{VERSION}.dist-info"}
    assert "app/py.typed" in names
    assert "app/cli.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert VERSION in version_file
    assert f"g{COMMIT}" in version_file
    assert "kopa = app.cli:main" in entry_points
    assert "Requires-Dist: kubernetes" in metadata


def test_entrypoint_runs_from_the_images_virtual_environment(
    image_venv: StageRoot, dockerfile: Dockerfile, tmp_path: Path
) -> None:
    (entrypoint,) = dockerfile.final.of("ENTRYPOINT")
    command = entrypoint.exec_form()
    assert command is not None
    binary = image_venv.local("/opt/kopa") / "bin" / command[0]
    env = clean_env() | {"PATH": f"{image_venv.local('/opt/kopa')}/bin:/usr/bin:/bin"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        # From an empty directory, so nothing of the checkout can be imported by accident.
        return subprocess.run(
            [str(binary), *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    version = run("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"kopa {VERSION} (git {COMMIT})"
    usage = run("--help")
    assert usage.returncode == 0, usage.stderr
    assert usage.stdout.startswith("Usage: kopa")
    wrong = run("--no-such-flag")
    assert wrong.returncode == 2
    where = subprocess.run(
        [str(binary.parent / "python"), "-c", "import app; print(app.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(image_venv.local("/opt/kopa"))
    assert not (binary.parent / "pip").exists(), "the image's virtual environment carries no pip"


def test_test_stage_passes_the_unit_tests(dockerfile: Dockerfile, tmp_path: Path) -> None:
    """The `test` stage: its own run of the build stage, then the whole context, then pytest tests/unit with
    the image's pinned dependencies and the dev extras."""
    root = StageRoot(tmp_path / "test-stage")
    build_stage(dockerfile.stage("build"), root, dockerfile)
    build_stage(dockerfile.stage("test"), root, dockerfile)
    assert root.local("/unit-tests-passed").exists()
