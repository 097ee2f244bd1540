"""instruments as configuration: enabled flags, channel default cell, run wiring snapshot

Revision ID: 0004_opener
Revises: 0003
Create Date: 2026-12-06 07:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_opener"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("instruments", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("enabled", sa.Boolean(), server_default=sa.true(), nullable=False)
        )
    with op.batch_alter_table("channels", schema=None) as batch_op:
        batch_op.add_column(sa.Column("default_cell_id", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("enabled", sa.Boolean(), server_default=sa.true(), nullable=False)
        )
        batch_op.create_foreign_key(
            "fk_channels_default_cell_id_cells", "cells", ["default_cell_id"], ["id"]
        )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("wiring", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("wiring")
    with op.batch_alter_table("channels", schema=None) as batch_op:
        batch_op.drop_constraint("fk_channels_default_cell_id_cells", type_="foreignkey")
        batch_op.drop_column("enabled")
        batch_op.drop_column("default_cell_id")
    with op.batch_alter_table("instruments", schema=None) as batch_op:
        batch_op.drop_column("enabled")
