"""per-run alert subscriptions: an e-mail address or webhook told about one run

Revision ID: 0020_runsubs
Revises: 0019_nodes
Create Date: 2026-12-06 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020_runsubs"
down_revision: str | None = "0019_nodes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "run_subscriptions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("channel", sa.String(length=10), nullable=False),
        sa.Column("target", sa.String(length=500), nullable=False),
        sa.Column("kinds", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_id", "target", name="uq_run_subscriptions_run_target"),
    )
    op.create_index(op.f("ix_run_subscriptions_run_id"), "run_subscriptions", ["run_id"],
                    unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_run_subscriptions_run_id"), table_name="run_subscriptions")
    op.drop_table("run_subscriptions")
