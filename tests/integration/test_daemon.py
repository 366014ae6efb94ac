"""`groupgate run` end to end: the real console script as a subprocess, a real slapd, both stores.

Each test writes a TOML config with one-second intervals, starts the daemon with its JSON log on
stderr captured to a file, acts on the directory or the store, and polls the store (or the log)
with a deadline. Every process a test starts is stopped by its PID in a ``finally``: SIGTERM,
then SIGKILL after a deadline; a child also gets SIGKILL if the test process itself dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import ldap3
import pytest
import sqlalchemy as sa

from daemon.config import PolicyConfig
from daemon.model import AuditRecord, Status, TokenRecord
from daemon.service import CreatedToken, TokenService
from daemon.store import TokenStore
from daemon.tokens import SecretHasher
from tests.servers.net import free_port, pid_connected_to

GROUPGATE = str(Path(sys.executable).parent / "groupgate")
TOKEN_USERS = "cn=token-users,ou=groups,dc=example,dc=org"
LONG_LIVED = "cn=long-lived,ou=groups,dc=example,dc=org"
STOP_TIMEOUT = 15.0
T = TypeVar("T")


# --- waiting ------------------------------------------------------------------------------------

def poll(fn: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Call `fn` until it returns something truthy and return that; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what} "
                                 f"(last value: {last!r})")
        time.sleep(interval)


# --- config -------------------------------------------------------------------------------------

def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def config_text(store_url: str, server: Any | None, **sections: Mapping[str, Any]) -> str:
    """A daemon config with one-second schedules; `sections` override keys per section."""
    data: dict[str, dict[str, Any]] = {
        "store": {"url": store_url},
        "policy": {"allowed_groups": ["token-users"], "admin_groups": ["token-admins"],
                   "max_tokens_per_user": 10},
        "sync": {"interval": "1s", "jitter": "0s", "expire_interval": "1s"},
        "log": {"format": "json", "level": "info"},
    }
    if server is not None:
        data["directory"] = {"urls": [server.url], "base_dn": server.base_dn,
                             "bind_dn": server.service_dn, "flavor": "openldap",
                             "page_size": 50, "connect_timeout_seconds": 2,
                             "timeout_seconds": 10}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    lines: list[str] = []
    for name, values in data.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)


def write_atomically(path: Path, text: str) -> None:
    """Replace the file in one step, so a reload never reads half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- processes ----------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the test process dies without cleaning up."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Groupgate:
    """One `groupgate` subprocess with its stderr (the JSON log) in a file."""

    def __init__(self, argv: Sequence[str], *, config: Path, env: Mapping[str, str],
                 log_path: Path) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.out_path = log_path.with_suffix(".out")
        full_env = {k: v for k, v in os.environ.items()
                    if k not in ("CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_USEC",
                                 "WATCHDOG_PID", "LISTEN_FDS")}
        full_env.update(env)
        full_env["GROUPGATE_CONFIG"] = str(config)
        with log_path.open("wb") as err, self.out_path.open("wb") as out:
            self.popen = subprocess.Popen(
                [GROUPGATE, *self.argv], env=full_env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=err, preexec_fn=_die_with_parent)
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log events so far (a line being written is skipped until complete)."""
        found: list[dict[str, Any]] = []
        for line in self.log_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and (name is None or event.get("event") == name):
                found.append(event)
        return found

    def wait_event(self, name: str, timeout: float = 15.0, *, count: int = 1,
                   where: Callable[[dict[str, Any]], bool] = lambda e: True
                   ) -> list[dict[str, Any]]:
        """Poll the log until `count` events called `name` (matching `where`) are there."""
        def found() -> list[dict[str, Any]]:
            if not self.running and len([e for e in self.events(name) if where(e)]) < count:
                raise AssertionError(f"groupgate {self.argv} (pid {self.pid}) exited with "
                                     f"{self.popen.returncode} before logging {name}:\n"
                                     + self.log_text()[-3000:])
            hits = [e for e in self.events(name) if where(e)]
            return hits if len(hits) >= count else []

        return poll(found, timeout, f"{count} x {name} in {self.log_path.name}")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"groupgate {self.argv} (pid {self.pid}) still running after "
                                 f"{timeout:.1f}s:\n" + self.log_text()[-3000:]) from None

    def signal(self, sig: int) -> None:
        if self.running:
            os.kill(self.pid, sig)

    def kill9(self) -> None:
        """SIGKILL by PID and reap it."""
        if self.running:
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=STOP_TIMEOUT)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then SIGKILL at the deadline; returns the exit code."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                return self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
        return self.popen.wait(timeout=timeout)


Spawn = Callable[..., Groupgate]


@contextlib.contextmanager
def spawned_processes(log_dir: Path) -> Iterator[Spawn]:
    """Start `groupgate ARGV` subprocesses; on the way out every one is stopped by its PID."""
    procs: list[Groupgate] = []

    def _spawn(*argv: str, config: Path, name: str | None = None,
               env: Mapping[str, str] | None = None) -> Groupgate:
        label = name or f"{argv[0]}-{len(procs)}"
        proc = Groupgate(argv, config=config, env=env or {},
                         log_path=log_dir / f"{label}.log")
        procs.append(proc)
        return proc

    try:
        yield _spawn
    finally:
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.stop(timeout=5.0)
        for proc in procs:
            if proc.popen.poll() is None:  # the SIGKILL fallback of stop() was not reaped
                with contextlib.suppress(Exception):
                    proc.kill9()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """`spawn("run", config=...)`: a groupgate subprocess, logging to tmp_path/<name>.log."""
    with spawned_processes(tmp_path) as s:
        yield s


# --- directory and store helpers ------------------------------------------------------------

def uid(name: str) -> str:
    return f"uid={name},ou=people,dc=example,dc=org"


def member_change(server: Any, op: str, dn: str | Sequence[str], group: str = TOKEN_USERS
                  ) -> None:
    kinds = {"add": ldap3.MODIFY_ADD, "remove": ldap3.MODIFY_DELETE,
             "replace": ldap3.MODIFY_REPLACE}
    values = [dn] if isinstance(dn, str) else list(dn)
    conn = server.admin_connection()
    try:
        assert conn.modify(group, {"member": [(kinds[op], values)]}), conn.result
    finally:
        conn.unbind()


def open_store(url: str) -> TokenStore:
    """A store with the schema in place (the daemon refuses a store without one)."""
    store = TokenStore(url, check_schema=False)
    store.upgrade()
    return store


def minter(store: TokenStore) -> TokenService:
    return TokenService(store, SecretHasher(1, 1024, 1),
                        PolicyConfig(max_lifetime_days=90, max_tokens_per_user=10))


def mint(store: TokenStore, owner: str, name: str = "t",
         lifetime: timedelta = timedelta(days=30)) -> CreatedToken:
    """A token created now (real time: the daemon runs on the real clock)."""
    return minter(store).create(owner, name, lifetime, datetime.now(UTC))


def status_of(store: TokenStore, token: CreatedToken | TokenRecord) -> tuple[Status, str | None]:
    tid = token.record.id if isinstance(token, CreatedToken) else token.id
    t = store.get_token(tid)
    assert t is not None
    return t.status, t.status_reason


def wait_status(store: TokenStore, token: CreatedToken, status: Status, reason: str | None,
                timeout: float, proc: Groupgate | None = None) -> None:
    def check() -> bool:
        if proc is not None and not proc.running:
            raise AssertionError(f"the daemon exited with {proc.popen.returncode}:\n"
                                 + proc.log_text()[-3000:])
        return status_of(store, token) == (status, reason)

    poll(check, timeout, f"{token.record.owner}'s token to be {status.value} ({reason})")


def consistent_read(store: TokenStore) -> tuple[list[AuditRecord], list[TokenRecord]]:
    """The audit log and the tokens from ONE snapshot: read separately, a commit landing in
    between would look like a token whose audit row is missing."""
    from daemon.store import _token_from_row, audit_t, tokens_t

    with store.engine.connect() as conn:
        if store.backend == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            audit = conn.execute(sa.select(audit_t).order_by(audit_t.c.id)).all()
            rows = conn.execute(sa.select(*[c for c in tokens_t.c if c.name != "secret_hash"])
                                ).all()
    events = [AuditRecord(id=r.id, at=r.at, actor=r.actor, action=r.action,
                          token_id=r.token_id, owner=r.owner, reason=r.reason,
                          details=json.loads(r.details or "{}")) for r in audit]
    return events, [_token_from_row(r) for r in rows]


def assert_store_consistent(store: TokenStore) -> dict[str, list[AuditRecord]]:
    """Every token's status (and reason) is what its last audit row says, and its audit rows
    form one chain (each change starts from the state the previous one left), so no change was
    half-applied or applied twice. Returns the audit rows by token id.
    """
    by_token: dict[str, list[AuditRecord]] = {}
    events, tokens = consistent_read(store)
    for event in events:
        if event.token_id is not None:
            by_token.setdefault(event.token_id, []).append(event)
    assert {t.id for t in tokens} <= set(by_token), "a token without its created audit row"
    for t in tokens:
        rows = by_token[t.id]
        assert rows[0].action == "created", (t.id, [r.action for r in rows])
        state: tuple[str, str | None] = (Status.ACTIVE.value, None)
        for r in rows[1:]:
            assert r.details.get("from") == state[0], (
                f"{t.id}: {r.action} from {r.details.get('from')} but the token was {state[0]}: "
                f"{[(x.action, x.actor) for x in rows]}")
            state = (r.details["to"], r.reason)
        assert (t.status.value, t.status_reason) == state, (
            f"{t.id} is {t.status.value} ({t.status_reason}) but its audit trail ends at "
            f"{state}: {[(x.action, x.actor, x.reason) for x in rows]}")
    return by_token


def actions(store: TokenStore, token: CreatedToken) -> list[tuple[str, str]]:
    return [(e.action, e.actor) for e in store.audit_events(token_id=token.record.id)]


def leader_lock_holder(store: TokenStore) -> str:
    """Who holds advisory locks in this PostgreSQL database, for failure messages.

    groupgate's leader lock has one key per database, not per schema: a groupgate of another
    test run on the same database can keep every instance here standing by.
    """
    if store.backend != "postgresql":
        return ""
    with store.engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT l.pid, a.client_port, a.backend_start, "
            "(l.classid::bigint << 32) | l.objid::bigint AS key FROM pg_locks l "
            "JOIN pg_stat_activity a USING (pid) JOIN pg_database d ON d.oid = l.database "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
            "AND d.datname = current_database()")).all()
    if not rows:
        return "; nobody holds an advisory lock in this database"
    return "; advisory locks in this database: " + ", ".join(
        f"key {r.key:#x} by backend {r.pid} (client port {r.client_port}, since "
        f"{r.backend_start:%H:%M:%S})" for r in rows)


# --- fixtures -----------------------------------------------------------------------------------

class Env:
    """A slapd, a store and a config file for one test."""

    def __init__(self, server: Any, store: TokenStore, tmp_path: Path, spawn: Spawn) -> None:
        self.server, self.store, self.spawn = server, store, spawn
        self.config = tmp_path / "groupgate.toml"
        self.env = {"GROUPGATE_BIND_PASSWORD": server.service_password}

    def write_config(self, **sections: Mapping[str, Any]) -> None:
        write_atomically(self.config, config_text(self.store.url, self.server, **sections))

    def run(self, name: str = "run") -> Groupgate:
        return self.spawn("run", config=self.config, env=self.env, name=name)

    def start(self, name: str = "run") -> Groupgate:
        """`groupgate run`, returned once its first sync has finished."""
        proc = self.run(name)
        proc.wait_event("daemon.started")
        try:
            proc.wait_event("sync.finished")
        except AssertionError as exc:
            raise AssertionError(f"{exc}{leader_lock_holder(self.store)}") from None
        return proc


@pytest.fixture
def env(fresh_slapd: Any, store_url: str, tmp_path: Path, spawn: Spawn) -> Iterator[Env]:
    store = open_store(store_url)
    e = Env(fresh_slapd, store, tmp_path, spawn)
    e.write_config()
    try:
        yield e
    finally:
        store.close()


# --- the tests ----------------------------------------------------------------------------------

def test_run_follows_membership_and_expires_tokens(env: Env) -> None:
    """Leaving the group suspends, rejoining reactivates, a short token expires; SIGTERM exits 0."""
    proc = env.start()
    alice = mint(env.store, "alice", "laptop")
    bob = mint(env.store, "bob", "ci")
    short = mint(env.store, "bob", "short", timedelta(seconds=2))

    member_change(env.server, "remove", uid("alice"))
    wait_status(env.store, alice, Status.SUSPENDED, "not_in_group", 10, proc)
    member_change(env.server, "add", uid("alice"))
    wait_status(env.store, alice, Status.ACTIVE, None, 10, proc)
    wait_status(env.store, short, Status.EXPIRED, "expired", 10, proc)

    assert actions(env.store, alice) == [("created", "alice"), ("suspend", "sync"),
                                         ("reactivate", "sync")]
    assert actions(env.store, bob) == [("created", "bob")]
    # both the expire job and the expiry part of a sync may get there first; once, either way
    [(action, actor)] = actions(env.store, short)[1:]
    assert action == "expire" and actor in ("expire", "sync")
    assert status_of(env.store, bob) == (Status.ACTIVE, None)
    assert_store_consistent(env.store)

    assert proc.stop() == 0
    assert [e["event"] for e in proc.events()][-1] == "daemon.stopped"
    assert proc.events("daemon.stopping")[0]["signal"] == "SIGTERM"
    assert not proc.events("job.crashed") and not proc.events("job.failed")


def test_sighup_with_a_bad_config_keeps_the_old_one(env: Env) -> None:
    """Invalid TOML or an unknown key: reload refused, the daemon keeps syncing with the old
    config."""
    proc = env.start()
    alice = mint(env.store, "alice", "laptop")

    env.config.write_text("[policy\nallowed_groups = [\n")
    proc.signal(signal.SIGHUP)
    [failed] = proc.wait_event("config.reload_failed")
    assert "invalid TOML" in failed["error"]
    member_change(env.server, "remove", uid("alice"))
    wait_status(env.store, alice, Status.SUSPENDED, "not_in_group", 10, proc)

    write_atomically(env.config, config_text(env.store.url, env.server,
                                             policy={"allowed_groups": ["long-lived"]},
                                             sync={"intervall": "1s"}))
    proc.signal(signal.SIGHUP)
    failed = proc.wait_event("config.reload_failed", count=2)[1]
    assert "sync.intervall: unknown key" in failed["error"]
    member_change(env.server, "add", uid("alice"))  # token-users still rules, not long-lived
    wait_status(env.store, alice, Status.ACTIVE, None, 10, proc)

    assert proc.running and not proc.events("config.reloaded")
    assert actions(env.store, alice) == [("created", "alice"), ("suspend", "sync"),
                                         ("reactivate", "sync")]
    assert proc.stop() == 0


def test_sighup_with_a_good_config_applies_it(env: Env) -> None:
    """allowed_groups becomes [long-lived]: alice (not in it) is suspended after the reload,
    bob (in it) stays active, and later directory changes are still followed (a reload once
    re-added the sync job paused: APScheduler's add_job(next_run_time=None))."""
    proc = env.start()
    alice = mint(env.store, "alice", "laptop")
    bob = mint(env.store, "bob", "ci")
    proc.wait_event("sync.finished", count=len(proc.events("sync.finished")) + 1)
    assert status_of(env.store, alice) == (Status.ACTIVE, None)

    env.write_config(policy={"allowed_groups": ["long-lived"]})
    proc.signal(signal.SIGHUP)
    proc.wait_event("config.reloaded")
    wait_status(env.store, alice, Status.SUSPENDED, "not_in_group", 10, proc)
    assert status_of(env.store, bob) == (Status.ACTIVE, None)

    member_change(env.server, "add", uid("alice"), group=LONG_LIVED)
    wait_status(env.store, alice, Status.ACTIVE, None, 10, proc)
    assert not proc.events("config.reload_failed")
    assert_store_consistent(env.store)
    assert proc.stop() == 0


BULK_USERS = 3000
BULK_TOKENS = 40


def test_sigterm_during_a_sync_exits_0_and_applies_nothing_half(env: Env) -> None:
    """SIGTERM while the snapshot is being read (a big directory, tiny pages): exit 0 within a
    few seconds, the plan is dropped before its transaction, the store is consistent."""
    env.server.add_bulk_users(BULK_USERS)
    owners = [f"bulk{i:05d}" for i in range(BULK_TOKENS)]
    tokens = [mint(env.store, o, "bulk") for o in owners]
    # the bulk users are in no allowed group: the first sync plans to suspend all their tokens
    env.write_config(directory={"page_size": 2}, sync={"max_suspend_count": 100000})

    proc = env.run()
    proc.wait_event("daemon.started")
    poll(lambda: pid_connected_to(proc.pid, env.server.port), 10,
         "the daemon's snapshot connection to slapd")
    sent = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit(10) == 0
    took = time.monotonic() - sent

    names = [e["event"] for e in proc.events()]
    assert "sync.aborted" in names and "sync.finished" not in names, names
    assert names[-1] == "daemon.stopped"
    assert took < 8, f"exit took {took:.1f}s after SIGTERM"
    assert {status_of(env.store, t) for t in tokens} == {(Status.ACTIVE, None)}
    by_token = assert_store_consistent(env.store)
    assert all(len(by_token[t.record.id]) == 1 for t in tokens)


def test_second_run_on_one_sqlite_file_exits_75(tmp_path: Path, spawn: Spawn) -> None:
    """A second `groupgate run` on the same SQLite file: exit 75, one line naming the first
    pid; the first keeps running and keeps its lock."""
    url = f"sqlite:///{tmp_path}/groupgate.db"
    open_store(url).close()
    config = tmp_path / "groupgate.toml"
    write_atomically(config, config_text(url, None))
    first = spawn("run", config=config, name="first")
    first.wait_event("daemon.started")

    other = spawn("run", config=config, name="refused")
    assert other.wait_exit(15) == 75
    lines = other.log_text().splitlines()
    text_lines = [ln for ln in lines if not ln.startswith("{")]
    assert text_lines == lines[-1:], other.log_text()  # JSON log lines, then one error line
    assert text_lines[0].startswith(
        f"groupgate: another groupgate run (pid {first.pid}) already uses "
        f"{tmp_path}/groupgate.db;"), text_lines[0]
    assert not other.events("daemon.started")
    # the refused one left the first one's lock file (and its pid) alone
    assert (tmp_path / "groupgate.db.lock").read_text() == f"{first.pid}\n"

    store = TokenStore(url)
    try:  # and the first still runs its jobs: a token past its expiry gets expired
        made = datetime.now(UTC) - timedelta(hours=1)
        late = minter(store).create("alice", "late", timedelta(seconds=1), made)
        wait_status(store, late, Status.EXPIRED, "expired", 10, first)
        assert actions(store, late)[-1] == ("expire", "expire")
    finally:
        store.close()
    assert first.running
    assert first.stop() == 0


def test_directory_down_at_start_up_then_converges(env: Env) -> None:
    """No directory at start-up: the daemon keeps running, logs the failures, expiry still
    works, and once slapd is back the pending change is applied."""
    alice = mint(env.store, "alice", "laptop")
    short = mint(env.store, "bob", "short", timedelta(seconds=2))
    member_change(env.server, "remove", uid("alice"))
    env.server.stop()

    proc = env.run()
    proc.wait_event("daemon.started")
    proc.wait_event("sync.failed")
    [failed] = proc.wait_event("job.failed", where=lambda e: e["job"] == "sync")
    assert "no directory server answered" in failed["error"]
    # only the expire job can expire it while every sync fails at the snapshot
    wait_status(env.store, short, Status.EXPIRED, "expired", 10, proc)
    assert actions(env.store, short)[-1] == ("expire", "expire")
    assert status_of(env.store, alice) == (Status.ACTIVE, None)
    state = env.store.sync_state()
    assert state is not None and state["last_result"] == "failed"
    assert proc.running

    env.server.start()
    wait_status(env.store, alice, Status.SUSPENDED, "not_in_group", 20, proc)
    poll(lambda: (env.store.sync_state() or {}).get("last_result") == "ok", 10,
         "sync_state ok")
    assert_store_consistent(env.store)
    assert proc.stop() == 0


def test_run_serves_the_http_service_when_configured(env: Env) -> None:
    """With http.listen set, `groupgate run` answers forward auth next to its jobs."""
    import httpx

    port = free_port()
    env.write_config(http={"listen": f"127.0.0.1:{port}"})
    proc = env.start()
    proc.wait_event("http.started")
    alice = mint(env.store, "alice", "laptop")
    base = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{base}/healthz", timeout=5).status_code == 204
    ok = httpx.get(f"{base}/auth", auth=("alice", alice.token), timeout=5)
    assert ok.status_code == 204 and ok.headers["x-auth-user"] == "alice"
    assert httpx.get(f"{base}/auth", auth=("bob", alice.token), timeout=5).status_code == 401
    assert proc.stop() == 0
