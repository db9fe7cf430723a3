// The sluicegate dashboard: asks for the Admin API key once (kept in sessionStorage, this
// tab only), then polls two JSON endpoints with it: stats every second (traffic, health),
// summary every few seconds (config, counters). Read-only.
// Data is put into the page with textContent only: route names and labels come from the
// config and from clients, and must never become markup.
import { TrafficChart } from "./charts.js";

const API = "/apisix/admin/dashboard";
const KEY_STORAGE = "sluicegate.dashboard.key";
const STATS_EVERY_MS = 1000;
const SUMMARY_EVERY_MS = 5000;
const POINTS = 120;

// generation: bumped whenever polling (re)starts or stops, so a request still in flight
// from before does not render or schedule itself again.
const state = { key: sessionStorage.getItem(KEY_STORAGE), summary: null, stats: null,
  timers: [], generation: 0 };
const charts = {};

const $ = (selector, root = document) => root.querySelector(selector);

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined) continue;
    if (name === "class") node.className = value;
    else if (name === "title") node.title = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// -- formatting ----------------------------------------------------------------------------

const count = (n) => (n === null || n === undefined ? "–" : Math.round(n).toLocaleString("en-US"));
const fixed = (n, digits) => (n === null || n === undefined ? "–" : n.toFixed(digits));
const percent = (share) => (share === null || share === undefined ? "–" : (share * 100).toFixed(1));
const millis = (seconds) => (seconds === null || seconds === undefined ? "–" : (seconds * 1000).toFixed(2));
const routeName = (route) => (route === "" ? "(no route)" : route);

function ago(epochSeconds) {
  if (!epochSeconds) return null;
  const seconds = Math.max(0, Date.now() / 1000 - epochSeconds);
  if (seconds < 60) return `${Math.round(seconds)}s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)}m ago`;
  if (seconds < 86400) return `${(seconds / 3600).toFixed(1)}h ago`;
  return `${(seconds / 86400).toFixed(1)}d ago`;
}

// -- the key -------------------------------------------------------------------------------

function askForKey(message) {
  stopPolling();
  const dialog = $("#key-dialog");
  const error = $("#key-error");
  error.hidden = !message;
  error.textContent = message || "";
  $("#key-input").value = "";
  if (!dialog.open) dialog.showModal();
  $("#key-input").focus();
}

$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("#key-input").value.trim();
  if (!key) return;
  state.key = key;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("#key-dialog").close();
  startPolling();
});

$("#forget-key").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORAGE);
  state.key = null;
  askForKey("");
});

class Unauthorized extends Error {}

