// Traces: a search form and the matching traces, newest first; one trace as a waterfall of
// its spans, nested by parent, each bar placed by its start and length; a span's attributes
// open on click.
//
// Test hooks: tr.trace-row[data-trace-id][data-service-count]; .span-row[data-service]
// [data-span-id][data-depth]; .span-attrs (the open attributes).

import { ApiError, getJSON, poll } from "./api.js";
import { PALETTE } from "./chart.js";
import { code, emptyState, h } from "./dom.js";
import * as fmt from "./format.js";

const LIST_REFRESH_S = 5;

export function mount(root, route, signal) {
  if (route.parts.length) waterfall(root, route.parts[0], signal);
  else search(root, route, signal);
}

/** A stable colour per service name, the same in every trace. */
export function serviceColor(name) {
  let hash = 0;
  for (const ch of name) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
  return PALETTE[hash % PALETTE.length];
}

function chip(service) {
  return h("span", { class: "chip", style: `border-color:${serviceColor(service)}` }, service);
}

// -- search --------------------------------------------------------------------------------

function search(root, route, signal) {
  const q = route.query;
  const live = q.get("live") !== "0";
  const services = h("datalist", { id: "trace-services" });
  const limit = q.get("limit") ?? "50";
  const form = h(
    "form",
    { class: "search", id: "trace-search" },
    h(
      "label",
      {},
      "service ",
      h("input", {
        name: "service",
        list: "trace-services",
        placeholder: "any, e.g. productpage.default",
        value: q.get("service") ?? "",
      }),
    ),
    h(
      "label",
      {},
      "min duration ",
      h("input", {
        name: "min_duration_ms",
        type: "number",
        min: 0,
        step: "any",
        value: q.get("min_duration_ms") ?? "",
      }),
      " ms",
    ),
    h(
      "label",
      {},
      h("input", { name: "errors", type: "checkbox", value: "1", checked: q.get("errors") === "1" }),
      " errors only",
    ),
    h(
      "label",
      {},
      "limit ",
      h(
        "select",
        { name: "limit" },
        [20, 50, 100, 500].map((n) => h("option", { value: n, selected: String(n) === limit }, n)),
      ),
    ),
    h("label", {}, h("input", { name: "live", type: "checkbox", checked: live }), " live"),
    h("button", { type: "submit" }, "Search"),
    services,
  );
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const params = new URLSearchParams();
    for (const [key, value] of new FormData(form)) {
      if (value !== "" && key !== "live") params.set(key, value);
    }
    if (!form.elements.live.checked) params.set("live", "0");
    const next = `#/traces?${params}`;
    if (location.hash === next) window.dispatchEvent(new HashChangeEvent("hashchange"));
    else location.hash = next;
  });
  form.elements.live.addEventListener("change", () => form.requestSubmit());

  const body = h("tbody");
  const table = h(
    "table",
    { class: "grid-table traces", id: "traces" },
    h(
      "thead",
      {},
      h("tr", {}, ["Started", "Root span", "Duration", "Spans", "Services", ""].map((c) => h("th", {}, c))),
    ),
    body,
  );
  const empty = emptyState(
    "No traces match",
    "Spans arrive from the proxies over OTLP; only sampled requests are traced (",
    code("meshlet up --trace-sampling 100"),
    " traces every request, ",
    code("meshlet demo"),
    " does so by default).",
  );
  empty.hidden = true;
  const updated = h("span", { class: "muted" });
  root.append(h("div", { class: "toolbar" }, h("h1", {}, "Traces"), updated), form, table, empty);

  const params = {
    service: q.get("service"),
    min_duration_ms: q.get("min_duration_ms"),
    errors: q.get("errors") === "1" ? 1 : null,
    limit: q.get("limit") ?? 50,
  };
  const load = async () => {
    const { traces } = await getJSON("api/traces", params, signal);
    const longest = Math.max(1, ...traces.map((t) => t.duration_ms));
    body.replaceChildren(...traces.map((t) => traceRow(t, longest)));
    const names = new Set([...services.children].map((o) => o.value));
    for (const name of traces.flatMap((t) => t.services)) {
      if (!names.has(name)) {
        names.add(name);
        services.append(h("option", { value: name }));
      }
    }
    table.hidden = traces.length === 0;
    empty.hidden = traces.length > 0;
    updated.textContent = `${traces.length} traces · updated ${fmt.clock(Date.now() / 1000)}`;
  };
  if (live) poll(load, LIST_REFRESH_S, signal);
  else load().catch(() => {});
}

function traceRow(t, longest) {
  const href = `#/traces/${encodeURIComponent(t.trace_id)}`;
  return h(
    "tr",
    {
      class: `trace-row${t.error ? " error" : ""}`,
      "data-trace-id": t.trace_id,
      "data-service-count": t.services.length,
      "data-root-service": t.root_service,
      onclick: (e) => {
        if (!e.target.closest("a")) location.hash = href;
      },
    },
    h("td", {}, fmt.clock(t.start_unix_ms / 1000)),
    h("td", {}, h("a", { href }, h("b", {}, t.root_service), " ", t.root_name)),
    h(
      "td",
      { class: "duration" },
      h("span", { class: "dur-bar", style: `width:${((t.duration_ms / longest) * 100).toFixed(1)}%` }),
      h("span", {}, fmt.ms(t.duration_ms)),
    ),
    h("td", { class: "num" }, t.span_count),
    h("td", {}, t.services.map(chip)),
    h("td", {}, t.error ? h("span", { class: "badge failing" }, "error") : ""),
  );
}

