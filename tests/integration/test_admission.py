"""Admission control end to end, as a user sets it up: the real kube-apiserver calls OPA as a validating
webhook over TLS, and OPA decides with the policy and data kopa loads from ConfigMaps and the Ingresses kopa
replicates.

Everything comes from the files the tutorial shows (docs/admission/) and from the Helm chart:
devstack.demo.admission_stack renders helm/kopa with docs/admission/values.yaml and runs its pod here (the
chart's init script, token and `system.authz` policy; OPA and kopa with the chart's arguments; kopa as the
chart's ServiceAccount with only the chart's RBAC) and creates the chart's webhook configuration, pointed at
OPA's loopback URL, never at a Service. The webhook fails closed (failurePolicy Fail), so a webhook that
cannot be called shows as refused requests.

- The end-to-end test runs on the session's API server: its webhook only sees namespaces labelled with a
  value of its own, and goes away when the stack does, whatever happens.
- The demo's admission mode (`make demo DEMO_ARGS=--admission`) gets a fresh API server of its own, as it
  does for a user; its printed commands and every command of docs/admission-control.md run against it, in
  order, and must print what is printed and shown.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client

from devstack.binaries import repo_root
from devstack.demo import (
    ADMISSION_DIR,
    REJECTED,
    AdmissionDemo,
    AdmissionStack,
    admission_demo,
    admission_stack,
    run_kubectl,
    shell,
)
from devstack.kube import KubeCluster
from tests.conftest import API_TIMEOUT, in_ci, namespace_name, require_binaries

pytestmark = pytest.mark.integration

TUTORIAL = repo_root() / "docs" / "admission-control.md"
SCOPE_LABEL = "kopa.test/admission"
DENIED = 'admission webhook "webhook.openpolicyagent.org" denied the request: '
REGISTRIES = "registry.k8s.io/, registry.example.com/"
SERVERS = ("etcd", "kube-apiserver", "opa", "kubectl", "helm")


def image_refused(container: str, image: str) -> str:
    """The policy's message for a refused image (docs/admission/policy.yaml, image-registries.rego)."""
    return f'container "{container}": image "{image}" is not from an allowed registry (allowed: {REGISTRIES})'


def host_taken(host: str, namespace: str, name: str) -> str:
    """The policy's message for an Ingress host of another namespace (ingress-hosts.rego)."""
    return f'host "{host}" is already used by ingress {namespace}/{name}'


# --- the end-to-end test on the session's API server -----------------------------------------------------


@dataclass
class Teams:
    """Two namespaces the test's webhook applies to (they carry its scope label), like team-a and team-b."""

    scope: str
    a: str
    b: str


@pytest.fixture
def teams(
    request: pytest.FixtureRequest, k8s: client.ApiClient, core_v1: client.CoreV1Api
) -> Iterator[Teams]:
    """Two fresh namespaces labelled SCOPE_LABEL=<a value of this test's>; their Pods and Ingresses are
    deleted afterwards (replicated Ingresses left behind would show up in every later test)."""
    scope = secrets.token_hex(4)
    names = [namespace_name(f"team-{team}-{request.node.name}") for team in ("a", "b")]
    labels = {"kopa.test/test": "true", SCOPE_LABEL: scope}
    created = []
    try:
        for name in names:
            meta = client.V1ObjectMeta(name=name, labels=labels)
            core_v1.create_namespace(client.V1Namespace(metadata=meta), _request_timeout=API_TIMEOUT)
            created.append(name)
        yield Teams(scope, *names)
    finally:
        networking = client.NetworkingV1Api(k8s)
        for name in created:
            networking.delete_collection_namespaced_ingress(name, _request_timeout=API_TIMEOUT)
            core_v1.delete_collection_namespaced_pod(
                name, grace_period_seconds=0, _request_timeout=API_TIMEOUT
            )
            core_v1.delete_namespace(name, _request_timeout=API_TIMEOUT)


