// Services and Workloads: a table of golden metrics per row (like `linkerd viz stat`), and for
// one row its charts over the last minutes (rate, success rate, latency percentiles, inbound
// and outbound, and requests by response code).
//
// Test hooks: tr.row[data-row-id="workload:NS/NAME"][data-rps]; figure.chart[data-chart].

import { getJSON, poll } from "./api.js";
import { lineChart } from "./chart.js";
import { code, emptyState, h } from "./dom.js";
import * as fmt from "./format.js";

const TABLE_REFRESH_S = 3;
const CHART_REFRESH_S = 10;
const RANGES = [5, 15, 60];

export function mount(root, route, signal, kind) {
  if (route.parts.length >= 2) {
    detail(root, route, signal, kind, route.parts[0], route.parts[1]);
  } else {
    list(root, route, signal, kind);
  }
}

// -- the table -----------------------------------------------------------------------------

const COLUMNS = {
  workload: ["Namespace", "Workload", "App", "Version", "Requests/s", "Success", "P50", "P90", "P99", "Outbound/s", "mTLS"],
  service: ["Namespace", "Service", "Requests/s", "Success", "P50", "P90", "P99", "mTLS"],
};

function list(root, route, signal, kind) {
  const firstNumber = COLUMNS[kind].indexOf("Requests/s");
  const filter = h("input", {
    type: "search",
    placeholder: "filter by name",
    value: route.query.get("q") ?? "",
    "aria-label": "filter",
  });
  const updated = h("span", { class: "muted" });
  const body = h("tbody");
  const table = h(
    "table",
    { class: "grid-table", id: `${kind}s` },
    h(
      "thead",
      {},
      h("tr", {}, COLUMNS[kind].map((c, i) => h("th", { class: i >= firstNumber ? "num" : null }, c))),
    ),
    body,
  );
  const empty = emptyState(
    `No ${kind}s have reported traffic yet`,
    "Rows appear once the proxies' metrics are scraped: send requests through the ingress gateway (",
    code("meshlet demo"),
    " does it for you).",
  );
  empty.hidden = true;
  root.append(
    h("div", { class: "toolbar" }, h("h1", {}, kind === "workload" ? "Workloads" : "Services"), filter, updated),
    table,
    empty,
  );
  let rows = [];
  const drawRows = () => {
    const needle = filter.value.trim().toLowerCase();
    const shown = rows.filter((r) => !needle || `${r.namespace}/${r.name}`.toLowerCase().includes(needle));
    body.replaceChildren(...shown.map((r) => rowElement(kind, r)));
    empty.hidden = rows.length > 0;
    table.hidden = rows.length === 0;
  };
  filter.addEventListener("input", drawRows);
  poll(
    async () => {
      const answer = await getJSON(`api/${kind}s`, { window: 60 }, signal);
      rows = answer.rows;
      drawRows();
      updated.textContent = `last ${answer.window_s} s · updated ${fmt.clock(Date.now() / 1000)}`;
    },
    TABLE_REFRESH_S,
    signal,
  );
}

function rowElement(kind, r) {
  const href = `#/${kind}s/${encodeURIComponent(r.namespace)}/${encodeURIComponent(r.name)}`;
  const errorRate = r.success_rate === null ? 0 : 1 - r.success_rate;
  const cells = [
    h("td", {}, r.namespace),
    h("td", {}, h("a", { href }, r.name)),
    kind === "workload" ? [h("td", {}, r.app || ""), h("td", {}, r.version || "")] : null,
    h("td", { class: "num" }, fmt.rate(r.rps)),
    h("td", { class: `num ${fmt.health(r.rps, errorRate)}` }, fmt.percent(r.success_rate)),
    h("td", { class: "num" }, fmt.ms(r.p50_ms)),
    h("td", { class: "num" }, fmt.ms(r.p90_ms)),
    h("td", { class: "num" }, fmt.ms(r.p99_ms)),
    kind === "workload" ? h("td", { class: "num" }, fmt.rate(r.outbound_rps)) : null,
    h("td", { class: "num" }, r.mtls_ratio === null || r.mtls_ratio === undefined ? fmt.NONE : fmt.percent(r.mtls_ratio)),
  ];
  return h(
    "tr",
    {
      class: "row",
      "data-row-id": `${kind}:${r.namespace}/${r.name}`,
      "data-rps": r.rps,
      onclick: (e) => {
        if (!e.target.closest("a")) location.hash = href;
      },
    },
    cells,
  );
}