// -- one trace -----------------------------------------------------------------------------

/** Spans in display order (depth-first, children by start), each with its depth. */
export function spanTree(spans) {
  const ids = new Set(spans.map((sp) => sp.span_id));
  const children = new Map();
  const roots = [];
  for (const sp of spans) {
    if (sp.parent_span_id && ids.has(sp.parent_span_id)) {
      if (!children.has(sp.parent_span_id)) children.set(sp.parent_span_id, []);
      children.get(sp.parent_span_id).push(sp);
    } else {
      roots.push(sp);
    }
  }
  const byStart = (a, b) => a.start_unix_ms - b.start_unix_ms;
  const out = [];
  const visit = (sp, depth) => {
    out.push({ span: sp, depth, orphan: depth === 0 && Boolean(sp.parent_span_id) });
    for (const child of (children.get(sp.span_id) ?? []).sort(byStart)) visit(child, depth + 1);
  };
  for (const sp of roots.sort(byStart)) visit(sp, 0);
  return out;
}

function waterfall(root, traceId, signal) {
  const title = h("h1", {}, h("a", { href: "#/traces" }, "Traces"), " / ", h("code", {}, traceId));
  root.append(h("div", { class: "toolbar" }, title));
  getJSON(`api/traces/${encodeURIComponent(traceId)}`, {}, signal).then(
    (trace) => root.append(...drawTrace(trace)),
    (error) => {
      if (error.name === "AbortError") return;
      root.append(
        error instanceof ApiError && error.status === 404
          ? emptyState(
              "No such trace",
              "The trace store keeps the most recent traces only; ",
              h("a", { href: "#/traces" }, "search again"),
              ".",
            )
          : emptyState("Could not load the trace", String(error.message)),
      );
    },
  );
}

function drawTrace(trace) {
  const spans = trace.spans;
  if (!spans.length) return [emptyState("This trace has no spans")];
  const t0 = Math.min(...spans.map((sp) => sp.start_unix_ms));
  const end = Math.max(...spans.map((sp) => sp.start_unix_ms + sp.duration_ms));
  const total = Math.max(end - t0, 0.001);
  const services = [...new Set(spans.map((sp) => sp.service))];
  const pct = (v) => `${((v / total) * 100).toFixed(3)}%`;

  const ruler = h(
    "div",
    { class: "span-row ruler-row" },
    h("div", { class: "span-label" }, "service · span"),
    h(
      "div",
      { class: "span-track ruler" },
      [0, 0.25, 0.5, 0.75, 1].map((f) =>
        h("span", { class: "tick", style: `left:${f * 100}%` }, fmt.ms(total * f)),
      ),
    ),
  );
  const rows = spanTree(spans).flatMap(({ span: sp, depth, orphan }) => {
    const attrs = attributesPanel(sp, t0);
    const row = h(
      "div",
      {
        class: `span-row${sp.error ? " error" : ""}`,
        "data-span-id": sp.span_id,
        "data-service": sp.service,
        "data-depth": depth,
        tabindex: 0,
        role: "button",
        "aria-expanded": "false",
      },
      h(
        "div",
        { class: "span-label", style: `padding-left:${depth * 14 + 4}px`, title: sp.name },
        h("span", { class: "svc", style: `color:${serviceColor(sp.service)}` }, sp.service),
        " ",
        h("span", { class: "kind" }, sp.kind),
        " ",
        h("span", { class: "name" }, sp.name),
        orphan ? h("span", { class: "muted" }, " (parent not received)") : null,
      ),
      h(
        "div",
        { class: "span-track" },
        h("div", {
          class: "span-bar",
          style: [
            `left:${pct(sp.start_unix_ms - t0)}`,
            `width:max(2px, ${pct(sp.duration_ms)})`,
            `background:${serviceColor(sp.service)}`,
          ].join(";"),
        }),
        h(
          "span",
          { class: "span-dur", style: `left:${pct(sp.start_unix_ms - t0 + sp.duration_ms)}` },
          fmt.ms(sp.duration_ms),
        ),
      ),
    );
    const toggle = () => {
      attrs.hidden = !attrs.hidden;
      row.setAttribute("aria-expanded", String(!attrs.hidden));
    };
    row.addEventListener("click", toggle);
    row.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        toggle();
      }
    });
    return [row, attrs];
  });

  return [
    h(
      "p",
      { class: "trace-summary" },
      `${fmt.ms(total)} · ${spans.length} spans · ${services.length} services`,
      ` · started ${fmt.clock(t0 / 1000)}`,
      spans.some((sp) => sp.error) ? h("span", { class: "badge failing" }, "error") : null,
    ),
    h("p", { class: "chips" }, services.map(chip)),
    h("div", { class: "waterfall", id: "waterfall" }, ruler, rows),
  ];
}

function attributesPanel(sp, t0) {
  const fields = [
    ["span id", sp.span_id],
    ["parent span id", sp.parent_span_id || "(root)"],
    ["kind", sp.kind],
    ["starts at", `+${fmt.ms(sp.start_unix_ms - t0)}`],
    ["duration", fmt.ms(sp.duration_ms)],
    ["error", String(sp.error)],
    ...Object.entries(sp.attributes ?? {}).sort(([a], [b]) => (a < b ? -1 : 1)),
  ];
  return h(
    "div",
    { class: "span-attrs", hidden: true },
    h(
      "table",
      {},
      fields.map(([key, value]) =>
        h(
          "tr",
          {},
          h("th", {}, key),
          h("td", {}, typeof value === "object" ? JSON.stringify(value) : String(value)),
        ),
      ),
    ),
  );
}
