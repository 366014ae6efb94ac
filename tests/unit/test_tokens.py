"""Token format: what scanners and users see."""

from __future__ import annotations

import re

import pytest

from daemon import tokens
from daemon.tokens import TOKEN_LEN, TOKEN_RE, SecretHasher, generate, parse


def test_generated_token_has_documented_shape() -> None:
    """A fresh token matches the README regex and is 65 characters long."""
    text = str(generate())
    assert len(text) == TOKEN_LEN == 65
    assert re.fullmatch(r"gg_[0-9A-Za-z]{12}_[0-9A-Za-z]{49}", text)
    assert TOKEN_RE.search(f"leaked: {text}.") is not None


def test_parse_round_trips_id_and_secret() -> None:
    t = generate()
    parsed = parse(str(t))
    assert parsed == t
    assert parsed is not None and len(parsed.secret) == 43


def test_secrets_differ_and_ids_differ() -> None:
    seen = {str(generate()) for _ in range(200)}
    assert len(seen) == 200
    assert len({t[3:15] for t in seen}) == 200


@pytest.mark.parametrize("mutate", [
    lambda s: s[:-1] + ("A" if s[-1] != "A" else "B"),      # checksum char
    lambda s: s[:20] + ("x" if s[20] != "x" else "y") + s[21:],  # secret char -> bad checksum
    lambda s: "gh" + s[2:],                                  # wrong prefix
    lambda s: s[:15] + "-" + s[16:],                         # wrong separator
    lambda s: s + "a",                                       # too long
    lambda s: s[:-1],                                        # too short
    lambda s: s.replace(s[5], "é", 1),                       # non-ASCII
])
def test_parse_rejects_damaged_tokens(mutate: object) -> None:
    """One changed character is caught by the checksum or the shape check."""
    good = str(generate())
    assert parse(mutate(good)) is None  # type: ignore[operator]


def test_checksum_is_crc32_of_body_in_base62() -> None:
    """Scanners can validate offline: the last 6 chars are base62(CRC32(everything before))."""
    import zlib

    text = str(generate())
    body, check = text[:-6], text[-6:]
    n = 0
    for ch in check:
        n = n * 62 + tokens.ALPHABET.index(ch)
    assert n == zlib.crc32(body.encode())


def test_repr_never_shows_secret() -> None:
    t = generate()
    assert t.secret not in repr(t)


def test_normalize_token_id_accepts_display_and_bare() -> None:
    assert tokens.normalize_token_id("gg_ABCDEFabcdef") == "ABCDEFabcdef"
    assert tokens.normalize_token_id("ABCDEFabcdef") == "ABCDEFabcdef"
    assert tokens.normalize_token_id("gg_short") is None


def test_hasher_verifies_only_the_right_secret() -> None:
    h = SecretHasher(time_cost=1, memory_kib=64, parallelism=1)
    stored = h.hash("right")
    assert stored.startswith("$argon2id$")
    assert h.verify(stored, "right")
    assert not h.verify(stored, "wrong")
    assert not h.verify("not-a-hash", "right")
