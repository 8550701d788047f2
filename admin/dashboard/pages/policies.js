// Policies: the per-model sampling rules. A table; "Create from preset"; editing one policy's rules (JSON,
// with the common temperature bounds as plain fields kept in step with it); its audit history; and the
// Playground, which asks /admin/policies/explain what the relay would do to a request and shows it as a diff.
import { html, useState, useRef, useEffect, useApi, useAction, Async, Field, ErrorBox, TableWrap, Diff, Empty, diffKeys } from "../ui.js";
import { post, patch, qs, show, when, intOrNull } from "../api.js";

const TEMP_KEYS = [["min", "Temperature min"], ["max", "Temperature max"], ["default", "Temperature default"], ["greedy_below", "Greedy below"]];

export function Policies() {
  const list = useApi("/admin/policies");
  const [editing, setEditing] = useState(null);
  const [history, setHistory] = useState(null);
  const rows = list.data || [];
  const editRow = rows.find((p) => p.id === editing);
  const historyRow = rows.find((p) => p.id === history);
  return html`<section aria-labelledby="page-title">
    <h1 id="page-title" tabindex="-1">Policies</h1>
    <${Async} state=${list} label="policies" empty="No policies yet: requests pass unchanged. Create one from a preset below.">
      ${(data) => html`<${TableWrap} label="Policies">
        <table>
          <thead><tr><th scope="col">ID</th><th scope="col">Model pattern</th><th scope="col">Tenant</th><th scope="col">Priority</th>
            <th scope="col">Version</th><th scope="col">Enabled</th><th scope="col">Actions</th></tr></thead>
          <tbody>${data.map((p) => html`<tr key=${p.id} class=${p.id === editing || p.id === history ? "selected" : ""}>
            <td>${p.id}</td>
            <th scope="row"><code>${p.model_pattern}</code></th>
            <td>${p.tenant_id ?? html`<span class="muted">all</span>`}</td>
            <td>${p.priority}</td><td>${p.version}</td>
            <td>${p.enabled ? "yes" : html`<span class="badge disabled">no</span>`}</td>
            <td class="actions">
              <button type="button" onClick=${() => setEditing(p.id)}>Edit</button>
              <button type="button" aria-pressed=${p.id === history ? "true" : "false"}
                      onClick=${() => setHistory(p.id === history ? null : p.id)}>History</button>
            </td>
          </tr>`)}</tbody>
        </table>
      </${TableWrap}>`}
    </${Async}>
    ${editRow ? html`<${EditPolicy} key=${`${editRow.id}@${editRow.version}`} policy=${editRow}
        onDone=${() => { setEditing(null); list.reload(); }} onCancel=${() => setEditing(null)} />` : null}
    ${historyRow ? html`<${History} key=${`${historyRow.id}@${historyRow.version}`} policy=${historyRow} />` : null}
    <${CreateFromPreset} onCreated=${list.reload} />
    <${Playground} />
  </section>`;
}

function CreateFromPreset({ onCreated }) {
  const presets = useApi("/admin/policies/presets");
  const names = Object.keys(presets.data || {});
  const [f, setF] = useState({ preset: "", model_pattern: "", tenant_id: "", priority: "0" });
  const action = useAction();
  const [done, setDone] = useState("");
  const set = (k) => (v) => setF((s) => ({ ...s, [k]: v }));
  const preset = f.preset || names[0] || "";
  async function submit(e) {
    e.preventDefault();
    setDone("");
    const body = { model_pattern: f.model_pattern.trim(), preset, priority: intOrNull(f.priority) ?? 0 };
    const tenant = intOrNull(f.tenant_id);
    if (tenant !== null) body.tenant_id = tenant;
    const p = await action.run(() => post("/admin/policies", body));
    if (p) {
      setDone(`Created policy #${p.id} for ${p.model_pattern} from ${preset}.`);
      setF((s) => ({ ...s, model_pattern: "", tenant_id: "" }));
      onCreated();
    }
  }
  return html`<form class="card" onSubmit=${submit} aria-labelledby="preset-title" novalidate>
    <h2 id="preset-title">Create from preset</h2>
    ${presets.error ? html`<${ErrorBox} error=${presets.error} prefix="Could not load presets" />` : null}
    <div class="grid">
      <${Field} kind="select" label="Preset" name="preset" value=${preset} onInput=${set("preset")} error=${action.error}
                options=${names.length ? names.map((n) => [n, n]) : [["", presets.loading ? "Loading…" : "No presets"]]} />
      <${Field} label="Model pattern" name="model_pattern" value=${f.model_pattern} onInput=${set("model_pattern")}
                error=${action.error} required hint="A glob, e.g. qwen1.5-*" />
      <${Field} label="Tenant id (optional)" name="tenant_id" type="number" value=${f.tenant_id} onInput=${set("tenant_id")}
                error=${action.error} hint="Blank = every tenant" />
      <${Field} label="Priority" name="priority" type="number" value=${f.priority} onInput=${set("priority")} error=${action.error} />
    </div>
    ${preset && presets.data ? html`<details><summary>Rules of ${preset}</summary>
      <pre class="json">${JSON.stringify(presets.data[preset], null, 2)}</pre></details>` : null}
    <${ErrorBox} error=${action.error} />
    <p role="status" class="status">${done}</p>
    <button type="submit" class="primary" disabled=${action.busy || !preset}>Create policy</button>
  </form>`;
}

