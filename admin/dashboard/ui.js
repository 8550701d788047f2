// Shared building blocks: data loading with its three states, form fields that show the relay's error next
// to the field it names (`param`), usage bars, before/after diffs, and the uPlot chart wrapper.
import { html, useState, useEffect, useRef, useMemo, useCallback } from "./vendor/preact-htm.standalone.module.js";
import { get, num, show } from "./api.js";

export { html, useState, useEffect, useRef, useMemo, useCallback };

// GET `path` (null = wait) and keep {data, error, loading}; `reload()` fetches again. Answers that arrive
// after the path changed or the component went away are dropped, so a slow page never overwrites a newer one.
export function useApi(path) {
  const [state, setState] = useState({ data: null, error: null, loading: !!path });
  const [tick, setTick] = useState(0);
  useEffect(() => {
    if (!path) return undefined;
    let live = true;
    setState((s) => ({ data: s.data, error: null, loading: true }));
    get(path).then(
      (data) => live && setState({ data, error: null, loading: false }),
      (error) => live && setState({ data: null, error, loading: false }),
    );
    return () => {
      live = false;
    };
  }, [path, tick]);
  const reload = useCallback(() => setTick((t) => t + 1), []);
  return { ...state, reload };
}

// Runs a write and keeps its error for the form that made it. `run(fn)` resolves to fn's result or undefined.
export function useAction() {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  const run = useCallback(async (fn) => {
    setBusy(true);
    setError(null);
    try {
      return await fn();
    } catch (e) {
      setError(e);
      return undefined;
    } finally {
      setBusy(false);
    }
  }, []);
  return { busy, error, setError, run };
}

let seq = 0;
const useId = (prefix) => useMemo(() => `${prefix}-${++seq}`, []);

// The relay names the offending field in `param` ("rules.temperature.min", "models.0"): a field named
// "rules" or "models" owns everything below it.
export function fieldHasError(error, name) {
  const p = error && error.param;
  return !!(p && name && (p === name || p.startsWith(`${name}.`) || p.startsWith(`${name}[`)));
}

// One labelled input. `kind`: "input" (default), "textarea" or "select" (then `options` = [[value, text]]).
export function Field({ label, name, value, onInput, error, hint, kind = "input", options = [], type = "text",
                        required = false, ...rest }) {
  const id = useId("f");
  const bad = fieldHasError(error, name);
  const describedBy = [hint ? `${id}-hint` : null, bad ? `${id}-err` : null].filter(Boolean).join(" ") || undefined;
  const common = {
    id, name, required, "aria-invalid": bad ? "true" : undefined, "aria-describedby": describedBy,
    onInput: (e) => onInput && onInput(type === "checkbox" ? e.currentTarget.checked : e.currentTarget.value),
    ...rest,
  };
  let control;
  if (kind === "textarea") control = html`<textarea ...${common} value=${value}></textarea>`;
  else if (kind === "select") {
    control = html`<select ...${common} onChange=${common.onInput} onInput=${undefined} value=${value}>
      ${options.map(([v, t]) => html`<option value=${v}>${t}</option>`)}
    </select>`;
  } else if (type === "checkbox") {
    return html`<div class=${`field check ${bad ? "invalid" : ""}`}>
      <input ...${common} type="checkbox" checked=${!!value} onChange=${common.onInput} onInput=${undefined} />
      <label for=${id}>${label}</label>
      ${bad ? html`<span id=${`${id}-err`} class="field-error">${error.message}</span>` : null}
    </div>`;
  } else control = html`<input ...${common} type=${type} value=${value ?? ""} />`;
  return html`<div class=${`field ${bad ? "invalid" : ""}`}>
    <label for=${id}>${label}${required ? html`<span aria-hidden="true"> *</span>` : null}</label>
    ${control}
    ${hint ? html`<span id=${`${id}-hint`} class="hint">${hint}</span>` : null}
    ${bad ? html`<span id=${`${id}-err`} class="field-error">${error.message}</span>` : null}
  </div>`;
}

// The relay's message, in an alert so screen readers announce it; `param` repeated so it is never lost
// even when no field on the form carries that name.
export function ErrorBox({ error, prefix }) {
  if (!error) return null;
  return html`<div class="error" role="alert">
    ${prefix ? html`<strong>${prefix}: </strong>` : null}${error.message}
    ${error.param ? html` <span class="param">(field: <code>${error.param}</code>)</span>` : null}
  </div>`;
}

export const Loading = ({ what = "Loading…" }) => html`<p class="loading" role="status">${what}</p>`;
export const Empty = ({ children }) => html`<p class="empty">${children}</p>`;

// loading / error / empty / content, in that order, for a useApi() result.
export function Async({ state, empty, isEmpty, children, label }) {
  if (state.error) return html`<${ErrorBox} error=${state.error} prefix=${label ? `Could not load ${label}` : null} />`;
  if (state.loading && state.data === null) return html`<${Loading} />`;
  if (state.data === null) return null;
  const blank = isEmpty ? isEmpty(state.data) : Array.isArray(state.data) && state.data.length === 0;
  if (blank) return html`<${Empty}>${empty}</${Empty}>`;
  return children(state.data);
}

// Wide tables scroll inside this region instead of widening the page (360 px screens); focusable so the
// keyboard can scroll it too.
export const TableWrap = ({ label, children }) =>
  html`<div class="table-wrap" role="region" aria-label=${label} tabindex="0">${children}</div>`;

