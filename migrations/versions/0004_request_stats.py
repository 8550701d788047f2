"""request_stats: the request log rolled up per minute and hour for the dashboard, backfilled from the log;
request_logs indexed by (tenant_id, id)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

import bisect
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql, sqlite

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of what relay.models declared when this revision was written (a migration never changes).
EDGES_MS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000)
SUMS = ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens", "cache_hits", "cache_misses")
LATENCY = tuple(f"latency_le_{i}" for i in range(len(EDGES_MS)))
BATCH = 20_000


def upgrade() -> None:
    table = op.create_table(
        'request_stats',
        sa.Column('width', sa.Integer(), nullable=False),
        sa.Column('start', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('model', sa.String(length=200), nullable=False),
        sa.Column('channel_id', sa.Integer(), nullable=False),
        sa.Column('tenant_id', sa.Integer(), nullable=False),
        *(sa.Column(name, sa.BigInteger(), server_default='0', nullable=False) for name in SUMS + LATENCY),
        sa.PrimaryKeyConstraint('width', 'start', 'model', 'channel_id', 'tenant_id'),
    )
    _backfill(op.get_bind(), table)
    # a tenant's own log by cursor (/tenant/logs): (tenant_id, id) replaces the index on tenant_id alone
    op.create_index('ix_request_logs_tenant_id_id', 'request_logs', ['tenant_id', 'id'], unique=False)
    op.drop_index('ix_request_logs_tenant_id', table_name='request_logs')


def _backfill(bind, table) -> None:
    """Rolls up the existing log in id order, a batch at a time (memory stays flat on a large log)."""
    logs = sa.table('request_logs', sa.column('id'), sa.column('created_at', sqlmodel.sql.sqltypes.UTCDateTime()),
                    sa.column('model'), sa.column('channel_id'), sa.column('tenant_id'), sa.column('status_code'),
                    sa.column('prompt_tokens'), sa.column('completion_tokens'), sa.column('total_tokens'),
                    sa.column('latency_ms'), sa.column('cache'))
    after = 0
    while True:
        rows = bind.execute(sa.select(logs).where(logs.c.id > after).order_by(logs.c.id).limit(BATCH)).all()
        if not rows:
            break
        after = rows[-1].id
        _add(bind, table, _sums(rows))  # written per batch: memory stays flat however long the log


def _sums(rows) -> dict[tuple, list[int]]:
    sums: dict[tuple, list[int]] = defaultdict(lambda: [0] * (len(SUMS) + len(LATENCY)))
    for r in rows:
        at = r.created_at if r.created_at.tzinfo else r.created_at.replace(tzinfo=UTC)
        values = (1, int(r.status_code >= 400), r.prompt_tokens or 0, r.completion_tokens or 0,
                  r.total_tokens or 0, int(r.cache == "hit"), int(r.cache == "miss"))
        latency = len(SUMS) + min(bisect.bisect_left(EDGES_MS, r.latency_ms or 0.0), len(EDGES_MS) - 1)
        model = "(unknown model)" if r.channel_id is None and r.status_code in (403, 404) else (r.model or "")[:200]
        for width in (60, 3600):
            start = datetime.fromtimestamp(int(at.timestamp()) // width * width, UTC)
            counts = sums[(width, start, model, r.channel_id or 0, r.tenant_id or 0)]
            for i, v in enumerate(values):
                counts[i] += int(v)
            counts[latency] += 1
    return sums


def _add(bind, table, sums: dict[tuple, list[int]]) -> None:
    """Adds to what earlier batches wrote for the same bucket (an additive upsert)."""
    keys = ('width', 'start', 'model', 'channel_id', 'tenant_id')
    rows = [dict(zip(keys, k, strict=True)) | dict(zip(SUMS + LATENCY, v, strict=True)) for k, v in sums.items()]
    if not rows:
        return
    insert = (postgresql if bind.dialect.name == "postgresql" else sqlite).insert(table)
    insert = insert.on_conflict_do_update(index_elements=list(keys),
                                          set_={n: table.c[n] + insert.excluded[n] for n in SUMS + LATENCY})
    bind.execute(insert, rows)


def downgrade() -> None:
    op.create_index('ix_request_logs_tenant_id', 'request_logs', ['tenant_id'], unique=False)
    op.drop_index('ix_request_logs_tenant_id_id', table_name='request_logs')
    op.drop_table('request_stats')
