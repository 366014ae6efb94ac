"""The daemon's jobs called directly (no subprocess): purge, metrics, failure backoff."""

from __future__ import annotations

import urllib.request
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.config import parse_config
from daemon.errors import DirectoryUnavailable
from daemon.model import Status
from daemon.notify import Notifier
from daemon.scheduler import Daemon
from daemon.service import TokenService
from daemon.store import TokenStore
from daemon.tokens import SecretHasher
from tests.servers.net import free_port


class FakeDirectory:
    """A DirectoryReader that is down until told otherwise."""

    def __init__(self) -> None:
        self.calls = 0

    def snapshot(self) -> Any:
        self.calls += 1
        raise DirectoryUnavailable("snapshot: no directory server answered: test")


def make_daemon(token_store: TokenStore, now: datetime, **sections: Any) -> Daemon:
    sections["store"] = {"url": token_store.url, **sections.get("store", {})}
    cfg = parse_config(sections, "test.toml")
    d = Daemon(cfg, None, notifier=Notifier(""), clock=lambda: now)
    d._store = token_store
    return d


def test_purge_deletes_old_final_tokens_and_keeps_audit(store: TokenStore, now: datetime) -> None:
    svc = TokenService(store, SecretHasher(1, 1024, 1), parse_config({}).policy)
    old = svc.create("alice", "old", timedelta(days=1), now - timedelta(days=200))
    recent = svc.create("alice", "recent", timedelta(days=1), now - timedelta(days=10))
    live = svc.create("alice", "live", timedelta(days=30), now)
    svc.revoke(old.record.id, actor="admin", now=now - timedelta(days=150))
    svc.revoke(recent.record.id, actor="admin", now=now - timedelta(days=5))
    d = make_daemon(store, now, store={"retention_days": 90})
    d.purge_once()
    assert store.get_token(old.record.id) is None
    assert store.get_token(recent.record.id) is not None
    assert store.get_token(live.record.id) is not None
    actions = [e.action for e in store.audit_events(token_id=old.record.id)]
    assert actions == ["created", "revoke", "purged"]


def test_failing_sync_job_logs_backs_off_and_never_raises(store: TokenStore,
                                                          now: datetime) -> None:
    d = make_daemon(store, now, sync={"interval": "60s"})
    d._directory = FakeDirectory()
    d._schedule(first_sync=now)
    with capture_logs() as logs:
        for _ in range(3):
            d._job("sync", d.sync_once)
    failed = [e for e in logs if e["event"] == "job.failed"]
    assert [e["consecutive"] for e in failed] == [1, 2, 3]
    assert [e["retry_in"] for e in failed] == [60.0, 120.0, 240.0]
    assert d.scheduler.get_job("sync").next_run_time == now + timedelta(seconds=240)
    assert any(e["event"] == "sync.failed" for e in logs)
    assert d.metrics.directory_errors._value.get() == 3


def test_metrics_endpoint_serves_on_loopback(store: TokenStore, now: datetime) -> None:
    port = free_port()
    d = make_daemon(store, now, metrics={"listen": f"127.0.0.1:{port}"})
    TokenService(store, SecretHasher(1, 1024, 1), d.config.policy).create(
        "alice", "x", timedelta(days=1), now)
    d.metrics.serve(d.config.metrics.listen)
    try:
        d._count_tokens()
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    finally:
        d.metrics.close()
    text = body.decode()
    assert 'groupgate_tokens{status="active"} 1.0' in text
    assert "groupgate_sync_last_success_timestamp_seconds" in text


def test_expire_job_marks_overdue_tokens(store: TokenStore, now: datetime) -> None:
    c = TokenService(store, SecretHasher(1, 1024, 1), parse_config({}).policy).create(
        "alice", "x", timedelta(days=1), now - timedelta(days=2))
    d = make_daemon(store, now)
    d._job("expire", d.expire_once)
    tok = store.get_token(c.record.id)
    assert tok is not None and tok.status is Status.EXPIRED
    assert d.metrics.changes.labels(kind="expire")._value.get() == 1


def test_reload_refuses_a_bad_config_and_keeps_the_old(tmp_path: Path, store: TokenStore,
                                                       now: datetime) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(f'[store]\nurl = "{store.url}"\n[sync]\ninterval = "60s"\n')
    d = make_daemon(store, now, sync={"interval": "60s"})
    d.config_path = str(cfg_file)
    d._schedule(first_sync=None)
    cfg_file.write_text(f'[store]\nurl = "{store.url}"\n[sync]\ninterval = "oops"\n')
    with capture_logs() as logs:
        assert d.reload() is False
    assert logs[-1]["event"] == "config.reload_failed" and "sync.interval" in logs[-1]["error"]
    assert d.config.sync.interval == timedelta(seconds=60)
    cfg_file.write_text(f'[store]\nurl = "{store.url}"\n[sync]\ninterval = "30s"\n')
    assert d.reload() is True
    assert d.config.sync.interval == timedelta(seconds=30)
    job = d.scheduler.get_job("sync")
    assert job.trigger.interval == timedelta(seconds=30)
    # Scheduled, not paused: APScheduler pauses a job added with next_run_time=None (until
    # the scheduler starts, a pending job has no next_run_time attribute at all).
    assert getattr(job, "next_run_time", "computed at start") is not None


@pytest.mark.parametrize("listen", ["127.0.0.1:notaport", "nohost"])
def test_bad_metrics_listen_is_a_config_error(listen: str) -> None:
    from daemon.errors import ConfigError

    with pytest.raises(ConfigError, match=r"metrics\.listen"):
        parse_config({"metrics": {"listen": listen}})
