// Missed-event recovery against the real event service (the binary, spawned on loopback ports,
// on its embedded bus and the history it keeps): after a network cut or a close by the server the
// client resubscribes with `since` and gets what it missed exactly once, in order, then live
// events; a position the service cannot recover from surfaces as `recovered: false` with the
// subscription live; `busy` is retried with the same `since`; a subscription continues from a
// position persisted across page loads; the duplicate guard.

import assert from "node:assert/strict";
import { after, test } from "node:test";

import { CloseCode, EventRouterClient } from "../index.js";
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
    backoff: { initialMs: 100, maxMs: 200 },
    ...options,
  });
  clients.push(c);
  return c;
}
const balancers = [];
async function balancer(backends) {
  const lb = await Balancer.start(backends);
  balancers.push(lb);
  await lb.allReady();
  return lb;
}
after(async () => {
  for (const c of clients) c.close();
  for (const lb of balancers) await lb.stop();
  await Promise.all(started.map((s) => s.stop("SIGKILL")));
});

/** Publishes `{n}` for each n in [from, to) as `name`, in one request. */
function publishRange(httpUrl, name, from, to) {
  const events = [];
  for (let n = from; n < to; n++) events.push({ event: name, data: { n } });
  return publish(httpUrl, events);
}

const range = (from, to) => Array.from({ length: to - from }, (_, i) => from + i);

/**
 * A WebSocket class that answers the first `times` subscribes carrying `since` with the error
 * the service sends when too many recoveries wait (`busy`, nothing subscribed) instead of sending
 * them; every frame the client sends is recorded.
 */
function busyFor(times) {
  const sent = [];
  let refused = 0;
  class Busy extends WebSocket {
    send(text) {
      const frame = JSON.parse(text);
      sent.push(frame);
      if (frame.op === "subscribe" && frame.since !== undefined && refused < times) {
        refused += 1;
        const reply = {
          op: "error",
          id: frame.id,
          code: "busy",
          message: "too many recoveries are waiting on this instance; nothing was subscribed, retry with the same since",
          events: frame.events,
        };
        setTimeout(() => this.onmessage?.({ data: JSON.stringify(reply) }), 0);
        return;
      }
      super.send(text);
    }
  }
  return { WebSocket: Busy, sent, refusedCount: () => refused };
}

test("after a network cut, the events published meanwhile arrive once, in order, then live ones", async () => {
  const svc = await service();
  const lb = await balancer([svc]);
  const c = client(lb.wsUrl);
  const recoveries = record(c, "recovery");
  const closes = record(c, "close");
  const got = [];
  const ids = [];
  await c.subscribe(["tick", "tock.#"], (e) => {
    got.push(e.data.n);
    ids.push(e.id);
  });
  await publishRange(svc.httpUrl, "tick", 0, 5);
  await waitFor(() => got.length === 5, "the first five events");
  assert.equal(c.lastEventId, ids[4]);

  lb.cut();
  // Each refused reconnect attempt closes again, so more may follow before the check runs.
  await waitFor(() => closes.length >= 1, "the close");
  assert.equal(closes[0].code, CloseCode.ABNORMAL);
  // Published while the client cannot reach the service: to be recovered. Interleaved with
  // events it did not subscribe to, which must not be replayed.
  for (let n = 5; n < 15; n++) {
    await publish(svc.httpUrl, [
      { event: n % 2 ? "tick" : "tock.x", data: { n } },
      { event: "other.thing", data: { n: -n } },
    ]);
  }
  await sleep(300); // refused reconnect attempts meanwhile
  assert.deepEqual(recoveries, []);
  lb.restore();

  await waitFor(() => recoveries.length === 1, "the recovery", 10_000);
  assert.deepEqual(recoveries[0], {
    recovered: true,
    since: ids[4],
    patterns: ["tick", "tock.#"],
    reconnect: true,
  });
  await waitFor(() => got.length === 15, "the missed events");
  await publishRange(svc.httpUrl, "tick", 15, 20);
  await waitFor(() => got.length === 20, "live events after the recovery");
  await sleep(200);
  assert.deepEqual(got, range(0, 20), "every event once, in publish order");
  assert.equal(c.lastEventId, ids[19]);
  assert.equal(c.duplicates, 0, "the service sent nothing twice");
  assert.equal(c.reconnects, 1);
});

