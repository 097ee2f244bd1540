// labdaq dashboard: every page's behaviour. Data comes from the JSON API with the
// browser's session cookie (HttpOnly: this script never sees the session id or the token
// it was signed in with); every change sends the session's CSRF token back in a header.
// The API and the pages enforce roles, the page only hides what the role cannot do. Live
// data arrives over Server-Sent Events read with fetch(), which can send Last-Event-ID.
// One file for every page (a section each): the browser caches one script, and the pages
// share the API, stream, alarm and role helpers at its top.
"use strict";

const page = document.body.dataset.page;
let whoami = null;

// The double-submit CSRF token: a readable cookie set at sign-in (labdaq.api.session_cookie).
function csrfToken() {
  const m = document.cookie.match(/(?:^|;\s*)labdaq_csrf=([^;]*)/);
  return m ? decodeURIComponent(m[1]) : "";
}
function changeHeaders(method) {
  return method === "GET" || method === "HEAD" ? {} : { "X-CSRF-Token": csrfToken() };
}

class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

async function api(path, opts = {}) {
  const method = opts.method || "GET";
  const headers = { ...changeHeaders(method), ...(opts.headers || {}) };
  if (opts.json !== undefined) {
    headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(opts.json);
  }
  const resp = await fetch(path, { method, headers, body: opts.body });
  if (resp.status === 401 && page !== "signin") {
    toSignin();
    throw new ApiError(401, null);
  }
  if (!resp.ok) {
    let problem = null;
    try { problem = await resp.json(); } catch (e) { /* not JSON */ }
    throw new ApiError(resp.status, problem);
  }
  if (opts.raw) return resp;
  return resp.status === 204 ? null : resp.json();
}

// A Server-Sent Events reader over fetch: resumes with Last-Event-ID after a dropped
// connection, like EventSource does.
function sse(path, onMessage, lastEventId) {
  const ctl = new AbortController();
  let lastId = lastEventId || "";
  let stopped = false;
  async function connect() {
    while (!stopped) {
      try {
        const headers = { Accept: "text/event-stream" };
        if (lastId) headers["Last-Event-ID"] = lastId;
        const resp = await fetch(path, { headers, signal: ctl.signal });
        if (resp.status === 401) { toSignin(); return; }
        if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
        onMessage({ event: "open", data: null });
        const reader = resp.body.getReader();
        const dec = new TextDecoder();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += dec.decode(value, { stream: true });
          let cut;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            let event = "message", data = "", id = null;
            for (const line of block.split("\n")) {
              if (line.startsWith("id: ")) id = line.slice(4);
              else if (line.startsWith("event: ")) event = line.slice(7);
              else if (line.startsWith("data: ")) data += line.slice(6);
            }
            if (id !== null) lastId = id;
            if (data) onMessage({ event, data: JSON.parse(data), id });
          }
        }
        onMessage({ event: "end", data: null });
        return;  // the server ended the stream (a run's stream ends with the run)
      } catch (e) {
        if (stopped || e.name === "AbortError") return;
        onMessage({ event: "error", data: String(e) });
        await new Promise((r) => setTimeout(r, 2000));
      }
    }
  }
  connect();
  window.addEventListener("pagehide", () => { stopped = true; ctl.abort(); });
  return { close() { stopped = true; ctl.abort(); } };
}

// The session ended (expired, revoked, or its token did): sign in again, then come back.
function toSignin() {
  if (page !== "signin") location.href = "/signin?next=" + encodeURIComponent(location.pathname);
}

async function signOut() {
  // Ends the session on the server (audited) and clears both cookies.
  try { await fetch("/api/v1/session", { method: "DELETE", headers: changeHeaders("DELETE") }); }
  finally { location.href = "/signin"; }
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function fmt(x, digits = 3) {
  return x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(digits);
}
function fmtTime(iso) { return iso ? new Date(iso).toLocaleString() : "–"; }
function hours(s) { return s / 3600; }
function milli(x) { return x * 1000; }
// "imported": another lab's file (labdaq.imports), read-only from the start.
const TERMINAL = new Set(["completed", "stopped", "aborted_safety", "failed", "interrupted", "imported"]);

// Calls f at most once at a time and once more after it if asked meanwhile: a burst of
// stream messages (a stream's replay of a long run's steps) makes one request, not one each.
function coalesce(f) {
  let running = false, again = false;
  return async function run() {
    if (running) { again = true; return; }
    running = true;
    try { await f(); } finally {
      running = false;
      if (again) { again = false; run(); }
    }
  };
}

function can(grant) { return !!whoami && whoami.grants.includes(grant); }

function applyRole() {
  document.getElementById("who-name").textContent = whoami.name;
  const role = document.getElementById("who-role");
  role.textContent = whoami.role;
  role.dataset.role = whoami.role;
  document.querySelectorAll("[data-grant]").forEach((node) => {
    node.hidden = !node.dataset.grant.split(" ").some(can);  // any of the grants listed
  });
}

function showProblem(target, err) {
  target.textContent = err instanceof ApiError
    ? `${err.status}: ${err.message}` : String(err);
}

// --- safety alarms: a banner on every page until someone acknowledges each alarm -----
async function refreshAlarms() {
  const box = document.getElementById("alarms");
  let alarms;
  try { alarms = await api("/api/v1/alarms"); } catch (e) { return; }
  box.replaceChildren();
  for (const a of alarms) {
    const ack = el("button", { type: "button", class: "ack", "data-alarm": a.id,
      onclick: async () => {
        ack.disabled = true;
        try { await api(`/api/v1/alarms/${a.id}/ack`, { method: "POST", json: {} }); }
        catch (e) { showProblem(msg, e); ack.disabled = false; return; }
        refreshAlarms();
      } }, "Acknowledge");
    ack.hidden = !can("operate");
    const msg = el("span", { class: "msg" });
    const runLink = a.run_id ? el("a", { href: `/runs/${a.run_id}` }, `run ${a.run_id}`) : "";
    box.append(el("div", { class: "alarm", role: "alert", "data-alarm-id": a.id },
      el("strong", {}, "SAFETY STOP "), runLink, " ", a.message, " ",
      el("span", { class: "muted" }, fmtTime(a.ts)), " ", ack, msg));
  }
  box.hidden = alarms.length === 0;
  box.dataset.count = alarms.length;
}

// The lab stream: every page follows it for safety events; the overview also for V/I/T.
const labListeners = [];
function followLab(latest) {
  sse(`/api/v1/stream${latest ? "?latest=true" : ""}`, (msg) => {
    // Once connected, look again: an alarm raised between the first look and the
    // stream's start would otherwise show only after a reload.
    if (msg.event === "open") refreshAlarms();
    if (msg.event === "event" && msg.data.kind === "safety") refreshAlarms();
    if (msg.event === "event" && msg.data.kind === "audit"
        && msg.data.data && msg.data.data.acknowledges) refreshAlarms();
    for (const f of labListeners) f(msg);
  });
}

// --- sign-in -------------------------------------------------------------------------
function initSignin() {
  const form = document.getElementById("signin-form");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const t = document.getElementById("token").value.trim();
    try {
      await api("/api/v1/session", { method: "POST", json: { token: t } });
    } catch (e) {
      document.getElementById("signin-error").textContent =
        e.status === 401 ? "Unknown or revoked token." : String(e.message);
      return;
    }
    const next = new URLSearchParams(location.search).get("next");
    location.href = next && next.startsWith("/") && !next.startsWith("//") ? next : "/";
  });
}

