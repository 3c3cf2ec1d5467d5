// corem-lwm2m web console: a single page over the admin API (no build
// step). Routes: #/ devices, #/device/{id}, #/firmware. The bearer token,
// when the gateway has one, is kept in this tab's sessionStorage.
"use strict";

const $ = (sel, el = document) => el.querySelector(sel);
const view = $("#view");
let generation = 0; // bumps on every navigation: stale loops stop

function token() { return sessionStorage.getItem("corem-token") || ""; }

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (token()) headers["Authorization"] = "Bearer " + token();
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = text; }
  if (r.status === 401 && !tokenDeclined) {
    askToken("This gateway requires its admin token.");
  }
  if (!r.ok) {
    const msg = data && data.message ? data.message : text;
    throw new Error(r.status + ": " + msg);
  }
  return data;
}

// One prompt at a time: the list, a device page's telemetry poll and its
// RPC loop can all get a 401 at once. Cancelled, it is not asked again
// until the Token button is pressed (the 401s show as errors meanwhile).
let asking = false;
let tokenDeclined = false;
function askToken(why) {
  if (asking) return;
  asking = true;
  try {
    const t = prompt((why ? why + "\n" : "") + "Admin API bearer token:", token());
    if (t === null) { tokenDeclined = true; return; }
    tokenDeclined = false;
    sessionStorage.setItem("corem-token", t.trim());
  } finally {
    asking = false;
  }
  route();
}
$("#token-btn").addEventListener("click", () => { tokenDeclined = false; askToken(""); });

function esc(v) {
  return String(v === null || v === undefined ? "-" : v)
    .replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}
function time(ms) { return ms ? new Date(ms).toISOString().replace("T", " ").replace("Z", "") : "-"; }
function h(html) { const t = document.createElement("template"); t.innerHTML = html.trim(); return t.content; }
function sleep(ms) { return new Promise((r) => setTimeout(r, ms)); }

// ---------------------------------------------------------------- summary

function promSum(text, name) {
  let sum = 0, found = false;
  for (const l of text.split("\n")) {
    if (l.startsWith("#")) continue;
    const sp = l.lastIndexOf(" ");
    const series = l.slice(0, sp), base = series.split("{")[0];
    if (base === name) { sum += Number(l.slice(sp + 1)); found = true; }
  }
  return found ? sum : null;
}

let lastPoints = null;
async function summary() {
  try {
    const r = await fetch("/metrics");
    const m = await r.text();
    const now = performance.now();
    const pts = promSum(m, "corem_lwm2m_points_published_total");
    let rate = "";
    if (lastPoints) rate = ", " + Math.round((pts - lastPoints.v) * 1000 / (now - lastPoints.t)) + " points/s";
    lastPoints = { v: pts, t: now };
    $("#summary").textContent = promSum(m, "corem_lwm2m_registrations_active") + " registered of " +
      promSum(m, "corem_lwm2m_directory_endpoints") + " endpoints, " + promSum(m, "corem_lwm2m_shards") + " shards" + rate;
  } catch (e) { $("#summary").textContent = "gateway unreachable"; }
}
setInterval(summary, 5000);
summary();

// ---------------------------------------------------------------- devices

async function devicesPage(gen) {
  view.replaceChildren(h(`
    <h1>Devices</h1>
    <div class="row">
      <label>Tenant <input id="f-tenant" size="12"></label>
      <label>State <select id="f-online"><option value="">any</option><option value="true">online</option><option value="false">offline</option></select></label>
      <span class="muted" id="count"></span>
    </div>
    <table id="devices"><thead><tr><th>Device</th><th>Endpoint</th><th>Tenant</th><th>Profile</th><th>State</th><th>Last seen</th><th>Shard</th></tr></thead><tbody></tbody></table>
    <p class="error" id="err"></p>`));
  const load = async () => {
    const q = new URLSearchParams({ limit: "1000" });
    if ($("#f-tenant").value) q.set("tenant", $("#f-tenant").value);
    if ($("#f-online").value) q.set("online", $("#f-online").value);
    try {
      const d = await api("GET", "/v1/devices?" + q);
      if (gen !== generation) return;
      const rows = d.devices.map((x) => `<tr data-device="${esc(x.device_id)}">
        <td class="mono"><a href="#/device/${encodeURIComponent(x.device_id)}">${esc(x.device_id)}</a></td>
        <td class="mono">${esc(x.endpoint)}</td><td>${esc(x.tenant_id)}</td><td>${esc(x.profile)}</td>
        <td class="${x.online ? "online" : "offline"}">${x.online ? "online" : "offline"}</td>
        <td class="mono">${time(x.last_seen)}</td><td>${esc(x.shard)}</td></tr>`).join("");
      $("#devices tbody").innerHTML = rows;
      $("#count").textContent = d.devices.length + " devices" + (d.next_cursor ? " (first 1000)" : "");
      $("#err").textContent = "";
    } catch (e) { $("#err").textContent = e.message; }
  };
  $("#f-tenant").addEventListener("change", load);
  $("#f-online").addEventListener("change", load);
  while (gen === generation) { await load(); await sleep(3000); }
}

