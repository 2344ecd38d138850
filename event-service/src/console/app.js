// The console page: a client of this event service like any other (./client.js is the project's
// JavaScript client), plus the instance's gauges from /console/stats and a publish form.
//
// `?subscribe=a,b` chooses the patterns subscribed on load (default `demo.*`; empty for none).

import { EventRouterClient } from "./client.js";

const MAX_EVENTS = 200;
const MAX_LOG = 50;
const STATS_EVERY_MS = 1000;

const $ = (id) => document.getElementById(id);
const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
const client = new EventRouterClient(wsUrl);
// Exposed for tests and for poking at from the developer tools.
window.consoleClient = client;

let received = 0;

function log(text) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toISOString().slice(11, 23)}  ${text}`;
  const list = $("log");
  list.prepend(li);
  while (list.children.length > MAX_LOG) list.lastChild.remove();
}

function setStatus(el, text, kind = "") {
  el.textContent = text;
  el.className = `status ${kind}`;
}

// --- connection state ---------------------------------------------------------------------------

client.addEventListener("state", (e) => {
  $("connection").dataset.state = e.detail.state;
  $("state").textContent = e.detail.state;
  if (e.detail.state === "open") $("state-info").textContent = client.reconnects ? `reconnects: ${client.reconnects}` : "";
});
client.addEventListener("open", (e) => log(e.detail.reconnect ? `reconnected (${e.detail.reconnects})` : "connected"));
client.addEventListener("close", (e) => {
  const d = e.detail;
  const what = `closed ${d.code}${d.reason ? ` (${d.reason})` : ""}`;
  if (d.willReconnect) {
    $("state-info").textContent = `${what}; retry in ${d.delayMs} ms`;
    log(`${what}: ${d.policy === "prompt" ? "reconnecting promptly" : "backing off"} ${d.delayMs} ms`);
  } else {
    $("state-info").textContent = what;
    log(`${what}: not reconnecting`);
  }
});
client.addEventListener("resubscribed", (e) => log(`resubscribed ${e.detail.patterns.join(" ")}`));
client.addEventListener("error", (e) => log(`error: ${e.detail.error.message}`));

// --- events -------------------------------------------------------------------------------------

function short(value) {
  const text = JSON.stringify(value);
  return text.length > 400 ? `${text.slice(0, 400)}…` : text;
}

function showEvent(ev) {
  received += 1;
  $("event-count").textContent = `${received} received`;
  const li = document.createElement("li");
  li.className = "fresh";
  li.dataset.event = ev.event;
  li.dataset.id = ev.id;
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = (ev.time ?? "").slice(11, 23);
  time.title = ev.time;
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = ev.event;
  const data = document.createElement("span");
  data.className = "data";
  data.textContent = short(ev.data);
  li.append(time, name, data);
  const list = $("events");
  list.prepend(li);
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
}

$("clear").addEventListener("click", () => {
  $("events").replaceChildren();
  received = 0;
  $("event-count").textContent = "0 received";
});

// --- subscriptions ------------------------------------------------------------------------------

function renderPatterns() {
  const list = $("patterns");
  list.replaceChildren(
    ...client.patterns.sort().map((p) => {
      const li = document.createElement("li");
      li.dataset.pattern = p;
      const name = document.createElement("span");
      name.textContent = p;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "×";
      remove.title = `unsubscribe ${p}`;
      remove.addEventListener("click", () => unsubscribe(p));
      li.append(name, remove);
      return li;
    }),
  );
}

async function subscribe(pattern) {
  const status = $("subscribe-status");
  try {
    await client.subscribe(pattern, showEvent);
    setStatus(status, `subscribed ${pattern}`, "ok");
  } catch (error) {
    setStatus(status, error.code ? `${error.code}: ${error.serverMessage}` : String(error), "error");
  }
  renderPatterns();
}

async function unsubscribe(pattern) {
  const status = $("subscribe-status");
  try {
    await client.unsubscribe(pattern);
    setStatus(status, `unsubscribed ${pattern}`, "ok");
  } catch (error) {
    setStatus(status, error.code ? `${error.code}: ${error.serverMessage}` : String(error), "error");
  }
  renderPatterns();
}

$("subscribe-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = $("pattern");
  const pattern = input.value.trim();
  if (!pattern) return;
  input.value = "";
  subscribe(pattern);
});

// --- publish ------------------------------------------------------------------------------------

$("publish-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const status = $("publish-status");
  let data;
  try {
    data = JSON.parse($("publish-data").value);
  } catch (error) {
    setStatus(status, `data is not JSON: ${error.message}`, "error");
    return;
  }
  try {
    const res = await fetch("/publish", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ event: $("publish-event").value.trim(), data }),
    });
    const body = await res.json().catch(() => ({}));
    if (res.status === 202) setStatus(status, `${res.status}: accepted ${body.accepted}`, "ok");
    else setStatus(status, `${res.status}: ${body.error ?? res.statusText}`, "error");
  } catch (error) {
    setStatus(status, `publish failed: ${error.message}`, "error");
  }
});

// --- gauges -------------------------------------------------------------------------------------

let previous = null;

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function rate(now, then, field) {
  if (!then) return "–";
  const seconds = (now.at - then.at) / 1000;
  const delta = now[field] - then[field];
  // Behind a load balancer two readings may come from different instances.
  if (seconds <= 0 || delta < 0) return "–";
  return (delta / seconds).toFixed(delta / seconds < 10 ? 1 : 0);
}

async function refreshStats() {
  try {
    const res = await fetch("/console/stats", { cache: "no-store" });
    if (!res.ok) throw new Error(`${res.status}`);
    const s = await res.json();
    s.at = performance.now();
    $("g-connections").textContent = `${s.connections}`;
    $("g-connections").title = `of at most ${s.max_connections}`;
    $("g-deliveries").textContent = rate(s, previous, "deliveries_total");
    $("g-received").textContent = rate(s, previous, "events_received_total");
    $("g-recvq").textContent = bytes(s.recv_q_bytes);
    $("g-recvq").title = `largest: ${bytes(s.recv_q_max_bytes)}; sampled every ${s.socket_sample_interval_seconds} s`;
    $("g-subscriptions").textContent = `${s.subscriptions}`;
    $("g-source").textContent = s.draining ? `${s.source} (draining)` : `${s.source}`;
    previous = s;
  } catch {
    previous = null;
  }
}

// --- start --------------------------------------------------------------------------------------

const params = new URLSearchParams(location.search);
const initial = (params.has("subscribe") ? params.get("subscribe") : "demo.*")
  .split(",")
  .map((p) => p.trim())
  .filter(Boolean);

client.connect().catch((error) => log(`could not connect: ${error.message}`));
for (const p of initial) subscribe(p);
refreshStats();
setInterval(refreshStats, STATS_EVERY_MS);
