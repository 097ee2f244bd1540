"""import_template: the protocol template an imported run's test followed

Revision ID: 0016_import_template
Revises: 0015_nodes
Create Date: 2026-12-06 16:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016_import_template"
down_revision: str | None = "0015_nodes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("imports") as batch:
        batch.add_column(sa.Column("template", sa.String(length=100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("imports") as batch:
        batch.drop_column("template")
