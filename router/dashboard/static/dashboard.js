// llmfleet fleet dashboard: reads /admin/dashboard/events (SSE over fetch, so the admin
// token can travel in the Authorization header) and draws everything as plain SVG/HTML.
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
const TOKEN_KEY = "llmfleet-admin-token";
const state = { data: null, rings: null, ringsVersion: -1, messages: 0, lastAt: 0, colors: new Map() };

// ---- admin token: from the URL fragment (#token=...) or the login field ------------------
function takeTokenFromFragment() {
  const match = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}
function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }
function authHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  if (token()) headers.Authorization = "Bearer " + token();
  return headers;
}

// ---- helpers ---------------------------------------------------------------------------
const $ = (id) => document.getElementById(id);
// Replace an element's content only when it changed (no relayout for an identical table).
const lastHtml = new WeakMap();
function setHtml(node, html) {
  if (lastHtml.get(node) === html) return;
  lastHtml.set(node, html);
  node.innerHTML = html;
}
function el(tag, attrs, text) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function fmtSeconds(s) {
  if (s === null || s === undefined) return "—";
  if (s === 0) return "0";
  if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 1 : 0) + " ms";
  return s.toFixed(s >= 10 ? 0 : 2) + " s";
}
function fmtRate(x) { return x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2).replace(/\.?0+$/, "") || "0"; }
function fmtTime(t) { return new Date(t * 1000).toLocaleTimeString([], { hour12: false }); }
// Distinct colours for up to hundreds of instances: golden-angle hues, two lightness bands.
function colorOf(id) {
  if (!state.colors.has(id)) {
    const i = state.colors.size;
    const hue = (i * 137.508) % 360;
    const light = i % 2 ? 42 : 55;
    state.colors.set(id, `hsl(${hue.toFixed(1)}, 62%, ${light}%)`);
  }
  return state.colors.get(id);
}
const REASON_COLORS = { affinity: "#2f6fed", slo_fallback: "#d98a00", load: "#d23c3c", rebalance: "#8e44ad",
  round_robin: "#1f9d61", hash: "#0d9488", least_loaded: "#1f9d61", power_of_two: "#0d9488" };
const EXTRA_COLORS = ["#7c3aed", "#0891b2", "#be185d", "#65a30d", "#9a3412"];
function reasonColor(name, i) { return REASON_COLORS[name] || EXTRA_COLORS[i % EXTRA_COLORS.length]; }

function banner(message, kind) {
  const node = $("banner");
  node.className = "banner " + (kind || "");
  node.textContent = message;
  if (!message) node.classList.add("hidden");
  clearTimeout(banner.timer);
  if (message && kind === "ok") banner.timer = setTimeout(() => banner(""), 5000);
}

// ---- live stream ------------------------------------------------------------------------
let streamAbort = null;
async function connect() {
  const live = $("live");
  if (streamAbort) streamAbort.abort();
  const abort = streamAbort = new AbortController();
  try {
    const response = await fetch("/admin/dashboard/events", { headers: authHeaders(), cache: "no-store", signal: abort.signal });
    if (response.status === 401 || response.status === 403) {
      live.className = "live off"; $("live-text").textContent = "admin token needed";
      banner("This gateway needs the admin token: enter it above (or open /dashboard#token=…).", "error");
      return; // reconnect when a token is entered
    }
    if (!response.ok || !response.body) throw new Error("HTTP " + response.status);
    live.className = "live on"; $("live-text").textContent = "live";
    if ($("banner").classList.contains("error")) banner("");
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const chunk = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = chunk.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (data) onState(JSON.parse(data));
      }
    }
    throw new Error("stream ended");
  } catch (err) {
    if (abort.signal.aborted) return; // closed on purpose (page hidden, new token)
    live.className = "live off"; $("live-text").textContent = "reconnecting…";
    setTimeout(connect, 2000);
  }
}
// Leaving the page closes the stream at once (a page kept in the back/forward cache would
// otherwise hold it open); coming back reconnects.
window.addEventListener("pagehide", () => { if (streamAbort) streamAbort.abort(); });
window.addEventListener("pageshow", (ev) => { if (ev.persisted) connect(); });

// What the page itself measures (benchmarks and tests read it): updates received since
// the last reset, the longest gap between two, and the time spent drawing them.
// ``first``/``last``: arrival of the first and last update since the reset, so the rate is
// (messages - 1) / (last - first), with no fencepost error at either end.
const freshStats = () => ({ since: performance.now(), first: null, last: null, messages: 0,
  maxGapMs: 0, renderMs: 0, maxRenderMs: 0, maxPublishMs: 0 });
