"""hardening: ids never reused, deployment id and config version, channel passthrough, secrets encrypted

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# table -> (request_logs column, audit entity) naming its ids elsewhere: a recreated id must not collide
# with history that still names a deleted row.
_ID_USERS = {
    "tenants": ("tenant_id", "tenant"),
    "api_keys": ("key_id", "api_key"),
    "channels": ("channel_id", "channel"),
    "model_policies": (None, "policy"),
    "request_logs": (None, None),
    "audit_events": (None, None),
}


def upgrade() -> None:
    op.create_table('relay_state',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('deployment_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('config_version', sa.BigInteger(), nullable=False),
    sa.Column('secret_check', sa.Text(), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    state = sa.table('relay_state', sa.column('id'), sa.column('deployment_id'), sa.column('config_version'),
                     sa.column('created_at'))
    op.execute(state.insert().values(id=1, deployment_id=uuid.uuid4().hex, config_version=1,
                                     created_at=datetime.now(UTC)))
    with op.batch_alter_table('channels', schema=None) as batch_op:
        batch_op.add_column(sa.Column('passthrough', sa.JSON(), nullable=True))

    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        # SQLite reuses the largest id after its row is deleted unless the table is AUTOINCREMENT.
        for table, (log_column, entity) in _ID_USERS.items():
            with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_autoincrement": True}):
                pass
            sources = [f"SELECT MAX(id) FROM {table}"]
            if log_column:
                sources.append(f"SELECT MAX({log_column}) FROM request_logs")
            if entity:
                sources.append(f"SELECT MAX(entity_id) FROM audit_events WHERE entity = '{entity}'")
            high = max((bind.exec_driver_sql(q).scalar() or 0) for q in sources)
            bind.exec_driver_sql("DELETE FROM sqlite_sequence WHERE name = ?", (table,))
            bind.exec_driver_sql("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, high))
    _encrypt_existing_secrets(bind)


def _encrypt_existing_secrets(bind) -> None:
    """Channel api_keys and secret-named option values written in plaintext by earlier versions."""
    from relay.secrets import CHECK_PLAINTEXT, box_from_env

    channels = sa.table('channels', sa.column('id'), sa.column('api_key'), sa.column('options', sa.JSON()))
    rows = bind.execute(sa.select(channels.c.id, channels.c.api_key, channels.c.options)).all()
    if not any(r.api_key or r.options for r in rows):
        return  # nothing to encrypt: the key is needed (and remembered) once the relay starts
    box = box_from_env(bind.engine.url.render_as_string(hide_password=False))
    for r in rows:
        sealed = (box.seal(r.api_key), box.seal_options(r.options))
        if sealed != (r.api_key, r.options):
            bind.execute(channels.update().where(channels.c.id == r.id)
                         .values(api_key=sealed[0], options=sealed[1]))
    # The key that encrypted them is this database's from now on: a start with another one is refused.
    state = sa.table('relay_state', sa.column('id'), sa.column('secret_check'))
    bind.execute(state.update().where(state.c.id == 1).values(secret_check=box.encrypt(CHECK_PLAINTEXT)))


def downgrade() -> None:
    # Secrets stay encrypted: a downgraded relay needs them re-entered (it cannot hold the key).
    with op.batch_alter_table('channels', schema=None) as batch_op:
        batch_op.drop_column('passthrough')
    op.drop_table('relay_state')
