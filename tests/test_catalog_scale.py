"""A catalog at ONE API scale: the indexed, memoised policy match agrees with the plain scan; a process that
reloads only what changed (deletes included) ends up with exactly what a full read gives; admin lists page and
filter; keys are made by the thousand; channels and policies export and import."""

from __future__ import annotations

import random
import uuid
from fnmatch import fnmatchcase

import httpx
import pytest
from sqlalchemy import text
from sqlmodel import Session

from admin import bulk, service
from admin.schemas import (
    ChannelCreate,
    ChannelUpdate,
    KeyBatch,
    KeyCreate,
    KeyUpdate,
    PolicyCreate,
    PolicyUpdate,
    TenantCreate,
    TenantUpdate,
)
from relay import db
from relay.catalog import Catalog, read_changes
from relay.policy import PolicyInfo, match
from relay.policy_index import MEMO_MAX, PolicyIndex, literal_prefix
from relay.policy_rules import Rules
from relay.secrets import resolve_box
from tests.conftest import SECRET_KEY, add_fake_channel, database, run_relay

RULES = Rules()


def test_the_index_answers_what_scanning_every_policy_answers():
    rng = random.Random(17)
    words = ["gpt", "qwen", "qwen1.5", "qwen2.5", "llama", "a", "ab", ""]
    patterns = []
    for _ in range(400):
        head = rng.choice(words)
        patterns.append(rng.choice([head, head + "*", head + "-*", "*" + head, head + "-?b", head + "[0-9]*",
                                    head + "-7b", "*", "[!q]*"]))
    policies = [PolicyInfo(i, 1, p, rng.choice([None, None, 1, 2]), rng.choice([0, 0, 1, 5]), RULES)
                for i, p in enumerate(patterns, 1)]
    index = PolicyIndex(policies)
    for _ in range(3000):
        model = rng.choice(words) + rng.choice(["", "-7b", "-ab", "-xb", "9", "-chat", "*"])
        tenant = rng.choice([None, 1, 2, 3])
        assert index.match(model, tenant) == match(policies, model, tenant), (model, tenant)
        assert index.match(model, tenant) == match(policies, model, tenant)  # the memoised answer too
    assert literal_prefix("qwen1.5-*") == "qwen1.5-" and literal_prefix("gpt-4") is None
    assert literal_prefix("a[bc]?*") == "a" and literal_prefix("*x") == ""
    assert all(fnmatchcase(m, p.model_pattern) for (m, _), p in index._memo.items() if p is not None)


def test_the_memo_is_bounded_against_endless_model_names():
    index = PolicyIndex([PolicyInfo(1, 1, "m-*", None, 0, RULES)])
    for i in range(MEMO_MAX + 10):
        index.match(f"junk-{i}", None)
    assert len(index._memo) <= MEMO_MAX
    assert index.match("m-1", None).id == 1


