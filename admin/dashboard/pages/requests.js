// Requests: the request log with filters, totals for the filtered range, CSV export and paging.
import { html, useState, useMemo, useApi, Async, Field, ErrorBox, Tile } from "../ui.js";
import { get, qs, num, pct } from "../api.js";
import { LogTable, Pager, usePager } from "./logs.js";

const BLANK = { tenant_id: "", key_id: "", model: "", channel_id: "", status: "", cache: "", rewritten: "", since: "", until: "" };

// datetime-local is the browser's local time without a zone; the API wants UTC ISO.
const toIso = (v) => (v ? new Date(v).toISOString() : "");

function filterParams(f) {
  return { ...f, since: toIso(f.since), until: toIso(f.until) };
}

export function Requests() {
  const [draft, setDraft] = useState(BLANK);
  const [filters, setFilters] = useState(BLANK);
  const pager = usePager();
  const params = useMemo(() => filterParams(filters), [filters]);
  const logs = useApi(`/admin/logs${qs({ limit: 50, ...params, cursor: pager.cursor })}`);
  const summary = useApi(`/admin/logs/summary${qs(params)}`);
  const channels = useApi("/admin/channels");
  const names = useMemo(() => Object.fromEntries((channels.data || []).map((c) => [c.id, c.name])), [channels.data]);
  const channelName = (id) => names[id] ?? `#${id}`;
  const [exportErr, setExportErr] = useState(null);
  const [exporting, setExporting] = useState(false);
  const set = (k) => (v) => setDraft((s) => ({ ...s, [k]: v }));

  function apply(e) {
    e.preventDefault();
    pager.reset();
    setFilters({ ...draft });
  }

  // The CSV needs the bearer header, so no plain link: fetch it, then hand the browser a Blob URL.
  async function exportCsv() {
    setExportErr(null);
    setExporting(true);
    try {
      const blob = await get(`/admin/logs.csv${qs(params)}`, { blob: true });
      const url = URL.createObjectURL(blob);
      const a = document.createElement("a");
      a.href = url;
      a.download = `requests-${new Date().toISOString().slice(0, 19).replace(/:/g, "")}.csv`;
      document.body.appendChild(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (err) {
      setExportErr(err);
    } finally {
      setExporting(false);
    }
  }

  const err = logs.error;
  return html`<section aria-labelledby="page-title">
    <h1 id="page-title" tabindex="-1">Requests</h1>
    <form class="card filters" onSubmit=${apply} aria-labelledby="filters-title" novalidate>
      <h2 id="filters-title">Filters</h2>
      <div class="grid">
        <${Field} label="Tenant id" name="tenant_id" type="number" value=${draft.tenant_id} onInput=${set("tenant_id")} error=${err} />
        <${Field} label="Key id" name="key_id" type="number" value=${draft.key_id} onInput=${set("key_id")} error=${err} />
        <${Field} label="Model" name="model" value=${draft.model} onInput=${set("model")} error=${err} />
        <${Field} label="Channel id" name="channel_id" type="number" value=${draft.channel_id} onInput=${set("channel_id")} error=${err} />
        <${Field} label="Status" name="status" value=${draft.status} onInput=${set("status")} error=${err} hint="2xx, 4xx, 5xx, a code such as 429, or error" />
        <${Field} kind="select" label="Cache" name="cache" value=${draft.cache} onInput=${set("cache")} error=${err}
                  options=${[["", "any"], ["hit", "hit"], ["miss", "miss"], ["bypass", "bypass"]]} />
        <${Field} kind="select" label="Rewritten" name="rewritten" value=${draft.rewritten} onInput=${set("rewritten")} error=${err}
                  options=${[["", "any"], ["yes", "yes"], ["no", "no"]]} />
        <${Field} label="Since" name="since" type="datetime-local" value=${draft.since} onInput=${set("since")} error=${err} />
        <${Field} label="Until" name="until" type="datetime-local" value=${draft.until} onInput=${set("until")} error=${err} />
      </div>
      <div class="buttons">
        <button type="submit" class="primary">Apply filters</button>
        <button type="button" onClick=${() => { setDraft(BLANK); setFilters(BLANK); pager.reset(); }}>Reset filters</button>
      </div>
    </form>
    <h2>Totals</h2>
    <${Async} state=${summary} label="totals" isEmpty=${() => false}>
      ${(s) => {
        const cached = (s.cache_hits || 0) + (s.cache_misses || 0);
        return html`<div class="tiles" role="group" aria-label="Totals for these filters">
          <${Tile} label="Requests" value=${num(s.requests)} />
          <${Tile} label="Errors" value=${num(s.errors)} />
          <${Tile} label="Prompt tokens" value=${num(s.prompt_tokens)} />
          <${Tile} label="Completion tokens" value=${num(s.completion_tokens)} />
          <${Tile} label="Total tokens" value=${num(s.total_tokens)} />
          <${Tile} label="Cache hit ratio" value=${cached ? pct(s.cache_hits / cached) : "—"} />
        </div>`;
      }}
    </${Async}>
    <div class="toolbar">
      <button type="button" onClick=${exportCsv} disabled=${exporting}>${exporting ? "Exporting…" : "Export CSV"}</button>
      <button type="button" onClick=${() => { logs.reload(); summary.reload(); }}>Refresh</button>
    </div>
    <${ErrorBox} error=${exportErr} prefix="Export failed" />
    <h2>Log</h2>
    <${Async} state=${logs} label="requests" isEmpty=${() => false}>
      ${(d) => html`<${LogTable} rows=${d.data || []} channelName=${channelName} />
        <${Pager} pager=${pager} nextCursor=${d.next_cursor} />`}
    </${Async}>
  </section>`;
}
