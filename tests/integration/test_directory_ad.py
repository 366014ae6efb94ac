"""The directory adapter against a real Samba AD DC: what groupgate reads, and what sync does.

Every test gets a fresh, seeded DC of its own (a copy of a session template, well under a second):
users alice, bob, carol, dave, erin (enabled), frank (disabled), rng00..rng29; groups
token-users {alice, bob, erin, token-admins}, token-admins {carol}, range-group {rng00..rng29}.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from ldap3 import BASE, Connection

from daemon.config import Config
from daemon.directory import LdapDirectory, from_config
from daemon.errors import DirectoryUnavailable, NotPermitted
from daemon.model import Status
from daemon.service import TokenService
from daemon.store import TokenStore
from daemon.sync import run_sync
from daemon.tokens import SecretHasher
from tests.integration.conftest import samba_config
from tests.servers.certs import TestCerts
from tests.servers.net import free_port
from tests.servers.samba import RANGE_USERS, USER_PASSWORD, SambaDC, user_dn

pytestmark = pytest.mark.samba

SetPassword = Callable[[str], None]


def _directory(dc: SambaDC, bind_password: SetPassword, **sections: dict[str, Any]
               ) -> tuple[LdapDirectory, Config]:
    bind_password(dc.service_password)
    cfg = samba_config(dc, **sections)
    return from_config(cfg.directory, cfg.policy), cfg


def _server_range_keys(dc: SambaDC, group: str, step: int) -> list[str]:
    """The attribute names the DC itself answers when `member` is read `step` values at a time.

    A precondition for the range tests: only when the server really splits the attribute does
    "all members found" prove that the adapter followed the ranges to the end.
    """
    # ldap3's own auto_range would follow the ranges itself and hide them from us.
    conn = Connection(dc.server(), dc.admin_dn, dc.admin_password, auto_bind=True,
                      raise_exceptions=True, auto_range=False, return_empty_attributes=False)
    keys: list[str] = []
    try:
        low = 0
        while True:
            conn.search(user_dn(group), "(objectClass=*)", BASE,
                        attributes=[f"member;range={low}-{low + step - 1}"])
            raw = conn.response[0]["raw_attributes"]
            [key] = [k for k in raw if k.lower().startswith("member;range=")]
            keys.append(key)
            high = key.rsplit("-", 1)[1]
            if high == "*":
                return keys
            low = int(high) + 1
    finally:
        conn.unbind()


# --- snapshot -------------------------------------------------------------------------------


def test_snapshot_resolves_membership_nesting_and_disabled_accounts(
        samba: SambaDC, bind_password: SetPassword) -> None:
    """A snapshot allows direct members, allows and makes admin carol through nested token-admins, leaves dave out and marks frank disabled."""  # noqa: E501
    d, _ = _directory(samba, bind_password)
    snap = d.snapshot()
    users = snap.users
    for name in ("alice", "bob", "erin"):
        assert users[name].allowed and not users[name].admin and not users[name].disabled, name
    carol = users["carol"]
    assert carol.allowed and carol.admin and not carol.disabled
    assert carol.groups == {"token-users", "token-admins"}
    assert not users["dave"].allowed and not users["dave"].admin and not users["dave"].disabled
    assert users["frank"].disabled and not users["frank"].allowed
    assert dict(snap.group_sizes) == {"token-users": 4, "token-admins": 1}
    assert snap.server == samba.url and snap.skipped == ()
    # Built-in accounts are spelled with capitals in AD ("Administrator"); keys are case-folded.
    assert "administrator" in users and users["administrator"].username == "administrator"
    assert all(name == name.casefold() for name in users)
    assert users["alice"].dn.casefold() == user_dn("alice").casefold()


def test_disabling_and_enabling_an_account_shows_in_the_next_snapshot(
        samba: SambaDC, bind_password: SetPassword) -> None:
    """Setting and clearing ACCOUNTDISABLE on erin flips `disabled` in the very next snapshot."""
    d, _ = _directory(samba, bind_password)
    assert not d.snapshot().users["erin"].disabled
    samba.disable_user("erin")
    erin = d.snapshot().users["erin"]
    assert erin.disabled and erin.allowed  # still in the group, but the account is off
    samba.enable_user("erin")
    assert not d.snapshot().users["erin"].disabled


# --- range retrieval (nesting off: groups are walked through their member attribute) -------


@pytest.mark.parametrize(("range_size", "expected_keys"), [
    (10, ["member;range=0-9", "member;range=10-19", "member;range=20-*"]),
    (7, ["member;range=0-6", "member;range=7-13", "member;range=14-20", "member;range=21-27",
         "member;range=28-*"]),
])
def test_range_retrieval_reads_every_member_of_a_large_group(
        samba: SambaDC, bind_password: SetPassword, range_size: int,
        expected_keys: list[str]) -> None:
    """With nesting off, all 30 members of range-group are allowed even though the DC hands `member` out in ranges of range_size values."""  # noqa: E501
    assert _server_range_keys(samba, "range-group", range_size) == expected_keys
    d, _ = _directory(samba, bind_password, directory={"range_size": range_size},
                      policy={"nested_groups": False, "allowed_groups": ["range-group"]})
    snap = d.snapshot()
    allowed = {name for name, u in snap.users.items() if u.allowed}
    assert allowed == set(RANGE_USERS)
    assert snap.group_sizes["range-group"] == 30


def test_a_group_changing_between_range_reads_is_read_again(
        samba: SambaDC, bind_password: SetPassword, mocker: Any) -> None:
    """Ranges are positional: a change mid-read must not shift members out; the read is redone."""
    from structlog.testing import capture_logs

    d, _ = _directory(samba, bind_password, directory={"range_size": 10},
                      policy={"nested_groups": False, "allowed_groups": ["range-group"]})
    real = LdapDirectory._search
    done = {"changed": False}

    def search(self: Any, conn: Any, base: str, flt: str, attrs: Any, **kw: Any) -> Any:
        yield from real(self, conn, base, flt, attrs, **kw)
        if not done["changed"] and any(a.startswith("member;range=0-") for a in attrs):
            done["changed"] = True
            samba.remove_member("range-group", "rng01")

    mocker.patch.object(LdapDirectory, "_search", search)
    with capture_logs() as logs:
        snap = d.snapshot()
    allowed = {name for name, u in snap.users.items() if u.allowed}
    assert allowed == set(RANGE_USERS) - {"rng01"}
    assert snap.group_sizes["range-group"] == 29
    assert any(e["event"] == "directory.range_read_retried" for e in logs)


def test_without_nesting_members_of_a_member_group_are_not_allowed(
        samba: SambaDC, bind_password: SetPassword) -> None:
    """With policy.nested_groups=false carol (only in token-admins, a member of token-users) is not allowed while alice is."""  # noqa: E501
    d, _ = _directory(samba, bind_password, policy={"nested_groups": False})
    snap = d.snapshot()
    assert snap.users["alice"].allowed
    assert not snap.users["carol"].allowed
    assert snap.users["carol"].admin  # a direct member of token-admins
    assert snap.group_sizes["token-users"] == 3
    carol = d.lookup_user("carol")
    assert carol is not None and not carol.allowed and carol.admin


# --- one user -------------------------------------------------------------------------------


def test_lookup_user_agrees_with_the_snapshot(samba: SambaDC, bind_password: SetPassword) -> None:
    """lookup_user says the same as the snapshot about alice, carol (admin via nesting) and frank (disabled), and None for an unknown name."""  # noqa: E501
    d, _ = _directory(samba, bind_password)
    snap = d.snapshot()
    for name in ("alice", "carol", "frank", "dave"):
        assert d.lookup_user(name) == snap.users[name], name
    carol = d.lookup_user("carol")
    assert carol is not None and carol.allowed and carol.admin
    frank = d.lookup_user("frank")
    assert frank is not None and frank.disabled
    assert d.lookup_user("nobody") is None
    alice = d.lookup_user("  ALICE ")
    assert alice is not None and alice.username == "alice"


def test_lookup_user_is_not_an_ldap_injection(samba: SambaDC,
                                               bind_password: SetPassword) -> None:
    """A username made of LDAP filter metacharacters finds nobody and raises nothing."""
    d, _ = _directory(samba, bind_password)
    for name in ("*)(sAMAccountName=*", "*", "alice)(|(objectClass=*", "ali*", "alice\\2a",
                 "\x00", "(", ")"):
        assert d.lookup_user(name) is None, name


# --- authentication -------------------------------------------------------------------------


def test_authenticate_with_the_right_password(samba: SambaDC,
                                              bind_password: SetPassword) -> None:
    """alice's directory password proves who she is and returns what the directory says of her."""
    d, _ = _directory(samba, bind_password)
    alice = d.authenticate("Alice", USER_PASSWORD)
    assert alice.username == "alice" and alice.allowed and not alice.disabled
    carol = d.authenticate("carol", USER_PASSWORD)
    assert carol.allowed and carol.admin


