"""The SQLAlchemy adapter: tables, schema checks and the `TokenStore` repository.

Only this module (and the alembic migrations) import SQLAlchemy. Every write that changes a
token also writes its audit row in the same transaction. SQLite runs in WAL mode with a busy
timeout and foreign keys on; write transactions start with BEGIN IMMEDIATE so two writers
queue on the busy timeout instead of deadlocking on a lock upgrade.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import NullPool

from daemon.config import redact_url
from daemon.errors import BadInput, SchemaMismatch, StoreUnavailable
from daemon.model import (
    NON_FINAL,
    AuditRecord,
    DirectoryUser,
    LiveToken,
    Status,
    StatusChange,
    TokenRecord,
    VerifyRow,
)

SQLITE_BUSY_TIMEOUT_MS = 5000
VERIFY_BUSY_TIMEOUT_MS = 200


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend: SQLite stores naive UTC text, PostgreSQL timestamptz."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use timezone-aware UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


_NON_FINAL_SQL = "status IN ('active', 'suspended')"


class TokenRow(Base):
    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    owner: Mapped[str] = mapped_column(sa.String(256), index=True)
    name: Mapped[str] = mapped_column(sa.String(64))
    secret_hash: Mapped[str] = mapped_column(sa.String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    status: Mapped[str] = mapped_column(sa.String(16), index=True)
    status_reason: Mapped[str | None] = mapped_column(sa.String(64))
    status_changed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_by: Mapped[str] = mapped_column(sa.String(256))

    __table_args__ = (
        sa.CheckConstraint("status IN ('active', 'suspended', 'expired', 'revoked')",
                           name="ck_tokens_status"),
        sa.Index("uq_tokens_owner_name_live", "owner", "name", unique=True,
                 sqlite_where=sa.text(_NON_FINAL_SQL),
                 postgresql_where=sa.text(_NON_FINAL_SQL)),
    )


class AuditRow(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    actor: Mapped[str] = mapped_column(sa.String(256))
    action: Mapped[str] = mapped_column(sa.String(32))
    token_id: Mapped[str | None] = mapped_column(sa.String(16), index=True)
    owner: Mapped[str | None] = mapped_column(sa.String(256), index=True)
    reason: Mapped[str | None] = mapped_column(sa.String(256))
    details: Mapped[str] = mapped_column(sa.Text, default="{}")


class DirectoryUserRow(Base):
    """What the directory said about a token owner at the last sync that changed it."""

    __tablename__ = "directory_users"

    username: Mapped[str] = mapped_column(sa.String(256), primary_key=True)
    dn: Mapped[str | None] = mapped_column(sa.Text)
    present: Mapped[bool] = mapped_column(sa.Boolean)
    allowed: Mapped[bool] = mapped_column(sa.Boolean)
    disabled: Mapped[bool] = mapped_column(sa.Boolean)
    admin: Mapped[bool] = mapped_column(sa.Boolean)
    groups: Mapped[str] = mapped_column(sa.Text)
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime())


class SyncStateRow(Base):
    __tablename__ = "sync_state"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_success_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_result: Mapped[str | None] = mapped_column(sa.String(16))
    last_message: Mapped[str | None] = mapped_column(sa.Text)
    users_read: Mapped[int | None] = mapped_column(sa.Integer)
    server: Mapped[str | None] = mapped_column(sa.String(512))


metadata = Base.metadata
tokens_t: sa.Table = TokenRow.__table__  # type: ignore[assignment]
audit_t: sa.Table = AuditRow.__table__  # type: ignore[assignment]
dirusers_t: sa.Table = DirectoryUserRow.__table__  # type: ignore[assignment]
syncstate_t: sa.Table = SyncStateRow.__table__  # type: ignore[assignment]


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _sqlite_path(url: str) -> Path | None:
    u = sa.engine.make_url(url)
    if not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def _install_sqlite_hooks(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see _on_begin)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def make_engine(url: str, *, verify_path: bool = False) -> Engine:
    """An engine with per-backend settings; `verify_path` engines hold one connection per thread."""
    kwargs: dict[str, Any] = {}
    if verify_path:
        kwargs["poolclass"] = NullPool
    if _is_sqlite(url):
        kwargs.setdefault("connect_args", {})["check_same_thread"] = False
    else:
        kwargs["pool_pre_ping"] = True
        kwargs.setdefault("connect_args", {})["connect_timeout"] = 5
    try:
        engine = sa.create_engine(url, **kwargs)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise StoreUnavailable(f"store.url {redact_url(url)}: {_one_line(exc)}") from None
    if _is_sqlite(url):
        timeout = VERIFY_BUSY_TIMEOUT_MS if verify_path else SQLITE_BUSY_TIMEOUT_MS
        _install_sqlite_hooks(engine, timeout)
    return engine


def _one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- schema (alembic) -----------------------------------------------------------------------

def _alembic_config(connection: Connection | None = None) -> Any:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", "daemon:migrations")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def _known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return {s.revision for s in ScriptDirectory.from_config(_alembic_config()).walk_revisions()}


def _current_revision(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


# --- the repository ---------------------------------------------------------------------------

def _token_from_row(r: Any) -> TokenRecord:
    return TokenRecord(
        id=r.id, owner=r.owner, name=r.name, status=Status(r.status),
        status_reason=r.status_reason, created_at=r.created_at, expires_at=r.expires_at,
        status_changed_at=r.status_changed_at, last_used_at=r.last_used_at,
        created_by=r.created_by)


_TOKEN_COLUMNS = [c for c in tokens_t.c if c.name != "secret_hash"]


def _sqlite_text(value: datetime) -> str:
    """The exact text SQLAlchemy stores for a DateTime on SQLite, so comparisons stay lexical."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


