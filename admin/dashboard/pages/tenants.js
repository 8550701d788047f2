// Tenants & keys: tenants with their limits and token usage, a form to create one and to edit its limits;
// selecting a tenant lists its API keys, creates new ones (the secret is shown exactly once) and revokes them.
import { html, useState, useRef, useEffect, useApi, useAction, Async, Field, ErrorBox, TableWrap, UsageBar, ConfirmButton } from "../ui.js";
import { post, patch, del, qs, num, when, splitList, intOrNull } from "../api.js";

const PAGE = 1000; // the admin API's list page: beyond it, search

export function Tenants() {
  const [q, setQ] = useState("");
  const list = useApi(`/admin/tenants${qs({ q })}`);
  const [selected, setSelected] = useState(null); // tenant id whose keys are shown
  const [editing, setEditing] = useState(null); // tenant id whose limits are being edited
  const [rowErrors, setRowErrors] = useState({});
  const tenants = list.data || [];
  const current = tenants.find((t) => t.id === selected);
  const editRow = tenants.find((t) => t.id === editing);

  async function toggleStatus(t) {
    setRowErrors((e) => ({ ...e, [t.id]: null }));
    try {
      await patch(`/admin/tenants/${t.id}`, { status: t.status === "active" ? "disabled" : "active" });
      list.reload();
    } catch (err) {
      setRowErrors((e) => ({ ...e, [t.id]: err }));
    }
  }

  return html`<section aria-labelledby="page-title">
    <h1 id="page-title" tabindex="-1">Tenants & keys</h1>
    <form class="toolbar" role="search" onSubmit=${(e) => e.preventDefault()} aria-label="Tenant search">
      <${Field} label="Search tenants" name="q" type="search" value=${q} onInput=${setQ} />
    </form>
    <${Async} state=${list} label="tenants" empty=${q ? "No tenant name contains this." : "No tenants yet: create one below."}>
      ${(rows) => html`${rows.length >= PAGE ? html`<p class="muted small">The first ${PAGE.toLocaleString()} tenants:
        search to find the others.</p>` : null}<${TableWrap} label="Tenants">
        <table>
          <thead><tr><th scope="col">Name</th><th scope="col">Status</th><th scope="col">RPM</th><th scope="col">TPM</th>
            <th scope="col">Token quota</th><th scope="col">Used tokens</th><th scope="col">Actions</th></tr></thead>
          <tbody>${rows.map((t) => html`<tr key=${t.id} class=${t.id === selected ? "selected" : ""}>
            <th scope="row">${t.name} <span class="muted small">#${t.id}</span></th>
            <td><span class=${`badge ${t.status}`}>${t.status}</span></td>
            <td>${num(t.rpm)}</td><td>${num(t.tpm)}</td><td>${num(t.token_quota)}</td>
            <td><${UsageBar} used=${t.used_tokens} quota=${t.token_quota} label=${`${t.name} usage`} /></td>
            <td class="actions">
              <button type="button" aria-pressed=${t.id === selected ? "true" : "false"}
                      onClick=${() => setSelected(t.id === selected ? null : t.id)}>Keys</button>
              <button type="button" onClick=${() => setEditing(t.id)}>Edit limits</button>
              <button type="button" onClick=${() => toggleStatus(t)}>${t.status === "active" ? "Disable" : "Enable"}</button>
              <${ErrorBox} error=${rowErrors[t.id]} />
            </td>
          </tr>`)}</tbody>
        </table>
      </${TableWrap}>`}
    </${Async}>
    ${editRow ? html`<${LimitsForm} key=${editRow.id} tenant=${editRow}
        onDone=${() => { setEditing(null); list.reload(); }} onCancel=${() => setEditing(null)} />` : null}
    ${current ? html`<${Keys} key=${current.id} tenant=${current} onChange=${list.reload} />` : null}
    <${CreateTenant} onCreated=${(t) => { list.reload(); setSelected(t.id); }} />
  </section>`;
}

// rpm / tpm / token quota: blank means "no limit" (null); priority: blank means the default weight (1).
function limitsBody(f) {
  return { rpm: intOrNull(f.rpm), tpm: intOrNull(f.tpm), token_quota: intOrNull(f.token_quota),
           priority: intOrNull(f.priority) };
}

