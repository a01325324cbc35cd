"use strict";
let csrf = "";
const $ = (id) => document.getElementById(id);
const when = (t) => t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) : "–";
const ago = (t) => t ? `${Math.max(0, Math.round(Date.now() / 1000 - t))} s ago` : "–";
const ABSENT = "—";

function cell(row, text, cls) { const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; row.appendChild(td); return td; }
function fill(tableId, rows, columns) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren();
  for (const item of rows) { const tr = document.createElement("tr"); columns(tr, item); body.appendChild(tr); }
}
function list(id, items) {
  $(id).replaceChildren(...items.map((text) => { const li = document.createElement("li"); li.textContent = text; return li; }));
}
async function api(path, options = {}) {
  options.headers = Object.assign({"Content-Type": "application/json", "X-CSRF-Token": csrf}, options.headers || {});
  const reply = await fetch(path, options);
  if (reply.status === 401) { window.location = "/login"; throw new Error("logged out"); }
  const data = await reply.json();
  if (!reply.ok) { $("error").textContent = data.detail || reply.statusText; throw new Error(data.detail); }
  $("error").textContent = "";
  return data;
}
const chartWidth = (id) => Math.max(320, Math.min(1100, $(id).parentElement.clientWidth || 900));

// One point per step (a later report of a step replaces the earlier one), in step order: uPlot needs
// ascending x; several rounds at one step drew a zero-length segment, so markers are on and a single
// step gets an x range around it.
const byStep = new Map();  // step -> [train loss, eval loss]
let received = 0, lastMetricId = 0;
const chart = new uPlot({title: "loss by step", width: chartWidth("chart"), height: 260,
  scales: {x: {time: false, range: (u, min, max) => min === max ? [min - 1, max + 1] : [min, max]}},
  series: [{label: "step"}, {label: "train loss", stroke: "#2266cc", width: 2, points: {show: true, size: 5}},
           {label: "eval loss", stroke: "#cc6622", width: 2, points: {show: true}, spanGaps: true}]}, [[], [], []], $("chart"));
window.lossChart = chart;
function plot(step, column, value) {
  const row = byStep.get(step) || [null, null];
  row[column] = value; byStep.set(step, row);
  const steps = [...byStep.keys()].sort((a, b) => a - b);
  chart.setData([steps, steps.map((x) => byStep.get(x)[0]), steps.map((x) => byStep.get(x)[1])]);
  received += 1; $("points").textContent = received;
}
let lastEval = 0;
async function refreshEvals() {
  for (const e of await api(`/api/evals?since=${lastEval}`)) {
    lastEval = e.id; plot(e.step, 1, e.loss);
    $("eval-loss").textContent = e.loss.toFixed(4); $("perplexity").textContent = e.perplexity.toFixed(2);
  }
}
function addPoint(point) {
  lastMetricId = Math.max(lastMetricId, point.id || 0);
  if (point.tokens_per_second !== null && point.tokens_per_second !== undefined) $("tps").textContent = Math.round(point.tokens_per_second);
  if (point.loss === null || point.loss === undefined) return;
  plot(point.step, 0, point.loss);
  $("loss").textContent = point.loss.toFixed(4);
}

const fixed = (v, digits, unit) => v === null || v === undefined ? ABSENT : `${v.toFixed(digits)}${unit}`;
const memory = (used, total) => used === null || used === undefined ? (total ? `? / ${total.toFixed(1)} GiB` : ABSENT)
  : `${used.toFixed(1)} / ${total ? total.toFixed(1) : "?"} GiB`;
