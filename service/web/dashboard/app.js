// Sluice dashboard: one page, no build step, no third-party code.
// It keeps the API token in sessionStorage and calls the JSON API with "Authorization: Bearer".
"use strict";

const TOKEN_KEY = "sluice.token";
const TERMINAL = new Set(["completed", "failed", "expired", "cancelled"]);
const LIST_EVERY_MS = 2000;      // GET /v1/batches
const BATCH_EVERY_MS = 1000;     // GET /v1/batches/{id} for running batches, when no event stream
const CLUSTER_EVERY_MS = 2000;   // GET /v1/sluice/cluster (live cluster throughput, the cluster view)
const HISTORY_EVERY_MS = 60000;  // GET /v1/sluice/history (kept in Redis: charts start from it)
const THROUGHPUT_MINUTES = 60;   // the throughput chart's history
const CLUSTER_HISTORY_MINUTES = 1440;
const KEEP_SAMPLES_MS = 10 * 60 * 1000;
// Running batches followed one by one (the rest through the list): few event streams, since a
// browser opens only 6 connections to one HTTP/1.1 server and the page needs some for itself.
const MAX_POLLED = 10;
const MAX_STREAMS = 3;
const MAX_ERROR_FILE_BYTES = 32 * 1024 * 1024;

const $ = (sel) => document.querySelector(sel);
const apiBase = new URL("../v1/", window.location.href);

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  view: "batches",
  batches: new Map(),        // id -> batch object
  order: [],                 // ids, newest first
  samples: new Map(),        // id -> [{t, done}]
  totals: [],                // [{t, v}] live lines/s of the whole cluster, from its exact counters
  lastTotal: null,           // {t, lines}: the cluster's lines counter at the last poll
  history: null,             // {points: [{t, v}], lines, until, since}: the throughput chart's start, from Redis
  clusterHistory: null,      // the last GET /v1/sluice/history?minutes=1440, for the cluster view
  errorCodes: new Map(),     // id -> Map code -> count | Promise | Error
  followers: new Map(),      // id -> {abort(), kind}
  events: null,              // null: not known yet; true/false: GET /v1/batches/{id}/events exists
  selected: null,
  timers: [],
};

// ------------------------------------------------------------------------------------ API
class ApiError extends Error {
  constructor(status, message, code) { super(message); this.status = status; this.code = code; }
}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: `Bearer ${state.token}` }, options.headers || {});
  const res = await fetch(new URL(path, apiBase), Object.assign({}, options, { headers }));
  if (res.status === 401) {
    signOut("The token was rejected (401 invalid_api_key). Sign in with a valid token.");
    throw new ApiError(401, "unauthorized", "invalid_api_key");
  }
  if (!res.ok) {
    let message = `HTTP ${res.status}`, code = null;
    try {
      const body = await res.json();
      if (body && body.error) { message = body.error.message || message; code = body.error.code; }
    } catch (_) { /* not JSON */ }
    throw new ApiError(res.status, message, code);
  }
  return options.raw ? res : res.json();
}

// ------------------------------------------------------------------------------------ helpers
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

