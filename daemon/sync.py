"""Acting: run one sync or expiry pass (observe, decide, apply) and report it.

The directory adapter observes, :mod:`daemon.policy` decides, the store applies the whole plan
in one transaction. A directory error or a refused plan changes nothing.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import structlog

from daemon.config import PolicyConfig, SyncConfig
from daemon.errors import DirectoryUnavailable, SyncRefused
from daemon.model import DirectoryReader, DirectoryUser, LiveToken, StatusChange
from daemon.policy import Plan, Refusal, check_brake, plan_expiry, plan_sync, summarize

log = structlog.get_logger("groupgate.sync")

_EVENTS = {"suspend": "token.suspended", "reactivate": "token.reactivated",
           "resuspend": "token.suspended", "expire": "token.expired"}


class SyncStore(Protocol):
    def live_tokens(self) -> list[LiveToken]: ...

    def apply_changes(self, changes: Sequence[StatusChange], *, actor: str, now: datetime,
                      details: dict[str, Any] | None = None) -> list[StatusChange]: ...

    def apply_sync(self, changes: Sequence[StatusChange], *, now: datetime,
                   owners: Iterable[str], users: Mapping[str, DirectoryUser], server: str,
                   users_read: int, actor: str = "sync") -> list[StatusChange]: ...

    def record_sync_failure(self, *, now: datetime, result: str, message: str) -> None: ...


@dataclass(frozen=True)
class SyncReport:
    plan: Plan
    applied: tuple[StatusChange, ...]
    refusal: Refusal | None
    users_read: int
    seconds: float
    dry_run: bool
    timings: dict[str, float]

    @property
    def counts(self) -> dict[str, int]:
        return summarize(self.applied if not self.dry_run else self.plan)


def _log_applied(applied: Sequence[StatusChange], actor: str) -> None:
    for ch in applied:
        log.info(_EVENTS.get(ch.kind, "token.changed"), token_id=ch.token_id, owner=ch.owner,
                 reason=ch.reason, actor=actor)


class SyncAborted(Exception):
    """The daemon is stopping; the run ended before applying anything."""


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for the length of one sync.

    A sync of 100,000 users builds about a million small objects, none of them in cycles:
    reference counting frees them all, and the cyclic collector, triggered by allocation
    counts, would only walk them over and over (2 of 9 seconds in bench/sync.py).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def run_sync(directory: DirectoryReader, store: SyncStore, policy: PolicyConfig,
             sync: SyncConfig, *, now: datetime, dry_run: bool = False,
             force: bool = False, abort: Callable[[], bool] | None = None) -> SyncReport:
    """One sync pass: expiry plus directory membership. Raises on outage or refusal.

    `abort` is asked just before applying: a stopping daemon drops the plan rather than
    start a transaction it may not be given time to finish.
    """
    with _gc_paused():
        return _run_sync(directory, store, policy, sync, now=now, dry_run=dry_run,
                         force=force, abort=abort)


def _run_sync(directory: DirectoryReader, store: SyncStore, policy: PolicyConfig,
              sync: SyncConfig, *, now: datetime, dry_run: bool, force: bool,
              abort: Callable[[], bool] | None) -> SyncReport:
    started = time.monotonic()
    # Tokens first: one created while the directory is being read (seconds, for a big one)
    # is then simply not in this plan, instead of judged by a snapshot from before its owner
    # qualified. Changes to the tokens read are guarded by their from-status at apply time.
    tokens = store.live_tokens()
    t_load = time.monotonic()
    try:
        snapshot = directory.snapshot()
    except DirectoryUnavailable as exc:
        log.error("sync.failed", error=str(exc), seconds=round(time.monotonic() - started, 3))
        if not dry_run:
            store.record_sync_failure(now=now, result="failed", message=str(exc))
        raise
    t_snap = time.monotonic()
    plan = plan_expiry(tokens, now) + plan_sync(snapshot, tokens, policy, now)
    t_plan = time.monotonic()
    refusal = check_brake(snapshot, plan, tokens, policy, sync)
    timings = {"load": t_load - started, "snapshot": t_snap - t_load, "plan": t_plan - t_snap}
    if refusal is not None and not (force and refusal.forceable):
        log.error(refusal.event, reason=refusal.message, **refusal.counts)
        if not dry_run:
            store.record_sync_failure(now=now, result="refused", message=refusal.message)
        raise SyncRefused(refusal.message)
    if refusal is not None:
        log.warning("sync.forced", reason=refusal.message, **refusal.counts)
    if dry_run:
        return SyncReport(plan, (), refusal, len(snapshot.users), time.monotonic() - started,
                          True, timings)
    if abort is not None and abort():
        log.info("sync.aborted", planned=len(plan))
        raise SyncAborted("stopping")
    applied = store.apply_sync(plan, now=now, owners={t.owner for t in tokens},
                               users=snapshot.users, server=snapshot.server,
                               users_read=len(snapshot.users))
    timings["apply"] = time.monotonic() - t_plan
    _log_applied(applied, "sync")
    report = SyncReport(plan, tuple(applied), refusal, len(snapshot.users),
                        time.monotonic() - started, False, timings)
    c = report.counts
    log.info("sync.finished", users=report.users_read, activated=c["reactivate"],
             suspended=c["suspend"] + c["resuspend"], expired=c["expire"],
             skipped_entries=len(snapshot.skipped), server=snapshot.server,
             seconds=round(report.seconds, 3))
    return report


def run_expire(store: SyncStore, *, now: datetime, dry_run: bool = False) -> SyncReport:
    """Mark live tokens past their expiry as expired (final)."""
    started = time.monotonic()
    tokens = store.live_tokens()
    plan = plan_expiry(tokens, now)
    if dry_run or not plan:
        return SyncReport(plan, (), None, 0, time.monotonic() - started, dry_run, {})
    applied = store.apply_changes(plan, actor="expire", now=now)
    _log_applied(applied, "expire")
    log.info("expire.finished", expired=len(applied),
             seconds=round(time.monotonic() - started, 3))
    return SyncReport(plan, tuple(applied), None, 0, time.monotonic() - started, False, {})