def kubectl(kube: KubeCluster, *args: str, stdin: str | None = None) -> tuple[int, str]:
    """kubectl as admin, from the repository's root: (exit code, stdout and stderr merged, as a terminal
    shows them)."""
    result = run_kubectl(kube.admin_kubeconfig, *args, stdin=stdin, cwd=repo_root(), merge_output=True)
    return result.returncode, result.stdout


def admitted(kube: KubeCluster, *args: str, stdin: str | None = None) -> str:
    code, output = kubectl(kube, *args, stdin=stdin)
    assert code == 0, f"kubectl {' '.join(args)} was refused: {output}"
    return output


def refused(kube: KubeCluster, *args: str) -> str:
    code, output = kubectl(kube, *args)
    assert code != 0, f"kubectl {' '.join(args)} was admitted: {output}"
    return output


def policy_for(namespace: str) -> str:
    """docs/admission/policy.yaml for kopa loading ConfigMaps from `namespace` instead of opa: kopa puts a
    data ConfigMap under data.<its namespace>, so the line naming the registry list's namespace changes."""
    text = (ADMISSION_DIR / "policy.yaml").read_text(encoding="utf-8")
    old, new = 'data.opa["allowed-registries"]', f'data["{namespace}"]["allowed-registries"]'
    rule = f"registries := {old}"
    assert text.count(rule) == 1, "the policy no longer reads the registry list where this test expects"
    return text.replace(old, new)