test("events keep coming while the server closes the connection again and again: none lost, none twice", async () => {
  // The service drops a connection it hears nothing from for 1 s (4001); the client's own ping
  // is off, so it is closed about every second while events are published all along.
  const svc = await service(["--idle-timeout", "1s", "--ping-interval", "60s"]);
  const c = client(svc.wsUrl, { pingIntervalMs: 0 });
  const recoveries = record(c, "recovery");
  const closes = record(c, "close");
  const got = [];
  await c.subscribe("load.#", (e) => got.push(e.data.n));
  // Publish until the connection was closed three times (the last reconnect included).
  let total = 0;
  const deadline = Date.now() + 15_000;
  while (recoveries.length < 3 && Date.now() < deadline) {
    await publishRange(svc.httpUrl, total % 20 ? "load.a" : "load.b.c", total, total + 10);
    total += 10;
    await sleep(10);
  }
  await publishRange(svc.httpUrl, "load.a", total, total + 10);
  total += 10;
  await waitFor(() => got.length >= total, `${total} events`, 15_000);
  await sleep(200);
  assert.ok(closes.length >= 3, `${closes.length} closes while publishing`);
  assert.ok(closes.every((e) => e.code === CloseCode.IDLE_TIMEOUT), JSON.stringify(closes));
  assert.ok(recoveries.length >= 2, `${recoveries.length} recoveries`);
  assert.ok(recoveries.every((r) => r.recovered && r.reconnect), JSON.stringify(recoveries));
  assert.deepEqual(got, range(0, total), "every event once, in publish order, across every reconnect");
  assert.equal(c.duplicates, 0);
});

test("a restarted service has no history: `recovered: false`, the subscription is live again", async () => {
  const first = await service([], "first");
  const port = first.port;
  const c = client(first.wsUrl);
  const recoveries = record(c, "recovery");
  const got = [];
  await c.subscribe("restart.#", (e) => got.push(e.data));
  await publish(first.httpUrl, { event: "restart.before", data: "before" });
  await waitFor(() => got.length === 1, "an event before the restart");
  const position = c.lastEventId;
  assert.ok(position);
  await first.stop("SIGKILL");
  const second = await service(["--listen", `127.0.0.1:${port}`], "second");
  await waitFor(() => recoveries.length === 1, "the recovery's answer", 15_000);
  assert.deepEqual(recoveries[0], {
    recovered: false,
    since: position,
    patterns: ["restart.#"],
    reconnect: true,
  });
  // The old position names no point of the new stream: the application re-reads its state, and
  // the next position is the next event.
  assert.equal(c.lastEventId, null);
  await publish(second.httpUrl, { event: "restart.after", data: "after" });
  await waitFor(() => got.length === 2, "a live event from the new process");
  assert.deepEqual(got, ["before", "after"]);
  assert.notEqual(c.lastEventId, null);
});

test("a client that saw no event yet cannot be recovered: `recovered: false` with since null", async () => {
  const svc = await service();
  const lb = await balancer([svc]);
  const c = client(lb.wsUrl);
  const recoveries = record(c, "recovery");
  const got = [];
  await c.subscribe("quiet.#", (e) => got.push(e.data));
  lb.cut();
  await sleep(100);
  lb.restore();
  await waitFor(() => recoveries.length === 1, "the recovery's answer");
  assert.deepEqual(recoveries[0], { recovered: false, since: null, patterns: ["quiet.#"], reconnect: true });
  await publish(svc.httpUrl, { event: "quiet.now", data: 1 });
  await waitFor(() => got.length === 1, "a live event");
});

