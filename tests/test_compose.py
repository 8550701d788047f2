"""compose.yaml and the Dockerfile: schema-valid, and wired the way the gateway expects.

No Docker engine is needed: the file is checked against the Compose Specification's JSON schema vendored
inside check-jsonschema, and the structure the schema cannot express is checked with PyYAML.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"


def _check_jsonschema() -> list[str]:
    """The check-jsonschema of the interpreter running the tests, not whatever is first on PATH."""
    exe = Path(sys.executable).parent / "check-jsonschema"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    if found:  # e.g. check-jsonschema.exe on Windows
        return [found]
    return [sys.executable, "-m", "check_jsonschema"]


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_matches_compose_spec_schema() -> None:
    result = _validate(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "broken",
    [
        {"services": {"gateway": {"image": "x", "healthcheck": {"test": 5}}}},
        {"services": {"gateway": {"image": "x"}}, "not_a_compose_key": {}},
    ],
    ids=["healthcheck-test-not-string-or-list", "unknown-top-level-key"],
)
def test_schema_check_rejects_broken_compose(tmp_path: Path, broken: dict) -> None:
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = _validate(path)
    assert result.returncode != 0, f"check-jsonschema accepted a broken file:\n{result.stdout}{result.stderr}"
    # Rejected by the schema, not by a crash or a missing schema.
    assert "Schema validation errors" in result.stdout, result.stdout + result.stderr


def test_compose_structure() -> None:
    services = _load_compose()["services"]
    assert {"gateway", "worker", "redis", "postgres"} <= set(services)

    for name in ("gateway", "worker", "redis", "postgres"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"

    gateway = services["gateway"]
    depends_on = gateway["depends_on"]
    assert isinstance(depends_on, dict), "depends_on must be the long form to carry a condition"
    for dep in ("postgres", "redis", "worker"):
        assert depends_on[dep]["condition"] == "service_healthy"
    assert "http://worker:8001" in gateway["command"]
    assert services["worker"]["command"][:2] == ["policy-relay", "worker"]

    env = gateway["environment"]
    if isinstance(env, list):  # the KEY=VALUE list form is equally valid
        env = dict(item.split("=", 1) for item in env)
    assert env["RELAY_DATABASE_URL"].startswith(("postgresql://", "postgres://"))
    assert "@postgres:" in env["RELAY_DATABASE_URL"]
    assert env["RELAY_REDIS_URL"].startswith("redis://redis:")
    assert "RELAY_ADMIN_TOKEN" in env["RELAY_ADMIN_TOKEN"]  # taken from the operator's environment, not baked in
    assert "RELAY_SECRET_KEY" in env["RELAY_SECRET_KEY"]  # likewise: PostgreSQL needs the key set

    # The slim image has no curl, so the gateway's healthcheck must not rely on it.
    test = gateway["healthcheck"]["test"]
    test_text = test if isinstance(test, str) else " ".join(test)
    assert "curl" not in test_text and "/health" in test_text


def test_dockerfile_targets_run_the_gateway_and_the_worker() -> None:
    """Each build target (the stages compose.yaml names) ends in an exec-form CMD starting the right process."""
    stages: dict[str, list[str]] = {}
    current = None
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if words[:1] == ["FROM"]:
            current = words[-1] if "AS" in [w.upper() for w in words] else None
        elif words[:1] == ["CMD"] and current:
            stages[current] = json.loads(line.strip()[len("CMD "):])  # exec form: signals reach the server
    assert stages["gateway"][:2] == ["policy-relay", "serve"] and "0.0.0.0" in stages["gateway"]
    assert stages["worker"][:2] == ["policy-relay", "worker"] and "0.0.0.0" in stages["worker"]
    services = _load_compose()["services"]
    targets = {name: svc["build"]["target"] for name, svc in services.items() if "build" in svc}
    assert targets["gateway"] == "gateway" and targets["worker"] == "worker"
    for name, target in targets.items():  # the `scale` profile's extra gateways build the same image
        assert target == {"serve": "gateway", "worker": "worker"}[services[name]["command"][1]], name


# --- the `scale` profile: two gateways behind HAProxy, Prometheus scraping them -------------------------------

SCALE = "scale"


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return env


def _gateways(services: dict) -> dict[str, dict]:
    return {name: svc for name, svc in services.items() if svc.get("command", [])[:2] == ["policy-relay", "serve"]}


def _port(service: dict) -> int:
    command = service["command"]
    return int(command[command.index("--port") + 1])


def _mounted_file(service: dict, container_path: str) -> Path:
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        if target == container_path:
            assert source.startswith("./"), "configuration is mounted from the repository"
            path = ROOT / source
            assert path.is_file(), path
            assert volume.endswith(":ro")
            return path
    raise AssertionError(f"nothing mounted at {container_path}")


def test_default_stack_is_unchanged_by_the_profile() -> None:
    services = _load_compose()["services"]
    default = {name for name, svc in services.items() if not svc.get("profiles")}
    assert default == {"gateway", "worker", "redis", "postgres"}
    profiled = {name for name, svc in services.items() if svc.get("profiles")}
    assert profiled and all(services[name]["profiles"] == [SCALE] for name in profiled)


def test_scale_profile_gateways_share_one_database_and_redis() -> None:
    services = _load_compose()["services"]
    gateways = _gateways(services)
    assert len(gateways) >= 2, "the scale profile runs more than one gateway"
    assert [name for name, svc in gateways.items() if not svc.get("profiles")] == ["gateway"]
    first = services["gateway"]
    for name, gateway in gateways.items():
        env = _environment(gateway)
        for key in ("RELAY_DATABASE_URL", "RELAY_REDIS_URL", "RELAY_SECRET_KEY", "RELAY_ADMIN_TOKEN"):
            assert env[key] == _environment(first)[key], f"{name}: {key} differs from gateway's"
        assert gateway["command"] == first["command"], name
        assert gateway["build"] == first["build"], name
        assert gateway["healthcheck"]["test"], name
        assert "ports" not in gateway or name == "gateway", f"{name} is reached through the load balancer"
        if name != "gateway":
            # On a fresh database one gateway migrates and creates the first key before the next one starts.
            assert gateway["depends_on"]["gateway"]["condition"] == "service_healthy"
            for dep in ("postgres", "redis", "worker"):
                assert gateway["depends_on"][dep]["condition"] == "service_healthy"


def _haproxy_servers(path: Path) -> dict[str, list[str]]:
    servers = {}
    for line in path.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words[:1] == ["server"]:
            servers[words[2]] = words[3:]
    return servers


def test_scale_profile_load_balancer_names_every_gateway() -> None:
    services = _load_compose()["services"]
    gateways = _gateways(services)
    lb = services["lb"]
    assert lb["profiles"] == [SCALE] and lb["image"].startswith("haproxy:")
    config = _mounted_file(lb, "/usr/local/etc/haproxy/haproxy.cfg")
    servers = _haproxy_servers(config)
    assert set(servers) == {f"{name}:{_port(svc)}" for name, svc in gateways.items()}
    assert all("check" in options for options in servers.values()), "every upstream is health-checked"
    text = config.read_text()
    assert "balance roundrobin" in text and "/health/ready" in text
    bind = re.search(r"^\s*bind\s+:(\d+)", text, re.MULTILINE)
    assert bind and any(p.endswith(f":{bind.group(1)}") for p in lb["ports"])
    for name in gateways:
        assert lb["depends_on"][name]["condition"] == "service_healthy"
    assert lb.get("healthcheck", {}).get("test")


def test_scale_profile_prometheus_scrapes_every_target() -> None:
    services = _load_compose()["services"]
    prometheus = services["prometheus"]
    assert prometheus["profiles"] == [SCALE] and prometheus["image"].startswith("prom/prometheus:")
    config = yaml.safe_load(_mounted_file(prometheus, "/etc/prometheus/prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    expected = {f"{name}:{_port(svc)}" for name, svc in _gateways(services).items()}
    expected.add(f"worker:{_port(services['worker'])}")
    assert expected <= targets
    assert not any(t.startswith("lb:") for t in targets), "each gateway is scraped directly, not through the LB"
