"""Pure decisions: from (snapshot, tokens, policy, now) to a plan. No I/O, no clock, no LDAP.

A plan is a tuple of :class:`StatusChange`; each describes itself in one line. Everything
here is deterministic, so the unit tests need no server and a dry run shows exactly what a
real run would do.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from daemon.config import PolicyConfig, SyncConfig
from daemon.model import DirectoryUser, Snapshot, Status, StatusChange, TokenState

Plan = tuple[StatusChange, ...]

# Reasons sync sets; only tokens suspended for one of these are ever reactivated by sync.
NOT_IN_GROUP = "not_in_group"
DISABLED = "disabled"
NOT_FOUND = "not_found"
EXPIRED = "expired"
SYNC_REASONS = frozenset({NOT_IN_GROUP, DISABLED, NOT_FOUND})


def wanted_state(user: DirectoryUser | None) -> tuple[Status, str | None]:
    """What a token of this user should be: active, or suspended with the reason why."""
    if user is None:
        return Status.SUSPENDED, NOT_FOUND
    if user.disabled:
        return Status.SUSPENDED, DISABLED
    if not user.allowed:
        return Status.SUSPENDED, NOT_IN_GROUP
    return Status.ACTIVE, None


def plan_expiry(tokens: Iterable[TokenState], now: datetime) -> Plan:
    """Live tokens at or past their expiry become expired (final)."""
    return tuple(
        StatusChange("expire", t.id, t.owner, t.status, Status.EXPIRED, EXPIRED)
        for t in tokens if not t.status.final and now >= t.expires_at)


def plan_sync(snapshot: Snapshot, tokens: Iterable[TokenState], policy: PolicyConfig,
              now: datetime) -> Plan:
    """Suspend and reactivate tokens to follow the directory.

    Tokens past expiry are left to :func:`plan_expiry`; revoked and expired ones are never
    touched; a token suspended for a reason sync does not own stays as it is.
    """
    del policy  # membership is already resolved in the snapshot; kept for a stable signature
    changes: list[StatusChange] = []
    for t in tokens:
        if t.status.final or now >= t.expires_at:
            continue
        status, reason = wanted_state(snapshot.users.get(t.owner))
        if t.status is Status.ACTIVE and status is Status.SUSPENDED:
            changes.append(StatusChange("suspend", t.id, t.owner, t.status, status, reason))
        elif t.status is Status.SUSPENDED and t.status_reason in SYNC_REASONS:
            if status is Status.ACTIVE:
                changes.append(StatusChange("reactivate", t.id, t.owner, t.status, status, None))
            elif reason != t.status_reason:
                changes.append(StatusChange("resuspend", t.id, t.owner, t.status, status, reason))
    return tuple(changes)


@dataclass(frozen=True)
class Refusal:
    """Why the safety brake stopped a plan; `forceable` refusals may be applied by a human."""

    event: str
    message: str
    forceable: bool
    counts: dict[str, int | float]


def check_brake(snapshot: Snapshot, plan: Plan, tokens: Sequence[TokenState],
                policy: PolicyConfig, sync: SyncConfig) -> Refusal | None:
    """Refuse plans that look like a directory accident rather than a decision.

    An allowed group with zero members is never forceable: it is almost always a broken
    filter, base DN or permission, and applying it would lock everyone out.
    """
    empty = snapshot.empty_allowed_groups(policy.allowed_groups)
    if empty:
        return Refusal("sync.refused", f"allowed group(s) resolved to zero members: "
                       f"{', '.join(empty)}; nothing changed", False,
                       {"empty_groups": len(empty)})
    suspends = sum(1 for c in plan if c.kind == "suspend")
    active = sum(1 for t in tokens if t.status is Status.ACTIVE)
    fraction = suspends / active if active else 0.0
    if suspends > sync.max_suspend_count and fraction > sync.max_suspend_fraction:
        return Refusal(
            "sync.refused",
            f"plan would suspend {suspends} of {active} active tokens ({fraction:.0%}), over "
            f"sync.max_suspend_count={sync.max_suspend_count} and "
            f"sync.max_suspend_fraction={sync.max_suspend_fraction:.0%}; review with "
            "'groupgate sync --dry-run' and apply with 'groupgate sync --force'", True,
            {"suspend": suspends, "active": active, "fraction": round(fraction, 4)})
    return None


def summarize(plan: Plan) -> dict[str, int]:
    counts: dict[str, int] = {"suspend": 0, "reactivate": 0, "resuspend": 0, "expire": 0}
    for c in plan:
        counts[c.kind] = counts.get(c.kind, 0) + 1
    return counts
