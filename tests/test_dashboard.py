"""The dashboard in Debian's Chromium, driven by Playwright against a real `policy-relay serve`: an operator
signs in, creates a tenant and a key and copies it, the key is used with the openai SDK, the request shows up
in the log with its rewrites, a preset policy's playground shows the diff, a channel with refused
credentials is tested, auto-disabled by traffic and re-enabled, and the tenant signs in to see only its own
data. No page logs a console error; every page is saved as a screenshot (test-artifacts/dashboard/)."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import ADMIN_TOKEN, ROOT, Relay, add_fake_channel, database, run_relay

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
ADMIN_PAGES = {"overview": "Overview", "channels": "Channels", "tenants": "Tenants & keys", "policies": "Policies",
               "requests": "Requests", "cache": "Cache", "audit": "Audit"}
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (.ci/run installs it)")


@pytest.fixture(scope="module")
def relay(upstream, tmp_path_factory) -> Iterator[Relay]:
    tmp_dir = tmp_path_factory.mktemp("dashboard")
    with database("sqlite", tmp_dir) as url, run_relay(url, tmp_dir) as relay:
        add_fake_channel(relay, upstream[1], "fake", ["qwen1.5-7b"])
        yield relay


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield chromium
        chromium.close()


class Console:
    """Console errors, uncaught exceptions and requests to any other origin, from every page of a context."""

    def __init__(self, page, origin: str) -> None:
        self.problems: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text} @ {page.url}"))
        page.on("pageerror", lambda e: self.problems.append(f"uncaught: {e} @ {page.url}"))
        page.on("request", lambda r: r.url.startswith(origin) or self.problems.append(f"foreign request {r.url}"))


@pytest.fixture
def page(browser, relay):
    # bypass_csp: Playwright's wait_for_function polls with eval, which the dashboard's CSP refuses
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True, bypass_csp=True)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=relay.url)
    tab = context.new_page()
    tab.console = Console(tab, relay.url)
    yield tab
    context.close()


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _sign_in(page, relay: Relay, token: str, heading: str) -> None:
    page.goto(relay.url + "/dashboard/")
    page.get_by_label("Admin token or API key").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name=heading, level=1)).to_be_focused()


def _go(page, relay: Relay, route: str) -> None:
    target = f"{relay.url}/dashboard/#/{route}"
    if page.url == target:
        page.reload()  # the same hash would not load the page again
    else:
        page.goto(target)
    expect(page.get_by_role("heading", name=ADMIN_PAGES[route], level=1)).to_be_visible()
    page.wait_for_function("document.querySelectorAll('[aria-busy=\"true\"]').length === 0")


def test_an_operator_runs_the_relay_from_the_browser(page, relay, upstream):
    suffix = uuid.uuid4().hex[:6]
    _sign_in(page, relay, ADMIN_TOKEN, "Overview")
    assert page.evaluate("Object.keys(sessionStorage).length") == 1  # the token lives in sessionStorage only
    assert page.evaluate("localStorage.length") == 0

    # a tenant and a key, its secret shown once and copied
    page.get_by_role("link", name="Tenants & keys").click()
    tenant_form = page.get_by_role("form", name="Create tenant")
    tenant_form.get_by_label("Tenant name").fill(f"acme-{suffix}")
    tenant_form.get_by_label("Token quota").fill("100000")
    tenant_form.get_by_label("Priority").fill("3")
    tenant_form.get_by_role("button", name="Create tenant").click()
    expect(page.get_by_role("heading", name=f"Keys of acme-{suffix}")).to_be_visible()
    assert [t["priority"] for t in relay.ok("GET", f"/admin/tenants?q=acme-{suffix}")] == [3]
    tenant_form.get_by_label("Tenant name").fill(f"acme-{suffix}")  # taken: the API's own 409, inline
    tenant_form.get_by_role("button", name="Create tenant").click()
    expect(tenant_form.get_by_role("alert")).to_contain_text("conflicts with an existing one")
    key_form = page.get_by_role("form", name="Create key")
    key_form.get_by_label("Key name").fill("ci")
    key_form.get_by_role("button", name="Create key").click()
    shown = page.get_by_role("region", name="New API key: ci")
    expect(shown).to_be_visible()
    secret = shown.locator("code").inner_text().strip()
    assert secret.startswith("sk-")
    shown.get_by_role("button", name="Copy").click()
    expect(shown.get_by_role("status")).to_have_text("Copied to the clipboard.")
    assert page.evaluate("navigator.clipboard.readText()") == secret
    _shot(page, "tenants")
    # the tenant list is searched on the server (a page holds at most 1,000 tenants)
    page.get_by_label("Search tenants").fill(f"ACME-{suffix}")
    tenants = page.get_by_role("region", name="Tenants", exact=True)
    expect(tenants.locator("tbody tr")).to_have_count(1)
    expect(tenants.locator("tbody tr")).to_contain_text(f"acme-{suffix}")
    page.get_by_label("Search tenants").fill(f"no-such-{suffix}")
    expect(page.get_by_text("No tenant name contains this.")).to_be_visible()
    page.get_by_label("Search tenants").fill("")

    # a policy from the qwen1.5 preset, and the playground's diff for a temperature-0 request
    _go(page, relay, "policies")
    preset = page.get_by_role("form", name="Create from preset")
    preset.get_by_label("Preset").select_option("qwen1.5")
    preset.get_by_label("Model pattern").fill("qwen1.5-*")
    preset.get_by_role("button", name="Create policy").click()
    expect(preset.get_by_role("status")).to_contain_text("Created policy")
    page.get_by_role("row", name="qwen1.5-*").get_by_role("button", name="Edit").click()
    edit = page.get_by_role("form", name=re.compile(r"Edit policy #\d+"))
    edit.get_by_label("Temperature min").fill("-3")
    edit.get_by_role("button", name="Save policy").click()
    expect(edit.get_by_role("alert")).to_contain_text("rules.temperature.min")  # the field the API's 400 names
    expect(edit.get_by_label("Temperature min")).to_have_attribute("aria-invalid", "true")
    edit.get_by_role("button", name="Cancel").click()
    playground = page.get_by_role("form", name="Playground")
    playground.get_by_label("Request body").fill(
        '{"model": "qwen1.5-7b", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}')
    playground.get_by_role("button", name="Explain").click()
    diff = page.get_by_role("table", name="Request before and after the policy")
    expect(diff).to_be_visible()
    expect(page.locator(".matched")).to_contain_text("Matched policy")
    temperature = diff.get_by_role("row").filter(has_text=re.compile(r"^\s*temperature"))
    expect(temperature.first).to_contain_text("temperature.greedy_below")
    top_k = diff.get_by_role("row").filter(has_text=re.compile(r"^\s*top_k")).first
    expect(top_k).to_contain_text("added")
    expect(top_k).to_contain_text("greedy_as.top_k_one")
    _shot(page, "policies")

    # the key in the openai SDK, against the same server; the request appears in the log with its rewrites
    time.sleep(0.7)  # the config poll: the new key and policy reach the serving process
    client = openai.OpenAI(api_key=secret, base_url=relay.url + "/v1", max_retries=0)
    answer = client.chat.completions.with_raw_response.create(
        model="qwen1.5-7b", messages=[{"role": "user", "content": "hi"}], temperature=0)
    assert answer.headers["x-relay-rewrites"]
    relay.logs(relay.ok("GET", f"/admin/tenants?q=acme-{suffix}")[0]["id"])  # flushed
    _go(page, relay, "requests")
    page.get_by_role("button", name="Details").first.click()
    details = page.get_by_role("heading", name=re.compile(r"Request #\d+"))
    expect(details).to_be_focused()
    expect(page.locator(".details")).to_contain_text("temperature.greedy_below")
    expect(page.locator(".details")).to_contain_text("greedy_as.top_k_one")
    _shot(page, "requests")

    # a channel whose upstream refuses its credentials: tested, auto-disabled by traffic, re-enabled
    _go(page, relay, "channels")
    add = page.get_by_role("form", name="Add channel")
    add.get_by_label("Name").fill(f"refused-{suffix}")
    add.get_by_label("Type").select_option("openai")
    add.get_by_label("Base URL").fill(upstream[1])
    add.get_by_label("API key").fill("not-the-upstream-key")
    add.get_by_label("Models (comma separated)").fill(f"refused-model-{suffix}")
    add.get_by_label("Max in flight").fill("8")
    add.get_by_role("button", name="Add channel").click()
    row = page.get_by_role("row", name=f"refused-{suffix}")
    expect(row).to_be_visible()
    assert [c["max_inflight"] for c in relay.ok("GET", "/admin/channels") if c["name"] == f"refused-{suffix}"] == [8]
    row.get_by_role("button", name="Test", exact=True).click()
    expect(page.locator("p.status").first).to_contain_text(f"Test of refused-{suffix}")
    expect(row).to_contain_text("rejected the relay's credentials")
    time.sleep(0.7)
    for _ in range(3):
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model=f"refused-model-{suffix}", messages=[{"role": "user", "content": "x"}])
    deadline = time.time() + 5  # the disable is written off the request path
    while [c["status"] for c in relay.ok("GET", "/admin/channels") if c["name"] == f"refused-{suffix}"] != \
            ["auto_disabled"]:
        assert time.time() < deadline
        time.sleep(0.05)
    _go(page, relay, "channels")
    expect(row).to_contain_text("auto-disabled")
    expect(row.get_by_role("button", name="Enable")).to_be_visible()
    expect(page.get_by_text(re.compile(r"Disabled .* by relay"))).to_be_visible()
    _shot(page, "channels-auto-disabled")
    row.get_by_role("button", name="Enable").click()
    expect(row.get_by_role("button", name="Disable")).to_be_visible()
    assert [c["status"] for c in relay.ok("GET", "/admin/channels") if c["name"] == f"refused-{suffix}"] == ["enabled"]

    # every page, with no console error, as a screenshot
    for route in ADMIN_PAGES:
        _go(page, relay, route)
        _shot(page, route)
    page.set_viewport_size({"width": 360, "height": 780})
    _go(page, relay, "overview")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360  # usable at 360 px
    _shot(page, "overview-360px")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("Admin token or API key")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    # the two refusals above are logged by Chromium itself ("Failed to load resource"); nothing else may be
    expected = [p for p in page.console.problems if re.search(r"Failed to load resource.* (400|409)", p)]
    assert len(expected) == 2 and [p for p in page.console.problems if p not in expected] == []


def test_a_tenant_sees_only_its_own_usage(browser, relay):
    mine, theirs = relay.new_key(), relay.new_key()
    time.sleep(0.7)
    for key, n in ((mine, 2), (theirs, 3)):
        client = openai.OpenAI(api_key=key["key"], base_url=relay.url + "/v1", max_retries=0)
        for i in range(n):
            client.chat.completions.create(model="qwen1.5-7b", messages=[{"role": "user", "content": f"q{i}"}])
    relay.logs(mine["tenant_id"], want=2)
    relay.logs(theirs["tenant_id"], want=3)

    context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    tab = context.new_page()
    console = Console(tab, relay.url)
    _sign_in(tab, relay, mine["key"], "My usage")
    tab.wait_for_function("document.querySelectorAll('[aria-busy=\"true\"]').length === 0")
    recent = tab.get_by_role("table").filter(has=tab.get_by_role("button", name="Details"))
    expect(recent.get_by_role("button", name="Details")).to_have_count(2)
    nav_links = [a.inner_text() for a in tab.get_by_role("navigation").get_by_role("link").all()]
    assert nav_links == ["My usage"]
    _shot(tab, "tenant-my-usage")
    tab.goto(relay.url + "/dashboard/#/channels")  # an admin page by URL: still only its own view
    expect(tab.get_by_role("heading", name="My usage", level=1)).to_be_visible()
    expect(tab.get_by_role("heading", name="Channels", level=1)).to_have_count(0)
    assert console.problems == []
    context.close()