def test_authenticate_refuses_with_one_message(samba: SambaDC,
                                               bind_password: SetPassword) -> None:
    """A wrong or empty password, a disabled account and an unknown name all get the same 'wrong username or password'."""  # noqa: E501
    d, _ = _directory(samba, bind_password)
    for name, password in [
        ("alice", "not-her-password"),
        ("alice", ""),  # an unauthenticated bind, which the server would accept
        ("frank", USER_PASSWORD),  # right password, disabled account
        ("nobody", USER_PASSWORD),
        ("*", USER_PASSWORD),
    ]:
        with pytest.raises(NotPermitted) as err:
            d.authenticate(name, password)
        assert str(err.value) == "wrong username or password", (name, password)


# --- TLS ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ldaps", "starttls"])
def test_tls_accepts_only_a_certificate_from_the_configured_ca(
        samba: SambaDC, bind_password: SetPassword, test_certs: TestCerts, mode: str) -> None:
    """Over LDAPS and StartTLS, a server certificate signed by directory.ca_file is accepted and one from another CA stops the read with a certificate verify error."""  # noqa: E501
    url = samba.ldaps_url if mode == "ldaps" else samba.url
    tls = {"urls": [url], "start_tls": mode == "starttls"}
    d, _ = _directory(samba, bind_password,
                      directory={**tls, "ca_file": str(test_certs.ca_cert)})
    snap = d.snapshot()
    assert snap.server == url and snap.users["alice"].allowed

    d, _ = _directory(samba, bind_password,
                      directory={**tls, "ca_file": str(test_certs.wrong_ca_cert)})
    with pytest.raises(DirectoryUnavailable, match=r"(?i)certificate verify failed") as err:
        d.snapshot()
    assert url in str(err.value)
    assert samba.service_password not in str(err.value)