const pretty = (v) => JSON.stringify(v, null, 2);
const tempOf = (rules) => {
  const t = (rules && rules.temperature) || {};
  return Object.fromEntries(TEMP_KEYS.map(([k]) => [k, t[k] === undefined || t[k] === null ? "" : String(t[k])]));
};
// Writes the four simple temperature fields into a rules object; blank removes the bound.
function withTemp(rules, temp) {
  const t = { ...(rules.temperature || {}) };
  for (const [k] of TEMP_KEYS) {
    const v = String(temp[k]).trim();
    if (v === "") delete t[k];
    else t[k] = Number.isNaN(Number(v)) ? v : Number(v); // a non-number goes as sent: the relay names it
  }
  const out = { ...rules, temperature: t };
  if (!Object.keys(t).length) delete out.temperature;
  return out;
}

function EditPolicy({ policy, onDone, onCancel }) {
  const [json, setJson] = useState(pretty(policy.rules));
  const [temp, setTemp] = useState(tempOf(policy.rules));
  const [enabled, setEnabled] = useState(policy.enabled);
  const action = useAction();
  const title = useRef(null);
  useEffect(() => title.current?.focus(), []);

  const parse = (text) => {
    try {
      const r = JSON.parse(text);
      return r && typeof r === "object" && !Array.isArray(r) ? r : null;
    } catch {
      return null;
    }
  };
  const onJson = (v) => {
    setJson(v);
    const r = parse(v);
    if (r) setTemp(tempOf(r));
  };
  const onTemp = (k) => (v) => {
    const t = { ...temp, [k]: v };
    setTemp(t);
    const r = parse(json);
    if (r) setJson(pretty(withTemp(r, t)));
  };

  async function submit(e) {
    e.preventDefault();
    const rules = parse(json);
    if (!rules) {
      action.setError({ message: "Rules must be a JSON object.", param: "rules" });
      return;
    }
    if (await action.run(() => patch(`/admin/policies/${policy.id}`, { rules, enabled }))) onDone();
  }
  const err = action.error;
  return html`<form class="card" onSubmit=${submit} aria-labelledby="edit-policy-title" novalidate>
    <h2 id="edit-policy-title" tabindex="-1" ref=${title}>Edit policy #${policy.id} (${policy.model_pattern}, version ${policy.version})</h2>
    <div class="grid">
      ${TEMP_KEYS.map(([k, label]) => html`<${Field} key=${k} label=${label} name=${`rules.temperature.${k}`} type="number"
                step="any" value=${temp[k]} onInput=${onTemp(k)} error=${err} />`)}
    </div>
    <${Field} kind="textarea" label="Rules (JSON)" name="rules" value=${json} onInput=${onJson} error=${err} rows="14"
              spellcheck="false" class="code" hint="The whole rules object; the fields above edit its temperature part." />
    <${Field} type="checkbox" label="Enabled" name="enabled" value=${enabled} onInput=${setEnabled} error=${err} />
    <${ErrorBox} error=${err} />
    <div class="buttons">
      <button type="submit" class="primary" disabled=${action.busy}>Save policy</button>
      <button type="button" onClick=${onCancel}>Cancel</button>
    </div>
  </form>`;
}

function History({ policy }) {
  const events = useApi(`/admin/audit${qs({ entity: "policy", entity_id: policy.id, limit: 50 })}`);
  return html`<section class="card" aria-labelledby="history-title">
    <h2 id="history-title">History of policy #${policy.id}</h2>
    <${Async} state=${events} label="history" empty="No audit events for this policy." isEmpty=${(d) => !d.data.length}>
      ${(d) => html`<ol class="history">${d.data.map((ev) => html`<li key=${ev.id}>
        <div><strong>${ev.action}</strong> by ${ev.actor}, ${when(ev.created_at)}</div>
        <${Diff} before=${flattenRules(ev.before)} after=${flattenRules(ev.after)} />
      </li>`)}</ol>`}
    </${Async}>
  </section>`;
}