const pageStats = freshStats();
window.llmfleetDashboard = {
  get messages() { return state.messages; },
  resetStats() { Object.assign(pageStats, freshStats()); },
  stats() { return Object.assign({ elapsedMs: performance.now() - pageStats.since }, pageStats); },
};

function onState(data) {
  const t0 = performance.now();
  if (pageStats.last !== null) pageStats.maxGapMs = Math.max(pageStats.maxGapMs, t0 - pageStats.last);
  if (pageStats.first === null) pageStats.first = t0;
  pageStats.last = t0;
  pageStats.messages += 1;
  if (data.publish_ms !== undefined) pageStats.maxPublishMs = Math.max(pageStats.maxPublishMs, data.publish_ms);
  render(data);
  const took = performance.now() - t0;
  pageStats.renderMs += took;
  pageStats.maxRenderMs = Math.max(pageStats.maxRenderMs, took);
}

function render(data) {
  state.data = data;
  state.messages += 1;
  state.lastAt = Date.now();
  document.body.dataset.messages = String(state.messages);
  if (data.rings) { state.rings = data.rings; state.ringsVersion = data.rings_version; }
  renderHeader(data);
  renderKpis(data);
  renderInstances(data);
  renderRings(data);
  renderReasons(data.series);
  renderTtft(data.series, data.slo_ttft_s);
  renderMigrations(data);
  renderRecent(data.recent);
  renderEvents(data.events);
}

// ---- header and KPIs ------------------------------------------------------------------------
function renderHeader(d) {
  $("gateway-chip").textContent = "gateway " + d.gateway_id + (d.is_leader ? " (leader)" : "");
  $("leader-chip").textContent = "leader " + (d.leader || "none");
  $("epoch-chip").textContent = "ring epoch " + d.epoch;
}

function renderKpis(d) {
  const total = d.instances.length;
  const healthy = d.instances.filter((i) => i.healthy).length;
  const draining = d.instances.filter((i) => i.draining).length;
  $("kpi-instances").textContent = `${healthy} / ${total}`;
  $("kpi-instances-sub").textContent = `healthy${draining ? ` · ${draining} draining` : ""}`;
  const rps = d.series.rps;
  $("kpi-rps").textContent = rps.length ? fmtRate(rps[rps.length - 1]) : "—";
  const p50 = lastValue(d.series.ttft_p50), p99 = lastValue(d.series.ttft_p99);
  $("kpi-ttft").textContent = p50 === null ? "—" : `${fmtSeconds(p50)} / ${fmtSeconds(p99)}`;
  $("kpi-ttft-sub").textContent = `SLO ${fmtSeconds(d.slo_ttft_s)}` + (p99 !== null && p99 > d.slo_ttft_s ? " · p99 over SLO" : "");
  $("kpi-policy").textContent = d.policy;
  $("kpi-admission").textContent = d.admission.enabled ? d.admission.mode : "none (not enabled)";
  const queued = d.admission.queued || {};
  $("kpi-admission").title = d.admission.enabled
    ? "queued now: " + Object.entries(queued).map(([k, v]) => `${k} ${v}`).join(", ") : "";
  const select = $("policy-select");
  if (select.options.length !== d.policies.length) {
    select.innerHTML = d.policies.map((p) => `<option>${esc(p)}</option>`).join("");
  }
  if (document.activeElement !== select && !select.dataset.touched) select.value = d.policy;
  const adm = $("admission-select");
  if (document.activeElement !== adm && !adm.dataset.touched) adm.value = d.admission.mode;
}
function lastValue(xs) {
  for (let i = xs.length - 1; i >= 0; i--) if (xs[i] !== null) return xs[i];
  return null;
}

