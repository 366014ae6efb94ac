"""`groupgate run`: the scheduled jobs, signals, systemd notification and leadership.

Jobs are thin wrappers around the plain functions in :mod:`daemon.sync` (which the tests
call directly). A failing job logs one event, backs off, and never kills the daemon; verify
never depends on it, since applications read the store.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any

import structlog
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.interval import IntervalTrigger

from daemon import logs
from daemon.config import Config, load_config
from daemon.errors import (
    ConfigError,
    DirectoryUnavailable,
    GroupgateError,
    SchemaMismatch,
    StoreUnavailable,
    SyncRefused,
)
from daemon.leader import PostgresLeader, SqliteInstanceLock
from daemon.metrics import Metrics
from daemon.notify import Notifier, watchdog_interval
from daemon.sync import SyncAborted, run_expire, run_sync

log = structlog.get_logger("groupgate.daemon")

MAX_BACKOFF_FACTOR = 8
STOP_GRACE_SECONDS = 20.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Daemon:
    """One `groupgate run` process."""

    def __init__(self, config: Config, config_path: str | None, *,
                 notifier: Notifier | None = None,
                 clock: Callable[[], datetime] = _utcnow) -> None:
        self.config = config
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.clock = clock
        self.metrics = Metrics()
        self.scheduler = BlockingScheduler(timezone=UTC, job_defaults={
            "coalesce": True, "max_instances": 1, "misfire_grace_time": None})
        self._stopping = threading.Event()
        self._running = 0
        self._running_cond = threading.Condition()
        self._failures: dict[str, int] = {}
        self._store: Any = None
        self._directory: Any = None
        self._instance_lock: SqliteInstanceLock | None = None
        self._leader: PostgresLeader | None = None
        self._was_leader = False
        self._http: Any = None
        self._web: Any = None

    # -- building the parts from config --

    def _open_store(self, config: Config) -> Any:
        from daemon.store import TokenStore

        return TokenStore(config.store.url)

    def _open_directory(self, config: Config) -> Any:
        if not config.directory.configured:
            return None
        from daemon.directory import from_config

        return from_config(config.directory, config.policy, config.source)

    def _wait_for_store(self) -> Any:
        """Open the store, waiting with backoff while it is unreachable (no crash loop)."""
        delay = 1.0
        while not self._stopping.is_set():
            try:
                return self._open_store(self.config)
            except SchemaMismatch:
                raise
            except StoreUnavailable as exc:
                log.error("daemon.store_unavailable", error=str(exc), retry_in=delay)
                # Still starting: extend systemd's start timeout (TimeoutStartSec) so a
                # database that is down at boot is waited for, not timed out.
                self.notifier.send(STATUS=f"waiting for the store: {exc}",
                                   EXTEND_TIMEOUT_USEC=int((delay + 30) * 1_000_000))
                self._stopping.wait(delay)
                delay = min(delay * 2, 60.0)
        return None

    # -- leadership --

    def _is_leader(self) -> bool:
        if self._leader is None:
            return True  # SQLite: the instance lock taken at start-up makes us the only one
        leader = self._leader.is_leader()
        self.metrics.leader.set(1 if leader else 0)
        if leader != self._was_leader:
            self._was_leader = leader
            if leader:
                self.notifier.send(STATUS="leader: running the scheduled jobs")
            else:
                self.notifier.send(STATUS="standby: another instance runs the jobs")
        return leader

    # -- jobs --

    def _job(self, job_id: str, fn: Callable[[], None]) -> None:
        """Run one job: only on the leader, one at a time, errors logged and backed off."""
        if self._stopping.is_set():
            return
        with self._running_cond:
            self._running += 1
        try:
            if not self._is_leader():
                log.debug("job.skipped", job=job_id, reason="not the leader")
                return
            fn()
            self._failures.pop(job_id, None)
        except (GroupgateError, SyncAborted) as exc:
            self._failed(job_id, exc)
        except Exception as exc:
            log.exception("job.crashed", job=job_id, error=str(exc))
            self._failed(job_id, exc)
        finally:
            with self._running_cond:
                self._running -= 1
                self._running_cond.notify_all()

    def _failed(self, job_id: str, exc: BaseException) -> None:
        if isinstance(exc, SyncAborted):
            return
        n = self._failures.get(job_id, 0) + 1
        self._failures[job_id] = n
        self.metrics.job_failures.labels(job=job_id).inc()
        job = self.scheduler.get_job(job_id)
        if job is None:
            return
        interval = job.trigger.interval.total_seconds()
        delay = interval * min(2 ** (n - 1), MAX_BACKOFF_FACTOR)
        when = self.clock() + timedelta(seconds=delay)
        log.warning("job.failed", job=job_id, error=str(exc), consecutive=n,
                    retry_in=round(delay, 1))
        if n > 1:  # the first failure retries at the next regular tick
            self.scheduler.modify_job(job_id, next_run_time=when)

    def sync_once(self) -> None:
        if self._directory is None:
            return
        now = self.clock()
        try:
            with self.metrics.duration.time():
                report = run_sync(self._directory, self._store, self.config.policy,
                                  self.config.sync, now=now, abort=self._stopping.is_set)
        except DirectoryUnavailable as exc:
            self.metrics.directory_errors.inc()
            self.notifier.send(STATUS=f"last sync {now:%H:%M:%S} UTC failed: {exc}")
            raise
        except SyncRefused as exc:
            self.metrics.refusals.inc()
            self.notifier.send(STATUS=f"last sync {now:%H:%M:%S} UTC refused: {exc}")
            raise
        for kind, n in report.counts.items():
            if n:
                self.metrics.changes.labels(kind=kind).inc(n)
        self.metrics.last_success.set(now.timestamp())
        self._count_tokens()
        c = report.counts
        self.notifier.send(STATUS=(
            f"last sync {now:%H:%M:%S} UTC ok: {report.users_read} users, "
            f"{c['suspend'] + c['resuspend']} suspended, {c['reactivate']} reactivated, "
            f"{c['expire']} expired in {report.seconds:.1f}s"))

    def expire_once(self) -> None:
        report = run_expire(self._store, now=self.clock())
        if report.applied:
            self.metrics.changes.labels(kind="expire").inc(len(report.applied))
            self._count_tokens()

    def purge_once(self) -> None:
        now = self.clock()
        n = self._store.purge(before=now - timedelta(days=self.config.store.retention_days),
                              now=now)
        log.info("purge.finished", purged=n, retention_days=self.config.store.retention_days)

    def _count_tokens(self) -> None:
        for status, n in self._store.token_counts().items():
            self.metrics.tokens.labels(status=status).set(n)

    def _watchdog(self) -> None:
        self.notifier.send(WATCHDOG=1)

    def _schedule(self, first_sync: datetime | None) -> None:
        """(Re)create the jobs from the current config; used at start and on reload."""
        for job_id in ("sync", "expire", "purge"):
            with contextlib.suppress(JobLookupError):
                self.scheduler.remove_job(job_id)
        s = self.config.sync
        jitter = int(s.jitter.total_seconds()) or None
        self.scheduler.add_job(self._job, IntervalTrigger(seconds=s.interval.total_seconds(),
                                                          jitter=jitter),
                               args=("sync", self.sync_once), id="sync", name="sync",
                               replace_existing=True,
                               # APScheduler adds a job with next_run_time=None *paused*
                               **({"next_run_time": first_sync} if first_sync else {}))
        self.scheduler.add_job(self._job, IntervalTrigger(
            seconds=s.expire_interval.total_seconds()), args=("expire", self.expire_once),
            id="expire", name="expire", replace_existing=True)
        self.scheduler.add_job(self._job, IntervalTrigger(days=1),
                               args=("purge", self.purge_once), id="purge", name="purge",
                               next_run_time=self.clock() + timedelta(minutes=1),
                               replace_existing=True)

    # -- signals --

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        log.info("daemon.stopping", signal=signal.Signals(signum).name)
        self.notifier.send(STOPPING=1, STATUS="stopping")
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        if self.scheduler.running and not self._stopping.is_set():
            self.scheduler.add_job(self.reload, id="reload", replace_existing=True)

    def reload(self) -> bool:
        """Re-read and re-validate the config; a bad one is refused and the old one stays."""
        self.notifier.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)
        try:
            new = load_config(self.config_path)
            if new.store.url != self.config.store.url:
                raise ConfigError(f"{new.source}: store.url: cannot change on reload; restart")
            if self._web is not None:
                for section in ("http", "verify"):
                    if getattr(new, section) != getattr(self.config, section):
                        raise ConfigError(f"{new.source}: {section}: cannot change on reload "
                                          "while the HTTP service runs; restart")
            directory = self._open_directory(new)
        except GroupgateError as exc:
            log.error("config.reload_failed", error=str(exc))
            self.notifier.send(READY=1, STATUS=f"reload refused: {exc}")
            return False
        self.config = new
        self._directory = directory
        if self._web is not None:  # the HTTP service follows policy and directory changes
            self._web.reconfigure(new, directory)
        logs.configure(new.log.format, new.log.level)
        self._schedule(first_sync=None)
        log.info("config.reloaded", file=new.source)
        self.notifier.send(READY=1, STATUS="configuration reloaded")
        return True

    # -- the main loop --

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        self._store = self._wait_for_store()
        if self._store is None:
            return 0
        try:
            if self._store.backend == "sqlite":
                path = self._store.sqlite_path
                if path is not None:
                    self._instance_lock = SqliteInstanceLock(path)
                    self._instance_lock.acquire()
            else:
                self._leader = PostgresLeader(self._store.engine)
            self._directory = self._open_directory(self.config)
            if self.config.metrics.listen:
                self.metrics.serve(self.config.metrics.listen)
            if self.config.http.listen:
                self._start_http()
            self._schedule(first_sync=self.clock())
            wd = watchdog_interval()
            if wd is not None:
                self.scheduler.add_job(self._watchdog, IntervalTrigger(seconds=wd),
                                       id="watchdog", name="watchdog",
                                       next_run_time=self.clock())
            log.info("daemon.started", pid=os.getpid(), store=self._store.backend,
                     directory=self._directory is not None,
                     sync_interval=self.config.sync.interval.total_seconds())
            if self._directory is None:
                log.warning("daemon.no_directory",
                            detail="directory.urls is empty: only expiry and purge run")
            self.notifier.send(READY=1, STATUS="started; first sync running",
                               MAINPID=os.getpid())
            if not self._stopping.is_set():
                self.scheduler.start()
            self._wait_for_jobs()
            return 0
        finally:
            self._close()

    def _start_http(self) -> None:
        """The HTTP service in a thread of this process (verify needs no leadership)."""
        try:
            from daemon import web
        except ImportError as exc:
            raise ConfigError(f"{self.config.source}: http.listen: the HTTP service needs "
                              f"groupgate[http] ({exc.name} is missing)") from None
        self._web, app = web.build(self.config)
        self._http = web.server(self.config, app)
        thread = threading.Thread(target=self._http.run, name="http", daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not self._http.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._http.started:
            raise ConfigError(f"{self.config.source}: http.listen: cannot serve on "
                              f"{self.config.http.listen}")
        log.info("http.started", listen=self.config.http.listen,
                 tls=bool(self.config.http.tls_cert_file))

    def _wait_for_jobs(self) -> None:
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        with self._running_cond:
            while self._running and time.monotonic() < deadline:
                self._running_cond.wait(0.1)

    def _close(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        if self._http is not None:
            self._http.should_exit = True
        if self._leader is not None:
            self._leader.release()
        if self._instance_lock is not None:
            self._instance_lock.release()
        self.metrics.close()
        if self._store is not None:
            self._store.close()
        log.info("daemon.stopped", pid=os.getpid())
        self.notifier.close()

