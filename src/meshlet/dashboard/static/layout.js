// A deterministic layered layout for the service graph, left to right (pure: no DOM).
//
// A node's layer is the length of the longest call path that reaches it from an entry point
// (ingress gateways first, then every node nothing calls, e.g. "unknown" callers from outside
// the mesh), so a workload → service → workload chain takes three layers even when a direct
// workload → workload edge is drawn too. Calls that close a cycle (found by a depth-first walk
// from the entry points, then from any node left, in id order) do not count. Within a layer,
// nodes are
// ordered by the mean position of their callers in earlier layers (the barycenter heuristic,
// which keeps edges from crossing in call trees), ties by id. The same graph always gets the
// same layout, so a refresh moves nothing unless the graph changed.

export function isIngress(node) {
  return /ingressgateway/.test(node.app || node.name || "");
}

const byId = (a, b) => (a < b ? -1 : a > b ? 1 : 0);

/**
 * nodes: [{id, ...}], edges: [{source, target}] → Map id → {layer, index} and the layer count.
 */
export function layered(nodes, edges) {
  const ids = nodes.map((n) => n.id).sort(byId);
  const known = new Set(ids);
  const out = new Map(ids.map((id) => [id, []]));
  const into = new Map(ids.map((id) => [id, []]));
  for (const e of edges) {
    if (!known.has(e.source) || !known.has(e.target) || e.source === e.target) continue;
    out.get(e.source).push(e.target);
    into.get(e.target).push(e.source);
  }
  for (const list of out.values()) list.sort(byId);

  const ingress = nodes.filter(isIngress).map((n) => n.id).sort(byId);
  const sources = ids.filter((id) => into.get(id).length === 0 && !ingress.includes(id));
  // Depth-first: the finishing order, and the edges back to a node still on the path.
  const state = new Map(); // id → "open" while on the path, "done" after
  const finished = [];
  const back = new Set();
  const visit = (id) => {
    state.set(id, "open");
    for (const target of out.get(id)) {
      if (state.get(target) === "open") back.add(`${id} ${target}`);
      else if (!state.has(target)) visit(target);
    }
    state.set(id, "done");
    finished.push(id);
  };
  for (const id of [...ingress, ...sources, ...ids]) if (!state.has(id)) visit(id);

  // Longest path, in topological order (the reverse of the finishing order).
  const layer = new Map(ids.map((id) => [id, 0]));
  for (const id of finished.reverse()) {
    for (const target of out.get(id)) {
      if (!back.has(`${id} ${target}`)) layer.set(target, Math.max(layer.get(target), layer.get(id) + 1));
    }
  }

  const layers = [];
  for (const id of ids) (layers[layer.get(id)] ??= []).push(id);
  const index = new Map();
  layers.forEach((members, depth) => {
    const center = (id) => {
      const callers = into.get(id).filter((c) => index.has(c) && layer.get(c) < depth);
      if (!callers.length) return Number.POSITIVE_INFINITY; // after the called nodes, by id
      return callers.reduce((sum, c) => sum + index.get(c), 0) / callers.length;
    };
    const first = (id) => (depth === 0 && ingress.includes(id) ? 0 : 1);
    const keyed = members.map((id) => ({ id, first: first(id), center: center(id) }));
    keyed.sort((a, b) => a.first - b.first || a.center - b.center || byId(a.id, b.id));
    keyed.forEach(({ id }, i) => index.set(id, i));
  });

  const positions = new Map(ids.map((id) => [id, { layer: layer.get(id), index: index.get(id) }]));
  return { positions, layers: layers.map((m) => m.length) };
}