def test_the_api_server_asks_opa_and_the_policy_decides(
    kube: KubeCluster, namespace: str, teams: Teams, tmp_path: Path
) -> None:
    require_binaries(*SERVERS)
    scope = {"matchLabels": {SCOPE_LABEL: teams.scope}}
    with admission_stack(
        kube,
        tmp_path / "stack",
        namespace=namespace,
        release=f"adm-{secrets.token_hex(3)}",
        # The chart's ServiceAccount is then kopa-system:kopa, an identity of the session's API server.
        release_namespace="kopa-system",
        namespace_selector=scope,
    ) as stack:
        check_the_webhook_is_the_charts(kube, stack, teams)

        # The shared files, loaded by kopa from this test's namespace.
        output = admitted(
            kube, "apply", "--server-side", f"-n={namespace}", "-f=-", stdin=policy_for(namespace)
        )
        assert output == "configmap/admission-policy serverside-applied\n"
        output = admitted(
            kube, "apply", "--server-side", f"-n={namespace}", "-f=docs/admission/registries.yaml"
        )
        assert output == "configmap/allowed-registries serverside-applied\n"
        stack.wait_in_sync()

        # Images: refused with the policy's message, or admitted.
        output = refused(kube, f"-n={teams.a}", "run", "web", "--image=nginx:1.27")
        assert (
            output == f"Error from server: {DENIED}{image_refused('web', 'docker.io/library/nginx:1.27')}\n"
        )
        output = admitted(kube, f"-n={teams.a}", "run", "web", "--image=registry.k8s.io/pause:3.10")
        assert output == "pod/web created\n"
        # Every container counts, init containers too.
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "mixed"},
            "spec": {
                "initContainers": [{"name": "setup", "image": "busybox:1.36"}],
                "containers": [{"name": "app", "image": "registry.example.com/shop/app:3"}],
            },
        }
        code, output = kubectl(kube, f"-n={teams.a}", "create", "-f=-", stdin=json.dumps(pod))
        assert code != 0
        assert image_refused("setup", "docker.io/library/busybox:1.36") in output
        # Outside the webhook's scope nothing is asked: the same image goes into the test's own namespace.
        assert (
            admitted(kube, f"-n={namespace}", "run", "outside", "--image=nginx:1.27")
            == "pod/outside created\n"
        )

        # Changing the list in the data ConfigMap changes the decision; nothing restarts.
        opa_pid, kopa_pid = stack.opa.pid, stack.kopa.pid
        admitted(
            kube, "apply", "--server-side", f"-n={namespace}", "-f=docs/admission/registries-docker-hub.yaml"
        )
        stack.wait_in_sync()
        assert admitted(kube, f"-n={teams.a}", "run", "proxy", "--image=nginx:1.27") == "pod/proxy created\n"
        admitted(kube, "apply", "--server-side", f"-n={namespace}", "-f=docs/admission/registries.yaml")
        stack.wait_in_sync()
        output = refused(kube, f"-n={teams.a}", "run", "proxy-2", "--image=nginx:1.27")
        assert image_refused("proxy-2", "docker.io/library/nginx:1.27") in output
        assert (stack.opa.pid, stack.kopa.pid) == (opa_pid, kopa_pid), "OPA or kopa restarted"

        # Ingress hosts: the replicated Ingresses of other namespaces decide.
        ingress = "-f=docs/admission/ingress-shop.yaml"
        assert admitted(kube, f"-n={teams.a}", "apply", ingress) == "ingress.networking.k8s.io/shop created\n"
        stack.wait_in_sync()
        output = refused(kube, f"-n={teams.b}", "apply", ingress)
        assert output == (
            'Error from server: error when creating "docs/admission/ingress-shop.yaml": '
            f"{DENIED}{host_taken('shop.example.com', teams.a, 'shop')}\n"
        )
        rule = "--rule=shop.example.com/admin=shop-admin:80"
        admitted(kube, f"-n={teams.a}", "create", "ingress", "shop-admin", rule)
        admitted(kube, f"-n={teams.b}", "create", "ingress", "other", "--rule=b.shop.example.com/=other:80")
        admitted(kube, f"-n={teams.a}", "delete", "ingress", "shop", "shop-admin")
        stack.wait_in_sync()
        assert admitted(kube, f"-n={teams.b}", "apply", ingress) == "ingress.networking.k8s.io/shop created\n"
        stack.wait_in_sync()

        check_opa_is_locked(stack, teams)

        # failurePolicy Fail: with OPA gone, requests in scope are refused, not let in unchecked.
        stack.opa.stop()
        output = refused(kube, f"-n={teams.a}", "run", "unchecked", "--image=registry.k8s.io/pause:3.10")
        assert 'failed calling webhook "webhook.openpolicyagent.org"' in output, output

    # The webhook configuration and the chart's cluster-wide RBAC went with the stack.
    for kind, name in [
        ("validatingwebhookconfiguration", stack.webhook_name),
        *[
            (obj["kind"].lower(), obj["metadata"]["name"])
            for obj in stack.objects
            if obj["kind"].startswith("Cluster")
        ],
    ]:
        assert kubectl(kube, "get", kind, name, "--ignore-not-found", "-o=name") == (0, ""), (
            f"{kind} {name} left"
        )
    log = stack.kopa.log_path.read_text(errors="replace")
    assert "Traceback" not in log
    assert stack.token not in log, "kopa logged the token"
    assert "forbidden" not in log.lower(), "kopa was refused something the chart's RBAC should grant"


def check_the_webhook_is_the_charts(kube: KubeCluster, stack: AdmissionStack, teams: Teams) -> None:
    """The configuration on the API server: the chart's, calling OPA's loopback URL at the chart's path with
    the CA of OPA's certificate, failing closed, and only for this test's namespaces."""
    output = admitted(kube, "get", "validatingwebhookconfiguration", stack.webhook_name, "-o=json")
    (webhook,) = json.loads(output)["webhooks"]
    assert webhook["name"] == "webhook.openpolicyagent.org"
    config = webhook["clientConfig"]
    assert "service" not in config
    assert config["url"] == f"{stack.opa_url}/"
    assert base64.b64decode(config["caBundle"]) == stack.ca_file.read_bytes()
    assert webhook["failurePolicy"] == "Fail"
    assert webhook["namespaceSelector"]["matchLabels"] == {SCOPE_LABEL: teams.scope}
    assert {r for rule in webhook["rules"] for r in rule["resources"]} == {"pods", "ingresses"}
    assert webhook["sideEffects"] == "None"


