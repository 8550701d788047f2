"""request_logs.request_id: the X-Request-Id of each logged request

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('request_logs') as batch:
        batch.add_column(sa.Column('request_id', sa.String(length=128), nullable=True))
        batch.create_index('ix_request_logs_request_id', ['request_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('request_logs') as batch:
        batch.drop_index('ix_request_logs_request_id')
        batch.drop_column('request_id')
