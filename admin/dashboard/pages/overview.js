// Overview: traffic over the last hour or day from /admin/stats, grouped by model or channel, as stat tiles
// (from `totals`) and one uPlot chart per measure; plus the channels whose circuit is open right now.
import { html, useState, useMemo, useApi, Async, Field, Tile, Chart, Empty } from "../ui.js";
import { qs, num, ms, pct } from "../api.js";

const RANGES = { hour: { label: "Last hour", seconds: 3600, bucket: "1m" }, day: { label: "Last day", seconds: 86400, bucket: "1h" } };

export function Overview() {
  const [range, setRange] = useState("hour");
  const [group, setGroup] = useState("model");
  const [tick, setTick] = useState(0); // "Refresh" moves the window to now
  const r = RANGES[range];
  const path = useMemo(() => {
    const since = new Date(Date.now() - r.seconds * 1000).toISOString();
    return `/admin/stats${qs({ since, bucket: r.bucket, group_by: group })}`;
  }, [range, group, tick]);
  const stats = useApi(path);
  const circuits = useApi("/admin/circuits");

  return html`<section aria-labelledby="page-title">
    <h1 id="page-title" tabindex="-1">Overview</h1>
    <form class="toolbar" onSubmit=${(e) => e.preventDefault()} aria-label="Overview options">
      <${Field} kind="select" label="Range" name="range" value=${range} onInput=${setRange}
                options=${Object.entries(RANGES).map(([k, v]) => [k, v.label])} />
      <${Field} kind="select" label="Group by" name="group_by" value=${group} onInput=${setGroup}
                options=${[["model", "model"], ["channel", "channel"]]} />
      <button type="button" onClick=${() => { setTick(tick + 1); circuits.reload(); }}>Refresh</button>
    </form>
    <${Async} state=${stats} label="statistics" isEmpty=${() => false}>
      ${(data) => html`<${StatsView} data=${data} />`}
    </${Async}>
    <h2>Open circuits</h2>
    <${Async} state=${circuits} label="circuits" empty="No open circuits"
              isEmpty=${(d) => !(d.data || []).length}>
      ${(d) => html`<ul class="circuits">
        ${d.data.map((c) => html`<li><a href="#/channels">${c.name || `channel ${c.channel_id}`}</a>
          ${" "}cooling down for ${num(Math.ceil(c.cooling_s))} s</li>`)}
      </ul>`}
    </${Async}>
  </section>`;
}

function StatsView({ data }) {
  const t = data.totals || {};
  const hitRatio = t.cache_hit_ratio;
  // Per-measure series for the charts; memoised on data so uPlot is only rebuilt when the answer changes.
  const charts = useMemo(() => {
    const s = data.series || [];
    const pick = (k) => s.map((g) => ({ label: g.label || g.group, values: g[k] }));
    return [
      ["Requests", pick("requests"), ""],
      ["Tokens", pick("total_tokens"), ""],
      ["p99 latency (ms)", pick("p99_ms"), "ms"],
      ["Errors", pick("errors"), ""],
    ];
  }, [data]);
  return html`
    <div class="tiles" role="group" aria-label="Totals">
      <${Tile} label="Requests" value=${num(t.requests)} />
      <${Tile} label="Tokens" value=${num(t.total_tokens)} />
      <${Tile} label="Error rate" value=${pct(t.error_rate)} />
      <${Tile} label="Cache hit ratio" value=${pct(hitRatio)} />
      <${Tile} label="p50 latency" value=${ms(t.p50_ms)} />
      <${Tile} label="p99 latency" value=${ms(t.p99_ms)} />
    </div>
    ${!(data.series || []).length
      ? html`<${Empty}>No requests in this range.</${Empty}>`
      : html`<div class="charts">
          ${charts.map(([title, series, unit]) => html`<${Chart} key=${title} title=${title} x=${data.buckets} series=${series}
                                                             unit=${unit} points=${unit === "ms"} />`)}
        </div>`}
  `;
}