test("recover: false resubscribes without since and emits no recovery", async () => {
  const svc = await service();
  const lb = await balancer([svc]);
  const c = client(lb.wsUrl, { recover: false });
  const recoveries = record(c, "recovery");
  const resubscribed = record(c, "resubscribed");
  const got = [];
  await c.subscribe("plain", (e) => got.push(e.data.n));
  await publishRange(svc.httpUrl, "plain", 0, 2);
  await waitFor(() => got.length === 2, "two events");
  lb.cut();
  await sleep(50);
  await publishRange(svc.httpUrl, "plain", 2, 4); // missed, and not recovered
  lb.restore();
  await waitFor(() => resubscribed.length === 1, "the resubscription");
  await publishRange(svc.httpUrl, "plain", 4, 5);
  await waitFor(() => got.length === 3, "the live event");
  assert.deepEqual(got, [0, 1, 4]);
  assert.deepEqual(recoveries, []);
});

test("subscribe with since continues from a position persisted across page loads", async () => {
  const svc = await service();
  // The first page: receives three events and persists the position as it goes.
  const storage = new Map();
  const before = client(svc.wsUrl);
  before.addEventListener("event", (e) => storage.set("lastEventId", e.detail.id));
  const seen = [];
  await before.subscribe("order.#", (e) => seen.push(e.data.n));
  await publishRange(svc.httpUrl, "order.created", 0, 3);
  await waitFor(() => seen.length === 3, "three events");
  before.close();
  assert.equal(storage.get("lastEventId"), before.lastEventId);

  // While the page reloads.
  await publishRange(svc.httpUrl, "order.paid", 3, 6);
  await publish(svc.httpUrl, { event: "user.1.created", data: { n: -1 } });

  // The reloaded page.
  const c = client(svc.wsUrl);
  const log = [];
  c.addEventListener("recovery", (e) => log.push(["recovery", e.detail.recovered, e.detail.reconnect]));
  const sub = await c.subscribe("order.#", (e) => log.push(["event", e.data.n]), {
    since: storage.get("lastEventId"),
  });
  assert.equal(sub.recovered, true);
  assert.deepEqual(sub.patterns, ["order.#"]);
  await publishRange(svc.httpUrl, "order.shipped", 6, 7);
  await waitFor(() => log.length === 5, "the missed events, then a live one");
  assert.deepEqual(log, [
    ["recovery", true, false],
    ["event", 3],
    ["event", 4],
    ["event", 5],
    ["event", 6],
  ]);
  await sleep(200);
  assert.equal(log.length, 5);

  // A plain subscribe carries no `recovered`, and replays nothing.
  const plain = await c.subscribe("user.#", () => assert.fail("nothing to replay"));
  assert.equal("recovered" in plain, false);
});

test("an unknown position answers `recovered: false`; the subscription is live all the same", async () => {
  const svc = await service();
  const c = client(svc.wsUrl);
  const recoveries = record(c, "recovery");
  const got = [];
  const bogus = "0190a1b2-0000-7000-8000-000000000000";
  const sub = await c.subscribe(["stock.*"], (e) => got.push(e.data), { since: bogus });
  assert.equal(sub.recovered, false);
  assert.deepEqual(recoveries, [{ recovered: false, since: bogus, patterns: ["stock.*"], reconnect: false }]);
  assert.equal(c.lastEventId, null, "an unusable position is not taken");
  await publish(svc.httpUrl, { event: "stock.low", data: "live" });
  await waitFor(() => got.length === 1, "a live event");
  assert.deepEqual(got, ["live"]);

  // A `since` the service would refuse is refused before sending.
  assert.throws(() => c.subscribe("x", () => {}, { since: "" }), TypeError);
  assert.throws(() => c.subscribe("x", () => {}, { since: "é".repeat(128) }), TypeError);
  assert.throws(() => c.subscribe("x", () => {}, { since: 42 }), TypeError);
});