const fmtInt = (n) => Number(n || 0).toLocaleString("en-US");
const fmtRate = (r) => (r >= 100 ? r.toFixed(0) : r >= 10 ? r.toFixed(1) : r.toFixed(2));
function fmtTime(unix) {
  if (!unix) return "—";
  const d = new Date(unix * 1000);
  const today = new Date();
  const time = d.toLocaleTimeString("en-GB", { hour12: false });
  return d.toDateString() === today.toDateString() ? time : `${d.toISOString().slice(0, 10)} ${time}`;
}
function fmtAge(s) {
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${(s / 60).toFixed(1)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}
const counts = (b) => b.request_counts || { total: 0, completed: 0, failed: 0 };
const doneOf = (b) => counts(b).completed + counts(b).failed;
function percent(b) {
  const c = counts(b);
  if (b.status === "completed") return 100;
  return c.total ? Math.min(100, Math.floor((100 * (c.completed + c.failed)) / c.total)) : 0;
}
function showError(node, message) {
  node.textContent = message || "";
  node.hidden = !message;
}

// ------------------------------------------------------------------------------------ sign in / out
async function signIn(token) {
  state.token = token;
  try {
    await api("batches?limit=1");
  } catch (e) {
    if (e.status !== 401) showError($("#login-error"), `Could not reach the API: ${e.message}`);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  start();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = "";
  stop();
  state.batches.clear(); state.order = []; state.samples.clear(); state.totals = [];
  state.lastTotal = null; state.history = null; state.clusterHistory = null;
  state.errorCodes.clear(); state.selected = null;
  $("#batches tbody").replaceChildren();
  $("#nav").hidden = true;
  $("#batches-view").hidden = true;
  $("#cluster-view").hidden = true;
  $("#detail").hidden = true;
  $("#login-view").hidden = false;
  $("#token").value = "";
  showError($("#login-error"), message || "");
  $("#token").focus();
}

function start() {
  stop();
  showError($("#login-error"), "");
  $("#login-view").hidden = true;
  $("#nav").hidden = false;
  show(state.view);
  refreshList();
  refreshHistory();
  refreshCluster();
  state.timers.push(setInterval(refreshList, LIST_EVERY_MS));
  state.timers.push(setInterval(refreshCluster, CLUSTER_EVERY_MS));
  state.timers.push(setInterval(refreshHistory, HISTORY_EVERY_MS));
}

function stop() {
  state.timers.forEach(clearInterval);
  state.timers = [];
  for (const f of state.followers.values()) f.abort();
  state.followers.clear();
}

function show(view) {
  state.view = view;
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.dataset.view === view));
  $("#batches-view").hidden = view !== "batches";
  $("#cluster-view").hidden = view !== "cluster";
  if (view === "cluster") refreshCluster();
  if (view === "batches" && state.token) render();  // charts take the width they have now
}

// ------------------------------------------------------------------------------------ batches
async function refreshList() {
  if (!state.token) return;
  let page;
  try {
    page = await api("batches?limit=50");
  } catch (e) {
    if (e.status !== 401) showError($("#banner"), `Could not list batches: ${e.message}`);
    return;
  }
  showError($("#banner"), "");
  state.order = page.data.map((b) => b.id);
  for (const b of page.data) update(b, false);
  render();
  follow();
  $("#updated").textContent = `updated ${new Date().toLocaleTimeString("en-GB", { hour12: false })}`;
}

// A fresher state of one batch (from the list, a poll or an event).
function update(b, rerender = true) {
  const known = state.batches.get(b.id);
  // Never step back to an older state (a list page may cross a more recent event).
  if (known && TERMINAL.has(known.status) && !TERMINAL.has(b.status)) return;
  if (known && doneOf(known) > doneOf(b) && known.status === b.status) return;
  state.batches.set(b.id, b);
  const now = Date.now();
  const s = state.samples.get(b.id) || [];
  if (!s.length || s[s.length - 1].done !== doneOf(b) || now - s[s.length - 1].t > 900) {
    s.push({ t: now, done: doneOf(b) });
    while (s.length > 2 && now - s[0].t > KEEP_SAMPLES_MS) s.shift();
    state.samples.set(b.id, s);
  }
  if (TERMINAL.has(b.status) && state.followers.has(b.id)) {
    state.followers.get(b.id).abort();
    state.followers.delete(b.id);
  }
  if (rerender) { renderRow(b); if (state.selected === b.id) renderDetail(); }
}

// Live throughput of the whole cluster: the change of its exact lines counter between two polls.
function sampleTotal(lines) {
  const now = Date.now();
  if (state.lastTotal && lines >= state.lastTotal.lines) {
    const dt = (now - state.lastTotal.t) / 1000;
    if (dt > 0) state.totals.push({ t: now, v: (lines - state.lastTotal.lines) / dt });
    while (state.totals.length > 2 && now - state.totals[0].t > KEEP_SAMPLES_MS) state.totals.shift();
  }
  state.lastTotal = { t: now, lines };
}

// The per-minute history kept in Redis, as lines/s points: each minute at its middle, the current
// (partial) minute at "now" over the seconds it has had so far.
function historyPoints(h, values) {
  const nowMs = h.now * 1000;
  return h.minutes.map((m, i) => {
    const end = (m + h.minute_s) * 1000;
    if (end <= nowMs) return { t: (m + h.minute_s / 2) * 1000, v: values[i] / h.minute_s };
    return { t: nowMs, v: values[i] / Math.max(1, h.now - m) };
  });
}