# --- failover -------------------------------------------------------------------------------


def test_failover_to_the_second_server(samba: SambaDC, bind_password: SetPassword) -> None:
    """When the first configured server does not answer, the snapshot comes from the next one."""
    dead = f"ldap://127.0.0.1:{free_port()}"
    d, _ = _directory(samba, bind_password, directory={"urls": [dead, samba.url]})
    snap = d.snapshot()
    assert snap.server == samba.url
    assert snap.users["alice"].allowed and snap.group_sizes["token-users"] == 4
    alice = d.lookup_user("alice")
    assert alice is not None and alice.allowed


# --- end to end: sync follows the directory, on both store backends -------------------------


def _last_event(store: TokenStore, token_id: str) -> tuple[str, str, str | None]:
    ev = store.audit_events(token_id=token_id)[-1]
    return ev.action, ev.actor, ev.reason


def test_sync_follows_group_membership(samba: SambaDC, bind_password: SetPassword,
                                       store: TokenStore, hasher: SecretHasher,
                                       now: datetime) -> None:
    """Leaving token-users (directly, or by token-admins leaving it) suspends a token as not_in_group, audited as sync, and rejoining reactivates it."""  # noqa: E501
    d, cfg = _directory(samba, bind_password)
    service = TokenService(store, hasher, cfg.policy)
    alice = service.create("alice", "laptop", timedelta(days=30), now).record
    carol = service.create("carol", "ci", timedelta(days=30), now).record

    def status(token_id: str) -> tuple[Status, str | None]:
        tok = store.get_token(token_id)
        assert tok is not None
        return tok.status, tok.status_reason

    report = run_sync(d, store, cfg.policy, cfg.sync, now=now)
    assert report.applied == ()
    assert status(alice.id) == status(carol.id) == (Status.ACTIVE, None)

    samba.remove_member("token-users", "alice")
    report = run_sync(d, store, cfg.policy, cfg.sync, now=now)
    assert [(c.kind, c.owner, c.reason) for c in report.applied] == [
        ("suspend", "alice", "not_in_group")]
    assert status(alice.id) == (Status.SUSPENDED, "not_in_group")
    assert _last_event(store, alice.id) == ("suspend", "sync", "not_in_group")
    assert status(carol.id) == (Status.ACTIVE, None)
    row = store.directory_user("alice")
    assert row is not None and row["present"] and not row["allowed"]

    samba.add_member("token-users", "alice")
    report = run_sync(d, store, cfg.policy, cfg.sync, now=now)
    assert [(c.kind, c.owner) for c in report.applied] == [("reactivate", "alice")]
    assert status(alice.id) == (Status.ACTIVE, None)
    assert _last_event(store, alice.id) == ("reactivate", "sync", None)

    samba.remove_member("token-users", "token-admins")
    report = run_sync(d, store, cfg.policy, cfg.sync, now=now)
    assert [(c.kind, c.owner, c.reason) for c in report.applied] == [
        ("suspend", "carol", "not_in_group")]
    assert status(carol.id) == (Status.SUSPENDED, "not_in_group")
    assert _last_event(store, carol.id) == ("suspend", "sync", "not_in_group")
    assert status(alice.id) == (Status.ACTIVE, None)


