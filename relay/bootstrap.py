"""What `policy-relay serve` does before the gateway starts: run a local worker if asked, register
its channel, and on a brand-new database create a first tenant and key so the relay answers at once."""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import threading
import time

import httpx
from sqlmodel import select

from relay.auth import hash_secret, new_secret, shown_prefix
from relay.db import make_engine, session
from relay.models import ApiKey, Channel, Tenant, utcnow

log = logging.getLogger("relay.bootstrap")

LOCAL_CHANNEL = "local"
PARENT_ENV = "RELAY_WORKER_PARENT"


def exit_with_parent() -> None:
    """In a worker started by `serve --with-worker`: exit as soon as the gateway that started it is gone."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def start_worker(model: str, port: int, timeout_s: float = 600) -> tuple[subprocess.Popen, str, str]:
    """Starts `policy-relay worker` as a child process; returns it, its URL and the model name it serves."""
    cmd = [sys.executable, "-m", "relay.cli", "worker", "--model", model, "--port", str(port),
           "--log-level", "warning"]
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


def register_local_channel(database_url: str, url: str, model: str) -> None:
    """Creates or updates the channel named `local` so it points at this worker and serves its model."""
    with session(make_engine(database_url)) as s:
        channel = s.exec(select(Channel).where(Channel.name == LOCAL_CHANNEL)).first()
        if channel is None:
            channel = Channel(name=LOCAL_CHANNEL, type="local", models=[model])
        channel.type, channel.base_url, channel.status = "local", url, "enabled"
        if model not in channel.models:
            channel.models = [*channel.models, model]
        channel.updated_at = utcnow()
        s.add(channel)
        s.commit()
    log.info("channel %r → %s serves %s", LOCAL_CHANNEL, url, model)


def first_key(database_url: str) -> str | None:
    """On a database without any tenant, creates tenant `default` with one key and returns the secret."""
    with session(make_engine(database_url)) as s:
        if s.exec(select(Tenant)).first() is not None:
            return None
        tenant = Tenant(name="default")
        s.add(tenant)
        s.flush()
        secret = new_secret()
        s.add(ApiKey(tenant_id=tenant.id, name="first-key", prefix=shown_prefix(secret), key_hash=hash_secret(secret)))
        s.commit()
        return secret