async function channelNamesById() {
  const names = {};
  for (const c of await api("/api/v1/channels")) names[c.id] = c.name;
  return names;
}

// --- lab overview --------------------------------------------------------------------
function progressBar(p) {
  const outer = el("div", { class: "progress", title: p === null ? "" : `${(p * 100).toFixed(0)} %` });
  const bar = el("div", { class: "bar", style: `width:${p === null ? 0 : (p * 100).toFixed(1)}%` });
  outer.append(bar);
  outer.dataset.progress = p === null ? "" : p.toFixed(4);
  return outer;
}

// Run time left if the rest goes at the pace so far (run seconds, not wall seconds).
function timeLeft(r) {
  const p = r.progress;
  if (p === null || p <= 0 || p >= 1 || TERMINAL.has(r.state)) return "";
  return `≈ ${fmt(hours(r.elapsed_s * (1 - p) / p), 1)} h left`;
}

async function initOverview() {
  const tbody = document.querySelector("#channels tbody");
  const live = document.getElementById("lab-live");
  const refresh = coalesce(async () => {
    let rows;
    try { rows = await api("/api/v1/lab"); } catch (e) { return; }
    // The rows are rebuilt, but a run's count of live updates carries over: the stream's
    // `latest` messages and these refreshes interleave, and a count reset by every
    // refresh never grew past one where a stream poll took longer than a third of the
    // refresh interval (a loaded server).
    const updates = new Map(Array.from(tbody.rows, (tr) => [tr.dataset.runId, tr.dataset.updates]));
    tbody.replaceChildren();
    for (const c of rows) {
      const r = c.run;
      const state = el("span", { class: `state s-${c.state}` }, c.state.replace("_", " "));
      // The run's node stopped beating: the API shows it node_down until the node returns.
      if (c.state === "node_down" && r) state.title = `node ${r.node} is down; the run resumes when it returns`;
      const startLink = c.state === "idle" || c.state === "safety_stop" || c.state === "interrupted"
        ? el("a", { href: `/runs/new?channel=${encodeURIComponent(c.channel)}`, class: "start",
                    "data-grant": "operate abuse" }, "start")
        : "";
      if (startLink) startLink.hidden = !(can("operate") || can("abuse"));
      tbody.append(el("tr", { "data-channel": c.channel, "data-state": c.state,
                              "data-run-id": r ? r.id : "",
                              "data-updates": r ? updates.get(String(r.id)) : undefined },
        el("td", {}, c.channel), el("td", {}, c.instrument), el("td", {}, state, " ", startLink),
        el("td", {}, r ? el("a", { href: `/runs/${r.id}` }, `#${r.id}`) : "–"),
        el("td", {}, r ? el("a", { href: `/cells/${r.cell_id}` }, r.cell_serial || r.cell_id) : "–"),
        el("td", {}, r ? `${r.step_index + 1}/${r.step_count}` : "–"),
        el("td", {}, r ? r.cycle_index : "–"),
        el("td", {}, r ? progressBar(r.progress) : "–",
           r ? el("span", { class: "muted small" }, timeLeft(r)) : ""),
        el("td", { class: "v" }, fmt(c.voltage_v)),
        el("td", { class: "i" }, fmt(c.current_a)),
        el("td", { class: "t" }, fmt(c.temperature_c, 1))));
    }
    tbody.dataset.loaded = "true";
  });
  labListeners.push((msg) => {
    if (msg.event === "open") live.dataset.connected = "true";
    else if (msg.event === "error") live.dataset.connected = "false";
    else if (msg.event === "latest") {
      const row = tbody.querySelector(`tr[data-run-id="${msg.data.run_id}"]`);
      if (!row) return;
      row.querySelector(".v").textContent = fmt(msg.data.voltage_v);
      row.querySelector(".i").textContent = fmt(msg.data.current_a);
      row.querySelector(".t").textContent = fmt(msg.data.temperature_c, 1);
      row.dataset.updates = Number(row.dataset.updates || 0) + 1;
    } else if (msg.event === "step" || msg.event === "event" || msg.event === "cycle") {
      refresh();
    }
  });
  await refresh();
  // Queued runs are claimed without an event: look again now and then.
  setInterval(refresh, 3000);
  const [runs, channelNames] = await Promise.all([api("/api/v1/runs?limit=20"), channelNamesById()]);
  const rb = document.querySelector("#runs tbody");
  for (const r of runs) {
    rb.append(el("tr", {}, el("td", {}, el("a", { href: `/runs/${r.id}` }, `#${r.id}`)),
      el("td", {}, r.state), el("td", {}, channelNames[r.channel_id] || r.channel_id),
      el("td", {}, el("a", { href: `/cells/${r.cell_id}` }, `cell ${r.cell_id}`)),
      el("td", {}, fmtTime(r.created_at)), el("td", {}, fmtTime(r.ended_at))));
  }
}