def test_sync_suspends_the_token_of_a_disabled_account(samba: SambaDC,
                                                       bind_password: SetPassword,
                                                       store: TokenStore, hasher: SecretHasher,
                                                       now: datetime) -> None:
    """Disabling bob's account in AD suspends his token with reason disabled; enabling it brings the token back."""  # noqa: E501
    d, cfg = _directory(samba, bind_password)
    service = TokenService(store, hasher, cfg.policy)
    bob = service.create("bob", "deploy", timedelta(days=7), now).record
    alice = service.create("alice", "laptop", timedelta(days=7), now).record
    assert run_sync(d, store, cfg.policy, cfg.sync, now=now).applied == ()

    samba.disable_user("bob")
    report = run_sync(d, store, cfg.policy, cfg.sync, now=now)
    assert [(c.kind, c.owner, c.reason) for c in report.applied] == [
        ("suspend", "bob", "disabled")]
    tok = store.get_token(bob.id)
    assert tok is not None and (tok.status, tok.status_reason) == (Status.SUSPENDED, "disabled")
    assert _last_event(store, bob.id) == ("suspend", "sync", "disabled")
    still = store.get_token(alice.id)
    assert still is not None and still.status is Status.ACTIVE

    samba.enable_user("bob")
    report = run_sync(d, store, cfg.policy, cfg.sync, now=now)
    assert [(c.kind, c.owner) for c in report.applied] == [("reactivate", "bob")]
    tok = store.get_token(bob.id)
    assert tok is not None and tok.status is Status.ACTIVE
