"""cell temperature window

Revision ID: 0009_auxtemp
Revises: 0008_gaps
Create Date: 2026-12-06 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_auxtemp"
down_revision: str | None = "0008_gaps"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("cells", schema=None) as batch_op:
        batch_op.add_column(sa.Column("min_temperature_c", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("max_temperature_c", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("cells", schema=None) as batch_op:
        batch_op.drop_column("max_temperature_c")
        batch_op.drop_column("min_temperature_c")
