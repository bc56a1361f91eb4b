// Line charts as SVG: time on x, one line per series, gaps where a value is missing (null:
// no requests in that step), a legend, and a read-out of every series under the pointer.

import { fill, h, s } from "./dom.js";
import { clock } from "./format.js";

const W = 460;
const H = 170;
const LEFT = 56;
const RIGHT = 12;
const TOP = 10;
const BOTTOM = 22;

export const PALETTE = ["#2b6cb0", "#dd6b20", "#38a169", "#805ad5", "#d53f8c", "#319795", "#718096"];

/** The coloured mark of the i-th series, in the legend and the read-out. */
function key(one, i) {
  return h("i", { class: "key", style: `background:${one.color ?? PALETTE[i % PALETTE.length]}` });
}

/** The smallest 1, 2, 2.5 or 5 × 10^k at or above v: a round top for the y axis. */
export function niceCeil(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v * (1 - 1e-9)) return m * p;
  return 10 * p;
}

/**
 * title: the caption; series: [{name, color, points: [[t, value|null], ...]}] with t in unix
 * seconds; from, to: the x range; format: value → text; yMin/yMax: fixed bounds (default:
 * 0 and a round number above the largest value); ratio: pick yMin from [0.99, 0.9, 0.5, 0]
 * so that a dip below 100% stays visible.
 */
export function lineChart({ title, series, from, to, format, yMin = 0, yMax, ratio = false }) {
  const values = series.flatMap((one) => one.points.map(([, v]) => v)).filter(Number.isFinite);
  const top = yMax ?? niceCeil(Math.max(0, ...values));
  let bottom = yMin;
  if (ratio && values.length) bottom = [0.99, 0.9, 0.5, 0].find((b) => b <= Math.min(...values));
  const span = Math.max(1, to - from);
  const x = (t) => LEFT + ((t - from) / span) * (W - LEFT - RIGHT);
  const y = (v) => TOP + (1 - (v - bottom) / (top - bottom || 1)) * (H - TOP - BOTTOM);

  const grid = [];
  for (let i = 0; i <= 4; i++) {
    const v = bottom + ((top - bottom) * i) / 4;
    grid.push(
      s("line", { class: "grid", x1: LEFT, x2: W - RIGHT, y1: y(v), y2: y(v) }),
      s("text", { class: "tick", x: LEFT - 6, y: y(v) + 4, "text-anchor": "end" }, format(v)),
    );
  }
  const stepX = span / 4;
  for (let i = 0; i <= 4; i++) {
    const t = from + stepX * i;
    const anchor = i === 0 ? "start" : i === 4 ? "end" : "middle";
    grid.push(s("text", { class: "tick", x: x(t), y: H - 6, "text-anchor": anchor }, clock(t, span <= 600)));
  }

  const lines = series.map((one, i) => {
    const color = one.color ?? PALETTE[i % PALETTE.length];
    let d = "";
    let pen = false;
    const dots = [];
    one.points.forEach(([t, v], k) => {
      if (!Number.isFinite(v)) {
        pen = false;
        return;
      }
      d += `${pen ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
      const alone = !pen && !Number.isFinite(one.points[k + 1]?.[1]);
      if (alone) dots.push(s("circle", { cx: x(t), cy: y(v), r: 2, fill: color }));
      pen = true;
    });
    return s("g", { class: "series", "data-series": one.name }, s("path", { d, stroke: color }), dots);
  });

  const cursor = s("line", { class: "cursor", y1: TOP, y2: H - BOTTOM, visibility: "hidden" });
  const readout = h("div", { class: "readout", hidden: true });
  const svg = s(
    "svg",
    { viewBox: `0 0 ${W} ${H}`, class: "chart-svg", role: "img", "aria-label": title },
    grid,
    lines,
    cursor,
  );
  const times = [...new Set(series.flatMap((one) => one.points.map(([t]) => t)))].sort((a, b) => a - b);
  svg.addEventListener("pointermove", (e) => {
    if (!times.length) return;
    const box = svg.getBoundingClientRect();
    const px = ((e.clientX - box.left) / box.width) * W;
    const t = from + ((px - LEFT) / (W - LEFT - RIGHT)) * span;
    const nearest = times.reduce((a, b) => (Math.abs(b - t) < Math.abs(a - t) ? b : a));
    cursor.setAttribute("x1", x(nearest));
    cursor.setAttribute("x2", x(nearest));
    cursor.setAttribute("visibility", "visible");
    fill(
      readout,
      h("b", {}, clock(nearest)),
      series.map((one, i) => {
        const v = one.points.find(([pt]) => pt === nearest)?.[1];
        return h("div", {}, key(one, i), `${one.name}: ${Number.isFinite(v) ? format(v) : "–"}`);
      }),
    );
    readout.hidden = false;
    readout.style.left = `${Math.min(box.width - 150, Math.max(0, e.clientX - box.left + 12))}px`;
  });
  svg.addEventListener("pointerleave", () => {
    cursor.setAttribute("visibility", "hidden");
    readout.hidden = true;
  });

  return h(
    "figure",
    { class: "chart", "data-chart": title },
    h("figcaption", {}, title),
    values.length ? null : h("div", { class: "nodata" }, "no data"),
    svg,
    h(
      "div",
      { class: "chart-legend" },
      series.map((one, i) =>
        h("span", {}, key(one, i), one.name),
      ),
    ),
    readout,
  );
}