// -- one row's charts ----------------------------------------------------------------------

function detail(root, route, signal, kind, namespace, name) {
  const minutes = Number(route.query.get("minutes")) || 15;
  const base = `#/${kind}s/${encodeURIComponent(namespace)}/${encodeURIComponent(name)}`;
  const choose = h(
    "select",
    { "aria-label": "time range", onchange: (e) => (location.hash = `${base}?minutes=${e.target.value}`) },
    RANGES.map((m) => h("option", { value: m, selected: m === minutes }, `last ${m} min`)),
  );
  const updated = h("span", { class: "muted" });
  const charts = h("div", { class: "charts" });
  // Traces name a service "<canonical service>.<namespace>"; a workload's canonical service is
  // its app label, which Deployments named "<app>-<version>" (Bookinfo's) spell out.
  const canonical = kind === "service" ? name : name.replace(/-v\d+$/, "");
  const traced = encodeURIComponent(`${canonical}.${namespace}`);
  root.append(
    h(
      "div",
      { class: "toolbar" },
      h(
        "h1",
        {},
        h("a", { href: `#/${kind}s` }, kind === "workload" ? "Workloads" : "Services"),
        ` / ${namespace} / ${name}`,
      ),
      choose,
      h("a", { href: `#/traces?service=${traced}` }, "Traces →"),
      updated,
    ),
    charts,
  );
  poll(
    async () => {
      const m = await getJSON("api/metrics", { kind, namespace, name, minutes }, signal);
      const to = Date.now() / 1000;
      charts.replaceChildren(...goldenCharts(m, to - minutes * 60, to));
      updated.textContent = `step ${m.step_s} s · updated ${fmt.clock(to)}`;
    },
    CHART_REFRESH_S,
    signal,
  );
}

const codeColor = (codeText, i) => {
  const shades = {
    2: ["#38a169", "#68d391", "#276749"],
    3: ["#3182ce", "#63b3ed"],
    4: ["#dd6b20", "#f6ad55", "#9c4221"],
    5: ["#e53e3e", "#fc8181", "#9b2c2c"],
  }[codeText[0]] ?? ["#718096"];
  return shades[i % shades.length];
};

function direction(title, points, from, to) {
  if (!points.length) {
    return h("section", { class: "direction" }, h("h2", {}, title), h("p", { class: "muted" }, "no traffic"));
  }
  const series = (key, label) => ({ name: label, points: points.map((p) => [p.t, p[key]]) });
  return h(
    "section",
    { class: "direction" },
    h("h2", {}, title),
    h(
      "div",
      { class: "chart-row" },
      lineChart({ title: `${title}: requests/s`, series: [series("rps", "requests/s")], from, to, format: fmt.rate }),
      lineChart({
        title: `${title}: success rate`,
        series: [{ ...series("success_rate", "success rate"), color: "#38a169" }],
        from,
        to,
        yMax: 1,
        ratio: true,
        format: fmt.percent,
      }),
      lineChart({
        title: `${title}: latency`,
        series: [series("p50_ms", "p50"), series("p90_ms", "p90"), series("p99_ms", "p99")],
        from,
        to,
        format: fmt.ms,
      }),
    ),
  );
}

function goldenCharts(m, from, to) {
  const codes = Object.keys(m.by_code ?? {}).sort();
  const perClass = {};
  const byCode = codes.map((c) => {
    const i = (perClass[c[0]] = (perClass[c[0]] ?? -1) + 1);
    return { name: c, color: codeColor(c, i), points: m.by_code[c].map((p) => [p.t, p.rps]) };
  });
  return [
    direction("Inbound", m.inbound ?? [], from, to),
    direction("Outbound", m.outbound ?? [], from, to),
    h(
      "section",
      { class: "direction" },
      h("h2", {}, "By response code"),
      h(
        "div",
        { class: "chart-row" },
        lineChart({ title: "requests/s by response code", series: byCode, from, to, format: fmt.rate }),
      ),
    ),
  ];
}
