"""A throwaway Samba AD DC for the integration tests.

Why it is built the way it is:

* Provisioning an AD domain takes ~4 s, so it happens once per template directory
  (one per test session); the same step also seeds the users and groups offline,
  straight into sam.ldb with Samba's own Python bindings (fast, no server, no TLS
  needed for passwords). Each instance is then a plain copy of that tree with its own
  smb.conf: every test gets a fresh, already seeded directory in a fraction of a second.
* Samba's LDAP ports cannot be moved away from 389/636, so each instance owns one
  loopback address (127.0.0.2 .. 127.0.0.20), claimed with a lock file so parallel
  sessions and several instances in one process do not collide.
* Samba runs in the foreground (`samba -i -M single`) under our own Popen, with
  `server services = ldap` only, so there is exactly one process and its PID is ours.
  Its stdin is a pipe we hold: Samba exits on EOF there, so it dies with the test
  process even if that is killed without running any cleanup.
* Every path Samba writes (private, state, lock, cache, pid, sockets) lives under the
  instance directory; the host's /etc/samba/smb.conf never takes part (`-s <file>`).

Needs root (privileged ports), the Debian packages samba-ad-dc and samba-ad-provision,
and /usr/bin/python3 with the samba bindings (only for provisioning and seeding; the
test side only uses ldap3).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldap3 import BASE, MODIFY_ADD, MODIFY_DELETE, MODIFY_REPLACE, NONE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars

from tests.servers.net import port_is_open, stop_process, wait_until

SAMBA = "/usr/sbin/samba"
SAMBA_TOOL = "/usr/bin/samba-tool"
SYSTEM_PYTHON = "/usr/bin/python3"  # the only interpreter with Samba's bindings

REALM = "EXAMPLE.ORG"
DNS_DOMAIN = "example.org"
NETBIOS_DOMAIN = "EXAMPLE"
HOST_NAME = "dc1"  # dnsHostName = dc1.example.org
BASE_DN = "DC=example,DC=org"
USERS_CONTAINER = f"CN=Users,{BASE_DN}"
ADMIN_DN = f"CN=Administrator,{USERS_CONTAINER}"
ADMIN_PASSWORD = "Passw0rd!Passw0rd"
SERVICE_USER = "groupgate-svc"
SERVICE_DN = f"CN={SERVICE_USER},{USERS_CONTAINER}"
SERVICE_PASSWORD = "ServicePassw0rd!"
USER_PASSWORD = "UserPassw0rd!"

UAC_ACCOUNTDISABLE = 0x2
UAC_NORMAL_ACCOUNT = 0x200  # 512
GROUP_TYPE_GLOBAL_SECURITY = -2147483646  # 0x80000002

USERS: tuple[str, ...] = ("alice", "bob", "carol", "dave", "erin", "frank")
DISABLED_IN_SEED: tuple[str, ...] = ("frank",)
RANGE_USERS: tuple[str, ...] = tuple(f"rng{i:02d}" for i in range(30))
# Order matters: a group must exist before another group lists it as a member.
GROUPS: dict[str, tuple[str, ...]] = {
    "token-admins": ("carol",),
    "token-users": ("alice", "bob", "erin", "token-admins"),
    "range-group": RANGE_USERS,
}

CANDIDATE_HOSTS: tuple[str, ...] = tuple(f"127.0.0.{i}" for i in range(2, 21))
# LDAP, LDAPS and the global catalog pair; Samba's ldap service binds all four.
SAMBA_PORTS: tuple[int, ...] = (389, 636, 3268, 3269)
HOST_LOCK_DIR = Path(tempfile.gettempdir()) / "groupgate-samba-hosts"


def user_dn(name: str) -> str:
    """DN of a seeded user or group (all live in CN=Users, CN=<sAMAccountName>)."""
    return f"CN={name},{USERS_CONTAINER}"


# --------------------------------------------------------------------------------------
# smb.conf


def _smb_conf(root: Path, *, interfaces: str, tls_dir: Path | None) -> str:
    """Our own complete smb.conf: provision's output plus what it does not carry
    (it silently drops `ldap server require strong auth`) and every runtime path
    moved under `root` so nothing touches /var/lib/samba or /run/samba."""
    run = root / "run"
    lines = [
        "[global]",
        f"netbios name = {HOST_NAME.upper()}",
        f"realm = {REALM}",
        f"workgroup = {NETBIOS_DOMAIN}",
        "server role = active directory domain controller",
        "idmap_ldb:use rfc2307 = yes",
        "server services = ldap",
        f"interfaces = {interfaces}",
        "bind interfaces only = yes",
        # plain simple binds are what most LDAP clients (and our tests) do first
        "ldap server require strong auth = no",
        f"private dir = {root / 'private'}",
        f"state directory = {root / 'state'}",
        f"lock directory = {root}",
        f"cache directory = {root / 'cache'}",
        f"binddns dir = {root / 'bind-dns'}",
        f"pid directory = {run}",
        f"ncalrpc dir = {run / 'ncalrpc'}",
        f"winbindd socket directory = {run / 'winbindd'}",
        f"ntp signd socket directory = {run / 'ntp_signd'}",
    ]
    if tls_dir is None:
        # Otherwise Samba would generate a self-signed CA on first start (+~0.8 s).
        lines.append("tls enabled = no")
    else:
        lines += [
            "tls enabled = yes",
            f"tls keyfile = {tls_dir / 'server.key'}",
            f"tls certfile = {tls_dir / 'server.crt'}",
            f"tls cafile = {tls_dir / 'ca.crt'}",
            # Without it Samba generates fresh DH parameters at every start: +0.2..1.5 s.
            f"tls dh params file = {tls_dir / 'dh.pem'}",
        ]
    return "\n\t".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# template: provision + seed, once per template_dir

# Runs under /usr/bin/python3 (Samba's bindings); spec arrives as JSON on stdin.
# Writes sam.ldb directly with the system session, in one transaction.
_SEED_SCRIPT = r"""
import json, sys
import ldb
from samba.param import LoadParm
from samba.samdb import SamDB
from samba.auth import system_session

