"""A real Kubernetes control plane on loopback: etcd plus kube-apiserver, nothing else.

kopa's job is to watch the API server, so the tests talk to a real one: real watches, resourceVersions,
RBAC and errors. There is no controller-manager, scheduler or kubelet, so pods never run, nothing is
garbage-collected and deleted namespaces stay Terminating.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from app.http1 import url_host
from devstack import goyaml
from devstack.binaries import tool_path
from devstack.certs import TestCA, run_openssl
from devstack.processes import HOST, ManagedProcess, free_port, http_status

__all__ = [
    "ADMIN",
    "DEFAULT_SERVICE_ACCOUNTS",
    "KOPA_USER",
    "KubeCluster",
    "api_client",
    "service_account_user",
]

ADMIN = "admin"
# ServiceAccount-style identities with static tokens: tests bind RBAC to them to act as kopa would.
DEFAULT_SERVICE_ACCOUNTS: tuple[str, ...] = ("kopa-system:kopa", "kopa-system:restricted")


def service_account_user(ns_and_name: str) -> str:
    """'ns:name' -> 'system:serviceaccount:ns:name', the username the API server gives a ServiceAccount."""
    namespace, _, name = ns_and_name.partition(":")
    if not namespace or not name:
        raise ValueError(f"service account must be 'namespace:name', got {ns_and_name!r}")
    return f"system:serviceaccount:{namespace}:{name}"


# The identity kopa runs as in the chart; its token is KubeCluster.tokens[KOPA_USER].
KOPA_USER = service_account_user("kopa-system:kopa")


@contextlib.contextmanager
def api_client(kubeconfig: Path | str) -> Iterator[k8s_client.ApiClient]:
    """A synchronous ApiClient configured from a kubeconfig file (as a user would), closed on exit."""
    api: k8s_client.ApiClient = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(kubeconfig)
    )
    try:
        yield api
    finally:
        api.close()  # type: ignore[no-untyped-call]


class KubeCluster:
    """etcd + kube-apiserver in `work_dir` (a fresh temp dir if None), each on a free loopback port.

    Use as a context manager, or call start() and stop(). Credentials are static bearer tokens:
    `admin_token` (group system:masters) and one per identity in `tokens`; and client certificates from
    issue_client_certificate.
    """

    def __init__(
        self,
        work_dir: Path | str | None = None,
        *,
        service_accounts: Iterable[str] = DEFAULT_SERVICE_ACCOUNTS,
        users: Mapping[str, Sequence[str]] | None = None,
        start_timeout: float = 90.0,
        extra_apiserver_args: Sequence[str] = (),
        host: str = HOST,
    ) -> None:
        """`service_accounts` are 'namespace:name' pairs; `users` maps extra usernames to their groups;
        `host` is the loopback address the API server listens on (etcd stays on 127.0.0.1)."""
        # Looked up first so a missing binary fails here, before any directory or process is made.
        self._etcd_bin = tool_path("etcd")
        self._apiserver_bin = tool_path("kube-apiserver")
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="kopa-kube-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout
        self.extra_apiserver_args = list(extra_apiserver_args)

        identities: dict[str, list[str]] = {ADMIN: ["system:masters"]}
        for sa in service_accounts:
            namespace = sa.partition(":")[0]
            identities[service_account_user(sa)] = [
                "system:serviceaccounts",
                f"system:serviceaccounts:{namespace}",
            ]
        for user, groups in (users or {}).items():
            identities[user] = list(groups)
        self.groups: dict[str, list[str]] = identities
        self.tokens: dict[str, str] = {user: secrets.token_urlsafe(24) for user in identities}
        self.admin_token = self.tokens[ADMIN]

        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        self.port = free_port()
        self.etcd_url = f"http://{HOST}:{self.etcd_port}"
        self.host = host
        self.url = f"https://{url_host(host)}:{self.port}"
        self.cert_dir = self.work_dir / "apiserver-certs"
        self.ca_file = self.cert_dir / "apiserver.crt"
        self.admin_kubeconfig = self.work_dir / "admin.kubeconfig"
        # The CA of client certificates the API server accepts (issue_client_certificate).
        self.client_ca_dir = self.work_dir / "client-ca"
        self.apiserver_start_seconds: float | None = None

        self.etcd = ManagedProcess("etcd", self._etcd_args(), self.work_dir / "etcd.log")
        self.apiserver = ManagedProcess(
            "kube-apiserver", [], self.work_dir / "kube-apiserver.log", stop_timeout=20.0
        )

    # lifecycle

    def start(self) -> Self:
        """Starts etcd, then kube-apiserver, and returns once /readyz says the API server is ready."""
        try:
            self._write_files()
            self.etcd.start()
            self.etcd.wait_ready(self._etcd_healthy, timeout=30.0, what="healthy (GET /health)")
            self.start_apiserver()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stops kube-apiserver, then etcd. Idempotent; etcd is stopped even if the API server stop fails."""
        try:
            self.apiserver.stop()
        finally:
            self.etcd.stop()

    def start_apiserver(self) -> None:
        """Starts kube-apiserver (same port, same etcd) and waits for /readyz, up to start_timeout.

        extra_apiserver_args is read on every start, so a test may change it before a restart.
        """
        self.apiserver.args = [str(arg) for arg in self._apiserver_args()]
        started = time.monotonic()
        self.apiserver.start()
        try:
            self.apiserver.wait_ready(
                self._apiserver_ready, timeout=self.start_timeout, what="ready (/readyz)"
            )
        except BaseException:
            self.apiserver.stop()
            raise
        self.apiserver_start_seconds = time.monotonic() - started
        self.write_kubeconfig(self.admin_kubeconfig)

    def stop_apiserver(self) -> None:
        """Stops only the API server (etcd keeps the data): an outage for clients to live through."""
        self.apiserver.stop()

    def restart_apiserver(self) -> None:
        """Stops and starts kube-apiserver on the same port against the same etcd.

        Its watch cache starts afresh at etcd's current revision, so clients' old resourceVersions expire.
        """
        self.stop_apiserver()
        self.start_apiserver()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # credentials

    def user_token(self, user: str) -> str:
        """The static token of `user` (a username or 'namespace:name' of a ServiceAccount)."""
        if user in self.tokens:
            return self.tokens[user]
        return self.tokens[service_account_user(user)]

    def issue_client_certificate(self, user: str, groups: Sequence[str] = ()) -> tuple[Path, Path]:
        """A client certificate (cert, key) that the API server reads as `user` in `groups` (CN and O)."""
        return TestCA(self.client_ca_dir).issue(user, ips=(), dns=(), organizations=groups)

    def write_kubeconfig(
        self,
        path: Path | str,
        token: str | None = None,
        namespace: str | None = None,
        *,
        name: str = "kopa-test",
    ) -> Path:
        """Writes a self-contained kubeconfig (CA inline) for `token` (admin if None) and returns its path."""
        path = Path(path)
        context: dict[str, Any] = {"cluster": name, "user": name}
        if namespace:
            context["namespace"] = namespace
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": name,
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": base64.b64encode(self.ca_file.read_bytes()).decode(),
                    },
                }
            ],
            "users": [{"name": name, "user": {"token": token or self.admin_token}}],
            "contexts": [{"name": name, "context": context}],
            "current-context": name,
            "preferences": {},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(goyaml.dump(config, sort_keys=False), encoding="utf-8")
        path.chmod(0o600)
        return path

    # internals

    def _write_files(self) -> None:
        """Token file, client CA, and the ServiceAccount signing key pair the API server insists on."""
        self.cert_dir.mkdir(parents=True, exist_ok=True)
        TestCA(self.client_ca_dir, common_name="kopa test client CA")
        rows = []
        for uid, (user, groups) in enumerate(self.groups.items(), start=1):
            rows.append(f'{self.tokens[user]},{user},uid-{uid},"{",".join(groups)}"')
        self._token_file.write_text("\n".join(rows) + "\n", encoding="utf-8")
        self._token_file.chmod(0o600)
        if not self._sa_key.exists():
            run_openssl("genrsa", "-out", str(self._sa_key), "2048", cwd=self.work_dir)
            run_openssl(
                "rsa", "-in", str(self._sa_key), "-pubout", "-out", str(self._sa_pub), cwd=self.work_dir
            )

    @property
    def _token_file(self) -> Path:
        return self.work_dir / "tokens.csv"

    @property
    def _sa_key(self) -> Path:
        return self.work_dir / "sa.key"

    @property
    def _sa_pub(self) -> Path:
        return self.work_dir / "sa.pub"

    def _etcd_args(self) -> list[str | Path]:
        peer = f"http://{HOST}:{self.etcd_peer_port}"
        return [
            self._etcd_bin,
            "--name=default",
            f"--data-dir={self.work_dir / 'etcd-data'}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]

    def _apiserver_args(self) -> list[str | Path]:
        return [
            self._apiserver_bin,
            f"--etcd-servers={self.etcd_url}",
            f"--bind-address={self.host}",
            f"--advertise-address={self.host}",
            f"--secure-port={self.port}",
            f"--cert-dir={self.cert_dir}",
            f"--token-auth-file={self._token_file}",
            f"--client-ca-file={self.client_ca_dir / 'ca.crt'}",
            "--authorization-mode=RBAC",
            "--service-cluster-ip-range=10.0.0.0/16",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={self._sa_pub}",
            f"--service-account-signing-key-file={self._sa_key}",
            "--disable-admission-plugins=ServiceAccount",
            # The default reconciler writes the `kubernetes` Endpoints with the advertise address, which
            # validation rejects for loopback, logging an error every 10 s. Nothing here needs them.
            "--endpoint-reconciler-type=none",
            # Open watches (kopa's) would otherwise hold a stop for the full grace period before SIGKILL.
            "--shutdown-watch-termination-grace-period=2s",
            *self.extra_apiserver_args,
        ]

    def _etcd_healthy(self) -> bool:
        status, body = http_status(f"{self.etcd_url}/health")
        return status == 200 and b'"true"' in body

    def _apiserver_ready(self) -> bool:
        if not self.ca_file.exists():
            return False
        status, _ = http_status(f"{self.url}/readyz", ca_file=self.ca_file, token=self.admin_token)
        return status == 200
