"""The groupgate command, driven in-process through main(argv) on both store backends."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.config import PolicyConfig
from daemon.model import Status, StatusChange
from daemon.service import CreatedToken, TokenService
from daemon.store import TokenStore, head_revision
from daemon.tokens import SecretHasher, generate

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def config_file(tmp_path: Path, store_url: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(f'[store]\nurl = "{store_url}"\n[log]\nformat = "json"\n'
                 "[verify.argon2]\nmemory_kib = 1024\n")
    return p


@pytest.fixture
def run(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    def _run(*argv: str, stdin: str | None = None, env: dict[str, str] | None = None
             ) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        monkeypatch.delenv("GROUPGATE_TOKEN", raising=False)
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = main(["--config", str(config_file), *argv], out=out, err=err)
        return code, out.getvalue(), err.getvalue()

    return _run


@pytest.fixture
def ready(run: Run, store_url: str) -> TokenStore:
    code, out, _ = run("db", "upgrade")
    assert code == 0 and f"upgraded: empty -> {head_revision()}" in out
    return TokenStore(store_url)


def mint(store: TokenStore, owner: str = "alice", name: str = "laptop",
         now: datetime | None = None, days: int = 30) -> CreatedToken:
    svc = TokenService(store, SecretHasher(1, 1024, 1), PolicyConfig(max_tokens_per_user=20))
    return svc.create(owner, name, timedelta(days=days), now or datetime.now(UTC))


def test_commands_refuse_a_store_without_schema(run: Run) -> None:
    code, _, err = run("token", "list")
    assert code == 78
    assert err.count("\n") == 1 and "run 'groupgate db upgrade'" in err


def test_db_upgrade_is_idempotent_and_status_reports(run: Run, ready: TokenStore) -> None:
    code, out, _ = run("db", "upgrade")
    assert code == 0 and f"is up to date (schema {head_revision()})" in out
    code, out, _ = run("db", "status")
    assert code == 0 and f"schema {head_revision()}" in out


def test_token_list_show_revoke_and_audit(run: Run, ready: TokenStore) -> None:
    a = mint(ready, "alice", "laptop")
    mint(ready, "bob", "ci")
    code, out, _ = run("token", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "OWNER", "NAME", "STATUS", "REASON", "EXPIRES", "LAST",
                                "USED"]
    assert len(lines) == 3 and a.record.display_id in out
    code, out, _ = run("token", "list", "--user", "ALICE", "--json")
    data = json.loads(out)
    assert [d["owner"] for d in data] == ["alice"] and data[0]["status"] == "active"
    assert a.token not in out

    code, out, _ = run("token", "show", a.record.display_id)
    assert code == 0 and "owner:" in out and "laptop" in out

    code, out, _ = run("token", "revoke", a.record.display_id, "--reason", "lost laptop")
    assert code == 0 and f"revoked {a.record.display_id} of alice" in out
    code, _, err = run("token", "revoke", a.record.display_id)
    assert code == 65 and "already revoked" in err

    code, out, _ = run("token", "list", "--status", "revoked", "--json")
    assert [d["id"] for d in json.loads(out)] == [a.record.display_id]

    code, out, _ = run("audit", "--token", a.record.display_id, "--json")
    events = json.loads(out)
    assert [e["action"] for e in events] == ["created", "revoke"]
    assert events[1]["actor"].startswith("cli:") and events[1]["reason"] == "lost laptop"
    code, out, _ = run("audit", "--user", "bob")
    assert code == 0 and "created" in out and "alice" not in out


def test_every_reason_through_groupgate_verify(run: Run, ready: TokenStore) -> None:
    now = datetime.now(UTC)
    ok = mint(ready, name="ok")
    sus = mint(ready, name="sus")
    rev = mint(ready, name="rev")
    exp = mint(ready, name="exp", now=now - timedelta(days=3), days=1)
    ready.apply_changes([StatusChange("suspend", sus.record.id, "alice", Status.ACTIVE,
                                      Status.SUSPENDED, "not_in_group")], actor="sync", now=now)
    run("token", "revoke", rev.record.display_id)
    cases = [
        ("ok", "alice", ok.token), ("malformed", "alice", "not-a-token"),
        ("unknown_token", "alice", str(generate())), ("wrong_user", "bob", ok.token),
        ("wrong_secret", "alice", str(generate(token_id=ok.record.id))),
        ("suspended", "alice", sus.token), ("expired", "alice", exp.token),
        ("revoked", "alice", rev.token),
    ]
    for reason, user, token in cases:
        code, out, err = run("verify", "--user", user, stdin=token + "\n")
        assert code == (0 if reason == "ok" else 1), (reason, out, err)
        assert out.startswith(reason), (reason, out)
    code, out, _ = run("verify", "--user", "alice", env={"GROUPGATE_TOKEN": ok.token})
    assert code == 0 and out.startswith("ok: ")
    code, out, _ = run("verify", "--user", "alice", stdin=sus.token)
    assert out.strip() == "suspended (not_in_group)"


def test_token_never_accepted_on_argv(run: Run, ready: TokenStore) -> None:
    code, _, err = run("verify", "--user", "alice", "gg_x")
    assert code == 65 and "unrecognized arguments" in err
    assert "gg_x" not in err or err.count("\n") == 1


@pytest.mark.parametrize("argv,fragment", [
    (["token", "show", "nope"], "not a token id"),
    (["token", "list", "--status", "weird"], "invalid choice"),
    (["audit", "--limit", "0"], "must be between 1 and 1000000"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
    (["token", "show", "gg_AAAAAAAAAAAA"], "no token gg_AAAAAAAAAAAA"),
])
def test_bad_arguments_are_one_line_exit_65(run: Run, ready: TokenStore, argv: list[str],
                                            fragment: str) -> None:
    code, _, err = run(*argv)
    assert code == 65, err
    assert err.count("\n") == 1 and fragment in err


def test_bad_config_is_exit_78_naming_key(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[policy]\nmax_lifetime_days = -1\n")
    err = io.StringIO()
    assert main(["--config", str(p), "token", "list"], err=err) == 78
    assert err.getvalue() == f"groupgate: {p}: policy.max_lifetime_days: must be >= 1\n"


def test_store_down_is_exit_69(tmp_path: Path) -> None:
    from tests.servers.net import free_port

    p = tmp_path / "c.toml"
    p.write_text(f'[store]\nurl = "postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x"\n')
    err = io.StringIO()
    assert main(["--config", str(p), "token", "list"], err=err) == 69
    assert err.getvalue().startswith("groupgate: store unavailable")
    assert err.getvalue().count("\n") == 1


def test_console_script_runs_as_a_subprocess(config_file: Path, ready: TokenStore) -> None:
    """The installed `groupgate` entry point works end to end, token via the environment."""
    tok = mint(ready)
    exe = Path(sys.executable).parent / "groupgate"
    env = {**os.environ, "GROUPGATE_CONFIG": str(config_file), "GROUPGATE_TOKEN": tok.token}
    proc = subprocess.run([str(exe), "verify", "--user", "Alice"], env=env, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"ok: {tok.record.display_id} of alice")
    assert tok.token not in proc.stdout + proc.stderr
