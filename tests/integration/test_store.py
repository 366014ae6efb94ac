"""The token store on SQLite and PostgreSQL: every change audited, nothing half-done."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from daemon.config import PolicyConfig
from daemon.errors import BadInput, SchemaMismatch, StoreUnavailable
from daemon.model import Status, StatusChange
from daemon.service import TokenService
from daemon.store import TokenStore, head_revision
from daemon.tokens import SecretHasher
from daemon.verify import Reason, Verifier


def test_create_lists_and_audits(service: TokenService, store: TokenStore, now: datetime) -> None:
    created = service.create("Alice", "laptop", timedelta(days=30), now)
    assert created.record.owner == "alice"
    [tok] = store.list_tokens(owner="alice")
    assert tok.id == created.record.id and tok.status is Status.ACTIVE
    assert tok.expires_at == now + timedelta(days=30)
    [event] = store.audit_events(token_id=tok.id)
    assert (event.action, event.actor, event.owner) == ("created", "alice", "alice")
    assert created.token not in repr(created) and created.token not in str(event)


def test_timestamps_are_aware_utc(service: TokenService, store: TokenStore) -> None:
    """A non-UTC aware time goes in; the same instant in UTC comes out, on both backends."""
    cet = timezone(timedelta(hours=1))
    t0 = datetime(2026, 12, 4, 13, 0, 0, 123456, tzinfo=cet)
    service.create("bob", "ci", timedelta(days=1), t0)
    [tok] = store.list_tokens(owner="bob")
    assert tok.created_at.tzinfo is not None and tok.created_at.utcoffset() == timedelta(0)
    assert tok.created_at == t0
    [ev] = store.audit_events(owner="bob")
    assert ev.at == t0 and ev.at.utcoffset() == timedelta(0)


def test_naive_datetimes_are_refused(service: TokenService) -> None:
    with pytest.raises(Exception, match="naive datetime"):
        service.create("bob", "ci", timedelta(days=1), datetime(2026, 1, 1))


def test_lifetime_above_policy_is_refused(service: TokenService, store: TokenStore,
                                          now: datetime) -> None:
    with pytest.raises(BadInput, match="exceeds the policy maximum of 90 days"):
        service.create("alice", "long", timedelta(days=91), now)
    with pytest.raises(BadInput, match="policy maximum of 7 days"):
        service.create("alice", "long", timedelta(days=8), now, max_lifetime_days=7)
    assert store.list_tokens() == [] and store.audit_events() == []


@pytest.mark.parametrize("name", ["", "x" * 65, "tab\there", " padded", "nul\x00"])
def test_bad_names_are_refused(service: TokenService, now: datetime, name: str) -> None:
    with pytest.raises(BadInput, match="token name"):
        service.create("alice", name, timedelta(days=1), now)


def test_names_unique_per_owner_among_live_tokens(service: TokenService, now: datetime) -> None:
    first = service.create("alice", "laptop", timedelta(days=1), now)
    with pytest.raises(BadInput, match="already has a live token named 'laptop'"):
        service.create("ALICE", "laptop", timedelta(days=1), now)
    service.create("bob", "laptop", timedelta(days=1), now)  # other owner: fine
    service.revoke(first.record.id, actor="admin", now=now)
    service.create("alice", "laptop", timedelta(days=1), now)  # revoked is final: name free


def test_per_user_cap(service: TokenService, store: TokenStore, now: datetime) -> None:
    for i in range(3):
        service.create("alice", f"t{i}", timedelta(days=1), now)
    with pytest.raises(BadInput, match="already has 3 live tokens"):
        service.create("alice", "t3", timedelta(days=1), now)
    assert len(store.list_tokens(owner="alice")) == 3
    assert len(store.audit_events(owner="alice")) == 3


def test_unique_index_holds_even_without_the_precheck(store: TokenStore, service: TokenService,
                                                      now: datetime) -> None:
    """The database itself refuses a second live token of the same name (race safety)."""
    a = service.create("alice", "dup", timedelta(days=1), now)
    with pytest.raises(BadInput, match="already exists"):
        store.create_token(a.record.__class__(**{**a.record.__dict__, "id": "Z" * 12}),
                           "$argon2id$x", precheck=lambda live: None)
    assert len(store.audit_events()) == 1


def test_revoke_is_final_and_audited(service: TokenService, store: TokenStore,
                                     now: datetime) -> None:
    c = service.create("alice", "laptop", timedelta(days=1), now)
    tok = service.revoke(c.record.id, actor="cli:root", now=now, reason="lost laptop")
    assert tok.status is Status.REVOKED and tok.status_reason == "lost laptop"
    with pytest.raises(BadInput, match="already revoked"):
        service.revoke(c.record.id, actor="cli:root", now=now)
    actions = [(e.action, e.actor, e.reason) for e in store.audit_events(token_id=c.record.id)]
    assert actions == [("created", "alice", None), ("revoke", "cli:root", "lost laptop")]


def test_apply_changes_is_all_or_nothing(service: TokenService, store: TokenStore,
                                         now: datetime) -> None:
    """A failure in the middle of a batch leaves every token and the audit log untouched."""
    toks = [service.create("alice", f"t{i}", timedelta(days=1), now).record for i in range(3)]
    good = [StatusChange("suspend", t.id, t.owner, Status.ACTIVE, Status.SUSPENDED,
                         "not_in_group") for t in toks]
    bad = StatusChange("suspend", toks[0].id, "alice", Status.ACTIVE, "bogus",  # type: ignore[arg-type]
                       "x" * 300)
    before = len(store.audit_events())
    with pytest.raises(Exception):
        store.apply_changes([good[0], good[1], bad], actor="sync", now=now)
    assert {t.status for t in store.list_tokens()} == {Status.ACTIVE}
    assert len(store.audit_events()) == before
    applied = store.apply_changes(good, actor="sync", now=now)
    assert len(applied) == 3
    assert {t.status for t in store.list_tokens()} == {Status.SUSPENDED}
    # Idempotent: the same plan again finds nothing in its from-state and changes nothing.
    assert store.apply_changes(good, actor="sync", now=now) == []
    assert len(store.audit_events()) == before + 3


def test_revocation_takes_effect_on_next_call_of_another_verifier(
        service: TokenService, store_url: str, now: datetime) -> None:
    """Two independent verifiers (as in two processes) see a revocation on their next call."""
    c = service.create("alice", "laptop", timedelta(days=1), now)
    v1 = Verifier.from_url(store_url, clock=lambda: now)
    v2 = Verifier.from_url(store_url, clock=lambda: now)
    assert v1.verify("alice", c.token).ok and v2.verify("alice", c.token).ok
    service.revoke(c.record.id, actor="admin", now=now)
    assert v1.verify("alice", c.token).reason is Reason.REVOKED
    assert v2.verify("alice", c.token).reason is Reason.REVOKED
    v1.close()
    v2.close()


def test_every_reason_through_the_public_api(store: TokenStore, hasher: SecretHasher,
                                             store_url: str, now: datetime) -> None:
    from daemon.tokens import generate

    service = TokenService(store, hasher, PolicyConfig(max_tokens_per_user=10))

    ok = service.create("alice", "ok", timedelta(days=1), now)
    sus = service.create("alice", "sus", timedelta(days=1), now)
    rev = service.create("alice", "rev", timedelta(days=1), now)
    exp = service.create("alice", "exp", timedelta(days=1), now - timedelta(days=2))
    store.apply_changes([StatusChange("suspend", sus.record.id, "alice", Status.ACTIVE,
                                      Status.SUSPENDED, "not_in_group")], actor="sync", now=now)
    service.revoke(rev.record.id, actor="admin", now=now)
    v = Verifier.from_url(store_url, clock=lambda: now)
    wrong_secret = str(generate(token_id=ok.record.id))
    cases = {
        Reason.OK: ("alice", ok.token), Reason.MALFORMED: ("alice", "gg_nope"),
        Reason.UNKNOWN_TOKEN: ("alice", str(generate())), Reason.WRONG_USER: ("bob", ok.token),
        Reason.WRONG_SECRET: ("alice", wrong_secret), Reason.SUSPENDED: ("alice", sus.token),
        Reason.EXPIRED: ("alice", exp.token), Reason.REVOKED: ("alice", rev.token),
    }
    for reason, (user, token) in cases.items():
        assert v.verify(user, token).reason is reason, reason
    assert v.verify("alice", sus.token).status_reason == "not_in_group"
    v.close()


def test_last_used_is_written_at_resolution(service: TokenService, store: TokenStore,
                                            store_url: str, now: datetime) -> None:
    c = service.create("alice", "laptop", timedelta(days=1), now)
    clock = [now]
    v = Verifier(TokenStore(store_url), clock=lambda: clock[0],
                 last_used_resolution=timedelta(seconds=60))
    assert v.verify("alice", c.token).ok
    assert store.get_token(c.record.id).last_used_at == now  # type: ignore[union-attr]
    clock[0] = now + timedelta(seconds=30)
    assert v.verify("alice", c.token).ok
    assert store.get_token(c.record.id).last_used_at == now  # type: ignore[union-attr]
    clock[0] = now + timedelta(seconds=90)
    assert v.verify("alice", c.token).ok
    assert store.get_token(c.record.id).last_used_at == now + timedelta(seconds=90)  # type: ignore[union-attr]
    v.close()


def test_verify_works_from_many_threads(service: TokenService, store_url: str,
                                        now: datetime) -> None:
    from concurrent.futures import ThreadPoolExecutor

    c = service.create("alice", "laptop", timedelta(days=1), now)
    v = Verifier.from_url(store_url, clock=lambda: now)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: v.verify("alice", c.token).ok, range(200)))
    assert all(results)
    v.close()


def test_schema_missing_behind_and_ahead_are_refused(store_url: str) -> None:
    with pytest.raises(SchemaMismatch, match="run 'groupgate db upgrade'"):
        TokenStore(store_url)
    s = TokenStore(store_url, check_schema=False)
    head = head_revision()
    assert s.upgrade() == (None, head)
    assert s.upgrade() == (head, head)
    with s.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(SchemaMismatch, match="newer than this groupgate"):
        TokenStore(store_url)
    with s.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0000'"))
    with pytest.raises(SchemaMismatch, match="upgrade groupgate"):
        TokenStore(store_url)
    s.close()


def test_unreachable_postgres_raises_store_unavailable() -> None:
    from tests.servers.net import free_port

    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test"
    with pytest.raises(StoreUnavailable, match="store unavailable"):
        TokenStore(url)


def test_verify_raises_store_unavailable_when_database_goes_away(
        service: TokenService, store: TokenStore, store_url: str, now: datetime) -> None:
    c = service.create("alice", "laptop", timedelta(days=1), now)
    v = Verifier.from_url(store_url, clock=lambda: now)
    assert v.verify("alice", c.token).ok
    with store.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE tokens"))
    with pytest.raises(StoreUnavailable):
        v.verify("alice", c.token)
    v.close()


def test_sqlite_missing_directory_names_the_fix(tmp_path: object) -> None:
    with pytest.raises(StoreUnavailable, match=r"does not exist .*groupgate db upgrade"):
        TokenStore("sqlite:////nonexistent/dir/gg.db")