spec = json.load(sys.stdin)
lp = LoadParm()
lp.load(spec["smb_conf"])
samdb = SamDB(url=lp.private_path("sam.ldb"), session_info=system_session(), lp=lp)
base = str(samdb.domain_dn())
container = "CN=Users," + base

def utf16_password(p):
    return ('"%s"' % p).encode("utf-16-le")

samdb.transaction_start()
try:
    policy = ldb.Message()
    policy.dn = ldb.Dn(samdb, base)
    for attr, value in spec["domain_policy"].items():
        policy[attr] = ldb.MessageElement(str(value), ldb.FLAG_MOD_REPLACE, attr)
    samdb.modify(policy)
    for u in spec["users"]:
        name = u["name"]
        msg = {
            "dn": "CN=%s,%s" % (name, container),
            "objectClass": "user",
            "sAMAccountName": name,
            "userPrincipalName": "%s@%s" % (name, spec["dns_domain"]),
            "userAccountControl": str(u["uac"]),
            "givenName": name,
            "sn": "Test",
            "displayName": name,
            "mail": "%s@%s" % (name, spec["dns_domain"]),
        }
        if u.get("password"):
            msg["unicodePwd"] = utf16_password(u["password"])
        samdb.add(msg)
    for g in spec["groups"]:
        msg = {
            "dn": "CN=%s,%s" % (g["name"], container),
            "objectClass": "group",
            "sAMAccountName": g["name"],
            "groupType": str(g["group_type"]),
        }
        if g["members"]:
            msg["member"] = ["CN=%s,%s" % (m, container) for m in g["members"]]
        samdb.add(msg)
except BaseException:
    samdb.transaction_cancel()
    raise
