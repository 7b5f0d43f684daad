// The overview page: reads /analytics with a viewer key kept in sessionStorage (this tab only),
// draws inline SVG, refreshes every 30 s. No third-party code; the CSP allows only this origin.
"use strict";

const KEY = "mcp-metrics-viewer-key";
const REFRESH_MS = 30000;
const RESOLUTION = { "1h": "minute", "24h": "hour", "7d": "hour", "30d": "day" };
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
let timer = null;

function fmt(n, digits = 0) {
  if (n === null || n === undefined) return "–";
  return Number(n).toLocaleString("en-US", { maximumFractionDigits: digits });
}
const pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(2) + " %");

async function get(view, extra) {
  const params = new URLSearchParams({ since: $("range").value, ...extra });
  const service = $("service").value.trim();
  if (service) params.set("service", service);
  const response = await fetch(`/analytics/${view}?${params}`, {
    headers: { "X-API-Key": sessionStorage.getItem(KEY) || "" },
    cache: "no-store",
  });
  const body = await response.json();
  if (!response.ok) {
    const detail = (body.error && body.error.details && body.error.details[0]) || {};
    const error = new Error(`${response.status}: ${(body.error && body.error.message) || "request failed"}` +
      (detail.field ? ` (${detail.field}: ${detail.message})` : ""));
    error.status = response.status;
    throw error;
  }
  return body;
}

function el(tag, attrs = {}, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function frame(container, maxY, points) {
  const W = 600, H = 180, L = 48, B = 20;
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  svg.append(el("svg:line", { class: "axis", x1: L, y1: H - B, x2: W, y2: H - B }));
  for (const f of [0, 0.5, 1]) {
    const y = H - B - f * (H - B - 8);
    svg.append(el("svg:text", { x: L - 4, y: y + 3, "text-anchor": "end" }, fmt(maxY * f, maxY < 10 ? 1 : 0)));
  }
  const step = Math.max(1, Math.ceil(points.length / 6));
  points.forEach((p, i) => {
    if (i % step === 0) {
      const x = L + (i + 0.5) * (W - L) / points.length;
      svg.append(el("svg:text", { x, y: H - 6, "text-anchor": "middle" }, p.t.slice(5, 16).replace("T", " ")));
    }
  });
  container.replaceChildren(svg);
  return { svg, x: (i) => L + (i + 0.5) * (W - L) / points.length, y: (v) => H - B - (v / maxY) * (H - B - 8),
           bw: Math.max(1, (W - L) / points.length - 1), base: H - B };
}

function drawCalls(points) {
  const maxY = Math.max(1, ...points.map((p) => p.calls));
  const f = frame($("chart-calls"), maxY, points);
  points.forEach((p, i) => {
    for (const [cls, v] of [["calls", p.calls], ["errors", p.errors]]) {
      if (!v) continue;
      const bar = el("svg:rect", { class: `bar ${cls}`, x: f.x(i) - f.bw / 2, y: f.y(v), width: f.bw, height: f.base - f.y(v) });
      bar.append(el("svg:title", {}, `${p.t} ${cls}: ${fmt(v)}`));
      f.svg.append(bar);
    }
  });
}

function drawLatency(points) {
  const values = points.flatMap((p) => ["p50", "p95", "p99"].map((q) => (p.latency_ms && p.latency_ms[q]) || 0));
  const f = frame($("chart-latency"), Math.max(1, ...values), points);
  for (const q of ["p50", "p95", "p99"]) {
    let d = "";
    points.forEach((p, i) => {
      const v = p.latency_ms && p.latency_ms[q];
      if (v === null || v === undefined) return;
      d += `${d ? "L" : "M"}${f.x(i).toFixed(1)},${f.y(v).toFixed(1)}`;
    });
    if (d) f.svg.append(el("svg:path", { class: `line ${q}`, d }));
  }
}

function fillTable(id, rows, cells) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren(...rows.map((r) => {
    const tr = el("tr");
    cells(r).forEach((c, i) => tr.append(el("td", i ? { class: "num" } : {}, c)));
    return tr;
  }));
  if (!rows.length) {
    const tr = el("tr");
    tr.append(el("td", { colspan: 5 }, "no calls in this range"));
    body.append(tr);
  }
}

async function refresh() {
  try {
    const [summary, series, tools, clients] = await Promise.all([
      get("summary"), get("timeseries", { resolution: RESOLUTION[$("range").value] }),
      get("tools", { limit: "10" }), get("clients", { limit: "10" }),
    ]);
    $("calls").textContent = fmt(summary.calls);
    $("error-rate").textContent = pct(summary.error_rate);
    for (const q of ["p50", "p95", "p99"]) {
      const v = summary.latency_ms[q];
      $(q).textContent = v === null ? "–" : `${fmt(v, 1)} ms`;
    }
    $("clients").textContent = fmt(summary.distinct_clients);
    $("users").textContent = fmt(summary.distinct_users);
    $("auth-success").textContent = summary.auth ? pct(summary.auth.success_rate) : "–";
    drawCalls(series.points);
    drawLatency(series.points);
    fillTable("top-tools", tools.rows, (r) => [r.tool, r.server || "–", fmt(r.calls), fmt(r.errors), fmt(r.latency_ms.p95, 1)]);
    fillTable("top-clients", clients.rows, (r) => [r.client || "(none)", fmt(r.calls), fmt(r.errors), fmt(r.latency_ms.p95, 1)]);
    $("overview").hidden = false;
    $("error").hidden = true;
    $("status").textContent = `Updated ${new Date().toLocaleTimeString()} · ${summary.since} → ${summary.until} · refreshes every ${REFRESH_MS / 1000} s`;
  } catch (error) {
    $("error").textContent = error.message;
    $("error").hidden = false;
    if (error.status === 401 || error.status === 403) stop();
  }
}

function start() {
  $("key-form").hidden = true;
  $("controls").hidden = false;
  refresh();
  clearInterval(timer);
  timer = setInterval(refresh, REFRESH_MS);
}

function stop() {
  clearInterval(timer);
  sessionStorage.removeItem(KEY);
  $("key-form").hidden = false;
  $("controls").hidden = true;
}

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
    start();
  });
  $("forget").addEventListener("click", () => { stop(); $("overview").hidden = true; });
  $("refresh").addEventListener("click", refresh);
  $("range").addEventListener("change", refresh);
  $("service").addEventListener("change", refresh);
  if (sessionStorage.getItem(KEY)) start();
});
