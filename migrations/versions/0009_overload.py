"""tenants.priority (its weight in the fair share of a busy gateway's slots) and channels.max_inflight (requests
a channel is sent at once)

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('tenants') as batch:
        batch.add_column(sa.Column('priority', sa.Integer(), nullable=True))
    with op.batch_alter_table('channels') as batch:
        batch.add_column(sa.Column('max_inflight', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('channels') as batch:
        batch.drop_column('max_inflight')
    with op.batch_alter_table('tenants') as batch:
        batch.drop_column('priority')
