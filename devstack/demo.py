"""`make demo`: a local etcd + kube-apiserver + OPA + kopa on loopback, in the foreground.

Applies the hello-world policy ConfigMap from kube-mgmt's guide with kubectl, waits until OPA answers it,
prints the commands to try, then follows kopa's log until Ctrl-C, which tears everything down.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devstack.binaries import MissingBinary, tool_path
from devstack.kopa import kopa_process
from devstack.kube import KubeCluster
from devstack.opa import OpaServer
from devstack.processes import ManagedProcess, ServerStartError, wait_until

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


def say(text: str = "") -> None:
    print(text, flush=True)


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [str(tool_path("kubectl")), f"--kubeconfig={kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


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


def main() -> None:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument(
        "--work-dir", type=Path, help="where the servers keep their files (default: a temp dir)"
    )
    args = parser.parse_args()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="kopa-demo-"))
    try:
        run(work_dir)
    except KeyboardInterrupt:
        say("\nStopped; everything is torn down.")
    except (MissingBinary, ServerStartError, RuntimeError, TimeoutError) as exc:
        say(f"demo failed: {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
