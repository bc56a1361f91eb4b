// The service graph: workloads (circles) and services (triangles) joined by the traffic
// between them, coloured by health as Kiali colours them, laid out left to right by call depth
// (layout.js). It re-reads /api/graph every 3 s and updates the drawing in place: each node and
// edge keeps its SVG element (keyed by id), so only attributes change and nothing flickers.
//
// Test hooks: g.node[data-node-id][data-rps][data-health][data-kind] and
// g.edge[data-source][data-target][data-rps][data-mtls].

import { getJSON, poll } from "./api.js";
import { code, emptyState, fill, h, s, setAttrs } from "./dom.js";
import * as fmt from "./format.js";
import { isIngress, layered } from "./layout.js";

const REFRESH_S = 3;
const LAYER_GAP = 250; // room for an edge label between two layers
const ROW_GAP = 110;
const PAD = 80;
const R = 20; // node radius
const HEALTHS = ["healthy", "degraded", "failing", "idle"];
const WINDOWS = [
  [60, "last 1 min"],
  [300, "last 5 min"],
  [900, "last 15 min"],
];

export function mount(root, route, signal) {
  const windowS = Number(route.query.get("window")) || 60;
  const updated = h("span", { class: "muted" });
  const choose = h(
    "select",
    {
      "aria-label": "time window",
      onchange: (e) => (location.hash = `#/graph?window=${e.target.value}`),
    },
    WINDOWS.map(([value, label]) => h("option", { value, selected: value === windowS }, label)),
  );
  const svg = s(
    "svg",
    { id: "graph", class: "graph", role: "img", "aria-label": "service graph" },
    s("defs", {}, HEALTHS.map(arrowMarker)),
  );
  const edgeLayer = s("g", { class: "edges" });
  const nodeLayer = s("g", { class: "nodes" });
  svg.append(edgeLayer, nodeLayer);
  const details = h("aside", { class: "details", hidden: true });
  const empty = emptyState(
    `No traffic in the ${WINDOWS.find(([v]) => v === windowS)?.[1] ?? `last ${windowS} s`}`,
    "Send requests through the ingress gateway (",
    code("meshlet demo"),
    " sends some for you); the graph fills in within seconds.",
  );
  empty.hidden = true;
  root.append(
    h("div", { class: "toolbar" }, h("h1", {}, "Service graph"), choose, updated),
    h("div", { class: "graph-wrap" }, svg, details),
    empty,
    legend(),
  );

  const nodeEls = new Map();
  const edgeEls = new Map();
  let graph = { nodes: [], edges: [] };
  let selected = null;

  const select = (id) => {
    selected = id;
    for (const [nodeId, el] of nodeEls) el.classList.toggle("selected", nodeId === id);
    showDetails(details, graph, selected);
  };
  svg.addEventListener("click", (e) => {
    const node = e.target.closest?.("g.node");
    select(node ? node.dataset.nodeId : null);
  });
  svg.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && e.target.dataset?.nodeId) select(e.target.dataset.nodeId);
  });

  poll(
    async () => {
      graph = await getJSON("api/graph", { window: windowS }, signal);
      draw(graph, svg, nodeLayer, edgeLayer, nodeEls, edgeEls);
      empty.hidden = graph.nodes.length > 0;
      svg.classList.toggle("hidden", graph.nodes.length === 0);
      if (selected && !graph.nodes.some((n) => n.id === selected)) selected = null;
      for (const [nodeId, el] of nodeEls) el.classList.toggle("selected", nodeId === selected);
      showDetails(details, graph, selected);
      updated.textContent = `updated ${fmt.clock(Date.now() / 1000)} · every ${REFRESH_S} s`;
    },
    REFRESH_S,
    signal,
  );
}

