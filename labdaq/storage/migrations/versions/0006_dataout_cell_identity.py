"""cell identity for the cells API: maker, model, lot, received date, notes, updated_at

Revision ID: 0006_dataout
Revises: 0005_analysis
Create Date: 2026-12-06 07:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_dataout"
down_revision: str | None = "0005_analysis"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("cells", schema=None) as batch_op:
        batch_op.add_column(sa.Column("maker", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("model", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("lot", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("received_on", sa.Date(), nullable=True))
        batch_op.add_column(sa.Column("notes", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("cells", schema=None) as batch_op:
        for col in ("updated_at", "notes", "received_on", "lot", "model", "maker"):
            batch_op.drop_column(col)
