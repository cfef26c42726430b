"""`make demo`: a local etcd + kube-apiserver + OPA + kopa on loopback, in the foreground.

Two modes, both followed by kopa's log until Ctrl-C, which tears everything down:

- default: applies the hello-world policy ConfigMap from kube-mgmt's guide with kubectl, waits until OPA
  answers it, and prints the commands to try.
- `--admission` (`make demo DEMO_ARGS=--admission`): OPA as the API server's validating admission webhook,
  set up as the Helm chart sets it up. docs/admission-control.md is the walkthrough that goes with it.

The admission mode's pieces are also what the admission tests run (`admission_stack`, `admission_demo`):
helm/kopa is rendered with `helm template` and docs/admission/values.yaml, and its pod runs on this machine
(devstack/chart.py's `LocalPod`, with the chart's own ports): the chart's init script writes the management
token and completes the chart's `system.authz` policy, OPA runs with the chart's arguments (TLS from a
throwaway CA, token authentication), kopa with the chart's arguments as the chart's ServiceAccount holding
only the chart's RBAC, and the API server gets the chart's webhook configuration, pointed at OPA's loopback
URL (admissionController.url), never at a Service.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import EllipsisType
from typing import Any

from devstack import goyaml
from devstack.binaries import MissingBinary, repo_root, tool_path
from devstack.certs import TestCA
from devstack.chart import RBAC_KINDS, Helm, LocalPod, Obj, flag_values
from devstack.kopa import KopaProcess, kopa_process
from devstack.kube import DEFAULT_SERVICE_ACCOUNTS, KubeCluster, service_account_user
from devstack.opa import OpaHttp, OpaServer
from devstack.processes import HOST, ManagedProcess, ServerStartError, free_port, http_status, wait_until

NAMESPACE = "opa"
HELLO_WORLD = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: hello-world
  namespace: opa
  labels:
    openpolicyagent.org/policy: rego
data:
  example.rego: |
    package kubernetes

    example := "Hello, Kubernetes!"
"""

ADMISSION_DIR = repo_root() / "docs" / "admission"
WEBHOOK_KINDS = ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration")
STATUS = "openpolicyagent.org/kube-mgmt-status"
TIMEOUT = 60.0

# The two commands the admission demo prints: --dry-run=server runs admission, the webhook included, and
# stores nothing, so they can be tried again and again.
REJECTED = "kubectl run web --image=nginx:1.27 --dry-run=server"
ADMITTED = "kubectl run web --image=registry.k8s.io/pause:3.10 --dry-run=server"

Say = Callable[[str], None]


def say(text: str = "") -> None:
    print(text, flush=True)


