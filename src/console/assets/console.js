// ddpm-worker console: renders /console/ (jobs), /console/jobs/<id> and /console/workers from the
// server's JSON routes and server-sent events. Plain DOM: every value is set as text, never as HTML.
"use strict";

const BASE = "/console";
const STATES = ["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"];
const CODES = ["OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
  "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"];

let session = null;   // {name, role, tokens, can_act, admin}
let teardown = [];    // what the current page must close when another is shown

// ---- helpers ---------------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "style") el.style.cssText = v; // through the CSSOM: the page's CSP refuses inline style attributes
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(path, options = {}) {
  const init = { credentials: "same-origin", headers: {} };
  if (options.method) {
    init.method = options.method;
    init.headers["X-DDPM-Console"] = "1";
  }
  if (options.body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.body);
  }
  const response = await fetch(BASE + "/api" + path, init);
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    throw new ApiError(response.status, body && body.code || String(response.status),
      body && body.message || response.statusText);
  }
  return body;
}

const stateName = (s) => String(s || "").replace(/^JOB_STATE_/, "");
const schedulerName = (s) => String(s || "").replace(/^SCHEDULER_/, "").toLowerCase();
const num = (v) => (v === undefined || v === null ? 0 : Number(v));

function ago(iso) {
  if (!iso) return "";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  return duration(s) + " ago";
}
function duration(s) {
  if (s < 60) return Math.round(s) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
  return Math.floor(s / 86400) + " d " + Math.round((s % 86400) / 3600) + " h";
}
function eta(job) {
  if (!job.estimatedFinishTime) return "";
  const s = (Date.parse(job.estimatedFinishTime) - Date.now()) / 1000;
  return s > 0 ? "in " + duration(s) : "now";
}
function rate(job) {
  return job.samplesPerSecond === undefined ? "" : Number(job.samplesPerSecond).toFixed(2);
}
function stateBadge(state) {
  const name = stateName(state);
  return h("span", { class: "state " + name, "data-state": name }, name);
}
function progress(job) {
  const done = num(job.samplesDone), total = num(job.samplesTotal);
  const pct = total ? Math.min(100, (100 * done) / total) : 0;
  const bar = h("div", { class: "bar", title: pct.toFixed(1) + " %" }, h("span", { style: "width:" + pct + "%" }));
  return h("div", {}, h("div", { class: "muted" }, done + " / " + total), bar);
}
function codeName(code) { return CODES[num(code)] || "CODE_" + code; }

// ---- session and routing ---------------------------------------------------------------------------

function showSession() {
  const el = document.getElementById("session");
  el.replaceChildren();
  if (!session) return;
  if (!session.tokens) {
    el.append(h("span", {}, "no tokens: anyone may act"));
    return;
  }
  el.append(h("span", { id: "whoami" }, session.name + " (" + session.role + ")"),
    h("button", { class: "secondary", id: "logout", onclick: async () => {
      await api("/logout", { method: "POST" }).catch(() => {});
      session = null;
      navigate(BASE + "/login");
    } }, "Log out"));
}

function navigate(path, replace) {
  if (replace) history.replaceState(null, "", path); else history.pushState(null, "", path);
  render();
}

document.addEventListener("click", (e) => {
  const a = e.target.closest("a[data-link]");
  if (!a || e.metaKey || e.ctrlKey || e.shiftKey || e.button !== 0) return;
  e.preventDefault();
  navigate(a.getAttribute("href"));
});
window.addEventListener("popstate", render);

async function render() {
  for (const close of teardown) close();
  teardown = [];
  const app = document.getElementById("app");
  const path = location.pathname.replace(/\/+$/, "") || BASE;
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", a.getAttribute("href").replace(/\/+$/, "") === path
      || (a.id === "nav-jobs" && path.startsWith(BASE + "/jobs")));
  }
  if (path === BASE + "/login") return loginPage(app);
  if (!session) {
    try {
      session = await api("/session");
    } catch (e) {
      if (e.status === 401) return loginPage(app, e.message);
      app.replaceChildren(h("p", { class: "notice" }, "The server cannot be reached: " + e.message));
      return;
    }
  }
  showSession();
  const job = path.match(/^\/console\/jobs\/([^/]+)$/);
  if (job) return jobPage(app, decodeURIComponent(job[1]));
  if (path === BASE + "/workers") return workersPage(app);
  return jobsPage(app);
}

