"""directory_users and sync_state

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "directory_users",
        sa.Column("username", sa.String(256), primary_key=True),
        sa.Column("dn", sa.Text, nullable=True),
        sa.Column("present", sa.Boolean, nullable=False),
        sa.Column("allowed", sa.Boolean, nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False),
        sa.Column("admin", sa.Boolean, nullable=False),
        sa.Column("groups", sa.Text, nullable=False),
        sa.Column("last_seen_at", ts, nullable=True),
        sa.Column("changed_at", ts, nullable=False),
    )
    op.create_table(
        "sync_state",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("last_attempt_at", ts, nullable=True),
        sa.Column("last_success_at", ts, nullable=True),
        sa.Column("last_result", sa.String(16), nullable=True),
        sa.Column("last_message", sa.Text, nullable=True),
        sa.Column("users_read", sa.Integer, nullable=True),
        sa.Column("server", sa.String(512), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("sync_state")
    op.drop_table("directory_users")
