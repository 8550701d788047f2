"""channels.probe / probed_at: the last parameter probe of each channel (POST /admin/channels/{id}/probe)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('channels') as batch:
        batch.add_column(sa.Column('probe', sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column('probed_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('channels') as batch:
        batch.drop_column('probed_at')
        batch.drop_column('probe')
