"use strict";
let csrf = "";
const $ = (id) => document.getElementById(id);
const when = (t) => t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) : "–";
const ago = (t) => t ? `${Math.max(0, Math.round(Date.now() / 1000 - t))} s ago` : "–";

function cell(row, text) { const td = document.createElement("td"); td.textContent = text; row.appendChild(td); return td; }
function fill(tableId, rows, columns) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren();
  for (const item of rows) { const tr = document.createElement("tr"); columns(tr, item); body.appendChild(tr); }
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

const byStep = new Map();  // step -> [train loss, eval loss]; uPlot wants one sorted x axis
let received = 0;
const chart = new uPlot({title: "loss by step", width: 900, height: 260, scales: {x: {time: false}},
  series: [{label: "step"}, {label: "train loss", stroke: "#2266cc", width: 2},
           {label: "eval loss", stroke: "#cc6622", width: 2, points: {show: true}, spanGaps: true}]}, [[], [], []], $("chart"));
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
  if (point.loss === null || point.loss === undefined) return;
  plot(point.step, 0, point.loss);
  $("loss").textContent = point.loss.toFixed(4);
  if (point.tokens_per_second !== null) $("tps").textContent = Math.round(point.tokens_per_second);
}

async function refreshStatus() {
  const contributions = await api("/api/contributions");
  let status;
  try { status = await api("/api/status"); } catch (e) { return; }
  $("run-id").textContent = status.run_id;
  $("peer-count").textContent = status.peers.length;
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
    cell(tr, p.relay ? `${p.peer_id} (behind NAT, via relay …${p.relay.slice(-8)})` : p.peer_id); cell(tr, layersOf(p)); cell(tr, Math.round(p.throughput));
    cell(tr, deviceText(hw));
    cell(tr, ago(c.last_seen)); cell(tr, c.samples === undefined ? "0" : c.samples);
  });
}
function deviceText(hw) {
  // the GPU(s) a peer computes on, with live figures; a CPU peer says so
  const gpus = hw.gpus || [];
  if (!gpus.length) {
    const where = hw.device === "cpu" || !hw.device ? "cpu (no GPU)" : (hw.gpu_name || hw.device);
    return `${where}, ${hw.cpu_count} CPUs, ${hw.ram_gib} GiB RAM`;
  }
  return gpus.map((g) => [gpus.length === 1 && (hw.device || "").startsWith("cuda") ? hw.device : `gpu${g.index}`,
    g.name.replace(/^NVIDIA /, ""), g.util_percent == null ? null : `${Math.round(g.util_percent)}%`,
    `${Math.round(g.memory_used_gib)}/${Math.round(g.memory_total_gib)} GiB`,
    g.temperature_c == null ? null : `${Math.round(g.temperature_c)}°C`,
    g.power_w == null ? null : `${Math.round(g.power_w)} W`].filter((x) => x !== null).join(" ")).join(", ");
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
    cell(tr, k.id); cell(tr, k.name); cell(tr, k.expires ? when(k.expires) : "never"); cell(tr, k.state);
    const td = cell(tr, "");
    if (k.state === "active") {
      const b = document.createElement("button"); b.textContent = "revoke"; b.className = "revoke";
      b.onclick = async () => { await api(`/api/keys/${k.id}/revoke`, {method: "POST"}); refreshKeys(); refreshAudit(); };
      td.appendChild(b);
    }
  });
}
async function refreshAudit() {
  fill("audit", await api("/api/audit?limit=50"), (tr, e) => { cell(tr, when(e.at)); cell(tr, e.actor); cell(tr, e.action); cell(tr, e.detail); });
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
    const body = {name: $("key-name").value};
    if ($("key-expires").value) body.expires = $("key-expires").value;
    const made = await api("/api/keys", {method: "POST", body: JSON.stringify(body)});
    const shown = $("new-secret");
    shown.hidden = false;
    shown.textContent = `key ${made.key.id} for ${made.key.name} (shown only now): ${made.secret}`;
    $("key-name").value = ""; refreshKeys(); refreshAudit();
  });
  for (const point of await api("/api/metrics")) addPoint(point);
  const stream = new EventSource(`/api/metrics/stream?since=${(await api("/api/metrics?limit=1")).map((p) => p.id)[0] || 0}`);
  stream.onmessage = (event) => addPoint(JSON.parse(event.data));
  const tick = () => Promise.allSettled([refreshStatus(), refreshRun(), refreshKeys(), refreshAudit(), refreshEvals()]);
  tick(); setInterval(tick, 3000);
}
main();
