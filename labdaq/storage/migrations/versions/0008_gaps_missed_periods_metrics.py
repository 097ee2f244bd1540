"""missed sample periods: runs.missed_periods, events.seq (unique gap records), engine
metrics in the heartbeat

Revision ID: 0008_gaps
Revises: 0007_engine
Create Date: 2026-12-06 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_gaps"
down_revision: str | None = "0007_engine"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_EVENT_SEQ_SQL = "seq IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("missed_periods", sa.BigInteger(), server_default="0", nullable=False)
        )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
    op.create_index(
        "uq_events_run_kind_seq", "events", ["run_id", "kind", "seq"], unique=True,
        sqlite_where=sa.text(_EVENT_SEQ_SQL), postgresql_where=sa.text(_EVENT_SEQ_SQL),
    )
    with op.batch_alter_table("node_heartbeats", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("metrics", sa.JSON(), server_default="{}", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("node_heartbeats", schema=None) as batch_op:
        batch_op.drop_column("metrics")
    op.drop_index("uq_events_run_kind_seq", table_name="events")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_column("seq")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("missed_periods")
