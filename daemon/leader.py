"""Who runs the scheduled jobs when several instances share one store.

PostgreSQL: a session-level advisory lock held on a dedicated connection. The leader keeps
it for as long as its connection lives; if the process dies, PostgreSQL drops the session
and another instance takes the lock at its next tick. SQLite: one instance per database
file, enforced with an exclusive flock on a lock file beside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Any

import structlog

from daemon.errors import GroupgateError, StoreUnavailable

log = structlog.get_logger("groupgate.leader")

LOCK_KEY = 0x67676761746531  # "ggate1"

# Advisory locks belong to the database, but a groupgate store may be one schema of it (the
# search_path of store.url): the key mixes in current_schema(), so stores in two schemas of
# one database each elect their own leader instead of sharing one.
_KEY_SQL = "hashtextextended('groupgate-leader:' || coalesce(current_schema(), ''), %s)"


class AlreadyRunning(GroupgateError):
    exit_code = 75


class SqliteInstanceLock:
    """Refuses a second `groupgate run` on the same SQLite file."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunning(
                f"another groupgate run (pid {other}) already uses {self.path.with_suffix('')}; "
                "SQLite serves one instance: use PostgreSQL for several") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def is_leader(self) -> bool:
        return self._fd is not None


class PostgresLeader:
    """Leader election with pg_try_advisory_lock on a connection of its own."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._conn: Any = None
        self.leader = False

    def is_leader(self) -> bool:
        """Check (and if free, take) leadership; cheap enough to call before every job."""
        try:
            if self._conn is None:
                self._conn = self._engine.raw_connection()
                self._conn.driver_connection.autocommit = True
            cur = self._conn.driver_connection.cursor()
            try:
                if self.leader:
                    cur.execute("SELECT 1")  # still connected means the lock is still ours
                else:
                    cur.execute(f"SELECT pg_try_advisory_lock({_KEY_SQL})", (LOCK_KEY,))
                    row = cur.fetchone()
                    if row and row[0]:
                        self.leader = True
                        log.info("leader.elected", pid=os.getpid())
            finally:
                cur.close()
        except Exception as exc:
            if self.leader:
                log.warning("leader.lost", error=str(exc).splitlines()[0] if str(exc) else "")
            self.leader = False
            self._drop()
            if isinstance(exc, StoreUnavailable):
                raise
        return self.leader

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.invalidate()
            self._conn = None

    def release(self) -> None:
        if self._conn is not None and self.leader:
            with contextlib.suppress(Exception):
                cur = self._conn.driver_connection.cursor()
                cur.execute(f"SELECT pg_advisory_unlock({_KEY_SQL})", (LOCK_KEY,))
                cur.close()
        self.leader = False
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
