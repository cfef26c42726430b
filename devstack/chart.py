"""kopa's Helm chart, rendered with the real helm, and its pod run on this machine.

There is no kubelet here, so `LocalPod` does a kubelet's part for one rendered pod: each volume becomes a
local directory filled from the rendered objects (ConfigMaps, Secrets) or left empty (emptyDir), each
container's arguments and environment get their mount paths rewritten to those directories and their
ports to loopback ports (free ones, or the chart's own with `keep_ports`), and the containers run as local
processes: the init container's own script under /bin/sh, OPA from the binary of scripts/versions.env with
the chart's arguments, kopa from this checkout with the chart's arguments. Nothing else is changed, so what
runs is what the chart says.

The admission demo (devstack/demo.py) and the chart's tests (tests/integration/chart.py) both use this.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from devstack import goyaml
from devstack.binaries import read_versions, repo_root, tool_path
from devstack.processes import HOST, ManagedProcess, free_port

__all__ = [
    "CHART",
    "IMAGE_VALUES",
    "RBAC_KINDS",
    "ChartError",
    "Helm",
    "HelmError",
    "LocalPod",
    "Obj",
    "Rendered",
    "container",
    "flag_values",
    "opa_image_tag",
    "parse_quantity",
    "rbac_objects",
]

CHART = repo_root() / "helm" / "kopa"

Obj = dict[str, Any]

# kopa's image is a required value (it is not published anywhere): renders here name a stand-in, as a user
# names the image they built and pushed. Nothing pulls it: LocalPod runs kopa from this checkout.
IMAGE_VALUES: Mapping[str, Any] = {
    "mgmt": {"image": {"repository": "registry.example.com/kopa", "tag": "0.1.0"}}
}

RBAC_KINDS = ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")


class ChartError(RuntimeError):
    """The render or the pod is not what this module can use (a missing object, an unsupported volume)."""


def opa_image_tag() -> str:
    """The OPA version kopa is tested against, as an image tag: OPA_VERSION without the leading v."""
    return read_versions()["OPA_VERSION"].removeprefix("v")


def flag_values(args: Sequence[str], flag: str) -> list[str]:
    """Values of `--flag=value` arguments, in order."""
    prefix = f"--{flag}="
    return [arg.removeprefix(prefix) for arg in args if arg.startswith(prefix)]


# --- helm --------------------------------------------------------------------------------------------------


class HelmError(RuntimeError):
    """helm exited non-zero; the message carries its output."""

    def __init__(self, args: Sequence[str], result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(
            f"helm {' '.join(args)} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
        self.result = result


class Helm:
    """The helm binary of scripts/versions.env with its own cache, config and data directories under
    `home` (nothing of the user's), talking to the cluster of `kubeconfig` when one is given."""

    def __init__(self, home: Path, kubeconfig: Path | None = None) -> None:
        self.binary = tool_path("helm")
        self.home = home
        self.kubeconfig = kubeconfig
        self.env = {
            **os.environ,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }
        self.env.pop("KUBECONFIG", None)

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Runs helm with `args` (plus --kubeconfig when set); raises HelmError on failure if `check`."""
        argv = [str(self.binary), *args]
        if self.kubeconfig is not None:
            argv.append(f"--kubeconfig={self.kubeconfig}")
        result = subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise HelmError(args, result)
        return result

    def values_file(self, values: Mapping[str, Any], name: str = "values") -> Path:
        """Writes `values` as a YAML file for -f (no --set quoting to get wrong)."""
        self.home.mkdir(parents=True, exist_ok=True)
        existing = len(list(self.home.glob(f"{name}-*.yaml")))
        path = self.home / f"{name}-{existing}.yaml"
        path.write_text(goyaml.dump(dict(values), sort_keys=False), encoding="utf-8")
        return path

    def image_values(self) -> Path:
        """A values file naming kopa's image (IMAGE_VALUES), the one value the chart requires."""
        return self.values_file(IMAGE_VALUES, "image")

    def template(
        self,
        values: Mapping[str, Any] | None = None,
        *,
        release: str = "kopa",
        namespace: str = "kopa-system",
        values_files: Sequence[Path] = (),
        extra: Sequence[str] = (),
        image: bool = True,
    ) -> Rendered:
        """`helm template` of the chart with IMAGE_VALUES (unless not `image`), `values_files`, then `values`
        (later ones win); the objects it renders."""
        result = self.run(
            "template",
            release,
            str(CHART),
            f"--namespace={namespace}",
            *([f"--values={self.image_values()}"] if image else []),
            *(f"--values={path}" for path in values_files),
            f"--values={self.values_file(values or {})}",
            *extra,
        )
        return Rendered.parse(result.stdout, namespace)


# --- rendered objects --------------------------------------------------------------------------------------


@dataclass
class Rendered:
    """The objects a render produced (YAML documents, in order), and the release's namespace."""

    objects: list[Obj]
    namespace: str
    text: str = ""

    @classmethod
    def parse(cls, text: str, namespace: str) -> Rendered:
        objects = [doc for doc in yaml.safe_load_all(text) if doc]
        return cls(objects, namespace, text)

    def kinds(self) -> list[str]:
        return sorted(obj["kind"] for obj in self.objects)

    def of_kind(self, *kinds: str) -> list[Obj]:
        """The objects of any of `kinds`, in render order."""
        return [obj for obj in self.objects if obj["kind"] in kinds]

    def one(self, kind: str, name: str | None = None) -> Obj:
        """The one object of `kind` (and `name`); raises ChartError if there is not exactly one."""
        found = [obj for obj in self.of_kind(kind) if name is None or obj["metadata"]["name"] == name]
        if len(found) != 1:
            raise ChartError(f"expected one {kind} {name or ''}, found {[o['metadata'] for o in found]}")
        return found[0]

    def find(self, kind: str, name: str) -> Obj | None:
        for obj in self.of_kind(kind):
            if obj["metadata"]["name"] == name:
                return obj
        return None

    @property
    def deployment(self) -> Obj:
        """The OPA pods' Deployment (kopa's own, in bundle mode, is `mgmt_deployment`)."""
        found = [d for d in self.of_kind("Deployment") if d not in self._mgmt_deployments()]
        if len(found) != 1:
            raise ChartError(f"expected one OPA Deployment, found {[d['metadata'] for d in found]}")
        return found[0]

    def _mgmt_deployments(self) -> list[Obj]:
        return [
            d
            for d in self.of_kind("Deployment")
            if d["metadata"]["labels"].get("app.kubernetes.io/component") == "mgmt"
        ]

    @property
    def mgmt_deployment(self) -> Obj:
        """Bundle mode: kopa's own Deployment."""
        (found,) = self._mgmt_deployments()
        return found

    @property
    def pod_spec(self) -> Obj:
        spec: Obj = self.deployment["spec"]["template"]["spec"]
        return spec

    def containers(self) -> list[Obj]:
        """Every container of the pod, init containers first."""
        return [*self.pod_spec.get("initContainers", []), *self.pod_spec["containers"]]

    def container(self, name: str) -> Obj:
        return container(self.pod_spec, name)

    def has_container(self, name: str) -> bool:
        return any(c["name"] == name for c in self.containers())

    def args(self, name: str) -> list[str]:
        return [str(arg) for arg in self.container(name).get("args", [])]

    def flag_values(self, container_name: str, flag: str) -> list[str]:
        """Values of `--flag=value` arguments of a container, in order."""
        return flag_values(self.args(container_name), flag)

    def secret_data(self, name: str) -> dict[str, bytes]:
        """A rendered Secret's data and stringData, decoded."""
        secret = self.one("Secret", name)
        decoded = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
        decoded.update({k: str(v).encode() for k, v in (secret.get("stringData") or {}).items()})
        return decoded


_SUFFIXES = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "": 1,
}  # fmt: skip


