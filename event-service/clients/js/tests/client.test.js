// The client against the real event service (the binary, spawned on loopback ports): replies,
// errors, delivery, reconnection after a restart and after a drain, and no reconnect loop after
// close codes that retrying would only repeat.

import assert from "node:assert/strict";
import { after, test } from "node:test";

import { CloseCode, EventRouterClient, EventRouterError } from "../index.js";
import { Balancer, Service, publish, record, sleep, waitFor } from "./support.js";

const started = [];
async function service(args = [], name) {
  const s = await Service.start(args, { name });
  started.push(s);
  return s;
}
const clients = [];
function client(url, options = {}) {
  const c = new EventRouterClient(url, {
    backoff: { initialMs: 100, maxMs: 1000 },
    ...options,
  });
  clients.push(c);
  return c;
}
after(async () => {
  for (const c of clients) c.close();
  await Promise.all(started.map((s) => s.stop("SIGKILL")));
});

test("subscribe resolves on `subscribed`, events reach the handlers whose patterns match", async () => {
  const svc = await service();
  const c = client(svc.wsUrl);
  await c.connect();
  assert.equal(c.state, "open");
  const orders = [];
  const users = [];
  const all = [];
  const sub = await c.subscribe(["order.*", "order.#"], (e) => orders.push(e));
  assert.deepEqual(sub.patterns, ["order.*", "order.#"]);
  await c.subscribe("user.*.notification", (e) => users.push(e));
  await c.subscribe("#", (e) => all.push(e));
  assert.deepEqual(c.patterns.sort(), ["#", "order.#", "order.*", "user.*.notification"]);

  await publish(svc.httpUrl, [
    { event: "order.created", data: { id: 42 } },
    { event: "user.7.notification", data: "hi" },
    { event: "order.eu.shipped", data: [1, 2] },
  ]);
  await waitFor(() => all.length === 3, "three events");
  assert.deepEqual(
    orders.map((e) => [e.event, e.data]),
    [
      ["order.created", { id: 42 }],
      ["order.eu.shipped", [1, 2]],
    ],
    "a handler gets an event once even when two of its patterns match",
  );
  assert.deepEqual(users.map((e) => e.data), ["hi"]);
  const [first] = all;
  assert.match(first.id, /^[0-9a-f-]{36}$/);
  assert.ok(!Number.isNaN(Date.parse(first.time)), first.time);
  assert.equal(c.lastEventId, all[2].id);
  assert.ok((await c.ping()) >= 0);
});

test("errors reject with the server's code and message; the connection stays usable", async () => {
  const svc = await service(["--max-subscriptions", "2"]);
  const c = client(svc.wsUrl);
  await c.connect();
  await assert.rejects(c.subscribe("a..b", () => {}), (e) => {
    assert.ok(e instanceof EventRouterError);
    assert.equal(e.code, "invalid_pattern");
    assert.match(e.serverMessage, /a\.\.b/);
    return true;
  });
  await assert.rejects(c.subscribe(["a", "b", "c"], () => {}), { code: "too_many_subscriptions" });
  assert.deepEqual(c.patterns, [], "nothing is held after a refusal");
  const got = [];
  await c.subscribe("a", (e) => got.push(e.event));
  await publish(svc.httpUrl, { event: "a", data: 1 });
  await waitFor(() => got.length === 1, "the event after the errors");
  assert.equal(c.state, "open");
});

test("unsubscribe resolves on `unsubscribed`; no more events for that pattern", async () => {
  const svc = await service();
  const c = client(svc.wsUrl);
  const got = [];
  const handler = (e) => got.push(e.event);
  const sub = await c.subscribe(["x.gone", "x.kept"], handler);
  assert.equal(c.state, "open", "the first subscribe connects");
  const other = [];
  await c.subscribe("x.gone", (e) => other.push(e.event));
  // Another handler still holds x.gone: removing this one changes nothing at the server.
  assert.deepEqual(await c.unsubscribe("x.gone", handler), []);
  assert.deepEqual(await c.unsubscribe("x.gone"), ["x.gone"]);
  assert.deepEqual(c.patterns, ["x.kept"]);
  assert.equal(await svc.metric("eventrouter_subscriptions"), 1);
  // Events reach a connection in publish order: once x.kept arrived, x.gone would have.
  await publish(svc.httpUrl, [
    { event: "x.gone", data: 1 },
    { event: "x.kept", data: 2 },
  ]);
  await waitFor(() => got.length === 1, "x.kept");
  assert.deepEqual(got, ["x.kept"]);
  assert.deepEqual(other, []);
  assert.deepEqual(await sub.unsubscribe(), ["x.gone", "x.kept"]);
  assert.deepEqual(c.patterns, []);
});

test("after the server restarts, the client reconnects with backoff and resubscribes", async () => {
  const first = await service([], "first");
  const port = first.port;
  const c = client(first.wsUrl);
  const closes = record(c, "close");
  const resubscribed = record(c, "resubscribed");
  const got = [];
  await c.subscribe(["restart.*", "other.#"], (e) => got.push(e.data));
  await first.stop("SIGKILL");
  await waitFor(() => closes.length >= 1, "the close");
  assert.equal(closes[0].code, CloseCode.ABNORMAL);
  assert.equal(closes[0].policy, "backoff");
  assert.equal(closes[0].willReconnect, true);
  await sleep(300); // a few refused attempts while nothing listens
  const second = await service(["--listen", `127.0.0.1:${port}`], "second");
  await waitFor(() => resubscribed.length === 1, "the resubscription", 15_000);
  assert.deepEqual(resubscribed[0].patterns.sort(), ["other.#", "restart.*"]);
  assert.equal(c.state, "open");
  assert.equal(c.reconnects, 1);
  assert.equal(await second.metric("eventrouter_subscriptions"), 2);
  await publish(second.httpUrl, { event: "restart.done", data: "back" });
  await waitFor(() => got.length === 1, "an event from the new process");
  assert.deepEqual(got, ["back"]);
});

