// A minimal pub/sub server on Bun's built-in WebSocket server (uWebSockets inside), speaking the
// event service's wire protocol for the subset the benchmarks use, so `loadgen --peer bun` drives
// it with the same frames as the event service. Used by tests/loadgen/side-by-side.sh.
//
//   bun tests/loadgen/peers/bun-pubsub.js [port [host]]     (defaults: $PORT or 18080, 127.0.0.1)
//
// Protocol (the event service's, see its README):
//   GET  /ws       WebSocket upgrade. Client text frames (JSON):
//                    {"op":"subscribe","id":1,"events":["a.b"]} -> {"op":"subscribed","id":1,"events":["a.b"]}
//                    {"op":"unsubscribe","id":2,"events":["a.b"]} -> {"op":"unsubscribed","id":2,"events":["a.b"]}
//                    {"op":"ping","id":3}                        -> {"op":"pong","id":3}
//                  anything else -> {"op":"error","id":..,"code":"..","message":".."}.
//                  Exact event names only: a pattern with `*` or `#` is refused (invalid_pattern);
//                  the benchmarks subscribe to exact names. A binary frame closes with 1003.
//                  Events arrive as one text frame each:
//                    {"op":"event","event":"a.b","id":"<UUIDv7>","time":"<RFC 3339, ms>","data":<data>}
//   POST /publish  one {"event","data"} object or a JSON array of them -> 202 {"accepted":n};
//                  a bad body -> 400 {"error":".."}; over 1 MiB -> 413.
//   GET  /healthz  200 "ok\n".
//
// Settings, chosen to match the event service's defaults where Bun has an equivalent:
//   idleTimeout 36 s, sendPings true: uWebSockets sends a WebSocket ping once a client has sent
//     nothing for idleTimeout minus a margin (16 s here), i.e. after 20 s of client silence, and
//     closes the connection when nothing at all arrived for 36 s. The event service pings every
//     20 s and closes after 60 s of silence; uWebSockets cannot ping sooner than its margin
//     before the close, so 36 s is the closest setting with a ping at 20 s.
//   maxPayloadLength 64 KiB: largest client message (the service's --max-frame-bytes).
//   backpressureLimit 1 MiB + closeOnBackpressureLimit: a client whose unsent data exceeds 1 MiB
//     is closed (the service's --send-queue-bytes with the `disconnect` policy).
//   perMessageDeflate off (the service does not compress), publishToSelf off.
//   maxRequestBodySize 1 MiB: largest publish body (the service's --max-publish-bytes).
//   100 subscriptions per connection at most (the service's --max-subscriptions).
//   Event names as the service checks them: 1..255 bytes, `.`-separated non-empty words, no
//   whitespace or control characters, no wildcards.

const port = Number(process.argv[2] ?? process.env.PORT ?? 18080);
const hostname = process.argv[3] ?? "127.0.0.1";
const MAX_SUBSCRIPTIONS = 100;
const MAX_NAME_BYTES = 255;
const MAX_PUBLISH_BYTES = 1024 * 1024;
const utf8 = new TextEncoder();

// Returns why `name` is not a valid event name, or null.
function badName(name, allowWildcards) {
  if (typeof name !== "string" || name.length === 0) return "event name is empty";
  if (utf8.encode(name).length > MAX_NAME_BYTES) return `event name is longer than ${MAX_NAME_BYTES} bytes`;
  if (name.split(".").some((w) => w.length === 0)) return "event name has an empty word";
  if (!allowWildcards && /[*#]/.test(name)) return "event name may not contain '*' or '#'";
  if (/[\s\p{Cc}]/u.test(name)) return "event name may not contain whitespace or control characters";
  return null;
}

function json(status, body) {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json" },
  });
}

// A reply op with the request id (when there was one) right after `op`, as the service orders it.
function reply(op, id, fields) {
  return JSON.stringify(id === undefined ? { op, ...fields } : { op, id, ...fields });
}

function validId(id) {
  return (
    id === undefined ||
    id === null ||
    (Number.isSafeInteger(id) && id >= 0) ||
    (typeof id === "string" && utf8.encode(id).length <= 64)
  );
}

