// The dashboard shell: sign-in, the session ({token, role} in sessionStorage), hash routing, the nav for
// each role, and moving focus to the page heading after every navigation (so keyboard and screen-reader
// users land on the new page instead of the link they clicked).
import { html, render, useState, useEffect } from "./vendor/preact-htm.standalone.module.js";
import { get, loadSession, saveSession, setUnauthorizedHandler } from "./api.js";
import { ErrorBox, Field, useAction } from "./ui.js";
import { Overview } from "./pages/overview.js";
import { Channels } from "./pages/channels.js";
import { Tenants } from "./pages/tenants.js";
import { Policies } from "./pages/policies.js";
import { Requests } from "./pages/requests.js";
import { Cache } from "./pages/cache.js";
import { Audit } from "./pages/audit.js";
import { MyUsage } from "./pages/my_usage.js";

// Nav order and names are part of the contract (tests click them by name).
const ADMIN_PAGES = [
  ["overview", "Overview", Overview],
  ["channels", "Channels", Channels],
  ["tenants", "Tenants & keys", Tenants],
  ["policies", "Policies", Policies],
  ["requests", "Requests", Requests],
  ["cache", "Cache", Cache],
  ["audit", "Audit", Audit],
];
const TENANT_PAGES = [["usage", "My usage", MyUsage]];

const routeOf = () => (location.hash.replace(/^#\/?/, "").split(/[/?]/)[0] || "");

function SignIn({ onSignedIn, notice }) {
  const [token, setToken] = useState("");
  const action = useAction();
  useEffect(() => {
    document.title = "Sign in · policy-relay";
    document.querySelector("h1")?.focus();
  }, []);

  // An admin token opens /admin/tenants; a tenant key opens /tenant/self. Anything else: say why inline.
  // Tenant keys look like "sk-…", so those are tried as a key first: on the happy path of either role no
  // probe fails (every failed fetch is a "Failed to load resource" console error in the browser).
  async function submit(e) {
    e.preventDefault();
    const t = token.trim();
    const asAdmin = () => get("/admin/tenants", { token: t, signOutOn401: false }).then(() => "admin");
    const asTenant = () => get("/tenant/self", { token: t, signOutOn401: false }).then(() => "tenant");
    await action.run(async () => {
      if (!t) throw Object.assign(new Error("Enter the relay's admin token or one of your API keys."), { param: "token" });
      const order = t.startsWith("sk-") ? [asTenant, asAdmin] : [asAdmin, asTenant];
      const errors = [];
      for (const attempt of order) {
        try {
          return onSignedIn({ token: t, role: await attempt() });
        } catch (err) {
          if (err.status === 0) throw err; // relay unreachable: trying the other way cannot help
          errors.push(err);
        }
      }
      // The tenant view's answer explains a bad key best (invalid, revoked, expired); a 404 there means this
      // relay has no tenant view, so the admin answer is the one to show.
      const tenantErr = errors[order.indexOf(asTenant)];
      const shown = tenantErr.status === 404 ? errors[order.indexOf(asAdmin)] : tenantErr;
      throw Object.assign(shown, { param: "token" });
    });
  }

  return html`<main id="main" class="signin">
    <h1 tabindex="-1">policy-relay</h1>
    <form onSubmit=${submit} aria-labelledby="signin-title" novalidate>
      <h2 id="signin-title">Sign in</h2>
      ${notice ? html`<p class="notice" role="status">${notice}</p>` : null}
      <${Field} label="Admin token or API key" name="token" type="password" value=${token} onInput=${setToken}
                error=${action.error} autocomplete="off" spellcheck="false"
                hint="The relay's RELAY_ADMIN_TOKEN for the admin pages, or a tenant's sk-… key for its own usage." />
      <${ErrorBox} error=${action.error} />
      <button type="submit" class="primary" disabled=${action.busy}>${action.busy ? "Signing in…" : "Sign in"}</button>
    </form>
  </main>`;
}

function Shell({ session, onSignOut }) {
  const pages = session.role === "admin" ? ADMIN_PAGES : TENANT_PAGES;
  const [route, setRoute] = useState(routeOf());
  const [menuOpen, setMenuOpen] = useState(false);

  useEffect(() => {
    const onHash = () => {
      setRoute(routeOf());
      setMenuOpen(false);
    };
    window.addEventListener("hashchange", onHash);
    return () => window.removeEventListener("hashchange", onHash);
  }, []);

  const current = pages.find(([id]) => id === route);
  useEffect(() => {
    // Unknown or foreign routes (a tenant opening #/channels) go to the role's first page.
    if (!current) location.replace(`#/${pages[0][0]}`);
  }, [current]);

  useEffect(() => {
    if (!current) return;
    document.title = `${current[1]} · policy-relay`;
    // After the new page has rendered its heading: move focus there.
    const id = requestAnimationFrame(() => document.querySelector("main h1")?.focus());
    return () => cancelAnimationFrame(id);
  }, [route]);

  if (!current) return null;
  const Page = current[2];
  return html`<div class="shell">
    <a class="skip" href="#main" onClick=${(e) => { e.preventDefault(); document.querySelector("main h1")?.focus(); }}>Skip to content</a>
    <header class="top">
      <span class="brand">policy-relay</span>
      ${pages.length > 1 ? html`<button type="button" class="menu-toggle" aria-expanded=${menuOpen ? "true" : "false"}
              aria-controls="nav" onClick=${() => setMenuOpen(!menuOpen)}>Menu</button>` : null}
      <nav id="nav" aria-label="Main" class=${menuOpen || pages.length <= 1 ? "open" : ""}>
        <ul>
          ${pages.map(([id, name]) => html`<li>
            <a href=${`#/${id}`} aria-current=${id === route ? "page" : undefined}>${name}</a>
          </li>`)}
        </ul>
      </nav>
      <span class="who">${session.role === "admin" ? "Admin" : "Tenant key"}</span>
      <button type="button" class="signout" onClick=${onSignOut}>Sign out</button>
    </header>
    <main id="main"><${Page} key=${route} /></main>
  </div>`;
}

function App() {
  const [session, setSession] = useState(loadSession());
  const [notice, setNotice] = useState(null);

  function signOut(message) {
    saveSession(null);
    setSession(null);
    setNotice(message || null);
    history.replaceState(null, "", location.pathname + location.search);
  }

  useEffect(() => {
    setUnauthorizedHandler((err) => signOut(`Signed out: ${err.message}`));
  }, []);

  if (!session) {
    return html`<${SignIn} notice=${notice} onSignedIn=${(s) => {
      saveSession(s);
      setNotice(null);
      location.hash = s.role === "admin" ? "#/overview" : "#/usage";
      setSession(s);
    }} />`;
  }
  return html`<${Shell} session=${session} onSignOut=${() => signOut(null)} />`;
}

// Preact diffs against existing children rather than replacing them: clear the boot message first.
const root = document.getElementById("app");
root.textContent = "";
render(html`<${App} />`, root);