function draw(graph, svg, nodeLayer, edgeLayer, nodeEls, edgeEls) {
  const { positions, layers } = layered(graph.nodes, graph.edges);
  const rows = Math.max(1, ...layers);
  const at = new Map();
  for (const [id, { layer, index }] of positions) {
    const offset = (rows - layers[layer]) / 2; // centre short layers vertically
    at.set(id, { x: PAD + layer * LAYER_GAP, y: PAD + (index + offset) * ROW_GAP });
  }
  // The box around the node centres, with room for the labels under and beside them.
  const width = 2 * PAD + Math.max(0, layers.length - 1) * LAYER_GAP + 80;
  const height = 2 * PAD + (rows - 1) * ROW_GAP;
  setAttrs(svg, { viewBox: `-40 0 ${width} ${height}` });
  svg.style.maxWidth = `${width * 1.4}px`; // fill the page, but a small graph stays legible

  const seenNodes = new Set();
  for (const node of graph.nodes) {
    seenNodes.add(node.id);
    let el = nodeEls.get(node.id);
    if (!el) {
      el = nodeElement(node);
      nodeEls.set(node.id, el);
      nodeLayer.append(el);
    }
    updateNode(el, node, at.get(node.id));
  }
  for (const [id, el] of nodeEls) {
    if (!seenNodes.has(id)) {
      el.remove();
      nodeEls.delete(id);
    }
  }

  const seenEdges = new Set();
  for (const edge of graph.edges) {
    const from = at.get(edge.source);
    const to = at.get(edge.target);
    if (!from || !to) continue;
    const key = `${edge.source} -> ${edge.target}`;
    seenEdges.add(key);
    let el = edgeEls.get(key);
    if (!el) {
      el = edgeElement(edge);
      edgeEls.set(key, el);
      edgeLayer.append(el);
    }
    updateEdge(el, edge, from, to);
  }
  for (const [key, el] of edgeEls) {
    if (!seenEdges.has(key)) {
      el.remove();
      edgeEls.delete(key);
    }
  }
}

// -- nodes ---------------------------------------------------------------------------------

function nodeElement(node) {
  const shape =
    node.kind === "service"
      ? s("polygon", { class: "shape", points: `0,${-R - 2} ${R + 2},${R - 4} ${-R - 2},${R - 4}` })
      : s("circle", { class: "shape", r: R });
  const glyph = node.kind === "unknown" ? "?" : isIngress(node) ? "GW" : "";
  return s(
    "g",
    { class: "node", "data-node-id": node.id, "data-kind": node.kind, tabindex: 0 },
    shape,
    s("text", { class: "glyph", y: 4 }, glyph),
    s("text", { class: "name", y: R + 18 }),
    s("text", { class: "sub", y: R + 33 }),
    s("title"),
  );
}

function updateNode(el, node, { x, y }) {
  setAttrs(el, {
    "data-rps": node.rps,
    "data-error-rate": node.error_rate,
    "data-health": node.health,
  });
  el.setAttribute("class", `node ${node.kind} ${node.health}${el.classList.contains("selected") ? " selected" : ""}`);
  el.style.transform = `translate(${x}px, ${y}px)`;
  const [, name, sub, title] = el.querySelectorAll("text, title");
  name.textContent = node.kind === "unknown" ? "unknown" : node.name;
  const errors = node.error_rate > 0 ? ` · ${fmt.percent(node.error_rate)} err` : "";
  sub.textContent = `${fmt.rate(node.rps)} rps${errors}`;
  title.textContent =
    `${node.id}\n${node.health}: ${fmt.rate(node.rps)} requests/s, ` +
    `${fmt.percent(node.error_rate)} errors`;
}

// -- edges ---------------------------------------------------------------------------------

function arrowMarker(health) {
  return s(
    "marker",
    {
      id: `arrow-${health}`,
      class: `arrow ${health}`,
      viewBox: "0 0 10 10",
      refX: 9,
      refY: 5,
      markerWidth: 7,
      markerHeight: 7,
      orient: "auto-start-reverse",
    },
    s("path", { d: "M0,0 L10,5 L0,10 z" }),
  );
}

function lockGlyph() {
  return s(
    "g",
    { class: "lock" },
    s("title", {}, "mTLS"),
    s("circle", { r: 8 }),
    s("path", { class: "shackle", d: "M-3,-1 v-2.5 a3,3 0 0 1 6,0 v2.5" }),
    s("rect", { x: -4.5, y: -1, width: 9, height: 6.5, rx: 1.2 }),
  );
}

/** The lock, for use in HTML. */
function lockIcon() {
  return s("svg", { class: "lock-icon", viewBox: "-8 -8 16 16", width: 14, height: 14 }, lockGlyph());
}

function edgeElement(edge) {
  return s(
    "g",
    { class: "edge", "data-source": edge.source, "data-target": edge.target },
    s("path", { class: "line" }),
    s("text", { class: "label" }),
    lockGlyph(),
    s("title"),
  );
}

