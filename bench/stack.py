"""The local real stack the benchmarks run on: etcd + kube-apiserver, one OPA, and kopa as a process."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import KubeApi, Opa
from bench.dataset import IGNORED_NAMESPACES, POLICY_NAMESPACE
from devstack.kopa import KopaProcess, kopa_process
from devstack.kube import KubeCluster
from devstack.opa import OpaServer


@dataclass
class Stack:
    work: Path
    profile_dir: Path | None = None  # when set, kopa runs under py-spy and writes a flame graph per run
    kube: KubeCluster = field(init=False)
    opa: OpaServer = field(init=False)
    token_file: Path = field(init=False)
    _kopas: list[KopaProcess] = field(default_factory=list)

    def start(self) -> None:
        self.kube = KubeCluster(self.work / "kube", extra_apiserver_args=["--max-requests-inflight=800"])
        self.kube.start()
        self.token_file = self.work / "admin-token"
        self.token_file.write_text(self.kube.admin_token)
        self.token_file.chmod(0o600)
        self.opa = OpaServer.plain(self.work / "opa")
        self.opa.start()

    def stop(self) -> None:
        for kopa in self._kopas:
            self.stop_kopa(kopa)
        self.opa.stop()
        self.kube.stop()

    def api(self, connections: int = 32) -> KubeApi:
        return KubeApi(self.kube.url, self.kube.admin_token, self.kube.ca_file, connections)

    def opa_client(self) -> Opa:
        return Opa(self.opa.url)

    def fresh_opa(self) -> None:
        """An empty OPA on the same port (a new process; as after a restart)."""
        self.opa.kill()
        self.opa.start()

    def kopa(
        self, name: str, *extra: str, namespaces: str = POLICY_NAMESPACE, replicate: bool = True
    ) -> KopaProcess:
        """kopa replicating v1/configmaps (all bench namespaces, unless not `replicate`) and loading
        policies and data from `namespaces` (bench-policies)."""
        replication = [
            "--replicate=v1/configmaps",
            f"--replicate-ignore-namespaces={','.join(IGNORED_NAMESPACES)}",
        ]
        args: list[str] = [
            f"--kubeconfig={self.kube.admin_kubeconfig}",
            f"--opa-url={self.opa.api_url}",
            f"--namespaces={namespaces}",
            *(replication if replicate else []),
            "--log-level=info",
            *extra,
        ]
        process = kopa_process(args, self.work / f"kopa-{name}.log")
        spy = py_spy()
        if self.profile_dir is not None and spy:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            # Collapsed stacks (flamegraph.pl, speedscope, inferno read them); py-spy writes them on SIGINT.
            out = self.profile_dir / f"kopa-{name}.txt"
            process.args = [spy, "record", "-r", "250", "-f", "raw", "-o", str(out), "--", *process.args]
        self._kopas.append(process)
        return process

    def stop_kopa(self, process: KopaProcess) -> None:
        """Stops kopa; under py-spy, first has py-spy write its profile (SIGINT), then stops kopa itself."""
        pid = process.pid
        if self.profile_dir is not None and pid is not None:
            children = [
                int(child)
                for task in Path(f"/proc/{pid}/task").iterdir()
                for child in (task / "children").read_text().split()
            ]
            os.kill(pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(30)
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGTERM)
        process.stop()

    def floor(self, field_selector: str, lean: bool = False) -> subprocess.Popen[bytes]:
        command: Sequence[str] = [
            sys.executable,
            "-m",
            "bench.floor",
            f"--server={self.kube.url}",
            f"--token-file={self.token_file}",
            f"--ca-file={self.kube.ca_file}",
            f"--opa-url={self.opa.url}",
            f"--field-selector={field_selector}",
            *(["--lean"] if lean else []),
        ]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def py_spy() -> str | None:
    """py-spy from PATH or from the interpreter's own bin directory (the venv, when not activated)."""
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