function loginPage(app, why) {
  session = null;
  showSession();
  const message = h("p", { class: "error", id: "login-error" }, why && why !== "log in with a token" ? why : "");
  const input = h("input", { type: "password", id: "token", name: "token", autocomplete: "current-password",
    placeholder: "token", required: true });
  const form = h("form", { class: "card login", id: "login", onsubmit: async (e) => {
    e.preventDefault();
    message.textContent = "";
    try {
      session = await api("/login", { method: "POST", body: { token: input.value } });
      const back = new URLSearchParams(location.search).get("next");
      navigate(back && back.startsWith(BASE + "/") ? back : BASE + "/", true);
    } catch (err) {
      message.textContent = err.code + ": " + err.message;
    }
  } },
  h("h1", {}, "Log in"),
  h("p", { class: "muted" }, "A token of this server's token file (any role: read sees, submit and admin act)."),
  h("label", { for: "token" }, "Token"), input, h("button", { type: "submit" }, "Log in"), message);
  app.replaceChildren(form);
  if (location.pathname !== BASE + "/login") {
    history.replaceState(null, "", BASE + "/login?next=" + encodeURIComponent(location.pathname));
  }
  input.focus();
}

// A server-sent event stream that says whether it is connected; closed when the page changes.
function stream(path, handlers, onStatus) {
  const source = new EventSource(BASE + "/api" + path);
  source.onopen = () => onStatus && onStatus(true);
  source.onerror = () => {
    onStatus && onStatus(false);
    // A refused stream (401/403/404) is closed by the browser: say why once.
    if (source.readyState === EventSource.CLOSED) {
      api("/session").catch((e) => { if (e.status === 401) navigate(BASE + "/login"); });
    }
  };
  for (const [name, fn] of Object.entries(handlers)) {
    source.addEventListener(name, (e) => fn(e.data, source));
  }
  teardown.push(() => source.close());
  return source;
}

function liveDot() {
  const dot = h("span", { class: "live off", title: "not connected" });
  return [dot, (on) => { dot.classList.toggle("off", !on); dot.title = on ? "live" : "reconnecting"; }];
}

// ---- jobs ------------------------------------------------------------------------------------------

