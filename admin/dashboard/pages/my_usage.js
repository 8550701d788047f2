// My usage: what a tenant signed in with its own API key may see — its limits, quota left, the last day's
// totals and its recent requests. Nothing here calls /admin.
import { html, useApi, Async, Tile, UsageBar } from "../ui.js";
import { qs, num, when } from "../api.js";
import { LogTable, Pager, usePager } from "./logs.js";

const limit = (v) => (v === null || v === undefined ? "no limit" : num(v));

export function MyUsage() {
  const self = useApi("/tenant/self");
  const pager = usePager();
  const logs = useApi(`/tenant/logs${qs({ limit: 50, cursor: pager.cursor })}`);
  return html`<section aria-labelledby="page-title">
    <h1 id="page-title" tabindex="-1">My usage</h1>
    <${Async} state=${self} label="your usage" isEmpty=${() => false}>
      ${({ tenant = {}, key = {}, usage_24h: u = {} }) => html`
        <div class="two-col">
          <section class="card" aria-labelledby="me-tenant">
            <h2 id="me-tenant">Tenant ${tenant.name}</h2>
            <dl class="kv">
              <dt>Status</dt><dd><span class=${`badge ${tenant.status}`}>${tenant.status}</span></dd>
              <dt>Requests per minute</dt><dd>${limit(tenant.rpm)}</dd>
              <dt>Tokens per minute</dt><dd>${limit(tenant.tpm)}</dd>
              <dt>Token quota</dt><dd>${tenant.token_quota === null || tenant.token_quota === undefined ? "unlimited" : num(tenant.token_quota)}</dd>
              <dt>Used tokens</dt><dd><${UsageBar} used=${tenant.used_tokens} quota=${tenant.token_quota} label="Tenant quota" /></dd>
              ${tenant.token_quota === null || tenant.token_quota === undefined ? null : html`<dt>Quota left</dt><dd>${num(tenant.quota_left)}</dd>`}
            </dl>
          </section>
          <section class="card" aria-labelledby="me-key">
            <h2 id="me-key">This key: ${key.name}</h2>
            <dl class="kv">
              ${key.prefix ? html`<dt>Prefix</dt><dd><code>${key.prefix}</code></dd>` : null}
              <dt>Models</dt><dd>${key.models ? key.models.join(", ") : "all"}</dd>
              <dt>Requests per minute</dt><dd>${limit(key.rpm)}</dd>
              <dt>Tokens per minute</dt><dd>${limit(key.tpm)}</dd>
              <dt>Token quota</dt><dd>${key.token_quota === null || key.token_quota === undefined ? "unlimited" : num(key.token_quota)}</dd>
              <dt>Used tokens</dt><dd><${UsageBar} used=${key.used_tokens} quota=${key.token_quota} label="Key quota" /></dd>
              ${key.token_quota === null || key.token_quota === undefined ? null : html`<dt>Quota left</dt><dd>${num(key.quota_left)}</dd>`}
              <dt>Expires</dt><dd>${key.expires_at ? when(key.expires_at) : "never"}</dd>
            </dl>
          </section>
        </div>
        <h2>Last 24 hours</h2>
        <div class="tiles" role="group" aria-label="Last 24 hours">
          <${Tile} label="Requests" value=${num(u.requests)} />
          <${Tile} label="Errors" value=${num(u.errors)} />
          <${Tile} label="Prompt tokens" value=${num(u.prompt_tokens)} />
          <${Tile} label="Completion tokens" value=${num(u.completion_tokens)} />
          <${Tile} label="Total tokens" value=${num(u.total_tokens)} />
        </div>`}
    </${Async}>
    <h2>Recent requests</h2>
    <${Async} state=${logs} label="your requests" isEmpty=${() => false}>
      ${(d) => html`<${LogTable} rows=${d.data || []} label="Recent requests" showChannel=${false} />
        <${Pager} pager=${pager} nextCursor=${d.next_cursor} />`}
    </${Async}>
  </section>`;
}
