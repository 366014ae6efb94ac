"""Tokens follow the directory: sync against a real slapd, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import ldap3
import pytest
from structlog.testing import capture_logs

from daemon.cli import main
from daemon.config import Config
from daemon.directory import from_config
from daemon.errors import DirectoryUnavailable, SyncRefused
from daemon.model import Status
from daemon.service import CreatedToken, TokenService
from daemon.store import TokenStore
from daemon.sync import run_expire, run_sync
from daemon.tokens import SecretHasher
from daemon.verify import Reason, Verifier
from tests.integration.conftest import slapd_config

SetPw = Callable[[str], None]
TOKEN_USERS = "cn=token-users,ou=groups,dc=example,dc=org"


def member_change(server: Any, op: str, dn: str, group: str = TOKEN_USERS) -> None:
    conn = server.admin_connection()
    kind = ldap3.MODIFY_DELETE if op == "remove" else ldap3.MODIFY_ADD
    assert conn.modify(group, {"member": [(kind, [dn])]}), conn.result
    conn.unbind()


def uid(name: str) -> str:
    return f"uid={name},ou=people,dc=example,dc=org"


class World:
    """A slapd, a store and the config that joins them, for one test."""

    def __init__(self, server: Any, store: TokenStore, cfg: Config, now: datetime) -> None:
        self.server, self.store, self.cfg, self.now = server, store, cfg, now
        self.directory = from_config(cfg.directory, cfg.policy)
        self.service = TokenService(store, SecretHasher(1, 1024, 1), cfg.policy)

    def mint(self, owner: str, name: str = "t", days: int = 30) -> CreatedToken:
        return self.service.create(owner, name, timedelta(days=days), self.now)

    def sync(self, **kw: Any) -> Any:
        return run_sync(self.directory, self.store, self.cfg.policy, self.cfg.sync,
                        now=self.now, **kw)

    def status(self, created: CreatedToken) -> tuple[Status, str | None]:
        t = self.store.get_token(created.record.id)
        assert t is not None
        return t.status, t.status_reason


@pytest.fixture
def world(fresh_slapd: Any, store: TokenStore, bind_password: SetPw, now: datetime) -> World:
    bind_password(fresh_slapd.service_password)
    return World(fresh_slapd, store, slapd_config(fresh_slapd), now)


def test_leaving_and_rejoining_the_group(world: World) -> None:
    """Removed from token-users: suspended (verify says so); added back: active again."""
    a = world.mint("alice")
    b = world.mint("bob")
    assert world.sync().plan == ()
    member_change(world.server, "remove", uid("alice"))
    with capture_logs() as logs:
        report = world.sync()
    assert [(c.kind, c.owner, c.reason) for c in report.applied] == [
        ("suspend", "alice", "not_in_group")]
    assert world.status(a) == (Status.SUSPENDED, "not_in_group")
    assert world.status(b) == (Status.ACTIVE, None)
    assert any(e["event"] == "token.suspended" and e["owner"] == "alice" for e in logs)
    finished = [e for e in logs if e["event"] == "sync.finished"]
    assert len(finished) == 1 and finished[0]["suspended"] == 1
    v = Verifier.from_url(world.store.url, clock=lambda: world.now)
    assert v.verify("alice", a.token).reason is Reason.SUSPENDED

    member_change(world.server, "add", uid("alice"))
    report = world.sync()
    assert [c.kind for c in report.applied] == ["reactivate"]
    assert world.status(a) == (Status.ACTIVE, None)
    assert v.verify("alice", a.token).ok
    events = world.store.audit_events(token_id=a.record.id)
    actions = [(e.action, e.actor, e.reason) for e in events]
    assert actions == [("created", "alice", None), ("suspend", "sync", "not_in_group"),
                       ("reactivate", "sync", None)]
    v.close()


def test_disabled_and_deleted_users(world: World) -> None:
    e = world.mint("erin")
    f = world.mint("bob")
    conn = world.server.admin_connection()
    assert conn.modify(uid("erin"), {"pwdAccountLockedTime": [(ldap3.MODIFY_REPLACE,
                                                               ["000001010000Z"])]})
    assert conn.delete(uid("bob")), conn.result
    conn.unbind()
    world.sync()
    assert world.status(e) == (Status.SUSPENDED, "disabled")
    assert world.status(f) == (Status.SUSPENDED, "not_found")
    recorded = world.store.directory_user("bob")
    assert recorded is not None and recorded["present"] is False


def test_nested_group_membership_counts(world: World) -> None:
    c = world.mint("carol")
    world.sync()
    assert world.status(c) == (Status.ACTIVE, None)
    member_change(world.server, "remove", "cn=token-admins,ou=groups,dc=example,dc=org")
    world.sync()
    assert world.status(c) == (Status.SUSPENDED, "not_in_group")


def test_sync_is_idempotent_and_records_directory_users(world: World) -> None:
    world.mint("alice")
    world.mint("dave")
    first = world.sync()
    assert [c.owner for c in first.applied] == ["dave"]
    assert world.sync().plan == ()
    info = world.store.directory_user("alice")
    assert info is not None and info["allowed"] and info["groups"] == ["token-users"]
    state = world.store.sync_state()
    assert state is not None and state["last_result"] == "ok"


def test_revoked_and_expired_tokens_are_never_touched(world: World) -> None:
    r = world.mint("alice", "r")
    world.service.revoke(r.record.id, actor="admin", now=world.now)
    x = world.mint("alice", "x", days=1)
    world.now += timedelta(days=2)
    report = world.sync()
    assert [(c.kind, c.token_id) for c in report.applied] == [("expire", x.record.id)]
    member_change(world.server, "remove", uid("alice"))
    assert world.sync().plan == ()
    assert world.status(r)[0] is Status.REVOKED and world.status(x)[0] is Status.EXPIRED


def test_empty_allowed_group_changes_nothing(world: World) -> None:
    """A group that resolves to nobody is a broken directory, not a mass exodus."""
    world.cfg = slapd_config(world.server, policy={"allowed_groups": ["empty-group"]})
    world.directory = from_config(world.cfg.directory, world.cfg.policy)
    a = world.mint("alice")
    with capture_logs() as logs, pytest.raises(SyncRefused, match="zero members: empty-group"):
        world.sync()
    with pytest.raises(SyncRefused):
        world.sync(force=True)  # not forceable
    assert world.status(a) == (Status.ACTIVE, None)
    assert any(e["event"] == "sync.refused" for e in logs)
    assert world.store.sync_state()["last_result"] == "refused"  # type: ignore[index]


def test_mass_removal_is_refused_until_forced(world: World) -> None:
    world.cfg = slapd_config(world.server, sync={"max_suspend_count": 2,
                                                 "max_suspend_fraction": 0.5})
    toks = [world.mint(n) for n in ("alice", "bob", "erin", "zoë")]
    for n in ("alice", "bob", "erin"):
        member_change(world.server, "remove", uid(n))
    with pytest.raises(SyncRefused, match="would suspend 3 of 4 active tokens"):
        world.sync()
    assert {world.status(t)[0] for t in toks} == {Status.ACTIVE}
    report = world.sync(force=True)
    assert len(report.applied) == 3


def test_outage_changes_nothing_and_the_next_run_converges(world: World) -> None:
    a = world.mint("alice")
    member_change(world.server, "remove", uid("alice"))
    world.server.stop()
    with capture_logs() as logs, pytest.raises(DirectoryUnavailable):
        world.sync()
    assert [e["event"] for e in logs if e["event"].startswith("sync.")] == ["sync.failed"]
    assert world.status(a) == (Status.ACTIVE, None)
    assert world.store.sync_state()["last_result"] == "failed"  # type: ignore[index]
    world.server.start()
    world.sync()
    assert world.status(a) == (Status.SUSPENDED, "not_in_group")


def test_expire_pass(world: World) -> None:
    x = world.mint("alice", days=1)
    world.now += timedelta(days=1)
    assert [c.kind for c in run_expire(world.store, now=world.now, dry_run=True).plan] == [
        "expire"]
    assert world.status(x)[0] is Status.ACTIVE
    run_expire(world.store, now=world.now)
    assert world.status(x) == (Status.EXPIRED, "expired")


# --- the CLI ---------------------------------------------------------------------------------

@pytest.fixture
def cli(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
        ) -> Callable[..., tuple[int, str, str]]:
    s = world.server
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"""
[store]
url = "{world.store.url}"
[directory]
urls = ["{s.url}"]
base_dn = "{s.base_dn}"
bind_dn = "{s.service_dn}"
[policy]
allowed_groups = ["token-users"]
admin_groups = ["token-admins"]
max_lifetime_days = 90
[[policy.group_limits]]
group = "long-lived"
max_lifetime_days = 365
[verify.argon2]
memory_kib = 1024
[log]
format = "json"
""")

    def run(*argv: str, stdin: str | None = None) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = main(["--config", str(cfg), *argv], out=out, err=err)
        return code, out.getvalue(), err.getvalue()

    return run


def test_cli_token_create_for_own_account(cli: Callable[..., Any], world: World) -> None:
    code, out, err = cli("token", "create", "--user", "Alice", "--name", "laptop",
                         "--password-stdin", stdin="alice-pw\n")
    assert code == 0, err
    token = out.strip()
    assert token.startswith("gg_") and "shown only this once" in err
    code, out, _ = cli("verify", "--user", "alice", stdin=token)
    assert code == 0
    [t] = world.store.list_tokens(owner="alice")
    assert t.expires_at - t.created_at == timedelta(days=30)


@pytest.mark.parametrize("argv,stdin,code,fragment", [
    (["--user", "alice", "--name", "x"], "wrong\n", 77, "wrong username or password"),
    (["--user", "dave", "--name", "x"], "dave-pw\n", 77,
     "dave is not a member of an allowed group (token-users)"),
    (["--user", "alice", "--name", "x", "--expires-in", "91d"], "alice-pw\n", 65,
     "exceeds the policy maximum of 90 days"),
    (["--user", "alice", "--name", "x", "--expires-in", "soon"], "alice-pw\n", 65,
     "--expires-in"),
    (["--user", "ivan", "--name", "x"], "ivan-pw\n", 77, "wrong username or password"),
])
def test_cli_token_create_refusals(cli: Callable[..., Any], argv: list[str], stdin: str,
                                   code: int, fragment: str) -> None:
    got, out, err = cli("token", "create", "--password-stdin", *argv, stdin=stdin)
    assert got == code and fragment in err and err.count("\n") == 1 and out == ""


def test_cli_group_limit_allows_longer_tokens(cli: Callable[..., Any]) -> None:
    code, out, err = cli("token", "create", "--user", "bob", "--name", "ci", "--expires-in",
                         "365d", "--password-stdin", "--json", stdin="bob-pw\n")
    assert code == 0, err
    data = json.loads(out)
    assert data["owner"] == "bob" and data["token"].startswith("gg_")
    code, _, err = cli("token", "create", "--user", "alice", "--name", "ci", "--expires-in",
                       "365d", "--password-stdin", stdin="alice-pw\n")
    assert code == 65


def test_cli_sync_dry_run_check_and_apply(cli: Callable[..., Any], world: World) -> None:
    a = world.mint("alice")
    member_change(world.server, "remove", uid("alice"))
    code, out, _ = cli("sync", "--dry-run")
    assert code == 0
    assert f"would suspend {a.record.display_id} of alice: not_in_group" in out
    assert world.status(a)[0] is Status.ACTIVE
    code, out, _ = cli("sync", "--check")
    assert code == 1
    code, out, _ = cli("sync")
    assert code == 0 and f"suspend {a.record.display_id} of alice: not_in_group" in out
    code, out, _ = cli("sync", "--check")
    assert code == 0 and "plan: 0 suspend" in out


def test_cli_sync_outage_is_exit_69_and_one_error_line(cli: Callable[..., Any],
                                                    world: World) -> None:
    """The last stderr line is the one-line error; log events before it are JSON."""
    world.mint("alice")
    world.server.stop()
    code, _, err = cli("sync")
    last = err.splitlines()[-1]
    assert code == 69 and last.startswith("groupgate: snapshot: no directory server answered")
    assert json.loads(err.splitlines()[0])["event"] == "directory.server_failed"
    world.server.start()
    code, _, err = cli("sync")
    assert code == 0, err


def test_cli_directory_check_and_user(cli: Callable[..., Any], world: World) -> None:
    code, out, _ = cli("directory", "check")
    assert code == 0
    assert "group token-users:" in out and "8 members" in out
    world.mint("carol")
    code, out, _ = cli("directory", "user", "Carol")
    assert code == 0
    assert "admin:       yes" in out and "tokens should be: active" in out
    code, out, _ = cli("directory", "user", "dave")
    assert "allowed:     no" in out and "tokens should be: suspended (not_in_group)" in out


def test_cli_without_directory_config_says_so(tmp_path: Path, store_url: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[store]\nurl = "{store_url}"\n')
    err = io.StringIO()
    assert main(["--config", str(cfg), "sync"], err=err) == 78
    assert "directory.urls: no directory configured" in err.getvalue()


