// The client's pure parts: topic matching, the reaction to each close code, the backoff bounds.

import assert from "node:assert/strict";
import { test } from "node:test";

import { CloseCode, backoffDelay, reconnectPolicy, topicMatches } from "../index.js";

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
  for (const code of [1003, 1007, 1008, 1009]) assert.equal(reconnectPolicy(code), "stop", `${code}`);
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