test("a drain (1001) makes the client reconnect promptly to another instance", async () => {
  const a = await service(["--drain-duration", "1s"], "a");
  const b = await service(["--drain-duration", "1s"], "b");
  const lb = await Balancer.start([a, b]);
  try {
    await lb.allReady();
    // Backoff this long would fail the timing below: only the prompt path is fast enough.
    const c = client(lb.wsUrl, {
      backoff: { initialMs: 20_000, maxMs: 20_000 },
      promptJitterMs: 300,
      random: () => 0.99,
    });
    const closes = record(c, "close");
    const opens = record(c, "open");
    const got = [];
    await c.subscribe("drain.#", (e) => got.push(e.data));
    const onA = (await a.metric("eventrouter_connections")) === 1;
    const [from, to] = onA ? [a, b] : [b, a];
    const signalled = Date.now();
    from.proc.kill("SIGTERM");
    await waitFor(() => opens.length === 2, "the reconnect", 5_000);
    const took = Date.now() - signalled;
    assert.equal(closes[0].code, CloseCode.GOING_AWAY);
    assert.equal(closes[0].policy, "prompt");
    assert.ok(closes[0].delayMs < 300, `jitter ${closes[0].delayMs} ms`);
    // The drain closes the only client in the middle of the 1 s drain; then at most the jitter.
    assert.ok(took < 2_000, `reconnected ${took} ms after SIGTERM`);
    await waitFor(async () => (await to.metric("eventrouter_subscriptions")) === 1, "resubscribed on the other");
    await publish(to.httpUrl, { event: "drain.after", data: "still here" });
    await waitFor(() => got.length === 1, "an event after the drain");
    assert.deepEqual((await from.exited).code, 0, "the drained instance exits cleanly");
  } finally {
    await lb.stop();
  }
});

test("1009 (frame too big) stops the client instead of reconnecting in a loop", async () => {
  const svc = await service(["--max-frame-bytes", "1024"]);
  const c = client(svc.wsUrl, { backoff: { initialMs: 10, maxMs: 10 } });
  const states = record(c, "state");
  const errors = record(c, "error");
  await c.connect();
  const patterns = Array.from({ length: 40 }, (_, i) => `a.rather.long.pattern.number.${i}`);
  await assert.rejects(c.subscribe(patterns, () => {}), (e) => {
    assert.equal(e.code, "closed");
    assert.equal(e.closeCode, CloseCode.TOO_BIG);
    return true;
  });
  assert.equal(c.state, "closed");
  assert.equal(errors.length, 1);
  await sleep(500); // 50 backoff periods
  assert.equal(await svc.metric("eventrouter_connections_accepted_total"), 1, "no reconnect");
  assert.equal(states.filter((s) => s.state === "connecting").length, 1);
  await assert.rejects(c.subscribe("a", () => {}), { code: "closed" });
});

test("1008 (repeated invalid frames) stops the client instead of reconnecting in a loop", async () => {
  const svc = await service();
  // A WebSocket class of our own, to reach the socket and send what the client never would.
  const sockets = [];
  class Recorded extends WebSocket {
    constructor(url) {
      super(url);
      sockets.push(this);
    }
  }
  const c = client(svc.wsUrl, { WebSocket: Recorded, backoff: { initialMs: 10, maxMs: 10 } });
  const closes = record(c, "close");
  await c.connect();
  for (let i = 0; i < 10; i++) sockets[0].send("not json");
  await waitFor(() => closes.length === 1, "the close");
  assert.equal(closes[0].code, CloseCode.POLICY);
  assert.equal(closes[0].willReconnect, false);
  await sleep(500);
  assert.equal(sockets.length, 1, "no second socket");
  assert.equal(c.state, "closed");
  assert.equal(await svc.metric("eventrouter_connections_accepted_total"), 1);
});

test("4001 (idle timeout) reconnects with backoff", async () => {
  // The server pings rarely and drops after 1 s of silence; the client's own ping is off.
  const svc = await service(["--idle-timeout", "1s", "--ping-interval", "60s"]);
  const c = client(svc.wsUrl, { pingIntervalMs: 0, backoff: { initialMs: 200, maxMs: 200 }, random: () => 0.5 });
  const closes = record(c, "close");
  const resubscribed = record(c, "resubscribed");
  await c.subscribe("idle.#", () => {});
  await waitFor(() => closes.length === 1, "the idle close", 5_000);
  assert.equal(closes[0].code, CloseCode.IDLE_TIMEOUT);
  assert.equal(closes[0].policy, "backoff");
  assert.equal(closes[0].delayMs, 100);
  await waitFor(() => resubscribed.length === 1, "the resubscription");
  c.close();
});

test("the client's own ping keeps an otherwise silent connection alive", async () => {
  const svc = await service(["--idle-timeout", "1s", "--ping-interval", "60s"]);
  const c = client(svc.wsUrl, { pingIntervalMs: 300, pongTimeoutMs: 500 });
  const closes = record(c, "close");
  await c.subscribe("quiet.#", () => {});
  await sleep(2_500);
  assert.deepEqual(closes, []);
  assert.equal(c.state, "open");
  c.close();
  assert.equal(c.state, "closed");
  assert.equal(closes.at(-1).byClient, true);
});
