"""The worker stands alone: a GPU box that only runs it installs and imports nothing of the gateway."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from tests.conftest import ROOT

GATEWAY_ONLY = ("relay", "channels", "admin", "litellm", "redis", "sqlalchemy", "sqlmodel", "alembic", "psycopg",
                "cryptography", "openai")

SCRIPT = f"""
import importlib.abc, sys

class RefuseGateway(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {GATEWAY_ONLY!r}:
            raise ImportError(f"the worker imported {{name}}")

sys.meta_path.insert(0, RefuseGateway())
from starlette.testclient import TestClient

from backends.cli import main  # the command line too
from backends.loading import load
from backends.server import create_worker_app

with TestClient(create_worker_app(load("tiny-qwen2"))) as client:
    answer = client.post("/v1/chat/completions", json={{"model": "tiny-qwen2", "max_tokens": 3, "temperature": 0,
                                                        "messages": [{{"role": "user", "content": "hi"}}]}})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3, answer.text
    refused = client.post("/v1/chat/completions", content=b"x" * (17 * 1024 * 1024))
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "request_too_large"
print("loaded:", sorted({{m.split(".")[0] for m in sys.modules}} & set({GATEWAY_ONLY!r})))
"""


def test_the_worker_imports_nothing_of_the_gateway():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("loaded: []")


# `policy-relay worker` (the Dockerfile's worker stage, compose's worker) starts from admin.cli, which the
# worker-only install also has: it must reach backends.cli without a gateway library.
CLI_SCRIPT = f"""
import importlib.abc, sys

GATEWAY_LIBRARIES = {tuple(name for name in GATEWAY_ONLY if name not in ("relay", "channels", "admin"))!r}

class RefuseGatewayLibraries(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in GATEWAY_LIBRARIES + ("aiohttp", "jsonschema"):
            raise ImportError(f"policy-relay worker imported {{name}}")

sys.meta_path.insert(0, RefuseGatewayLibraries())
import backends.cli

started = []
backends.cli.run = lambda args: started.append(args.model) or 0
from admin.cli import main

assert main(["worker", "--model", "tiny-qwen2", "--port", "1"]) == 0
print("started:", started)
"""


def test_the_worker_command_needs_no_gateway_library():
    result = subprocess.run([sys.executable, "-c", CLI_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("started: ['tiny-qwen2']")


def test_the_worker_extra_pulls_nothing_of_the_gateway():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    worker = [*project["dependencies"], *project["optional-dependencies"]["worker"]]
    names = {req.split("==")[0].split("[")[0].split(";")[0].strip().lower() for req in worker}
    assert not names & {"litellm", "redis", "sqlmodel", "sqlalchemy", "alembic", "psycopg", "cryptography",
                        "jsonschema", "openai"}
    gateway = {req.split("==")[0].lower() for req in project["optional-dependencies"]["gateway"]}
    assert not gateway & {"torch", "transformers", "accelerate", "gguf"}