// --- start a run ---------------------------------------------------------------------
async function initStart() {
  const form = document.getElementById("start-form");
  const chSel = document.getElementById("f-channel");
  const cellSel = document.getElementById("f-cell");
  const srcSel = document.getElementById("f-source");
  const params = document.getElementById("cycle-params");
  const confirmBox = document.getElementById("confirm");
  const want = new URLSearchParams(location.search).get("channel");
  const [lab, cells, templates] = await Promise.all([
    api("/api/v1/lab"), api("/api/v1/cells?limit=1000"), api("/api/v1/protocols/templates")]);
  const free = lab.filter((c) => !["queued", "running", "paused"].includes(c.state));
  for (const c of free) chSel.append(el("option", { value: c.channel, selected: c.channel === want },
                                       `${c.channel} (${c.instrument})`));
  for (const c of cells) cellSel.append(el("option", { value: c.id },
                                           `${c.serial} — ${c.chemistry}, ${c.capacity_ah} Ah`));
  cellSel.append(el("option", { value: "" }, "the channel's default cell"));
  for (const t of templates) srcSel.append(el("option", { value: `template:${t.name}` },
                                              `Template: ${t.name}`));
  // Register a cell here (POST /api/v1/cells, audited) and pick it at once.
  document.getElementById("register-cell").addEventListener("click", async () => {
    const box = document.getElementById("new-cell");
    box.querySelectorAll(".error").forEach((e) => { e.textContent = ""; });
    const cellBody = { serial: document.getElementById("c-serial").value.trim(),
                       spec: document.getElementById("c-spec").value.trim() || null };
    const lot = document.getElementById("c-lot").value.trim();
    if (lot) cellBody.lot = lot;
    try {
      const c = await api("/api/v1/cells", { method: "POST", json: cellBody });
      cellSel.prepend(el("option", { value: c.id },
                         `${c.serial} — ${c.chemistry}, ${c.capacity_ah} Ah`));
      cellSel.value = String(c.id);
      box.open = false;
    } catch (e) {
      const errors = (e.problem && e.problem.errors) || [];
      let placed = 0;
      for (const fe of errors) {
        const slot = box.querySelector(`[data-cell-for="${String(fe.loc).replace(/^body\./, "")}"]`);
        if (slot) { slot.textContent = fe.msg; placed += 1; }
      }
      if (!placed) showProblem(document.getElementById("cell-error"), e);
    }
  });
  const upload = document.getElementById("upload-field");
  srcSel.addEventListener("change", () => {
    params.hidden = srcSel.value !== "protocol";
    upload.hidden = srcSel.value !== "upload";
  });

  async function body() {
    const b = { channel: chSel.value, sample_period_s: Number(document.getElementById("f-period").value) };
    if (cellSel.value) b.cell_id = Number(cellSel.value);
    if (srcSel.value === "protocol") {
      const p = {};
      for (const input of params.querySelectorAll("input")) {
        if (input.value === "") continue;  // optional field left empty: the default
        p[input.name] = input.name === "cycles" ? parseInt(input.value, 10) : Number(input.value);
      }
      b.protocol = p;
    } else if (srcSel.value === "upload") {
      const file = document.getElementById("f-document").files[0];
      // The API parses and validates the text; an empty one is refused there (422).
      b.protocol_document = file ? await file.text() : "";
    } else {
      b.template = srcSel.value.slice("template:".length);
    }
    // An abuse protocol's reason (engineer, admin); the API says when one is missing.
    const reason = document.getElementById("f-reason").value.trim();
    if (reason && can("abuse")) b.reason = reason;
    return b;
  }
  function clearErrors() {
    form.querySelectorAll(".error").forEach((e) => { e.textContent = ""; });
    form.querySelectorAll("[aria-invalid]").forEach((e) => e.removeAttribute("aria-invalid"));
  }
  function placeErrors(err) {
    const errors = (err.problem && err.problem.errors) || [];
    let placed = 0;
    for (const fe of errors) {
      const loc = String(fe.loc).replace(/^body\./, "");
      const slot = form.querySelector(`.error[data-for="${loc}"]`)
        || form.querySelector(`.error[data-for="${loc.split(".")[0]}"]`);
      if (slot) {
        slot.textContent = (slot.textContent ? slot.textContent + "; " : "") + fe.msg;
        const input = slot.parentElement.querySelector("input,select");
        if (input) input.setAttribute("aria-invalid", "true");
        placed += 1;
      }
    }
    if (placed < errors.length || errors.length === 0) showProblem(document.getElementById("form-error"), err);
  }
  let pending = null;
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearErrors();
    confirmBox.hidden = true;
    pending = await body();
    let preview;
    try {
      preview = await api("/api/v1/runs?dry_run=true", { method: "POST", json: pending });
    } catch (e) { placeErrors(e); return; }
    document.getElementById("confirm-summary").textContent =
      `${preview.protocol_name} on ${preview.channel}, cell ${preview.cell.serial} ` +
      `(${preview.cell.capacity_ah} Ah), a sample every ${preview.sample_period_s} s.`;
    const lt = document.querySelector("#confirm-limits tbody");
    lt.replaceChildren();
    const sources = preview.limits.sources || {};
    for (const [k, v] of Object.entries(preview.limits)) {
      if (k === "sources") continue;
      lt.append(el("tr", {}, el("th", {}, k), el("td", {}, v === null ? "none" : v),
                   el("td", { class: "muted" }, sources[k] ? `from the ${sources[k]}` : "")));
    }
    const st = document.querySelector("#confirm-steps tbody");
    st.replaceChildren();
    for (const s of preview.program) {
      const until = s.until ? Object.entries(s.until).filter(([, v]) => v !== null)
        .map(([k, v]) => `${k} ${v}`).join(", ") : "";
      st.append(el("tr", {}, el("td", {}, s.index), el("td", {}, s.step), el("td", {}, s.tag || ""),
        el("td", {}, s.current_a !== undefined ? fmt(s.current_a) : ""),
        el("td", {}, s.voltage_v !== undefined ? fmt(s.voltage_v) : ""), el("td", {}, until)));
    }
    confirmBox.hidden = false;
    document.getElementById("start").focus();
  });
  document.getElementById("edit").addEventListener("click", () => { confirmBox.hidden = true; });
  document.getElementById("start").addEventListener("click", async () => {
    try {
      const run = await api("/api/v1/runs", { method: "POST", json: pending });
      location.href = `/runs/${run.id}`;
    } catch (e) { confirmBox.hidden = true; placeErrors(e); }
  });
}