// ---- instances table ------------------------------------------------------------------------
function renderInstances(d) {
  // Rows are keyed by instance and updated cell by cell: a row, and its Drain button, stays
  // the same element across updates, so a click is never lost to a re-render.
  const tbody = $("instances").tBodies[0];
  const existing = new Map([...tbody.rows].map((r) => [r.dataset.instance, r]));
  d.instances.forEach((i, index) => {
    const stateBadge = !i.healthy ? '<span class="badge bad">down</span>'
      : i.draining ? '<span class="badge warn">draining</span>' : '<span class="badge ok">healthy</span>';
    const kv = Math.max(0, Math.min(1, i.kv_usage));
    const hit = i.prefix_hit_rate === null ? '<span class="muted">—</span>' : (i.prefix_hit_rate * 100).toFixed(0) + " %";
    const queues = !d.admission.enabled ? '<span class="badge off">not enabled</span>'
      : `<span class="${i.queued ? "" : "muted"}">${i.queued || 0} queued</span>`;
    const age = i.report_age_s === null ? "—" : i.report_age_s < 1 ? "< 1 s" : i.report_age_s.toFixed(0) + " s";
    const action = i.draining
      ? `<button class="secondary btn-small" data-undrain="${esc(i.id)}">Undrain</button>`
      : `<button class="danger btn-small" data-drain="${esc(i.id)}">Drain</button>`;
    const cells = [
      `<span class="swatch" style="background:${colorOf(i.id)}"></span>${esc(i.id)}`,
      esc(i.api || "—"), stateBadge, String(i.running), String(i.waiting),
      `<span class="bar ${kv > 0.9 ? "hot" : ""}"><span style="width:${(kv * 100).toFixed(1)}%"></span></span><span class="bar-text">${(kv * 100).toFixed(0)} %</span>`,
      hit, fmtRate(i.routed_per_s), queues, age, action];
    let row = existing.get(i.id);
    if (row) {
      existing.delete(i.id);
    } else {
      row = document.createElement("tr");
      row.dataset.instance = i.id;
      const numeric = [3, 4, 6, 7, 9];
      row.innerHTML = cells.map((_, k) => `<td${numeric.includes(k) ? ' class="num"' : ""}></td>`).join("");
    }
    cells.forEach((html, k) => setHtml(row.cells[k], html));
    row.className = !i.healthy ? "down" : i.draining ? "draining" : "";
    row.dataset.state = !i.healthy ? "down" : i.draining ? "draining" : "healthy";
    if (tbody.rows[index] !== row) tbody.insertBefore(row, tbody.rows[index] || null);
  });
  existing.forEach((row) => row.remove());
  const byClass = Object.entries(d.admission.queued || {}).map(([k, v]) => `${v} ${k}`).join(", ");
  $("instances-note").textContent = `${d.instances.length} registered` +
    (d.admission.enabled ? ` · admission ${d.admission.mode}: ${byClass || "nothing"} queued` : "");
  const target = $("migrate-target");
  const wanted = ["", ...d.instances.filter((i) => i.healthy && !i.draining).map((i) => i.id)];
  if (target.options.length !== wanted.length) {
    target.innerHTML = wanted.map((id) => `<option value="${esc(id)}">${id ? esc(id) : "any instance"}</option>`).join("");
  }
}

// ---- rings ----------------------------------------------------------------------------------
function arcPath(cx, cy, r0, r1, a0, a1) {
  const large = a1 - a0 > Math.PI ? 1 : 0;
  const p = (r, a) => `${(cx + r * Math.cos(a)).toFixed(2)} ${(cy + r * Math.sin(a)).toFixed(2)}`;
  return `M${p(r1, a0)}A${r1} ${r1} 0 ${large} 1 ${p(r1, a1)}L${p(r0, a1)}A${r0} ${r0} 0 ${large} 0 ${p(r0, a0)}Z`;
}
const RING_GEOMETRY = [{ r0: 168, r1: 200, label: "A" }, { r0: 122, r1: 154, label: "B" }];

