// The request-log table and a row's details, shared by the admin Requests page and the tenant's My usage
// page (both APIs return the same row shape), plus cursor paging with a stack for "Previous page".
import { html, useState, useRef, useEffect, TableWrap, Empty } from "../ui.js";
import { num, ms, when, show } from "../api.js";

const statusClass = (c) => (c >= 500 ? "s5" : c >= 400 ? "s4" : "s2");

// Cursor paging: `cursor` is what to send now; next() pushes the answer's next_cursor, previous() pops.
export function usePager() {
  const [stack, setStack] = useState([]);
  return {
    cursor: stack.length ? stack[stack.length - 1] : undefined,
    page: stack.length + 1,
    next: (c) => setStack((s) => [...s, c]),
    previous: () => setStack((s) => s.slice(0, -1)),
    reset: () => setStack([]),
  };
}

export function Pager({ pager, nextCursor }) {
  return html`<nav class="pager" aria-label="Pages">
    <button type="button" onClick=${pager.previous} disabled=${pager.page === 1}>Previous page</button>
    <span>Page ${pager.page}</span>
    <button type="button" onClick=${() => pager.next(nextCursor)} disabled=${!nextCursor}>Next page</button>
  </nav>`;
}

// showChannel=false for tenants: which upstream served them is the operator's business (and not in their rows).
export function LogTable({ rows, channelName = (id) => id, label = "Requests", showChannel = true }) {
  const [open, setOpen] = useState(null);
  const row = rows.find((r) => r.id === open);
  if (!rows.length) return html`<${Empty}>No requests match.</${Empty}>`;
  return html`
    <${TableWrap} label=${label}>
      <table class="logs">
        <thead><tr><th scope="col">Time</th><th scope="col">Model</th>${showChannel ? html`<th scope="col">Channel</th>` : null}<th scope="col">Status</th>
          <th scope="col">Tokens</th><th scope="col">Latency ms</th><th scope="col">Cache</th><th scope="col">Rewritten</th>
          <th scope="col">Details</th></tr></thead>
        <tbody>${rows.map((r) => html`<tr key=${r.id} class=${r.id === open ? "selected" : ""}>
          <td class="nowrap">${when(r.created_at)}</td>
          <td>${r.model}${r.upstream_model && r.upstream_model !== r.model ? html`<div class="small muted">→ ${r.upstream_model}</div>` : null}</td>
          ${showChannel ? html`<td>${r.channel_id === null || r.channel_id === undefined ? "—" : channelName(r.channel_id)}</td>` : null}
          <td><span class=${`code ${statusClass(r.status_code)}`}>${r.status_code}</span></td>
          <td>${num(r.total_tokens)}</td>
          <td>${num(r.latency_ms === null || r.latency_ms === undefined ? null : Math.round(r.latency_ms))}</td>
          <td>${r.cache || "—"}</td>
          <td>${(r.rewrites || []).length}</td>
          <td><button type="button" aria-expanded=${r.id === open ? "true" : "false"}
                      onClick=${() => setOpen(r.id === open ? null : r.id)}>
            ${r.id === open ? "Hide" : "Details"}<span class="visually-hidden"> of request ${r.id}</span></button></td>
        </tr>`)}</tbody>
      </table>
    </${TableWrap}>
    ${row ? html`<${LogDetails} key=${row.id} row=${row} channelName=${channelName} showChannel=${showChannel}
                                onClose=${() => setOpen(null)} />` : null}`;
}

function LogDetails({ row, channelName, showChannel, onClose }) {
  const title = useRef(null);
  useEffect(() => title.current?.focus(), []);
  const rewrites = row.rewrites || [];
  const dl = (pairs) => html`<dl class="kv">${pairs.map(([k, v]) => html`<dt>${k}</dt><dd>${v}</dd>`)}</dl>`;
  return html`<section class="card details" aria-labelledby="log-details-title">
    <h2 id="log-details-title" tabindex="-1" ref=${title}>Request #${row.id}</h2>
    <div class="details-grid">
      <div><h3>Request</h3>${dl([
        ["Time", when(row.created_at)], ["Endpoint", row.endpoint || "—"], ["Model", row.model],
        ...(showChannel ? [["Upstream model", row.upstream_model || "—"],
          ["Channel", row.channel_id === null || row.channel_id === undefined ? "—" : channelName(row.channel_id)]] : []),
        ["Stream", row.stream ? "yes" : "no"], ["Tenant", row.tenant_id ?? "—"], ["Key", row.key_id ?? "—"],
      ])}</div>
      <div><h3>Outcome</h3>${dl([
        ["Status", row.status_code], ["Error type", row.error_type || "—"], ["Cache", row.cache || "—"],
        ["Policy", row.policy || "none"],
      ])}</div>
      <div><h3>Timings</h3>${dl([["Latency", ms(row.latency_ms)]])}</div>
      <div><h3>Usage</h3>${dl([
        ["Prompt tokens", num(row.prompt_tokens)], ["Completion tokens", num(row.completion_tokens)],
        ["Total tokens", num(row.total_tokens)],
      ])}</div>
    </div>
    <h3>Rewrites</h3>
    ${rewrites.length ? html`<${TableWrap} label="Rewrites"><table>
      <thead><tr><th scope="col">Parameter</th><th scope="col">From</th><th scope="col">To</th><th scope="col">Rule</th></tr></thead>
      <tbody>${rewrites.map((w, i) => html`<tr key=${i}><th scope="row"><code>${w.param}</code></th>
        <td><code>${show(w.from)}</code></td><td><code>${show(w.to)}</code></td><td><code>${w.rule}</code></td></tr>`)}</tbody>
    </table></${TableWrap}>` : html`<${Empty}>The policy changed nothing in this request.</${Empty}>`}
    <button type="button" onClick=${onClose}>Close details</button>
  </section>`;
}
