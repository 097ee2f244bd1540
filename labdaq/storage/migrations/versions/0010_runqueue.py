"""run queue per channel: several waiting runs, one holding the channel

Revision ID: 0010_runqueue
Revises: 0009_auxtemp
Create Date: 2026-12-06 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_runqueue"
down_revision: str | None = "0009_auxtemp"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_HOLDING = "state IN ('running', 'paused')"
_WAITING = "state IN ('queued', 'awaiting_cell')"
_ACTIVE = "state IN ('queued', 'running', 'paused')"


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("queue_order", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("not_before", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("cell_confirmed_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("waiting_reason", sa.Text(), nullable=True))
    # A run queued before this migration was the only one of its channel, created on an
    # idle channel: first in its queue, its cell as good as confirmed by its request.
    op.execute(
        "UPDATE runs SET queue_order = 1, cell_confirmed_at = created_at "
        "WHERE state = 'queued'"
    )
    op.drop_index(
        "uq_runs_active_channel",
        table_name="runs",
        sqlite_where=sa.text(_ACTIVE),
        postgresql_where=sa.text(_ACTIVE),
    )
    op.create_index(
        "uq_runs_holding_channel",
        "runs",
        ["channel_id"],
        unique=True,
        sqlite_where=sa.text(_HOLDING),
        postgresql_where=sa.text(_HOLDING),
    )
    op.create_index(
        "uq_runs_queue_order",
        "runs",
        ["channel_id", "queue_order"],
        unique=True,
        sqlite_where=sa.text(_WAITING),
        postgresql_where=sa.text(_WAITING),
    )


def downgrade() -> None:
    # The older schema allows one unfinished run per channel: of a queue, only a run with
    # nothing holding its channel and nothing older waiting stays.
    op.execute(
        "UPDATE runs SET state = 'stopped', end_reason = 'run queue removed by a downgrade' "
        "WHERE state IN ('queued', 'awaiting_cell') AND EXISTS (SELECT 1 FROM runs r2 "
        "WHERE r2.channel_id = runs.channel_id AND r2.id != runs.id AND ("
        "r2.state IN ('running', 'paused') OR "
        "(r2.state IN ('queued', 'awaiting_cell') AND r2.id < runs.id)))"
    )
    op.execute("UPDATE runs SET state = 'queued' WHERE state = 'awaiting_cell'")
    op.drop_index("uq_runs_queue_order", table_name="runs")
    op.drop_index("uq_runs_holding_channel", table_name="runs")
    op.create_index(
        "uq_runs_active_channel",
        "runs",
        ["channel_id"],
        unique=True,
        sqlite_where=sa.text(_ACTIVE),
        postgresql_where=sa.text(_ACTIVE),
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("waiting_reason")
        batch_op.drop_column("cell_confirmed_at")
        batch_op.drop_column("not_before")
        batch_op.drop_column("queue_order")
