"""Several groupgate processes on one store, and processes killed with SIGKILL.

Two `groupgate run` on one PostgreSQL store elect one leader through the advisory lock; when
the leader dies the other takes over; and `groupgate sync` killed at random moments leaves the
store with the whole plan applied or none of it, on both backends.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from daemon.model import Status, StatusChange, TokenRecord
from daemon.store import TokenStore
from tests.integration.test_daemon import (
    Groupgate,
    Spawn,
    actions,
    assert_store_consistent,
    config_text,
    leader_lock_holder,
    member_change,
    mint,
    minter,
    open_store,
    poll,
    spawned_processes,
    uid,
    wait_status,
    write_atomically,
)

BULK_GROUP = "cn=bulk-users,ou=groups,dc=example,dc=org"


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """`spawn("run", config=...)`: a groupgate subprocess, logging to tmp_path/<name>.log."""
    with spawned_processes(tmp_path) as s:
        yield s


class Pair:
    """Two `groupgate run` processes on one PostgreSQL store and one slapd."""

    def __init__(self, server: Any, store: TokenStore, config: Path, spawn: Spawn) -> None:
        self.server, self.store = server, store
        env = {"GROUPGATE_BIND_PASSWORD": server.service_password}
        self.procs = [spawn("run", config=config, env=env, name=n) for n in ("one", "two")]
        for p in self.procs:
            p.wait_event("daemon.started")

    def leader(self, timeout: float = 10.0) -> tuple[Groupgate, Groupgate]:
        """(leader, standby), once one of them has logged leader.elected."""
        def elected() -> list[Groupgate]:
            for p in self.procs:
                assert p.running, p.log_text()[-3000:]
            return [p for p in self.procs if p.events("leader.elected")]

        try:
            [leader] = poll(elected, timeout, "a leader.elected event")
        except AssertionError as exc:
            raise AssertionError(f"{exc}{leader_lock_holder(self.store)}") from None
        [standby] = [p for p in self.procs if p is not leader]
        return leader, standby


@pytest.fixture
def pair(fresh_slapd: Any, pg_schema_url: str, tmp_path: Path, spawn: Spawn) -> Iterator[Pair]:
    store = open_store(pg_schema_url)
    config = tmp_path / "groupgate.toml"
    # debug: the standby's job.skipped events show it is there and deferring
    write_atomically(config, config_text(pg_schema_url, fresh_slapd, log={"level": "debug"}))
    try:
        yield Pair(fresh_slapd, store, config, spawn)
    finally:
        store.close()


def _skipped(p: Groupgate) -> int:
    return len(p.events("job.skipped"))


def test_two_instances_elect_one_leader_and_apply_once(pair: Pair) -> None:
    """Exactly one of two `groupgate run` leads; a directory change is applied once, by it."""
    leader, standby = pair.leader()
    alice = mint(pair.store, "alice", "laptop")
    standby.wait_event("job.skipped", count=2, where=lambda e: e["job"] == "sync")

    member_change(pair.server, "remove", uid("alice"))
    wait_status(pair.store, alice, Status.SUSPENDED, "not_in_group", 10, leader)
    # both keep ticking for a while after the change: a second apply would show up now
    leader.wait_event("sync.finished", count=len(leader.events("sync.finished")) + 2)
    standby.wait_event("job.skipped", count=_skipped(standby) + 2)

    assert actions(pair.store, alice) == [("created", "alice"), ("suspend", "sync")]
    assert len(leader.events("leader.elected")) == 1 and not standby.events("leader.elected")
    assert len(leader.events("token.suspended")) == 1
    assert not standby.events("sync.finished") and not standby.events("token.suspended")
    assert_store_consistent(pair.store)
    assert [p.stop() for p in pair.procs] == [0, 0]


def test_kill_9_of_the_leader_hands_over(pair: Pair) -> None:
    """SIGKILL the leader: the standby is elected within a few intervals and applies the next
    change; nothing is applied twice."""
    leader, standby = pair.leader()
    alice = mint(pair.store, "alice", "laptop")
    member_change(pair.server, "remove", uid("alice"))
    wait_status(pair.store, alice, Status.SUSPENDED, "not_in_group", 10, leader)

    leader.kill9()
    killed_at = time.monotonic()
    standby.wait_event("leader.elected", timeout=5)
    took_over = time.monotonic() - killed_at
    member_change(pair.server, "add", uid("alice"))
    wait_status(pair.store, alice, Status.ACTIVE, None, 10, standby)
    standby.wait_event("sync.finished", count=len(standby.events("sync.finished")) + 2)

    assert took_over < 5
    assert actions(pair.store, alice) == [("created", "alice"), ("suspend", "sync"),
                                         ("reactivate", "sync")]
    assert [e["owner"] for e in leader.events("token.suspended")] == ["alice"]
    assert not leader.events("token.reactivated")
    assert [e["owner"] for e in standby.events("token.reactivated")] == ["alice"]
    assert not standby.events("token.suspended")
    assert_store_consistent(pair.store)
    assert standby.stop() == 0


# Regression: one constant advisory-lock key made stores in two schemas share a leader.
def test_stores_in_two_schemas_of_one_database_each_get_a_leader(pg_schema_url: str,
                                                                 pg_dsn: str) -> None:
    """Leadership is per store: an instance of another store (another schema) must not be
    able to keep this store's instances from running the jobs."""
    import uuid

    import psycopg

    from daemon.leader import PostgresLeader
    from tests.conftest import _pg_url

    other = "gg_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{other}"')
    stores = [open_store(pg_schema_url), open_store(_pg_url(pg_dsn, other))]
    leaders = [PostgresLeader(s.engine) for s in stores]
    try:
        assert [ldr.is_leader() for ldr in leaders] == [True, True]
    finally:
        for ldr in leaders:
            ldr.release()
        for s in stores:
            s.close()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{other}" CASCADE')


