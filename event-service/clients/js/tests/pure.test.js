// The client's pure parts: topic matching, the reaction to each close code, the backoff bounds,
// when a token is refreshed, which ids may be sent as `since`, the duplicate guard's memory.

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  CloseCode,
  RecentIds,
  backoffDelay,
  isEventId,
  reconnectPolicy,
  refreshDelay,
  topicMatches,
} from "../index.js";

test("topic patterns follow RabbitMQ's * and # rules", () => {
  const cases = [
    ["order.created", "order.created", true],
    ["order.created", "order.deleted", false],
    ["order.*", "order.created", true],
    ["order.*", "order", false],
    ["order.*", "order.eu.created", false],
    ["order.#", "order", true],
    ["order.#", "order.created", true],
    ["order.#", "order.eu.created", true],
    ["#", "anything.at.all", true],
    ["a.#.b", "a.b", true],
    ["a.#.b", "a.x.y.b", true],
    ["a.#.b", "a.x.y.c", false],
    ["*.*", "a.b", true],
    ["*.*", "a", false],
    ["#.b.#", "b", true],
    ["#.b.#", "a.b.c", true],
    ["#.b.#", "a.c", false],
    ["user.*.notification", "user.42.notification", true],
  ];
  for (const [pattern, name, expected] of cases) {
    assert.equal(topicMatches(pattern, name), expected, `${pattern} vs ${name}`);
  }
});

test("each documented close code gets its reaction", () => {
  assert.equal(reconnectPolicy(CloseCode.GOING_AWAY), "prompt");
  assert.equal(reconnectPolicy(CloseCode.REBALANCE), "prompt");
  assert.equal(reconnectPolicy(CloseCode.SLOW_CONSUMER), "backoff");
  assert.equal(reconnectPolicy(CloseCode.IDLE_TIMEOUT), "backoff");
  assert.equal(reconnectPolicy(CloseCode.INTERNAL), "backoff");
  assert.equal(reconnectPolicy(CloseCode.ABNORMAL), "backoff");
  for (const code of [1002, 1003, 1007, 1008, 1009]) assert.equal(reconnectPolicy(code), "stop", `${code}`);
  assert.equal(CloseCode.PROTOCOL_ERROR, 1002);
  assert.equal(CloseCode.INVALID_PAYLOAD, 1007);
});

test("authentication close codes: 4003 prompt, 4004 depends on the token, 4005 backoff", () => {
  assert.deepEqual(
    [CloseCode.TOKEN_EXPIRED, CloseCode.UNAUTHORIZED, CloseCode.AUTH_TIMEOUT],
    [4003, 4004, 4005],
  );
  for (const token of ["none", "static", "function"]) {
    assert.equal(reconnectPolicy(4003, { token }), "prompt", `4003 with ${token}`);
    assert.equal(reconnectPolicy(4005, { token }), "backoff", `4005 with ${token}`);
    // The policies that do not depend on the token stay the same with one.
    assert.equal(reconnectPolicy(1001, { token }), "prompt");
    assert.equal(reconnectPolicy(1002, { token }), "stop");
    assert.equal(reconnectPolicy(1006, { token }), "backoff");
  }
  // The same refused token would be refused again; a function may return a new one.
  assert.equal(reconnectPolicy(4004), "stop");
  assert.equal(reconnectPolicy(4004, { token: "none" }), "stop");
  assert.equal(reconnectPolicy(4004, { token: "static" }), "stop");
  assert.equal(reconnectPolicy(4004, { token: "function" }), "backoff");
});

