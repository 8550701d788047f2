// Talking to the relay: one fetch wrapper that adds the bearer token, turns every non-2xx answer into an
// ApiError carrying the relay's own {"error": {message, type, param, code}}, and signs out on a 401.
// Also the small formatting helpers every page shares.

const STORE = "policy-relay-dashboard";

// {token, role} lives in sessionStorage only: it is gone when the tab closes, and never sent to any other origin.
export function loadSession() {
  try {
    const s = JSON.parse(sessionStorage.getItem(STORE) || "null");
    return s && s.token && (s.role === "admin" || s.role === "tenant") ? s : null;
  } catch {
    return null;
  }
}

export function saveSession(s) {
  if (s) sessionStorage.setItem(STORE, JSON.stringify(s));
  else sessionStorage.removeItem(STORE);
}

export class ApiError extends Error {
  constructor(status, message, { type = null, param = null, code = null } = {}) {
    super(message);
    this.status = status;
    this.type = type;
    this.param = param;
    this.code = code;
  }
}

// app.js sets this so that a 401 anywhere (revoked key, rotated admin token) returns to sign-in.
let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

async function errorOf(res) {
  let body = null;
  try {
    body = await res.json();
  } catch {
    /* not JSON: fall back to the status line */
  }
  const e = body && body.error;
  if (e && typeof e === "object" && e.message) return new ApiError(res.status, e.message, e);
  // FastAPI's own shape ({"detail": ...}) for routes the relay does not define, e.g. a 404.
  const detail = body && body.detail;
  if (typeof detail === "string") return new ApiError(res.status, `${detail} (HTTP ${res.status})`);
  if (Array.isArray(detail) && detail[0]) {
    const d = detail[0];
    const param = Array.isArray(d.loc) ? d.loc.filter((p) => p !== "body" && p !== "query").join(".") : null;
    return new ApiError(res.status, d.msg || `HTTP ${res.status}`, { param });
  }
  return new ApiError(res.status, `HTTP ${res.status} ${res.statusText || ""}`.trim());
}

// request("GET", "/admin/tenants") → parsed JSON (null for 204). `token` overrides the session's (sign-in).
// `blob: true` returns the Response body as a Blob (CSV export).
export async function request(method, path, { body, token, blob = false, signOutOn401 = true } = {}) {
  const bearer = token ?? loadSession()?.token;
  const headers = { Accept: blob ? "*/*" : "application/json" };
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    throw new ApiError(0, `The relay could not be reached (${err.message}).`);
  }
  if (!res.ok) {
    const err = await errorOf(res);
    if (res.status === 401 && signOutOn401) onUnauthorized(err);
    throw err;
  }
  if (blob) return res.blob();
  if (res.status === 204) return null;
  const text = await res.text();
  return text ? JSON.parse(text) : null;
}

export const get = (path, opts) => request("GET", path, opts);
export const post = (path, body, opts) => request("POST", path, { ...opts, body });
export const patch = (path, body, opts) => request("PATCH", path, { ...opts, body });
export const del = (path, opts) => request("DELETE", path, opts);

// Query string from an object, leaving out empty values so filters that are not set are not sent.
export function qs(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `?${s}` : "";
}

// --- formatting -----------------------------------------------------------------------------------

const nf = new Intl.NumberFormat("en-US");
export const num = (n) => (n === null || n === undefined ? "—" : nf.format(n));
export const ms = (n) => (n === null || n === undefined ? "—" : `${nf.format(Math.round(n))} ms`);
export const pct = (r) => (r === null || r === undefined ? "—" : `${(r * 100).toFixed(1)}%`);

export function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
}

// Any JSON value as short text for a table cell; undefined/null read as "unset" like the relay's rewrites header.
export function show(v) {
  if (v === undefined || v === null) return "unset";
  return typeof v === "string" ? v : JSON.stringify(v);
}

// "a, b ,c" → ["a","b","c"]; an empty string → [].
export const splitList = (s) => s.split(",").map((x) => x.trim()).filter(Boolean);

// Integer form fields: "" means "not given" (null), anything else must be a whole number.
export function intOrNull(s) {
  const t = String(s ?? "").trim();
  return t === "" ? null : Number(t);
}