async function refreshHistory() {
  if (!state.token) return;
  let h;
  try {
    h = await api(`sluice/history?minutes=${THROUGHPUT_MINUTES}`);
  } catch (_) { return; /* the list refresh reports errors */ }
  const lines = h.total.completed.map((c, i) => c + h.total.failed[i]);
  state.history = { points: historyPoints(h, lines), lines: lines.reduce((a, n) => a + n, 0), until: h.now * 1000,
    since: h.minutes[0] * 1000 };
  if (state.view === "batches") render();
}

// The throughput chart: the history up to when it was read, then the live samples.
function throughputPoints() {
  const until = state.history ? state.history.until : 0;
  return [...(state.history ? state.history.points : []), ...state.totals.filter((p) => p.t > until)];
}

// Lines/s from cumulative samples, each over at least RATE_WINDOW_MS (polls are irregular).
const RATE_WINDOW_MS = 3000;
function rates(samples) {
  const out = [];
  let j = 0;
  for (let i = 1; i < samples.length; i++) {
    while (j + 1 < i && samples[i].t - samples[j + 1].t >= RATE_WINDOW_MS) j++;
    const dt = (samples[i].t - samples[j].t) / 1000;
    if (dt > 0) out.push({ t: samples[i].t, v: Math.max(0, (samples[i].done - samples[j].done) / dt) });
  }
  if (samples.length === 1) out.push({ t: samples[0].t, v: 0 });
  return out;
}

// Follow the running batches: the event stream where the server has one, else a poll each.
function follow() {
  const limit = state.events === false ? MAX_POLLED : MAX_STREAMS;
  const running = state.order.filter((id) => !TERMINAL.has(state.batches.get(id).status)).slice(0, limit);
  for (const [id, f] of state.followers) {
    if (!running.includes(id)) { f.abort(); state.followers.delete(id); }
  }
  for (const id of running) {
    if (state.followers.has(id)) continue;
    state.followers.set(id, state.events === false ? poll(id) : stream(id));
  }
}

function poll(id) {
  let stopped = false;
  const timer = setInterval(async () => {
    try {
      const b = await api(`batches/${encodeURIComponent(id)}`);
      if (!stopped) update(b);
    } catch (_) { /* the list refresh reports errors */ }
  }, BATCH_EVERY_MS);
  return { kind: "poll", abort() { stopped = true; clearInterval(timer); } };
}

function stream(id) {
  const ctrl = new AbortController();
  const follower = { kind: "events", abort() { ctrl.abort(); } };
  (async () => {
    let res;
    try {
      res = await api(`batches/${encodeURIComponent(id)}/events`, {
        raw: true, signal: ctrl.signal, headers: { Accept: "text/event-stream" },
      });
    } catch (e) {
      if (ctrl.signal.aborted) return;
      if (e.status === 404 || e.status === 405) {
        // No event stream on this server (or not for this batch): poll instead.
        if (e.code === "unknown_url" || e.status === 405) state.events = false;
        if (state.followers.get(id) === follower) state.followers.set(id, poll(id));
      } else if (state.followers.get(id) === follower) {
        state.followers.delete(id);  // retried at the next list refresh
      }
      return;
    }
    const type = res.headers.get("Content-Type") || "";
    if (!type.startsWith("text/event-stream")) {
      state.events = false;
      if (state.followers.get(id) === follower) state.followers.set(id, poll(id));
      return;
    }
    state.events = true;
    try {
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value.replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          onEvent(buf.slice(0, cut));
          buf = buf.slice(cut + 2);
        }
      }
    } catch (_) { /* aborted or cut: the next list refresh follows it again */ }
    if (state.followers.get(id) === follower) state.followers.delete(id);
  })();
  return follower;
}

function onEvent(block) {
  const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
  if (!data) return;
  let obj;
  try { obj = JSON.parse(data); } catch (_) { return; }
  const b = obj && obj.object === "batch" ? obj : obj && obj.batch && obj.batch.object === "batch" ? obj.batch : null;
  if (b && state.batches.has(b.id)) update(b);
}

