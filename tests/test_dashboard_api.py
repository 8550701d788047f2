"""The admin API the dashboard stands on: time-bucketed stats, the request log by cursor with filters, its
totals and CSV, the audit log by cursor, open circuits, and a tenant's read-only view of itself — on a fresh
relay per database kind, so every count here is this module's own."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import openai
import pytest
import redis

from admin.stats import LATENCY_EDGES_MS, quantile
from tests.conftest import Relay, add_fake_channel, database, run_relay
from tests.net import free_port

REDIS_URL = "redis://127.0.0.1:6379/9"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def fresh(request, upstream, tmp_path_factory) -> Iterator[Relay]:
    redis.Redis.from_url(REDIS_URL).flushdb()
    tmp_dir = tmp_path_factory.mktemp(f"dash-{request.param}")
    with database(request.param, tmp_dir) as url, run_relay(url, tmp_dir, env={"RELAY_REDIS_URL": REDIS_URL}) as relay:
        add_fake_channel(relay, upstream[1], "fake", ["gpt-x", "plain-model"])
        yield relay


def _wait_rows(relay: Relay, want: int, **filters) -> list[dict]:
    query = "&".join(f"{k}={v}" for k, v in filters.items())
    deadline = time.time() + 10
    while True:
        rows = relay.ok("GET", f"/admin/logs?limit=1000&{query}")["data"]
        if len(rows) >= want or time.time() > deadline:
            return rows
        time.sleep(0.1)


@pytest.fixture(scope="module")
def traffic(fresh):
    """Two tenants: A sends 5 good requests (one of them rewritten by a policy) and 2 for unknown models,
    B sends 3 good ones."""
    fresh.ok("POST", "/admin/policies", {"model_pattern": "plain-model", "rules": {"temperature": {"min": 0.5}}})
    time.sleep(0.7)  # the config poll
    a, b = fresh.new_key(), fresh.new_key()
    client_a, client_b = fresh.client(a["key"]), fresh.client(b["key"])
    for i in range(4):
        client_a.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": f"a{i}"}])
    client_a.chat.completions.create(model="plain-model", messages=[{"role": "user", "content": "hot"}],
                                     temperature=0.1)
    for name in ("no-such-model", " =HYPERLINK(\"http://x\")"):
        with pytest.raises(openai.APIStatusError):
            client_a.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}])
    for i in range(3):
        client_b.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": f"b{i}"}])
    _wait_rows(fresh, 7, tenant_id=a["tenant_id"])
    _wait_rows(fresh, 3, tenant_id=b["tenant_id"])
    return a, b


def test_stats_count_what_was_sent_per_tenant_and_model(fresh, traffic):
    a, b = traffic
    by_tenant = fresh.ok("GET", "/admin/stats?bucket=1m&group_by=tenant")
    assert by_tenant["bucket"] == "1m" and len(by_tenant["buckets"]) in (60, 61, 62)
    assert all(t % 60 == 0 for t in by_tenant["buckets"])
    groups = {s["group"]: s for s in by_tenant["series"]}
    series_a, series_b = groups[str(a["tenant_id"])], groups[str(b["tenant_id"])]
    assert sum(series_a["requests"]) == 7 and sum(series_a["errors"]) == 2
    assert sum(series_b["requests"]) == 3 and sum(series_b["errors"]) == 0
    assert series_a["label"].startswith("t-") and len(series_a["requests"]) == len(by_tenant["buckets"])
    busy = [i for i, n in enumerate(series_b["requests"]) if n]
    assert all(series_b["p50_ms"][i] is not None and series_b["p50_ms"][i] <= series_b["p99_ms"][i] for i in busy)
    assert all(series_b["p50_ms"][i] is None for i in range(len(series_b["requests"])) if i not in busy)
    totals = by_tenant["totals"]
    assert totals["requests"] == 10 and totals["errors"] == 2 and totals["error_rate"] == 0.2
    assert totals["total_tokens"] == sum(sum(s["total_tokens"]) for s in by_tenant["series"]) > 0

    by_model = fresh.ok("GET", "/admin/stats?bucket=1h&group_by=model")
    models = {s["group"]: sum(s["requests"]) for s in by_model["series"]}
    # refused for their model before routing: counted under one name, not the client's strings
    assert models["gpt-x"] == 7 and models["plain-model"] == 1 and models["(unknown model)"] == 2
    assert "no-such-model" not in models
    assert len(by_model["buckets"]) in (24, 25, 26) and by_model["totals"]["requests"] == 10
    by_channel = fresh.ok("GET", "/admin/stats?bucket=1m&group_by=channel")
    labels = {s["label"]: sum(s["requests"]) for s in by_channel["series"]}
    assert labels == {"fake": 8, "none": 2}  # refused before routing: no channel


def test_stats_window_and_arguments_are_checked(fresh, traffic):
    now = datetime.now(UTC)
    later = fresh.ok("GET", f"/admin/stats?since={(now + timedelta(hours=1)).isoformat()}"
                            f"&until={(now + timedelta(hours=2)).isoformat()}".replace("+", "%2B"))
    assert later["series"] == [] and later["totals"]["requests"] == 0 and later["totals"]["p99_ms"] is None
    for query, param in (("bucket=5m", "bucket"), ("group_by=key", "group_by"), ("until=0001-01-01T00:30:00Z", "until"),
                         (f"since={(now - timedelta(days=3)).isoformat()}".replace("+", "%2B"), "since"),
                         (f"since={now.isoformat()}&until={(now - timedelta(hours=1)).isoformat()}"
                          .replace("+", "%2B"), "since")):
        refused = fresh.admin("GET", f"/admin/stats?{query}")
        assert refused.status_code == 400, (query, refused.text)
        assert refused.json()["error"]["param"] == param


def test_latency_quantiles_interpolate_inside_their_bucket():
    edges = len(LATENCY_EDGES_MS)
    # 100 requests, all between 10 and 25 ms: the median sits halfway through that bucket
    cumulative = [0, 0, 0, 0] + [100] * (edges - 4)
    assert quantile(0.5, cumulative, 100) == pytest.approx(17.5)
    assert quantile(0.99, [0] * (edges - 1) + [10], 20) == LATENCY_EDGES_MS[-1]  # slower than every edge
    assert quantile(0.5, [0] * edges, 0) is None


def test_logs_page_by_cursor_with_filters(fresh, traffic):
    a, _ = traffic
    pages, cursor = [], None
    while True:
        after = f"&cursor={cursor}" if cursor else ""
        page = fresh.ok("GET", f"/admin/logs?limit=3&tenant_id={a['tenant_id']}{after}")
        pages.append(page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    ids = [row["id"] for page in pages for row in page]
    assert len(ids) == 7 == len(set(ids)) and ids == sorted(ids, reverse=True) and [len(p) for p in pages] == [3, 3, 1]

    def count(query: str) -> int:
        return len(fresh.ok("GET", f"/admin/logs?tenant_id={a['tenant_id']}&{query}")["data"])

    assert count("status=4xx") == 2 and count("status=2xx") == 5 and count("status=404") == 2
    assert count("status=error") == 2 and count("status=5xx") == 0
    assert count("model=gpt-x") == 4 and count("rewritten=true") == 1 and count("rewritten=false") == 6
    assert count("cache=bypass") + count("cache=miss") + count("cache=hit") == 7
    assert count(f"since={(datetime.now(UTC) + timedelta(minutes=1)).isoformat()}".replace("+", "%2B")) == 0
    rewritten = fresh.ok("GET", f"/admin/logs?tenant_id={a['tenant_id']}&rewritten=true")["data"][0]
    assert rewritten["rewrites"][0]["param"] == "temperature" and rewritten["rewrites"][0]["to"] == 0.5
    for bad in ("status=6xx", "cache=maybe", "cursor=abc", "limit=0", "rewritten=perhaps", "tenant_id=0"):
        refused = fresh.admin("GET", f"/admin/logs?{bad}")
        assert refused.status_code == 400, (bad, refused.text)


def test_logs_summary_and_csv_cover_the_filtered_range(fresh, traffic):
    a, _ = traffic
    rows = fresh.ok("GET", f"/admin/logs?tenant_id={a['tenant_id']}")["data"]
    summary = fresh.ok("GET", f"/admin/logs/summary?tenant_id={a['tenant_id']}")
    assert summary["requests"] == 7 and summary["errors"] == 2
    assert summary["total_tokens"] == sum(r["total_tokens"] for r in rows) > 0
    assert summary["prompt_tokens"] + summary["completion_tokens"] == summary["total_tokens"]

    exported = fresh.admin("GET", f"/admin/logs.csv?tenant_id={a['tenant_id']}")
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    assert "attachment" in exported.headers["content-disposition"]
    table = list(csv.DictReader(io.StringIO(exported.text)))
    assert [int(r["id"]) for r in table] == [r["id"] for r in rows]
    # a client's model name never reaches a spreadsheet as a formula
    assert "' =HYPERLINK(\"http://x\")" in {r["model"] for r in table}
    assert fresh.admin("GET", "/admin/logs.csv", token=None).status_code == 401


def test_audit_pages_by_cursor_and_filters_by_entity(fresh, traffic):
    channel = fresh.ok("GET", "/admin/channels")[0]
    for weight in (2, 3, 4):
        fresh.ok("PATCH", f"/admin/channels/{channel['id']}", {"weight": weight})
    first = fresh.ok("GET", f"/admin/audit?entity=channel&entity_id={channel['id']}&limit=2")
    assert [e["after"]["weight"] for e in first["data"]] == [4, 3] and first["next_cursor"]
    rest = fresh.ok("GET", f"/admin/audit?entity=channel&entity_id={channel['id']}&limit=2"
                           f"&cursor={first['next_cursor']}")
    assert rest["data"][0]["after"]["weight"] == 2
    assert fresh.ok("GET", "/admin/audit?action=auto_disable")["data"] == []


def test_open_circuits_are_listed(fresh, upstream):
    dead = f"http://127.0.0.1:{free_port()}"
    channel = add_fake_channel(fresh, dead, "dead", ["dead-model"])
    time.sleep(0.7)
    key = fresh.new_key()
    assert fresh.ok("GET", "/admin/circuits")["data"] == []
    client = fresh.client(key["key"])
    for _ in range(3):
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model="dead-model", messages=[{"role": "user", "content": "x"}])
    listed = fresh.ok("GET", "/admin/circuits")["data"]
    assert [c["channel_id"] for c in listed] == [channel["id"]] and listed[0]["name"] == "dead"
    assert 0 < listed[0]["cooling_s"] <= 30
    fresh.ok("DELETE", f"/admin/channels/{channel['id']}")


def test_a_tenant_sees_only_itself(fresh, traffic):
    a, b = traffic
    me = fresh.admin("GET", "/tenant/self", token=a["key"])
    assert me.status_code == 200, me.text
    body = me.json()
    assert body["tenant"]["id"] == a["tenant_id"] and body["key"]["id"] == a["id"]
    assert body["usage_24h"]["requests"] == 7 and body["tenant"]["quota_left"] is None
    logs = fresh.admin("GET", "/tenant/logs?limit=5", token=a["key"]).json()
    assert len(logs["data"]) == 5 and logs["next_cursor"]
    assert {r["tenant_id"] for r in logs["data"]} == {a["tenant_id"]} and "channel_id" not in logs["data"][0]
    rest = fresh.admin("GET", f"/tenant/logs?cursor={logs['next_cursor']}", token=a["key"]).json()
    assert len(rest["data"]) == 2 and rest["next_cursor"] is None
    # the tenant's key is no admin token, the admin token no tenant key
    assert fresh.admin("GET", "/admin/logs", token=a["key"]).status_code == 401
    assert fresh.admin("GET", "/tenant/self").status_code == 401
    assert fresh.admin("GET", "/tenant/self", token="sk-nonsense").status_code == 401
    quota = fresh.new_key(tenant={"token_quota": 1000})
    assert fresh.admin("GET", "/tenant/self", token=quota["key"]).json()["tenant"]["quota_left"] == 1000
    fresh.ok("DELETE", f"/admin/keys/{b['id']}")
    time.sleep(0.7)
    assert fresh.admin("GET", "/tenant/self", token=b["key"]).status_code == 401


def test_tenant_reads_are_throttled(fresh):
    key = fresh.new_key()
    time.sleep(0.7)
    answers = [fresh.admin("GET", "/tenant/logs", token=key["key"]) for _ in range(100)]
    refused = [a for a in answers if a.status_code == 429]
    assert answers[0].status_code == 200 and refused and {a.status_code for a in answers} == {200, 429}
    assert int(refused[0].headers["retry-after"]) >= 1 and refused[0].json()["error"]["code"] == "rate_limit_exceeded"
    other = fresh.new_key()  # another key is not held back by this one
    time.sleep(0.7)
    assert fresh.admin("GET", "/tenant/self", token=other["key"]).status_code == 200


def test_dashboard_is_served_offline_with_a_strict_policy(fresh):
    root = fresh.admin("GET", "/dashboard", token=None, follow_redirects=False)
    assert root.status_code in (307, 308) and root.headers["location"] == "/dashboard/"
    page = fresh.admin("GET", "/dashboard/", token=None)
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    assert fresh.admin("GET", "/dashboard/app.js", token=None).status_code == 200
    for not_served in ("README.md", "refresh_vendor.sh", "screenshots/overview.png", "../relay/settings.py"):
        assert fresh.admin("GET", f"/dashboard/{not_served}", token=None).status_code == 404, not_served


def test_old_per_minute_stats_are_pruned_and_hourly_ones_kept(tmp_path):
    from sqlalchemy import insert, select

    from relay import db
    from relay.models import request_stats
    from relay.rollup import MINUTES_KEPT, prune_minutes, rollup

    url = f"sqlite:///{tmp_path / 'prune.db'}"
    db.upgrade(url)
    now = datetime.now(UTC)
    logs = [{"created_at": now - age, "model": "m", "channel_id": 1, "tenant_id": 1, "status_code": 200,
             "latency_ms": 5.0} for age in (timedelta(0), MINUTES_KEPT + timedelta(hours=2))]
    engine = db.make_engine(url)
    with engine.begin() as conn:
        conn.execute(insert(request_stats), rollup(logs))
        assert prune_minutes(conn, now) == 1
        left = conn.execute(select(request_stats.c.width, request_stats.c.start)).all()
    engine.dispose()
    assert sorted(width for width, _ in left) == [60, 3600, 3600]
