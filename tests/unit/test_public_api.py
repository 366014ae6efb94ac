"""The public library surface is pinned: changing it is a deliberate act."""

from __future__ import annotations

import daemon


def test_all_is_sorted_and_pinned() -> None:
    assert daemon.__all__ == sorted(daemon.__all__)
    assert daemon.__all__ == ["Reason", "StoreUnavailable", "Verifier", "VerifyResult", "verify"]
    for name in daemon.__all__:
        assert getattr(daemon, name) is not None


def test_reasons_are_the_closed_set() -> None:
    assert sorted(r.value for r in daemon.Reason) == sorted(
        ["ok", "malformed", "unknown_token", "wrong_user", "wrong_secret", "suspended",
         "expired", "revoked"])