function jobsPage(app) {
  const params = new URLSearchParams(location.search);
  const jobs = new Map();
  const stateSel = h("select", { id: "filter-state", onchange: update },
    h("option", { value: "" }, "every state"), STATES.map((s) => h("option", { value: s }, s.toLowerCase())));
  stateSel.value = params.get("state") || "";
  const labelIn = h("input", { id: "filter-label", placeholder: "label: key=value", onchange: update });
  labelIn.value = params.get("label") || "";
  const [dot, setLive] = liveDot();
  const tbody = h("tbody", { id: "jobs" });
  const count = h("span", { class: "muted" });
  app.replaceChildren(
    h("h1", {}, dot, "Jobs"),
    h("div", { class: "toolbar" }, stateSel, labelIn, count),
    h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Job"), h("th", {}, "State"), h("th", { class: "hide-narrow" }, "Owner"),
        h("th", { class: "hide-narrow" }, "Model"), h("th", { class: "hide-narrow" }, "Sampling"), h("th", {}, "Samples"),
        h("th", { class: "num hide-narrow" }, "Samples/s"), h("th", { class: "hide-narrow" }, "ETA"),
        h("th", { class: "hide-narrow" }, "Age"))),
      tbody)));

  function update() {
    const q = new URLSearchParams();
    if (stateSel.value) q.set("state", stateSel.value);
    if (labelIn.value) q.set("label", labelIn.value);
    const search = q.toString() ? "?" + q : "";
    if (search !== location.search) history.replaceState(null, "", BASE + "/" + search);
    draw();
  }
  function shown(job) {
    if (stateSel.value && stateName(job.state) !== stateSel.value) return false;
    const label = labelIn.value.trim();
    if (label) {
      const [k, v] = label.split("=", 2);
      const labels = (job.spec && job.spec.labels) || {};
      if (!(k in labels) || (v !== undefined && labels[k] !== v)) return false;
    }
    return true;
  }
  function draw() {
    const rows = [...jobs.values()].filter(shown)
      .sort((a, b) => String(b.createTime).localeCompare(String(a.createTime)));
    tbody.replaceChildren(...rows.map(row));
    count.textContent = rows.length + " of the newest " + jobs.size + " jobs";
    if (!rows.length) tbody.append(h("tr", {}, h("td", { colspan: 9, class: "muted" }, "No jobs.")));
  }
  function row(job) {
    const spec = job.spec || {}, sampling = spec.sampling || {};
    return h("tr", { "data-job": job.jobId },
      h("td", {}, h("a", { href: BASE + "/jobs/" + encodeURIComponent(job.jobId), "data-link": true }, job.jobId.slice(0, 8))),
      h("td", {}, stateBadge(job.state)),
      h("td", { class: "hide-narrow" }, job.owner || ""),
      h("td", { class: "hide-narrow" }, spec.model || ""),
      h("td", { class: "hide-narrow" }, schedulerName(sampling.scheduler) + " " + (sampling.steps || "")),
      h("td", {}, progress(job)),
      h("td", { class: "num hide-narrow" }, rate(job)),
      h("td", { class: "hide-narrow" }, eta(job)),
      h("td", { class: "hide-narrow" }, ago(job.createTime)));
  }
  stream("/jobs/events", {
    snapshot: (data) => { jobs.clear(); for (const v of JSON.parse(data)) jobs.set(v.job.jobId, v.job); draw(); },
    job: (data) => { const v = JSON.parse(data); jobs.set(v.job.jobId, v.job); draw(); },
    removed: (id) => { jobs.delete(id); draw(); },
  }, setLive);
  const tick = setInterval(draw, 5000); // ages and ETAs move on between events
  teardown.push(() => clearInterval(tick));
}

// ---- one job ---------------------------------------------------------------------------------------

