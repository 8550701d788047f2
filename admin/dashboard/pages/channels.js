// Channels: the upstreams the relay routes to. A table with per-row Test / Edit / Enable-Disable, "Test all",
// and one form for adding or editing a channel. A channel the relay auto-disabled (its credentials kept being
// refused) stands out, with the audit event that says when and why.
import { html, useState, useRef, useApi, useAction, Async, Field, ErrorBox, TableWrap } from "../ui.js";
import { post, patch, qs, splitList, intOrNull, ms, when } from "../api.js";

const TYPES = [["openai", "openai"], ["litellm", "litellm"], ["local", "local"]];
const BLANK = { name: "", type: "openai", base_url: "", api_key: "", models: "", priority: "0", weight: "1", max_inflight: "", litellm_model: "" };

export function Channels() {
  const list = useApi("/admin/channels");
  const [editing, setEditing] = useState(null); // a channel row, or null = the form adds a new one
  const [rowErrors, setRowErrors] = useState({});
  const [busyRow, setBusyRow] = useState(null);
  const [status, setStatus] = useState("");
  const formRef = useRef(null);

  async function rowAction(ch, what, fn) {
    setBusyRow(`${ch.id}:${what}`);
    setRowErrors((e) => ({ ...e, [ch.id]: null }));
    try {
      const out = await fn();
      list.reload();
      return out;
    } catch (err) {
      setRowErrors((e) => ({ ...e, [ch.id]: err }));
      return undefined;
    } finally {
      setBusyRow(null);
    }
  }

  const test = async (ch) => {
    const out = await rowAction(ch, "test", () => post(`/admin/channels/${ch.id}/test`));
    if (out) setStatus(`Test of ${out.name}: ${out.last_test_ok ? "ok" : `failed (${out.last_test_error || "no reason given"})`} in ${ms(out.last_test_latency_ms)}.`);
  };

  // One after the other: the channels may share an upstream, and 2 cores do not need a burst of tests.
  async function testAll() {
    const rows = list.data || [];
    let ok = 0;
    for (let i = 0; i < rows.length; i += 1) {
      setStatus(`Testing ${i + 1} of ${rows.length}: ${rows[i].name}…`);
      const out = await rowAction(rows[i], "test", () => post(`/admin/channels/${rows[i].id}/test`));
      if (out && out.last_test_ok) ok += 1;
    }
    setStatus(`Tested ${rows.length} channel${rows.length === 1 ? "" : "s"}: ${ok} ok, ${rows.length - ok} failed.`);
  }

  const toggle = (ch) => rowAction(ch, "status", () =>
    patch(`/admin/channels/${ch.id}`, { status: ch.status === "enabled" ? "disabled" : "enabled" }));

  function edit(ch) {
    setEditing(ch);
    requestAnimationFrame(() => formRef.current?.querySelector("h2")?.focus());
  }

  return html`<section aria-labelledby="page-title">
    <h1 id="page-title" tabindex="-1">Channels</h1>
    <div class="toolbar">
      <button type="button" onClick=${testAll} disabled=${!list.data?.length || busyRow !== null}>Test all</button>
      <button type="button" onClick=${list.reload}>Refresh</button>
    </div>
    <p class="status" role="status" aria-live="polite">${status}</p>
    <${Async} state=${list} label="channels" empty="No channels yet: add one below.">
      ${(rows) => html`<${TableWrap} label="Channels">
        <table>
          <thead><tr><th scope="col">Name</th><th scope="col">Type</th><th scope="col">Status</th>
            <th scope="col">Priority</th><th scope="col">Weight</th><th scope="col">Models</th>
            <th scope="col">Last test</th><th scope="col">Actions</th></tr></thead>
          <tbody>${rows.map((ch) => html`<tr key=${ch.id} class=${ch.status === "auto_disabled" ? "row-alert" : ""}>
            <th scope="row">${ch.name}</th>
            <td>${ch.type}</td>
            <td><${StatusCell} ch=${ch} /></td>
            <td>${ch.priority}</td>
            <td>${ch.weight}</td>
            <td class="models">${ch.models.join(", ")}</td>
            <td><${LastTest} ch=${ch} /></td>
            <td class="actions">
              <button type="button" onClick=${() => test(ch)} disabled=${busyRow !== null}>
                ${busyRow === `${ch.id}:test` ? "Testing…" : "Test"}</button>
              <button type="button" onClick=${() => edit(ch)}>Edit</button>
              <button type="button" onClick=${() => toggle(ch)} disabled=${busyRow !== null}>
                ${ch.status === "enabled" ? "Disable" : "Enable"}</button>
              <${ErrorBox} error=${rowErrors[ch.id]} />
            </td>
          </tr>`)}</tbody>
        </table>
      </${TableWrap}>`}
    </${Async}>
    <div ref=${formRef}>
      <${ChannelForm} key=${editing ? `edit-${editing.id}` : "new"} channel=${editing}
        onDone=${(saved) => { setEditing(null); setStatus(`Saved channel ${saved.name}.`); list.reload(); }}
        onCancel=${() => setEditing(null)} />
    </div>
  </section>`;
}

function StatusCell({ ch }) {
  if (ch.status !== "auto_disabled") return html`<span class=${`badge ${ch.status}`}>${ch.status}</span>`;
  return html`<span class="badge auto_disabled">⚠ auto-disabled</span><${AutoDisableReason} id=${ch.id} />`;
}