// ------------------------------------------------------------------------------------ rendering
function render() {
  const tbody = $("#batches tbody");
  const rows = new Map([...tbody.children].map((tr) => [tr.dataset.batchId, tr]));
  const wanted = state.order;
  for (const [id, tr] of rows) if (!wanted.includes(id)) tr.remove();
  let prev = null;
  for (const id of wanted) {
    const tr = renderRow(state.batches.get(id));
    if (prev ? prev.nextSibling !== tr : tbody.firstChild !== tr) {
      if (prev) prev.after(tr); else tbody.prepend(tr);
    }
    prev = tr;
  }
  $("#no-batches").hidden = wanted.length > 0;
  const last = state.totals[state.totals.length - 1];
  $("#throughput-now").textContent = last ? `${fmtRate(last.v)} lines/s now` : "";
  const chart = $("#throughput-chart");
  lineChart(chart, throughputPoints(), { unit: "lines/s", since: state.history ? state.history.since : null });
  chart.dataset.historyLines = state.history ? String(state.history.lines) : "";
  if (state.selected) renderDetail();
}

function rowFor(id) {
  let tr = document.querySelector(`#batches tbody tr[data-batch-id="${CSS.escape(id)}"]`);
  if (tr) return tr;
  const cancel = el("button", { type: "button", class: "cancel danger", onclick: () => cancelBatch(id, cancel) }, "Cancel");
  tr = el("tr", { "data-batch-id": id },
    el("td", {}, el("button", { type: "button", class: "link open", onclick: () => openDetail(id) }, id)),
    el("td", {}, el("span", { class: "status" })),
    el("td", {}, el("div", { class: "progress", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100" },
      el("div", { class: "bar" }), el("span", { class: "pct" }))),
    el("td", { class: "num completed" }), el("td", { class: "num failed" }), el("td", { class: "num total" }),
    el("td", { class: "created" }),
    el("td", { class: "actions" },
      el("button", { type: "button", class: "download-output", onclick: () => download(state.batches.get(id).output_file_id, "output") }, "Output"),
      el("button", { type: "button", class: "download-errors", onclick: () => download(state.batches.get(id).error_file_id, "errors") }, "Errors"),
      cancel));
  return tr;
}

function renderRow(b) {
  const tr = rowFor(b.id);
  const c = counts(b), pct = percent(b);
  const status = tr.querySelector(".status");
  status.textContent = b.status;
  status.className = `status s-${b.status}`;
  const bar = tr.querySelector(".progress");
  bar.setAttribute("aria-valuenow", String(pct));
  bar.dataset.status = b.status;
  bar.querySelector(".bar").style.width = `${pct}%`;
  bar.querySelector(".pct").textContent = `${pct}%`;
  tr.querySelector(".completed").textContent = fmtInt(c.completed);
  tr.querySelector(".failed").textContent = fmtInt(c.failed);
  tr.querySelector(".total").textContent = fmtInt(c.total);
  tr.querySelector(".created").textContent = fmtTime(b.created_at);
  tr.querySelector(".download-output").hidden = !b.output_file_id;
  tr.querySelector(".download-errors").hidden = !b.error_file_id;
  tr.querySelector(".cancel").hidden = !(b.status === "validating" || b.status === "in_progress");
  tr.classList.toggle("selected", state.selected === b.id);
  return tr;
}

function openDetail(id) {
  state.selected = id;
  $("#detail").hidden = false;
  document.querySelectorAll("#batches tbody tr").forEach((tr) => tr.classList.toggle("selected", tr.dataset.batchId === id));
  renderDetail();
}

function renderDetail() {
  const b = state.batches.get(state.selected);
  if (!b) { $("#detail").hidden = true; return; }
  $("#detail-title").textContent = `Batch ${b.id}`;
  lineChart($("#detail-chart"), rates(state.samples.get(b.id) || []), { unit: "lines/s" });
  const facts = [
    ["Status", b.status], ["Endpoint", b.endpoint], ["Model", b.model || "—"],
    ["Input file", b.input_file_id], ["Output file", b.output_file_id || "—"], ["Error file", b.error_file_id || "—"],
    ["Created", fmtTime(b.created_at)], ["In progress", fmtTime(b.in_progress_at)],
    ["Finished", fmtTime(b.completed_at || b.failed_at || b.cancelled_at || b.expired_at)],
  ];
  if (b.metadata) for (const [k, v] of Object.entries(b.metadata)) facts.push([`metadata.${k}`, v]);
  $("#detail-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
  renderErrors(b);
}

// Errors by code: the validation errors on the batch, or the lines of its error file.
function renderErrors(b) {
  const box = $("#detail-errors");
  let codes = null;
  if (b.errors && b.errors.data && b.errors.data.length) {
    codes = new Map();
    for (const e of b.errors.data) codes.set(e.code || "unknown", (codes.get(e.code || "unknown") || 0) + 1);
  } else if (b.error_file_id) {
    const cached = state.errorCodes.get(b.id);
    if (cached instanceof Map) codes = cached;
    else if (cached instanceof Error) { box.replaceChildren(el("p", { class: "error", text: `Could not read the error file: ${cached.message}` })); return; }
    else {
      if (!cached) {
        state.errorCodes.set(b.id, countErrorFile(b.error_file_id)
          .then((m) => state.errorCodes.set(b.id, m), (e) => state.errorCodes.set(b.id, e))
          .finally(() => { if (state.selected === b.id) renderDetail(); }));
      }
      box.replaceChildren(el("p", { class: "muted", text: "Reading the error file…" }));
      return;
    }
  } else if (!TERMINAL.has(b.status)) {
    const failed = counts(b).failed;
    box.replaceChildren(el("p", { class: "muted", text: failed
      ? `${fmtInt(failed)} failed so far; codes are known once the error file is written.`
      : "No error so far." }));
    return;
  }
  if (!codes || !codes.size) { box.replaceChildren(el("p", { class: "muted", text: "No errors." })); return; }
  const total = [...codes.values()].reduce((a, n) => a + n, 0);
  const rows = [...codes.entries()].sort((a, z) => z[1] - a[1]).map(([code, n]) =>
    el("tr", { "data-code": code }, el("td", {}, el("code", { text: code })),
      el("td", { class: "num", text: fmtInt(n) }),
      el("td", { class: "bar-cell" }, hbar(Math.max(2, (100 * n) / total)))));
  box.replaceChildren(el("table", { class: "errors" },
    el("thead", {}, el("tr", {}, el("th", { text: "Code" }), el("th", { class: "num", text: "Lines" }), el("th", {}))),
    el("tbody", {}, ...rows)));
}

function hbar(pct) {
  const bar = el("div", { class: "hbar" });
  bar.style.width = `${pct}%`;  // CSSOM, which the page's CSP allows (a style attribute it would not)
  return bar;
}

async function countErrorFile(fileId) {
  const res = await api(`files/${encodeURIComponent(fileId)}/content`, { raw: true });
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  const codes = new Map();
  let buf = "", read = 0;
  const add = (line) => {
    if (!line.trim()) return;
    let code = "unparsable line";
    try {
      const o = JSON.parse(line);
      if (o.error && o.error.code) code = o.error.code;
      else if (o.response && o.response.status_code) {
        const inner = o.response.body && o.response.body.error && o.response.body.error.code;
        code = `HTTP ${o.response.status_code}` + (inner ? ` ${inner}` : "");
      } else code = "unknown";
    } catch (_) { /* counted as unparsable */ }
    codes.set(code, (codes.get(code) || 0) + 1);
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    read += value.length;
    buf += value;
    const lines = buf.split("\n");
    buf = lines.pop();
    lines.forEach(add);
    if (read > MAX_ERROR_FILE_BYTES) { await reader.cancel(); codes.set("(file truncated here)", 0); buf = ""; break; }
  }
  add(buf);
  return codes;
}

// ------------------------------------------------------------------------------------ actions
async function download(fileId, what) {
  if (!fileId) return;
  try {
    const res = await api(`files/${encodeURIComponent(fileId)}/content`, { raw: true });
    const blob = await res.blob();
    let name = `${fileId}.jsonl`;
    const cd = res.headers.get("Content-Disposition") || "";
    const m = /filename\*=UTF-8''([^;]+)/i.exec(cd) || /filename="?([^";]+)"?/i.exec(cd);
    if (m) { try { name = decodeURIComponent(m[1]); } catch (_) { name = m[1]; } }
    const url = URL.createObjectURL(blob);
    const a = el("a", { href: url, download: name, hidden: true });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  } catch (e) {
    if (e.status !== 401) showError($("#banner"), `Could not download the ${what} file ${fileId}: ${e.message}`);
  }
}

