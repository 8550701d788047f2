"""/metrics scraped by a real Prometheus (Debian's 2.42, started here on its own port) from `serve --workers 2`
with a local worker; `promtool check metrics` on both endpoints; readiness and liveness."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from relay import metrics as relay_metrics
from tests.conftest import add_fake_channel, postgres_database, run_relay
from tests.deploy_common import DASHBOARD_METRICS
from tests.net import free_port, stop

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
REDIS_URL = "redis://127.0.0.1:6379/14"
needs_prometheus = pytest.mark.skipif(not (os.path.exists(PROMETHEUS) and os.path.exists(PROMTOOL))
                                      and not os.environ.get("CI"),
                                      reason="Debian's prometheus package is not installed (.ci/run installs it)")


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _sum(samples: dict, name: str, **labels: str) -> float:
    return sum(value for (n, ls), value in samples.items()
               if n == name and all(dict(ls).get(k) == want for k, want in labels.items()))


def _promtool_check(text: str) -> None:
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_prometheus
def test_prometheus_scrapes_two_gateway_processes_and_the_worker(tmp_path, upstream):
    worker_port = free_port()
    env = {"RELAY_REDIS_URL": REDIS_URL}
    with postgres_database() as url, run_relay(url, tmp_path, "--workers", "2", "--with-worker", "tiny-qwen2",
                                               "--worker-port", str(worker_port), env=env) as relay:
        add_fake_channel(relay, upstream[1], "fake-metrics", ["metrics-model"])
        relay.ok("POST", "/admin/policies", {"model_pattern": "metrics-model", "rules": {"temperature": {"min": 0.5}}})
        key = relay.new_key()
        time.sleep(1.5)  # RELAY_CONFIG_POLL_S=0.5: both processes know the channel
        ready = httpx.get(relay.url + "/health/ready", timeout=10)
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"catalog": "ok", "database": "ok", "migrations": "ok", "redis": "ok",
                                          "worker": "ok"}
        assert httpx.get(relay.url + "/health/live", timeout=5).json() == {"status": "ok"}

        sent = 12
        for i in range(sent):  # a new connection each: both processes answer some
            with httpx.Client(base_url=relay.url, timeout=30) as client:
                answer = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key['key']}"},
                                     json={"model": "metrics-model", "stream": i % 3 == 0,
                                           "messages": [{"role": "user", "content": f"hi {i}"}],
                                           **({"temperature": 0.1} if i == 1 else {})})
                assert answer.status_code == 200, answer.text
        refused = httpx.post(relay.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key['key']}"},
                             json={"model": "no-such-model-" + "x" * 40,
                                   "messages": [{"role": "user", "content": "a"}]})
        assert refused.status_code == 404

        gateway_text = httpx.get(relay.url + "/metrics", timeout=10).text
        _promtool_check(gateway_text)
        samples = _samples(gateway_text)
        assert _sum(samples, "relay_requests_total", model="metrics-model", status_class="2xx",
                    channel="fake-metrics") == sent
        # A model the catalog does not serve is never a label value of its own.
        assert _sum(samples, "relay_requests_total", model="other", status_class="4xx") >= 1
        assert not any("no-such-model" in str(labels) for (_, labels) in samples)
        assert _sum(samples, "relay_time_to_first_byte_seconds_count", model="metrics-model") == 4
        assert _sum(samples, "relay_upstream_duration_seconds_count", channel="fake-metrics") == sent
        assert _sum(samples, "relay_completion_tokens_total", model="metrics-model") > 0
        assert _sum(samples, "relay_policy_rewrites_total", model="metrics-model", param="temperature",
                    rule="temperature.min") == 1
        assert _sum(samples, "relay_redis_up") == 1 and _sum(samples, "relay_database_up") == 1
        assert _sum(samples, "relay_channel_circuit_open", channel="fake-metrics") == 0
        worker_text = httpx.get(f"http://127.0.0.1:{worker_port}/metrics", timeout=10).text
        _promtool_check(worker_text)
        # Every series the Grafana dashboard queries is one the gateway or the worker defines. (A labelled
        # counter that never moved has no series yet under --workers N, so the gateway's own definitions count.)
        exposed = {f.name for text in (gateway_text, worker_text) for f in text_string_to_metric_families(text)}
        defined = {m._name for m in vars(relay_metrics).values() if isinstance(m, MetricWrapperBase)}
        missing = [n for n in DASHBOARD_METRICS if n.removesuffix("_total") not in exposed | defined]
        assert not missing, missing

        prom_port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: gateway\n    static_configs: [{{targets: ['127.0.0.1:{relay.url.rsplit(':', 1)[1]}']}}]\n"
            f"  - job_name: worker\n    static_configs: [{{targets: ['127.0.0.1:{worker_port}']}}]\n")
        check = subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        with open(tmp_path / "prometheus.log", "wb") as log:
            prom = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                     f"--web.listen-address=127.0.0.1:{prom_port}"],
                                    stdout=log, stderr=subprocess.STDOUT)
        try:
            query = 'sum(relay_requests_total{model="metrics-model",status_class="2xx"})'
            worker_query = "sum(worker_generation_tokens_total)"
            deadline, got, worker_up = time.time() + 60, None, None
            while time.time() < deadline and (got != sent or not worker_up):
                time.sleep(1)
                try:
                    got = _query(prom_port, query)
                    worker_up = _query(prom_port, 'up{job="worker"}')
                except httpx.HTTPError:
                    continue
            assert got == sent, Path(tmp_path / "prometheus.log").read_text()[-2000:]
            assert worker_up == 1
            assert _query(prom_port, 'up{job="gateway"}') == 1
            assert _query(prom_port, worker_query) is not None  # the worker's own series are stored
        finally:
            stop(prom)


def _query(port: int, promql: str) -> float | None:
    answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert answer["status"] == "success", answer
    result = answer["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_metrics_token_and_readiness_without_redis(tmp_path):
    """RELAY_METRICS_TOKEN guards /metrics; Redis that does not answer makes the process not ready (503) while
    it stays live, and Redis switched off on purpose does not."""
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    env = {"RELAY_METRICS_TOKEN": "scrape-secret", "RELAY_REDIS_URL": dead_redis}
    with run_relay(f"sqlite:///{tmp_path / 'm.db'}", tmp_path, env=env) as relay:
        assert httpx.get(relay.url + "/metrics", timeout=10).status_code == 401
        wrong = httpx.get(relay.url + "/metrics", headers={"Authorization": "Bearer nope"}, timeout=10)
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        ok = httpx.get(relay.url + "/metrics", headers={"Authorization": "Bearer scrape-secret"}, timeout=10)
        assert ok.status_code == 200 and "relay_redis_up 0.0" in ok.text
        if os.path.exists(PROMTOOL):
            _promtool_check(ok.text)
        ready = httpx.get(relay.url + "/health/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["checks"]["redis"] == "unreachable"
        assert httpx.get(relay.url + "/health/live", timeout=5).status_code == 200
        assert httpx.get(relay.url + "/health", timeout=5).status_code == 200  # unchanged
    with run_relay(f"sqlite:///{tmp_path / 'm.db'}", tmp_path) as relay:  # RELAY_REDIS_URL=none in tests
        ready = httpx.get(relay.url + "/health/ready", timeout=10)
        assert ready.status_code == 200 and ready.json()["checks"]["redis"] == "off"
        assert "relay_redis_up" not in httpx.get(relay.url + "/metrics", timeout=10).text


def test_metrics_dir_keeps_what_is_not_ours_and_refuses_an_unusable_one(tmp_path, monkeypatch):
    from relay import metrics_dir

    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("counter_12.db", "gauge_livesum_12.db", "histogram_7.db", "relay.db", "precious.db"):
        (folder / name).write_bytes(b"x")
    monkeypatch.setenv(metrics_dir.MULTIPROC_ENV, str(folder))
    assert metrics_dir.prepare(2) is None  # the operator's directory: emptied of our files, not removed
    assert sorted(p.name for p in folder.iterdir()) == ["precious.db", "relay.db"]
    (folder / "gauge_livesum_999999999.db").write_bytes(b"x")  # a pid that cannot exist
    (folder / f"gauge_livesum_{os.getpid()}.db").write_bytes(b"x")
    assert metrics_dir.dead_processes(str(folder)) == {999999999}
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(metrics_dir.MULTIPROC_ENV, str(blocker / "sub"))
    with pytest.raises(metrics_dir.MetricsDirError, match="PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir.prepare(2)
    monkeypatch.delenv(metrics_dir.MULTIPROC_ENV)
    assert metrics_dir.prepare(1) is None and metrics_dir.MULTIPROC_ENV not in os.environ
    made = metrics_dir.prepare(2)
    assert made and os.path.isdir(made) and os.environ[metrics_dir.MULTIPROC_ENV] == made
    metrics_dir.remove(made)
    assert not os.path.exists(made)
    monkeypatch.delenv(metrics_dir.MULTIPROC_ENV)