class _ThreadConn:
    """A DBAPI connection owned by one thread (and one process: a forked child reconnects)."""

    __slots__ = ("__weakref__", "conn", "dbapi", "generation")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.dbapi = conn.driver_connection
        self.generation = _fork_generation


def _close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):  # closing a broken connection must not raise
        conn.close()


class TokenStore:
    """Token and audit persistence; one transaction per public write method."""

    def __init__(self, url: str, *, check_schema: bool = True) -> None:
        self.url = url
        self.backend = "sqlite" if _is_sqlite(url) else "postgresql"
        if self.backend == "sqlite":
            path = _sqlite_path(url)
            if path is not None and not path.parent.is_dir():
                raise StoreUnavailable(
                    f"store.url {url}: directory {path.parent} does not exist "
                    "(run 'groupgate db upgrade' to create the store)")
        self.engine = make_engine(url)
        self._verify_engine: Engine | None = None
        self._local = threading.local()
        self._lookup_sql: str | None = None
        self._live_sql: str | None = None
        self._touch_sql: str | None = None
        self._positional = True
        if check_schema:
            self.check_schema()

    def __repr__(self) -> str:
        return f"TokenStore({redact_url(self.url)!r})"

    def close(self) -> None:
        self.engine.dispose()
        if self._verify_engine is not None:
            self._verify_engine.dispose()

    # -- transactions and error mapping --

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        try:
            eng = self.engine.execution_options(sqlite_begin="IMMEDIATE")
            with eng.begin() as conn:
                if self.backend == "postgresql":
                    conn.exec_driver_sql("SET LOCAL lock_timeout = '10s'")
                yield conn
        except IntegrityError:
            raise
        except DBAPIError as exc:
            raise StoreUnavailable(f"store unavailable: {_one_line(exc)}") from None

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                yield conn
        except DBAPIError as exc:
            raise StoreUnavailable(f"store unavailable: {_one_line(exc)}") from None

    # -- schema --

    def schema_state(self) -> tuple[str | None, str]:
        """(revision in the store, revision this release expects)."""
        with self._read() as conn:
            return _current_revision(conn), head_revision()

    def check_schema(self) -> None:
        current, head = self.schema_state()
        if current == head:
            return
        if current is None:
            raise SchemaMismatch(f"store {redact_url(self.url)} has no groupgate schema; "
                                 "run 'groupgate db upgrade'")
        if current not in _known_revisions():
            raise SchemaMismatch(f"store schema {current} is newer than this groupgate "
                                 f"(expects {head}); upgrade groupgate")
        raise SchemaMismatch(f"store schema {current} is behind {head}; "
                             "run 'groupgate db upgrade'")

    def upgrade(self) -> tuple[str | None, str]:
        """Create or upgrade the schema to this release's head; returns (before, after)."""
        from alembic import command

        with self._write() as conn:
            before = _current_revision(conn)
            if before is not None and before not in _known_revisions():
                raise SchemaMismatch(f"store schema {before} is newer than this groupgate; "
                                     "upgrade groupgate")
            command.upgrade(_alembic_config(conn), "head")
            after = _current_revision(conn)
        assert after is not None
        return before, after

    # -- tokens --

    def create_token(self, record: TokenRecord, secret_hash: str, *,
                     precheck: Callable[[list[TokenRecord]], None],
                     details: dict[str, Any] | None = None) -> None:
        """Insert a token and its `created` audit row.

        `precheck` sees the owner's live tokens inside the transaction (which holds the owner's
        lock), so per-user caps and name rules cannot be raced past.
        """
        with self._write() as conn:
            if self.backend == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:o))"),
                             {"o": "groupgate-owner:" + record.owner})
            live = conn.execute(
                sa.select(*_TOKEN_COLUMNS).where(
                    tokens_t.c.owner == record.owner,
                    tokens_t.c.status.in_([s.value for s in NON_FINAL]))
            ).all()
            precheck([_token_from_row(r) for r in live])
            try:
                conn.execute(sa.insert(tokens_t).values(
                    id=record.id, owner=record.owner, name=record.name, secret_hash=secret_hash,
                    created_at=record.created_at, expires_at=record.expires_at,
                    status=record.status.value, status_reason=record.status_reason,
                    status_changed_at=record.status_changed_at, last_used_at=None,
                    created_by=record.created_by))
            except IntegrityError:
                raise BadInput(f"a live token named {record.name!r} already exists for "
                               f"{record.owner}") from None
            self._audit(conn, at=record.created_at, actor=record.created_by, action="created",
                        token_id=record.id, owner=record.owner, reason=None,
                        details={"name": record.name, "expires_at": record.expires_at.isoformat(),
                                 **(details or {})})

    def get_token(self, token_id: str) -> TokenRecord | None:
        with self._read() as conn:
            r = conn.execute(sa.select(*_TOKEN_COLUMNS).where(tokens_t.c.id == token_id)).first()
        return _token_from_row(r) if r is not None else None

    def list_tokens(self, *, owner: str | None = None,
                    status: Status | None = None) -> list[TokenRecord]:
        q = sa.select(*_TOKEN_COLUMNS).order_by(tokens_t.c.owner, tokens_t.c.created_at,
                                                tokens_t.c.id)
        if owner is not None:
            q = q.where(tokens_t.c.owner == owner)
        if status is not None:
            q = q.where(tokens_t.c.status == status.value)
        with self._read() as conn:
            return [_token_from_row(r) for r in conn.execute(q)]

    def live_tokens(self) -> list[LiveToken]:
        """Active and suspended tokens, lean: sync reads all of them every few minutes.

        Straight through the driver (as the verify path does): ORM rows with type processing
        cost ten times more at 200,000 tokens (bench/sync.py).
        """
        sql = self._live_sql
        if sql is None:
            q = sa.select(tokens_t.c.id, tokens_t.c.owner, tokens_t.c.status,
                          tokens_t.c.status_reason, tokens_t.c.expires_at).where(
                tokens_t.c.status.in_([Status.ACTIVE.value, Status.SUSPENDED.value]))
            sql = self._live_sql = str(q.compile(dialect=self.engine.dialect,
                                                 compile_kwargs={"literal_binds": True}))
        statuses = {s.value: s for s in Status}
        try:
            proxied = self.engine.raw_connection()
        except DBAPIError as exc:
            raise StoreUnavailable(f"store unavailable: {_one_line(exc)}") from None
        try:
            cur = proxied.cursor()
            cur.execute(sql)
            rows = cur.fetchall()
            cur.close()
            proxied.commit()
        except Exception as exc:  # noqa: BLE001 - any driver error means "store unavailable"
            raise StoreUnavailable(f"store unavailable: {_one_line(exc)}") from None
        finally:
            proxied.close()
        if rows and isinstance(rows[0][4], str):  # SQLite: naive UTC text
            return [LiveToken(r[0], r[1], statuses[r[2]], r[3],
                              datetime.fromisoformat(r[4] + "+00:00")) for r in rows]
        return [LiveToken(r[0], r[1], statuses[r[2]], r[3], r[4]) for r in rows]

    def apply_changes(self, changes: Sequence[StatusChange], *, actor: str, now: datetime,
                      details: dict[str, Any] | None = None) -> list[StatusChange]:
        """Apply status changes and their audit rows in ONE transaction; all or nothing.

        A change whose token is no longer in `from_status` (someone revoked it meanwhile) is
        skipped, not forced: the returned list holds the changes that took effect.
        """
        with self._write() as conn:
            return self._apply(conn, changes, actor=actor, now=now, details=details)

    def _apply(self, conn: Connection, changes: Sequence[StatusChange], *, actor: str,
               now: datetime, details: dict[str, Any] | None) -> list[StatusChange]:
        """Guarded updates, batched per (from, to, reason) with RETURNING, then the audit rows
        in one executemany: 2,000 changes cost a handful of statements, not 4,000."""
        by_id = {c.token_id: c for c in changes}
        if len(by_id) != len(changes):  # the same token twice: order matters, go one by one
            return [a for c in changes for a in self._apply(conn, [c], actor=actor, now=now,
                                                            details=details)]
        batches: dict[tuple[Status, Status, str | None], list[str]] = {}
        for c in changes:
            batches.setdefault((c.from_status, c.to_status, c.reason), []).append(c.token_id)
        done: set[str] = set()
        for (frm, to, reason), ids in batches.items():
            for i in range(0, len(ids), 500):
                res = conn.execute(
                    sa.update(tokens_t)
                    .where(tokens_t.c.id.in_(ids[i:i + 500]), tokens_t.c.status == frm.value)
                    .values(status=to.value, status_reason=reason, status_changed_at=now)
                    .returning(tokens_t.c.id))
                done.update(r[0] for r in res)
        # A change whose token left its from-state meanwhile (revoked, say) is skipped.
        applied = [c for c in changes if c.token_id in done]
        if applied:
            conn.execute(sa.insert(audit_t), [
                {"at": now, "actor": actor, "action": c.kind, "token_id": c.token_id,
                 "owner": c.owner, "reason": c.reason,
                 "details": json.dumps({"from": c.from_status.value, "to": c.to_status.value,
                                        **(details or {})}, sort_keys=True, default=str)}
                for c in applied])
        return applied

    def apply_sync(self, changes: Sequence[StatusChange], *, now: datetime,
                   owners: Iterable[str], users: Mapping[str, DirectoryUser], server: str,
                   users_read: int, actor: str = "sync") -> list[StatusChange]:
        """One sync run in ONE transaction: status changes with audit rows, what the directory
        said about each token owner (only rows that changed are written), and the run's state.
        """
        with self._write() as conn:
            applied = self._apply(conn, changes, actor=actor, now=now, details=None)
            self._record_directory_users(conn, owners, users, now)
            self._write_sync_state(conn, now=now, success=True, result="ok",
                                   message=f"{len(applied)} changes", users_read=users_read,
                                   server=server)
            return applied

    def record_sync_failure(self, *, now: datetime, result: str, message: str) -> None:
        with self._write() as conn:
            self._write_sync_state(conn, now=now, success=False, result=result,
                                   message=message, users_read=None, server=None)

    def _write_sync_state(self, conn: Connection, *, now: datetime, success: bool, result: str,
                          message: str, users_read: int | None, server: str | None) -> None:
        values: dict[str, Any] = {"last_attempt_at": now, "last_result": result,
                                  "last_message": message[:2000]}
        if success:
            values.update(last_success_at=now, users_read=users_read, server=server)
        if conn.execute(sa.update(syncstate_t).where(syncstate_t.c.id == 1)
                        .values(**values)).rowcount == 0:
            conn.execute(sa.insert(syncstate_t).values(id=1, **values))

    def sync_state(self) -> dict[str, Any] | None:
        with self._read() as conn:
            row = conn.execute(sa.select(syncstate_t).where(syncstate_t.c.id == 1)).first()
        return dict(row._mapping) if row is not None else None

    def _record_directory_users(self, conn: Connection, owners: Iterable[str],
                                users: Mapping[str, DirectoryUser], now: datetime) -> None:
        """Write a row per token owner whose directory answer changed (most syncs: none)."""
        cols = (dirusers_t.c.username, dirusers_t.c.dn, dirusers_t.c.present,
                dirusers_t.c.allowed, dirusers_t.c.disabled, dirusers_t.c.admin,
                dirusers_t.c.groups)
        existing = {r[0]: tuple(r) for r in conn.execute(sa.select(*cols))}
        groups_json: dict[frozenset[str], str] = {}
        inserts, changed = [], []
        for owner in set(owners):
            u = users.get(owner)
            row: tuple[Any, ...]
            if u is None:
                row = (owner, None, False, False, False, False, "[]")
            else:
                g = groups_json.get(u.groups)
                if g is None:
                    g = groups_json[u.groups] = json.dumps(sorted(u.groups))
                row = (owner, u.dn, True, u.allowed, u.disabled, u.admin, g)
            old = existing.get(owner)
            if old is None:
                inserts.append(row)
            elif old != row:
                changed.append((row, old[2]))
        names = ("username", "dn", "present", "allowed", "disabled", "admin", "groups")
        if inserts:
            conn.execute(sa.insert(dirusers_t), [
                {**dict(zip(names, r, strict=True)), "last_seen_at": now if r[2] else None,
                 "changed_at": now} for r in inserts])
        if not changed:
            return
        previous = conn.execute(sa.select(syncstate_t.c.last_success_at)
                                .where(syncstate_t.c.id == 1)).scalar()
        seen_before: dict[str, datetime | None] = {}
        gone = [r[0] for r, was_present in changed if not r[2] and not was_present]
        for i in range(0, len(gone), 500):
            seen_before.update(conn.execute(
                sa.select(dirusers_t.c.username, dirusers_t.c.last_seen_at)
                .where(dirusers_t.c.username.in_(gone[i:i + 500]))).tuples().all())
        updates = []
        for r, was_present in changed:
            # present now: seen now; just gone: seen at the previous successful sync
            seen = now if r[2] else (previous if was_present else seen_before.get(r[0]))
            updates.append({**dict(zip(names[1:], r[1:], strict=True)), "b_username": r[0],
                            "last_seen_at": seen, "changed_at": now})
        stmt = (sa.update(dirusers_t)
                .where(dirusers_t.c.username == sa.bindparam("b_username"))
                .values({c: sa.bindparam(c) for c in (*names[1:], "last_seen_at",
                                                       "changed_at")}))
        conn.execute(stmt, updates)

    def directory_user(self, username: str) -> dict[str, Any] | None:
        with self._read() as conn:
            row = conn.execute(sa.select(dirusers_t)
                               .where(dirusers_t.c.username == username)).first()
        if row is None:
            return None
        data = dict(row._mapping)
        data["groups"] = json.loads(data["groups"])
        return data

    def purge(self, *, before: datetime, now: datetime, actor: str = "purge") -> int:
        """Delete expired and revoked tokens whose status changed before `before`.

        The audit trail stays: each deleted token gets a `purged` row in the same transaction.
        """
        with self._write() as conn:
            rows = conn.execute(
                sa.select(tokens_t.c.id, tokens_t.c.owner, tokens_t.c.status)
                .where(tokens_t.c.status.in_([Status.EXPIRED.value, Status.REVOKED.value]),
                       tokens_t.c.status_changed_at < before)).all()
            for r in rows:
                self._audit(conn, at=now, actor=actor, action="purged", token_id=r.id,
                            owner=r.owner, reason=None, details={"status": r.status})
            if rows:
                ids = [r.id for r in rows]
                for i in range(0, len(ids), 500):
                    conn.execute(sa.delete(tokens_t).where(tokens_t.c.id.in_(ids[i:i + 500])))
        return len(rows)

    def token_counts(self) -> dict[str, int]:
        """Tokens by status, for metrics."""
        with self._read() as conn:
            rows = conn.execute(sa.select(tokens_t.c.status, sa.func.count())
                                .group_by(tokens_t.c.status)).all()
        counts = {s.value: 0 for s in Status}
        counts.update({r[0]: int(r[1]) for r in rows})
        return counts

    @property
    def sqlite_path(self) -> Path | None:
        return _sqlite_path(self.url) if self.backend == "sqlite" else None

    # -- audit --

    def _audit(self, conn: Connection, *, at: datetime, actor: str, action: str,
               token_id: str | None, owner: str | None, reason: str | None,
               details: dict[str, Any]) -> None:
        conn.execute(sa.insert(audit_t).values(
            at=at, actor=actor, action=action, token_id=token_id, owner=owner, reason=reason,
            details=json.dumps(details, sort_keys=True, default=str)))

    def audit_events(self, *, owner: str | None = None, token_id: str | None = None,
                     limit: int | None = None) -> list[AuditRecord]:
        q = sa.select(audit_t).order_by(audit_t.c.id)
        if owner is not None:
            q = q.where(audit_t.c.owner == owner)
        if token_id is not None:
            q = q.where(audit_t.c.token_id == token_id)
        if limit is not None:
            q = q.order_by(None).order_by(audit_t.c.id.desc()).limit(limit)
        with self._read() as conn:
            rows = list(conn.execute(q))
        if limit is not None:
            rows.reverse()
        return [AuditRecord(id=r.id, at=r.at, actor=r.actor, action=r.action,
                            token_id=r.token_id, owner=r.owner, reason=r.reason,
                            details=json.loads(r.details or "{}")) for r in rows]

    # -- the verify hot path: raw DBAPI, one compiled primary-key lookup --

    def _compile(self) -> None:
        eng = self._verify_engine
        assert eng is not None
        look = sa.select(tokens_t.c.owner, tokens_t.c.secret_hash, tokens_t.c.status,
                         tokens_t.c.status_reason, tokens_t.c.expires_at,
                         tokens_t.c.last_used_at).where(tokens_t.c.id == sa.bindparam("id"))
        touch = (sa.update(tokens_t)
                 .where(tokens_t.c.id == sa.bindparam("tid"),
                        sa.or_(tokens_t.c.last_used_at.is_(None),
                               tokens_t.c.last_used_at < sa.bindparam("older")))
                 .values(last_used_at=sa.bindparam("now")))
        c1 = look.compile(dialect=eng.dialect)
        c2 = touch.compile(dialect=eng.dialect)
        self._positional = bool(c1.positional)
        self._lookup_sql = str(c1)
        self._touch_sql = str(c2)
        self._touch_order = list(c2.positiontup or [])

    def _thread_conn(self) -> Any:
        """This thread's own DBAPI connection (a forked child makes its own)."""
        holder: _ThreadConn | None = getattr(self._local, "holder", None)
        if holder is not None and holder.generation == _fork_generation:
            return holder.conn
        if self._verify_engine is None:
            self._verify_engine = make_engine(self.url, verify_path=True)
            self._compile()
        try:
            proxied = self._verify_engine.raw_connection()
        except DBAPIError as exc:
            raise StoreUnavailable(f"store unavailable: {_one_line(exc)}") from None
        if self.backend == "postgresql":
            proxied.driver_connection.autocommit = True  # type: ignore[union-attr]  # each lookup sees the latest commit
        holder = _ThreadConn(proxied)
        weakref.finalize(holder, _close_quietly, proxied)
        self._local.holder = holder
        return proxied

    def _drop_thread_conn(self) -> None:
        holder = getattr(self._local, "holder", None)
        self._local.holder = None
        if holder is not None and holder.generation == _fork_generation:
            with contextlib.suppress(Exception):
                holder.conn.invalidate()

    def _fetch(self, token_id: str) -> Any:
        holder: _ThreadConn | None = getattr(self._local, "holder", None)
        if holder is not None and holder.generation == _fork_generation:
            conn = holder.dbapi
        else:
            conn = self._thread_conn().driver_connection
        if self._positional:
            return conn.execute(self._lookup_sql, (token_id,)).fetchone()
        with conn.cursor() as cur:
            cur.execute(self._lookup_sql, {"id": token_id}, prepare=True)
            return cur.fetchone()

    def lookup_for_verify(self, token_id: str) -> VerifyRow | None:
        """One primary-key lookup on this thread's own connection; retried once on a dead link."""
        try:
            row = self._fetch(token_id)
        except StoreUnavailable:
            raise
        except Exception:  # noqa: BLE001 - a dead connection: reconnect once, then give up
            self._drop_thread_conn()
            try:
                row = self._fetch(token_id)
            except StoreUnavailable:
                raise
            except Exception as exc:  # noqa: BLE001
                self._drop_thread_conn()
                raise StoreUnavailable(f"store unavailable: {_one_line(exc)}") from None
        if row is None:
            return None
        owner, secret_hash, status, status_reason, expires_at, last_used_at = row
        if type(expires_at) is str:  # SQLite text is naive UTC; this is 6x cheaper than replace()
            expires_at = datetime.fromisoformat(expires_at + "+00:00")
            if last_used_at is not None:
                last_used_at = datetime.fromisoformat(last_used_at + "+00:00")
        return VerifyRow(owner, secret_hash, status, status_reason, expires_at, last_used_at)

    def touch_last_used(self, token_id: str, now: datetime, older_than: datetime) -> None:
        """Record use; a busy store only postpones it (the next call after will try again)."""
        values: dict[str, Any]
        if self.backend == "sqlite":
            values = {"now": _sqlite_text(now), "tid": token_id, "older": _sqlite_text(older_than)}
        else:
            values = {"now": now, "tid": token_id, "older": older_than}
        try:
            proxied = self._thread_conn()
            cur = proxied.driver_connection.cursor()
            try:
                if self._positional:
                    cur.execute(self._touch_sql, tuple(values[k] for k in self._touch_order))
                else:
                    cur.execute(self._touch_sql, values)
            finally:
                cur.close()
        except Exception:  # noqa: BLE001 - last_used is advisory; never fail a verify for it
            self._drop_thread_conn()
