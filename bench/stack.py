"""The local real stack the benchmarks run on: etcd + kube-apiserver, one OPA, and kopa as a process.

Go kube-mgmt, when its binary is there, runs on the same stack with the same flags, one sidecar at a time
against a fresh OPA, for the side-by-side figures. The bench finds it through `--kube-mgmt PATH`, the
environment variable KOPA_BENCH_KUBE_MGMT, or the tools cache (`scripts/build-servers.sh kube-mgmt`);
without it the bench says so and runs kopa alone.
"""

from __future__ import annotations

import compileall
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
from devstack.binaries import BUILD_HINT, MissingBinary, repo_root, tool_path
from devstack.kopa import KopaProcess, kopa_process
from devstack.kube import KubeCluster
from devstack.opa import OpaServer
from devstack.processes import ManagedProcess

KOPA = "kopa"
KUBE_MGMT = "kube-mgmt"


def find_kube_mgmt(explicit: str | None) -> tuple[Path | None, str]:
    """kube-mgmt's binary (option, then KOPA_BENCH_KUBE_MGMT, then the tools cache), and where from or why
    not. Never looked for beside the repository: a user's `make bench` must not need it."""
    given = explicit or os.environ.get("KOPA_BENCH_KUBE_MGMT")
    if given:
        path = Path(given).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return path, f"{path} (given)"
        return None, f"{path} (given) is not an executable file"
    try:
        path = tool_path(KUBE_MGMT)
    except MissingBinary as exc:
        return None, f"{exc.message.removesuffix(BUILD_HINT)}`scripts/build-servers.sh kube-mgmt` builds it"
    return path, f"{path} (tools cache)"


@dataclass
class Stack:
    work: Path
    profile_dir: Path | None = None  # when set, kopa runs under py-spy and writes a flame graph per run
    kube_mgmt: Path | None = None  # Go kube-mgmt's binary: when set, the side-by-side phases run it too
    kube: KubeCluster = field(init=False)
    opa: OpaServer = field(init=False)
    token_file: Path = field(init=False)
    _kopas: list[KopaProcess] = field(default_factory=list)
    _others: list[ManagedProcess] = field(default_factory=list)

    @property
    def sides(self) -> tuple[str, ...]:
        """The sidecars the side-by-side phases run: kopa, and kube-mgmt when its binary is there."""
        return (KOPA, KUBE_MGMT) if self.kube_mgmt is not None else (KOPA,)

    def start(self) -> None:
        # kopa's modules byte-compiled, as the image ships them (its Dockerfile runs compileall): where
        # PYTHONDONTWRITEBYTECODE is set, every kopa start would otherwise compile them from source first.
        compileall.compile_dir(repo_root() / "app", quiet=1)
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
        for other in self._others:
            other.stop()
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

    def flags(
        self,
        namespaces: str = POLICY_NAMESPACE,
        replicate: bool = True,
        *,
        resource: str = "v1/configmaps",
        opa_url: str | None = None,
    ) -> list[str]:
        """The flags kopa and kube-mgmt both get: replicating `resource` (v1/configmaps; all bench namespaces,
        unless not `replicate`), loading policies and data from `namespaces` (bench-policies), writing into
        the stack's OPA unless `opa_url` names another."""
        replication = [
            f"--replicate={resource}",
            f"--replicate-ignore-namespaces={','.join(IGNORED_NAMESPACES)}",
        ]
        return [
            f"--kubeconfig={self.kube.admin_kubeconfig}",
            f"--opa-url={opa_url or self.opa.api_url}",
            f"--namespaces={namespaces}",
            *(replication if replicate else []),
            "--log-level=info",
        ]

    def sidecar(
        self,
        side: str,
        name: str,
        namespaces: str = POLICY_NAMESPACE,
        replicate: bool = True,
        *,
        resource: str = "v1/configmaps",
        opa_url: str | None = None,
    ) -> ManagedProcess:
        """kopa (side "kopa") or Go kube-mgmt (side "kube-mgmt"), not yet started, with the same flags."""
        if side == KOPA:
            return self.kopa(
                name, namespaces=namespaces, replicate=replicate, resource=resource, opa_url=opa_url
            )
        assert self.kube_mgmt is not None, "kube-mgmt is not there"
        process = ManagedProcess(
            KUBE_MGMT,
            [self.kube_mgmt, *self.flags(namespaces, replicate, resource=resource, opa_url=opa_url)],
            self.work / f"kube-mgmt-{name}.log",
        )
        self._others.append(process)
        return process

    def stop_sidecar(self, process: ManagedProcess) -> None:
        if isinstance(process, KopaProcess):
            self.stop_kopa(process)
        else:
            process.stop()

    def kopa(
        self,
        name: str,
        *extra: str,
        namespaces: str = POLICY_NAMESPACE,
        replicate: bool = True,
        resource: str = "v1/configmaps",
        opa_url: str | None = None,
    ) -> KopaProcess:
        """kopa with the common flags (see `flags`) and `extra`."""
        args: list[str] = [
            *self.flags(namespaces, replicate, resource=resource, opa_url=opa_url),
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