// "rules.temperature.min" reads better in a diff than one changed "rules" blob.
function flattenRules(obj) {
  if (!obj) return obj;
  const out = {};
  const walk = (prefix, v) => {
    if (v && typeof v === "object" && !Array.isArray(v) && Object.keys(v).length) {
      for (const [k, x] of Object.entries(v)) walk(`${prefix}.${k}`, x);
    } else out[prefix] = v;
  };
  for (const [k, v] of Object.entries(obj)) {
    if (k === "rules") walk("rules", v);
    else out[k] = v;
  }
  return out;
}

const SAMPLE = `{
  "model": "qwen1.5-7b",
  "messages": [{"role": "user", "content": "hi"}],
  "temperature": 0
}`;

function Playground() {
  const [body, setBody] = useState(SAMPLE);
  const [tenant, setTenant] = useState("");
  const [task, setTask] = useState("");
  const [result, setResult] = useState(null);
  const action = useAction();

  async function submit(e) {
    e.preventDefault();
    setResult(null);
    let req;
    try {
      req = JSON.parse(body);
    } catch (err) {
      action.setError({ message: `The request body is not valid JSON: ${err.message}`, param: "request" });
      return;
    }
    const payload = { request: req };
    const t = intOrNull(tenant);
    if (t !== null) payload.tenant_id = t;
    if (task.trim()) payload.task = task.trim();
    const out = await action.run(() => post("/admin/policies/explain", payload));
    if (out) setResult({ before: out.normalised ?? req, out });  // another API's body: diffed in chat's names
  }

  return html`<section class="card" aria-labelledby="playground-title">
    <h2 id="playground-title">Playground</h2>
    <form onSubmit=${submit} aria-labelledby="playground-title" novalidate>
      <${Field} kind="textarea" label="Request body" name="request" value=${body} onInput=${setBody} error=${action.error}
                rows="8" spellcheck="false" class="code" />
      <div class="grid">
        <${Field} label="Explain for tenant id" name="tenant_id" type="number" value=${tenant} onInput=${setTenant}
                  error=${action.error} hint="Optional: a tenant's own policies beat global ones" />
        <${Field} label="Task" name="task" value=${task} onInput=${setTask} error=${action.error}
                  hint="Optional, as X-Relay-Task: json, tools, code, chat…" />
      </div>
      <${ErrorBox} error=${action.error} />
      <button type="submit" class="primary" disabled=${action.busy}>Explain</button>
    </form>
    ${result ? html`<${Explained} before=${result.before} out=${result.out} />` : null}
  </section>`;
}

// Per top-level parameter: removed / added / changed between the request sent and the one the relay would
// send, with the rule that did it (from `rewrites`; several rewrites of one parameter are joined).
function Explained({ before, out }) {
  const rules = {};
  for (const r of out.rewrites || []) rules[r.param] = rules[r.param] ? `${rules[r.param]}, ${r.rule}` : r.rule;
  const rows = diffKeys(before, out.request);
  return html`<div class="explain" aria-live="polite">
    <h3>Result</h3>
    <p class="matched">${out.policy
      ? html`Matched policy <strong>${out.policy}</strong>, task <strong>${out.task}</strong>.`
      : html`No policy matched: the request is sent unchanged (task <strong>${out.task}</strong>).`}</p>
    ${rows.length ? html`<${TableWrap} label="Request diff">
      <table class="diff-table">
        <caption>Request before and after the policy</caption>
        <thead><tr><th scope="col">Parameter</th><th scope="col">Change</th><th scope="col">Before</th><th scope="col">After</th><th scope="col">Rule</th></tr></thead>
        <tbody>${rows.map((r) => html`<tr key=${r.key} class=${r.kind}>
          <th scope="row"><code>${r.key}</code></th>
          <td><span class=${`tag ${r.kind}`}>${r.kind}</span></td>
          <td><code>${r.kind === "added" ? "unset" : show(r.before)}</code></td>
          <td><code>${r.kind === "removed" ? "unset" : show(r.after)}</code></td>
          <td>${rules[r.key] ? html`<code>${rules[r.key]}</code>` : html`<span class="muted">—</span>`}</td>
        </tr>`)}</tbody>
      </table></${TableWrap}>` : html`<${Empty}>No parameter changes.</${Empty}>`}
    ${(out.notes || []).length ? html`<h4>Notes</h4><ul class="notes">${out.notes.map((n) => html`<li>${noteText(n)}</li>`)}</ul>` : null}
    <details><summary>Final request</summary><pre class="json">${pretty(out.request)}</pre></details>
  </div>`;
}

function noteText(n) {
  if (typeof n === "string") return n;
  const head = [n.param, n.rule].filter(Boolean).join(" · ");
  const applied = n.applied === false ? "not applied" : n.applied === true ? "applied" : "";
  return [head, applied, n.why || n.message || ""].filter(Boolean).join(": ");
}
