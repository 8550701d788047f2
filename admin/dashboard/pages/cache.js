// Cache: the shared answer cache's counters (from every process), hit/miss per model and per tenant over
// the last day (summed from /admin/stats series), and a purge behind a confirmation step.
import { html, useState, useMemo, useApi, useAction, Async, Field, ErrorBox, TableWrap, Tile, ConfirmButton } from "../ui.js";
import { del, qs, num, pct } from "../api.js";

export function Cache() {
  const stats = useApi("/admin/cache");
  // One "since" per visit, so the two group-bys cover the same window.
  const since = useMemo(() => new Date(Date.now() - 86400 * 1000).toISOString(), []);
  return html`<section aria-labelledby="page-title">
    <h1 id="page-title" tabindex="-1">Cache</h1>
    <${Async} state=${stats} label="cache status" isEmpty=${() => false}>
      ${(c) => html`
        ${c.redis === "off" || c.redis === "unavailable"
          ? html`<p class="notice">Redis is ${c.redis}: answers are not cached${c.redis === "unavailable" ? " until it is back (requests are served as bypass)" : ""}.</p>`
          : null}
        <div class="tiles" role="group" aria-label="Cache counters">
          <${Tile} label="Redis" value=${typeof c.redis === "string" ? c.redis : c.redis ? "on" : "off"} />
          <${Tile} label="Entries" value=${num(c.entries)} />
          <${Tile} label="Hits" value=${num(c.hit)} />
          <${Tile} label="Misses" value=${num(c.miss)} />
          <${Tile} label="Bypasses" value=${num(c.bypass)} />
          <${Tile} label="Hit ratio" value=${(c.hit || 0) + (c.miss || 0) ? pct(c.hit / (c.hit + c.miss)) : "—"} />
        </div>`}
    </${Async}>
    <div class="two-col">
      <${HitTable} since=${since} group="model" title="By model" column="Model" />
      <${HitTable} since=${since} group="tenant" title="By tenant" column="Tenant" />
    </div>
    <${Purge} onPurged=${stats.reload} />
  </section>`;
}

function HitTable({ since, group, title, column }) {
  const data = useApi(`/admin/stats${qs({ since, bucket: "1h", group_by: group })}`);
  const sum = (xs) => (xs || []).reduce((a, b) => a + (b || 0), 0);
  return html`<section aria-labelledby=${`hits-${group}`}>
    <h2 id=${`hits-${group}`}>${title} (last 24 hours)</h2>
    <${Async} state=${data} label=${`${group} statistics`} empty="No cacheable requests in the last 24 hours."
              isEmpty=${(d) => !(d.series || []).some((s) => sum(s.cache_hits) + sum(s.cache_misses) > 0)}>
      ${(d) => html`<${TableWrap} label=${`Cache ${title.toLowerCase()}`}><table>
        <thead><tr><th scope="col">${column}</th><th scope="col">Hits</th><th scope="col">Misses</th><th scope="col">Hit ratio</th></tr></thead>
        <tbody>${d.series.map((s) => {
          const hit = sum(s.cache_hits);
          const miss = sum(s.cache_misses);
          return hit + miss ? html`<tr key=${s.group}><th scope="row">${s.label || s.group}</th><td>${num(hit)}</td>
            <td>${num(miss)}</td><td>${pct(hit / (hit + miss))}</td></tr>` : null;
        })}</tbody>
      </table></${TableWrap}>`}
    </${Async}>
  </section>`;
}

function Purge({ onPurged }) {
  const [f, setF] = useState({ model: "", tenant_id: "" });
  const [done, setDone] = useState("");
  const action = useAction();
  const set = (k) => (v) => setF((s) => ({ ...s, [k]: v }));
  const scope = [f.model && `model ${f.model}`, f.tenant_id && `tenant ${f.tenant_id}`].filter(Boolean).join(" and ");
  async function purge() {
    setDone("");
    const out = await action.run(() => del(`/admin/cache${qs({ model: f.model.trim(), tenant_id: f.tenant_id.trim() })}`));
    if (out) {
      setDone(`Purged ${num(out.purged)} entr${out.purged === 1 ? "y" : "ies"}.`);
      onPurged();
    }
  }
  return html`<form class="card" onSubmit=${(e) => e.preventDefault()} aria-labelledby="purge-title" novalidate>
    <h2 id="purge-title">Purge</h2>
    <p>Removes stored answers; blank fields purge everything.</p>
    <div class="grid">
      <${Field} label="Model (optional)" name="model" value=${f.model} onInput=${set("model")} error=${action.error} />
      <${Field} label="Tenant id (optional)" name="tenant_id" type="number" value=${f.tenant_id} onInput=${set("tenant_id")} error=${action.error} />
    </div>
    <${ErrorBox} error=${action.error} />
    <${ConfirmButton} label="Purge" confirmLabel="Confirm purge" busy=${action.busy}
                      prompt=${`Purge the cached answers of ${scope || "every model and tenant"}?`} onConfirm=${purge} />
    <p role="status" class="status">${done}</p>
  </form>`;
}