def check_opa_is_locked(stack: AdmissionStack, teams: Teams) -> None:
    """OPA runs the chart's system.authz policy: anonymous callers may ask for the webhook's decision and
    health, nothing else; kopa's token (the file the chart's init script wrote) may write."""
    token = stack.token
    anonymous, stranger, kopa = stack.opa_client(None), stack.opa_client("not-the-token"), stack.opa_client()

    # The authz policy OPA enforces is the chart's text plus the token line its init script appends.
    bootstrap = next(o for o in stack.objects if o["kind"] == "ConfigMap" and "authz.rego.tmpl" in o["data"])
    (authz,) = [p for p in kopa.get_json("/v1/policies")["result"] if p["id"].endswith("/authz.rego")]
    assert authz["raw"] == bootstrap["data"]["authz.rego.tmpl"] + f"token := `{token}`\n"

    for client_, who in ((anonymous, "anonymous"), (stranger, "a wrong token")):
        assert client_.request("PUT", "/v1/policies/evil", "package evil\n\nx := 1\n")[0] == 401, who
        assert client_.request("PUT", "/v1/data/evil", {"a": 1})[0] == 401, who
        assert client_.request("DELETE", "/v1/policies/" + authz["id"])[0] == 401, who
        assert client_.request("GET", "/v1/data")[0] == 401, who
        assert client_.request("POST", "/v1/data/system/main", {"input": {}})[0] == 401, who

    # The webhook's decision, as the API server asks for it: POST / with an AdmissionReview, no token.
    review = json.loads((ADMISSION_DIR / "review.json").read_text(encoding="utf-8"))
    status, answer = anonymous.request("POST", "/", review)
    assert status == 200, answer
    assert answer["response"] == {
        "uid": review["request"]["uid"],
        "allowed": False,
        "status": {"message": image_refused("shell", "docker.io/library/busybox:1.36")},
    }
    review["request"]["object"]["spec"]["containers"][0]["image"] = "registry.k8s.io/busybox:1.36"
    assert anonymous.request("POST", "/", review)[1]["response"]["allowed"] is True
    # An Ingress in team-a for the host team-b now has.
    review["request"].update(kind={"kind": "Ingress"}, namespace=teams.a, object=ingress("shop.example.com"))
    assert anonymous.request("POST", "/", review)[1]["response"]["status"] == {
        "message": host_taken("shop.example.com", teams.b, "shop")
    }
    assert anonymous.request("GET", "/health")[0] == 200
    assert anonymous.request("GET", "/health/ready")[0] == 200

    # kopa's token writes policies and data.
    assert kopa.request("PUT", "/v1/policies/probe", "package probe.policy\n\nx := 1\n")[0] == 200
    assert kopa.request("PUT", "/v1/data/probe/data", {"a": 1})[0] == 204
    assert kopa.get_json("/v1/data/probe") == {"result": {"data": {"a": 1}, "policy": {"x": 1}}}
    assert kopa.request("DELETE", "/v1/policies/probe")[0] == 200
    assert kopa.request("DELETE", "/v1/data/probe/data")[0] == 204


def ingress(host: str) -> dict[str, object]:
    return {"kind": "Ingress", "metadata": {"name": "x"}, "spec": {"rules": [{"host": host}]}}


# --- the demo's admission mode and the tutorial ----------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AdmissionDemo, list[str]]]:
    """`make demo DEMO_ARGS=--admission` up to its foreground loop, with what it printed."""
    require_binaries(*SERVERS)
    printed: list[str] = []
    with admission_demo(tmp_path_factory.mktemp("admission-demo"), out=printed.append) as running:
        yield running, printed


@dataclass
class Printed:
    comment: str
    command: str
    output: str


def printed_tries(lines: list[str]) -> tuple[list[str], list[Printed]]:
    """The `export` lines and the commands the demo printed, each with its comment and printed output."""
    exports = [line.strip() for line in lines if line.startswith("  export ")]
    tries: list[Printed] = []
    for i, line in enumerate(lines):
        if line.startswith("  $ "):
            assert lines[i - 1].startswith("  # "), lines[i - 1]
            output = []
            for following in lines[i + 1 :]:
                if not following.strip():
                    break
                output.append(following.removeprefix("  "))
            tries.append(Printed(lines[i - 1][4:], line[4:], "\n".join(output) + "\n"))
    return exports, tries