// ---------------------------------------------------------------- device

async function devicePage(gen, id) {
  view.replaceChildren(h(`
    <p><a href="#/">← Devices</a></p>
    <h1 class="mono">${esc(id)}</h1>
    <div class="cards">
      <div class="card"><h2>Device</h2><table id="facts"></table></div>
      <div class="card"><h2>Actions</h2>
        <div class="row"><button id="rpc-reboot">Reboot</button><button id="rpc-factory" class="small">Factory reset</button></div>
        <div class="row"><input id="read-path" value="/3/0/0" size="12"><button id="rpc-read">Read</button></div>
        <div class="row"><input id="write-path" value="/3/0/14" size="12"><input id="write-value" placeholder="value" size="10"><button id="rpc-write">Write</button></div>
        <table id="rpcs"><thead><tr><th>RPC</th><th>Method</th><th>Status</th><th>Result</th></tr></thead><tbody></tbody></table>
      </div>
    </div>
    <h2>Objects and observations</h2><div id="objects" class="mono muted">-</div>
    <h2>Live telemetry</h2>
    <table id="telemetry"><thead><tr><th>Time</th><th>Values</th><th>Path</th></tr></thead><tbody></tbody></table>
    <p class="error" id="err"></p>`));
  const enc = encodeURIComponent(id);
  const refresh = async () => {
    try {
      const d = await api("GET", "/v1/devices/" + enc);
      if (gen !== generation) return;
      const r = d.registration || {};
      const facts = [["endpoint", d.endpoint], ["tenant", d.tenant_id], ["profile", d.profile],
        ["state", d.online ? "online" : "offline"], ["last seen", time(d.last_seen)], ["shard", r.shard],
        ["address", r.address], ["DTLS", r.dtls], ["LwM2M", r.lwm2m_version], ["binding", r.binding], ["lifetime", r.lifetime_s]];
      $("#facts").innerHTML = facts.map(([k, v]) => `<tr><th>${esc(k)}</th><td class="mono" data-fact="${esc(k)}">${esc(v)}</td></tr>`).join("");
      const objs = (r.objects || []).map((o) => esc(typeof o === "string" ? o : JSON.stringify(o))).join(" ");
      const obs = (r.observations || []).map((o) => esc(o.path) + " (" + esc(o.origin) + ")").join(", ");
      $("#objects").innerHTML = (objs || "-") + "<br>observed: " + (obs || "-");
      $("#err").textContent = "";
    } catch (e) { $("#err").textContent = e.message; }
  };

  const rpcRow = (rec) => {
    let tr = $(`#rpcs tr[data-rpc="${CSS.escape(rec.rpc_id)}"]`);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.rpc = rec.rpc_id;
      $("#rpcs tbody").prepend(tr);
    }
    const result = rec.response !== undefined ? JSON.stringify(rec.response) : (rec.code || rec.reason || "");
    tr.innerHTML = `<td class="mono">${esc(rec.rpc_id)}</td><td>${esc(rec.method)}</td>
      <td class="rpc-status status-${esc(rec.status)}">${esc(rec.status)}</td><td class="mono">${esc(result)}</td>`;
  };
  const send = async (method, params) => {
    try {
      const r = await api("POST", "/v1/devices/" + enc + "/rpc", { method, params, timeout_ms: 60000 });
      rpcRow({ rpc_id: r.rpc_id, method, status: r.status });
      for (;;) {
        const rec = await api("GET", "/v1/rpc/" + encodeURIComponent(r.rpc_id));
        rpcRow(rec);
        if (["succeeded", "failed", "timed_out", "expired"].includes(rec.status)) break;
        await sleep(300);
      }
    } catch (e) { $("#err").textContent = e.message; }
  };
  $("#rpc-reboot").addEventListener("click", () => send("reboot", {}));
  $("#rpc-factory").addEventListener("click", () => { if (confirm("Factory reset " + id + "?")) send("factory_reset", {}); });
  $("#rpc-read").addEventListener("click", () => send("read", { path: $("#read-path").value }));
  $("#rpc-write").addEventListener("click", () => send("write", { path: $("#write-path").value, value: $("#write-value").value }));

  await refresh();
  (async () => { while (gen === generation) { await sleep(5000); if (gen === generation) await refresh(); } })();
  // Live telemetry: long-poll the device's tap.
  let after = 0;
  while (gen === generation) {
    try {
      const t = await api("GET", `/v1/devices/${enc}/telemetry?after=${after}&wait_ms=10000`);
      if (gen !== generation) break; // navigated away while waiting
      after = t.next;
      for (const p of t.points) {
        const vals = [];
        for (const k of ["numeric_values", "string_values", "bool_values"]) {
          for (const [n, v] of Object.entries(p[k] || {})) vals.push(esc(n) + "=" + esc(v));
        }
        $("#telemetry tbody").prepend(h(`<tr><td class="mono">${time(p.ts)}</td><td class="mono">${vals.join("  ")}</td><td class="mono">${esc(p.source && p.source.path)}</td></tr>`));
      }
      const rows = $("#telemetry tbody").children;
      while (rows.length > 200) rows[rows.length - 1].remove();
    } catch (e) {
      if (gen !== generation) break;
      $("#err").textContent = e.message;
      await sleep(2000);
    }
  }
}