def _view(catalog: Catalog) -> dict:
    snap = catalog.snapshot
    return {"keys": snap.keys_by_hash, "tenants": snap.tenants,
            "channels": {i: (c.config.name, c.config.models, c.config.api_key) for i, c in snap.channels.items()},
            "by_model": {m: [c.config.id for c in cs] for m, cs in snap.channels_by_model.items()},
            "policies": [(p.id, p.version, p.model_pattern, p.tenant_id, p.rules) for p in snap.policies]}


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_process_that_reloads_only_changes_holds_what_a_full_read_gives(kind, tmp_path):
    with database(kind, tmp_path) as url:
        db.upgrade(url)
        engine = db.make_engine(url)
        box = resolve_box(url, SECRET_KEY)
        held = Catalog(engine, box)
        held.reload()
        rng = random.Random(3)
        ids: dict[str, list[int]] = {"tenant": [], "key": [], "channel": [], "policy": []}

        def write(s: Session, step: int) -> None:
            kind = rng.choice(["tenant", "key", "keys", "channel", "policy", "edit", "delete"]) if step > 3 else \
                ["tenant", "key", "channel", "policy"][step]
            if kind == "tenant" or not ids["tenant"]:
                ids["tenant"].append(service.create_tenant(s, TenantCreate(name=f"t{step}"), "test").id)
            elif kind == "key":
                ids["key"].append(service.create_key(s, KeyCreate(tenant_id=rng.choice(ids["tenant"])), "test")[0].id)
            elif kind == "keys":
                made = bulk.create_keys(s, KeyBatch(tenant_id=rng.choice(ids["tenant"]), count=20), "test")
                ids["key"] += [k.id for k, _ in made]
            elif kind == "channel":
                ids["channel"].append(service.create_channel(s, ChannelCreate(
                    name=f"c{step}", type="openai", base_url="http://127.0.0.1:9", api_key=f"k{step}",
                    models=[f"m{step % 5}", "shared"]), "test", box).id)
            elif kind == "policy":
                ids["policy"].append(service.create_policy(s, PolicyCreate(
                    model_pattern=rng.choice(["m*", "shared", f"m{step % 5}"]), rules=RULES,
                    tenant_id=rng.choice([None, *ids["tenant"]])), "test").id)
            elif kind == "edit":
                what = rng.choice([k for k in ids if ids[k]])
                row = rng.choice(ids[what])
                flip = rng.random() < 0.5
                if what == "tenant":
                    service.update_tenant(s, row, TenantUpdate(status="active" if flip else "disabled"), "test")
                elif what == "key":
                    service.update_key(s, row, KeyUpdate(rpm=step, status="active" if flip else "revoked"), "test")
                elif what == "channel" and rng.random() < 0.3:
                    service.auto_disable(s, row, "test")
                elif what == "channel":
                    service.update_channel(s, row, ChannelUpdate(api_key=f"new{step}",
                                                                 status="enabled" if flip else "disabled"), "test", box)
                else:
                    service.update_policy(s, row, PolicyUpdate(priority=step, enabled=flip), "test")
            else:
                what = rng.choice([k for k in ("tenant", "channel", "policy") if ids[k]] or ["tenant"])
                if ids[what]:
                    row = ids[what].pop(rng.randrange(len(ids[what])))
                    {"tenant": service.delete_tenant, "channel": service.delete_channel,
                     "policy": service.delete_policy}[what](s, row, "test")

        for step in range(120):
            with Session(engine, expire_on_commit=False) as s:
                try:
                    write(s, step)
                except Exception as exc:  # a 404 for a row a tenant delete took along is fine
                    assert getattr(exc, "status", None) == 404, exc
            if step % 7 == 0 or step > 110:
                held.reload_if_changed()
                fresh = Catalog(engine, box)
                fresh.reload()
                assert _view(held) == _view(fresh), f"after step {step}"
                assert held.version == fresh.version
        # What the last reload read: the rows of one write, not the catalog.
        with Session(engine, expire_on_commit=False) as s:
            service.create_key(s, KeyCreate(tenant_id=service.create_tenant(s, TenantCreate(name="last"), "t").id), "t")
        changes = read_changes(engine, held.version)
        assert (len(changes.keys), len(changes.tenants), len(changes.channels), len(changes.policies)) == (1, 1, 0, 0)
        assert len(held.snapshot.keys_by_hash) > 100
        engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_version_that_went_back_or_a_write_that_stamped_nothing_means_a_full_read(kind, tmp_path):
    """A restored backup (the version goes back) and a write by a process of an older release (a bump, no stamped
    row) are both seen: the reload reads everything then."""
    with database(kind, tmp_path) as url:
        db.upgrade(url)
        engine = db.make_engine(url)
        box = resolve_box(url, SECRET_KEY)
        held = Catalog(engine, box)
        with Session(engine, expire_on_commit=False) as s:
            tenant = service.create_tenant(s, TenantCreate(name="before"), "t")
            for i in range(3):
                service.create_tenant(s, TenantCreate(name=f"other-{i}"), "t")
        held.reload()
        with engine.begin() as conn:  # an older release's write: the row changes, nothing is stamped
            conn.execute(text("UPDATE tenants SET name = 'by-hand' WHERE id = :i"), {"i": tenant.id})
            conn.execute(text("UPDATE relay_state SET config_version = config_version + 1"))
        assert held.reload_if_changed() and held.snapshot.tenants[tenant.id].name == "by-hand"
        with engine.begin() as conn:  # restored from a backup taken three edits ago
            conn.execute(text("UPDATE relay_state SET config_version = config_version - 3"))
        with Session(engine, expire_on_commit=False) as s:
            service.update_tenant(s, tenant.id, TenantUpdate(name="after"), "t")
        assert held.reload_if_changed() and held.snapshot.tenants[tenant.id].name == "after"
        engine.dispose()