// --- plots ---------------------------------------------------------------------------
const PLOT_CONFIG = { responsive: true, displaylogo: false };
// plotly's own default colour sequence, for traces that must share a colour.
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                 "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
function baseLayout(extra) {
  return { margin: { l: 60, r: 60, t: 30, b: 45 }, autosize: true,
           legend: { orientation: "h", x: 0, y: 1.02, yanchor: "bottom" }, ...extra };
}
function setCount(div, n) { div.dataset.points = String(n); }

async function download(path, name) {
  const resp = await api(path, { raw: true });
  const blob = await resp.blob();
  const a = el("a", { href: URL.createObjectURL(blob), download: name });
  document.body.append(a);
  a.click();
  a.remove();
}

// --- run page ------------------------------------------------------------------------
async function initRun() {
  const runId = document.body.dataset.runId;
  const err = document.getElementById("run-error");
  const stateEl = document.getElementById("run-state");
  const vit = document.getElementById("plot-vit");
  const cyc = document.getElementById("plot-cycles");
  const stepsBody = document.querySelector("#steps tbody");
  let run = await api(`/api/v1/runs/${runId}`);
  const channelNames = await channelNamesById();
  const cycles = [];
  let points = 0;
  let dqdvReload = null;  // set once the dQ/dV plot exists; a cycle's end redraws it

  // Every state shown so far, counted: a progress refresh whose answer was asked for
  // before a newer state arrived (a stream event, a command's reply) must not undo it.
  let statesShown = 0;
  function showState(r) {
    if (r.state !== undefined) statesShown += 1;
    run = { ...run, ...r };
    stateEl.textContent = run.state.replace("_", " ");
    stateEl.className = `state s-${run.state}`;
    document.body.dataset.runState = run.state;
    document.getElementById("run-summary").replaceChildren(
      `Channel ${channelNames[run.channel_id] || run.channel_id} · `,
      el("a", { href: `/cells/${run.cell_id}` }, `cell ${run.cell_id}`),
      ` · step ${run.step_index + 1} of ${run.step_count} · cycle ${run.cycle_index}` +
      ` · ${fmt(hours(run.elapsed_s), 2)} h` + (run.end_reason ? ` · ${run.end_reason}` : "") +
      (run.state === "node_down" ? ` · node ${run.node} is down; the run resumes when it returns` : ""));
    const active = !TERMINAL.has(run.state);
    document.getElementById("pause").disabled = run.state !== "running";
    document.getElementById("resume").disabled = run.state !== "paused";
    document.getElementById("stop").disabled = !active;
    markCurrentStep();
  }
  const refreshProgress = coalesce(async () => {
    const bar = document.getElementById("run-progress");
    if (TERMINAL.has(run.state)) {
      bar.style.width = run.state === "completed" ? "100%" : bar.style.width;
      bar.parentElement.dataset.progress = run.state === "completed" ? "1" : bar.parentElement.dataset.progress || "";
      return;
    }
    try {
      const shown = statesShown;
      const lab = await api("/api/v1/lab");
      bar.dataset.refreshes = Number(bar.dataset.refreshes || 0) + 1;
      if (TERMINAL.has(run.state)) return;  // the run ended while this was asked for
      const mine = lab.find((c) => c.run && String(c.run.id) === String(runId));
      if (mine && mine.run.progress !== null) {
        bar.style.width = `${(mine.run.progress * 100).toFixed(1)}%`;
        bar.parentElement.dataset.progress = mine.run.progress.toFixed(4);
        document.getElementById("run-left").textContent = timeLeft(mine.run);
        const now = { step_index: mine.run.step_index, cycle_index: mine.run.cycle_index,
                      elapsed_s: mine.run.elapsed_s };
        // The lab's state only if no newer one came while it was asked for.
        showState(statesShown === shown ? { ...now, state: mine.run.state } : now);
      }
    } catch (e) { /* the next refresh tries again */ }
  });

  // Downsampled history first, then the stream from just after its last sample.
  const hist = await api(`/api/v1/runs/${runId}/samples?points=2000`);
  const t = hist.t_s.map(hours);
  await Plotly.newPlot(vit, [
    { x: t, y: hist.voltage_v, name: "Voltage / V", mode: "lines", line: { color: "#1f5fa8" } },
    { x: t, y: hist.current_a, name: "Current / A", mode: "lines", yaxis: "y2", line: { color: "#c0392b" } },
    { x: t, y: hist.temperature_c, name: "Temperature / °C", mode: "lines", yaxis: "y3", line: { color: "#7d7d00" } },
  ], baseLayout({
    xaxis: { title: { text: "Time / h" }, domain: [0, 0.88] },
    yaxis: { title: { text: "Voltage / V" } },
    yaxis2: { title: { text: "Current / A" }, overlaying: "y", side: "right" },
    yaxis3: { title: { text: "Temperature / °C" }, overlaying: "y", side: "right", anchor: "free", position: 1.0 },
  }), PLOT_CONFIG);
  points = hist.t_s.length;
  setCount(vit, points);
  const lastSeq = hist.seq.length ? Math.max(...hist.seq) : 0;

  function drawCycles() {
    const x = cycles.map((c) => c.cycle_index);
    Plotly.react(cyc, [
      { x, y: cycles.map((c) => c.discharge_capacity_ah), name: "Discharge / Ah", mode: "lines+markers" },
      { x, y: cycles.map((c) => c.charge_capacity_ah), name: "Charge / Ah", mode: "lines+markers" },
      { x, y: cycles.map((c) => c.coulombic_efficiency === null ? null : 100 * c.coulombic_efficiency),
        name: "Coulombic efficiency / %", mode: "lines+markers", yaxis: "y2" },
    ], baseLayout({ margin: { l: 60, r: 80, t: 30, b: 45 },
                    xaxis: { title: { text: "Cycle / 1" }, dtick: 1 },
                    yaxis: { title: { text: "Capacity / Ah" } },
                    yaxis2: { title: { text: "Efficiency / %", standoff: 10 }, overlaying: "y",
                              side: "right", automargin: true } }),
    PLOT_CONFIG);
    setCount(cyc, cycles.length);
    document.getElementById("cycles-none").hidden = cycles.length > 0;
  }
  drawCycles();
  let cyclesPending = false;

  function markCurrentStep() {
    let cur = stepsBody.querySelector("tr.current");
    if (TERMINAL.has(run.state)) { if (cur) cur.remove(); return; }
    if (!cur) {
      cur = el("tr", { class: "current" });
    }
    cur.replaceChildren(el("td", {}, "▶"), el("td", {}, `step ${run.step_index + 1} (now)`),
      el("td", {}, run.cycle_index), el("td", { colspan: 4 }, "in progress"));
    stepsBody.append(cur);
  }
  const events = document.getElementById("events");
  function onMessage(msg) {
    const d = msg.data;
    if (msg.event === "samples" && d.count > 0) {
      Plotly.extendTraces(vit, { x: [d.t_s.map(hours), d.t_s.map(hours), d.t_s.map(hours)],
                                 y: [d.voltage_v, d.current_a, d.temperature_c] }, [0, 1, 2], 20000);
      points = Math.min(points + d.count, 20000);
      setCount(vit, Number(vit.dataset.points) + d.count);
    } else if (msg.event === "step") {
      stepsBody.querySelector("tr.current")?.remove();
      stepsBody.append(el("tr", { "data-step": d.step_number }, el("td", {}, d.step_number),
        el("td", {}, d.kind), el("td", {}, d.cycle_index), el("td", {}, fmt(d.start_t_s, 0)),
        el("td", {}, fmt(d.end_t_s, 0)), el("td", {}, fmt(d.capacity_ah, 4)), el("td", {}, d.end_reason)));
      markCurrentStep();
      refreshProgress();
    } else if (msg.event === "cycle") {
      cycles.push(d);
      if (dqdvReload) dqdvReload();
      // One redraw per frame: the stream replays every cycle of a long run at once.
      if (!cyclesPending) {
        cyclesPending = true;
        requestAnimationFrame(() => { cyclesPending = false; drawCycles(); });
      }
    } else if (msg.event === "event") {
      events.prepend(el("li", { class: `sev-${d.severity} kind-${d.kind}` },
        el("span", { class: "muted" }, fmtTime(d.ts)), " ", el("strong", {}, d.kind), " ", d.message,
        d.actor ? el("span", { class: "muted" }, ` — ${d.actor}`) : ""));
    } else if (msg.event === "state") {
      showState(d);
      refreshProgress();
      if (TERMINAL.has(d.state)) loadVerdicts();
      if (TERMINAL.has(d.state)) document.getElementById("run-reading").hidden = true;
    } else if (msg.event === "reading") {
      // A cycler running its own program (Neware): what it reports now, ahead of the
      // harvested records the plot shows.
      const r = document.getElementById("run-reading");
      r.hidden = false;
      r.dataset.updates = Number(r.dataset.updates || 0) + 1;
      r.textContent = `Cycler now (${d.state}, ${fmt(hours(d.t_s), 3)} h): ` +
        `${fmt(d.voltage_v)} V · ${fmt(d.current_a)} A · ${fmt(d.temperature_c, 1)} °C · ` +
        `step ${d.step_index + 1} · cycle ${d.cycle_index}`;
    }
  }
  showState(run);
  sse(`/api/v1/runs/${runId}/stream`, onMessage, `${lastSeq}.0.0.0..`);
  refreshProgress();
  setInterval(() => { if (!TERMINAL.has(run.state)) refreshProgress(); }, 3000);

  async function command(what) {
    err.textContent = "";
    try { showState(await api(`/api/v1/runs/${runId}/${what}`, { method: "POST" })); }
    catch (e) { showProblem(err, e); }
  }
  document.getElementById("pause").addEventListener("click", () => command("pause"));
  document.getElementById("resume").addEventListener("click", () => command("resume"));
  const stop = document.getElementById("stop");
  stop.addEventListener("click", () => {
    // Two clicks: a stop cannot be undone, and a dialog would block the page.
    if (stop.dataset.armed !== "true") {
      stop.dataset.armed = "true";
      stop.textContent = "Confirm stop";
      setTimeout(() => { stop.dataset.armed = ""; stop.textContent = "Stop"; }, 5000);
      return;
    }
    stop.dataset.armed = "";
    stop.textContent = "Stop";
    command("stop");
  });
  for (const b of document.querySelectorAll("[data-export]")) {
    b.addEventListener("click", async () => {
      const f = b.dataset.export;
      try {
        await download(`/api/v1/runs/${runId}/export?format=${f}`,
                       f === "bdf" ? `run-${runId}.bdf.csv` : `run-${runId}.${f}`);
      } catch (e) { showProblem(err, e); }
    });
  }
  document.getElementById("report").addEventListener("click", async () => {
    try {
      const resp = await api(`/api/v1/runs/${runId}/report`, { raw: true });
      const blob = new Blob([await resp.text()], { type: "text/html" });
      window.open(URL.createObjectURL(blob), "_blank");
    } catch (e) { showProblem(err, e); }
  });

  // Impedance spectra: Nyquist plot, each spectrum with its equivalent-circuit fit.
  const spectra = await api(`/api/v1/runs/${runId}/eis`);
  const eis = document.getElementById("plot-eis");
  if (spectra.length) {
    document.getElementById("eis-none").hidden = true;
    const fits = await api(`/api/v1/runs/${runId}/eis/fits`);
    const label = (s) => `cycle ${s.cycle_index}, step ${s.step_index}`;
    const byId = Object.fromEntries(spectra.map((s) => [s.id, s]));
    // A spectrum and its fit in one colour.
    const colour = Object.fromEntries(spectra.map((s, k) => [s.id, PALETTE[k % PALETTE.length]]));
    const traces = spectra.map((s) => ({
      x: s.z_real_ohm.map(milli), y: s.z_imag_ohm.map((v) => -milli(v)), mode: "markers",
      name: `${label(s)} measured`, legendgroup: String(s.id),
      marker: { size: 5, color: colour[s.id] } }));
    for (const f of fits.filter((f) => f.z_real_ohm.length)) {
      traces.push({ x: f.z_real_ohm.map(milli), y: f.z_imag_ohm.map((v) => -milli(v)),
        mode: "lines", line: { dash: "dash", color: colour[f.spectrum_id] },
        legendgroup: String(f.spectrum_id),
        name: `${byId[f.spectrum_id] ? label(byId[f.spectrum_id]) : f.spectrum_id} fit` });
    }
    await Plotly.newPlot(eis, traces, baseLayout({
      xaxis: { title: { text: "Z′ / mΩ" } },
      yaxis: { title: { text: "−Z″ / mΩ" }, scaleanchor: "x" } }), PLOT_CONFIG);
    setCount(eis, spectra.reduce((n, s) => n + s.frequency_hz.length, 0));
    eis.dataset.fits = String(fits.filter((f) => f.fitted).length);
    const tb = document.querySelector("#eis-fits tbody");
    const pm = (f, k, scale = 1000) => f.params[k] === undefined ? "–"
      : `${fmt(f.params[k] * scale, 2)} ± ${f.stderr[k] === null ? "?" : fmt(f.stderr[k] * scale, 2)}`;
    for (const f of fits) {
      tb.append(el("tr", { "data-spectrum": f.spectrum_id, "data-fitted": f.fitted },
        el("td", {}, f.spectrum_id), el("td", {}, f.cycle_index),
        ...(f.note ? [el("td", { colspan: 5, class: "muted" }, f.note)]
          : [el("td", { class: "r0" }, pm(f, "r0_ohm")), el("td", {}, pm(f, "r1_ohm")),
             el("td", {}, pm(f, "r2_ohm")), el("td", {}, pm(f, "tau2_s")),
             el("td", {}, fmt(100 * f.rmse_rel, 2))])));
    }
    document.getElementById("eis-fits").hidden = fits.length === 0;
  } else {
    eis.hidden = true;
  }

  // Incremental capacity of the first and the last ended cycle's charge.
  const dqdvDiv = document.getElementById("plot-dqdv");
  const loadDqdv = coalesce(async () => {
    const curves = (await api(`/api/v1/runs/${runId}/dqdv`)).filter((c) => c.voltage_v.length);
    document.getElementById("dqdv-none").hidden = curves.length > 0;
    dqdvDiv.hidden = curves.length === 0;
    if (!curves.length) return;
    await Plotly.react(dqdvDiv, curves.map((c) => ({
      x: c.voltage_v, y: c.dqdv_ah_per_v, mode: "lines", name: `cycle ${c.cycle_index} ${c.direction}` })),
    baseLayout({ xaxis: { title: { text: "Voltage / V" } },
                 yaxis: { title: { text: "dQ/dV / Ah V⁻¹" } } }), PLOT_CONFIG);
    dqdvDiv.dataset.curves = String(curves.length);
  });
  await loadDqdv();
  dqdvReload = loadDqdv;

  async function loadVerdicts() {
    if (!can("evaluate")) return;
    const tb = document.querySelector("#verdicts tbody");
    try {
      const ev = await api(`/api/v1/runs/${runId}/evaluation`);
      tb.replaceChildren();
      for (const e of ev.entries) {
        tb.append(el("tr", {}, el("td", {}, e.entry_id), el("td", { class: `v-${e.verdict}` }, e.verdict),
                      el("td", {}, e.title)));
      }
      if (!ev.entries.length) tb.append(el("tr", {}, el("td", { colspan: 3 }, "No catalogue entry applies.")));
    } catch (e) {
      tb.replaceChildren(el("tr", {}, el("td", { colspan: 3 }, e.message)));
    }
  }
  if (TERMINAL.has(run.state)) loadVerdicts();
  else {
    document.querySelector("#verdicts tbody").replaceChildren(
      el("tr", {}, el("td", { colspan: 3, class: "muted" }, "Judged when the run has ended.")));
  }
}

