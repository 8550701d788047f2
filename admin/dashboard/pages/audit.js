// Audit: every admin change (and the relay's own auto-disables), newest first, each as a diff of the keys
// its before/after differ in.
import { html, useState, useApi, Async, Field, TableWrap, Diff } from "../ui.js";
import { qs, when } from "../api.js";
import { Pager, usePager } from "./logs.js";

const ENTITIES = [["", "all"], ["tenant", "tenant"], ["api_key", "api_key"], ["channel", "channel"], ["policy", "policy"]];

export function Audit() {
  const [entity, setEntity] = useState("");
  const pager = usePager();
  const events = useApi(`/admin/audit${qs({ limit: 50, cursor: pager.cursor, entity })}`);
  return html`<section aria-labelledby="page-title">
    <h1 id="page-title" tabindex="-1">Audit</h1>
    <form class="toolbar" onSubmit=${(e) => e.preventDefault()} aria-label="Audit filter">
      <${Field} kind="select" label="Entity" name="entity" value=${entity} options=${ENTITIES}
                onInput=${(v) => { setEntity(v); pager.reset(); }} />
      <button type="button" onClick=${events.reload}>Refresh</button>
    </form>
    <${Async} state=${events} label="audit events" empty="No audit events." isEmpty=${(d) => !d.data.length && pager.page === 1}>
      ${(d) => html`<${TableWrap} label="Audit events"><table>
          <thead><tr><th scope="col">Time</th><th scope="col">Actor</th><th scope="col">Action</th><th scope="col">Entity</th>
            <th scope="col">Changes</th></tr></thead>
          <tbody>${d.data.map((ev) => html`<tr key=${ev.id} class=${ev.action === "auto_disable" ? "row-alert" : ""}>
            <td class="nowrap">${when(ev.created_at)}</td><td>${ev.actor}</td><td>${ev.action}</td>
            <td>${ev.entity}${ev.entity_id !== null && ev.entity_id !== undefined ? ` #${ev.entity_id}` : ""}</td>
            <td><${Diff} before=${ev.before} after=${ev.after} /></td>
          </tr>`)}</tbody>
        </table></${TableWrap}>
        <${Pager} pager=${pager} nextCursor=${d.next_cursor} />`}
    </${Async}>
  </section>`;
}