function onClientMessage(ws, message) {
  if (typeof message !== "string") {
    ws.close(1003, "the protocol is JSON text");
    return;
  }
  let req;
  try {
    req = JSON.parse(message);
  } catch (e) {
    ws.send(reply("error", undefined, { code: "invalid_json", message: `not valid JSON: ${e.message}` }));
    return;
  }
  if (req === null || typeof req !== "object" || Array.isArray(req)) {
    ws.send(reply("error", undefined, { code: "invalid_request", message: 'a request must be a JSON object with an "op"' }));
    return;
  }
  if (!validId(req.id)) {
    ws.send(reply("error", undefined, { code: "invalid_request", message: '"id" must be a non-negative integer or a short string' }));
    return;
  }
  const id = req.id ?? undefined;
  const fail = (code, msg, events) =>
    ws.send(reply("error", id, events ? { code, message: msg, events } : { code, message: msg }));
  switch (req.op) {
    case "subscribe":
    case "unsubscribe": {
      const events = req.events;
      if (!Array.isArray(events) || events.length === 0 || !events.every((e) => typeof e === "string")) {
        fail("invalid_request", '"events" must be a non-empty list of pattern strings');
        return;
      }
      if (req.op === "unsubscribe") {
        for (const name of events) {
          if (ws.data.subs.delete(name)) ws.unsubscribe(name);
        }
        ws.send(reply("unsubscribed", id, { events }));
        return;
      }
      for (const name of events) {
        const why = badName(name, true);
        if (why) return fail("invalid_pattern", why, [name]);
        if (/[*#]/.test(name)) {
          return fail("invalid_pattern", "this peer subscribes to exact event names only", [name]);
        }
      }
      const fresh = events.filter((e) => !ws.data.subs.has(e));
      if (ws.data.subs.size + new Set(fresh).size > MAX_SUBSCRIPTIONS) {
        fail("too_many_subscriptions", `at most ${MAX_SUBSCRIPTIONS} per connection`, events);
        return;
      }
      for (const name of fresh) {
        ws.data.subs.add(name);
        ws.subscribe(name);
      }
      ws.send(reply("subscribed", id, { events }));
      return;
    }
    case "ping":
      ws.send(reply("pong", id, {}));
      return;
    case undefined:
      fail("unknown_op", 'missing "op"');
      return;
    default:
      fail("unknown_op", `unknown op ${JSON.stringify(String(req.op).slice(0, 32))}; expected subscribe, unsubscribe or ping`);
  }
}

// Parses a publish body into [name, data] pairs, or throws an Error whose message is the answer.
function parsePublish(text) {
  const body = JSON.parse(text);
  const items = Array.isArray(body) ? body : [body];
  if (items.length === 0) throw new Error("the array holds no events");
  return items.map((item, index) => {
    const where = Array.isArray(body) ? `event #${index}: ` : "";
    if (item === null || typeof item !== "object" || Array.isArray(item)) {
      throw new Error(`${where}not a {"event","data"} object`);
    }
    if (typeof item.event !== "string") throw new Error(`${where}missing "event" (the event name)`);
    const why = badName(item.event, false);
    if (why) throw new Error(`${where}bad event name ${JSON.stringify(item.event)}: ${why}`);
    if (item.data === undefined || item.data === null) {
      throw new Error(`${where}missing "data" (any JSON value but null)`);
    }
    return [item.event, item.data];
  });
}

async function publish(req, server) {
  const text = await req.text();
  if (utf8.encode(text).length > MAX_PUBLISH_BYTES) {
    return json(413, { error: `the body is larger than the limit of ${MAX_PUBLISH_BYTES} bytes` });
  }
  let events;
  try {
    events = parsePublish(text);
  } catch (e) {
    return json(400, { error: e instanceof SyntaxError ? `invalid JSON: ${e.message}` : e.message });
  }
  for (const [name, data] of events) {
    const frame =
      `{"op":"event","event":${JSON.stringify(name)},"id":"${Bun.randomUUIDv7()}",` +
      `"time":"${new Date().toISOString()}","data":${JSON.stringify(data)}}`;
    server.publish(name, frame);
  }
  return json(202, { accepted: events.length });
}

const server = Bun.serve({
  hostname,
  port,
  maxRequestBodySize: MAX_PUBLISH_BYTES,
  fetch(req, server) {
    const path = new URL(req.url).pathname;
    if (path === "/ws" && req.method === "GET") {
      if (server.upgrade(req, { data: { subs: new Set() } })) return undefined;
      return new Response("expected a WebSocket upgrade\n", { status: 400 });
    }
    if (path === "/publish" && req.method === "POST") return publish(req, server);
    if (path === "/healthz" && req.method === "GET") return new Response("ok\n");
    if (path === "/ws" || path === "/publish" || path === "/healthz") {
      return new Response("method not allowed\n", { status: 405 });
    }
    return new Response("not found\n", { status: 404 });
  },
  websocket: {
    idleTimeout: 36,
    sendPings: true,
    maxPayloadLength: 64 * 1024,
    backpressureLimit: 1024 * 1024,
    closeOnBackpressureLimit: true,
    perMessageDeflate: false,
    publishToSelf: false,
    open() {},
    message: onClientMessage,
    close(ws) {
      ws.data.subs.clear();
    },
  },
});

console.error(`bun-pubsub: listening on ${server.hostname}:${server.port} (Bun ${Bun.version})`);
for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => {
    server.stop(true);
    process.exit(0);
  });
}
