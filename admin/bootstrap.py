"""What `policy-relay serve` does before the gateway starts: run a local worker if asked, register
its channel, and on a brand-new database create a first tenant and key so the relay answers at once."""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import time

import httpx
from sqlmodel import select

from backends.parent import PARENT_ENV
from relay import config_state
from relay.db import make_engine, session
from relay.models import Tenant
from relay.secrets import SecretBox, resolve_box
from relay.settings import Settings

log = logging.getLogger("admin.bootstrap")

LOCAL_CHANNEL = "local"


def start_worker(model: str, port: int, timeout_s: float = 600) -> tuple[subprocess.Popen, str, str]:
    """Starts `policy-relay worker` as a child process; returns it, its URL and the model name it serves."""
    # `python -m backends`: the worker process imports nothing of the gateway.
    cmd = [sys.executable, "-m", "backends", "--model", model, "--port", str(port), "--log-level", "warning"]
    # The worker watches this pid and exits when it is gone: uvicorn re-raises SIGTERM after its graceful
    # shutdown, so the gateway can die without running atexit, and an orphaned worker holds its model.
    process = subprocess.Popen(cmd, env={**os.environ, PARENT_ENV: str(os.getpid())})
    atexit.register(_stop, process)
    url = f"http://127.0.0.1:{port}"
    log.info("starting the local worker for %s on %s (the first start of a model can take a minute)", model, url)
    return process, url, wait_for_worker(url, timeout_s, process)


def wait_for_worker(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the local worker exited with code {process.returncode}")
        try:
            answer = httpx.get(url + "/health", timeout=2)
            if answer.status_code == 200:
                return answer.json()["model"]
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the worker at {url} did not become healthy within {timeout_s:.0f} s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def secret_box(settings: Settings) -> SecretBox:
    """This database's key; raises SecretKeyError (saying what to do) when it is missing or another one."""
    box = resolve_box(settings.database_url, settings.secret_key, settings.secret_key_file)
    engine = make_engine(settings.database_url)
    try:
        config_state.check_secret_key(engine, box)
    finally:
        engine.dispose()
    return box


def check_secret_key(settings: Settings) -> None:
    secret_box(settings)


def register_local_channel(database_url: str, url: str, model: str) -> None:
    """Creates or updates the channel named `local` so it points at this worker and serves its model."""
    from admin import service

    with session(make_engine(database_url)) as s:
        service.upsert_local_channel(s, LOCAL_CHANNEL, url, model, "bootstrap")
    log.info("channel %r → %s serves %s", LOCAL_CHANNEL, url, model)


def first_key(database_url: str) -> str | None:
    """On a database without any tenant, creates tenant `default` with one key and returns the secret."""
    from admin import service
    from admin.schemas import KeyCreate, TenantCreate

    with session(make_engine(database_url)) as s:
        if s.exec(select(Tenant)).first() is not None:
            return None
        tenant = service.create_tenant(s, TenantCreate(name="default"), "bootstrap")
        _, secret = service.create_key(s, KeyCreate(tenant_id=tenant.id, name="first-key"), "bootstrap")
        return secret
