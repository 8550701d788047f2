"""The Alembic migrations create exactly the schema relay.models declares, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, inspect
from sqlmodel import SQLModel

import relay.models  # noqa: F401  (registers the tables)
from relay import db
from tests.conftest import ROOT, database

TABLES = {"tenants", "api_keys", "channels", "model_policies", "request_logs", "audit_events"}


def _drift(url: str, metadata: MetaData) -> list:
    engine = db.make_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    engine.dispose()
    return diff


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    with database(request.param, tmp_path) as url:
        yield url


def test_upgrade_creates_the_models_schema_without_drift(db_url):
    db.upgrade(db_url)
    engine = db.make_engine(db_url)
    assert set(inspect(engine).get_table_names()) >= TABLES
    engine.dispose()
    assert db.current_revision(db_url) is not None
    assert _drift(db_url, SQLModel.metadata) == []


def test_drift_check_notices_a_model_change(db_url):
    """The check above can fail: a column the migrations lack shows up as a difference."""
    db.upgrade(db_url)
    changed = MetaData()
    for table in SQLModel.metadata.sorted_tables:
        copy = table.to_metadata(changed)
        if table.name == "tenants":
            copy.append_column(Column("not_migrated", Integer, nullable=True))
    diff = _drift(db_url, changed)
    assert any(d[0] == "add_column" and d[3].name == "not_migrated" for d in diff)


def test_downgrade_and_upgrade_again(db_url):
    db.upgrade(db_url)
    db.upgrade(db_url)  # idempotent
    from alembic import command

    command.downgrade(db.alembic_config(db_url), "base")
    engine = db.make_engine(db_url)
    assert not TABLES & set(inspect(engine).get_table_names())
    engine.dispose()
    db.upgrade(db_url)
    assert _drift(db_url, SQLModel.metadata) == []


def test_cli_db_upgrade(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    result = subprocess.run([sys.executable, "-m", "admin.cli", "db", "upgrade"], cwd=ROOT, capture_output=True,
                            text=True, env={"RELAY_DATABASE_URL": url, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 0, result.stderr
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(db.alembic_config(url)).get_current_head()
    assert f"database at revision {head}" in result.stdout
    engine = db.make_engine(url)
    assert set(inspect(engine).get_table_names()) >= TABLES
    engine.dispose()


def test_request_stats_are_backfilled_from_the_log_and_equal_the_live_rollup(db_url):
    """Upgrading a database that already has a request log rolls it up; the result is what the log writer
    would have written (relay.rollup), so old and new rows chart alike."""
    from datetime import UTC, datetime, timedelta

    from alembic import command
    from sqlalchemy import insert, select

    from relay.models import RequestLog, request_stats
    from relay.rollup import rollup

    command.upgrade(db.alembic_config(db_url), "0003")
    now = datetime(2026, 11, 28, 12, 0, 30, tzinfo=UTC)
    logs = [{"created_at": now + timedelta(seconds=40 * i), "tenant_id": 1 + i % 2, "key_id": 1, "endpoint": "chat",
             "model": ("m-a", "m-b")[i % 3 == 0], "channel_id": None if i == 4 else 7, "stream": False,
             "status_code": {4: 404, 5: 502}.get(i, 200), "prompt_tokens": i, "completion_tokens": 2 * i,
             "total_tokens": 3 * i, "latency_ms": 3.0 * 10 ** (i % 5), "cache": ("hit", "miss", "bypass")[i % 3]}
            for i in range(120)]
    engine = db.make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(insert(RequestLog.__table__), logs)
    db.upgrade(db_url)
    with engine.connect() as conn:
        stored = [dict(r._mapping) for r in conn.execute(select(request_stats)).all()]
    engine.dispose()
    key = ("width", "start", "model", "channel_id", "tenant_id")
    expected = sorted(rollup(logs), key=lambda r: tuple(str(r[k]) for k in key))
    assert sorted(stored, key=lambda r: tuple(str(r[k]) for k in key)) == expected
    assert sum(r["requests"] for r in stored if r["width"] == 3600) == 120 == sum(r["requests"] for r in stored
                                                                                   if r["width"] == 60)
    assert {r["model"] for r in stored} == {"m-a", "m-b", "(unknown model)"}  # the 404 without a channel