// used against quota; no quota → just the number.
export function UsageBar({ used, quota, label }) {
  const u = used || 0;
  if (quota === null || quota === undefined) return html`<span>${num(u)}</span>`;
  const ratio = quota > 0 ? Math.min(u / quota, 1) : 1;
  const level = ratio >= 0.9 ? "high" : ratio >= 0.7 ? "mid" : "low";
  return html`<div class="usage">
    <span>${num(u)} / ${num(quota)}</span>
    <meter class=${`bar ${level}`} min="0" max=${Math.max(quota, 1)} value=${Math.min(u, Math.max(quota, 1))}
           low=${quota * 0.7} high=${quota * 0.9} optimum="0"
           aria-label=${`${label || "Usage"}: ${num(u)} of ${num(quota)} tokens`}></meter>
  </div>`;
}

// Keys whose value differs between two objects: [{key, kind: added|removed|changed, before, after}].
export function diffKeys(before, after) {
  const a = before || {};
  const b = after || {};
  const keys = [...new Set([...Object.keys(a), ...Object.keys(b)])].sort();
  const out = [];
  for (const key of keys) {
    const inA = Object.prototype.hasOwnProperty.call(a, key);
    const inB = Object.prototype.hasOwnProperty.call(b, key);
    if (inA && !inB) out.push({ key, kind: "removed", before: a[key] });
    else if (!inA && inB) out.push({ key, kind: "added", after: b[key] });
    else if (JSON.stringify(a[key]) !== JSON.stringify(b[key])) out.push({ key, kind: "changed", before: a[key], after: b[key] });
  }
  return out;
}

// before/after of an audit event as a compact list of changed keys.
export function Diff({ before, after }) {
  const rows = diffKeys(before, after);
  if (!rows.length) return html`<span class="muted">no changes</span>`;
  return html`<ul class="diff">
    ${rows.map((r) => html`<li class=${r.kind}>
      <code>${r.key}</code>${" "}
      ${r.kind === "added" ? html`<span class="tag added">added</span> <code>${show(r.after)}</code>` : null}
      ${r.kind === "removed" ? html`<span class="tag removed">removed</span> <code>${show(r.before)}</code>` : null}
      ${r.kind === "changed" ? html`<code>${show(r.before)}</code> → <code>${show(r.after)}</code>` : null}
    </li>`)}
  </ul>`;
}

// Two-step confirmation inline (no window.confirm: it blocks, and cannot be styled or tested easily).
export function ConfirmButton({ label, confirmLabel, prompt, onConfirm, busy, className = "danger" }) {
  const [asking, setAsking] = useState(false);
  const yes = useRef(null);
  useEffect(() => {
    if (asking && yes.current) yes.current.focus();
  }, [asking]);
  if (!asking) return html`<button type="button" class=${className} onClick=${() => setAsking(true)}>${label}</button>`;
  return html`<span class="confirm" role="group" aria-label=${prompt}>
    <span>${prompt}</span>
    <button type="button" class="danger" ref=${yes} disabled=${busy}
            onClick=${async () => { await onConfirm(); setAsking(false); }}>${confirmLabel}</button>
    <button type="button" onClick=${() => setAsking(false)}>Cancel</button>
  </span>`;
}

export const Tile = ({ label, value }) => html`<div class="tile"><span class="tile-label">${label}</span>
  <span class="tile-value">${value}</span></div>`;

// Colour-blind-friendly palette (Okabe–Ito), dark enough to read on white.
const COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#8a6d00", "#56B4E9", "#000000", "#7f4fc9"];

// A uPlot time-series chart: x = unix seconds, one line per series. Re-created when its data changes;
const COMPACT = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });

// resized with the window (a window listener, not ResizeObserver, whose loop warnings surface as errors).
// `points`: draw a dot at every value — for latency series, whose values are islands between nulls (buckets
// without requests) and would otherwise draw no line at all.
export function Chart({ title, x, series, unit, points = false }) {
  const box = useRef(null);
  useEffect(() => {
    const el = box.current;
    if (!el || typeof window.uPlot !== "function") return undefined;
    const width = () => Math.max(el.clientWidth, 240);
    const opts = {
      width: width(),
      height: 220,
      scales: { x: { time: true } },
      series: [{}, ...series.map((s, i) => ({
        label: s.label, stroke: COLORS[i % COLORS.length], width: 2,
        points: points ? { show: true, size: 6, fill: COLORS[i % COLORS.length] } : { show: false },
        value: (u, v) => (v === null || v === undefined ? "—" : `${num(Math.round(v * 100) / 100)}${unit ? ` ${unit}` : ""}`),
      }))],
      // compact labels ("600K"): full numbers overflow the axis gutter on large totals
      axes: [{ stroke: "#333" }, { stroke: "#333", size: 60, values: (u, vals) => vals.map((v) => COMPACT.format(v)) }],
    };
    const plot = new window.uPlot(opts, [x, ...series.map((s) => s.values)], el);
    let timer = null;
    const onResize = () => {
      clearTimeout(timer);
      timer = setTimeout(() => plot.setSize({ width: width(), height: 220 }), 100);
    };
    window.addEventListener("resize", onResize);
    return () => {
      clearTimeout(timer);
      window.removeEventListener("resize", onResize);
      plot.destroy();
    };
  }, [x, series, unit, points]);
  return html`<figure class="chart">
    <figcaption>${title}</figcaption>
    <div ref=${box} class="chart-box" role="img"
         aria-label=${`${title} over time, one line each for ${series.map((s) => s.label).join(", ") || "no group"}`}></div>
  </figure>`;
}