async function cancelBatch(id, button) {
  // Two clicks: the first arms the button for a few seconds.
  if (!button.classList.contains("armed")) {
    button.classList.add("armed");
    button.textContent = "Confirm cancel";
    setTimeout(() => { button.classList.remove("armed"); button.textContent = "Cancel"; }, 5000);
    return;
  }
  button.disabled = true;
  try {
    update(await api(`batches/${encodeURIComponent(id)}/cancel`, { method: "POST" }));
  } catch (e) {
    if (e.status !== 401) showError($("#banner"), `Could not cancel ${id}: ${e.message}`);
  } finally {
    button.disabled = false;
    button.classList.remove("armed");
    button.textContent = "Cancel";
  }
}

// ------------------------------------------------------------------------------------ cluster
async function refreshCluster() {
  if (!state.token) return;
  let c;
  try {
    c = await api("sluice/cluster");
  } catch (e) {
    if (e.status !== 401) showError($("#cluster-error"), `Could not read the cluster state: ${e.message}`);
    return;
  }
  sampleTotal(c.lines.completed + c.lines.failed);
  if (state.view !== "cluster") return;
  showError($("#cluster-error"), "");
  const workers = c.processes.filter((p) => p.role === "worker" && p.live);
  const stat = (label, value) => el("div", { class: "stat" }, el("div", { class: "value", text: value }), el("div", { class: "label", text: label }));
  const stale = c.processes.filter((p) => !p.live).length;
  $("#cluster-stats").replaceChildren(
    stat("live web processes", fmtInt(c.processes.filter((p) => p.role === "web" && p.live).length)),
    stat("live workers", fmtInt(workers.length)),
    stat("stale processes", fmtInt(stale)),
    stat("requests in flight", fmtInt(workers.reduce((a, p) => a + (p.in_flight || 0), 0))),
    stat("running batches (yours)", `${fmtInt(c.running_batches.total)} (${fmtInt(c.running_batches.yours)})`),
    stat("lines completed", fmtInt(c.lines.completed)),
    stat("lines failed", fmtInt(c.lines.failed)));
  $("#processes tbody").replaceChildren(...c.processes.map((p) => el("tr", { "data-role": p.role, "data-name": p.name },
    el("td", { text: p.role }), el("td", { text: p.name }), el("td", { text: p.host }), el("td", { text: p.pid }),
    el("td", { class: "num", text: p.role === "worker" ? `${p.in_flight}/${p.concurrency}`
      : p.role === "web" ? `${fmtInt(p.in_flight)} req` : "—" }),
    el("td", { text: (p.state || "") + (p.role === "finalizer" ? ` (${fmtInt(p.leased_batches)} batch${p.leased_batches === 1 ? "" : "es"})` : "") }),
    el("td", { class: "num", text: fmtAge(p.last_beat_s) }),
    el("td", {}, el("span", { class: `health ${p.live ? "live" : "stale"}`, text: p.live ? "live" : "stale" })))));
  $("#no-processes").hidden = c.processes.length > 0;
  $("#providers tbody").replaceChildren(...c.providers.map((p) => el("tr", { "data-provider": p.name },
    el("td", { text: p.name }),
    el("td", {}, el("span", { class: `health ${p.state === "ok" ? "live" : "stale"}`, text: p.state })),
    el("td", { class: "num", text: fmtInt(p.requests_in_flight) }),
    el("td", { class: "num", text: `${fmtInt(p.leases)}/${p.max_concurrency ?? "—"}` }),
    el("td", { class: "num concurrency", title: p.adaptive ? "adaptive (AIMD): found from the provider's answers" : "",
               text: p.concurrency_limit == null ? "—"
                 : `${fmtInt(p.concurrency_limit)}/${p.concurrency_max == null ? "—" : fmtInt(p.concurrency_max)}`
                   + (p.adaptive ? " (adaptive)" : "") }),
    el("td", { class: "num", text: fmtInt(p.rate_limited) }),
    el("td", { class: "num", text: fmtInt(p.retries) }))));
  $("#no-providers").hidden = c.providers.length > 0;
  if (!state.clusterHistory || Date.now() - state.clusterHistory.read > HISTORY_EVERY_MS) refreshClusterHistory();
}

