"""Shared fixtures: the store on both backends, the CI rule for missing servers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from daemon.config import PolicyConfig
from daemon.service import TokenService
from daemon.store import TokenStore
from daemon.tokens import SecretHasher

PG_ADMIN_DSN = os.environ.get("GROUPGATE_TEST_PG",
                              "host=127.0.0.1 port=5432 user=postgres dbname=test")
IN_CI = os.environ.get("CI", "").lower() == "true"


def require_server(what: str, why: str) -> None:
    """In CI a missing server fails the run; on a laptop it skips with the reason."""
    message = f"{what} not available: {why}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a test that needs a server must not skip)",
                    pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_DSN, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001
        require_server("PostgreSQL at 127.0.0.1:5432", str(exc).strip().splitlines()[0])
    return PG_ADMIN_DSN


def _pg_url(dsn: str, schema: str) -> str:
    parts = dict(p.split("=", 1) for p in dsn.split())
    user, host = parts.get("user", "postgres"), parts.get("host", "127.0.0.1")
    return (f"postgresql+psycopg://{user}@{host}:{parts.get('port', '5432')}/"
            f"{parts.get('dbname', 'test')}"
            f"?options=-csearch_path%3D{schema}")


@pytest.fixture
def pg_schema_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh PostgreSQL schema for one test, dropped afterwards."""
    import psycopg

    dsn = request.getfixturevalue("pg_dsn")
    schema = "gg_" + uuid.uuid4().hex[:12]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield _pg_url(dsn, schema)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty store location on each backend: SQLite in a temp dir, PostgreSQL in a new schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/groupgate.db"
    return str(request.getfixturevalue("pg_schema_url"))


@pytest.fixture
def store(store_url: str) -> Iterator[TokenStore]:
    s = TokenStore(store_url, check_schema=False)
    s.upgrade()
    s.check_schema()
    yield s
    s.close()


@pytest.fixture(scope="session")
def hasher() -> SecretHasher:
    return SecretHasher(time_cost=1, memory_kib=8192, parallelism=1)


@pytest.fixture
def policy() -> PolicyConfig:
    return PolicyConfig(max_lifetime_days=90, default_lifetime_days=30, max_tokens_per_user=3)


@pytest.fixture
def service(store: TokenStore, hasher: SecretHasher, policy: PolicyConfig) -> TokenService:
    return TokenService(store, hasher, policy)


@pytest.fixture
def now() -> datetime:
    return datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