function jobPage(app, id) {
  const [dot, setLive] = liveDot();
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const notice = h("div", { id: "action-result" });
  app.replaceChildren(h("h1", {}, dot, "Job ", h("code", {}, id)), notice, body);
  let source = null;

  function connect() {
    source = stream("/jobs/" + encodeURIComponent(id) + "/events", {
      job: (data, s) => {
        const view = JSON.parse(data);
        draw(view);
        // The stream ends after a final state; keep the page as it is (EventSource would reconnect).
        if (["SUCCEEDED", "FAILED", "CANCELLED"].includes(stateName(view.job.state))) { s.close(); setLive(false); }
      },
      gone: (why, s) => { s.close(); body.replaceChildren(h("p", { class: "notice" }, why)); },
    }, setLive);
  }

  async function act(what) {
    notice.replaceChildren();
    try {
      const view = await api("/jobs/" + encodeURIComponent(id) + "/" + what, { method: "POST" });
      draw(view);
      if (source) source.close();
      connect();
    } catch (e) {
      notice.replaceChildren(h("p", { class: "notice", "data-code": e.code }, what + " refused: " + e.code + ": " + e.message));
    }
  }

  function draw(view) {
    const job = view.job, spec = job.spec || {}, sampling = spec.sampling || {}, output = spec.output || {};
    const state = stateName(job.state);
    const live = state === "QUEUED" || state === "RUNNING";
    const actions = h("div", { class: "toolbar" });
    if (session && session.can_act && live) {
      actions.append(h("button", { class: "danger", id: "cancel", onclick: () => act("cancel") }, "Cancel"));
    }
    if (session && session.can_act && state === "FAILED") {
      actions.append(h("button", { id: "retry", onclick: () => act("retry") }, "Retry"));
    }
    const summary = h("div", { class: "card" }, h("dl", {},
      h("dt", {}, "State"), h("dd", { id: "job-state" }, stateBadge(job.state)),
      h("dt", {}, "Owner"), h("dd", {}, job.owner || ""),
      h("dt", {}, "Model"), h("dd", {}, spec.model || ""),
      h("dt", {}, "Sampling"), h("dd", {}, schedulerName(sampling.scheduler) + ", " + (sampling.steps || "") + " steps"
        + (sampling.eta !== undefined ? ", eta " + sampling.eta : "")),
      h("dt", {}, "Samples"), h("dd", {}, progress(job)),
      h("dt", {}, "Shards"), h("dd", {}, (job.shardsDone || 0) + " / " + (job.shardsTotal || 0)),
      h("dt", {}, "Samples/s"), h("dd", {}, rate(job)),
      h("dt", {}, "ETA"), h("dd", {}, eta(job)),
      h("dt", {}, "Seed, batch"), h("dd", {}, (spec.seed || "0") + ", " + (spec.batchSize || "")),
      h("dt", {}, "Output"), h("dd", {}, [output.destination, output.prefix].filter(Boolean).join(" ")
        + " (" + String(output.format || "").replace(/^OUTPUT_FORMAT_/, "").toLowerCase() + ")"),
      h("dt", {}, "Priority"), h("dd", {}, spec.priority || 0),
      h("dt", {}, "Labels"), h("dd", {}, Object.entries(spec.labels || {}).map(([k, v]) => k + "=" + v).join(", ")),
      h("dt", {}, "Submitted"), h("dd", {}, (job.createTime || "") + " (" + ago(job.createTime) + ")"),
      job.startTime && [h("dt", {}, "Started"), h("dd", {}, job.startTime)],
      job.finishTime && [h("dt", {}, "Finished"), h("dd", {}, job.finishTime)]));

    const stats = job.shardStats;
    const shards = h("div", { class: "card", id: "shards" }, h("h2", {}, "Shards"),
      stats ? [h("dl", {}, h("dt", {}, "Attempts"), h("dd", { id: "attempts" }, stats.attempts || 0),
        h("dt", {}, "Retried"), h("dd", {}, stats.retried || 0),
        h("dt", {}, "Failed"), h("dd", {}, stats.failed || 0)),
      (stats.runners || []).length ? h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Worker"), h("th", {}, "Device"),
        h("th", { class: "num" }, "Shards"))), h("tbody", {}, (stats.runners || []).map((r) =>
        h("tr", {}, h("td", {}, r.worker), h("td", {}, r.device), h("td", { class: "num" }, r.shards))))) : h("p", { class: "muted" }, "No shard finished yet.")]
        : h("p", { class: "muted" }, "No shard has run yet."));

    const error = job.error ? h("div", { class: "card", id: "job-error" }, h("h2", {}, "Error"),
      h("p", {}, h("strong", {}, codeName(job.error.code)), ": ", job.error.message || ""),
      (job.error.details || []).length ? h("pre", {}, JSON.stringify(job.error.details, null, 2)) : null) : null;

    const files = "/console/api/jobs/" + encodeURIComponent(id) + "/files/";
    const links = state === "SUCCEEDED" ? h("p", { id: "links" },
      h("a", { href: files + "manifest.json" }, "manifest"), " · ",
      h("a", { href: files + "README.md" }, "dataset card"), " · ",
      h("a", { href: files + "index/part-000000.parquet" }, "index (first part)"),
      job.manifestUri ? h("span", { class: "muted" }, " · " + job.manifestUri) : null) : null;

    const grids = h("div", { class: "grids", id: "grids" }, (view.grids || []).map((g) =>
      g.written ? h("figure", {}, h("img", { src: files + g.path, alt: "grid " + g.number, "data-grid": g.number }),
        h("figcaption", {}, "samples " + g.first + "–" + (g.end - 1)))
        : h("figure", {}, h("div", { class: "pending" }, "not written yet"), h("figcaption", {}, "samples " + g.first + "–" + (g.end - 1)))));

    const images = h("div", { class: "card" }, h("h2", {}, "Grids"), links, grids);
    body.replaceChildren(...[actions, h("div", { class: "grid2" }, summary, images), error, shards,
      h("h2", {}, "Spec"), h("pre", { id: "spec" }, JSON.stringify(spec, null, 2))].filter(Boolean));
  }
  connect();
}