def test_admin_lists_page_and_filter(relay):
    tenant = relay.ok("POST", "/admin/tenants", {"name": f"paged-{uuid.uuid4().hex[:8]}"})
    made = relay.ok("POST", "/admin/keys/batch", {"tenant_id": tenant["id"], "count": 25, "name": "cls"})["data"]
    relay.ok("DELETE", f"/admin/keys/{made[3]['id']}")
    seen, after, pages = [], None, 0
    while True:
        query = f"/admin/keys?tenant_id={tenant['id']}&limit=10" + (f"&after={after}" if after else "")
        response = relay.admin("GET", query)
        assert response.status_code == 200
        seen += response.json()
        pages += 1
        after = response.headers.get("x-next-cursor")
        if after is None:
            assert "link" not in response.headers
            break
        assert response.headers["link"].endswith(f'after={after}>; rel="next"')
    assert pages == 3 and [k["id"] for k in seen] == [k["id"] for k in made]
    revoked = relay.ok("GET", f"/admin/keys?tenant_id={tenant['id']}&status=revoked")
    assert [k["id"] for k in revoked] == [made[3]["id"]]
    assert [k["name"] for k in relay.ok("GET", f"/admin/keys?tenant_id={tenant['id']}&q=CLS-2")] == \
        ["cls-2"] + [f"cls-{i}" for i in range(20, 26)]
    assert [t["id"] for t in relay.ok("GET", f"/admin/tenants?q={tenant['name'].upper()}")] == [tenant["id"]]
    assert relay.ok("GET", "/admin/tenants?q=%25") == []  # `%` is a character, not a wildcard
    for query in ("/admin/keys?limit=0", "/admin/keys?limit=1001", "/admin/keys?after=-1", "/admin/keys?status=x",
                  "/admin/channels?status=on", "/admin/policies?enabled=maybe", "/admin/tenants?q=" + "x" * 201):
        assert relay.admin("GET", query).status_code == 400, query
    name = f"pg-{uuid.uuid4().hex[:6]}"
    add_fake_channel(relay, "http://127.0.0.1:9", name, ["m"], status="disabled")
    assert [c["name"] for c in relay.ok("GET", f"/admin/channels?status=disabled&type=openai&q={name}")] == [name]
    policy = relay.ok("POST", "/admin/policies", {"model_pattern": name, "rules": {}, "tenant_id": tenant["id"],
                                                   "enabled": False})
    assert [p["id"] for p in relay.ok("GET", f"/admin/policies?tenant_id={tenant['id']}&enabled=false")] == \
        [policy["id"]]


def test_keys_made_by_the_thousand_each_work_and_are_shown_once(relay):
    tenant = relay.ok("POST", "/admin/tenants", {"name": f"batch-{uuid.uuid4().hex[:8]}"})
    answer = relay.ok("POST", "/admin/keys/batch", {"tenant_id": tenant["id"], "count": 1000, "name": "class",
                                                     "rpm": 30, "models": ["gpt-x"]})["data"]
    assert len(answer) == 1000 and len({k["key"] for k in answer}) == 1000
    assert all(k["rpm"] == 30 and k["models"] == ["gpt-x"] and k["key"].startswith(k["prefix"]) for k in answer)
    for made in (answer[0], answer[-1]):
        models = httpx.get(relay.url + "/v1/models", headers={"Authorization": f"Bearer {made['key']}"})
        assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == ["gpt-x"]
    listed = relay.ok("GET", f"/admin/keys?tenant_id={tenant['id']}")
    assert len(listed) == 1000 and "key" not in listed[0]
    events = [e for e in relay.ok("GET", "/admin/audit?entity=api_key")["data"]
              if (e["after"] or {}).get("tenant_id") == tenant["id"] and (e["after"] or {}).get("batch")]
    assert len(events) == 1 and events[0]["after"]["ids"] == [k["id"] for k in answer]
    for body in ({"tenant_id": tenant["id"], "count": 1001}, {"tenant_id": tenant["id"], "count": 0},
                 {"tenant_id": tenant["id"], "count": 2, "secret": "x"},
                 {"tenant_id": tenant["id"], "count": 1000, "models": [f"m{i}" for i in range(101)]}):
        assert relay.admin("POST", "/admin/keys/batch", body).status_code == 400, body
    assert relay.admin("POST", "/admin/keys/batch", {"tenant_id": 2**31 - 2, "count": 2}).status_code == 404