test("a reconnect's recovery refused with `busy` is retried with backoff and the same since", async () => {
  const svc = await service();
  const lb = await balancer([svc]);
  const busy = busyFor(2);
  const c = client(lb.wsUrl, { WebSocket: busy.WebSocket, random: () => 0.5 });
  const recoveries = record(c, "recovery");
  const got = [];
  await c.subscribe("job.#", (e) => got.push(e.data.n));
  await publishRange(svc.httpUrl, "job.done", 0, 3);
  await waitFor(() => got.length === 3, "three events");
  const position = c.lastEventId;
  lb.cut();
  await sleep(50);
  await publishRange(svc.httpUrl, "job.done", 3, 6);
  lb.restore();
  await waitFor(() => recoveries.length === 1, "the recovery", 10_000);
  assert.equal(busy.refusedCount(), 2);
  assert.deepEqual(recoveries[0], { recovered: true, since: position, patterns: ["job.#"], reconnect: true });
  const attempts = busy.sent.filter((f) => f.op === "subscribe" && f.since !== undefined);
  assert.equal(attempts.length, 3);
  assert.ok(attempts.every((f) => f.since === position && f.events.join() === "job.#"));
  await waitFor(() => got.length === 6, "the missed events");
  assert.deepEqual(got, range(0, 6));
});

test("after `busyRetries` refusals the client subscribes live without since: `recovered: false`", async () => {
  const svc = await service();
  const busy = busyFor(Infinity);
  const c = client(svc.wsUrl, { WebSocket: busy.WebSocket, busyRetries: 2 });
  const recoveries = record(c, "recovery");
  const got = [];
  const since = "0190a1b2-0000-7000-8000-000000000000";
  const sub = await c.subscribe("late.#", (e) => got.push(e.data), { since });
  assert.equal(sub.recovered, false);
  assert.equal(busy.refusedCount(), 3, "the first attempt and two retries");
  const subscribes = busy.sent.filter((f) => f.op === "subscribe");
  assert.deepEqual(
    subscribes.map((f) => f.since),
    [since, since, since, undefined],
  );
  assert.deepEqual(recoveries, [{ recovered: false, since, patterns: ["late.#"], reconnect: false }]);
  await publish(svc.httpUrl, { event: "late.event", data: "live" });
  await waitFor(() => got.length === 1, "a live event");
});

test("the duplicate guard: an overlapping replay reaches only the handlers that did not have it", async () => {
  const svc = await service();
  const c = client(svc.wsUrl);
  const events = record(c, "event");
  const all = [];
  await c.subscribe("shop.#", (e) => all.push(e.data.n));
  await publishRange(svc.httpUrl, "shop.order", 0, 1);
  await waitFor(() => all.length === 1, "the first event");
  const from = c.lastEventId;
  await publishRange(svc.httpUrl, "shop.order", 1, 4);
  await waitFor(() => all.length === 4, "three more");
  // A second handler asks for the orders since the first event: the service replays 1..3 (the
  // new pattern was not held); the first handler already had them.
  const orders = [];
  const sub = await c.subscribe("shop.order", (e) => orders.push(e.data.n), { since: from });
  assert.equal(sub.recovered, true);
  await waitFor(() => orders.length === 3, "the replay");
  await publishRange(svc.httpUrl, "shop.order", 4, 5);
  await waitFor(() => orders.length === 4, "a live event");
  await sleep(100);
  assert.deepEqual(orders, [1, 2, 3, 4]);
  assert.deepEqual(all, [0, 1, 2, 3, 4], "no event twice to the first handler");
  assert.deepEqual(
    events.map((e) => e.data.n),
    [0, 1, 2, 3, 4],
    "and no `event` twice",
  );
  assert.equal(c.duplicates, 3);
});
