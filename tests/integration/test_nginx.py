"""Forward auth end to end: curl -> a real nginx (auth_request) -> groupgate /auth -> the app.

Each test gets its own slapd, store (SQLite and PostgreSQL), groupgate HTTP service, nginx
(tests/servers/nginx.py, with the configuration the README documents) and a tiny upstream
application that answers "hello <X-Auth-User>" and records the headers it was sent.
The client is the real curl; its credentials go in on stdin (``curl -K -``), not in argv.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import ldap3
import pytest

from daemon.service import CreatedToken
from daemon.sync import run_sync
from daemon.tokens import generate
from tests.conftest import require_server
from tests.integration.conftest import HttpService
from tests.servers.nginx import Nginx, forward_auth_site, nginx_path, start_nginx

pytestmark = pytest.mark.slapd

TOKEN_USERS = "cn=token-users,ou=groups,dc=example,dc=org"
CHALLENGE = 'Basic realm="groupgate", charset="UTF-8"'


# --- the protected application -------------------------------------------------------------

class Echo:
    """An upstream app on a loopback port: says hello to X-Auth-User, records what it got."""

    def __init__(self) -> None:
        self.seen: list[dict[str, list[str]]] = []
        echo = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                headers: dict[str, list[str]] = {}
                for name, value in self.headers.items():
                    headers.setdefault(name.lower(), []).append(value)
                headers[":path"] = [self.path]
                echo.seen.append(headers)
                user = self.headers.get("X-Auth-User", "")
                body = f"hello {user}\n".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


# --- the client ------------------------------------------------------------------------------

@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]] = field(repr=False)
    body: str

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def curl(url: str, user: str | None = None, token: str | None = None,
         headers: tuple[str, ...] = ()) -> Answer:
    """GET `url` with the real curl; Basic credentials are fed through a config on stdin."""
    config = [f'url = "{url}"']
    if user is not None:
        config.append(f'user = "{user}:{token or ""}"')
    config += [f'header = "{h}"' for h in headers]
    res = subprocess.run(["curl", "-sS", "-i", "--max-time", "10", "-K", "-"],
                         input=("\n".join(config) + "\n").encode(), capture_output=True,
                         timeout=20, check=False)
    assert res.returncode == 0, f"curl failed ({res.returncode}): {res.stderr.decode().strip()}"
    # bytes, not text=True: universal newlines would turn the CRLFs we split on into LFs
    head, _, body = res.stdout.decode("utf-8").partition("\r\n\r\n")
    status_line, *lines = head.split("\r\n")
    hdrs = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines)]
    return Answer(int(status_line.split()[1]), hdrs, body)


# --- the whole chain -------------------------------------------------------------------------

@dataclass
class Gate:
    svc: HttpService
    nginx: Nginx
    app: Echo
    slapd: Any

    def get(self, user: str | None = None, token: str | None = None, path: str = "/",
            headers: tuple[str, ...] = ()) -> Answer:
        return curl(self.nginx.url + path, user, token, headers)

    def mint(self, owner: str = "alice", name: str = "laptop",
             lifetime: timedelta = timedelta(days=1), now: datetime | None = None
             ) -> CreatedToken:
        return self.svc.web.service.create(owner, name, lifetime, now or datetime.now(UTC))

    def sync(self) -> Any:
        cfg = self.svc.config
        assert self.svc.web.directory is not None
        return run_sync(self.svc.web.directory, self.svc.web.store, cfg.policy, cfg.sync,
                        now=datetime.now(UTC))

    def membership(self, op: str, user: str) -> None:
        conn = self.slapd.admin_connection()
        kind = ldap3.MODIFY_DELETE if op == "remove" else ldap3.MODIFY_ADD
        dn = f"uid={user},ou=people,dc=example,dc=org"
        assert conn.modify(TOKEN_USERS, {"member": [(kind, [dn])]}), conn.result
        conn.unbind()

    def assert_refused(self, answer: Answer, challenge: str = CHALLENGE) -> None:
        """401 with groupgate's challenge, exactly once, and the app never saw the request."""
        assert answer.status == 401, answer
        assert answer.header_values("WWW-Authenticate") == [challenge], answer.headers
        assert "hello" not in answer.body


