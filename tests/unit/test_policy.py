"""Policy is pure: a snapshot, tokens, a policy and a time go in; a plan comes out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from daemon.config import GroupLimit, PolicyConfig, SyncConfig
from daemon.model import DirectoryUser, Snapshot, Status, TokenRecord
from daemon.policy import check_brake, plan_expiry, plan_sync

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
POLICY = PolicyConfig(allowed_groups=("token-users",))


def user(name: str, *, allowed: bool = True, disabled: bool = False) -> DirectoryUser:
    groups = frozenset({"token-users"}) if allowed else frozenset()
    return DirectoryUser(name, f"uid={name},dc=x", disabled, allowed, False, groups)


def snap(*users: DirectoryUser, sizes: dict[str, int] | None = None) -> Snapshot:
    return Snapshot(NOW, {u.username: u for u in users},
                    sizes if sizes is not None else {"token-users": max(1, len(users))})


def tok(owner: str, status: Status = Status.ACTIVE, reason: str | None = None,
        expires: timedelta = timedelta(days=1), tid: str | None = None) -> TokenRecord:
    return TokenRecord(tid or f"{owner[:6]:x<6}{status.value[:6]:x<6}", owner, "t", status,
                       reason, NOW - timedelta(days=1), NOW + expires, NOW, None, owner)


def kinds(plan: tuple) -> list[tuple[str, str, str | None]]:  # type: ignore[type-arg]
    return [(c.kind, c.owner, c.reason) for c in plan]


def test_members_keep_active_tokens() -> None:
    assert plan_sync(snap(user("alice")), [tok("alice")], POLICY, NOW) == ()


def test_leaving_the_group_suspends_with_not_in_group() -> None:
    plan = plan_sync(snap(user("alice", allowed=False)), [tok("alice")], POLICY, NOW)
    assert kinds(plan) == [("suspend", "alice", "not_in_group")]
    assert plan[0].describe(dry_run=True).startswith("would suspend gg_")
    assert plan[0].describe(dry_run=True).endswith("of alice: not_in_group")


def test_disabled_and_deleted_users_are_suspended_with_their_reason() -> None:
    plan = plan_sync(snap(user("bob", disabled=True)), [tok("bob"), tok("carol")], POLICY, NOW)
    assert kinds(plan) == [("suspend", "bob", "disabled"), ("suspend", "carol", "not_found")]


def test_coming_back_reactivates_sync_suspensions_only() -> None:
    tokens = [tok("alice", Status.SUSPENDED, "not_in_group", tid="a" * 12),
              tok("alice", Status.SUSPENDED, "admin_hold", tid="b" * 12),
              tok("alice", Status.REVOKED, "lost", tid="c" * 12),
              tok("alice", Status.EXPIRED, "expired", tid="d" * 12)]
    plan = plan_sync(snap(user("alice")), tokens, POLICY, NOW)
    assert [(c.kind, c.token_id) for c in plan] == [("reactivate", "a" * 12)]


def test_no_reactivation_past_expiry_and_expiry_is_planned() -> None:
    t = tok("alice", Status.SUSPENDED, "not_in_group", expires=timedelta(seconds=-1))
    assert plan_sync(snap(user("alice")), [t], POLICY, NOW) == ()
    assert kinds(plan_expiry([t], NOW)) == [("expire", "alice", "expired")]


def test_reason_follows_the_directory_while_suspended() -> None:
    t = tok("bob", Status.SUSPENDED, "not_in_group")
    plan = plan_sync(snap(user("bob", disabled=True)), [t], POLICY, NOW)
    assert kinds(plan) == [("resuspend", "bob", "disabled")]


def test_expiry_leaves_final_and_future_tokens_alone() -> None:
    tokens = [tok("a", expires=timedelta(seconds=0)), tok("b"),
              tok("c", Status.REVOKED, expires=timedelta(days=-3))]
    assert kinds(plan_expiry(tokens, NOW)) == [("expire", "a", "expired")]


def test_brake_refuses_empty_allowed_group_even_with_force() -> None:
    s = snap(user("alice"), sizes={"token-users": 0})
    refusal = check_brake(s, (), [tok("alice")], POLICY, SyncConfig())
    assert refusal is not None and not refusal.forceable
    assert "zero members: token-users" in refusal.message


def test_brake_refuses_mass_suspension_over_both_thresholds() -> None:
    tokens = [tok(f"u{i:05d}", tid=f"{i:012d}") for i in range(200)]
    s = snap(*[user(f"u{i:05d}") for i in range(140)])  # 60 of 200 vanish: 30% > 20%, 60 > 50
    plan = plan_sync(s, tokens, POLICY, NOW)
    assert len(plan) == 60
    refusal = check_brake(s, plan, tokens, POLICY, SyncConfig())
    assert refusal is not None and refusal.forceable and refusal.counts["suspend"] == 60
    # Either threshold alone is not enough.
    assert check_brake(s, plan, tokens, POLICY, SyncConfig(max_suspend_count=60)) is None
    assert check_brake(s, plan, tokens, POLICY, SyncConfig(max_suspend_fraction=0.3)) is None


def test_lifetime_cap_is_the_largest_of_the_users_limit_groups() -> None:
    p = PolicyConfig(max_lifetime_days=90, group_limits=(
        GroupLimit("long-lived", 365), GroupLimit("contractors", 7)))
    assert p.lifetime_cap_days(frozenset()) == 90
    assert p.lifetime_cap_days(frozenset({"contractors"})) == 7
    assert p.lifetime_cap_days(frozenset({"contractors", "long-lived"})) == 365


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]),
                          st.sampled_from(list(Status)),
                          st.sampled_from([None, "not_in_group", "disabled", "not_found", "x"]),
                          st.integers(-3, 3)), max_size=12),
       st.sets(st.sampled_from(["a", "b", "c"])), st.sets(st.sampled_from(["a", "b", "c"])))
def test_applying_a_plan_reaches_a_fixed_point(specs: list, members: set, disabled: set) -> None:  # type: ignore[type-arg]
    """Planning again after applying the plan yields nothing: sync is idempotent."""
    tokens = [tok(o, s, r, expires=timedelta(days=d), tid=f"{i:012d}")
              for i, (o, s, r, d) in enumerate(specs)]
    s = snap(*[user(n, allowed=n in members, disabled=n in disabled) for n in ("a", "b", "c")])
    plan = plan_expiry(tokens, NOW) + plan_sync(s, tokens, POLICY, NOW)
    assert all(not tokens[int(c.token_id)].status.final for c in plan)
    by_id = {t.id: t for t in tokens}
    for c in plan:
        t = by_id[c.token_id]
        by_id[c.token_id] = TokenRecord(t.id, t.owner, t.name, c.to_status, c.reason,
                                        t.created_at, t.expires_at, NOW, None, t.owner)
    after = list(by_id.values())
    assert plan_expiry(after, NOW) + plan_sync(s, after, POLICY, NOW) == ()
