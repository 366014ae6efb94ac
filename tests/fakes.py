"""Fakes that implement groupgate's own small protocols (no patching of dotted paths)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from daemon.model import VerifyRow


@dataclass
class FakeVerifyStore:
    """An in-memory VerifyStore that counts how often it is asked."""

    rows: dict[str, VerifyRow] = field(default_factory=dict)
    lookups: int = 0
    touches: list[tuple[str, datetime]] = field(default_factory=list)

    def lookup_for_verify(self, token_id: str) -> VerifyRow | None:
        self.lookups += 1
        return self.rows.get(token_id)

    def touch_last_used(self, token_id: str, now: datetime, older_than: datetime) -> None:
        self.touches.append((token_id, now))
        row = self.rows[token_id]
        if row.last_used_at is None or row.last_used_at < older_than:
            self.rows[token_id] = row._replace(last_used_at=now)