def test_channels_and_policies_export_and_import_into_a_new_deployment(relay, upstream, tmp_path):
    name = f"exp-{uuid.uuid4().hex[:6]}"
    add_fake_channel(relay, upstream[1], name, [f"{name}-m"], model_mapping={f"{name}-m": "up-x"},
                     options={"extra_headers": {"Authorization": "Bearer hidden"}})
    relay.ok("POST", "/admin/policies", {"model_pattern": f"{name}-*", "preset": "qwen1.5"})
    exported = relay.ok("GET", "/admin/export")
    assert exported["format"] == "policy-relay/1"
    mine = [c for c in exported["channels"] if c["name"] == name]
    assert mine and "api_key" not in mine[0] and mine[0]["options"]["extra_headers"] == "***"
    ours = {"format": "policy-relay/1", "channels": mine,
            "policies": [p for p in exported["policies"] if p["model_pattern"] == f"{name}-*"]}
    with run_relay(f"sqlite:///{tmp_path / 'copy.db'}", tmp_path) as copy:
        assert copy.ok("POST", "/admin/import", ours) == {"channels_created": 1, "policies_created": 1}
        assert copy.ok("POST", "/admin/import", ours) == {"channels_updated": 1, "policies_updated": 1}
        channel = copy.ok("GET", "/admin/channels")[0]
        assert (channel["name"], channel["models"], channel["model_mapping"]) == (name, [f"{name}-m"],
                                                                                 {f"{name}-m": "up-x"})
        assert channel["has_api_key"] is False and channel["options"] == {}
        policy = copy.ok("GET", "/admin/policies")[0]
        assert policy["rules"] == ours["policies"][0]["rules"] and policy["version"] == 2
        # Give the copy its key: it serves the model under the imported policy.
        copy.ok("PATCH", f"/admin/channels/{channel['id']}", {"api_key": "upstream-secret"})
        key = copy.new_key()["key"]
        answer = httpx.post(copy.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                            json={"model": f"{name}-m", "messages": [{"role": "user", "content": "hi"}],
                                  "temperature": 0})
        assert answer.status_code == 200 and answer.headers["x-relay-policy"] == f"{policy['id']}@2"
        # Re-importing keeps the key the copy was given; a policy for a tenant it lacks is a 400, and nothing lands.
        copy.ok("POST", "/admin/import", ours)
        assert copy.ok("GET", "/admin/channels")[0]["has_api_key"] is True
        bad = {"policies": [{"model_pattern": "z", "rules": {}}, {"model_pattern": "y", "rules": {},
                                                                  "tenant_id": 999}]}
        refused = copy.admin("POST", "/admin/import", bad)
        assert refused.status_code == 400 and "policies.1" in refused.json()["error"]["message"]
        assert not any(p["model_pattern"] == "z" for p in copy.ok("GET", "/admin/policies"))
        invalid = copy.admin("POST", "/admin/import", {"channels": [{"name": "x", "type": "nope", "models": ["m"]}]})
        assert invalid.status_code == 400 and "channels.0.type" in invalid.json()["error"]["message"]
        twice = copy.admin("POST", "/admin/import", {"channels": mine + mine})
        assert twice.status_code == 400 and "appears twice" in twice.json()["error"]["message"]
        # A tenant's policy follows its tenant by name: ids differ between deployments.
        tenant = relay.ok("POST", "/admin/tenants", {"name": f"exp-t-{uuid.uuid4().hex[:6]}"})
        relay.ok("POST", "/admin/policies", {"model_pattern": f"{name}-t", "rules": {}, "tenant_id": tenant["id"]})
        theirs = [p for p in relay.ok("GET", "/admin/export")["policies"] if p["model_pattern"] == f"{name}-t"]
        assert theirs[0]["tenant_name"] == tenant["name"]
        missing = copy.admin("POST", "/admin/import", {"policies": theirs})
        assert missing.status_code == 400 and "no tenant named" in missing.json()["error"]["message"]
        if copy.ok("POST", "/admin/tenants", {"name": "first-here"})["id"] + 1 == tenant["id"]:
            copy.ok("POST", "/admin/tenants", {"name": "second-here"})  # the same name under another id here
        here = copy.ok("POST", "/admin/tenants", {"name": tenant["name"]})
        assert here["id"] != tenant["id"]
        copy.ok("POST", "/admin/import", {"policies": theirs})
        assert [p["tenant_id"] for p in copy.ok("GET", f"/admin/policies?q={name}-t")] == [here["id"]]