samdb.transaction_commit()
print("seeded %d users, %d groups" % (len(spec["users"]), len(spec["groups"])))
"""


def _seed_spec(smb_conf: Path) -> dict[str, Any]:
    users: list[dict[str, Any]] = [
        {"name": SERVICE_USER, "password": SERVICE_PASSWORD, "uac": UAC_NORMAL_ACCOUNT}
    ]
    for name in USERS:
        uac = UAC_NORMAL_ACCOUNT | (UAC_ACCOUNTDISABLE if name in DISABLED_IN_SEED else 0)
        users.append({"name": name, "password": USER_PASSWORD, "uac": uac})
    # Range users get passwords too: offline that costs ~15 ms each, and an enabled
    # account with a password is what a real directory holds.
    users += [
        {"name": n, "password": USER_PASSWORD, "uac": UAC_NORMAL_ACCOUNT} for n in RANGE_USERS
    ]
    return {
        "smb_conf": str(smb_conf),
        "dns_domain": DNS_DOMAIN,
        # Relaxed policy so tests may set any password, repeatedly, that never expires.
        "domain_policy": {
            "pwdProperties": 0,
            "minPwdLength": 1,
            "pwdHistoryLength": 0,
            "minPwdAge": 0,
            "maxPwdAge": -0x8000000000000000,
        },
        "users": users,
        "groups": [
            {"name": g, "members": list(m), "group_type": GROUP_TYPE_GLOBAL_SECURITY}
            for g, m in GROUPS.items()
        ],
    }


def _run_logged(args: list[str], log: Path, *, what: str, stdin: str | None = None) -> None:
    """Run a setup command, keep its output in `log`, raise with the tail on failure."""
    with log.open("w") as out:
        res = subprocess.run(
            args,
            input=stdin,
            text=True,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            check=False,
        )
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {res.returncode}); tail of {log}:\n{_tail(log)}")


def ensure_template(template_dir: Path) -> dict[str, float]:
    """Provision and seed a domain into `template_dir/dc` unless that was done already.

    Safe against concurrent callers (flock). Returns timings in seconds; a cached
    template reports `provision` and `seed` as 0.0 and `cached` as 1.0.
    """
    for tool in (SAMBA, SAMBA_TOOL, SYSTEM_PYTHON):
        if not os.access(tool, os.X_OK):
            raise RuntimeError(f"{tool} missing: install samba-ad-dc and samba-ad-provision")
    template_dir = Path(template_dir).absolute()
    template_dir.parent.mkdir(parents=True, exist_ok=True)
    marker = template_dir / "template.json"
    lock_path = template_dir.parent / f".{template_dir.name}.lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return {"provision": 0.0, "seed": 0.0, "cached": 1.0}
        if template_dir.exists():  # a half-built template from an interrupted run
            shutil.rmtree(template_dir)
        template_dir.mkdir()
        root = template_dir / "dc"
        empty = template_dir / "empty-smb.conf"
        empty.write_text("")  # keeps the host's /etc/samba/smb.conf out of the result
        t0 = time.monotonic()
        _run_logged(
            [
                SAMBA_TOOL,
                "domain",
                "provision",
                "-s",
                str(empty),
                f"--targetdir={root}",
                f"--realm={REALM}",
                f"--domain={NETBIOS_DOMAIN}",
                "--server-role=dc",
                "--dns-backend=NONE",
                "--use-rfc2307",
                f"--host-name={HOST_NAME}",
                f"--adminpass={ADMIN_PASSWORD}",
            ],
            template_dir / "provision.log",
            what="samba-tool domain provision",
        )
        t1 = time.monotonic()
        conf = root / "etc" / "smb.conf"
        conf.write_text(_smb_conf(root, interfaces="127.0.0.1/8", tls_dir=None))
        _run_logged(
            [SYSTEM_PYTHON, "-c", _SEED_SCRIPT],
            template_dir / "seed.log",
            what="seeding sam.ldb",
            stdin=json.dumps(_seed_spec(conf)),
        )
        t2 = time.monotonic()
        timings = {"provision": t1 - t0, "seed": t2 - t1, "cached": 0.0}
        marker.write_text(json.dumps(timings))
        return timings


# --------------------------------------------------------------------------------------
# loopback address claim


def _port_free(host: str, port: int) -> bool:
    if port_is_open(host, port):
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Samba does
        try:
            s.bind((host, port))
        except OSError:  # e.g. someone listens on 0.0.0.0:389
            return False
    return True


def _claim_host(candidates: tuple[str, ...]) -> tuple[str, int]:
    """First candidate address that no other instance holds and whose ports are free.

    Returns (host, fd of the held lock file); the lock lasts until the fd is closed,
    or until this process dies.
    """
    HOST_LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
    for host in candidates:
        fd = os.open(HOST_LOCK_DIR / f"{host}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        if all(_port_free(host, p) for p in SAMBA_PORTS):
            return host, fd
        os.close(fd)
    raise RuntimeError(
        f"no free loopback address for Samba among {candidates[0]}..{candidates[-1]}"
    )


def _cert_ip_sans(cert: Path) -> list[str]:
    """IP addresses in a certificate's subjectAltName (via the openssl CLI)."""
    out = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-ext", "subjectAltName"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [
        part.strip().removeprefix("IP Address:")
        for part in out.replace("\n", ",").split(",")
        if part.strip().startswith("IP Address:")
    ]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"<cannot read {path}: {e}>"


