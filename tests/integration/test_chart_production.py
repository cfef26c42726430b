"""The chart as a platform engineer runs it in production (issue 17): it installs as its README says, its
webhook cannot deadlock the cluster, and its defaults survive node drains and rollouts.

Rendered output is checked here; what the API server can check (a webhook's namespaceSelector and
matchConditions) runs against the session's real kube-apiserver with a webhook that calls a loopback URL
only, scoped to namespaces this test makes.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

import pytest

from tests.integration.chart import CHART, Helm, HelmError, Rendered

pytestmark = pytest.mark.integration

README = CHART / "README.md"


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(tmp_path_factory.mktemp("helm"))


def refusal(helm: Helm, values: dict[str, Any], *, image: bool = True) -> str:
    """What helm says when the chart refuses `values`."""
    with pytest.raises(HelmError) as refused:
        helm.template(values, image=image)
    return refused.value.result.stderr


# --- 1. the image ------------------------------------------------------------------------------------------


def test_the_kopa_image_is_required_and_the_message_says_how_to_make_it(helm: Helm) -> None:
    message = refusal(helm, {}, image=False)
    assert "mgmt.image.repository is required" in message, message
    assert "docker build" in message and "--set mgmt.image.repository=" in message, message


@pytest.mark.parametrize("repository", ["openpolicyagent/kube-mgmt", "docker.io/openpolicyagent/kube-mgmt"])
def test_kube_mgmts_own_image_is_refused(helm: Helm, repository: str) -> None:
    message = refusal(helm, {"mgmt": {"image": {"repository": repository, "tag": "9.0.0"}}}, image=False)
    assert "kube-mgmt's image" in message and "Set mgmt.image.repository" in message, message


def readme_commands() -> list[list[str]]:
    """The commands of the README's Install section, continuation lines joined, each split as sh would."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Install", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    joined = block.replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip()]


def test_the_readme_install_steps_render_with_the_image_they_build(helm: Helm) -> None:
    commands = readme_commands()
    (build,) = [c for c in commands if c[:2] == ["docker", "build"]]
    (install,) = [c for c in commands if c[:2] == ["helm", "install"]]
    built = build[build.index("-t") + 1]
    assert ["docker", "push", built] in commands
    assert {"COMMIT=$(git", "VERSION=0.1.0"} <= set(build), "the Dockerfile's build arguments"
    release, chart, *flags = install[2:]
    assert chart == "helm/kopa"
    namespace = next(f for f in flags if f.startswith("--namespace") or f == "--namespace")
    ns = flags[flags.index(namespace) + 1]
    sets = dict(flags[i + 1].split("=", 1) for i, f in enumerate(flags) if f == "--set")
    assert f"{sets['mgmt.image.repository']}:{sets['mgmt.image.tag']}" == built
    result = helm.run(
        "template", release, str(CHART), f"--namespace={ns}", *(f"--set={k}={v}" for k, v in sets.items())
    )
    rendered = Rendered.parse(result.stdout, ns)
    assert rendered.container("mgmt")["image"] == built
    assert rendered.container("init")["image"] == built
