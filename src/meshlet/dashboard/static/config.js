// Config: what the mesh holds, per namespace, with what analysis found wrong with it (the
// findings of `meshlet analyze`), and whether each proxy has acknowledged what the control
// plane sent it (`meshlet proxy-status`).
//
// Test hooks: section.namespace[data-namespace]; tr.resource[data-resource];
// tr.proxy[data-proxy-id][data-synced].

import { getJSON, poll } from "./api.js";
import { code, emptyState, fill, h } from "./dom.js";
import * as fmt from "./format.js";

const REFRESH_S = 5;
const TYPES = ["cds", "lds", "eds", "rds"];
const LEVEL_ORDER = { Error: 0, Warning: 1, Warn: 1, Info: 2 };

export function mount(root, route, signal) {
  const updated = h("span", { class: "muted" });
  const content = h("div");
  root.append(h("div", { class: "toolbar" }, h("h1", {}, "Config"), updated), content);
  poll(
    async () => {
      const config = await getJSON("api/config", {}, signal);
      fill(content, draw(config));
      updated.textContent = `updated ${fmt.clock(Date.now() / 1000)}`;
    },
    REFRESH_S,
    signal,
  );
}

const levelClass = (level) => ({ Error: "failing", Warning: "degraded", Warn: "degraded" })[level] ?? "idle";

function draw(config) {
  const findings = [...(config.findings ?? [])].sort(
    (a, b) =>
      (LEVEL_ORDER[a.level] ?? 3) - (LEVEL_ORDER[b.level] ?? 3) ||
      String(a.resource).localeCompare(String(b.resource)),
  );
  const byResource = new Map();
  for (const f of findings) {
    if (!byResource.has(f.resource)) byResource.set(f.resource, []);
    byResource.get(f.resource).push(f);
  }
  const namespaces = Object.entries(config.namespaces ?? {}).sort(([a], [b]) => a.localeCompare(b));
  return [
    h("h2", {}, `Findings (${findings.length})`),
    findings.length
      ? h(
          "ul",
          { class: "findings" },
          findings.map((f) =>
            h(
              "li",
              { class: "finding", "data-code": f.code },
              h("span", { class: `badge ${levelClass(f.level)}` }, f.level),
              " ",
              code(f.code),
              " ",
              h("b", {}, f.resource),
              ": ",
              f.message,
            ),
          ),
        )
      : h("p", { class: "muted" }, "No validation issues found."),
    h("h2", {}, "Proxies"),
    proxiesTable(config.proxies ?? []),
    h("h2", {}, "Resources"),
    namespaces.length
      ? namespaces.map(([ns, resources]) => namespaceSection(ns, resources, byResource))
      : emptyState("No resources", "Apply some with ", code("meshlet apply -f FILE"), "."),
  ];
}

function namespaceSection(ns, resources, byResource) {
  const sorted = [...resources].sort((a, b) => a.kind.localeCompare(b.kind) || a.name.localeCompare(b.name));
  return h(
    "section",
    { class: "namespace", "data-namespace": ns },
    h("h3", {}, ns || "cluster-scoped", h("span", { class: "muted" }, ` · ${resources.length} resources`)),
    h(
      "table",
      { class: "grid-table" },
      h("thead", {}, h("tr", {}, ["Kind", "Name", "API version", "Findings"].map((c) => h("th", {}, c)))),
      h(
        "tbody",
        {},
        sorted.map((r) => {
          // The analyzer names a resource "Kind namespace/name" (meshlet.control.analysis).
          const label = `${r.kind} ${r.namespace ? `${r.namespace}/` : ""}${r.name}`;
          const found = byResource.get(label) ?? [];
          return h(
            "tr",
            { class: "resource", "data-resource": label },
            h("td", {}, r.kind),
            h("td", {}, r.name),
            h("td", { class: "muted" }, r.apiVersion),
            h("td", {}, found.map((f) => h("span", { class: `badge ${levelClass(f.level)}`, title: f.message }, f.code))),
          );
        }),
      ),
    ),
  );
}

function proxiesTable(proxies) {
  if (!proxies.length) {
    return h("p", { class: "muted" }, "No proxies are connected.");
  }
  const sorted = [...proxies].sort((a, b) => a.id.localeCompare(b.id));
  return h(
    "table",
    { class: "grid-table", id: "proxies" },
    h("thead", {}, h("tr", {}, ["Proxy", ...TYPES.map((t) => t.toUpperCase()), "Connected"].map((c) => h("th", {}, c)))),
    h(
      "tbody",
      {},
      sorted.map((p) => {
        // sync is the stream's state per type, {cds: {state, acked_version, last_nack}, ...}
        // (meshlet.control.xds.connection.TypeStatus); the whole ProxyStatus is read as well.
        const types = p.sync?.types ?? p.sync ?? {};
        const states = TYPES.map((t) => types[t]?.state ?? "NOT SENT");
        const synced = states.every((st) => st === "SYNCED" || st === "NOT SENT");
        const nacks = Object.entries(types).filter(([, v]) => v?.last_nack);
        return [
          h(
            "tr",
            { class: "proxy", "data-proxy-id": p.id, "data-synced": String(synced) },
            h("td", {}, code(p.id)),
            TYPES.map((t, i) =>
              h(
                "td",
                {},
                h(
                  "span",
                  {
                    class: `badge ${stateClass(states[i])}`,
                    title: `sent ${types[t]?.sent_version ?? fmt.NONE}, acked ${types[t]?.acked_version ?? fmt.NONE}`,
                  },
                  states[i],
                ),
              ),
            ),
            h("td", { class: "muted" }, p.connected_at ? fmt.clock(p.connected_at) : fmt.NONE),
          ),
          nacks.map(([t, v]) =>
            h(
              "tr",
              { class: "nack" },
              h("td", { colspan: TYPES.length + 2 }, `${t.toUpperCase()} rejected: ${v.last_nack.message ?? ""}`),
            ),
          ),
        ];
      }),
    ),
  );
}

function stateClass(state) {
  return { SYNCED: "healthy", NACKED: "failing", STALE: "degraded" }[state] ?? "idle";
}