def run_kubectl(
    kubeconfig: Path,
    *args: str,
    stdin: str | None = None,
    timeout: float = 60,
    cwd: Path | None = None,
    merge_output: bool = False,
) -> subprocess.CompletedProcess[str]:
    """kubectl of scripts/versions.env as `kubeconfig`'s user, whatever its exit code; with `merge_output`,
    stderr goes into stdout as a terminal would show it."""
    return subprocess.run(
        [str(tool_path("kubectl")), f"--kubeconfig={kubeconfig}", *args],
        input=stdin,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
        text=True,
        timeout=timeout,
        check=False,
    )


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    """kubectl's output; raises RuntimeError if it fails."""
    result = run_kubectl(kubeconfig, *args, stdin=stdin)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def shell(command: str, env: Mapping[str, str], cwd: Path | None = None) -> tuple[int, str]:
    """Runs one command line with bash as a terminal would show it: (exit code, stdout and stderr merged)."""
    result = subprocess.run(
        ["bash", "-c", command],
        env={**os.environ, **env},
        cwd=cwd or repo_root(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode, result.stdout


def follow(process: ManagedProcess) -> None:
    """Prints kopa's log as it grows, until kopa exits or the user presses Ctrl-C."""
    with process.log_path.open(encoding="utf-8", errors="replace") as log:
        while True:
            line = log.readline()
            if line:
                print(f"  kopa | {line}", end="", flush=True)
                continue
            if not process.running:
                say(f"kopa exited with code {process.returncode}")
                return
            time.sleep(0.2)  # waiting for the user, not for a condition: nothing to poll


def run(work_dir: Path) -> None:
    say(f"Starting etcd and kube-apiserver in {work_dir} (30-60 s on a busy 2-core machine) ...")
    with KubeCluster(work_dir / "kube") as cluster:
        kubeconfig = cluster.admin_kubeconfig
        say(f"  API server at {cluster.url}")
        with OpaServer.plain(work_dir / "opa") as opa:
            say(f"  OPA at {opa.url}")
            kubectl(kubeconfig, "create", "namespace", NAMESPACE)
            kopa = kopa_process(
                [f"--kubeconfig={kubeconfig}", f"--opa-url={opa.api_url}", f"--namespaces={NAMESPACE}"],
                work_dir / "kopa.log",
            )
            with kopa.start():
                say(f"  kopa watching namespace {NAMESPACE} (log: {kopa.log_path})")
                say("Applying the hello-world policy ConfigMap from kube-mgmt's guide:")
                say(f"  kubectl apply -f - <<EOF\n{HELLO_WORLD}EOF")
                kubectl(kubeconfig, "apply", "-f", "-", stdin=HELLO_WORLD)
                query = f"{opa.api_url}/data/kubernetes/example"
                answer = wait_until(
                    lambda: opa.http().get_json("/v1/data/kubernetes/example").get("result"),
                    timeout=60,
                    what="answering data.kubernetes.example",
                    process=kopa,
                )
                say(f"OPA now answers data.kubernetes.example: {answer!r}")
                say()
                say("Try it yourself in another terminal:")
                say(f"  curl -s {query}")
                say(f"  export KUBECONFIG={kubeconfig}")
                say(
                    f"  {shlex.quote(str(tool_path('kubectl')))} -n {NAMESPACE} get configmap hello-world "
                    "-o jsonpath='{.metadata.annotations}'"
                )
                say()
                say("Following kopa's log; press Ctrl-C to stop everything.")
                follow(kopa)


# --- OPA as the API server's admission webhook --------------------------------------------------------------


@dataclass
class AdmissionStack:
    """What `admission_stack` runs: the chart's OPA and kopa, and the chart's webhook on the API server."""

    cluster: KubeCluster
    namespace: str  # where kopa loads policy and data ConfigMaps from
    release: str
    release_namespace: str
    opa_url: str  # https://127.0.0.1:<port>: OPA's API, and the webhook's base URL
    ca_file: Path  # the CA of OPA's certificate: kopa's --opa-ca-file and the webhook's caBundle
    token_file: Path  # the management token the chart's init script wrote; kopa reads it
    kopa_kubeconfig: Path  # the chart's ServiceAccount
    objects: list[Obj]  # everything the chart rendered
    webhook: Obj  # the rendered webhook configuration, created on the API server
    opa: ManagedProcess
    kopa: KopaProcess

    @property
    def token(self) -> str:
        return self.token_file.read_text(encoding="utf-8").splitlines()[0]

    @property
    def webhook_name(self) -> str:
        name: str = self.webhook["metadata"]["name"]
        return name

    @property
    def kopa_args(self) -> list[str]:
        return [str(arg) for arg in self.kopa.args]

    def opa_client(self, token: str | EllipsisType | None = ...) -> OpaHttp:
        """A client of OPA's API that trusts its CA and sends the management token (None: anonymous)."""
        return OpaHttp(self.opa_url, ca_file=self.ca_file, token=self.token if token is ... else token)

    def _list(self, path: str) -> list[Obj]:
        status, body = http_status(
            self.cluster.url + path, ca_file=self.cluster.ca_file, token=self.cluster.admin_token, timeout=10
        )
        if status != 200:
            raise RuntimeError(f"GET {path}: HTTP {status}: {body[:300]!r}")
        items: list[Obj] = json.loads(body)["items"]
        return items

    def out_of_sync(self) -> list[str]:
        """What OPA does not hold yet as the API server has it (empty: in sync): every policy and data
        ConfigMap of the watched namespace loaded as it is now, with status ok, and every object of each
        --replicate resource at its current resourceVersion. Checked with the management token."""
        args = self.kopa_args
        (policy_label,), (policy_value,) = (
            flag_values(args, "policy-label"),
            flag_values(args, "policy-value"),
        )
        (data_label,), (data_value,) = flag_values(args, "data-label"), flag_values(args, "data-value")
        configmaps = self._list(f"/api/v1/namespaces/{self.namespace}/configmaps")
        want_policies: dict[str, str] = {}
        want_data: dict[str, Any] = {}
        problems = []
        for cm in configmaps:
            labels = cm["metadata"].get("labels") or {}
            name = cm["metadata"]["name"]
            is_data = labels.get(data_label) == data_value
            if not is_data and labels.get(policy_label) != policy_value:
                continue
            status = (cm["metadata"].get("annotations") or {}).get(STATUS)
            if status != '{"status":"ok"}':
                problems.append(f"configmap {self.namespace}/{name}: status {status}")
            for key, text in (cm.get("data") or {}).items():
                if is_data:
                    want_data.setdefault(name, {})[key] = json.loads(text)
                else:
                    want_policies[f"{self.namespace}/{name}/{key}"] = text
        opa = self.opa_client()
        loaded = {
            policy["id"]: policy["raw"]
            for policy in opa.get_json("/v1/policies")["result"]
            if policy["id"].startswith(f"{self.namespace}/")
        }
        if loaded != want_policies:
            problems.append(
                f"policies in OPA {sorted(loaded)} differ from the ConfigMaps' {sorted(want_policies)}"
            )
        held = opa.get_json(f"/v1/data/{self.namespace}").get("result", {})
        if held != want_data:
            problems.append(f"data.{self.namespace} in OPA differs from the data ConfigMaps")
        (root,) = flag_values(args, "replicate-path")
        for resource in flag_values(args, "replicate"):
            *group_version, plural = resource.split("/")
            prefix = "/api/" if len(group_version) == 1 else "/apis/"
            want = {
                (item["metadata"]["namespace"], item["metadata"]["name"]): item["metadata"]["resourceVersion"]
                for item in self._list(prefix + "/".join([*group_version, plural]))
            }
            copies = opa.get_json(f"/v1/data/{root}/{plural}").get("result", {})
            have = {
                (namespace, name): obj["metadata"]["resourceVersion"]
                for namespace, objects in copies.items()
                for name, obj in objects.items()
            }
            if have != want:
                problems.append(f"replicated {plural} in OPA {sorted(have)} differ from the API server's")
        return problems

    def wait_in_sync(self, timeout: float = TIMEOUT) -> None:
        """Waits until OPA holds what the API server has (see out_of_sync), as a user typing the next
        command a moment later would find it; fails with what is still missing."""
        last: list[str] = []

        def check() -> bool:
            nonlocal last
            last = self.out_of_sync()
            return not last

        try:
            wait_until(check, timeout=timeout, what="OPA in sync with the API server", process=self.kopa)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}: {'; '.join(last)}") from None


def webhook_is_loopback(webhook: Mapping[str, Any]) -> bool:
    """Every webhook of the configuration calls a 127.0.0.1 URL, and none names a Service."""
    configs = [item["clientConfig"] for item in webhook.get("webhooks", [])]
    return bool(configs) and all(
        "service" not in config and str(config.get("url", "")).startswith(f"https://{HOST}:")
        for config in configs
    )


@contextlib.contextmanager
def admission_stack(
    cluster: KubeCluster,
    work_dir: Path,
    *,
    namespace: str = NAMESPACE,
    release: str = "kopa",
    release_namespace: str | None = None,
    service_account: str = "kopa",
    namespace_selector: Mapping[str, Any] | None = None,
    values: Path = ADMISSION_DIR / "values.yaml",
) -> Iterator[AdmissionStack]:
    """The chart installed with `values` as `release` in `release_namespace` (default: `namespace`), kopa
    loading ConfigMaps from `namespace`, its pod run here, until the block ends.

    The chart's ServiceAccount `service_account` must be an identity of `cluster` (KubeCluster's
    service_accounts). `namespace_selector` is merged into the webhook's (helm merges maps: the chart's
    default, skipping namespaces labelled openpolicyagent.org/webhook=ignore, stays); tests on a shared API
    server add matchLabels that only their own namespaces carry. On exit the webhook configuration goes
    first, then kopa and OPA stop, then the chart's RBAC objects go: always, whatever happened inside.
    """
    release_namespace = release_namespace or namespace
    work_dir.mkdir(parents=True, exist_ok=True)
    port, health_port = free_port(), free_port()
    ca = TestCA(work_dir / "ca")
    cert, key = ca.issue("opa", ips=[HOST], dns=["localhost"])
    admission: Obj = {"url": f"https://{HOST}:{port}"}
    if namespace_selector is not None:
        admission["namespaceSelector"] = dict(namespace_selector)
    local = {
        # OPA's port and kopa's health port, free here; the chart listens on 0.0.0.0, LocalPod on loopback.
        "port": port,
        "generateCerts": False,
        "CA": ca.ca_file.read_text(encoding="utf-8"),
        "cert": cert.read_text(encoding="utf-8"),
        "key": key.read_text(encoding="utf-8"),
        "serviceAccount": {"name": service_account},
        "mgmt": {"namespaces": [namespace], "healthPort": health_port, "logFormat": "text"},
        "admissionController": admission,
    }
    rendered = Helm(work_dir / "helm").template(
        local, release=release, namespace=release_namespace, values_files=[values]
    )
    pod = LocalPod(rendered, work_dir / "pod", keep_ports=True)
    (webhook,) = rendered.of_kind(*WEBHOOK_KINDS)
    if not webhook_is_loopback(webhook):
        raise RuntimeError(f"refusing to create a webhook that does not call {HOST}: {webhook['webhooks']}")
    rbac = rendered.of_kind(*RBAC_KINDS)
    admin = cluster.admin_kubeconfig
    identity = service_account_user(f"{release_namespace}:{service_account}")
    kopa_kubeconfig = cluster.write_kubeconfig(
        work_dir / "kopa.kubeconfig", token=cluster.user_token(identity), name="kopa"
    )

    with contextlib.ExitStack() as cleanup:
        # Callbacks run last-registered first: the webhook goes before OPA stops, RBAC after kopa stops.
        # Each is registered before its object is created, so a failed creation leaves nothing behind.
        manifest = goyaml.dump_all(rbac)
        cleanup.callback(
            kubectl, admin, "delete", "--ignore-not-found", "--wait=false", "-f=-", stdin=manifest
        )
        kubectl(admin, "create", "-f=-", stdin=manifest)
        pod.run_init()
        token_file = pod.file("mgmt-token", "mgmt-token")
        opa = ManagedProcess("opa", [tool_path("opa"), *pod.args("opa")], work_dir / "opa.log", cwd=work_dir)
        cleanup.enter_context(opa.start())
        opa_url = f"https://{HOST}:{port}"
        opa.wait_ready(
            lambda: http_status(f"{opa_url}/health", ca_file=ca.ca_file)[0] == 200,
            timeout=TIMEOUT,
            what="healthy (GET /health)",
        )
        wait_until(
            lambda: all(
                _allowed(admin, identity, obj) for obj in rbac if obj["kind"] in ("Role", "ClusterRole")
            ),
            timeout=TIMEOUT,
            what=f"the chart's RBAC in effect for {identity}",
        )
        kopa = kopa_process([f"--kubeconfig={kopa_kubeconfig}", *pod.args("mgmt")], work_dir / "kopa.log")
        cleanup.enter_context(kopa.start())
        kopa.wait_ready(
            lambda: http_status(f"{kopa.health_url}/readyz")[0] == 200,
            timeout=TIMEOUT,
            what="ready (/readyz)",
        )
        # OPA's readiness probe: kopa's marker is in, so the chart would now send it the webhook's traffic.
        kopa.wait_ready(
            lambda: http_status(f"{opa_url}/health/ready", ca_file=ca.ca_file)[0] == 200,
            timeout=TIMEOUT,
            what="seeing OPA ready (GET /health/ready)",
        )
        kind, name = webhook["kind"].lower(), webhook["metadata"]["name"]
        cleanup.callback(kubectl, admin, "delete", kind, name, "--ignore-not-found")
        kubectl(admin, "create", "-f=-", stdin=goyaml.dump(webhook))
        yield AdmissionStack(
            cluster=cluster,
            namespace=namespace,
            release=release,
            release_namespace=release_namespace,
            opa_url=opa_url,
            ca_file=ca.ca_file,
            token_file=token_file,
            kopa_kubeconfig=kopa_kubeconfig,
            objects=rendered.objects,
            webhook=webhook,
            opa=opa,
            kopa=kopa,
        )


def _allowed(kubeconfig: Path, user: str, role: Mapping[str, Any]) -> bool:
    """Whether `user` may already do what each rule of `role` grants (the authorizer's cache lags)."""
    namespace = role["metadata"].get("namespace")
    for rule in role.get("rules", []):
        for group in rule.get("apiGroups", [""]):
            for resource in rule.get("resources", []):
                target = f"{resource}.{group}" if group else resource
                where = [f"--namespace={namespace}"] if namespace else ["--all-namespaces"]
                verb = rule["verbs"][0]
                result = run_kubectl(
                    kubeconfig, "auth", "can-i", verb, target, *where, f"--as={user}", timeout=30
                )
                if result.stdout.strip() != "yes":
                    return False
    return True


# --- the admission demo -------------------------------------------------------------------------------------


@dataclass
class Try:
    """A command the demo prints for the user to try, and the answer the demo got for it."""

    comment: str
    command: str
    rejected: bool
    output: str


@dataclass
class AdmissionDemo:
    cluster: KubeCluster
    stack: AdmissionStack
    env: dict[str, str]  # what the printed `export` lines set
    tries: list[Try]


def apply_admission_files(kubeconfig: Path, namespace: str, *names: str) -> str:
    """`kubectl apply --server-side` of files of docs/admission into `namespace`; kubectl's output."""
    files = [f"--filename={ADMISSION_DIR / name}" for name in names]
    return kubectl(kubeconfig, "apply", "--server-side", f"--namespace={namespace}", *files)


@contextlib.contextmanager
def admission_demo(work_dir: Path, out: Say = say) -> Iterator[AdmissionDemo]:
    """The admission mode's whole setup, printed with `out`, until the block ends: a fresh API server, the
    chart's OPA, kopa and webhook (admission_stack), the policy and registry list of docs/admission applied
    in namespace opa and loaded, and the two commands to try, run once to check they answer as printed."""
    out(f"Starting etcd and kube-apiserver in {work_dir} (30-60 s on a busy 2-core machine) ...")
    accounts = (*DEFAULT_SERVICE_ACCOUNTS, f"{NAMESPACE}:kopa")
    with KubeCluster(work_dir / "kube", service_accounts=accounts) as cluster:
        admin = cluster.admin_kubeconfig
        out(f"  API server at {cluster.url}")
        kubectl(admin, "create", "namespace", NAMESPACE)
        # As docs/admission-control.md advises: the webhook never checks OPA's own namespace or kube-system.
        kubectl(admin, "label", "namespace", NAMESPACE, "kube-system", "openpolicyagent.org/webhook=ignore")
        out("Rendering helm/kopa with docs/admission/values.yaml (helm template) and running its pod here:")
        with admission_stack(cluster, work_dir / "chart") as stack:
            resources = ", ".join(flag_values(stack.kopa_args, "replicate"))
            clients = stack.webhook["webhooks"][0]
            out(f"  OPA at {stack.opa_url}: TLS (a throwaway CA), token authentication, the chart's authz")
            out(
                f"  kopa as ServiceAccount {NAMESPACE}/kopa with the chart's RBAC, loading ConfigMaps from "
                f"namespace {NAMESPACE} and replicating {resources} (log: {stack.kopa.log_path})"
            )
            out(
                f"  {stack.webhook['kind']} {stack.webhook_name}: the API server sends Pods and Ingresses "
                f"to {clients['clientConfig']['url']} (failurePolicy {clients['failurePolicy']})"
            )
            out("Applying the admission policy and the allowed registries (docs/admission):")
            applied = apply_admission_files(admin, NAMESPACE, "policy.yaml", "registries.yaml")
            for line in applied.splitlines():
                out(f"  {line}")
            stack.wait_in_sync()
            out('kopa loaded both into OPA; their status annotations say {"status":"ok"}.')
            env = {
                "PATH": f"{tool_path('kubectl').parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                "KUBECONFIG": str(admin),
                "OPA_URL": stack.opa_url,
                "OPA_CACERT": str(stack.ca_file),
                "OPA_TOKEN_FILE": str(stack.token_file),
            }
            tries = [
                Try(
                    "rejected: nginx:1.27 is docker.io/library/nginx:1.27, not on the list",
                    REJECTED,
                    True,
                    "",
                ),
                Try("admitted: registry.k8s.io is on the list", ADMITTED, False, ""),
            ]
            for attempt in tries:
                code, attempt.output = shell(attempt.command, env)
                denied = code != 0 and "denied the request" in attempt.output
                admitted = code == 0 and "created (server dry run)" in attempt.output
                if not (denied if attempt.rejected else admitted):
                    raise RuntimeError(f"`{attempt.command}` answered (exit code {code}): {attempt.output}")
            out("")
            out("Try it in another terminal. The API server asks OPA about every Pod and Ingress;")
            out("--dry-run=server runs admission, the webhook included, and stores nothing:")
            out("")
            out(f'  export PATH={shlex.quote(str(tool_path("kubectl").parent))}:"$PATH"')
            out(f"  export KUBECONFIG={shlex.quote(env['KUBECONFIG'])}")
            out(
                f"  export OPA_URL={env['OPA_URL']} OPA_CACERT={shlex.quote(env['OPA_CACERT'])} "
                f"OPA_TOKEN_FILE={shlex.quote(env['OPA_TOKEN_FILE'])}"
            )
            for attempt in tries:
                out("")
                out(f"  # {attempt.comment}")
                out(f"  $ {attempt.command}")
                for line in attempt.output.rstrip("\n").splitlines():
                    out(f"  {line}")
            out("")
            out("docs/admission-control.md goes on from here: Ingress hosts, changing the list, OPA's locks.")
            yield AdmissionDemo(cluster=cluster, stack=stack, env=env, tries=tries)


def run_admission(work_dir: Path) -> None:
    with admission_demo(work_dir) as demo:
        say()
        say("Following kopa's log; press Ctrl-C to stop everything.")
        follow(demo.stack.kopa)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="make demo",
        description="etcd, kube-apiserver, OPA and kopa on 127.0.0.1, in the foreground; Ctrl-C stops them.",
    )
    parser.add_argument(
        "--work-dir", type=Path, help="where the servers keep their files (default: a temp dir)"
    )
    parser.add_argument(
        "--admission",
        action="store_true",
        help="OPA as the API server's admission webhook, as the Helm chart sets it up "
        "(docs/admission-control.md)",
    )
    args = parser.parse_args()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="kopa-demo-"))
    try:
        if args.admission:
            run_admission(work_dir)
        else:
            run(work_dir)
    except KeyboardInterrupt:
        say("\nStopped; everything is torn down.")
    except (MissingBinary, ServerStartError, RuntimeError, TimeoutError) as exc:
        say(f"demo failed: {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