// The cluster view's last 24 hours, per minute: lines, 429s and the upstream latency's median.
async function refreshClusterHistory() {
  if (!state.token) return;
  let h;
  try {
    h = await api(`sluice/history?minutes=${CLUSTER_HISTORY_MINUTES}`);
  } catch (e) {
    if (e.status !== 401) showError($("#cluster-error"), `Could not read the history: ${e.message}`);
    return;
  }
  state.clusterHistory = { read: Date.now(), h };
  const perMinute = (values) => historyPoints(h, values).map((p) => ({ t: p.t, v: p.v * h.minute_s }));
  const lines = h.total.completed.map((c, i) => c + h.total.failed[i]);
  const since = h.minutes[0] * 1000;
  lineChart($("#history-lines"), perMinute(lines), { unit: "lines/min", since });
  lineChart($("#history-429"), perMinute(h.total.rate_limited), { unit: "429s/min", since });
  const p50 = h.minutes.map((m, i) => ({ t: (m + h.minute_s / 2) * 1000, v: h.total.latency_p50_s[i] }))
    .filter((p) => p.v !== null).map((p) => ({ t: p.t, v: p.v * 1000 }));
  lineChart($("#history-p50"), p50, { unit: "ms", since });
  $("#history-lines").dataset.total = String(lines.reduce((a, n) => a + n, 0));
}

