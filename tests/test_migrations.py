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
