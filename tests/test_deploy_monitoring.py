"""deploy/grafana, deploy/prometheus, deploy/haproxy: the dashboard, and the Prometheus and HAProxy configurations
of compose.yaml's `scale` profile.

The dashboard's PromQL is checked with regular expressions against the exported metrics (DASHBOARD_METRICS) and
parsed by promtool; the Prometheus configuration by `promtool check config`, HAProxy's by `haproxy -c`. Both tools
are Debian packages: without them the check skips locally, and fails under CI, which installs them (.ci/run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy_common import DASHBOARD_METRICS, DEPLOY, load_yaml

DASHBOARD = DEPLOY / "grafana" / "policy-relay.json"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
HAPROXY_CFG = DEPLOY / "haproxy" / "haproxy.cfg"

# Values the dashboard may match on, where the label's values are fixed.
LABEL_VALUES = {"status_class": {"1xx", "2xx", "3xx", "4xx", "5xx"}, "result": {"hit", "miss", "bypass"}}
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every series
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# PromQL words that are not metric names (functions, aggregations, keywords) the dashboard may use.
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "topk", "bottomk", "rate", "irate", "increase", "histogram_quantile",
    "clamp_min", "clamp_max", "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
    "unless", "bool", "abs", "vector", "scalar", "sort_desc", "max_over_time", "min_over_time", "avg_over_time",
}


def _system_tool(name: str, debian_path: str, package: str) -> str:
    """The tool's path; missing, the test skips, except under CI (which installs it), where it fails."""
    found = shutil.which(name) or (debian_path if Path(debian_path).exists() else None)
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail(f"{name} is missing ({debian_path}); CI installs Debian's {package} package (.ci/run)")
    pytest.skip(f"{name} is not installed (Debian's {package} package)")


def _promtool() -> str:
    return _system_tool("promtool", "/usr/bin/promtool", "prometheus")


def _haproxy() -> str:
    return _system_tool("haproxy", "/usr/sbin/haproxy", "haproxy")


# --- the Grafana dashboard -------------------------------------------------------------------------------------


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # a collapsed row carries its panels
    return out


def _exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p.get("targets", []) if t.get("expr")]


def _strip(expr: str) -> str:
    """The expression without strings, label matchers, ranges, grouping clauses and numbers."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    return re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][+-]?\d+)?", "", expr)


def _metric(series: str) -> str | None:
    """The exported metric a series name belongs to (a histogram's _bucket/_sum/_count), or None."""
    if series in DASHBOARD_METRICS and DASHBOARD_METRICS[series][0] != "histogram":
        return series
    for suffix in HISTOGRAM_SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and DASHBOARD_METRICS.get(base, ("",))[0] == "histogram":
            return base
    return None


def _series(expr: str) -> list[str]:
    return [w for w in re.findall(r"[A-Za-z_:][\w:]*", _strip(expr)) if w not in PROMQL_WORDS]


def test_dashboard_is_importable_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"

    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
            assert "$__rate_interval" not in target["expr"]


def test_dashboard_uses_exactly_the_exported_metrics() -> None:
    exprs = _exprs(json.loads(DASHBOARD.read_text()))
    used = set()
    for expr in exprs:
        for series in _series(expr):
            metric = _metric(series)
            assert metric, f"{series!r} in {expr!r} is not an exported metric (or a histogram used without _bucket)"
            used.add(metric)
    assert used == set(DASHBOARD_METRICS), f"not on the dashboard: {sorted(set(DASHBOARD_METRICS) - used)}"


def test_dashboard_labels_and_values_exist() -> None:
    for expr in _exprs(json.loads(DASHBOARD.read_text())):
        metrics = {_metric(s) for s in _series(expr)}
        known = set().union(*(DASHBOARD_METRICS[m][1] for m in metrics)) | TARGET_LABELS
        for name, matchers in re.findall(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", expr):
            metric = _metric(name)
            allowed = DASHBOARD_METRICS[metric][1] | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
            for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', matchers):
                assert label in allowed, f"{name} has no label {label!r}: {expr}"
                if label in LABEL_VALUES:
                    values = set(value.split("|")) if op in ("=~", "!~") else {value}
                    assert values <= LABEL_VALUES[label], f"{label}={value!r} in {expr}"
        for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in (w.strip() for w in clause.split(",") if w.strip()):
                assert label in known | {"le"}, f"grouping by {label!r}, which none of {metrics} has: {expr}"


def test_dashboard_quantiles_come_from_bucket_rates() -> None:
    exprs = _exprs(json.loads(DASHBOARD.read_text()))
    quantile_exprs = [e for e in exprs if "histogram_quantile" in e]
    assert quantile_exprs
    shape = r"histogram_quantile\(0?\.\d+, sum by \(le\b[^)]*\) \(rate\(\w+_bucket\[5m\]\)\)\)"
    for expr in quantile_exprs:
        assert re.search(shape, expr), expr
    histograms = {m for m, (kind, _) in DASHBOARD_METRICS.items() if kind == "histogram"}
    with_quantiles = {_metric(s) for e in quantile_exprs for s in _series(e)}
    assert histograms <= with_quantiles, f"no quantiles for {sorted(histograms - with_quantiles)}"
    for expr in quantile_exprs:
        assert {"0.5", "0.95", "0.99"} & set(re.findall(r"histogram_quantile\((0?\.\d+)", expr))


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """Every expression, as a recording rule, through promtool (Debian's prometheus package)."""
    promtool = _promtool()
    exprs = _exprs(json.loads(DASHBOARD.read_text()))
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:expr_{i}", "expr": e}
                                                        for i, e in enumerate(exprs)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Prometheus and HAProxy for compose.yaml's `scale` profile -----------------------------------------------------


def test_prometheus_config_is_valid() -> None:
    promtool = _promtool()
    result = subprocess.run([promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_both_gateways_and_the_worker() -> None:
    config = load_yaml(PROMETHEUS_YML)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {name: {t for sc in job.get("static_configs", []) for t in sc["targets"]} for name, job in jobs.items()}
    assert targets["policy-relay-gateway"] == {"gateway:8080", "gateway-2:8080"}
    assert targets["policy-relay-worker"] == {"worker:8001"}
    assert jobs["policy-relay-gateway"].get("metrics_path", "/metrics") == "/metrics"
    assert "credentials_file" in PROMETHEUS_YML.read_text()  # the bearer-token option, documented


def test_haproxy_balances_both_gateways_with_health_checks() -> None:
    lines = [line.split("#", 1)[0].split() for line in HAPROXY_CFG.read_text().splitlines()]
    lines = [words for words in lines if words]
    servers = {words[2]: words[3:] for words in lines if words[0] == "server"}
    assert set(servers) == {"gateway:8080", "gateway-2:8080"}
    assert all("check" in options for options in servers.values())
    assert ["balance", "roundrobin"] in lines
    assert ["option", "httpchk"] in lines
    assert ["http-check", "send", "meth", "GET", "uri", "/health/ready"] in lines
    assert ["http-check", "expect", "status", "200"] in lines


def test_haproxy_config_is_valid() -> None:
    """`haproxy -c` (Debian's haproxy package). The gateways' names do not resolve here, which
    HAProxy reports as a warning and tolerates (init-addr none), as it does before Docker's DNS knows them."""
    haproxy = _haproxy()
    result = subprocess.run([haproxy, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