function renderRings(d) {
  const svg = $("rings");
  const rings = state.rings;
  if (!rings) return;
  if (svg.dataset.version !== String(state.ringsVersion)) {
    svg.dataset.version = String(state.ringsVersion);
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const cx = 210, cy = 210;
    if (!rings.rings.length) {
      svg.appendChild(el("text", { x: cx, y: cy, "text-anchor": "middle", class: "ring-center" }, `${rings.policy} uses no hash rings`));
      $("rings-note").textContent = "";
      setHtml($("rings-legend"), "");
      svg.dataset.arcs = "0";
      const keys = $("ring-keys");
      while (keys.firstChild) keys.removeChild(keys.firstChild);
      return;
    }
    const arcs = el("g", { id: "ring-arcs" });
    let count = 0;
    rings.rings.forEach((ring, k) => {
      const g = RING_GEOMETRY[k] || { r0: 80 - 30 * k, r1: 100 - 30 * k };
      for (const [start, bins, owner] of ring.arcs) {
        const a0 = (start / rings.bins) * 2 * Math.PI - Math.PI / 2;
        const a1 = ((start + bins) / rings.bins) * 2 * Math.PI - Math.PI / 2;
        const name = owner >= 0 ? rings.members[owner] : null;
        const path = el("path", { d: arcPath(cx, cy, g.r0, g.r1, a0, a1 - 0.0005),
          fill: name ? colorOf(name) : "#d5d9e0", "data-owner": name || "" });
        path.appendChild(el("title", {}, `ring ${g.label || k}: ${name || "no routable owner"}`));
        arcs.appendChild(path);
        count += 1;
      }
    });
    svg.appendChild(arcs);
    svg.dataset.arcs = String(count);
    svg.appendChild(el("text", { x: cx, y: cy - 6, "text-anchor": "middle", class: "ring-center" }, rings.policy));
    svg.appendChild(el("text", { x: cx, y: cy + 12, "text-anchor": "middle", class: "ring-label" }, "outer A · inner B"));
    renderRingLegend(rings, d);
  } else {
    renderRingLegend(rings, d);
  }
  // Keys of the last requests (cheap: at most 64 dots, redrawn every update).
  const keys = $("ring-keys");
  while (keys.firstChild) keys.removeChild(keys.firstChild);
  const cx = 210, cy = 210;
  for (const r of d.recent) {
    if (r.position === null || r.position === undefined) continue;
    const a = r.position * 2 * Math.PI - Math.PI / 2;
    const fade = Math.max(0.25, 1 - r.age_s / 30);
    for (const g of RING_GEOMETRY.slice(0, state.rings.rings.length)) {
      const rr = g.r1 + 5;
      const dot = el("circle", { cx: (cx + rr * Math.cos(a)).toFixed(1), cy: (cy + rr * Math.sin(a)).toFixed(1), r: 3.2,
        fill: colorOf(r.instance), "fill-opacity": fade.toFixed(2), stroke: "#fff", "stroke-width": 0.8 });
      dot.appendChild(el("title", {}, `${r.id} → ${r.instance} (${r.reason})`));
      keys.appendChild(dot);
    }
  }
  $("rings-note").textContent = `${state.rings.members.length} members · ${d.recent.filter((r) => r.position !== null).length} recent keys`;
}

function renderRingLegend(rings, d) {
  const byId = new Map(d.instances.map((i) => [i.id, i]));
  const rows = rings.members.map((m) => {
    const shares = rings.rings.map((ring) => ring.share[m] || 0);
    const inst = byId.get(m);
    const note = !inst ? "gone" : !inst.healthy ? "down" : inst.draining ? "draining" : "";
    return `<tr data-member="${esc(m)}"><td><span class="swatch" style="background:${colorOf(m)}"></span>${esc(m)}</td>` +
      shares.map((s) => `<td class="num">${(s * 100).toFixed(1)} %</td>`).join("") +
      `<td class="muted">${note}</td></tr>`;
  });
  const head = `<tr><td class="muted">instance</td>${rings.rings.map((_, k) => `<td class="num muted">ring ${"AB"[k] || k}</td>`).join("")}<td></td></tr>`;
  setHtml($("rings-legend"), `<table>${head}${rows.join("")}</table>`);
}

