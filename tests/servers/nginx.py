"""A throwaway nginx for the integration tests (forward auth through ``auth_request``).

How it runs:

* its own nginx.conf in `workdir` (never /etc/nginx): pid file, error log, access log and
  every temp path live inside `workdir`; it listens on 127.0.0.1:<free port> only;
* in the foreground (``daemon off;``) and as a single process (``master_process off;``)
  under our own Popen, so the PID is ours and it is the only process: stop() signals
  exactly that PID, and a SIGKILL cannot leave orphaned workers holding the port. (With
  ``master_process on`` the workers, not the PID we hold, would serve; nothing else in the
  forward-auth behaviour depends on it.) Run as root, a single process also never drops to
  ``nobody``, who could not enter pytest's 0700 temp dirs;
* ``nginx -e <workdir>/error.log`` (nginx >= 1.19.5; Debian 12 ships 1.22) so that not
  even the start-up messages go to /var/log/nginx; ``-p <workdir>`` for relative paths;
* ``setpriv --pdeathsig KILL`` execs nginx (same PID), so it dies with the test process if
  a run is killed before teardown. Caveat as for slapd: the death signal follows the thread
  that started it;
* the access log never records the Authorization header nor $remote_user (which nginx
  parses out of Basic credentials): method, path, status and the auth subrequest's status.

Readiness = our PID owns the listening socket AND an HTTP request is answered, with a
deadline; a port grabbed by someone else between picking and binding is retried.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from tests.servers.net import free_port, pid_listens_on, port_is_open, stop_process

NGINX_BIN = "/usr/sbin/nginx"
HOST = "127.0.0.1"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.01

#: ``site(listen)`` returns the server/upstream blocks that go inside ``http { }``;
#: `listen` is ``127.0.0.1:<port>`` for the ``listen`` directive.
Site = Callable[[str], str]


class NginxError(RuntimeError):
    """nginx failed to start or stop; the message carries the error log tail."""


def nginx_path() -> str | None:
    """The nginx binary, or None when it is not installed."""
    return NGINX_BIN if os.access(NGINX_BIN, os.X_OK) else shutil.which("nginx")


def forward_auth_site(*, auth: str, upstream: str, custom_401_page: bool = False) -> Site:
    """The forward-auth configuration the README documents (the one the tests prove).

    `auth` is groupgate's ``host:port``, `upstream` the protected application's.

    A 401 from groupgate reaches the client with groupgate's WWW-Authenticate header: the
    auth_request module copies exactly that header from the subrequest's answer, and (nginx
    1.22, tested) it survives an ``error_page 401`` to a named or URI location as well. So
    no ``add_header WWW-Authenticate`` is needed; adding one sends the challenge twice.
    `custom_401_page` adds such an error page (plain text instead of nginx's HTML).
    """
    error_page = """
    # A refusal page of our own; groupgate's challenge header is kept by nginx.
    error_page 401 @unauthorized;
    location @unauthorized {
        default_type text/plain;
        return 401 "authentication required\\n";
    }
""" if custom_401_page else ""

    def site(listen: str) -> str:
        return f"""\
upstream groupgate {{
    server {auth};
    keepalive 16;
}}
upstream app {{
    server {upstream};
}}
server {{
    listen {listen};
    server_name localhost;

    location / {{
        auth_request /_groupgate;
        auth_request_set $auth_user $upstream_http_x_auth_user;
        # set (not appended): a client's own X-Auth-User never reaches the app
        proxy_set_header X-Auth-User $auth_user;
        proxy_set_header Authorization "";
        proxy_set_header Host $host;
        proxy_pass http://app;
    }}

    location = /_groupgate {{
        internal;
        proxy_pass http://groupgate/auth;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_pass_request_body off;
        proxy_set_header Content-Length "";
        proxy_set_header X-Original-URI $request_uri;
        proxy_set_header X-Original-Method $request_method;
    }}
{error_page}}}
"""
    return site


@dataclass
class Nginx:
    """One nginx process serving `site` on 127.0.0.1:`port` from `workdir`."""

    workdir: Path
    port: int
    site: Site
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def conf_path(self) -> Path:
        return self.workdir / "nginx.conf"

    @property
    def error_log(self) -> Path:
        return self.workdir / "error.log"

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def write_config(self) -> None:
        w = self.workdir
        tmp = w / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        temp_paths = "\n".join(f"    {kind}_temp_path {tmp / kind};"
                               for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf = f"""\
# generated by tests/servers/nginx.py
daemon off;
master_process off;
worker_processes 1;
pid {w / 'nginx.pid'};
error_log {self.error_log} notice;

events {{
    worker_connections 256;
}}

http {{
{temp_paths}
    log_format groupgate '$remote_addr "$request_method $uri" $status '
                         'upstream=$upstream_status $request_time';
    access_log {self.access_log} groupgate;
    server_tokens off;
    default_type application/octet-stream;

{self.site(f"{HOST}:{self.port}")}
}}
"""
        self.conf_path.write_text(conf)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start on `port`; return once our PID listens and an HTTP request is answered."""
        binary = nginx_path()
        if binary is None:
            raise NginxError("nginx is not installed")
        if self.proc is not None and self.proc.poll() is None:
            raise NginxError(f"nginx already running (pid {self.proc.pid})")
        if port_is_open(HOST, self.port):
            raise NginxError(f"{HOST}:{self.port}: Address already in use (by another process)")
        self.write_config()
        offset = self.error_log.stat().st_size if self.error_log.exists() else 0
        cmd = [binary, "-p", str(self.workdir), "-e", str(self.error_log),
               "-c", str(self.conf_path)]
        if shutil.which("setpriv"):
            cmd = ["setpriv", "--pdeathsig", "KILL", "--", *cmd]
        with (self.workdir / "nginx.stderr").open("ab") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err,
                                         stderr=err, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.proc = None
                raise NginxError(f"nginx exited with {rc} during startup:\n"
                                 + self.log_tail(offset))
            if pid_listens_on(self.proc.pid, self.port) and self._answers():
                return
            if time.monotonic() >= deadline:
                self.kill()
                raise NginxError(f"nginx did not answer on {self.url} within {timeout:.1f}s:\n"
                                 + self.log_tail(offset))
            time.sleep(POLL_INTERVAL)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGQUIT (graceful) our own PID, then SIGTERM, then SIGKILL, each with a deadline."""
        stop_process(self.proc, signals=(signal.SIGQUIT, signal.SIGTERM), timeout=timeout)
        self.proc = None

    def kill(self) -> None:
        stop_process(self.proc, signals=(), timeout=STOP_TIMEOUT)
        self.proc = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _answers(self) -> bool:
        """Any HTTP status line from a bare request means nginx serves (no auth involved)."""
        try:
            with socket.create_connection((HOST, self.port), timeout=1) as s:
                s.sendall(b"GET /_nginx_ready HTTP/1.0\r\nHost: localhost\r\n\r\n")
                return s.recv(12).startswith(b"HTTP/1.")
        except OSError:
            return False

    def log_tail(self, offset: int = 0, max_chars: int = 4000) -> str:
        parts = []
        for path, off in ((self.error_log, offset), (self.workdir / "nginx.stderr", 0)):
            try:
                with path.open("rb") as f:
                    f.seek(off)
                    text = f.read().decode("utf-8", "replace").strip()
            except OSError:
                continue
            if text:
                parts.append(text)
        return ("\n".join(parts) or "(nginx wrote nothing; try nginx -t -c ...)")[-max_chars:]


def start_nginx(workdir: Path, site: Site, *, timeout: float = START_TIMEOUT) -> Nginx:
    """Configure and start an nginx in `workdir` on a free loopback port (3 tries)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    last: NginxError | None = None
    for _attempt in range(3):
        server = Nginx(workdir, free_port(HOST), site)
        try:
            server.start(timeout=timeout)
            return server
        except NginxError as exc:
            server.stop()
            last = exc
            if "Address already in use" not in str(exc):
                raise
    assert last is not None
    raise last