# --------------------------------------------------------------------------------------
# the running instance

_LIVE: dict[int, SambaDC] = {}


@dataclass
class SambaDC:
    """A running throwaway DC; `stop()` it (also done at interpreter exit)."""

    workdir: Path
    host: str  # loopback address it alone listens on, e.g. 127.0.0.2
    base_dn: str = BASE_DN
    admin_dn: str = ADMIN_DN
    admin_password: str = ADMIN_PASSWORD
    service_dn: str = SERVICE_DN  # plain domain user, not an admin
    service_password: str = SERVICE_PASSWORD
    proc: subprocess.Popen[bytes] | None = None
    tls_dir: Path | None = None  # copies of ca.crt/server.crt/server.key Samba uses
    timings: dict[str, float] = field(default_factory=dict)
    _host_lock_fd: int | None = field(default=None, repr=False)
    _log_file: Any = field(default=None, repr=False)

    @property
    def root(self) -> Path:
        """The instance's Samba tree (copy of the template)."""
        return self.workdir / "dc"

    @property
    def smb_conf(self) -> Path:
        return self.root / "etc" / "smb.conf"

    @property
    def log_path(self) -> Path:
        return self.root / "samba.log"

    @property
    def url(self) -> str:
        return f"ldap://{self.host}:389"

    @property
    def ldaps_url(self) -> str:
        """Only listening when started with certs_dir."""
        return f"ldaps://{self.host}:636"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("Samba is not running")
        return self.proc.pid

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    # ---- lifecycle -------------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM our own PID, SIGKILL after `timeout`; wait until nothing listens.

        Idempotent. Samba exits within ~10 ms of SIGTERM with exit code 127 here.
        """
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, timeout=timeout)
            if proc.stdin is not None:
                proc.stdin.close()
            wait_until(
                lambda: not any(port_is_open(self.host, p) for p in (389, 636)),
                timeout=5,
                what=f"Samba ports on {self.host} to close",
            )
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._host_lock_fd is not None:
            os.close(self._host_lock_fd)
            self._host_lock_fd = None
        _LIVE.pop(id(self), None)

    # ---- LDAP helpers ----------------------------------------------------------------

    def server(
        self, *, tls: Tls | None = None, use_ssl: bool = False, get_info: str = NONE
    ) -> Server:
        """An ldap3 Server for this DC.

        get_info=NONE by default: no schema read, so values come back as strings
        (userAccountControl '512'); pass ldap3.SCHEMA (~50 ms per bind) for typed values.
        """
        return Server(
            self.host,
            port=636 if use_ssl else 389,
            use_ssl=use_ssl,
            tls=tls,
            get_info=get_info,
            connect_timeout=5,
        )

    def tls(self, *, wrong_ca: Path | None = None) -> Tls:
        """ldap3 Tls that validates against our CA (or `wrong_ca`, to see it fail)."""
        if self.tls_dir is None:
            raise RuntimeError("Samba was started without certs_dir")
        return Tls(
            validate=ssl.CERT_REQUIRED, ca_certs_file=str(wrong_ca or self.tls_dir / "ca.crt")
        )

    def admin_connection(self, *, get_info: str = NONE) -> Connection:
        """Bound as Administrator over plain LDAP, raise_exceptions=True; caller unbinds."""
        return Connection(
            self.server(get_info=get_info),
            self.admin_dn,
            self.admin_password,
            auto_bind=True,
            raise_exceptions=True,
            receive_timeout=30,
        )

    def _dn_and_uac(self, conn: Connection, name: str) -> tuple[str, int | None]:
        conn.search(
            self.base_dn,
            f"(sAMAccountName={escape_filter_chars(name)})",
            attributes=["userAccountControl"],
        )
        hits = [r for r in conn.response if r.get("type") == "searchResEntry"]
        if len(hits) != 1:
            raise LookupError(f"sAMAccountName={name!r}: {len(hits)} entries")
        raw = hits[0]["raw_attributes"].get("userAccountControl") or []
        return hits[0]["dn"], int(raw[0]) if raw else None

    def _set_disabled(self, name: str, disabled: bool) -> None:
        # (ldap3's `with conn:` does not unbind a connection that was bound before it)
        conn = self.admin_connection()
        try:
            dn, uac = self._dn_and_uac(conn, name)
            if uac is None:
                raise LookupError(f"{name!r} has no userAccountControl (not a user)")
            new = uac | UAC_ACCOUNTDISABLE if disabled else uac & ~UAC_ACCOUNTDISABLE
            if new != uac:
                conn.modify(dn, {"userAccountControl": [(MODIFY_REPLACE, [str(new)])]})
        finally:
            conn.unbind()

    def disable_user(self, name: str) -> None:
        """Set ACCOUNTDISABLE (UAC bit 2) on a user, by sAMAccountName."""
        self._set_disabled(name, True)

    def enable_user(self, name: str) -> None:
        """Clear ACCOUNTDISABLE on a user, by sAMAccountName."""
        self._set_disabled(name, False)

    def _change_member(self, group: str, member: str, op: str) -> None:
        conn = self.admin_connection()
        try:
            gdn, _ = self._dn_and_uac(conn, group)
            mdn, _ = self._dn_and_uac(conn, member)
            conn.modify(gdn, {"member": [(op, [mdn])]})
        finally:
            conn.unbind()

    def add_member(self, group: str, member: str) -> None:
        """Add a user or group (sAMAccountName) to a group's `member`."""
        self._change_member(group, member, MODIFY_ADD)

    def remove_member(self, group: str, member: str) -> None:
        """Remove a user or group (sAMAccountName) from a group's `member`."""
        self._change_member(group, member, MODIFY_DELETE)


