"""The verify library API: is this (username, token) pair good right now?

Example::

    from daemon import Verifier

    verifier = Verifier.from_config("/etc/groupgate/config.toml")
    result = verifier.verify_basic(request.headers.get("Authorization", ""))
    if not result.ok:
        return 401          # result.reason says why, for your logs only
    user = result.owner     # canonical (case-folded) username

Rules:

- Bad input of any kind (wrong type, empty, huge, non-UTF-8, bad base64, wrong prefix, bad
  checksum) returns ``malformed`` cheaply, without touching the store or argon2. Only an
  unreachable store raises, as :class:`daemon.errors.StoreUnavailable`.
- Usernames compare case-insensitively (``str.casefold`` after stripping surrounding spaces),
  like directory names.
- Status is read from the store on every call, so a revocation or suspension takes effect on
  the very next call in every process; a token past ``expires_at`` is ``expired`` even before
  the sweep marks it.
- argon2 runs at most once per token per process: a verified secret is remembered only as a
  keyed HMAC digest. Repeated wrong secrets for one token id are throttled, so they cannot burn
  unbounded CPU.
"""

from __future__ import annotations

import binascii
import enum
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, NamedTuple, Protocol

import structlog

from daemon.model import Status, VerifyRow, canonical_username
from daemon.tokens import TOKEN_LEN, SecretHasher, parse

if TYPE_CHECKING:
    from daemon.config import Config

log = structlog.get_logger("groupgate.verify")

MAX_USERNAME_LEN = 256
MAX_HEADER_LEN = 1024
_FAILURE_TABLE_MAX = 100_000


class Reason(enum.StrEnum):
    """The closed set of verification outcomes."""

    OK = "ok"
    MALFORMED = "malformed"
    UNKNOWN_TOKEN = "unknown_token"
    WRONG_USER = "wrong_user"
    WRONG_SECRET = "wrong_secret"
    SUSPENDED = "suspended"
    EXPIRED = "expired"
    REVOKED = "revoked"


class VerifyResult(NamedTuple):
    """The answer; true in a boolean context only when ``ok``.

    ``token_id`` is set once the token parsed; ``owner`` and ``expires_at`` only once the secret
    proved right (never for ``wrong_secret`` or ``wrong_user``), so they leak nothing.
    (An immutable NamedTuple rather than a frozen dataclass: it is built on every call and
    this is three times cheaper.)
    """

    ok: bool
    reason: Reason
    token_id: str | None = None
    owner: str | None = None
    expires_at: datetime | None = None
    status_reason: str | None = None

    def __bool__(self) -> bool:
        return self.ok


_MALFORMED = VerifyResult(False, Reason.MALFORMED)


