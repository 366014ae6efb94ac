"""verify() semantics with a fake store: reasons, caching, throttling, cheap rejection."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from daemon.model import VerifyRow
from daemon.tokens import SecretHasher, generate
from daemon.verify import Reason, Verifier
from tests.fakes import FakeVerifyStore

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
HASHER = SecretHasher(time_cost=1, memory_kib=64, parallelism=1)


def make(status: str = "active", owner: str = "alice", expires: timedelta = timedelta(days=1),
         reason: str | None = None, **kw: object) -> tuple[Verifier, FakeVerifyStore, str]:
    tok = generate()
    store = FakeVerifyStore()
    store.rows[tok.token_id] = VerifyRow(owner, HASHER.hash(tok.secret), status, reason,
                                         NOW + expires, None)
    clock = kw.pop("clock", lambda: NOW)
    v = Verifier(store, hasher=HASHER, clock=clock, **kw)  # type: ignore[arg-type]
    return v, store, str(tok)


def test_ok_returns_owner_and_expiry() -> None:
    v, _, tok = make()
    r = v.verify("alice", tok)
    assert r.ok and bool(r) and r.reason is Reason.OK
    assert r.owner == "alice" and r.expires_at == NOW + timedelta(days=1)


@pytest.mark.parametrize("user", ["ALICE", "Alice", " alice "])
def test_usernames_compare_case_insensitively(user: str) -> None:
    v, _, tok = make()
    assert v.verify(user, tok).ok


@pytest.mark.parametrize("status,reason", [("suspended", Reason.SUSPENDED),
                                           ("expired", Reason.EXPIRED),
                                           ("revoked", Reason.REVOKED)])
def test_non_active_statuses_refuse_with_their_reason(status: str, reason: Reason) -> None:
    v, _, tok = make(status=status, reason="not_in_group")
    r = v.verify("alice", tok)
    assert not r.ok and r.reason is reason
    assert r.status_reason == "not_in_group"


def test_past_expiry_is_expired_before_the_sweep_marks_it() -> None:
    v, _, tok = make(expires=timedelta(seconds=-1))
    assert v.verify("alice", tok).reason is Reason.EXPIRED


def test_wrong_user_and_wrong_secret_reveal_no_owner() -> None:
    v, _, tok = make()
    r = v.verify("bob", tok)
    assert r.reason is Reason.WRONG_USER and r.owner is None
    other = generate(token_id=tok[3:15])
    r2 = v.verify("alice", str(other))
    assert r2.reason is Reason.WRONG_SECRET and r2.owner is None and r2.expires_at is None


def test_unknown_token() -> None:
    v, _, _ = make()
    assert v.verify("alice", str(generate())).reason is Reason.UNKNOWN_TOKEN


@pytest.mark.parametrize("user,token", [
    ("", "x"), ("alice", ""), (None, None), (b"alice", b"tok"), ("alice", "gg_" + "a" * 62),
    ("alice", "x" * 100000), ("a" * 10000, "y"), ("al\x00ice", "z"),
])
def test_malformed_input_never_touches_store(user: object, token: object) -> None:
    v, store, _ = make()
    assert v.verify(user, token).reason is Reason.MALFORMED
    assert store.lookups == 0


def test_argon2_runs_once_per_token(mocker: object) -> None:
    """After one successful check the secret is recognised from a keyed digest."""
    v, _, tok = make()
    spy = mocker.spy(HASHER, "verify")  # type: ignore[attr-defined]
    for _ in range(20):
        assert v.verify("alice", tok).ok
    assert spy.call_count == 1


def test_known_token_with_other_secret_is_refused_without_argon2(mocker: object) -> None:
    v, _, tok = make()
    assert v.verify("alice", tok).ok
    spy = mocker.spy(HASHER, "verify")  # type: ignore[attr-defined]
    wrong = str(generate(token_id=tok[3:15]))
    assert v.verify("alice", wrong).reason is Reason.WRONG_SECRET
    assert spy.call_count == 0


def test_repeated_wrong_secrets_are_throttled(mocker: object) -> None:
    """An attacker hammering one token id gets at most max_failures argon2 runs per window."""
    v, _, tok = make(max_failures=5, failure_window=timedelta(seconds=3600))
    spy = mocker.spy(HASHER, "verify")  # type: ignore[attr-defined]
    for _ in range(50):
        wrong = str(generate(token_id=tok[3:15]))
        assert v.verify("alice", wrong).reason is Reason.WRONG_SECRET
    assert spy.call_count == 5


def test_last_used_is_recorded_at_resolution() -> None:
    now = [NOW]
    v, store, tok = make(clock=lambda: now[0], last_used_resolution=timedelta(seconds=60))
    for _ in range(10):
        assert v.verify("alice", tok).ok
    assert len(store.touches) == 1
    now[0] = NOW + timedelta(seconds=61)
    assert v.verify("alice", tok).ok
    assert len(store.touches) == 2


@pytest.mark.parametrize("header", [
    "", "Bearer abc", "Basic", "Basic !!!", "Basic " + "A" * 5000, "Basic YWxpY2U=",
    "Basic //79/w==", b"Basic \xff\xfe", 42, None,
])
def test_verify_basic_malformed_headers(header: object) -> None:
    v, store, _ = make()
    assert v.verify_basic(header).reason is Reason.MALFORMED
    assert store.lookups == 0


def test_verify_basic_accepts_a_real_header() -> None:
    import base64

    v, _, tok = make()
    header = "Basic " + base64.b64encode(f"Alice:{tok}".encode()).decode()
    assert v.verify_basic(header).ok
    assert v.verify_basic(header.encode()).ok
    assert v.verify_basic("basic  " + header.split()[1]).ok