# --- SIGKILL during apply -----------------------------------------------------------------------

N_TOKENS = 300
ROUNDS = 10
SEED = 20240917


def _bulk_state(store: TokenStore, tokens: list[TokenRecord], committed: int) -> bool:
    """Check one all-or-nothing outcome; True when the plan was applied (all suspended)."""
    by_token = assert_store_consistent(store)
    now = {t.id: t for t in store.list_tokens()}
    states = {(now[t.id].status, now[t.id].status_reason) for t in tokens}
    suspends = {sum(1 for r in by_token[t.id] if r.action == "suspend") for t in tokens}
    assert len(states) == 1, f"a half-applied plan: {sorted(map(str, states))}"
    [state] = states
    if state == (Status.ACTIVE, None):
        assert suspends == {committed}, suspends
        return False
    assert state == (Status.SUSPENDED, "not_in_group"), state
    assert suspends == {committed + 1}, f"applied twice? suspend rows per token: {suspends}"
    assert {by_token[t.id][-1].actor for t in tokens} == {"sync"}
    return True


def _restore(store: TokenStore, tokens: list[TokenRecord]) -> None:
    changes = [StatusChange("reactivate", t.id, t.owner, Status.SUSPENDED, Status.ACTIVE, None)
               for t in tokens]
    assert len(store.apply_changes(changes, actor="test-restore", now=datetime.now(UTC))) == len(
        tokens)


def _blocked_by(store: TokenStore, holder: int) -> int | None:
    """The backend (of a sync) waiting for the row lock that backend `holder` holds."""
    with store.engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT pid FROM pg_stat_activity WHERE :h = ANY(pg_blocking_pids(pid))"),
            {"h": holder}).scalar()


def _settled(store: TokenStore) -> None:
    """After kill -9 of a client, its PostgreSQL backend may still be finishing the
    transaction (committing it, if COMMIT was already sent, or rolling it back once it
    notices the client is gone): wait until nobody else holds a lock on our tokens table."""
    if store.backend != "postgresql":
        return  # SQLite has no server side: the commit happened or it did not

    def quiet() -> bool:
        with store.engine.connect() as conn:
            return conn.execute(sa.text(
                "SELECT count(*) FROM pg_locks WHERE relation = 'tokens'::regclass "
                "AND pid <> pg_backend_pid()")).scalar() == 0

    poll(quiet, 15, "the killed sync's backend to finish")


def _backend_gone(store: TokenStore, pid: int) -> bool:
    with store.engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"),
                            {"p": pid}).scalar() == 0