// --- cell page -----------------------------------------------------------------------
async function initCell() {
  const cellId = document.body.dataset.cellId;
  const cell = await api(`/api/v1/cells/${cellId}`);
  document.getElementById("cell-serial").textContent = cell.serial;
  document.getElementById("cell-summary").textContent =
    `${cell.chemistry}, ${cell.capacity_ah} Ah, ${cell.discharge_cutoff_v}–${cell.charge_cutoff_v} V` +
    (cell.maker ? `, ${cell.maker} ${cell.model || ""}` : "");
  const tb = document.querySelector("#cell-runs tbody");
  const traces = [];
  let offset = 0;
  for (const id of [...cell.run_ids].sort((a, b) => a - b)) {
    const [run, cycles] = await Promise.all([api(`/api/v1/runs/${id}`), api(`/api/v1/runs/${id}/cycles`)]);
    const last = cycles.length ? cycles[cycles.length - 1].discharge_capacity_ah : null;
    tb.append(el("tr", { "data-run-id": id }, el("td", {}, el("a", { href: `/runs/${id}` }, `#${id}`)),
      el("td", {}, run.state), el("td", {}, fmtTime(run.created_at)), el("td", {}, cycles.length),
      el("td", {}, fmt(last, 4))));
    if (cycles.length) {
      traces.push({ x: cycles.map((c) => offset + c.cycle_index),
                    y: cycles.map((c) => 100 * c.discharge_capacity_ah / cell.capacity_ah),
                    mode: "lines+markers", name: `run ${id}` });
      offset += cycles.length;
    }
  }
  const fade = document.getElementById("plot-fade");
  await Plotly.newPlot(fade, traces, baseLayout({
    xaxis: { title: { text: "Cycle (all runs) / 1" } },
    yaxis: { title: { text: "Discharge capacity / % of rated" } } }), PLOT_CONFIG);
  setCount(fade, traces.reduce((n, tr) => n + tr.x.length, 0));
  if (can("evaluate")) {
    const vb = document.querySelector("#cell-verdicts tbody");
    try {
      for (const ev of await api(`/api/v1/cells/${cellId}/evaluation`)) {
        for (const e of ev.entries) {
          vb.append(el("tr", {}, el("td", {}, el("a", { href: `/runs/${ev.run_id}` }, `#${ev.run_id}`)),
            el("td", {}, `${e.entry_id} — ${e.title}`), el("td", { class: `v-${e.verdict}` }, e.verdict)));
        }
      }
    } catch (e) { vb.append(el("tr", {}, el("td", { colspan: 3 }, e.message))); }
  }
  document.body.dataset.loaded = "true";
}