function CreateTenant({ onCreated }) {
  const blank = { name: "", rpm: "", tpm: "", token_quota: "", priority: "" };
  const [f, setF] = useState(blank);
  const action = useAction();
  const [done, setDone] = useState("");
  const set = (k) => (v) => setF((s) => ({ ...s, [k]: v }));
  async function submit(e) {
    e.preventDefault();
    setDone("");
    const body = { name: f.name.trim() };
    for (const [k, v] of Object.entries(limitsBody(f))) if (v !== null) body[k] = v;
    const t = await action.run(() => post("/admin/tenants", body));
    if (t) {
      setF(blank);
      setDone(`Created tenant ${t.name} (id ${t.id}).`);
      onCreated(t);
    }
  }
  return html`<form class="card" onSubmit=${submit} aria-labelledby="create-tenant-title" novalidate>
    <h2 id="create-tenant-title">Create tenant</h2>
    <div class="grid">
      <${Field} label="Tenant name" name="name" value=${f.name} onInput=${set("name")} error=${action.error} required />
      <${Field} label="RPM" name="rpm" type="number" value=${f.rpm} onInput=${set("rpm")} error=${action.error} hint="Requests per minute; blank = no limit" />
      <${Field} label="TPM" name="tpm" type="number" value=${f.tpm} onInput=${set("tpm")} error=${action.error} hint="Tokens per minute; blank = no limit" />
      <${Field} label="Token quota" name="token_quota" type="number" value=${f.token_quota} onInput=${set("token_quota")} error=${action.error} hint="Total tokens; blank = unlimited" />
      <${Field} label="Priority" name="priority" type="number" value=${f.priority} onInput=${set("priority")} error=${action.error} hint="Weight of its share of a busy relay, 1-1000; blank = 1" />
    </div>
    <${ErrorBox} error=${action.error} />
    <p role="status" class="status">${done}</p>
    <button type="submit" class="primary" disabled=${action.busy}>Create tenant</button>
  </form>`;
}

function LimitsForm({ tenant, onDone, onCancel }) {
  const str = (v) => (v === null || v === undefined ? "" : String(v));
  const [f, setF] = useState({ rpm: str(tenant.rpm), tpm: str(tenant.tpm), token_quota: str(tenant.token_quota),
                               priority: str(tenant.priority) });
  const action = useAction();
  const title = useRef(null);
  useEffect(() => title.current?.focus(), []);
  const set = (k) => (v) => setF((s) => ({ ...s, [k]: v }));
  async function submit(e) {
    e.preventDefault();
    if (await action.run(() => patch(`/admin/tenants/${tenant.id}`, limitsBody(f)))) onDone();
  }
  return html`<form class="card" onSubmit=${submit} aria-labelledby="limits-title" novalidate>
    <h2 id="limits-title" tabindex="-1" ref=${title}>Edit limits of ${tenant.name}</h2>
    <div class="grid">
      <${Field} label="RPM" name="rpm" type="number" value=${f.rpm} onInput=${set("rpm")} error=${action.error} hint="Blank = no limit" />
      <${Field} label="TPM" name="tpm" type="number" value=${f.tpm} onInput=${set("tpm")} error=${action.error} hint="Blank = no limit" />
      <${Field} label="Token quota" name="token_quota" type="number" value=${f.token_quota} onInput=${set("token_quota")} error=${action.error} hint="Blank = unlimited" />
      <${Field} label="Priority" name="priority" type="number" value=${f.priority} onInput=${set("priority")} error=${action.error} hint="Fair-share weight under load; blank = 1" />
    </div>
    <${ErrorBox} error=${action.error} />
    <div class="buttons">
      <button type="submit" class="primary" disabled=${action.busy}>Save limits</button>
      <button type="button" onClick=${onCancel}>Cancel</button>
    </div>
  </form>`;
}

