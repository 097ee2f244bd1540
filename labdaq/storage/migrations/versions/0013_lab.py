"""the age of a sample's wired temperature reading (samples.temperature_age_s)

Revision ID: 0013_lab
Revises: 0012_alerts
Create Date: 2026-12-06 13:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013_lab"
down_revision: str | None = "0012_alerts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN, nullable without a default: neither database rewrites the
    # samples table (a batch copy of the hot table would take as long as it is big).
    op.add_column("samples", sa.Column("temperature_age_s", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("samples") as batch_op:
        batch_op.drop_column("temperature_age_s")
