// The overview page: reads /analytics with a viewer key kept in sessionStorage (this tab only),
// draws inline SVG, refreshes every 30 s. No third-party code; the CSP allows only this origin.
// Every number shown is a field of one /analytics answer for the range in data-since/data-until
// of the visible <main>; docs/overview-page.md lists which.
"use strict";

const KEY = "mcp-metrics-viewer-key";
const REFRESH_MS = 30000;
const RANGE_MS = { "1h": 3600e3, "24h": 86400e3, "7d": 7 * 86400e3, "30d": 30 * 86400e3 };
const RESOLUTION = { "1h": "minute", "24h": "hour", "7d": "hour", "30d": "day" };
const ROWS = 10; // rows per table; its CSV link has up to CSV_ROWS
const CSV_ROWS = 1000;
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
let timer = null;
let generation = 0; // answers of an older refresh are dropped
let drawn = []; // the charts last drawn, redrawn when the window is resized

// -- formatting --------------------------------------------------------------------------------

const none = (v) => v === null || v === undefined;
const count = (n) => (none(n) ? "–" : Number(n).toLocaleString("en-US", { maximumFractionDigits: 2 }));
const ms = (n) => (none(n) ? "–" : Number(n).toLocaleString("en-US", { minimumFractionDigits: 1, maximumFractionDigits: 1 }));
const withMs = (n) => (none(n) ? "–" : `${ms(n)} ms`);
const pct = (x) => (none(x) ? "–" : `${(100 * x).toFixed(2)} %`);
const label = (v) => (none(v) || v === "" ? "(none)" : String(v));

// -- what the page shows -----------------------------------------------------------------------

// Cards of the tool calls (summary.tool_calls), ids `${prefix}calls` and so on.
const toolCallCards = (prefix, calls, extra = []) => {
  const tc = (s) => s.tool_calls;
  return [
    [`${prefix}calls`, calls, (s) => tc(s).calls, count],
    [`${prefix}errors`, "Errors", (s) => tc(s).errors, count],
    [`${prefix}error-rate`, "Error rate", (s) => tc(s).error_rate, pct],
    [`${prefix}p50`, "Latency p50", (s) => tc(s).latency_ms.p50, withMs],
    [`${prefix}p95`, "p95", (s) => tc(s).latency_ms.p95, withMs],
    [`${prefix}p99`, "p99", (s) => tc(s).latency_ms.p99, withMs],
    ...extra,
    [`${prefix}input-tokens`, "Input tokens", (s) => tc(s).input_tokens, count],
    [`${prefix}output-tokens`, "Output tokens", (s) => tc(s).output_tokens, count],
  ];
};
const CARDS = {
  "cards-tool-calls": toolCallCards("tool-", "Tool calls"),
  "cards-requests": [
    ["requests", "Requests", (s) => s.calls, count],
    ["request-errors", "Errors", (s) => s.errors, count],
    ["request-error-rate", "Error rate", (s) => s.error_rate, pct],
    ["request-p95", "Latency p95", (s) => s.latency_ms.p95, withMs],
    ["distinct-clients", "Clients", (s) => s.distinct_clients, count],
  ],
  "cards-auth": [
    ["auth-requests", "Authentications", (s) => s.auth && s.auth.requests, count],
    ["auth-failures", "Failures", (s) => s.auth && s.auth.failures, count],
    ["auth-success", "Success rate", (s) => s.auth && s.auth.success_rate, pct],
    ["users", "Users", (s) => s.distinct_users, count],
  ],
  "cards-tool": toolCallCards("one-tool-", "Calls", [["one-tool-clients", "Clients", (s) => s.distinct_clients, count]]),
};