def test_the_demo_prints_a_command_that_is_rejected_and_one_that_is_admitted(
    demo: tuple[AdmissionDemo, list[str]],
) -> None:
    _, lines = demo
    exports, tries = printed_tries(lines)
    assert [t.comment.split(":")[0] for t in tries] == ["rejected", "admitted"], lines
    assert len(exports) == 3
    for attempt in tries:
        # As a user would: the printed export lines pasted into a shell, then the command.
        code, output = shell("\n".join([*exports, attempt.command]), {})
        assert output == attempt.output, (
            f"{attempt.command} printed {output!r}, the demo said {attempt.output!r}"
        )
        if attempt.comment.startswith("rejected"):
            assert code != 0
            assert output.startswith(f"Error from server: {DENIED}"), output
        else:
            assert code == 0
            assert output.endswith("created (server dry run)\n"), output
    assert tries[0].command == REJECTED


@dataclass
class Step:
    """One command of the tutorial's console blocks, and the output shown after it."""

    line: int
    command: str
    expected: str

    @property
    def fails(self) -> bool:
        return self.expected.startswith(("Error from server", "error:"))


def tutorial_steps(text: str) -> list[Step]:
    """Every `$ ` command of the ```console blocks, in order, with the lines shown after it."""
    steps: list[Step] = []
    block = False
    current: Step | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("```"):
            block, current = line == "```console", None
        elif block and line.startswith("$ "):
            current = Step(number, line[2:], "")
            steps.append(current)
        elif block:
            assert current is not None, f"docs/admission-control.md line {number}: output before any command"
            current.expected += line + "\n"
    return steps


def normalised(output: str) -> str:
    """Output as the tutorial can show it: no trailing spaces on lines (kubectl pads its last column), and
    exactly one newline at the end."""
    lines = [line.rstrip() for line in output.rstrip("\n").splitlines()]
    return "\n".join(lines) + "\n" if lines else ""


def test_the_tutorial_shows_the_files_as_they_are() -> None:
    """Each file the tutorial shows (a code block right after `<!-- file: path -->`) is that file, and it
    names every file of docs/admission."""
    text = TUTORIAL.read_text(encoding="utf-8")
    shown = re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```\n", text, flags=re.DOTALL)
    names = ("values.yaml", "policy.yaml", "registries.yaml")
    assert {path for path, _ in shown} == {f"docs/admission/{name}" for name in names}
    for path, content in shown:
        assert content == (repo_root() / path).read_text(encoding="utf-8"), (
            f"{path} differs from the tutorial"
        )
    for path in ADMISSION_DIR.iterdir():
        assert f"admission/{path.name}" in text, f"the tutorial never mentions {path.name}"


def test_the_tutorial_answers_as_it_says(demo: tuple[AdmissionDemo, list[str]]) -> None:
    """Every command of docs/admission-control.md, in order, on the demo's stack, prints what the page shows.

    Before each command the test waits until OPA holds what the API server has (kopa is asynchronous: a
    reader typing the next command gives it the moment it needs)."""
    running, _ = demo
    if shutil.which("curl") is None:
        message = "the tutorial's commands use curl, which is not installed"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    steps = tutorial_steps(TUTORIAL.read_text(encoding="utf-8"))
    assert len(steps) >= 20, steps
    assert any(s.command.startswith("kubectl --namespace team-a run web --image=nginx") for s in steps)
    for step in steps:
        running.stack.wait_in_sync()
        code, output = shell(step.command, running.env)
        where = f"docs/admission-control.md line {step.line}: $ {step.command}"
        assert normalised(output) == step.expected, (
            f"{where}\nprinted:\n{output}\nthe tutorial shows:\n{step.expected}"
        )
        assert (code != 0) == step.fails, f"{where}: exit code {code}"
