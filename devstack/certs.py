"""A throwaway certificate authority made with the openssl CLI, for TLS between local test servers.

Servers under test run with TLS as in production (OPA with a serving cert, clients verifying it), so the
tests need a CA whose certificates carry IP:127.0.0.1 in their SAN. ECDSA P-256 keys keep issuing fast.
"""

from __future__ import annotations

import re
import secrets
import subprocess
from collections.abc import Sequence
from pathlib import Path

__all__ = ["CertError", "TestCA", "run_openssl"]

_KEY_ARGS = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


class CertError(RuntimeError):
    """openssl failed; the message carries its stderr."""


def run_openssl(*args: str, cwd: Path) -> None:
    """Runs openssl and turns a failure into CertError with openssl's own explanation."""
    try:
        subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise CertError("the openssl command is required to make test certificates") from None
    except subprocess.CalledProcessError as exc:
        raise CertError(f"openssl {args[0]} failed: {exc.stderr.strip()}") from None


class TestCA:
    """A CA in `dir` (ca.crt, ca.key) that issues server and client certificates signed by it."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, dir: Path | str, *, common_name: str = "kopa test CA", days: int = 3650) -> None:
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca_file = self.dir / "ca.crt"
        self.key_file = self.dir / "ca.key"
        if not (self.ca_file.exists() and self.key_file.exists()):
            run_openssl(
                "req", "-x509", *_KEY_ARGS,
                "-keyout", str(self.key_file), "-out", str(self.ca_file),
                "-days", str(days), "-subj", f"/CN={common_name}",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                cwd=self.dir,
            )  # fmt: skip
            self.key_file.chmod(0o600)

    def issue(
        self,
        name: str,
        ips: Sequence[str] = ("127.0.0.1",),
        dns: Sequence[str] = ("localhost",),
        *,
        organizations: Sequence[str] = (),
        days: int = 365,
    ) -> tuple[Path, Path]:
        """Issues a cert for CN=`name` usable both as a server and a client cert; returns (cert, key).

        `organizations` become O= entries, which Kubernetes reads as the groups of a client cert.
        Pass ips=() and dns=() for a pure client certificate.
        """
        stem = _SAFE_NAME.sub("_", name).strip("_") or "cert"
        cert, key, csr, ext = (self.dir / f"{stem}{suffix}" for suffix in (".crt", ".key", ".csr", ".ext"))
        subject = "".join(f"/O={org}" for org in organizations) + f"/CN={name}"
        sans = [f"IP:{ip}" for ip in ips] + [f"DNS:{host}" for host in dns]
        lines = [
            "[v3]",
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            "extendedKeyUsage=serverAuth,clientAuth",
            "subjectKeyIdentifier=hash",
            "authorityKeyIdentifier=keyid,issuer",
        ]
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        ext.write_text("\n".join(lines) + "\n", encoding="utf-8")
        run_openssl(
            "req", "-new", *_KEY_ARGS, "-keyout", str(key), "-out", str(csr), "-subj", subject, cwd=self.dir
        )
        key.chmod(0o600)
        run_openssl(
            "x509", "-req", "-in", str(csr),
            "-CA", str(self.ca_file), "-CAkey", str(self.key_file),
            "-set_serial", "0x" + secrets.token_hex(15),
            "-days", str(days), "-extfile", str(ext), "-extensions", "v3", "-out", str(cert),
            cwd=self.dir,
        )  # fmt: skip
        csr.unlink(missing_ok=True)
        ext.unlink(missing_ok=True)
        return cert, key
