"""config_version on every configuration row and config_deletions: processes reload only what changed

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ('tenants', 'api_keys', 'channels', 'model_policies')


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column('config_version', sa.BigInteger(), server_default='0', nullable=False))
            batch.create_index(f'ix_{table}_config_version', ['config_version'], unique=False)
    op.create_table(
        'config_deletions',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('entity', sa.String(length=20), nullable=False),
        sa.Column('row_id', sa.Integer(), nullable=False),
        sa.Column('config_version', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_config_deletions_config_version', 'config_deletions', ['config_version'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_config_deletions_config_version', table_name='config_deletions')
    op.drop_table('config_deletions')
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f'ix_{table}_config_version')
            batch.drop_column('config_version')
