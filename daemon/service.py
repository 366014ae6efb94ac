"""Token operations people perform (create, revoke), with the policy checks that guard them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import structlog

from daemon.config import PolicyConfig
from daemon.errors import BadInput
from daemon.model import Status, StatusChange, TokenRecord, canonical_username
from daemon.tokens import SecretHasher, generate

log = structlog.get_logger("groupgate.service")

MAX_NAME_LEN = 64


class FinalToken(BadInput):
    """The token is already expired or revoked: nothing left to do."""


@dataclass(frozen=True)
class CreatedToken:
    """A new token and its one-time secret text; the secret never shows in repr()."""

    record: TokenRecord
    token: str = field(repr=False)


class ServiceStore(Protocol):
    def create_token(self, record: TokenRecord, secret_hash: str, *,
                     precheck: Callable[[list[TokenRecord]], None],
                     details: dict[str, Any] | None = None) -> None: ...

    def get_token(self, token_id: str) -> TokenRecord | None: ...

    def apply_changes(self, changes: Sequence[StatusChange], *, actor: str, now: datetime,
                      details: dict[str, Any] | None = None) -> list[StatusChange]: ...


def check_name(name: str) -> str:
    """Names are 1-64 printable characters, without surrounding spaces."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
        raise BadInput(f"token name must be 1-{MAX_NAME_LEN} characters")
    if not name.isprintable() or name != name.strip():
        raise BadInput("token name must be printable characters without surrounding spaces")
    return name


def check_lifetime(lifetime: timedelta, max_days: int) -> timedelta:
    if lifetime <= timedelta(0):
        raise BadInput("token lifetime must be positive")
    if lifetime > timedelta(days=max_days):
        raise BadInput(f"token lifetime {_days(lifetime)} exceeds the policy maximum of "
                       f"{max_days} days")
    return lifetime


def _days(td: timedelta) -> str:
    if td % timedelta(days=1) == timedelta(0):
        return f"{td.days} days"
    return str(td)


class TokenService:
    """Creates and revokes tokens; every change is audited by the store in the same transaction."""

    def __init__(self, store: ServiceStore, hasher: SecretHasher, policy: PolicyConfig) -> None:
        self._store = store
        self._hasher = hasher
        self._policy = policy

    def create(self, owner: str, name: str, lifetime: timedelta, now: datetime, *,
               created_by: str | None = None, max_lifetime_days: int | None = None,
               details: dict[str, object] | None = None) -> CreatedToken:
        """Mint a token for `owner`; `max_lifetime_days` is the cap from the owner's groups."""
        user = canonical_username(owner)
        if not user or len(user) > 256 or not user.isprintable():
            raise BadInput("owner must be a non-empty printable username")
        check_name(name)
        cap = max_lifetime_days if max_lifetime_days is not None else self._policy.max_lifetime_days
        check_lifetime(lifetime, cap)
        limit = self._policy.max_tokens_per_user

        def precheck(live: list[TokenRecord]) -> None:
            if len(live) >= limit:
                raise BadInput(f"{user} already has {len(live)} live tokens "
                               f"(policy.max_tokens_per_user = {limit}); revoke one first")
            if any(t.name == name for t in live):
                raise BadInput(f"{user} already has a live token named {name!r}")

        parsed = generate()
        record = TokenRecord(id=parsed.token_id, owner=user, name=name, status=Status.ACTIVE,
                             status_reason=None, created_at=now, expires_at=now + lifetime,
                             status_changed_at=now, last_used_at=None,
                             created_by=canonical_username(created_by) if created_by else user)
        self._store.create_token(record, self._hasher.hash(parsed.secret), precheck=precheck,
                                 details=details)
        log.info("token.created", token_id=record.id, owner=user, name=name,
                 expires_at=record.expires_at.isoformat(), actor=record.created_by)
        return CreatedToken(record, str(parsed))

    def revoke(self, token_id: str, *, actor: str, now: datetime,
               reason: str | None = None) -> TokenRecord:
        """Revoke a live token (final); revoking a final token is an error that names its state."""
        if reason is not None and (len(reason) > 64 or not reason.isprintable()):
            raise BadInput("the reason must be at most 64 printable characters")
        # A sync may move a token between active and suspended at any moment: retry with the
        # fresh status, so that a revocation never silently leaves a token merely suspended.
        for _attempt in range(5):
            tok = self._store.get_token(token_id)
            if tok is None:
                raise BadInput(f"no token gg_{token_id}")
            if tok.status.final:
                raise FinalToken(f"token {tok.display_id} is already {tok.status.value}")
            change = StatusChange("revoke", tok.id, tok.owner, tok.status, Status.REVOKED,
                                  reason or "revoked")
            if self._store.apply_changes([change], actor=actor, now=now):
                break
        else:
            raise BadInput(f"token gg_{token_id} keeps changing; try again")
        log.info("token.revoked", token_id=tok.id, owner=tok.owner, actor=actor,
                 reason=change.reason)
        updated = self._store.get_token(token_id)
        assert updated is not None
        return updated