function Keys({ tenant, onChange }) {
  const keys = useApi(`/admin/keys${qs({ tenant_id: tenant.id })}`);
  const [secret, setSecret] = useState(null); // the just-created key, shown once
  const [revokeErr, setRevokeErr] = useState(null);
  const [busy, setBusy] = useState(false);
  async function revoke(k) {
    setBusy(true);
    setRevokeErr(null);
    try {
      await del(`/admin/keys/${k.id}`);
      keys.reload();
    } catch (err) {
      setRevokeErr(err);
    } finally {
      setBusy(false);
    }
  }
  return html`<section class="card" aria-labelledby="keys-title">
    <h2 id="keys-title">Keys of ${tenant.name}</h2>
    <${ErrorBox} error=${revokeErr} />
    <${Async} state=${keys} label="keys" empty="This tenant has no keys yet.">
      ${(rows) => html`${rows.length >= PAGE ? html`<p class="muted small">The first ${PAGE.toLocaleString()} keys
        (GET /admin/keys pages on with ?after=).</p>` : null}<${TableWrap} label=${`Keys of ${tenant.name}`}>
        <table>
          <thead><tr><th scope="col">Name</th><th scope="col">Prefix</th><th scope="col">Status</th><th scope="col">Models</th>
            <th scope="col">Used / quota</th><th scope="col">Last used</th><th scope="col">Actions</th></tr></thead>
          <tbody>${rows.map((k) => html`<tr key=${k.id}>
            <th scope="row">${k.name}</th>
            <td><code>${k.prefix}</code></td>
            <td><span class=${`badge ${k.status}`}>${k.status}</span></td>
            <td class="models">${k.models ? k.models.join(", ") : html`<span class="muted">all</span>`}</td>
            <td><${UsageBar} used=${k.used_tokens} quota=${k.token_quota} label=${`${k.name} usage`} /></td>
            <td>${when(k.last_used_at)}</td>
            <td class="actions">${k.status === "active"
              ? html`<${ConfirmButton} label="Revoke" confirmLabel="Confirm revoke" prompt=${`Revoke key ${k.name}?`}
                        busy=${busy} onConfirm=${() => revoke(k)} />`
              : html`<span class="muted">—</span>`}</td>
          </tr>`)}</tbody>
        </table>
      </${TableWrap}>`}
    </${Async}>
    ${secret ? html`<${NewSecret} created=${secret} onDismiss=${() => setSecret(null)} />` : null}
    <${CreateKey} tenant=${tenant} onCreated=${(k) => { setSecret(k); keys.reload(); onChange(); }} />
  </section>`;
}

function CreateKey({ tenant, onCreated }) {
  const [f, setF] = useState({ name: "", models: "" });
  const action = useAction();
  const set = (k) => (v) => setF((s) => ({ ...s, [k]: v }));
  async function submit(e) {
    e.preventDefault();
    const body = { tenant_id: tenant.id, name: f.name.trim() || "default" };
    const models = splitList(f.models);
    if (models.length) body.models = models; // none = every model
    const k = await action.run(() => post("/admin/keys", body));
    if (k) {
      setF({ name: "", models: "" });
      onCreated(k);
    }
  }
  return html`<form onSubmit=${submit} aria-labelledby="create-key-title" novalidate>
    <h3 id="create-key-title">Create key</h3>
    <div class="grid">
      <${Field} label="Key name" name="name" value=${f.name} onInput=${set("name")} error=${action.error} />
      <${Field} label="Allowed models (comma separated, optional)" name="models" value=${f.models} onInput=${set("models")}
                error=${action.error} hint="Blank = every model" />
    </div>
    <${ErrorBox} error=${action.error} />
    <button type="submit" class="primary" disabled=${action.busy}>Create key</button>
  </form>`;
}

// The secret is only in this answer: the relay keeps its hash. Shown until dismissed, with a Copy button.
function NewSecret({ created, onDismiss }) {
  const [copied, setCopied] = useState("");
  const box = useRef(null);
  useEffect(() => box.current?.focus(), []);
  async function copy() {
    try {
      await navigator.clipboard.writeText(created.key);
      setCopied("Copied to the clipboard.");
    } catch {
      setCopied("Copying is not allowed here: select the key and copy it by hand.");
    }
  }
  return html`<div class="secret" role="region" aria-labelledby="secret-title" tabindex="-1" ref=${box}>
    <h3 id="secret-title">New API key: ${created.name}</h3>
    <p><code class="secret-value" data-testid="new-key">${created.key}</code></p>
    <p class="warn">Copy it now: this key will not be shown again.</p>
    <div class="buttons">
      <button type="button" class="primary" onClick=${copy}>Copy</button>
      <button type="button" onClick=${onDismiss}>Done</button>
    </div>
    <p role="status" class="status">${copied}</p>
  </div>`;
}