// The audit event the relay wrote when it disabled the channel: when, and its `after.reason`.
function AutoDisableReason({ id }) {
  const ev = useApi(`/admin/audit${qs({ entity: "channel", entity_id: id, action: "auto_disable", limit: 1 })}`);
  if (ev.loading) return html`<div class="small muted">Loading reason…</div>`;
  if (ev.error) return html`<div class="small error-text">Reason unavailable: ${ev.error.message}</div>`;
  const e = ev.data?.data?.[0];
  if (!e) return html`<div class="small muted">No audit event found.</div>`;
  const reason = e.after?.reason ?? JSON.stringify(e.after);
  return html`<div class="small auto-reason">Disabled ${when(e.created_at)} by ${e.actor}: ${reason}</div>`;
}

function LastTest({ ch }) {
  if (!ch.last_test_at) return html`<span class="muted">never</span>`;
  return html`<span class=${ch.last_test_ok ? "ok-text" : "error-text"}>
    ${ch.last_test_ok ? "✓ ok" : "✗ failed"}</span>, ${ms(ch.last_test_latency_ms)}
    ${ch.last_test_error ? html`<div class="small">${ch.last_test_error}</div>` : null}
    <div class="small muted">${when(ch.last_test_at)}</div>`;
}

function ChannelForm({ channel, onDone, onCancel }) {
  const init = channel
    ? { ...BLANK, name: channel.name, type: channel.type, base_url: channel.base_url || "", models: channel.models.join(", "),
        priority: String(channel.priority), weight: String(channel.weight),
        max_inflight: channel.max_inflight == null ? "" : String(channel.max_inflight), litellm_model: channel.options?.model || "" }
    : BLANK;
  const [f, setF] = useState(init);
  const action = useAction();
  const set = (k) => (v) => setF((s) => ({ ...s, [k]: v }));

  async function submit(e) {
    e.preventDefault();
    const body = { name: f.name.trim(), type: f.type, models: splitList(f.models) };
    const priority = intOrNull(f.priority);
    const weight = intOrNull(f.weight);
    if (priority !== null) body.priority = priority;
    if (weight !== null) body.weight = weight;
    const maxInflight = intOrNull(f.max_inflight);
    if (maxInflight !== null) body.max_inflight = maxInflight;
    else if (channel && channel.max_inflight != null) body.max_inflight = null; // cleared: no limit
    const baseUrl = f.base_url.trim();
    if (baseUrl) body.base_url = baseUrl;
    else if (channel && channel.base_url) body.base_url = null; // cleared on purpose
    if (f.api_key) body.api_key = f.api_key; // write-only: blank keeps the stored one
    if (f.type === "litellm" && f.litellm_model.trim()) body.options = { ...(channel?.options || {}), model: f.litellm_model.trim() };
    const saved = await action.run(() => (channel ? patch(`/admin/channels/${channel.id}`, body) : post("/admin/channels", body)));
    if (saved) {
      setF(BLANK);
      onDone(saved);
    }
  }

  const title = channel ? `Edit channel ${channel.name}` : "Add channel";
  const err = action.error;
  return html`<form class="card" onSubmit=${submit} aria-labelledby="channel-form-title" novalidate>
    <h2 id="channel-form-title" tabindex="-1">${title}</h2>
    <div class="grid">
      <${Field} label="Name" name="name" value=${f.name} onInput=${set("name")} error=${err} required />
      <${Field} kind="select" label="Type" name="type" value=${f.type} onInput=${set("type")} error=${err} options=${TYPES} />
      <${Field} label="Base URL" name="base_url" type="url" value=${f.base_url} onInput=${set("base_url")} error=${err}
                hint="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1" />
      <${Field} label="API key" name="api_key" type="password" value=${f.api_key} onInput=${set("api_key")} error=${err}
                autocomplete="new-password"
                hint=${channel ? (channel.has_api_key ? "A key is stored; leave blank to keep it." : "No key stored.") : "Write-only: stored encrypted, never shown again."} />
      <${Field} label="Models (comma separated)" name="models" value=${f.models} onInput=${set("models")} error=${err} required />
      ${f.type === "litellm" ? html`<${Field} label="LiteLLM model" name="options.model" value=${f.litellm_model}
                onInput=${set("litellm_model")} error=${err} hint="options.model, e.g. anthropic/claude-3-5-haiku-latest" />` : null}
      <${Field} label="Priority" name="priority" type="number" inputmode="numeric" value=${f.priority} onInput=${set("priority")} error=${err} />
      <${Field} label="Weight" name="weight" type="number" inputmode="numeric" value=${f.weight} onInput=${set("weight")} error=${err} />
      <${Field} label="Max in flight" name="max_inflight" type="number" inputmode="numeric" value=${f.max_inflight}
                onInput=${set("max_inflight")} error=${err} hint="Requests sent to it at once; beyond, the next channel or a 503. Blank = no limit" />
    </div>
    <${ErrorBox} error=${err} />
    <div class="buttons">
      <button type="submit" class="primary" disabled=${action.busy}>${channel ? "Save channel" : "Add channel"}</button>
      ${channel ? html`<button type="button" onClick=${onCancel}>Cancel</button>` : null}
    </div>
  </form>`;
}
