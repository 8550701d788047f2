"""policy_insights: what each policy's answers turned out like, per model, task, temperature and hour

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SUMS = ("requests", "errors", "json_checked", "json_valid", "finish_length", "retries")  # frozen copy


def upgrade() -> None:
    op.create_table(
        'policy_insights',
        sa.Column('policy_id', sa.Integer(), nullable=False),
        sa.Column('model', sa.String(length=200), nullable=False),
        sa.Column('task', sa.String(length=20), nullable=False),
        sa.Column('source', sa.String(length=10), nullable=False),
        sa.Column('bucket', sa.Integer(), nullable=False),
        sa.Column('start', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        *(sa.Column(name, sa.BigInteger(), server_default='0', nullable=False) for name in SUMS),
        sa.PrimaryKeyConstraint('policy_id', 'model', 'task', 'source', 'bucket', 'start'),
    )


def downgrade() -> None:
    op.drop_table('policy_insights')
