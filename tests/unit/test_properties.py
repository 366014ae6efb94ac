"""Property tests: no input makes the parser or verify raise; bad input is only `malformed`."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.model import VerifyRow
from daemon.tokens import SecretHasher, generate, parse
from daemon.verify import Reason, Verifier
from tests.fakes import FakeVerifyStore

NOW = datetime(2026, 12, 4, tzinfo=UTC)
HASHER = SecretHasher(time_cost=1, memory_kib=64, parallelism=1)
TOKEN = generate()
STORE = FakeVerifyStore({TOKEN.token_id: VerifyRow("alice", HASHER.hash(TOKEN.secret), "active",
                                                   None, NOW + timedelta(days=1), None)})
VERIFIER = Verifier(STORE, hasher=HASHER, clock=lambda: NOW, max_failures=10**9)
REAL = {r for r in Reason}


@given(st.text())
def test_parse_never_raises(text: str) -> None:
    parsed = parse(text)
    assert parsed is None or str(parsed) == text


@given(st.text(), st.text())
def test_verify_never_raises_on_text(user: str, token: str) -> None:
    assert VERIFIER.verify(user, token).reason in REAL


@given(st.one_of(st.text(), st.binary(), st.none(), st.integers()))
def test_verify_basic_never_raises(header: object) -> None:
    assert VERIFIER.verify_basic(header).reason in REAL


@given(st.binary(max_size=200))
def test_verify_basic_on_any_base64_payload(payload: bytes) -> None:
    r = VERIFIER.verify_basic(b"Basic " + base64.b64encode(payload))
    assert r.reason in REAL
    assert not r.ok


@settings(max_examples=200)
@given(st.integers(min_value=0, max_value=64), st.characters(codec="utf-8"))
def test_one_changed_character_never_verifies(pos: int, ch: str) -> None:
    text = str(TOKEN)
    mutated = text[:pos] + ch + text[pos + 1:]
    r = VERIFIER.verify("alice", mutated)
    assert r.ok == (mutated == text)
    if mutated != text:
        assert r.reason in (Reason.MALFORMED, Reason.UNKNOWN_TOKEN, Reason.WRONG_SECRET)