// ---------------------------------------------------------------- firmware

async function firmwarePage(gen) {
  view.replaceChildren(h(`
    <h1>Firmware</h1>
    <h2>Images</h2>
    <table id="images"><thead><tr><th>Name</th><th>Version</th><th>Size</th><th>sha256</th><th>Uploaded</th></tr></thead><tbody></tbody></table>
    <h2>Campaigns</h2>
    <div class="row">
      <input id="c-image" placeholder="image name" size="14"><input id="c-tenant" placeholder="tenant" size="10">
      <input id="c-devices" placeholder="or device ids, comma-separated" size="30">
      <label>concurrency <input id="c-conc" value="100" size="4"></label><button id="c-create">Start campaign</button>
    </div>
    <table id="campaigns"><thead><tr><th>Campaign</th><th>Image</th><th>State</th><th>Finished</th><th>Counts</th><th></th></tr></thead><tbody></tbody></table>
    <p class="error" id="err"></p>`));
  const load = async () => {
    try {
      const imgs = await api("GET", "/v1/firmware");
      if (gen !== generation) return;
      $("#images tbody").innerHTML = imgs.map((i) => `<tr><td class="mono">${esc(i.name)}</td><td>${esc(i.version)}</td>
        <td>${esc(i.size)}</td><td class="mono">${esc((i.sha256 || "").slice(0, 16))}</td><td class="mono">${time(i.uploaded_at)}</td></tr>`).join("");
      const cs = await api("GET", "/v1/firmware/campaigns");
      if (gen !== generation) return;
      $("#campaigns tbody").innerHTML = cs.map((c) => `<tr><td class="mono">${esc(c.campaign_id)}</td><td>${esc(c.image)}</td>
        <td>${esc(c.state)}${c.reason ? " (" + esc(c.reason) + ")" : ""}</td><td>${esc(c.finished)} / ${esc(c.devices)}</td>
        <td class="mono">${esc(JSON.stringify(c.counts || {}))}</td>
        <td>${["pause", "resume", "cancel"].map((a) => `<button class="small" data-act="${a}" data-id="${esc(c.campaign_id)}">${a}</button>`).join(" ")}</td></tr>`).join("");
      $("#err").textContent = "";
    } catch (e) { $("#err").textContent = e.message; }
  };
  $("#campaigns").addEventListener("click", async (ev) => {
    const b = ev.target.closest("button[data-act]");
    if (!b) return;
    try { await api("POST", `/v1/firmware/campaigns/${encodeURIComponent(b.dataset.id)}/${b.dataset.act}`); } catch (e) { $("#err").textContent = e.message; }
    load();
  });
  $("#c-create").addEventListener("click", async () => {
    const body = { image: $("#c-image").value, concurrency: Number($("#c-conc").value) || 100 };
    const devs = $("#c-devices").value.split(",").map((s) => s.trim()).filter(Boolean);
    if (devs.length) body.devices = devs; else body.selector = { tenant_id: $("#c-tenant").value };
    try { await api("POST", "/v1/firmware/campaigns", body); } catch (e) { $("#err").textContent = e.message; }
    load();
  });
  while (gen === generation) { await load(); await sleep(3000); }
}

// ---------------------------------------------------------------- router

function route() {
  const gen = ++generation;
  const hash = location.hash || "#/";
  if (hash.startsWith("#/device/")) devicePage(gen, decodeURIComponent(hash.slice(9)));
  else if (hash === "#/firmware") firmwarePage(gen);
  else devicesPage(gen);
}
window.addEventListener("hashchange", route);
route();