def parse_quantity(quantity: str) -> int:
    """A Kubernetes quantity ("512Mi", "1G", "2") as a whole number, rounded up as the kubelet does."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T|m)?", quantity.strip())
    if match is None:
        raise ChartError(f"not a quantity LocalPod understands: {quantity!r}")
    number, suffix = float(match.group(1)), match.group(2) or ""
    if suffix == "m":
        return -(-int(number) // 1000)
    return int(-(-number * _SUFFIXES[suffix] // 1))


def container(pod_spec: Mapping[str, Any], name: str) -> Obj:
    for item in [*pod_spec.get("initContainers", []), *pod_spec["containers"]]:
        if item["name"] == name:
            found: Obj = item
            return found
    raise ChartError(f"no container {name!r} in the pod")


def rbac_objects(rendered: Rendered) -> list[Obj]:
    return rendered.of_kind(*RBAC_KINDS)


# --- the pod, run here -------------------------------------------------------------------------------------

_HOST_PORT = re.compile(r"\b(?:0\.0\.0\.0|127\.0\.0\.1|localhost):(\d+)\b")


@dataclass
class LocalPod:
    """The rendered pod's volumes as directories under `root`, and its container ports as local ports.

    `secrets` supplies Secrets the chart refers to but does not render (e.g. an existing token Secret).
    Each container port gets a free local port, or with `keep_ports` stays as it is (the values must then
    give free ones); either way its addresses are rewritten to 127.0.0.1.
    """

    rendered: Rendered
    root: Path
    secrets: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    keep_ports: bool = False
    volumes: dict[str, Path] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for volume in self.rendered.pod_spec.get("volumes", []):
            self.volumes[volume["name"]] = self._materialize(volume)
        for item in self.rendered.containers():
            for port in item.get("ports", []):
                container_port = int(port["containerPort"])
                self.ports[container_port] = container_port if self.keep_ports else free_port()

    def _materialize(self, volume: Mapping[str, Any]) -> Path:
        path = self.root / "volumes" / str(volume["name"])
        path.mkdir(parents=True, exist_ok=True)
        files: dict[str, bytes]
        if "emptyDir" in volume:
            return path
        if "projected" in volume and all(
            "serviceAccountToken" in src or "configMap" in src or "downwardAPI" in src
            for src in volume["projected"]["sources"]
        ):
            # The kubelet's API credentials: left empty here, where kopa is given a kubeconfig instead.
            return path
        if "configMap" in volume:
            source = self.rendered.one("ConfigMap", volume["configMap"]["name"])
            files = {k: str(v).encode() for k, v in (source.get("data") or {}).items()}
            items = volume["configMap"].get("items")
        elif "secret" in volume:
            name = volume["secret"]["secretName"]
            if name in self.secrets:
                files = {k: v.encode() for k, v in self.secrets[name].items()}
            else:
                files = self.rendered.secret_data(name)
            items = volume["secret"].get("items")
        else:
            raise ChartError(f"LocalPod cannot make volume {volume['name']}: {sorted(volume)}")
        if items:
            files = {item["path"]: files[item["key"]] for item in items}
        for key, content in files.items():
            target = path / key
            target.write_bytes(content)
            target.chmod(0o440)
        return path

    # rewriting

    def mounts(self, container_name: str) -> list[tuple[str, Path]]:
        """(mountPath, local directory) of a container, longest mount path first."""
        pairs = [
            (m["mountPath"], self.volumes[m["name"]])
            for m in self.rendered.container(container_name).get("volumeMounts", [])
        ]
        return sorted(pairs, key=lambda pair: len(pair[0]), reverse=True)

    def localize(self, container_name: str, text: str) -> str:
        """One argument or environment value as it must read here: mount paths (a whole argument, or the
        value after `=`) become local directories; listen and connect addresses become local ports."""
        mounts = dict(self.mounts(container_name))
        if mounts:
            # One pass, longest mount path first, so a rewritten path is never rewritten again.
            alternatives = "|".join(re.escape(path) for path in mounts)
            pattern = re.compile(rf"(^|=)({alternatives})(?=/|$)")
            text = pattern.sub(lambda m: m.group(1) + str(mounts[m.group(2)]), text)

        def port(match: re.Match[str]) -> str:
            container_port = int(match.group(1))
            if container_port not in self.ports:
                return match.group(0)
            return f"{HOST}:{self.ports[container_port]}"

        return _HOST_PORT.sub(port, text)

    def args(self, container_name: str) -> list[str]:
        return [self.localize(container_name, arg) for arg in self.rendered.args(container_name)]

    def env(self, container_name: str) -> dict[str, str]:
        """The container's environment: literal values, and a resourceFieldRef to a limit (in bytes or
        cores, as the kubelet gives it with divisor 1), which is left out when no limit is set (the kubelet
        would give the node's capacity)."""
        values = {}
        for var in self.rendered.container(container_name).get("env", []):
            if "value" in var:
                values[var["name"]] = self.localize(container_name, str(var["value"]))
                continue
            ref = var.get("valueFrom", {}).get("resourceFieldRef")
            if ref is None or str(ref.get("divisor", "1")) != "1":
                raise ChartError(f"LocalPod supports literal values and resourceFieldRef only, not {var}")
            owner = self.rendered.container(ref.get("containerName", container_name))
            kind, _, resource = str(ref["resource"]).partition(".")
            quantity = owner.get("resources", {}).get(kind, {}).get(resource)
            if quantity is not None:
                values[var["name"]] = str(parse_quantity(str(quantity)))
        return values

    def port(self, container_port: int) -> int:
        return self.ports[container_port]

    # running

    def run_init(self) -> subprocess.CompletedProcess[str]:
        """Runs the init container's command (its own script) with its environment; raises on error."""
        spec = self.rendered.container("init")
        command = [self.localize("init", str(part)) for part in spec["command"]]
        if command[:2] != ["/bin/sh", "-c"]:
            raise ChartError(f"the init container's command is not a /bin/sh -c script: {command}")
        result = subprocess.run(
            command,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self.env("init")},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise ChartError(f"init container failed:\n{result.stdout}\n{result.stderr}")
        return result

    def opa_process(self) -> ManagedProcess:
        """OPA as the chart runs it (not started)."""
        spec = self.rendered.container("opa")
        if spec["image"] != f"openpolicyagent/opa:{opa_image_tag()}":
            raise ChartError(f"the chart runs OPA {spec['image']}, not the tested {opa_image_tag()}")
        return ManagedProcess(
            "opa",
            [tool_path("opa"), *self.args("opa")],
            self.root / "opa.log",
            env=self.env("opa"),
            cwd=self.root,
        )

    def opa_url(self) -> str:
        """OPA's API on this machine (scheme and port from OPA's own arguments), without /v1."""
        scheme = "https" if self.rendered.flag_values("opa", "tls-cert-file") else "http"
        (addr,) = self.rendered.flag_values("opa", "addr")
        return f"{scheme}://{HOST}:{self.ports[int(addr.rsplit(':', 1)[1])]}"

    @property
    def has_kopa(self) -> bool:
        return self.rendered.has_container("mgmt")

    def file(self, volume: str, name: str) -> Path:
        return self.volumes[volume] / name

    def token(self) -> str:
        """The management token the init container wrote for kopa."""
        return self.file("mgmt-token", "mgmt-token").read_text(encoding="utf-8").splitlines()[0]

    def ca_file(self) -> Path | None:
        path = self.volumes.get("certs")
        return path / "ca.crt" if path is not None else None
