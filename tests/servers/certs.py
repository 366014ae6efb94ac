"""A throwaway test CA, a server certificate and a wrong CA, made with openssl."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TestCerts:
    __test__ = False  # not a test class, despite the name

    dir: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    wrong_ca_cert: Path


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(args, cwd=cwd, check=True, capture_output=True)


def make_test_certs(directory: Path, *, ips: tuple[str, ...] = ("127.0.0.1",),
                    dns: tuple[str, ...] = ("localhost",)) -> TestCerts:
    """Create ca.crt, server.crt/key (SAN = ips + dns) and wrongca.crt in `directory`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
         "-subj", "/CN=groupgate test CA", "-keyout", "ca.key", "-out", "ca.crt",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
         "-keyout", "server.key", "-out", "server.csr", cwd=d)
    san = ",".join([f"IP:{ip}" for ip in ips] + [f"DNS:{n}" for n in dns])
    (d / "server.ext").write_text(
        f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    _run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-days", "3650", "-extfile", "server.ext", "-out", "server.crt", cwd=d)
    _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
         "-subj", "/CN=wrong CA", "-keyout", "wrongca.key", "-out", "wrongca.crt", cwd=d)
    for key in d.glob("*.key"):
        key.chmod(0o600)
    return TestCerts(d, d / "ca.crt", d / "server.crt", d / "server.key", d / "wrongca.crt")
