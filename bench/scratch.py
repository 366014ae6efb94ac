"""Pieces shared by the bench scripts: a throwaway PostgreSQL schema, the machine's CPU."""

from __future__ import annotations

import os
import platform
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa


@contextmanager
def pg_scratch_schema(dsn: str) -> Iterator[tuple[str, str, str]]:
    """(SQLAlchemy URL with search_path set, server version, schema); dropped at exit."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    parts = conninfo_to_dict(dsn)
    schema = "gg_bench_" + uuid.uuid4().hex[:10]
    url = sa.engine.URL.create(
        "postgresql+psycopg", username=str(parts.get("user", "postgres")),
        password=str(parts["password"]) if parts.get("password") else None,
        host=str(parts.get("host", "127.0.0.1")), port=int(parts.get("port") or 5432),
        database=str(parts.get("dbname", "test")),
        query={"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as admin:
        version = str(admin.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
        admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield url, version, schema
    finally:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as admin:
            admin.execute("SET lock_timeout = '30s'")
            admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def cpu_summary() -> str:
    """The CPU model and how many cores this process may use, for the figures' header."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, nproc {nproc}"
