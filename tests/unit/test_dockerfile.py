"""The Dockerfile's structure, checked without a container engine: its stages, a non-root USER, the kopa
ENTRYPOINT, and that every COPY takes something the build context really holds.

tests/integration/test_image.py builds the wheel the Dockerfile builds, with the Dockerfile's own commands,
and runs the entrypoint from it."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.dockerfile import Dockerfile, DockerIgnore, Stage

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = Dockerfile.read(REPO / "Dockerfile")
IGNORE = DockerIgnore.read(REPO / ".dockerignore")


def test_stages_in_order_with_the_image_last() -> None:
    assert DOCKERFILE.names() == ["build", "test", "venv", "runtime"]
    known: set[str] = set()
    for stage in DOCKERFILE.stages:
        if stage.base not in known:
            assert re.fullmatch(r"python:\d+\.\d+-slim(-\w+)?", stage.base), stage.base
        assert stage.name
        known.add(stage.name)


def test_base_image_python_is_the_oldest_kopa_supports() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    oldest = project["requires-python"].removeprefix(">=")
    assert DOCKERFILE.global_args["PYTHON_IMAGE"].startswith(f"python:{oldest}-slim")


def test_final_image_runs_kopa_as_a_non_root_user() -> None:
    final = DOCKERFILE.final
    users = final.of("USER")
    assert users, "the image must not run as root"
    user, _, group = users[-1].value.partition(":")
    assert user.isdigit() and int(user) != 0, "a numeric uid lets Kubernetes check runAsNonRoot"
    assert group.isdigit() and int(group) != 0
    # The chart runs the pod as the same user.
    values = yaml.safe_load((REPO / "helm" / "kopa" / "values.yaml").read_text(encoding="utf-8"))
    assert values["securityContext"]["runAsUser"] == int(user)
    assert values["securityContext"]["runAsGroup"] == int(group)
    # Nothing after USER switches back, and the entrypoint comes after it.
    assert final.instructions.index(users[-1]) < final.instructions.index(final.of("ENTRYPOINT")[-1])


def test_entrypoint_is_kopa_in_exec_form() -> None:
    (entrypoint,) = DOCKERFILE.final.of("ENTRYPOINT")
    assert entrypoint.exec_form() == ["kopa"]
    assert not DOCKERFILE.final.of("CMD"), "arguments come from the pod spec"
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["scripts"]["kopa"] == "app.cli:main"
    env = " ".join(i.value for i in DOCKERFILE.final.of("ENV"))
    assert "PATH=/opt/kopa/bin:" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env, "the chart mounts the root filesystem read-only"


@pytest.mark.parametrize("stage", DOCKERFILE.stages, ids=lambda stage: str(stage.name))
def test_every_copy_source_exists_in_the_build_context(stage: Stage) -> None:
    earlier = DOCKERFILE.names()[: DOCKERFILE.stages.index(stage)]
    for copy in stage.copies():
        if copy.from_stage is not None:
            assert copy.from_stage in earlier, f"COPY --from={copy.from_stage} names no earlier stage"
            continue
        for source in copy.sources:
            path = REPO / source
            assert path.exists(), f"COPY {source}: no such file in the repository"
            relative = path.resolve().relative_to(REPO).as_posix()
            assert relative == "." or not IGNORE.excluded(relative), f"COPY {source}: .dockerignore drops it"


def test_build_stage_builds_the_wheel_as_the_image_test_does() -> None:
    build = DOCKERFILE.stage("build")
    (run,) = build.of("RUN")
    assert run.value.startswith('test -n "${COMMIT}"'), "a build without the commit stops at once"
    assert 'SETUPTOOLS_SCM_PRETEND_VERSION="${VERSION}"' in run.value
    assert 'SETUPTOOLS_SCM_PRETEND_METADATA="{node=\\"g${COMMIT}\\"}"' in run.value
    assert "python -m pip wheel --no-deps --wheel-dir /wheels ." in run.value
    assert "/opt/kopa/bin/pip install --constraint constraints.txt /wheels/kopa-*.whl" in run.value
    assert [i.value for i in build.of("ARG")] == ["VERSION=0.0.0", "COMMIT"]
    copied = {source for copy in build.copies() for source in copy.sources}
    assert copied == {"pyproject.toml", "constraints.txt", "README.md", "app"}


def test_test_stage_runs_the_unit_tests_and_the_image_depends_on_it() -> None:
    test = DOCKERFILE.stage("test")
    assert test.base == "build"
    commands = " ".join(i.value for i in test.of("RUN"))
    assert "/opt/kopa/bin/python -m pytest tests/unit" in commands, "with the image's pinned dependencies"
    assert [(c.sources, c.dest, c.from_stage) for c in test.copies()] == [(["."], "./", None)]
    marker = re.search(r"touch (\S+)", commands)
    assert marker, "the test stage leaves a marker the runtime stage copies"
    froms = {(c.from_stage, tuple(c.sources)) for c in DOCKERFILE.final.copies()}
    assert ("test", (marker.group(1),)) in froms, "without it BuildKit would skip the test stage"


def test_final_image_carries_no_build_tools_or_sources() -> None:
    final = DOCKERFILE.final
    assert final.base == DOCKERFILE.global_args["PYTHON_IMAGE"], "a fresh base, not the build stage"
    for copy in final.copies():
        assert copy.from_stage in ("venv", "test"), f"the image copies {copy.sources} from the context"
    commands = " ".join(i.value for i in final.of("RUN"))
    for tool in ("apt-get", "apk", "gcc", "pip install", "pip wheel", "curl", "wget"):
        assert tool not in commands, tool
    assert "pip uninstall --yes --quiet pip setuptools wheel" in commands
    venv_commands = " ".join(i.value for i in DOCKERFILE.stage("venv").of("RUN"))
    assert "pip uninstall --yes --quiet pip" in venv_commands


def test_dockerignore_keeps_local_state_out_and_sources_in() -> None:
    for path in (".git", ".venv", ".mypy_cache", "app/__pycache__/x.pyc", "app/_version.py", "kopa.egg-info"):
        assert IGNORE.excluded(path), path
    for path in ("app/cli.py", "pyproject.toml", "constraints.txt", "README.md", "tests/unit/test_cli.py"):
        assert not IGNORE.excluded(path), path
    assert not IGNORE.excluded("config.example.yaml"), "the unit tests in the test stage read it"


def test_the_image_exposes_kopas_health_port_and_carries_oci_labels() -> None:
    final = DOCKERFILE.final
    (expose,) = final.of("EXPOSE")
    values = yaml.safe_load((REPO / "helm" / "kopa" / "values.yaml").read_text(encoding="utf-8"))
    assert expose.value == str(values["mgmt"]["healthPort"]), "the chart's kopa port"
    labels = dict(
        pair.split("=", 1) for item in final.of("LABEL") for pair in shlex.split(item.value) if "=" in pair
    )
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.revision"] == "${COMMIT}"
    assert labels["org.opencontainers.image.title"] == "kopa"
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]
    # The labels' arguments are declared in the final stage (a build argument's scope is its stage).
    declared = {item.value.partition("=")[0] for item in final.of("ARG")}
    assert {"VERSION", "COMMIT", "PYTHON_IMAGE"} <= declared