// ---- charts -------------------------------------------------------------------------------
function lineChart(svg, times, series, opts) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = 640, H = 200, left = 44, right = 8, top = 8, bottom = 20;
  const values = series.flatMap((s) => s.values.filter((v) => v !== null));
  if (opts.reference !== undefined) values.push(opts.reference);
  const t1 = times.length ? times[times.length - 1] : 0;
  const t0 = t1 - (opts.span || 120);
  const x = (t) => left + ((t - t0) / (t1 - t0 || 1)) * (W - left - right);
  let y, ticks;
  if (opts.log) {
    // Decades from opts.log (the floor) to the first power of ten above every value: a
    // TTFT of 20 ms and an SLO of 3 s are both readable on one axis.
    const lo = Math.log10(opts.log);
    const hi = Math.max(lo + 1, Math.ceil(Math.log10(Math.max(opts.log, ...values) * 1.01)));
    y = (v) => top + (1 - (Math.log10(Math.max(v, opts.log)) - lo) / (hi - lo)) * (H - top - bottom);
    ticks = [];
    for (let e = lo; e <= hi; e++) ticks.push(Math.pow(10, e));
  } else {
    const max = niceMax(Math.max(opts.minMax || 1, ...values) * 1.05);
    y = (v) => top + (1 - v / max) * (H - top - bottom);
    ticks = [0, 1, 2, 3, 4].map((i) => (max / 4) * i);
  }
  for (const v of ticks) {
    svg.appendChild(el("line", { x1: left, x2: W - right, y1: y(v), y2: y(v), class: "grid" }));
    svg.appendChild(el("text", { x: left - 4, y: y(v) + 3, "text-anchor": "end", class: "axis-label" }, (opts.tickFmt || opts.fmt)(v)));
  }
  for (let s = 0; s <= 120; s += 30) {
    svg.appendChild(el("text", { x: s === 120 ? left + 2 : x(t1 - s), y: H - 5, "text-anchor": s === 0 ? "end" : s === 120 ? "start" : "middle", class: "axis-label" }, s === 0 ? "now" : `-${s}s`));
  }
  if (opts.reference !== undefined) {
    svg.appendChild(el("path", { d: `M${left} ${y(opts.reference)}H${W - right}`, class: "slo" }));
  }
  for (const s of series) {
    let d = "", pen = false;
    s.values.forEach((v, i) => {
      if (v === null || times[i] < t0) { pen = false; return; }
      d += `${pen ? "L" : "M"}${x(times[i]).toFixed(1)} ${y(v).toFixed(1)}`;
      pen = true;
    });
    if (s.area && d) {
      const xs = [...d.matchAll(/[ML]([\d.]+) /g)].map((m) => m[1]);
      svg.appendChild(el("path", { d: `${d}L${xs[xs.length - 1]} ${y(0)}L${xs[0]} ${y(0)}Z`, fill: s.color, "fill-opacity": 0.18, stroke: "none" }));
    }
    const path = el("path", { d: d || `M${left} ${y(0)}`, class: "series", stroke: s.color, "data-series": s.name });
    svg.appendChild(path);
  }
}

// The smallest "round" axis top (1, 2, 2.5 or 5 times a power of ten, times 4 steps) >= v.
function niceMax(v) {
  const raw = v / 4;
  const p = Math.pow(10, Math.floor(Math.log10(raw)));
  const m = raw / p;
  return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 2.5 ? 2.5 : m <= 5 ? 5 : 10) * p * 4;
}

function renderReasons(series) {
  const names = Object.keys(series.reasons);
  const lines = [{ name: "all requests", values: series.rps, color: "#9aa4b5", area: true }]
    .concat(names.map((n, i) => ({ name: n, values: series.reasons[n], color: reasonColor(n, i) })));
  lineChart($("chart-reasons"), series.t, lines, { fmt: (v) => fmtRate(v), minMax: 1 });
  $("legend-reasons").innerHTML = lines.map((l) =>
    `<span><span class="swatch" style="background:${l.color}"></span>${esc(l.name)} ${fmtRate(l.values.length ? l.values[l.values.length - 1] : 0)}/s</span>`).join("");
}

function renderTtft(series, slo) {
  const lines = [{ name: "p50", values: series.ttft_p50, color: "#2f6fed" },
    { name: "p99", values: series.ttft_p99, color: "#8e44ad" }];
  lineChart($("chart-ttft"), series.t, lines, { fmt: (v) => fmtSeconds(v), reference: slo, log: 0.001,
    tickFmt: (v) => (v < 1 ? `${Math.round(v * 1000)} ms` : `${Math.round(v)} s`) });
  $("legend-ttft").innerHTML = lines.map((l) =>
    `<span><span class="swatch" style="background:${l.color}"></span>${l.name} ${fmtSeconds(lastValue(l.values))}</span>`).join("") +
    `<span><span class="swatch" style="background:#d23c3c"></span>SLO ${fmtSeconds(slo)}</span>`;
}