function gpuCells(tr, hw) {
  // a CPU peer says so in every GPU column; each GPU of the record (hw.gpus) gets a line of its own,
  // else the record's means over its GPUs; a figure the board does not report shows a dash
  const gpus = hw.gpus || [];
  const cpu = !gpus.length && !hw.gpu_count && !hw.gpu_name;
  const put = (texts) => {
    const td = cell(tr, cpu ? "CPU" : texts.join("\n"), cpu || texts.every((t) => t === ABSENT) ? "absent" : "num");
    td.style.whiteSpace = "pre";
  };
  const rows = gpus.length ? gpus : [{util_percent: hw.gpu_util_percent, memory_used_gib: hw.gpu_memory_used_gib,
    memory_total_gib: hw.gpu_memory_gib, temperature_c: hw.gpu_temperature_c, power_w: hw.gpu_power_w}];
  put(rows.map((g) => fixed(g.util_percent, 0, " %")));
  put(rows.map((g) => memory(g.memory_used_gib, g.memory_total_gib)));
  put(rows.map((g) => fixed(g.temperature_c, 0, " °C")));
  put(rows.map((g) => fixed(g.power_w, 0, " W")));
}
function actionButton(td, label, cls, onclick) {
  const b = document.createElement("button"); b.textContent = label; b.className = cls; b.onclick = onclick; td.appendChild(b);
}
async function peerAction(peer, what) {
  if (!confirm(`${what} peer ${peer}?`)) return;
  await api(`/api/peers/${encodeURIComponent(peer)}/${what}`, {method: "POST"});
  refreshStatus(); refreshAudit(); refreshKeys();
}

let historyChart = null, historyPeer = null;
async function showHistory(peer) {
  historyPeer = peer;
  const samples = await api(`/api/peers/${encodeURIComponent(peer)}/history?limit=2000`);
  $("peer-history").hidden = false;
  $("history-peer").textContent = peer;
  const column = (k) => samples.map((s) => s[k]);
  const data = [column("at"), column("throughput"), column("latency_ms"), column("gpu_util_percent"), column("gpu_temperature_c"), column("gpu_power_w")];
  if (historyChart === null) {
    // tokens/s on the left axis; latency and the GPU figures (tens to hundreds) on the right one
    historyChart = new uPlot({title: "peer history", width: chartWidth("history-chart"), height: 240,
      scales: {x: {time: true}, rate: {}, gauge: {}},
      axes: [{}, {scale: "rate", size: 80, label: "tokens/s"}, {scale: "gauge", side: 1, size: 60, grid: {show: false},
             label: "ms, %, °C, W"}],
      series: [{}, {label: "tokens/s", stroke: "#2266cc", scale: "rate"}, {label: "latency ms", stroke: "#aa6600", scale: "gauge"},
               {label: "GPU %", stroke: "#22aa44", scale: "gauge"}, {label: "GPU °C", stroke: "#cc3333", scale: "gauge"},
               {label: "GPU W", stroke: "#7744aa", scale: "gauge"}]},
      data, $("history-chart"));
  } else historyChart.setData(data);
}

