// How numbers read on the dashboard: rates in requests/s, ratios as percentages, latencies in
// ms or s. A missing value (null: no requests in the window) reads as an en dash.

export const NONE = "–";

export function rate(rps) {
  if (rps === null || rps === undefined) return NONE;
  if (rps === 0) return "0";
  if (rps < 0.01) return "<0.01";
  if (rps < 10) return rps.toFixed(2);
  if (rps < 1000) return rps.toFixed(1);
  return `${(rps / 1000).toFixed(1)}k`;
}

export function percent(ratio) {
  if (ratio === null || ratio === undefined) return NONE;
  const p = ratio * 100;
  if (p === 0 || p === 100) return `${p}%`;
  // 99.95% must not round up to a healthy-looking 100%, nor 0.04% down to 0%.
  if (p > 99.9) return `${Math.min(p, 99.99).toFixed(2)}%`;
  if (p < 0.1) return `${Math.max(p, 0.01).toFixed(2)}%`;
  return `${p.toFixed(1)}%`;
}

export function ms(value) {
  if (value === null || value === undefined) return NONE;
  if (value >= 1000) return `${(value / 1000).toFixed(2)} s`;
  if (value >= 100) return `${Math.round(value)} ms`;
  if (value >= 10) return `${value.toFixed(1)} ms`;
  return `${value.toFixed(2)} ms`;
}

/** Local wall-clock time of a unix time in seconds, HH:MM:SS (or HH:MM). */
export function clock(unixSeconds, withSeconds = true) {
  const d = new Date(unixSeconds * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  const hm = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
  return withSeconds ? `${hm}:${pad(d.getSeconds())}` : hm;
}

/** Kiali's health from an error ratio and a rate (the API sends it; tables derive it). */
export function health(rps, errorRate) {
  if (!rps) return "idle";
  if (errorRate >= 0.1) return "failing";
  if (errorRate > 0) return "degraded";
  return "healthy";
}