function updateEdge(el, edge, from, to) {
  setAttrs(el, {
    "data-rps": edge.rps,
    "data-error-rate": edge.error_rate,
    "data-health": edge.health,
    "data-mtls": edge.mtls ? "true" : "false",
  });
  el.setAttribute("class", `edge ${edge.health}`);
  const [line, label, lock, title] = el.children;
  const x1 = from.x + R + 2;
  const x2 = to.x - R - 3;
  let d;
  let mid;
  if (x2 > x1) {
    const mx = (x1 + x2) / 2;
    d = `M${x1},${from.y} C${mx},${from.y} ${mx},${to.y} ${x2},${to.y}`;
    mid = { x: mx, y: (from.y + to.y) / 2 };
  } else {
    // A call back to an earlier (or the same) layer: loop below the nodes.
    const dip = Math.max(from.y, to.y) + ROW_GAP * 0.8;
    d = `M${from.x},${from.y + R} C${from.x},${dip} ${to.x},${dip} ${to.x},${to.y + R + 3}`;
    mid = { x: (from.x + to.x) / 2, y: dip - ROW_GAP * 0.2 };
  }
  setAttrs(line, {
    d,
    "marker-end": `url(#arrow-${edge.health})`,
    "stroke-width": (1.2 + Math.min(3, Math.log10(1 + edge.rps) * 2)).toFixed(2),
  });
  setAttrs(label, { x: mid.x, y: mid.y - 11 });
  label.textContent = `${fmt.rate(edge.rps)}/s · ${fmt.percent(edge.error_rate)} · p99 ${fmt.ms(edge.p99_ms)}`;
  lock.setAttribute("transform", `translate(${mid.x}, ${mid.y})`);
  lock.style.display = edge.mtls ? "" : "none";
  title.textContent =
    `${edge.source} → ${edge.target}\n${fmt.rate(edge.rps)} requests/s, ` +
    `${fmt.percent(edge.error_rate)} errors, p50 ${fmt.ms(edge.p50_ms)}, ` +
    `p99 ${fmt.ms(edge.p99_ms)}${edge.mtls ? ", mTLS" : ", plaintext"}`;
}

// -- the side panel and the legend ---------------------------------------------------------

function nodeLabel(graph, id) {
  const node = graph.nodes.find((n) => n.id === id);
  return node ? (node.kind === "unknown" ? "unknown" : node.name) : id;
}

function showDetails(panel, graph, id) {
  const node = id && graph.nodes.find((n) => n.id === id);
  panel.hidden = !node;
  if (!node) return;
  const edgeRow = (e, otherId) =>
    h(
      "tr",
      {},
      h("td", {}, nodeLabel(graph, otherId)),
      h("td", { class: "num" }, fmt.rate(e.rps)),
      h("td", { class: `num ${e.health}` }, fmt.percent(e.error_rate)),
      h("td", { class: "num" }, fmt.ms(e.p99_ms)),
      h("td", {}, e.mtls ? lockIcon() : ""),
    );
  const edgeTable = (title, edges, other) =>
    edges.length
      ? [
          h("h3", {}, title),
          h(
            "table",
            { class: "mini" },
            h("tr", {}, ["", "rps", "err", "p99", ""].map((c) => h("th", {}, c))),
            edges.map((e) => edgeRow(e, other(e))),
          ),
        ]
      : null;
  // Traces name a service "<canonical service>.<namespace>" (Istio's APP_LABEL_AND_NAMESPACE).
  const traced = encodeURIComponent(`${node.app || node.name}.${node.namespace}`);
  const where = `${encodeURIComponent(node.namespace)}/${encodeURIComponent(node.name)}`;
  const links =
    node.kind === "unknown"
      ? []
      : [
          h("a", { href: `#/${node.kind}s/${where}` }, "Golden metrics →"),
          h("a", { href: `#/traces?service=${traced}` }, "Traces →"),
        ];
  fill(
    panel,
    h("h2", {}, node.kind === "unknown" ? "unknown" : node.name),
    h(
      "p",
      { class: "muted" },
      node.kind,
      node.namespace ? ` in ${node.namespace}` : "",
      node.version ? ` · ${node.version}` : "",
    ),
    h(
      "dl",
      {},
      h("dt", {}, "health"),
      h("dd", { class: node.health }, node.health),
      h("dt", {}, "requests/s"),
      h("dd", {}, fmt.rate(node.rps)),
      h("dt", {}, "errors"),
      h("dd", {}, fmt.percent(node.error_rate)),
    ),
    edgeTable("Called by", graph.edges.filter((e) => e.target === id), (e) => e.source),
    edgeTable("Calls", graph.edges.filter((e) => e.source === id), (e) => e.target),
    h("p", { class: "links" }, links),
  );
}

function legend() {
  const swatch = (health, text) =>
    h("span", {}, h("i", { class: `swatch ${health}` }), text);
  return h(
    "div",
    { class: "legend" },
    swatch("healthy", "healthy"),
    swatch("degraded", "some 5xx"),
    swatch("failing", "≥ 10% 5xx"),
    swatch("idle", "idle"),
    h("span", {}, "● workload"),
    h("span", {}, "▲ service"),
    h("span", {}, lockIcon(), " mTLS"),
    h("span", { class: "muted" }, "edge labels: requests/s · 5xx ratio · p99 latency"),
  );
}