const lat = (q) => (r) => r.latency_ms[q];
const COL = {
  calls: ["Calls", (r) => r.calls, count],
  requests: ["Requests", (r) => r.calls, count],
  errors: ["Errors", (r) => r.errors, count],
  errorRate: ["Error rate", (r) => r.error_rate, pct],
  p50: ["p50 ms", lat("p50"), ms],
  p95: ["p95 ms", lat("p95"), ms],
  p99: ["p99 ms", lat("p99"), ms],
  input: ["Input tokens", (r) => r.input_tokens, count],
  output: ["Output tokens", (r) => r.output_tokens, count],
};
// table id -> the view it shows, its parameters, its columns [header, value, format]
const TABLES = {
  tools: { view: "tools", columns: [["Tool", (r) => r, null], ["Server", (r) => r.server, label],
    COL.calls, COL.errors, COL.errorRate, COL.p95] },
  clients: { view: "clients", query: { by: "client" }, columns: [["Client", (r) => r.client, label],
    COL.requests, COL.errors, COL.errorRate, COL.p95] },
  tenants: { view: "tenants", query: { by: "tenant" }, csvBy: "tool", columns: [
    ["Tenant", (r) => r.tenant, label], COL.requests, COL.errors, COL.input, COL.output] },
  agents: { view: "clients", query: { by: "agent" }, columns: [["Agent", (r) => r.agent, label],
    COL.requests, COL.errors, COL.input, COL.output] },
  auth: { view: "auth", columns: [["Method", (r) => r.method, label], ["Requests", (r) => r.calls, count],
    ["Failures", (r) => r.errors, count], ["Success rate", (r) => r.success_rate, pct], COL.p50, COL.p95] },
  discovery: { view: "discovery", columns: [["Service", (r) => r.service, label],
    ["Searches", (r) => r.calls, count], ["Avg results", (r) => r.avg_results, ms],
    ["p50 ms", (r) => r.latency_ms.total.p50, ms], ["p95 ms", (r) => r.latency_ms.total.p95, ms],
    ["Embedding p95 ms", (r) => r.latency_ms.embedding.p95, ms],
    ["Index search p95 ms", (r) => r.latency_ms.search.p95, ms]] },
  protocol: { view: "protocol", columns: [["Flow step", (r) => r.flow_step, label],
    ["Count", (r) => r.calls, count], COL.p50, COL.p95, COL.p99] },
  "tool-clients": { view: "clients", query: { by: "client" }, columns: [
    ["Client", (r) => r.client, label], COL.calls, COL.errors, COL.errorRate, COL.p95, COL.input, COL.output] },
  "tool-tenants": { view: "tenants", query: { by: "tenant" }, columns: [
    ["Tenant", (r) => r.tenant, label], COL.calls, COL.errors, COL.errorRate, COL.p95, COL.input, COL.output] },
};
const OVERVIEW_TABLES = ["tools", "clients", "tenants", "agents", "auth", "discovery", "protocol"];
const TOOL_TABLES = ["tool-clients", "tool-tenants"];

// -- talking to /analytics ---------------------------------------------------------------------

function url(view, query) {
  return `/analytics/${view}?${new URLSearchParams(query)}`;
}

async function fetchWithKey(path) {
  const response = await fetch(path, {
    headers: { "X-API-Key": sessionStorage.getItem(KEY) || "" },
    cache: "no-store",
  });
  if (!response.ok) {
    let body = {};
    try { body = await response.json(); } catch (_) { /* not JSON */ }
    const detail = (body.error && body.error.details && body.error.details[0]) || {};
    const error = new Error(`${response.status}: ${(body.error && body.error.message) || "request failed"}` +
      (detail.field ? ` (${detail.field}: ${detail.message})` : ""));
    error.status = response.status;
    throw error;
  }
  return response;
}

// What one refresh asks: name -> {view, query}.
function plan(base, tool) {
  const out = {};
  const series = { ...base, resolution: RESOLUTION[$("range").value] };
  if (tool) {
    const only = { ...base, ...tool };
    out.summary = { view: "summary", query: only };
    out.timeseries = { view: "timeseries", query: { ...series, ...tool } };
    for (const id of TOOL_TABLES) out[id] = table(id, only);
  } else {
    out.summary = { view: "summary", query: base };
    out.timeseries = { view: "timeseries", query: series };
    for (const id of OVERVIEW_TABLES) out[id] = table(id, base);
  }
  return out;
}

