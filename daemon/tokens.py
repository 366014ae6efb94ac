"""Token format, generation, parsing and hashing.

A token looks like ``gg_<id>_<secret><check>``:

- ``gg_``: a fixed prefix, so people and secret scanners recognise it;
- ``<id>``: 12 base62 characters (~71 bits), the public lookup id and primary key;
- ``_``: a separator;
- ``<secret>``: 43 base62 characters holding 256 random bits from :mod:`secrets`;
- ``<check>``: 6 base62 characters, the CRC32 of everything before it, so a scanner can tell a
  real token from random text offline, without the store.

The whole token matches :data:`TOKEN_RE`. Only an argon2id hash of the secret is stored.
"""

from __future__ import annotations

import re
import secrets
import zlib
from dataclasses import dataclass, field

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

PREFIX = "gg_"
ID_LEN = 12
SECRET_LEN = 43
CHECK_LEN = 6
TOKEN_LEN = len(PREFIX) + ID_LEN + 1 + SECRET_LEN + CHECK_LEN  # 65
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
TOKEN_PATTERN = r"gg_[0-9A-Za-z]{12}_[0-9A-Za-z]{49}"
TOKEN_RE = re.compile(rf"\b{TOKEN_PATTERN}\b")
_FULL_RE = re.compile(rf"{TOKEN_PATTERN}")
_ID_RE = re.compile(r"(?:gg_)?([0-9A-Za-z]{12})")
_INDEX = {c: i for i, c in enumerate(ALPHABET)}


def _b62(number: int, width: int) -> str:
    out = []
    for _ in range(width):
        number, rem = divmod(number, 62)
        out.append(ALPHABET[rem])
    if number:
        raise ValueError("number does not fit the width")
    return "".join(reversed(out))


def checksum(body: str) -> str:
    """Base62 CRC32 of the token body (prefix, id, separator, secret)."""
    return _b62(zlib.crc32(body.encode("ascii")), CHECK_LEN)


def new_token_id() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(ID_LEN))


@dataclass(frozen=True)
class ParsedToken:
    """A syntactically valid token. The secret never shows in repr()."""

    token_id: str
    secret: str = field(repr=False)

    def __str__(self) -> str:
        return f"{PREFIX}{self.token_id}_{self.secret}{checksum(self._body())}"

    def _body(self) -> str:
        return f"{PREFIX}{self.token_id}_{self.secret}"


def generate(token_id: str | None = None) -> ParsedToken:
    """A fresh token: 256 bits from `secrets`, encoded in exactly 43 base62 characters."""
    tid = token_id or new_token_id()
    secret = _b62(secrets.randbits(256), SECRET_LEN)
    return ParsedToken(tid, secret)


def parse(text: str) -> ParsedToken | None:
    """The token's parts, or None for anything that is not a well-formed token.

    Cheap by design: a length check, one regex and one CRC32; no store and no argon2.
    """
    if len(text) != TOKEN_LEN or not _FULL_RE.fullmatch(text):
        return None
    i = _INDEX
    c = text[-CHECK_LEN:]
    # base62 decode of the 6 check characters, unrolled: this runs on every verify call
    n = (((((i[c[0]] * 62 + i[c[1]]) * 62 + i[c[2]]) * 62 + i[c[3]]) * 62 + i[c[4]]) * 62
         + i[c[5]])
    if n != zlib.crc32(text[:-CHECK_LEN].encode("ascii")):
        return None
    start = len(PREFIX)
    return ParsedToken(text[start:start + ID_LEN], text[start + ID_LEN + 1:-CHECK_LEN])


def normalize_token_id(text: str) -> str | None:
    """Accept ``gg_<id>`` or the bare id as users type them in commands; None if neither."""
    m = _ID_RE.fullmatch(text.strip())
    return m.group(1) if m else None


def display_id(token_id: str) -> str:
    """How a token is named in lists and logs: the public id, never the secret."""
    return f"{PREFIX}{token_id}"


class SecretHasher:
    """argon2id hashing of token secrets with configurable cost."""

    def __init__(self, time_cost: int = 1, memory_kib: int = 8192, parallelism: int = 1) -> None:
        self._ph = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib,
                                  parallelism=parallelism, hash_len=32, salt_len=16,
                                  type=Type.ID)

    def hash(self, secret: str) -> str:
        return self._ph.hash(secret)

    def verify(self, stored_hash: str, secret: str) -> bool:
        try:
            return self._ph.verify(stored_hash, secret)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def __repr__(self) -> str:
        p = self._ph
        return (f"SecretHasher(time_cost={p.time_cost}, memory_kib={p.memory_cost}, "
                f"parallelism={p.parallelism})")