async function getJSON(path) {
  const response = await fetch(`${API}/${path}`, {
    headers: { "X-API-KEY": state.key }, cache: "no-store", credentials: "omit",
  });
  if (response.status === 401 || response.status === 403) {
    const body = await response.json().catch(() => ({}));
    throw new Unauthorized(body.error_msg || `HTTP ${response.status}`);
  }
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

// -- polling -------------------------------------------------------------------------------

function stopPolling() {
  state.generation += 1;
  for (const timer of state.timers) clearTimeout(timer);
  state.timers = [];
}

function poll(path, every, render) {
  const generation = state.generation;
  const run = async () => {
    try {
      const body = await getJSON(path);
      if (generation !== state.generation) return;
      render(body);
      setUpdated("live", "live");
    } catch (error) {
      if (generation !== state.generation) return;
      if (error instanceof Unauthorized) {
        sessionStorage.removeItem(KEY_STORAGE);
        state.key = null;
        askForKey(`The gateway refused the key: ${error.message}`);
        return;
      }
      setUpdated("offline", `no answer (${error.message})`);
    }
    state.timers.push(setTimeout(run, every));
  };
  run();
}

function startPolling() {
  stopPolling();
  poll(`summary`, SUMMARY_EVERY_MS, (summary) => { state.summary = summary; renderSummary(); });
  poll(`stats?points=${POINTS}`, STATS_EVERY_MS, (stats) => { state.stats = stats; renderStats(); });
}

function setUpdated(stateName, text) {
  const node = $("#updated");
  node.dataset.state = stateName;
  node.textContent = stateName === "live" ? new Date().toLocaleTimeString() : text;
}

// -- rendering -----------------------------------------------------------------------------

function plugins(names) {
  const list = el("span", { class: "plugins" });
  for (const name of names || []) list.append(el("span", { class: "tag" }, name));
  return list;
}

function renderSummary() {
  const summary = state.summary;
  const config = summary.config || {};
  $("#config-revision").textContent = config.revision ?? "–";
  const changed = ago(config.changed_at) || ago(config.file_modified_at);
  $("#config-changed").textContent = config.stale ? `${changed || "–"} (store unreachable: stale)`
    : (changed || "since start");
  $("#config-changed").classList.toggle("bad", Boolean(config.stale));
  $("#global-plugins").textContent = (summary.global_plugins || []).join(", ") || "none";

  const notices = [];
  if (summary.config_error) notices.push(`The stored config cannot be read: ${summary.config_error}`);
  if (summary.prometheus === false) {
    notices.push("Live traffic needs the prometheus plugin: add it globally "
      + "(plugins: [{name: prometheus}]) or on the routes to watch.");
  }
  const notice = $("#notice");
  notice.hidden = notices.length === 0;
  notice.textContent = notices.join(" ");

  renderServices(summary.services || []);
  renderUpstreams();
  renderRoutes();
  renderInterception(summary.interception || []);
  for (const [group, families] of Object.entries(summary.counters || {})) {
    renderFamilies(group, families);
  }
}

function renderStats() {
  const stats = state.stats;
  const gauges = stats.gauges || {};
  $("#workers").textContent = count(gauges.workers);
  $("#connections").textContent = count(gauges.http_connections);
  const all = stats.series.all.rps;
  $("#total-rps").textContent = fixed(all.length ? all[all.length - 1] : null, 1);
  $("#window").textContent = Math.max(1, Math.round(POINTS * stats.interval / 60));
  for (const measure of ["rps", "error_rate", "p50", "p99"]) {
    charts[measure].update(stats.series, POINTS * stats.interval);
  }
  renderRoutes();
  renderUpstreams();
  renderConsumers(stats.consumers || []);
}

function renderRoutes() {
  const body = $("#routes tbody");
  const configured = state.summary ? state.summary.routes || [] : [];
  const live = new Map((state.stats ? state.stats.routes : []).map((row) => [row.route, row]));
  const rows = [];
  const seen = new Set();
  for (const route of configured) {
    seen.add(route.id);
    rows.push(routeRow(route, live.get(route.id)));
  }
  // Traffic counted under a label that is not a configured route: unmatched requests, a
  // route since deleted, or a route labelled by name (prometheus prefer_name).
  for (const [id, row] of live) {
    if (!seen.has(id)) rows.push(routeRow({ id, plugins: [], uris: [] }, row));
  }
  body.replaceChildren(...rows);
}

function routeRow(route, live) {
  const match = [...(route.methods || []), ...(route.hosts || []), ...(route.uris || [])].join(" ");
  const row = el("tr", { "data-route": route.id, class: route.status === 0 ? "disabled" : null },
    el("td", { class: "id", title: route.name || null }, routeName(route.id),
      route.name ? el("small", {}, ` ${route.name}`) : null),
    el("td", { class: "match" }, match),
    el("td", {}, route.service_id || ""),
    el("td", {}, route.upstream || ""),
    el("td", {}, plugins(route.plugins)),
    el("td", { class: "num requests" }, count(live ? live.requests : 0)),
    el("td", { class: "num errors" }, count(live ? live.errors : 0)),
    el("td", { class: "num rps" }, fixed(live ? live.rps : 0, 1)),
    el("td", { class: "num error-rate" }, percent(live ? live.error_rate : null)),
    el("td", { class: "num p50" }, millis(live ? live.p50 : null)),
    el("td", { class: "num p99" }, millis(live ? live.p99 : null)));
  if (live && live.error_rate > 0) row.classList.add("erring");
  return row;
}

function liveHealth() {
  // upstream id -> node address -> healthy, from the latest stats (every second).
  const health = new Map();
  for (const item of state.stats ? state.stats.upstreams || [] : []) {
    if (!health.has(item.upstream)) health.set(item.upstream, new Map());
    health.get(item.upstream).set(item.node, item.healthy);
  }
  return health;
}

function renderUpstreams() {
  if (!state.summary) return;
  const health = liveHealth();
  const rows = (state.summary.upstreams || []).map((upstream) => {
    const nodes = el("span", { class: "nodes" });
    for (const node of upstream.nodes) {
      let status = node.health;
      const live = health.get(upstream.id);
      if (status !== "unchecked" && live && live.has(node.address)) {
        status = live.get(node.address) ? "healthy" : "unhealthy";
      }
      nodes.append(el("span", { class: `node ${status}`, "data-node": node.address,
        "data-health": status, title: `weight ${node.weight}` },
      el("span", { class: "address" }, node.address), " ",
      el("span", { class: "health" }, status)));
    }
    const checks = upstream.checks;
    const described = !checks ? "none"
      : [checks.active ? `active ${checks.active.type} every ${checks.active.interval}s` : null,
        checks.passive ? "passive" : null].filter(Boolean).join(", ");
    return el("tr", { "data-upstream": upstream.id },
      el("td", {}, upstream.id, upstream.owner ? el("small", {}, ` (${upstream.owner})`) : null),
      el("td", {}, upstream.type),
      el("td", {}, described),
      el("td", {}, nodes));
  });
  $("#upstreams tbody").replaceChildren(...rows);
}

function renderServices(services) {
  $("#services tbody").replaceChildren(...services.map((service) => el("tr",
    { "data-service": service.id },
    el("td", {}, service.id || "", service.name ? el("small", {}, ` ${service.name}`) : null),
    el("td", {}, (service.hosts || []).join(" ")),
    el("td", {}, service.upstream || ""),
    el("td", {}, plugins(service.plugins)))));
}

function renderConsumers(consumers) {
  if (consumers.length === 0) {
    $("#consumers tbody").replaceChildren(el("tr", {}, el("td", { colspan: "4", class: "muted" },
      "no requests counted yet")));
    return;
  }
  $("#consumers tbody").replaceChildren(...consumers.map((row) => el("tr",
    { "data-consumer": row.consumer },
    el("td", {}, row.consumer === "" ? "(anonymous)" : row.consumer),
    el("td", { class: "num requests" }, count(row.requests)),
    el("td", { class: "num recent" }, count(row.recent)),
    el("td", { class: "num rps" }, fixed(row.rps, 1)))));
}

function renderInterception(entries) {
  $("#intercept-entries").hidden = entries.length === 0;
  $("#intercept-entries tbody").replaceChildren(...entries.map((entry) => el("tr", {},
    el("td", {}, entry.scope), el("td", {}, entry.listen), el("td", {}, entry.mode),
    el("td", {}, entry.protocols.join(", ")), el("td", {}, entry.handle),
    el("td", {}, entry.fail_open ? "yes" : "no"))));
}

const EMPTY = {
  ai: "No AI token counters exported (they appear once an AI route has served a request).",
  interception: "No interception counters exported.",
  kernel: "No kernel counters exported (XDP/eBPF programs not loaded).",
  stream: "No L4 stream counters exported.",
  gateway: "",
};

const formatValue = (value) => (Number.isInteger(value) ? count(value) : fixed(value, 3));

function renderFamilies(group, families) {
  const container = document.querySelector(`.families[data-group="${group}"]`);
  if (!container) return;
  const withSamples = families.filter((family) => family.samples.length > 0);
  if (withSamples.length === 0) {
    container.replaceChildren(el("p", { class: "muted" }, EMPTY[group] ?? ""));
    return;
  }
  // Families of one unlabelled sample (gauges such as workers): one table together.
  const scalar = (family) => family.samples.length === 1
    && Object.keys(family.samples[0].labels).length === 0;
  const scalars = withSamples.filter(scalar);
  const tables = withSamples.filter((family) => !scalar(family)).map((family) => {
    const labels = [...new Set(family.samples.flatMap((s) => Object.keys(s.labels)))];
    const suffixes = new Set(family.samples.map((s) => s.name));
    const table = el("table", { class: "family", "data-family": family.name },
      el("caption", { title: family.help }, family.name, el("small", {}, ` ${family.type}`)),
      el("thead", {}, el("tr", {}, ...labels.map((l) => el("th", {}, l)),
        suffixes.size > 1 ? el("th", {}, "series") : null, el("th", { class: "num" }, "value"))),
      el("tbody", {}, ...family.samples.map((sample) => el("tr", {},
        ...labels.map((l) => el("td", {}, sample.labels[l] ?? "")),
        suffixes.size > 1 ? el("td", {}, sample.name.slice(family.name.length) || "value") : null,
        el("td", { class: "num" }, formatValue(sample.value))))));
    if (family.truncated) table.append(el("tfoot", {}, el("tr", {}, el("td", {}, "(more not shown)"))));
    return table;
  });
  if (scalars.length) {
    tables.unshift(el("table", { class: "family scalars" },
      el("tbody", {}, ...scalars.map((family) => el("tr", { "data-family": family.name },
        el("td", { title: family.help }, family.name, el("small", {}, ` ${family.type}`)),
        el("td", { class: "num" }, formatValue(family.samples[0].value)))))));
  }
  const tokens = withSamples.find((family) => family.name === "sluicegate_ai_tokens");
  if (tokens) tables.unshift(tokenTable(tokens));
  container.replaceChildren(...tables);
}

// AI tokens per model and consumer (summed over routes, providers and how they were
// counted): the question operators ask first; the full family follows it.
function tokenTable(family) {
  const rows = new Map();
  for (const sample of family.samples) {
    if (!sample.name.endsWith("_total")) continue;
    const { model = "", consumer = "", type = "" } = sample.labels;
    const key = `${model}\u0000${consumer}`;
    if (!rows.has(key)) rows.set(key, { model, consumer, prompt: 0, completion: 0 });
    const row = rows.get(key);
    if (type === "prompt" || type === "completion") row[type] += sample.value;
  }
  const sorted = [...rows.values()].sort((a, b) =>
    (b.prompt + b.completion) - (a.prompt + a.completion));
  return el("table", { class: "family", id: "ai-tokens" },
    el("caption", {}, "tokens by model and consumer"),
    el("thead", {}, el("tr", {}, el("th", {}, "model"), el("th", {}, "consumer"),
      el("th", { class: "num" }, "prompt"), el("th", { class: "num" }, "completion"),
      el("th", { class: "num" }, "total"))),
    el("tbody", {}, ...sorted.map((row) => el("tr",
      { "data-model": row.model, "data-consumer": row.consumer },
      el("td", {}, row.model), el("td", {}, row.consumer === "" ? "(anonymous)" : row.consumer),
      el("td", { class: "num prompt" }, count(row.prompt)),
      el("td", { class: "num completion" }, count(row.completion)),
      el("td", { class: "num total" }, count(row.prompt + row.completion))))));
}

// -- start ---------------------------------------------------------------------------------

for (const measure of ["rps", "error_rate", "p50", "p99"]) {
  const id = { rps: "chart-rps", error_rate: "chart-errors", p50: "chart-p50", p99: "chart-p99" }[measure];
  charts[measure] = new TrafficChart(document.getElementById(id), measure);
}
window.addEventListener("resize", () => Object.values(charts).forEach((chart) => chart.resize()));

if (state.key) startPolling();
else askForKey("");