function table(id, base) {
  const spec = TABLES[id];
  return { view: spec.view, query: { ...base, ...spec.query, limit: String(ROWS) } };
}

// The filters of the tool view, from the address (#tool?tool=…&server=…&service=…).
function toolRoute() {
  if (!location.hash.startsWith("#tool?")) return null;
  const params = new URLSearchParams(location.hash.slice("#tool?".length));
  const out = {};
  for (const name of ["tool", "server", "service"]) if (params.get(name)) out[name] = params.get(name);
  return out.tool ? out : null;
}

// -- drawing -----------------------------------------------------------------------------------

function el(tag, attrs = {}, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function buildCards() {
  for (const [id, cards] of Object.entries(CARDS)) {
    const list = el("dl");
    for (const [valueId, name] of cards) {
      const card = el("div", { class: "card" });
      card.append(el("dt", {}, name), el("dd", { id: valueId }, "–"));
      list.append(card);
    }
    $(id).replaceChildren(list);
  }
}

function fillCards(id, summary) {
  for (const [valueId, , get, format] of CARDS[id]) $(valueId).textContent = format(get(summary));
}

function timeLabel(t, resolution) {
  return resolution === "day" ? t.slice(5, 10) : t.slice(5, 16).replace("T", " ");
}

function frame(container, maxY, points, resolution, title) {
  const W = Math.max(300, Math.round(container.clientWidth || 600)), H = 180, L = 44, R = 6, T = 8, B = 20;
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": title });
  svg.append(el("svg:line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  const y = (v) => H - B - (v / maxY) * (H - B - T);
  for (const f of [0, 0.5, 1]) {
    svg.append(el("svg:line", { class: "gridline", x1: L, y1: y(maxY * f), x2: W - R, y2: y(maxY * f) }));
    svg.append(el("svg:text", { x: L - 4, y: y(maxY * f) + 3, "text-anchor": "end" },
      (maxY * f).toLocaleString("en-US", { maximumFractionDigits: maxY < 10 ? 1 : 0 })));
  }
  const slot = (W - L - R) / Math.max(1, points.length);
  const x = (i) => L + (i + 0.5) * slot;
  const every = Math.max(1, Math.ceil(points.length / Math.max(2, Math.floor((W - L) / 90))));
  points.forEach((p, i) => {
    if (i % every === 0) svg.append(el("svg:text", { x: x(i), y: H - 6, "text-anchor": "middle" }, timeLabel(p.t, resolution)));
  });
  container.replaceChildren(svg);
  return { svg, x, y, slot, width: Math.max(1, slot - 1), base: H - B };
}

// Bars, one series over the other (each is at most the one before it).
function drawBars(container, points, resolution, series, title) {
  const maxY = Math.max(1, ...points.map((p) => series[0][1](p)));
  const f = frame(container, maxY, points, resolution, title);
  points.forEach((p, i) => {
    for (const [name, get, text] of series) {
      const v = get(p);
      if (!v) continue;
      const bar = el("svg:rect", { class: `bar ${name}`, x: f.x(i) - f.width / 2, y: f.y(v), width: f.width,
        height: f.base - f.y(v), "data-t": p.t, "data-value": v });
      bar.append(el("svg:title", {}, `${p.t} ${text}: ${count(v)}`));
      f.svg.append(bar);
    }
  });
}

// A line through consecutive intervals with data, broken at empty ones; a dot on every
// interval with data, so that a lone interval shows too.
function drawLatency(container, points, resolution, get, title) {
  const values = points.flatMap((p) => ["p50", "p95", "p99"].map((q) => get(p)[q] || 0));
  const f = frame(container, Math.max(1, ...values), points, resolution, title);
  const radius = Math.min(2.5, Math.max(1.5, f.slot / 3)); // smaller where intervals are dense
  for (const q of ["p50", "p95", "p99"]) {
    let d = "", run = 0;
    points.forEach((p, i) => {
      const v = get(p)[q];
      if (none(v)) { run = 0; return; }
      d += `${run ? "L" : "M"}${f.x(i).toFixed(1)},${f.y(v).toFixed(1)}`;
      run += 1;
    });
    if (d) f.svg.append(el("svg:path", { class: `line ${q}`, d }));
    points.forEach((p, i) => {
      const v = get(p)[q];
      if (none(v)) return;
      const dot = el("svg:circle", { class: `point ${q}`, cx: f.x(i).toFixed(1), cy: f.y(v).toFixed(1), r: radius,
        "data-t": p.t, "data-value": v });
      dot.append(el("svg:title", {}, `${p.t} ${q}: ${ms(v)} ms`));
      f.svg.append(dot);
    });
  }
}

function toolLink(r) {
  const params = new URLSearchParams({ tool: r.tool });
  if (!none(r.server)) params.set("server", r.server);
  if (!none(r.service)) params.set("service", r.service);
  return el("a", { href: `#tool?${params}` }, r.tool);
}

function csvLink(text, view, query, name, what) {
  const a = el("a", { class: "csv", href: url(view, { ...query, format: "csv" }), download: `${name}.csv`,
    "aria-label": `${what} as CSV` }, text);
  return a;
}

function fillTable(id, step, body) {
  const spec = TABLES[id];
  const heading = $(id).previousElementSibling;
  const table = el("table", { "aria-labelledby": heading.id });
  const head = el("tr");
  spec.columns.forEach(([name], i) => head.append(el("th", i ? { scope: "col", class: "num" } : { scope: "col" }, name)));
  table.append(el("thead"), el("tbody"));
  table.tHead.append(head);
  for (const row of body.rows) {
    const tr = el("tr");
    spec.columns.forEach(([, get, format], i) => {
      if (i === 0) {
        const th = el("th", { scope: "row" });
        th.append(format ? format(get(row)) : toolLink(get(row)));
        tr.append(th);
      } else {
        tr.append(el("td", { class: "num" }, format(get(row))));
      }
    });
    table.tBodies[0].append(tr);
  }
  if (!body.rows.length) {
    const tr = el("tr");
    tr.append(el("td", { colspan: spec.columns.length, class: "empty" }, "nothing in this range"));
    table.tBodies[0].append(tr);
  }
  const what = heading.firstChild.textContent.trim();
  const links = el("p", { class: "links" });
  if (body.total > body.rows.length) {
    links.append(el("span", { class: "more" }, `${count(body.rows.length)} of ${count(body.total)} · `));
  }
  const query = { ...step.query, limit: String(CSV_ROWS) };
  links.append(csvLink("CSV", step.view, query, id, what));
  if (spec.csvBy) {
    links.append(" · ", csvLink(`CSV by ${spec.csvBy}`, step.view, { ...query, by: spec.csvBy }, `${id}-by-${spec.csvBy}`, `${what} by ${spec.csvBy}`));
  }
  const scroll = el("div", { class: "scroll" });
  scroll.append(table);
  $(id).replaceChildren(scroll, links);
}

function draw() {
  for (const chart of drawn) chart();
}

function render(tool, steps, data) {
  const main = tool ? $("tool-view") : $("overview");
  $(tool ? "overview" : "tool-view").hidden = true;
  main.hidden = false;
  const series = data.timeseries;
  const resolution = series.resolution;
  const calls = (p) => p.tool_calls.calls;
  const errors = (p) => p.tool_calls.errors;
  const latency = (p) => p.tool_calls.latency_ms;
  if (tool) {
    const where = [tool.server && `server ${tool.server}`, tool.service && `service ${tool.service}`].filter(Boolean);
    $("tool-title").textContent = `Tool ${tool.tool}${where.length ? ` (${where.join(", ")})` : ""}`;
    document.title = `${tool.tool} · MCP metrics`;
    fillCards("cards-tool", data.summary);
    drawn = [
      () => drawBars($("tool-chart-calls"), series.points, resolution, [["calls", calls, "calls"], ["errors", errors, "errors"]], `Calls and errors of ${tool.tool} over time`),
      () => drawLatency($("tool-chart-latency"), series.points, resolution, latency, `Latency of ${tool.tool} over time`),
    ];
  } else {
    document.title = "MCP metrics overview";
    fillCards("cards-tool-calls", data.summary);
    fillCards("cards-requests", data.summary);
    fillCards("cards-auth", data.summary);
    drawn = [
      () => drawBars($("chart-calls"), series.points, resolution,
        [["requests", (p) => p.calls, "all requests"], ["calls", calls, "tool calls"], ["errors", errors, "tool errors"]],
        "All requests, tool calls and tool errors over time"),
      () => drawLatency($("chart-latency"), series.points, resolution, latency, "Tool-call latency over time"),
    ];
  }
  draw();
  for (const a of main.querySelectorAll("a.csv[data-table]")) {
    const step = steps.timeseries;
    a.setAttribute("href", url(step.view, { ...step.query, format: "csv" }));
    a.setAttribute("download", "timeseries.csv");
    a.setAttribute("aria-label", "The time series as CSV");
  }
  for (const id of tool ? TOOL_TABLES : OVERVIEW_TABLES) fillTable(id, steps[id], data[id]);
  main.dataset.since = series.since;
  main.dataset.until = series.until;
  main.dataset.range = $("range").value;
  main.dataset.service = steps.summary.query.service || "";
}

// -- refresh loop ------------------------------------------------------------------------------

async function refresh() {
  const mine = ++generation;
  const until = new Date();
  const base = { since: new Date(until - RANGE_MS[$("range").value]).toISOString(), until: until.toISOString() };
  const service = $("service").value.trim();
  if (service) base.service = service;
  const tool = toolRoute();
  const steps = plan(base, tool);
  try {
    const names = Object.keys(steps);
    const answers = await Promise.all(names.map((n) => fetchWithKey(url(steps[n].view, steps[n].query)).then((r) => r.json())));
    if (mine !== generation) return;
    render(tool, steps, Object.fromEntries(names.map((n, i) => [n, answers[i]])));
    $("error").hidden = true;
    $("status").textContent = `Updated ${until.toLocaleTimeString()} · ${base.since.slice(0, 16)} → ${base.until.slice(0, 16)} UTC · refreshes every ${REFRESH_MS / 1000} s`;
  } catch (error) {
    if (mine !== generation) return;
    showError(error);
  }
}

function showError(error) {
  $("error").textContent = error.message;
  $("error").hidden = false;
  if (error.status === 401 || error.status === 403) stop();
}

// A CSV link needs the key in a header: fetch it, then save what came.
async function download(link) {
  try {
    const blob = await (await fetchWithKey(link.getAttribute("href"))).blob();
    const href = URL.createObjectURL(blob);
    const a = el("a", { href, download: link.getAttribute("download") });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(href), 60000);
  } catch (error) {
    showError(error);
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
  generation += 1;
  sessionStorage.removeItem(KEY);
  $("key-form").hidden = false;
  $("controls").hidden = true;
}

document.addEventListener("DOMContentLoaded", () => {
  buildCards();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
    start();
  });
  $("forget").addEventListener("click", () => { stop(); $("overview").hidden = true; $("tool-view").hidden = true; });
  $("refresh").addEventListener("click", refresh);
  $("range").addEventListener("change", refresh);
  $("service").addEventListener("change", refresh);
  window.addEventListener("hashchange", () => { if (sessionStorage.getItem(KEY)) refresh(); });
  document.addEventListener("click", (event) => {
    const link = event.target.closest("a.csv");
    if (link) { event.preventDefault(); download(link); }
  });
  let resizing = null;
  window.addEventListener("resize", () => { clearTimeout(resizing); resizing = setTimeout(draw, 150); });
  if (sessionStorage.getItem(KEY)) start();
});
