"""Shared fixtures: a fake OpenAI-compatible upstream in a thread, fresh databases (SQLite files and
PostgreSQL databases created per run), and the relay itself as a real `policy-relay serve` process."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import psycopg
import pytest

from tests.fake_upstream import FakeUpstream, ServerThread
from tests.net import free_port, stop, wait_healthy

ADMIN_TOKEN = "test-admin-token"
# The relays started here encrypt upstream secrets with this key (a PostgreSQL database needs one set).
SECRET_KEY = "0vzTQ5B3oSS4G4C4Yvd2Gi33n1DyQ3oJHMGx8QWxMzA="
PG_ADMIN_URL = os.environ.get("RELAY_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A brand-new PostgreSQL database for one fixture, dropped afterwards."""
    name = f"relay_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def database(kind: str, tmp_dir: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_dir / f'relay-{uuid.uuid4().hex[:8]}.db'}"
    else:
        with postgres_database() as url:
            yield url


@pytest.fixture(scope="session")
def upstream() -> Iterator[tuple[FakeUpstream, str]]:
    fake = FakeUpstream(api_key="upstream-secret")
    with ServerThread(fake) as server:
        yield fake, server.url


@dataclass
class Relay:
    url: str
    database_url: str
    process: subprocess.Popen
    log_path: Path

    def admin(self, method: str, path: str, json: Any = None, token: str | None = ADMIN_TOKEN,
              **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.request(method, self.url + path, json=json, headers=headers, timeout=30, **kw)

    def ok(self, method: str, path: str, json: Any = None) -> Any:
        response = self.admin(method, path, json)
        assert response.status_code < 300, (response.status_code, response.text)
        return response.json() if response.content else None

    def new_key(self, tenant: dict[str, Any] | None = None, **key_fields: Any) -> dict[str, Any]:
        """A fresh tenant (unique name) and a key for it; returns the key answer with the secret."""
        tenant_row = self.ok("POST", "/admin/tenants", {"name": f"t-{uuid.uuid4().hex[:10]}", **(tenant or {})})
        return self.ok("POST", "/admin/keys", {"tenant_id": tenant_row["id"], "name": "k", **key_fields})

    def client(self, key: str, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(api_key=key, base_url=self.url + "/v1", **{"max_retries": 0, "timeout": 30, **kw})

    def logs(self, tenant_id: int, want: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
        """Request-log rows of a tenant, once at least `want` of them have been flushed."""
        deadline = time.time() + timeout
        while True:
            rows = self.ok("GET", f"/admin/logs?tenant_id={tenant_id}")["data"]
            if len(rows) >= want or time.time() > deadline:
                return rows
            time.sleep(0.1)


@contextlib.contextmanager
def run_relay(database_url: str, tmp_dir: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Relay]:
    port = free_port()
    log_path = tmp_dir / f"relay-{port}.log"
    full_env = {**os.environ, "RELAY_DATABASE_URL": database_url, "RELAY_REDIS_URL": "none",
                "RELAY_ADMIN_TOKEN": ADMIN_TOKEN, "RELAY_PORT": str(port), "RELAY_LOG_FLUSH_S": "0.2",
                "RELAY_CONFIG_POLL_S": "0.5", "RELAY_TRUSTED_PROXIES": "127.0.0.1", "RELAY_SECRET_KEY": SECRET_KEY,
                **(env or {})}
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "admin.cli", "serve", "--log-level", "warning", *args],
                                   env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    relay = Relay(f"http://127.0.0.1:{port}", database_url, process, log_path)
    try:
        wait_healthy(relay.url + "/health", process, log=log_path.read_text)
        yield relay
    finally:
        stop(process)


@contextlib.contextmanager
def run_server(tmp_dir: Path, module: str, *args: str, health: str = "/health") -> Iterator[str]:
    """`python -m MODULE --port P ARGS` on a free port; yields its URL once `health` answers 200."""
    port = free_port()
    log = tmp_dir / f"{module.rsplit('.', 1)[-1]}-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", module, "--port", str(port), *args], cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url + health, process, log=log.read_text)
        yield url
    finally:
        stop(process)


def run_worker(tmp_dir: Path, model: str, *args: str) -> contextlib.AbstractContextManager[str]:
    """A real `python -m backends --model MODEL ARGS` on a free port; yields its URL once healthy."""
    return run_server(tmp_dir, "backends", "--model", model, *args, "--log-level", "warning")


def add_fake_channel(relay: Relay, upstream_url: str, name: str, models: list[str], **fields: Any) -> dict:
    return relay.ok("POST", "/admin/channels", {"name": name, "type": "openai", "base_url": upstream_url,
                                                "api_key": "upstream-secret", "models": models, **fields})


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def relay(request, upstream, tmp_path_factory) -> Iterator[Relay]:
    """One relay per database kind for the whole session, with a channel `fake` to the fake upstream
    serving `gpt-x` (mapped to upstream name `up-x`) and `plain-model` (unmapped)."""
    tmp_dir = tmp_path_factory.mktemp(f"relay-{request.param}")
    with database(request.param, tmp_dir) as url, run_relay(url, tmp_dir) as relay:
        add_fake_channel(relay, upstream[1], "fake", ["gpt-x", "plain-model"],
                         model_mapping={"gpt-x": "up-x"})
        yield relay


@pytest.fixture
def calls(upstream) -> list[dict[str, Any]]:
    """The bodies the fake upstream receives during this test."""
    fake, _ = upstream
    fake.calls.clear()
    return fake.calls


# The local worker on the random-weight tiny Qwen2 (real Qwen tokenizer and template), in this test process:
# shared by the worker's own test modules (each module gets its own model and server).
@pytest.fixture(scope="module")
def tiny_lm():
    from backends.loading import load

    return load("tiny-qwen2")


@pytest.fixture(scope="module")
def tiny_worker(tiny_lm):
    from backends.server import create_worker_app
    from tests.fake_upstream import ServerThread

    with ServerThread(create_worker_app(tiny_lm, max_batch=32)) as server:
        yield server


@pytest.fixture
def tiny_client(tiny_worker) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_worker.url + "/v1", api_key="unused", max_retries=0, timeout=120)