class VerifyStore(Protocol):
    """What verify needs of a store (implemented by :class:`daemon.store.TokenStore`)."""

    def lookup_for_verify(self, token_id: str) -> VerifyRow | None: ...

    def touch_last_used(self, token_id: str, now: datetime, older_than: datetime) -> None: ...


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Verifier:
    """Verifies tokens against a store; thread-safe, one per process is plenty."""

    def __init__(self, store: VerifyStore, *, hasher: SecretHasher | None = None,
                 cache_size: int = 10000, last_used_resolution: timedelta = timedelta(seconds=60),
                 max_failures: int = 10, failure_window: timedelta = timedelta(seconds=60),
                 clock: Callable[[], datetime] = _utcnow) -> None:
        self._store = store
        self._hasher = hasher or SecretHasher()
        self._cache_size = cache_size
        self._resolution = last_used_resolution
        self._max_failures = max_failures
        self._failure_window = failure_window.total_seconds()
        self._clock = clock
        self._key = secrets.token_bytes(32)  # per process: digests mean nothing elsewhere
        self._cache: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._failures: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Verifier(store={self._store!r}, cached={len(self._cache)})"

    # -- construction --

    @classmethod
    def from_settings(cls, cfg: Config, **kwargs: object) -> Verifier:
        from daemon.store import TokenStore  # the composition root may know the adapter

        v = cfg.verify
        return cls(TokenStore(cfg.store.url),
                   hasher=SecretHasher(v.argon2.time_cost, v.argon2.memory_kib,
                                       v.argon2.parallelism),
                   cache_size=v.cache_size,
                   last_used_resolution=timedelta(seconds=v.last_used_resolution_seconds),
                   max_failures=v.max_failures,
                   failure_window=timedelta(seconds=v.failure_window_seconds),
                   **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None) -> Verifier:
        """Build from a config file (default: $GROUPGATE_CONFIG, /etc/groupgate, ./config.toml)."""
        from daemon.config import load_config

        return cls.from_settings(load_config(path))

    @classmethod
    def from_url(cls, url: str, **kwargs: object) -> Verifier:
        """Build straight from a store URL with default verify settings."""
        from daemon.store import TokenStore

        return cls(TokenStore(url), **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        close = getattr(self._store, "close", None)
        if close is not None:
            close()

    # -- the API --

    def verify(self, username: object, token: object) -> VerifyResult:
        """Check a username and token; see the module docstring for the rules."""
        if not isinstance(username, str) or not isinstance(token, str):
            return _MALFORMED
        if len(token) != TOKEN_LEN or not username or len(username) > MAX_USERNAME_LEN:
            return _MALFORMED
        parsed = parse(token)
        if parsed is None:
            return _MALFORMED
        user = canonical_username(username)
        if not user or not user.isprintable():
            return _MALFORMED
        tid = parsed.token_id
        row = self._store.lookup_for_verify(tid)
        if row is None:
            return VerifyResult(False, Reason.UNKNOWN_TOKEN, token_id=tid)
        if not self._secret_ok(tid, row.secret_hash, parsed.secret):
            return VerifyResult(False, Reason.WRONG_SECRET, token_id=tid)
        if row.owner != user:
            return VerifyResult(False, Reason.WRONG_USER, token_id=tid)
        now = self._clock()
        status = row.status
        if status == Status.ACTIVE and now >= row.expires_at:
            status = Status.EXPIRED
        if status != Status.ACTIVE:
            reason = {Status.SUSPENDED: Reason.SUSPENDED, Status.EXPIRED: Reason.EXPIRED,
                      Status.REVOKED: Reason.REVOKED}.get(Status(status), Reason.REVOKED)
            return VerifyResult(False, reason, token_id=tid, owner=row.owner,
                                expires_at=row.expires_at, status_reason=row.status_reason)
        if row.last_used_at is None or now - row.last_used_at >= self._resolution:
            self._store.touch_last_used(tid, now, now - self._resolution)
        return VerifyResult(True, Reason.OK, token_id=tid, owner=row.owner,
                            expires_at=row.expires_at)

    def verify_basic(self, authorization: object) -> VerifyResult:
        """Check a raw ``Authorization`` header value (``Basic base64(user:token)``)."""
        if isinstance(authorization, bytes):
            try:
                authorization = authorization.decode("latin-1")
            except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
                return _MALFORMED
        if not isinstance(authorization, str) or len(authorization) > MAX_HEADER_LEN:
            return _MALFORMED
        scheme, _, param = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            return _MALFORMED
        try:
            raw = binascii.a2b_base64(param.strip().encode("ascii"), strict_mode=True)
            text = raw.decode("utf-8")
        except (binascii.Error, ValueError):
            return _MALFORMED
        username, sep, token = text.partition(":")
        if not sep:
            return _MALFORMED
        return self.verify(username, token)

    # -- argon2 once per token per process, and the failure throttle --

    def _digest(self, tid: str, secret: str) -> bytes:
        # keyed BLAKE2b is a MAC in its own right and cheaper than HMAC-SHA256 on this path
        return hashlib.blake2b(f"{tid}:{secret}".encode("ascii"), key=self._key,
                               digest_size=32).digest()

    def _secret_ok(self, tid: str, secret_hash: str, secret: str) -> bool:
        digest = self._digest(tid, secret)
        with self._lock:
            cached = self._cache.get(tid)
            if cached is not None and cached[0] == secret_hash:
                self._cache.move_to_end(tid)
                # Only one secret ever matches a hash: a different digest is simply wrong.
                return hmac.compare_digest(cached[1], digest)
            if self._throttled(tid):
                return False
        ok = self._hasher.verify(secret_hash, secret)
        with self._lock:
            if ok:
                self._failures.pop(tid, None)
                if self._cache_size:
                    self._cache[tid] = (secret_hash, digest)
                    self._cache.move_to_end(tid)
                    while len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
            else:
                self._record_failure(tid)
        return ok

    def _throttled(self, tid: str) -> bool:
        entry = self._failures.get(tid)
        if entry is None:
            return False
        start, count = entry
        if time.monotonic() - start > self._failure_window:
            del self._failures[tid]
            return False
        return count >= self._max_failures

    def _record_failure(self, tid: str) -> None:
        now = time.monotonic()
        start, count = self._failures.get(tid, (now, 0))
        if now - start > self._failure_window:
            start, count = now, 0
        count += 1
        if len(self._failures) >= _FAILURE_TABLE_MAX and tid not in self._failures:
            cutoff = now - self._failure_window
            self._failures = {k: v for k, v in self._failures.items() if v[0] >= cutoff}
            if len(self._failures) >= _FAILURE_TABLE_MAX:
                self._failures.pop(next(iter(self._failures)))
        self._failures[tid] = (start, count)
        if count == self._max_failures:
            log.warning("verify.throttled", token_id=tid, failures=count,
                        window_seconds=self._failure_window)


_default: Verifier | None = None
_default_lock = threading.Lock()


def default_verifier() -> Verifier:
    """The process-wide verifier built from the default config, made on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Verifier.from_config()
        return _default


def verify(username: object, token: object) -> VerifyResult:
    """Module-level shortcut: ``default_verifier().verify(username, token)``."""
    return default_verifier().verify(username, token)