@pytest.fixture
def make_gate(http_service: Callable[..., HttpService], fresh_slapd: Any, tmp_path: Path
              ) -> Iterator[Callable[..., Gate]]:
    """Start groupgate, the app and nginx in front of both; everything stopped afterwards."""
    if nginx_path() is None:
        require_server("nginx", "nginx is missing (apt-get install nginx)")
    if shutil.which("curl") is None:
        require_server("curl", "curl is missing (apt-get install curl)")
    apps: list[Echo] = []
    proxies: list[Nginx] = []

    def _make(custom_401_page: bool = False, **sections: Any) -> Gate:
        svc = http_service(**sections)
        app = Echo()
        apps.append(app)
        site = forward_auth_site(auth=svc.config.http.listen, upstream=app.address,
                                 custom_401_page=custom_401_page)
        proxy = start_nginx(tmp_path / f"nginx{len(proxies)}", site)
        proxies.append(proxy)
        return Gate(svc, proxy, app, fresh_slapd)

    yield _make
    for proxy in proxies:
        proxy.stop()
    for app in apps:
        app.stop()


@pytest.fixture
def gate(make_gate: Callable[..., Gate]) -> Gate:
    return make_gate()


# --- the tests -------------------------------------------------------------------------------

def test_valid_token_reaches_the_app_as_the_username(gate: Gate) -> None:
    """The app sees X-Auth-User from groupgate; never the token, never the client's claim."""
    tok = gate.mint("alice")
    ans = gate.get("alice", tok.token, "/reports?year=2026",
                   headers=("X-Auth-User: mallory",))
    assert ans.status == 200, ans
    assert ans.body == "hello alice\n"
    assert len(gate.app.seen) == 1
    seen = gate.app.seen[0]
    assert seen["x-auth-user"] == ["alice"]  # set by nginx from /auth, the spoof replaced
    assert "authorization" not in seen  # the token stops at nginx
    assert seen[":path"] == ["/reports?year=2026"]
    assert not any(tok.token in v for vals in seen.values() for v in vals)
    # the username is case-folded by groupgate: what the app gets is canonical
    assert gate.get("ALICE", tok.token).body == "hello alice\n"


def test_wrong_credentials_get_401_with_the_challenge(gate: Gate) -> None:
    alice = gate.mint("alice")
    bob = gate.mint("bob")
    cases = {
        "no credentials": gate.get(),
        "garbage token": gate.get("alice", "not-a-token"),
        "well-formed but unknown token": gate.get("alice", str(generate())),
        "someone else's token": gate.get("alice", bob.token),
        "right token, wrong user": gate.get("bob", alice.token),
        "altered secret": gate.get("alice", alice.token[:-1]
                                   + ("A" if alice.token[-1] != "A" else "B")),
    }
    for what, ans in cases.items():
        assert ans.status == 401, what
        gate.assert_refused(ans)
    assert gate.app.seen == []
    assert gate.get("alice", alice.token).status == 200  # and the real one still works


def test_suspended_token_gets_401(gate: Gate) -> None:
    """Removed from token-users and synced: the next request through nginx is refused."""
    tok = gate.mint("alice")
    assert gate.get("alice", tok.token).status == 200
    gate.membership("remove", "alice")
    report = gate.sync()
    assert [(c.kind, c.owner) for c in report.applied] == [("suspend", "alice")]
    gate.assert_refused(gate.get("alice", tok.token))
    assert len(gate.app.seen) == 1

    gate.membership("add", "alice")
    gate.sync()
    assert gate.get("alice", tok.token).body == "hello alice\n"


def test_expired_token_gets_401(gate: Gate) -> None:
    past = gate.mint("alice", "old", timedelta(hours=1),
                     now=datetime.now(UTC) - timedelta(hours=2))
    gate.assert_refused(gate.get("alice", past.token))

    # and one that runs out while we watch: valid, then refused once its time is up
    short = gate.mint("alice", "short", timedelta(seconds=1.5))
    assert gate.get("alice", short.token).status == 200
    deadline = time.monotonic() + 10
    while (ans := gate.get("alice", short.token)).status == 200:
        assert time.monotonic() < deadline, "the token did not expire within 10 s"
        time.sleep(0.1)
    assert datetime.now(UTC) >= short.record.expires_at
    gate.assert_refused(ans)


def test_revoked_token_gets_401(gate: Gate) -> None:
    tok = gate.mint("alice")
    assert gate.get("alice", tok.token).status == 200  # now cached: argon2 is skipped
    gate.svc.web.service.revoke(tok.record.id, actor="admin:test", now=datetime.now(UTC))
    gate.assert_refused(gate.get("alice", tok.token))
    assert len(gate.app.seen) == 1


def test_challenge_survives_a_custom_error_page(make_gate: Callable[..., Gate]) -> None:
    """With an error_page 401 of its own, nginx still sends groupgate's (custom) realm, once."""
    gate = make_gate(custom_401_page=True, http={"realm": "intranet"})
    ans = gate.get("alice", "wrong")
    gate.assert_refused(ans, 'Basic realm="intranet", charset="UTF-8"')
    assert ans.body == "authentication required\n"
    tok = gate.mint("alice")
    assert gate.get("alice", tok.token).body == "hello alice\n"