def _rootdse_answers(host: str) -> bool:
    try:
        conn = Connection(
            Server(host, port=389, get_info=NONE, connect_timeout=1),
            receive_timeout=2,
            raise_exceptions=True,
        )
        conn.open()
        try:
            conn.search("", "(objectClass=*)", BASE, attributes=["dnsHostName"])
            return bool(conn.response)
        finally:
            conn.unbind()
    except (LDAPException, OSError):
        return False


def start_samba(
    workdir: Path,
    *,
    certs_dir: Path | None = None,
    template_dir: Path | None = None,
    host: str | None = None,
    timeout: float = 30.0,
) -> SambaDC:
    """Start a fresh, seeded DC in `workdir` and return once LDAP answers.

    `template_dir` holds the provisioned+seeded domain; pass one per test session
    to pay the ~4 s provisioning once (default: workdir/"template", i.e. no reuse).
    `certs_dir` (ca.crt, server.crt, server.key as make_test_certs writes them)
    turns on LDAPS and StartTLS; the address is then picked among the IP SANs of
    server.crt (so make them with ips=CANDIDATE_HOSTS, or a few of them, to survive
    a busy 127.0.0.2), falling back to any candidate. `host=` forces one address.
    """
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    timings = dict(ensure_template(Path(template_dir) if template_dir else workdir / "template"))
    template_root = (Path(template_dir) if template_dir else workdir / "template").absolute() / "dc"

    dc = SambaDC(workdir=workdir, host="")
    root = dc.root
    if root.exists():
        raise FileExistsError(f"{root} exists; use a fresh workdir per instance")
    t0 = time.monotonic()
    # cp -a keeps sparse tdb files sparse and is faster than shutil.copytree here
    subprocess.run(["cp", "-a", str(template_root), str(root)], check=True)
    timings["copy"] = time.monotonic() - t0
    (root / "run").mkdir(exist_ok=True)
    for stale in (root / "run").glob("*.pid"):
        stale.unlink()

    tls_dir: Path | None = None
    if certs_dir is not None:
        # Own copies: Samba refuses a key file that is not 0600 and owned by us.
        tls_dir = root / "tls"
        tls_dir.mkdir(mode=0o700)
        src = Path(certs_dir)
        for name in ("ca.crt", "server.crt", "server.key"):
            shutil.copyfile(src / name, tls_dir / name)
        (tls_dir / "server.key").chmod(0o600)
        # The fixed RFC 7919 group: instant, unlike `openssl dhparam`.
        subprocess.run(
            [
                "openssl",
                "genpkey",
                "-genparam",
                "-algorithm",
                "DH",
                "-pkeyopt",
                "group:ffdhe2048",
                "-out",
                str(tls_dir / "dh.pem"),
            ],
            check=True,
            capture_output=True,
        )
    dc.tls_dir = tls_dir

    if host is not None:
        candidates: tuple[str, ...] = (host,)
    else:
        # Prefer addresses the server certificate names, so LDAPS validates as is.
        in_cert = set(_cert_ip_sans(tls_dir / "server.crt")) if tls_dir else set()
        candidates = tuple(h for h in CANDIDATE_HOSTS if h in in_cert) or CANDIDATE_HOSTS
    host, lock_fd = _claim_host(candidates)
    dc.host = host
    dc._host_lock_fd = lock_fd
    dc.smb_conf.write_text(_smb_conf(root, interfaces=f"{host}/8", tls_dir=tls_dir))

    t1 = time.monotonic()
    dc._log_file = dc.log_path.open("wb")
    try:
        dc.proc = subprocess.Popen(
            [SAMBA, "-i", "-M", "single", "-s", str(dc.smb_conf)],
            stdin=subprocess.PIPE,  # Samba exits on EOF here: dies with us
            stdout=dc._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # no terminal Ctrl-C: we stop it ourselves
            cwd=root,
        )
    except BaseException:
        dc.stop()
        raise
    _LIVE[id(dc)] = dc

    def ready() -> bool:
        assert dc.proc is not None
        if dc.proc.poll() is not None:
            raise RuntimeError(
                f"samba exited with {dc.proc.returncode} during startup; tail of {dc.log_path}:\n"
                f"{dc.log_tail()}"
            )
        if not _rootdse_answers(host):
            return False
        return tls_dir is None or port_is_open(host, 636)

    try:
        wait_until(ready, timeout=timeout, interval=0.05, what=f"Samba LDAP on {host}:389")
    except TimeoutError as e:
        dc.stop()
        raise RuntimeError(f"{e}; tail of {dc.log_path}:\n{dc.log_tail()}") from None
    except BaseException:
        dc.stop()
        raise
    timings["start"] = time.monotonic() - t1
    dc.timings = timings
    return dc


@atexit.register
def _stop_all() -> None:
    """Last resort for a session that forgot stop() (stdin EOF would also do it)."""
    for dc in list(_LIVE.values()):
        with contextlib.suppress(Exception):  # best effort at exit
            dc.stop()
