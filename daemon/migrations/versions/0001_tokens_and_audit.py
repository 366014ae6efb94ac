"""tokens and audit_events

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_LIVE = "status IN ('active', 'suspended')"


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("owner", sa.String(256), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("secret_hash", sa.String(200), nullable=False),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("expires_at", ts, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_reason", sa.String(64), nullable=True),
        sa.Column("status_changed_at", ts, nullable=False),
        sa.Column("last_used_at", ts, nullable=True),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.CheckConstraint("status IN ('active', 'suspended', 'expired', 'revoked')",
                           name="ck_tokens_status"),
    )
    op.create_index("ix_tokens_owner", "tokens", ["owner"])
    op.create_index("ix_tokens_expires_at", "tokens", ["expires_at"])
    op.create_index("ix_tokens_status", "tokens", ["status"])
    op.create_index("uq_tokens_owner_name_live", "tokens", ["owner", "name"], unique=True,
                    sqlite_where=sa.text(_LIVE), postgresql_where=sa.text(_LIVE))
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", ts, nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("token_id", sa.String(16), nullable=True),
        sa.Column("owner", sa.String(256), nullable=True),
        sa.Column("reason", sa.String(256), nullable=True),
        sa.Column("details", sa.Text, nullable=False),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    op.create_index("ix_audit_events_token_id", "audit_events", ["token_id"])
    op.create_index("ix_audit_events_owner", "audit_events", ["owner"])


def downgrade() -> None:
    op.drop_table("audit_events")
    op.drop_table("tokens")