// --- admin: instruments --------------------------------------------------------------
async function initAdmin() {
  // Only an admin's session gets this page (403 otherwise); its content is an admin-only
  // request too.
  const resp = await api("/ui/admin/instruments", { raw: true });
  document.getElementById("admin-instruments").innerHTML = await resp.text();
  document.getElementById("admin-body").hidden = false;
  document.getElementById("apply-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const out = document.getElementById("apply-result");
    try {
      const res = await api("/api/v1/instruments?dry_run=true", {
        method: "PUT", json: JSON.parse(document.getElementById("apply-doc").value) });
      out.textContent = JSON.stringify(res.changes || res, null, 2);
    } catch (e) { showProblem(out, e); }
  });
}

// --- queues: every channel's waiting runs; move, cancel, confirm the cell -------------
async function initQueue() {
  const box = document.getElementById("queues");
  const err = document.getElementById("queue-error");
  const [channels, cells] = await Promise.all([api("/api/v1/channels"), api("/api/v1/cells?limit=1000")]);
  const serial = Object.fromEntries(cells.map((c) => [c.id, c.serial]));
  let shown = "";

  async function act(path, opts) {
    err.textContent = "";
    try { await api(path, opts); } catch (e) { showProblem(err, e); }
    await refresh();
  }
  function actions(r, last) {
    if (!can("operate")) return el("td", {});
    const up = el("button", { type: "button", class: "secondary up", title: "Move up",
      onclick: () => act(`/api/v1/runs/${r.id}`, { method: "PATCH", json: { queue_position: r.queue_position - 1 } }) }, "↑");
    up.disabled = r.queue_position <= 1;
    const down = el("button", { type: "button", class: "secondary down", title: "Move down",
      onclick: () => act(`/api/v1/runs/${r.id}`, { method: "PATCH", json: { queue_position: r.queue_position + 1 } }) }, "↓");
    down.disabled = last;
    const cancel = el("button", { type: "button", class: "danger cancel" }, "Cancel");
    cancel.addEventListener("click", () => {
      // Two clicks, as for stopping a run: a cancelled run cannot be put back.
      if (cancel.dataset.armed !== "true") {
        cancel.dataset.armed = "true";
        cancel.textContent = "Confirm cancel";
        return;
      }
      act(`/api/v1/runs/${r.id}/stop`, { method: "POST" });
    });
    const cell = r.state === "awaiting_cell"
      ? el("button", { type: "button", class: "confirm-cell",
                       onclick: () => act(`/api/v1/runs/${r.id}/confirm-cell`, { method: "POST" }) },
           "Confirm cell")
      : "";
    return el("td", { class: "queue-actions" }, up, " ", down, " ", cell, " ", cancel);
  }

  const refresh = coalesce(async () => {
    const queues = await Promise.all(channels.map((c) => api(`/api/v1/channels/${c.id}/queue`)));
    // Redraw only on a change: a redraw would drop a half-done two-click cancel.
    const sig = JSON.stringify(queues.map((q) => q.map((r) => [r.id, r.state, r.queue_position])));
    if (sig === shown) return;
    shown = sig;
    box.replaceChildren();
    const empty = [];
    channels.forEach((c, k) => {
      const q = queues[k];
      if (!q.length) { empty.push(c.name); return; }
      const tb = el("tbody");
      q.forEach((r, i) => {
        tb.append(el("tr", { "data-run-id": r.id, "data-state": r.state, "data-position": r.queue_position },
          el("td", { class: "pos" }, r.queue_position),
          el("td", {}, el("a", { href: `/runs/${r.id}` }, `#${r.id}`)),
          el("td", {}, el("span", { class: `state s-${r.state}` }, r.state.replace("_", " "))),
          el("td", {}, el("a", { href: `/cells/${r.cell_id}` }, serial[r.cell_id] || r.cell_id)),
          el("td", {}, r.not_before ? fmtTime(r.not_before) : "when free"),
          el("td", { class: "why" }, r.waiting_reason || ""),
          actions(r, i === q.length - 1)));
      });
      box.append(el("section", { class: "card", "data-channel": c.name, "data-channel-id": c.id },
        el("h2", {}, `${c.name} `, el("span", { class: `state s-${c.state}` }, c.state)),
        el("div", { class: "table-wrap" }, el("table", { class: "queue" },
          el("thead", {}, el("tr", {}, ...["#", "Run", "State", "Cell", "Not before", "Waiting because", ""]
            .map((h) => el("th", {}, h)))), tb))));
    });
    const none = document.getElementById("queues-empty");
    none.textContent = empty.length ? `Nothing waiting on ${empty.join(", ")}.` : "";
    none.hidden = !empty.length;
    box.dataset.loaded = String(Number(box.dataset.loaded || 0) + 1);
  });
  await refresh();
  // Other technicians change queues too, and the engine takes heads off them.
  setInterval(refresh, 5000);
}