// ---- workers ---------------------------------------------------------------------------------------

function workersPage(app) {
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const byPriority = h("tbody", { id: "priorities" });
  app.replaceChildren(h("h1", {}, "Workers and queue"), body,
    h("h2", {}, "Queued work by priority"), h("p", { class: "muted" }, "Shards not yet done of the newest queued and running jobs."),
    h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Priority"),
      h("th", { class: "num" }, "Jobs"), h("th", { class: "num" }, "Shards left"))), byPriority)));
  async function load() {
    try {
      const w = await api("/workers");
      const models = (w.models || []).map((m) => h("tr", {}, h("td", {}, m.name), h("td", {}, m.width + "×" + m.height + "×" + m.channels),
        h("td", { class: "num" }, m.maxBatchSize || ""), h("td", {}, (m.devices || []).map((d) => d.device + (d.maxBatchSize ? " ≤ " + d.maxBatchSize : "")).join(", ")),
        h("td", { class: "hide-narrow" }, (m.weightsSha256 || "").slice(0, 12))));
      body.replaceChildren(h("div", { class: "grid2" },
        h("div", { class: "card" }, h("h2", {}, "This server"), h("dl", {},
          h("dt", {}, "Worker"), h("dd", { id: "worker" }, w.worker),
          h("dt", {}, "Devices"), h("dd", { id: "devices" }, (w.devices || []).join(", ") || "none (API only)"),
          h("dt", {}, "Data type"), h("dd", {}, w.dtype),
          h("dt", {}, "Max batch"), h("dd", {}, w.maxBatchSize),
          h("dt", {}, "Busy"), h("dd", { id: "busy" }, w.shardsRunning ? w.shardsRunning + " shard(s) running" : "idle"),
          h("dt", {}, "Draining"), h("dd", {}, w.draining ? "yes" : "no"))),
        h("div", { class: "card" }, h("h2", {}, "Queue"), h("dl", {},
          h("dt", {}, "Reachable"), h("dd", {}, w.queueReachable ? "yes" : "no"),
          h("dt", {}, "Shards queued"), h("dd", { id: "queued" }, w.queue.queued),
          h("dt", {}, "Shards leased"), h("dd", {}, w.queue.leased),
          h("dt", {}, "Oldest queued"), h("dd", {}, w.queue.oldestQueuedSeconds === null ? "" : duration(w.queue.oldestQueuedSeconds))))),
      h("h2", {}, "Models"), h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Model"),
        h("th", {}, "Size"), h("th", { class: "num" }, "Max batch"), h("th", {}, "Devices (fit)"), h("th", { class: "hide-narrow" }, "sha256"))),
      h("tbody", {}, models))));
    } catch (e) {
      if (e.status === 401) return navigate(BASE + "/login");
      body.replaceChildren(h("p", { class: "notice" }, e.code + ": " + e.message));
    }
  }
  load();
  const tick = setInterval(load, 10000);
  teardown.push(() => clearInterval(tick));
  const jobs = new Map();
  const draw = () => {
    const groups = new Map();
    for (const j of jobs.values()) {
      const s = stateName(j.state);
      if (s !== "QUEUED" && s !== "RUNNING") continue;
      const p = (j.spec && j.spec.priority) || 0;
      const g = groups.get(p) || { jobs: 0, shards: 0 };
      g.jobs += 1; g.shards += num(j.shardsTotal) - num(j.shardsDone);
      groups.set(p, g);
    }
    const rows = [...groups.entries()].sort((a, b) => b[0] - a[0]).map(([p, g]) =>
      h("tr", {}, h("td", {}, p), h("td", { class: "num" }, g.jobs), h("td", { class: "num" }, g.shards)));
    byPriority.replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: 3, class: "muted" }, "Nothing queued."))]));
  };
  stream("/jobs/events", {
    snapshot: (data) => { jobs.clear(); for (const v of JSON.parse(data)) jobs.set(v.job.jobId, v.job); draw(); },
    job: (data) => { const v = JSON.parse(data); jobs.set(v.job.jobId, v.job); draw(); },
    removed: (id) => { jobs.delete(id); draw(); },
  });
}

render();