def test_kill_9_during_apply_leaves_store_consistent(fresh_slapd: Any, store_url: str,
                                                      tmp_path: Path, spawn: Spawn) -> None:
    """`groupgate sync` SIGKILLed at seeded random moments while a 300-token plan is read,
    planned and applied: each time every token was suspended (one audit row each) or none was.
    On PostgreSQL some rounds hold a row lock so the kill lands mid-transaction for certain.
    """
    server = fresh_slapd
    server.add_bulk_users(N_TOKENS, group_cn="bulk-users")
    store = open_store(store_url)
    svc = minter(store)
    try:
        tokens = [svc.create(f"bulk{i:05d}", "bulk", timedelta(days=30), datetime.now(UTC)).record
                  for i in range(N_TOKENS)]
        config = tmp_path / "groupgate.toml"
        write_atomically(config, config_text(
            store_url, server, directory={"page_size": 100},
            policy={"allowed_groups": ["token-users", "bulk-users"]},
            sync={"max_suspend_count": 1_000_000}))
        env = {"GROUPGATE_BIND_PASSWORD": server.service_password}
        # the change: bulk-users keeps one member who owns no token, so all 300 get suspended
        member_change(server, "replace", uid("dave"), group=BULK_GROUP)

        def start(i: int, *, wait: bool = True) -> tuple[Groupgate, float | None]:
            """Spawn a sync; with `wait`, return once its snapshot is read (None: it ended).

            The sign is the seed's skipped entries, which the snapshot logs as it completes:
            what follows is loading the tokens, planning, and the one apply transaction.
            """
            proc = spawn("sync", config=config, env=env, name=f"sync-{i:02d}")
            if not wait:
                return proc, None
            poll(lambda: not proc.running or "directory.entry_skipped" in proc.log_text(), 20,
                 "the end of the sync's snapshot", interval=0.002)
            return proc, (time.monotonic() if proc.running else None)

        # round 0 runs to the end; its log times the stretch from the end of the snapshot to
        # the end of the commit (loading, planning, applying), where the kills below aim
        proc, _ = start(0)
        assert proc.wait_exit(30) == 0, proc.log_text()[-3000:]
        window = _seconds_between(proc, "directory.entry_skipped", "sync.finished")
        committed = 0
        assert _bulk_state(store, tokens, committed)
        committed += 1
        _restore(store, tokens)

        rng = random.Random(SEED)
        outcomes: list[str] = []
        for i in range(1, ROUNDS + 1):
            pinned = store.backend == "postgresql" and i % 4 == 1
            delay = rng.uniform(0.0, 1.25) * window
            if pinned:
                _pinned_round(store, tokens, start, i)
                assert not _bulk_state(store, tokens, committed), "a killed transaction committed"
                outcomes.append("pinned")
                continue
            proc, began = start(i)
            if began is not None:
                time.sleep(max(0.0, began + delay - time.monotonic()))
            proc.kill9()
            _settled(store)
            rc = proc.popen.returncode
            assert rc in (0, -signal.SIGKILL), f"sync-{i:02d} exited {rc}:\n{proc.log_text()}"
            outcome = "killed" if rc else "finished"
            if _bulk_state(store, tokens, committed):
                committed += 1
                outcome += "+applied"
                _restore(store, tokens)
            outcomes.append(outcome)

        # and the store still converges: one more run, to the end
        proc, _ = start(ROUNDS + 1)
        assert proc.wait_exit(30) == 0, proc.log_text()[-3000:]
        assert _bulk_state(store, tokens, committed)
        print(f"window {window:.3f}s, outcomes: {outcomes}")
        if store.backend == "postgresql":
            assert outcomes.count("pinned") == len(range(1, ROUNDS + 1, 4))
    finally:
        store.close()


def _seconds_between(proc: Groupgate, first: str, last: str) -> float:
    def at(event: dict[str, Any]) -> datetime:
        return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))

    return (at(proc.events(last)[-1]) - at(proc.events(first)[-1])).total_seconds()


def _pinned_round(store: TokenStore, tokens: list[TokenRecord], start: Any, i: int) -> None:
    """Hold the last token's row: the sync applies 299 changes, waits on it, and dies there."""
    last = max(tokens, key=lambda t: (t.owner, t.created_at, t.id))
    with store.engine.connect() as conn:
        tx = conn.begin()
        holder = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        conn.execute(sa.text("SELECT id FROM tokens WHERE id = :i FOR UPDATE"), {"i": last.id})
        proc, _ = start(i, wait=False)

        def blocked() -> int:
            assert proc.running, proc.log_text()[-3000:]
            return _blocked_by(store, holder) or 0

        backend = poll(blocked, 20, "the sync blocked mid-apply", interval=0.01)
        proc.kill9()
        tx.rollback()
    # the orphaned backend gets the row, finds its client gone and rolls back
    poll(lambda: _backend_gone(store, backend), 15, f"backend {backend} to end")