// --- import a cycler file (POST /api/v1/imports, multipart) ---------------------------
async function initImport() {
  const form = document.getElementById("import-form");
  const cellSel = document.getElementById("i-cell");
  for (const c of await api("/api/v1/cells?limit=1000")) {
    cellSel.append(el("option", { value: c.serial }, `${c.serial} — ${c.chemistry}, ${c.capacity_ah} Ah`));
  }
  const errBox = document.getElementById("import-error");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    form.querySelectorAll(".error").forEach((e) => { e.textContent = ""; });
    const file = document.getElementById("i-file").files[0];
    if (!file) { form.querySelector("[data-for='file']").textContent = "Choose a file."; return; }
    const body = new FormData();
    body.append("file", file, file.name);
    const fmtName = document.getElementById("i-format").value;
    if (fmtName) body.append("format", fmtName);
    if (cellSel.value) body.append("cell_serial", cellSel.value);
    const submit = document.getElementById("import-submit");
    submit.disabled = true;
    let res;
    try {
      res = await api("/api/v1/imports", { method: "POST", body });
    } catch (e) {
      const errors = (e.problem && e.problem.errors) || [];
      let placed = 0;
      for (const fe of errors) {
        const slot = form.querySelector(`[data-for="${String(fe.loc).replace(/^body\./, "")}"]`);
        if (slot) { slot.textContent = fe.msg; placed += 1; }
      }
      if (!placed) showProblem(errBox, e);
      return;
    } finally { submit.disabled = false; }
    const run = await api(`/api/v1/runs/${res.run_id}`);
    document.getElementById("import-title").textContent = res.created
      ? `Imported as run ${res.run_id}` : `Imported before, as run ${res.run_id}`;
    const facts = document.getElementById("import-facts");
    facts.replaceChildren();
    const rows = [["File", res.filename], ["Format", res.format], ["Reader", `${res.reader} (${res.reader_licence})`],
                  ["Samples", res.n_samples], ["Current measured", res.current_measured ? "yes" : "no"],
                  ["Cell", el("a", { href: `/cells/${run.cell_id}` }, `cell ${run.cell_id}`)],
                  ["Cycles (the cycler's own summary)", res.vendor_cycles ? res.vendor_cycles.length : "–"]];
    for (const [k, v] of rows) facts.append(el("tr", {}, el("th", {}, k), el("td", {}, v)));
    const link = document.getElementById("import-run");
    link.href = `/runs/${res.run_id}`;
    const box = document.getElementById("import-result");
    box.dataset.runId = String(res.run_id);
    box.dataset.created = String(res.created);
    box.hidden = false;
  });
}

// --- start-up ------------------------------------------------------------------------
async function main() {
  if (page === "signin") { initSignin(); return; }
  document.getElementById("signout").addEventListener("click", signOut);
  try { whoami = await api("/api/v1/whoami"); } catch (e) { return; }
  applyRole();
  followLab(page === "overview");
  const init = { overview: initOverview, start: initStart, run: initRun, cell: initCell,
                 admin: initAdmin, queue: initQueue, import: initImport }[page];
  try {
    if (init) await init();
  } catch (e) {
    const m = document.querySelector("main");
    m.prepend(el("p", { class: "error", role: "alert" }, e.message));
  }
  document.body.dataset.ready = "true";
}
main();
