"""Plain records shared by the core and the adapters; no database or LDAP types leak past here."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from daemon.tokens import display_id


class Status(enum.StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    EXPIRED = "expired"
    REVOKED = "revoked"

    @property
    def final(self) -> bool:
        """Expired and revoked are final: nothing ever brings such a token back."""
        return self in (Status.EXPIRED, Status.REVOKED)


NON_FINAL = (Status.ACTIVE, Status.SUSPENDED)


def canonical_username(name: str) -> str:
    """Directory names compare case-insensitively; this is the one rule, used everywhere."""
    return name.strip().casefold()


@dataclass(frozen=True)
class TokenRecord:
    """A token as stored, without its secret hash."""

    id: str
    owner: str
    name: str
    status: Status
    status_reason: str | None
    created_at: datetime
    expires_at: datetime
    status_changed_at: datetime
    last_used_at: datetime | None
    created_by: str

    @property
    def display_id(self) -> str:
        return display_id(self.id)


class TokenState(Protocol):
    """What policy needs to know of a token (TokenRecord and LiveToken both have it)."""

    @property
    def id(self) -> str: ...

    @property
    def owner(self) -> str: ...

    @property
    def status(self) -> Status: ...

    @property
    def status_reason(self) -> str | None: ...

    @property
    def expires_at(self) -> datetime: ...


class LiveToken(NamedTuple):
    """A live token as sync reads it: only what planning needs, cheap to build by the 100,000."""

    id: str
    owner: str
    status: Status
    status_reason: str | None
    expires_at: datetime


class VerifyRow(NamedTuple):
    """What verify needs from the store, read by one primary-key lookup.

    A NamedTuple rather than a frozen dataclass: it is built on every verify call, and this
    is three times cheaper.
    """

    owner: str
    secret_hash: str
    status: str
    status_reason: str | None
    expires_at: datetime
    last_used_at: datetime | None

    def __repr__(self) -> str:
        return (f"VerifyRow(owner={self.owner!r}, status={self.status!r}, "
                f"expires_at={self.expires_at!r})")


@dataclass(frozen=True)
class StatusChange:
    """One planned status change; applied only if the token is still in `from_status`."""

    kind: str  # suspend | reactivate | expire | revoke
    token_id: str
    owner: str
    from_status: Status
    to_status: Status
    reason: str | None

    def describe(self, *, dry_run: bool = False) -> str:
        verb = {"resuspend": "keep suspended"}.get(self.kind, self.kind)
        head = f"would {verb}" if dry_run else verb
        tail = f": {self.reason}" if self.reason else ""
        return f"{head} {display_id(self.token_id)} of {self.owner}{tail}"


@dataclass(frozen=True)
class AuditRecord:
    id: int
    at: datetime
    actor: str
    action: str
    token_id: str | None
    owner: str | None
    reason: str | None
    details: dict[str, Any]


@dataclass(frozen=True)
class DirectoryUser:
    """What the directory says about one account, reduced to what policy needs.

    `groups` holds the configured group names (case-folded) the user belongs to, directly or
    through nesting: allowed groups, admin groups and lifetime-limit groups.
    """

    username: str
    dn: str
    disabled: bool
    allowed: bool
    admin: bool
    groups: frozenset[str] = frozenset()


@dataclass(frozen=True)
class SkippedEntry:
    dn: str
    why: str


@dataclass(frozen=True)
class Snapshot:
    """A frozen, complete read of the directory; never a partial one (errors raise instead)."""

    taken_at: datetime
    users: Mapping[str, DirectoryUser]
    group_sizes: Mapping[str, int]
    skipped: tuple[SkippedEntry, ...] = ()
    server: str = ""
    seconds: float = 0.0

    def empty_allowed_groups(self, allowed: Sequence[str]) -> list[str]:
        return [g for g in allowed if self.group_sizes.get(g.casefold(), 0) == 0]


class DirectoryReader(Protocol):
    """What the core needs of a directory (implemented by daemon.directory.LdapDirectory)."""

    def snapshot(self) -> Snapshot: ...

    def lookup_user(self, username: str) -> DirectoryUser | None: ...

    def authenticate(self, username: str, password: str) -> DirectoryUser: ...
