// The dashboard's entry point: hash routes → views, the top nav, the summary line and the
// banner shown while the API is unreachable.
//
// Routes: #/graph, #/services[/NS/NAME], #/workloads[/NS/NAME], #/traces[?service=..][/ID],
// #/config. A view is mount(root, route, signal): it draws into root and polls the API until
// signal aborts, which happens when the route changes.

import { getJSON, onReachability, poll } from "./api.js";
import { code, fill, h } from "./dom.js";
import * as configView from "./config.js";
import * as graphView from "./graph.js";
import * as metricsView from "./metrics.js";
import * as tracesView from "./traces.js";

const VIEWS = {
  graph: graphView.mount,
  services: (root, route, signal) => metricsView.mount(root, route, signal, "service"),
  workloads: (root, route, signal) => metricsView.mount(root, route, signal, "workload"),
  traces: tracesView.mount,
  config: configView.mount,
};

/** "#/traces/abc?service=x" → {view: "traces", parts: ["abc"], query: URLSearchParams}. */
export function parseRoute(hash) {
  const [path, search = ""] = hash.replace(/^#\/?/, "").split("?", 2);
  const [view = "", ...parts] = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { view: view || "graph", parts, query: new URLSearchParams(search) };
}

let current = new AbortController();

function render() {
  current.abort();
  current = new AbortController();
  const route = parseRoute(location.hash);
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("active", link.dataset.view === route.view);
  }
  const root = document.getElementById("view");
  root.replaceChildren();
  const mount = VIEWS[route.view];
  if (!mount) {
    root.append(h("div", { class: "empty" }, h("h2", {}, "No such page"), h("a", { href: "#/graph" }, "Back to the graph")));
    return;
  }
  document.title = `${route.view} · meshlet dashboard`;
  mount(root, route, current.signal);
}

function showBanner(problem) {
  const banner = document.getElementById("banner");
  if (!problem) {
    banner.hidden = true;
    document.body.classList.remove("api-down");
    return;
  }
  if (problem.status === 0) {
    fill(
      banner,
      h("strong", {}, "The dashboard API at ", code(problem.url), " does not answer."),
      " Is the mesh running? Start it with ",
      code("meshlet up"),
      " (or ",
      code("meshlet demo"),
      "); this page reconnects by itself.",
    );
  } else {
    fill(
      banner,
      h("strong", {}, `The dashboard API failed (${problem.status}): ${problem.message}.`),
      " The mesh is running but could not answer; ",
      code("meshlet status"),
      " shows its state. This page retries by itself.",
    );
  }
  banner.hidden = false;
  document.body.classList.add("api-down");
}

async function refreshSummary() {
  const s = await getJSON("api/summary");
  const source = s.source === "prometheus" ? `Prometheus ${s.prometheus_url ?? ""}` : "embedded scraper";
  document.getElementById("summary").textContent =
    `${source} · ${s.targets} targets · ${s.traces} traces`;
}

onReachability(showBanner);
window.addEventListener("hashchange", render);
render();
// The summary poll also notices, on every view, when the mesh goes away or comes back.
poll(refreshSummary, 5, new AbortController().signal);