// ---- migrations, recent requests, events ------------------------------------------------------
function renderMigrations(d) {
  const m = d.migrations;
  if (!m.enabled) {
    setHtml($("migrations"), '<div class="placeholder">Live migration is not enabled in this gateway yet. ' +
      "Migrations in flight and recent ones, with their downtime, will be listed here.</div>");
    $("migrations-note").textContent = "not enabled";
    return;
  }
  const rows = m.in_flight.concat(m.recent).map((x) => `<tr><td>${esc(x.request_id || "")}</td><td>${esc(x.source || "")} → ${esc(x.target || "")}</td>` +
    `<td>${esc(x.state || x.outcome || "")}</td><td class="num">${x.downtime_s !== undefined ? fmtSeconds(x.downtime_s) : "—"}</td></tr>`);
  setHtml($("migrations"), `<table><thead><tr><th>Request</th><th>Move</th><th>State</th><th class="num">Downtime</th></tr></thead><tbody>${rows.join("")}</tbody></table>`);
  $("migrations-note").textContent = `${m.in_flight.length} in flight`;
}

function renderRecent(recent) {
  const rows = recent.slice().reverse().slice(0, 40).map((r) =>
    `<tr><td>${esc(r.id.slice(0, 18))}</td><td><span class="swatch" style="background:${colorOf(r.instance)}"></span>${esc(r.instance)}</td>` +
    `<td>${esc(r.reason)}</td><td class="muted">${r.candidates.map(esc).join(", ")}</td><td class="num">${r.age_s.toFixed(1)} s</td></tr>`);
  setHtml($("recent").tBodies[0], rows.join(""));
}

function renderEvents(events) {
  const items = events.slice().reverse().map((e) =>
    `<li><span class="time">${fmtTime(e.t)}</span><span class="kind ${esc(e.kind)}">${esc(e.kind)}</span><span>${esc(e.message)}</span></li>`);
  setHtml($("events"), items.join("") || '<li class="muted">no events yet</li>');
}

// ---- admin actions ---------------------------------------------------------------------------
async function admin(path, body) {
  const response = await fetch(path, { method: "POST", headers: authHeaders({ "content-type": "application/json" }), body: JSON.stringify(body || {}) });
  let payload = null;
  try { payload = await response.json(); } catch (e) { payload = null; }
  if (!response.ok) {
    const message = payload && payload.error ? payload.error.message : `HTTP ${response.status}`;
    banner(message, "error");
    throw new Error(message);
  }
  return payload;
}

function wireActions() {
  $("instances").addEventListener("click", async (ev) => {
    const button = ev.target.closest("button");
    if (!button) return;
    const drain = button.dataset.drain, undrain = button.dataset.undrain;
    const id = drain || undrain;
    if (!id) return;
    button.disabled = true;
    try {
      await admin(`/admin/instances/${encodeURIComponent(id)}/drain`, { draining: Boolean(drain) });
      banner(`${id} ${drain ? "is draining: it gets no new requests" : "takes requests again"}.`, "ok");
    } catch (e) { /* banner shows it */ }
  });
  $("policy-select").addEventListener("change", (e) => { e.target.dataset.touched = "1"; });
  $("admission-select").addEventListener("change", (e) => { e.target.dataset.touched = "1"; });
  $("policy-apply").addEventListener("click", async () => {
    const select = $("policy-select");
    try {
      const r = await admin("/admin/policy", { policy: select.value });
      banner(`Routing policy ${r.previous} → ${r.policy} (${r.scope}).`, "ok");
    } catch (e) { /* shown */ }
    delete select.dataset.touched;
  });
  $("admission-apply").addEventListener("click", async () => {
    const select = $("admission-select");
    try {
      const r = await admin("/admin/admission", { mode: select.value });
      banner(`Admission mode: ${r.mode}.`, "ok");
    } catch (e) { /* shown */ }
    delete select.dataset.touched;
  });
  $("migrate-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const id = $("migrate-request").value.trim();
    if (!id) { banner("Enter the id of a running request to migrate.", "error"); return; }
    const target = $("migrate-target").value || null;
    try {
      await admin(`/admin/requests/${encodeURIComponent(id)}/migrate`, { target });
      banner(`Migration of ${id} started.`, "ok");
    } catch (e) { /* shown */ }
  });
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    banner("Token saved for this tab.", "ok");
    connect();
  });
}

// A stalled stream shows as such: the live dot turns red after 3 s without an update.
setInterval(() => {
  const quiet = state.lastAt ? Date.now() - state.lastAt : 0;
  if (quiet > 3000) { $("live").className = "live off"; $("live-text").textContent = "stalled"; }
  if (quiet > 8000) { state.lastAt = Date.now(); connect(); } // the server stopped feeding us
}, 1000);

takeTokenFromFragment();
wireActions();
connect();