async function refreshStatus() {
  const contributions = await api("/api/contributions");
  let status;
  try { status = await api("/api/status"); } catch (e) { return; }
  $("run-id").textContent = status.run_id;
  $("peer-count").textContent = status.peers.length;
  list("warnings", status.warnings);
  if (status.data) {
    $("data-cards").hidden = false;
    $("data-epoch").textContent = status.data.epoch;
    $("shards-done").textContent = `${status.data.shards_done}/${status.data.num_shards}`;
    $("shards-in-progress").textContent = status.data.shards_in_progress;
    $("data-tokens").textContent = status.data.tokens.toLocaleString("en");
  }
  const pipeline = $("pipeline");
  pipeline.replaceChildren();
  for (const stage of status.stages) {
    const box = document.createElement("div");
    box.className = "stage" + (stage.peers.length ? "" : " empty");
    box.innerHTML = `<b>stage ${stage.index}</b><small>layers [${stage.layers[0]}, ${stage.layers[1]})</small>`;
    for (const peer of stage.peers) { const s = document.createElement("small"); s.textContent = "…" + peer.slice(-10); box.appendChild(s); }
    pipeline.appendChild(box);
  }
  const layersOf = (peer) => peer.stages.map((i) => { const l = status.stages[i].layers; return `[${l[0]}, ${l[1]})`; }).join(" ");
  fill("peers", status.peers, (tr, p) => {
    const c = contributions[p.peer_id] || {};
    const hw = p.hardware || {};
    tr.dataset.peerId = p.peer_id;
    const id = p.relay ? `${p.peer_id} (behind NAT, via relay …${p.relay.slice(-8)})` : p.peer_id;
    cell(tr, id, "id"); cell(tr, layersOf(p)); cell(tr, p.stale ? "stale" : p.state);
    cell(tr, Math.round(p.throughput), "num"); cell(tr, fixed(p.latency_ms, 1, " ms"), p.latency_ms == null ? "absent" : "num");
    cell(tr, deviceText(hw));
    gpuCells(tr, hw);
    cell(tr, `${Math.round(hw.cpu_percent || 0)} % of ${hw.cpu_count}`, "num");
    cell(tr, ago(c.last_seen)); cell(tr, c.samples === undefined ? "0" : c.samples, "num");
    const td = cell(tr, "");
    actionButton(td, "history", "history", () => showHistory(p.peer_id));
    actionButton(td, "kick", "kick", () => peerAction(p.peer_id, "kick"));
    actionButton(td, "ban", "ban", () => peerAction(p.peer_id, "ban"));
  });
  if (historyPeer !== null) showHistory(historyPeer);
}
async function refreshAlerts() { list("alerts", (await api("/api/alerts")).map((a) => `alert: ${a.text}`)); }
function deviceText(hw) {
  // where a peer computes: its device and GPU names (their live figures are in the GPU columns)
  const gpus = hw.gpus || [];
  if (!gpus.length && (hw.device === "cpu" || !hw.device)) return `cpu (no GPU), ${hw.cpu_count} CPUs, ${hw.ram_gib} GiB RAM`;
  const names = gpus.length ? gpus.map((g) => g.name.replace(/^NVIDIA /, "")) : [hw.gpu_name || hw.device];
  return `${hw.device || "gpu"}: ${names.join(", ")}, ${hw.ram_gib} GiB RAM`;
}
async function refreshRun() {
  const run = await api("/api/run");
  $("run-state").textContent = run.state; $("run-state").className = "state-" + run.state;
  $("step").textContent = run.step;
}
async function refreshKeys() {
  const keys = await api("/api/keys");
  fill("keys", keys, (tr, k) => {
    tr.dataset.keyId = k.id;
    cell(tr, k.id); cell(tr, k.name); cell(tr, k.expires ? when(k.expires) : "never"); cell(tr, k.state); cell(tr, k.scopes.join(", "));
    const td = cell(tr, "");
    if (k.state === "active") {
      actionButton(td, "revoke", "revoke", async () => { await api(`/api/keys/${k.id}/revoke`, {method: "POST"}); refreshKeys(); refreshAudit(); });
    }
  });
}
async function refreshAudit() {
  fill("audit", await api("/api/audit?limit=50"), (tr, e) => { cell(tr, when(e.at)); cell(tr, e.actor, "id"); cell(tr, e.action, "id"); cell(tr, e.detail, "id"); });
}
async function setRun(state) { await api("/api/run", {method: "POST", body: JSON.stringify({state})}); refreshRun(); refreshAudit(); }

async function main() {
  csrf = (await api("/api/session")).csrf;
  $("pause").onclick = () => setRun("paused");
  $("resume").onclick = () => setRun("running");
  $("stop").onclick = () => { if (confirm("Stop the run? Trainers end and peers leave.")) setRun("stopped"); };
  $("logout").onclick = async () => { await api("/api/logout", {method: "POST"}); window.location = "/login"; };
  $("new-key").addEventListener("submit", async (event) => {
    event.preventDefault();
    const scopes = ["join", "api", "admin"].filter((s) => $(`scope-${s}`).checked);
    const body = {name: $("key-name").value, scopes};
    if ($("key-expires").value) body.expires = $("key-expires").value;
    const made = await api("/api/keys", {method: "POST", body: JSON.stringify(body)});
    const shown = $("new-secret");
    shown.hidden = false;
    shown.textContent = `key ${made.key.id} for ${made.key.name} (scope ${made.key.scopes.join(", ")}; shown only now): ${made.secret}`;
    $("key-name").value = ""; refreshKeys(); refreshAudit();
  });
  for (const point of await api("/api/metrics")) addPoint(point);
  const stream = new EventSource(`/api/metrics/stream?since=${lastMetricId}`);
  stream.onmessage = (event) => addPoint(JSON.parse(event.data));
  const tick = () => Promise.allSettled([refreshStatus(), refreshAlerts(), refreshRun(), refreshKeys(), refreshAudit(),
                                         refreshEvals()]);
  tick(); setInterval(tick, 3000);
}
main();