test("a token is refreshed refreshBeforeMs before exp, or at half its remaining lifetime", () => {
  const now = 1_700_000_000_000;
  const exp = (inMs) => (now + inMs) / 1000;
  // A long token: 30 s before it expires.
  assert.equal(refreshDelay(exp(3_600_000), now, 30_000), 3_570_000);
  assert.equal(refreshDelay(exp(60_000), now, 30_000), 30_000);
  // A short one: at half of what is left, so there is time to retry a refused refresh.
  assert.equal(refreshDelay(exp(40_000), now, 30_000), 20_000);
  assert.equal(refreshDelay(exp(3_000), now, 1_500), 1_500);
  assert.equal(refreshDelay(exp(2_000), now, 1_500), 1_000);
  assert.equal(refreshDelay(exp(1), now, 30_000), 0);
  // Expired (or exp in the past by the local clock): at once.
  assert.equal(refreshDelay(exp(0), now, 30_000), 0);
  assert.equal(refreshDelay(exp(-5_000), now, 30_000), 0);
  assert.equal(refreshDelay(Number.NaN, now, 30_000), 0);
  // exp is in whole seconds; the delay is whole milliseconds.
  assert.ok(Number.isInteger(refreshDelay(1_700_000_100.5, now + 333, 30_000)));
});

test("backoff grows exponentially up to the cap, with full jitter", () => {
  const backoff = { initialMs: 100, maxMs: 1000 };
  const top = () => 0.999999;
  assert.deepEqual(
    [0, 1, 2, 3, 4, 10, 100].map((n) => backoffDelay(n, backoff, top)),
    [99, 199, 399, 799, 999, 999, 999],
  );
  assert.equal(backoffDelay(5, backoff, () => 0), 0, "full jitter reaches down to zero");
  for (let i = 0; i < 1000; i++) {
    const d = backoffDelay(3, backoff);
    assert.ok(d >= 0 && d < 800, `${d}`);
  }
});

test("an event id is a non-empty string of at most 255 UTF-8 bytes", () => {
  assert.equal(isEventId("0190a1b2-0000-7000-8000-000000000000"), true);
  assert.equal(isEventId("x"), true);
  assert.equal(isEventId("a".repeat(255)), true);
  assert.equal(isEventId("a".repeat(256)), false);
  // Counted in bytes, not characters: é is two bytes, € three, 😀 four (two UTF-16 units).
  assert.equal(isEventId("é".repeat(127)), true);
  assert.equal(isEventId("é".repeat(128)), false);
  assert.equal(isEventId("€".repeat(85)), true);
  assert.equal(isEventId("€".repeat(86)), false);
  assert.equal(isEventId("😀".repeat(63)), true);
  assert.equal(isEventId("😀".repeat(64)), false);
  for (const bad of ["", null, undefined, 42, {}, ["id"], true]) {
    assert.equal(isEventId(bad), false, `${JSON.stringify(bad)}`);
  }
});

test("the duplicate guard remembers the last `capacity` ids, forgetting the oldest first", () => {
  const recent = new RecentIds(3);
  for (const id of ["a", "b", "c"]) recent.add(id, id.toUpperCase());
  assert.equal(recent.size, 3);
  assert.equal(recent.get("a"), "A");
  recent.add("d", "D");
  assert.equal(recent.size, 3);
  assert.equal(recent.has("a"), false, "the oldest went");
  assert.deepEqual(["b", "c", "d"].map((id) => recent.get(id)), ["B", "C", "D"]);
  // Adding an id again makes it the newest.
  recent.add("b", "B2");
  recent.add("e", "E");
  assert.equal(recent.has("c"), false);
  assert.equal(recent.get("b"), "B2");
  assert.equal(recent.has("d") && recent.has("e"), true);
  assert.equal(new RecentIds(2).get("never"), undefined);

  const off = new RecentIds(0);
  off.add("a");
  assert.equal(off.has("a"), false, "capacity 0 remembers nothing");
  assert.equal(new RecentIds(-5).capacity, 0);
  assert.equal(new RecentIds(2.7).capacity, 2);

  // Bounded whatever goes through it.
  const big = new RecentIds(1000);
  for (let i = 0; i < 100_000; i++) big.add(`id-${i}`);
  assert.equal(big.size, 1000);
  assert.equal(big.has("id-98999"), false);
  assert.equal(big.has("id-99000"), true);
});
