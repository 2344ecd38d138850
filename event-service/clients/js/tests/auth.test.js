// The client's authentication against the real event service with tokens on: `auth` before
// anything else, token functions asked on every connect, refresh before exp, narrowed grants,
// refused tokens, and `forbidden` patterns. Tokens are HS256 JWTs signed here with the secret the
// service is started with.

import assert from "node:assert/strict";
import { createHmac, randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, test } from "node:test";

import { CloseCode, EventRouterClient, EventRouterError } from "../index.js";
import { Service, publish, record, sleep, waitFor } from "./support.js";

const dir = mkdtempSync(path.join(tmpdir(), "eventrouter-auth-"));
const secret = randomBytes(32).toString("hex"); // 64 bytes, no newline: the file is the secret
const secretFile = path.join(dir, "hmac-secret");
writeFileSync(secretFile, secret);

const b64 = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
/** An HS256 JWT with `claims`, signed with `key` (the service's secret unless told). */
function jwt(claims, key = secret) {
  const signed = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${signed}.${createHmac("sha256", key).update(signed).digest("base64url")}`;
}
const nowSeconds = () => Math.floor(Date.now() / 1000);
/** A token for subject `sub` granting `subscribe`, valid `seconds` from now. */
const token = (subscribe, { sub = "42", seconds = 60 } = {}) =>
  jwt({ sub, exp: nowSeconds() + seconds, subscribe });
const forged = (subscribe) => jwt({ sub: "42", exp: nowSeconds() + 60, subscribe }, "not the secret at all, 32 bytes+");

const started = [];
async function service(args = []) {
  const s = await Service.start(["--auth-hmac-secret-file", secretFile, "--auth-leeway", "0s", ...args]);
  started.push(s);
  return s;
}

/** A WebSocket class that keeps its sockets and the frames sent on them. */
function recordingWebSocket() {
  const sockets = [];
  class Recorded extends WebSocket {
    constructor(url) {
      super(url);
      this.sent = [];
      sockets.push(this);
    }
    send(data) {
      this.sent.push(JSON.parse(data));
      super.send(data);
    }
  }
  return { Recorded, sockets };
}

const clients = [];
function client(url, options = {}) {
  const c = new EventRouterClient(url, { backoff: { initialMs: 100, maxMs: 1000 }, ...options });
  clients.push(c);
  return c;
}
after(async () => {
  for (const c of clients) c.close();
  await Promise.all(started.map((s) => s.stop("SIGKILL")));
  rmSync(dir, { recursive: true, force: true });
});

test("the token goes first; requests wait for `authenticated`, then events arrive", async () => {
  const svc = await service();
  const { Recorded, sockets } = recordingWebSocket();
  const t = token(["order.#"]);
  const c = client(svc.wsUrl, { token: t, WebSocket: Recorded });
  const authenticated = record(c, "authenticated");
  const got = [];
  // Made before the connection exists: queued until the server accepted the token (were it
  // sent first, the server would close with 4004).
  const subscribing = c.subscribe("order.*", (e) => got.push(e.data));
  assert.equal(c.state, "connecting");
  await subscribing;
  assert.equal(c.state, "open");
  assert.deepEqual(
    sockets[0].sent.map((f) => f.op),
    ["auth", "subscribe"],
  );
  assert.equal(sockets[0].sent[0].token, t);
  const exp = JSON.parse(Buffer.from(t.split(".")[1], "base64url")).exp;
  assert.deepEqual(authenticated, [{ sub: "42", exp, expiresAt: exp * 1000 }]);
  assert.equal(c.subject, "42");
  assert.equal(c.tokenExpiresAt, exp * 1000);
  await publish(svc.httpUrl, { event: "order.created", data: { id: 1 } });
  await waitFor(() => got.length === 1, "the event");
  assert.deepEqual(got, [{ id: 1 }]);
});

test("a token function is asked again on every reconnect", async () => {
  const svc = await service();
  const { Recorded, sockets } = recordingWebSocket();
  const issued = [];
  const c = client(svc.wsUrl, {
    WebSocket: Recorded,
    token: async () => {
      await sleep(20); // as if fetched from the application's backend
      issued.push(token(["room.#"], { sub: "7" }));
      return issued.at(-1);
    },
  });
  const resubscribed = record(c, "resubscribed");
  const got = [];
  await c.subscribe("room.1", (e) => got.push(e.data));
  assert.equal(issued.length, 1);
  sockets[0].close(); // the connection drops
  await waitFor(() => resubscribed.length === 1, "the resubscription");
  assert.equal(issued.length, 2, "one call per connection");
  assert.equal(sockets[1].sent[0].op, "auth");
  assert.equal(sockets[1].sent[0].token, issued[1]);
  assert.deepEqual(resubscribed[0].patterns, ["room.1"]);
  assert.equal(c.reconnects, 1);
  await publish(svc.httpUrl, { event: "room.1", data: "back" });
  await waitFor(() => got.length === 1, "an event after the reconnect");
});

test("refreshing before exp keeps the connection past the first token's exp", async () => {
  const svc = await service();
  let calls = 0;
  const c = client(svc.wsUrl, {
    refreshBeforeMs: 1_500,
    token: () => {
      calls += 1;
      return token(["tick.#"], { seconds: 3 });
    },
  });
  const closes = record(c, "close");
  const refreshed = record(c, "refreshed");
  const errors = record(c, "error");
  const got = [];
  await c.subscribe("tick.*", (e) => got.push(e.data));
  const firstExpiry = c.tokenExpiresAt;
  await waitFor(() => Date.now() > firstExpiry + 1_000, "the first token to expire", 6_000);
  assert.deepEqual(closes, [], "no 4003: the token was refreshed in time");
  assert.deepEqual(errors, []);
  assert.equal(c.state, "open");
  assert.ok(refreshed.length >= 1, `${refreshed.length} refreshes`);
  assert.equal(calls, 1 + refreshed.length);
  assert.deepEqual(refreshed[0].removed, []);
  assert.ok(c.tokenExpiresAt > firstExpiry, "the expiry moved");
  assert.equal(c.tokenExpiresAt, refreshed.at(-1).exp * 1000);
  await publish(svc.httpUrl, { event: "tick.late", data: "still subscribed" });
  await waitFor(() => got.length === 1, "an event after the first token's exp");
});

test("a narrowing refresh drops the patterns it no longer grants and emits `revoked`", async () => {
  const svc = await service();
  let grants = ["a.#", "b.#"];
  const c = client(svc.wsUrl, { token: () => token(grants) });
  const revoked = record(c, "revoked");
  const got = [];
  await c.subscribe(["a.x", "b.x"], (e) => got.push(e.event));
  await c.subscribe("b.#", (e) => got.push(`other ${e.event}`));
  grants = ["a.#"];
  const result = await c.refreshToken();
  assert.deepEqual(result.removed.sort(), ["b.#", "b.x"]);
  assert.equal(revoked.length, 1);
  assert.deepEqual(revoked[0].patterns.sort(), ["b.#", "b.x"]);
  assert.equal(revoked[0].reason, "refresh");
  assert.deepEqual(c.patterns, ["a.x"]);
  await publish(svc.httpUrl, [
    { event: "b.x", data: 1 },
    { event: "a.x", data: 2 },
  ]);
  await waitFor(() => got.length >= 1, "a.x");
  await sleep(100);
  assert.deepEqual(got, ["a.x"]);
});

test("a refused refresh is retried; once the token expired (4003) the client reconnects at once", async () => {
  const svc = await service();
  let firstExp = null;
  let expired = false;
  let calls = 0;
  const c = client(svc.wsUrl, {
    refreshBeforeMs: 1_500,
    backoff: { initialMs: 300, maxMs: 300 }, // between refused refreshes
    promptJitterMs: 200,
    token: () => {
      calls += 1;
      if (firstExp === null) {
        firstExp = nowSeconds() + 2;
        return jwt({ sub: "42", exp: firstExp, subscribe: ["x.#"] });
      }
      // Until the first token expired, the backend hands out tokens the server refuses.
      if (!expired) return forged(["x.#"]);
      return token(["x.#"]);
    },
  });
  const errors = record(c, "error");
  const closes = record(c, "close");
  c.addEventListener("close", (e) => {
    expired ||= e.detail.code === CloseCode.TOKEN_EXPIRED;
  });
  const authenticated = record(c, "authenticated");
  const got = [];
  await c.subscribe("x.y", (e) => got.push(e.data));
  await waitFor(() => authenticated.length === 2, "the second authentication", 8_000);
  assert.ok(errors.length >= 1, "the refused refresh is reported");
  assert.ok(
    errors.every((e) => e.error instanceof EventRouterError && e.error.code === "unauthorized"),
    JSON.stringify(errors.map((e) => e.error.message)),
  );
  assert.ok(calls >= 3, `${calls} token calls: the first, refused refreshes, the reconnect`);
  assert.equal(closes.length, 1);
  assert.equal(closes[0].code, CloseCode.TOKEN_EXPIRED);
  assert.equal(closes[0].policy, "prompt");
  assert.ok(closes[0].delayMs < 200, `${closes[0].delayMs}`);
  assert.ok(authenticated[1].exp > firstExp);
  await waitFor(() => c.state === "open", "open");
  await publish(svc.httpUrl, { event: "x.y", data: "after 4003" });
  await waitFor(() => got.length === 1, "an event on the new connection");
});

test("a token function that returns the same cached token is not asked in a loop", async () => {
  const svc = await service();
  let cached = null;
  let calls = 0;
  const c = client(svc.wsUrl, {
    refreshBeforeMs: 1_500,
    backoff: { initialMs: 400, maxMs: 400 },
    random: () => 0.99,
    token: () => {
      calls += 1;
      // Cached until it has expired, as some applications do.
      if (!cached || cached.exp <= nowSeconds()) {
        const exp = nowSeconds() + 2;
        cached = { exp, token: jwt({ sub: "42", exp, subscribe: ["#"] }) };
      }
      return cached.token;
    },
  });
  const refreshed = record(c, "refreshed");
  const errors = record(c, "error");
  const closes = record(c, "close");
  await c.connect();
  const firstExpiry = c.tokenExpiresAt;
  await waitFor(() => closes.length === 1, "the 4003", 5_000);
  assert.equal(closes[0].code, CloseCode.TOKEN_EXPIRED);
  // Half the lifetime, then one refresh per backoff period (about 0.4 s) until exp: a handful,
  // not one per event-loop turn.
  assert.ok(refreshed.length >= 1 && refreshed.length <= 5, `${refreshed.length} refreshes`);
  assert.ok(refreshed.every((r) => r.expiresAt === firstExpiry));
  assert.equal(errors.length, refreshed.length);
  assert.match(errors[0].error.message, /no later than the current one/);
  await waitFor(() => c.state === "open" && c.tokenExpiresAt > firstExpiry, "a fresh token", 5_000);
  assert.ok(calls <= refreshed.length + 3, `${calls} calls`);
});

test("a static token the server refuses stops the client with 4004, no reconnect loop", async () => {
  const svc = await service();
  const c = client(svc.wsUrl, { token: forged(["#"]), backoff: { initialMs: 10, maxMs: 10 } });
  const errors = record(c, "error");
  const closes = record(c, "close");
  const pending = c.subscribe("a", () => {});
  await assert.rejects(c.connect(), (e) => {
    assert.equal(e.code, "closed");
    assert.equal(e.closeCode, CloseCode.UNAUTHORIZED);
    assert.match(e.message, /signature/, "the server's reason is in the message");
    return true;
  });
  await assert.rejects(pending, { code: "closed", closeCode: CloseCode.UNAUTHORIZED });
  assert.equal(errors[0].error.code, "unauthorized");
  assert.equal(closes.length, 1);
  assert.equal(closes[0].willReconnect, false);
  assert.equal(c.state, "closed");
  await sleep(500); // 50 backoff periods
  assert.equal(await svc.metric("eventrouter_connections_accepted_total"), 1, "no reconnect");
});

test("a token function is retried with backoff after it fails or its token is refused", async () => {
  const svc = await service();
  const answers = [
    () => {
      throw new Error("backend unreachable");
    },
    () => forged(["#"]),
    () => token(["#"]),
  ];
  const c = client(svc.wsUrl, { token: () => answers.shift()(), backoff: { initialMs: 50, maxMs: 50 } });
  const errors = record(c, "error");
  const closes = record(c, "close");
  await c.connect();
  assert.equal(answers.length, 0);
  assert.deepEqual(
    errors.map((e) => e.error.code ?? e.error.message),
    ["backend unreachable", "unauthorized"],
  );
  assert.deepEqual(
    closes.map((e) => [e.code, e.policy]),
    [
      [CloseCode.ABNORMAL, "backoff"],
      [CloseCode.UNAUTHORIZED, "backoff"],
    ],
  );
  assert.equal(c.subject, "42");
});

test("no token where one is required: 4004 stops the client", async () => {
  const svc = await service();
  const c = client(svc.wsUrl, { backoff: { initialMs: 10, maxMs: 10 } });
  const closes = record(c, "close");
  await assert.rejects(c.subscribe("a", () => {}), { code: "unauthorized" });
  await waitFor(() => c.state === "closed", "the client to stop");
  assert.deepEqual(
    closes.map((e) => [e.code, e.willReconnect]),
    [[CloseCode.UNAUTHORIZED, false]],
  );
  await sleep(300);
  assert.equal(await svc.metric("eventrouter_connections_accepted_total"), 1, "no reconnect");
});

test("`forbidden`: the subscribe rejects, the handler holds exactly the granted patterns", async () => {
  const svc = await service();
  const { Recorded, sockets } = recordingWebSocket();
  const c = client(svc.wsUrl, { WebSocket: Recorded, token: () => token(["user.42.#"]) });
  const resubscribed = record(c, "resubscribed");
  const errors = record(c, "error");
  const got = [];
  const handler = (e) => got.push(e.event);
  await assert.rejects(c.subscribe(["user.42.*", "user.43.*", "admin.#"], handler), (e) => {
    assert.ok(e instanceof EventRouterError);
    assert.equal(e.code, "forbidden");
    assert.deepEqual(e.events.sort(), ["admin.#", "user.43.*"]);
    assert.deepEqual(e.subscribed, ["user.42.*"]);
    return true;
  });
  await assert.rejects(c.subscribe("admin.#", handler), { code: "forbidden", subscribed: [] });
  assert.deepEqual(c.patterns, ["user.42.*"]);
  await publish(svc.httpUrl, { event: "user.42.mail", data: 1 });
  await waitFor(() => got.length === 1, "the granted pattern's event");
  // After a reconnect only the granted pattern is asked for again.
  sockets[0].close();
  await waitFor(() => resubscribed.length === 1, "the resubscription");
  assert.deepEqual(resubscribed[0].patterns, ["user.42.*"]);
  assert.deepEqual(
    sockets[1].sent.map((f) => [f.op, f.events]),
    [
      ["auth", undefined],
      ["subscribe", ["user.42.*"]],
    ],
  );
  assert.deepEqual(errors, [], "rejections go to the promise, not to `error`");
  assert.equal(await svc.metric("eventrouter_subscriptions"), 1);
});

test("after a reconnect with a narrower token, refused patterns are dropped and `revoked`", async () => {
  const svc = await service();
  const { Recorded, sockets } = recordingWebSocket();
  let grants = ["a.#", "b.#"];
  const c = client(svc.wsUrl, { WebSocket: Recorded, token: () => token(grants) });
  const revoked = record(c, "revoked");
  const resubscribed = record(c, "resubscribed");
  await c.subscribe(["a.1", "b.1"], () => {});
  grants = ["a.#"];
  sockets[0].close();
  await waitFor(() => revoked.length === 1, "the revocation");
  assert.deepEqual(revoked[0], { patterns: ["b.1"], reason: "forbidden" });
  await waitFor(() => resubscribed.length === 1, "the resubscription");
  assert.deepEqual(resubscribed[0].patterns, ["a.1"]);
  assert.deepEqual(c.patterns, ["a.1"]);
  // A third connection asks for the granted pattern only.
  sockets[1].close();
  await waitFor(() => resubscribed.length === 2, "the second resubscription");
  assert.deepEqual(sockets[2].sent[1].events, ["a.1"]);
  assert.equal(revoked.length, 1);
});

test("a token sent to a server without authentication: an error, then the client works", async () => {
  const svc = await Service.start();
  started.push(svc);
  const c = client(svc.wsUrl, { token: () => token(["#"]) });
  const errors = record(c, "error");
  await c.connect();
  assert.equal(c.state, "open");
  assert.equal(errors[0].error.code, "invalid_request");
  assert.equal(c.tokenExpiresAt, null);
  const got = [];
  await c.subscribe("anything", (e) => got.push(e.data));
  await publish(svc.httpUrl, { event: "anything", data: 1 });
  await waitFor(() => got.length === 1, "the event");
});