// ------------------------------------------------------------------------------------ chart
// A line chart in inline SVG: points [{t (ms), v}], time on x, value on y.
function lineChart(box, points, { unit, since = null }) {
  const NS = "http://www.w3.org/2000/svg";
  // Drawn at the box's own width, so that text keeps its size whatever the screen.
  const W = Math.max(320, Math.round(box.clientWidth || 720)), H = 180, L = 48, R = 12, T = 10, B = 24;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `${unit} over time`);
  const add = (tag, attrs, text) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    svg.append(n);
    return n;
  };
  const now = Date.now();
  // The x axis starts at ``since`` when given (a fixed window), else at the first point (a minute at least).
  const t0 = since ?? (points.length ? Math.min(points[0].t, now - 60000) : now - 60000);
  const max = Math.max(1, ...points.map((p) => p.v));
  const step = niceStep(max / 4);
  const top = Math.ceil(max / step) * step;
  const x = (t) => L + ((t - t0) / Math.max(1, now - t0)) * (W - L - R);
  const y = (v) => T + (1 - v / top) * (H - T - B);
  for (let v = 0; v <= top + 1e-9; v += step) {
    add("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" });
    add("text", { x: L - 6, y: y(v) + 4, class: "tick", "text-anchor": "end" }, fmtRate(v).replace(/\.0+$/, ""));
  }
  const span = now - t0;
  for (let i = 0; i <= 4; i++) {
    const t = t0 + (span * i) / 4;
    const ago = Math.round((now - t) / 1000);
    add("text", { x: x(t), y: H - 6, class: "tick", "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle" },
      ago === 0 ? "now" : ago >= 7200 ? `-${Math.round(ago / 3600)} h` : ago >= 120 ? `-${Math.round(ago / 60)} min`
        : `-${ago} s`);
  }
  if (points.length) {
    const d = points.map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join(" ");
    add("path", { d: `${d} L${x(points[points.length - 1].t).toFixed(1)},${y(0)} L${x(points[0].t).toFixed(1)},${y(0)} Z`, class: "area" });
    add("path", { d, class: "line" });
    if (points.length === 1) add("circle", { cx: x(points[0].t), cy: y(points[0].v), r: 3, class: "dot" });
  } else {
    add("text", { x: W / 2, y: H / 2, class: "tick", "text-anchor": "middle" }, "no samples yet");
  }
  box.replaceChildren(svg);
  box.dataset.points = String(points.length);
}

function niceStep(raw) {
  const p = Math.pow(10, Math.floor(Math.log10(Math.max(raw, 1e-9))));
  for (const m of [1, 2, 2.5, 5, 10]) if (raw <= m * p) return m * p;
  return 10 * p;
}

// ------------------------------------------------------------------------------------ wiring
document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = $("#token").value.trim();
    if (token) signIn(token);
  });
  $("#logout").addEventListener("click", () => signOut(""));
  document.querySelectorAll(".tab").forEach((t) => t.addEventListener("click", () => show(t.dataset.view)));
  $("#detail-close").addEventListener("click", () => {
    state.selected = null;
    $("#detail").hidden = true;
    document.querySelectorAll("#batches tbody tr.selected").forEach((tr) => tr.classList.remove("selected"));
  });
  if (state.token) signIn(state.token); else $("#token").focus();
});
