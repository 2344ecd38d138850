// The event router's JavaScript client: one WebSocket to an event service, subscriptions with
// promise replies, token authentication and refresh, reconnection that follows the service's
// close codes, and recovery of the events missed while disconnected. Dependency-free; runs in
// browsers and in Node (22+, or 20 with --experimental-websocket, or any WebSocket class passed
// as `options.WebSocket`). The wire protocol and close codes are documented in the event
// service's README; the numbers below are that table.

/** Close codes the event service sends, and what the client does about each. */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001, // the instance drains: reconnect promptly, the load balancer sends us elsewhere
  PROTOCOL_ERROR: 1002, // we broke RFC 6455: a client (or WebSocket library) bug
  UNSUPPORTED_DATA: 1003, // we sent a binary frame: a client bug, retrying repeats it
  ABNORMAL: 1006, // no close frame (network failure, refused upgrade): back off
  INVALID_PAYLOAD: 1007, // we sent text that is not valid UTF-8: a client bug
  POLICY: 1008, // 10 invalid frames (or 10 over the frame rate) in a row: a client bug
  TOO_BIG: 1009, // a frame over --max-frame-bytes: a client bug
  INTERNAL: 1011,
  SLOW_CONSUMER: 4000, // we read too slowly: back off, then catch up
  IDLE_TIMEOUT: 4001, // nothing reached the server for --idle-timeout: back off
  REBALANCE: 4002, // the server spreads load over new instances: reconnect promptly
  TOKEN_EXPIRED: 4003, // the token reached its exp without a refresh: reconnect promptly, new token
  UNAUTHORIZED: 4004, // the token was refused, or none was sent while one is required
  AUTH_TIMEOUT: 4005, // no auth message within the server's handshake timeout: back off
});

/** Codes after which reconnecting would only repeat the same failure. */
const FATAL_CODES = new Set([
  CloseCode.PROTOCOL_ERROR,
  CloseCode.UNSUPPORTED_DATA,
  CloseCode.INVALID_PAYLOAD,
  CloseCode.POLICY,
  CloseCode.TOO_BIG,
]);

/** Codes that ask the client to come back now: no backoff, a small jitter only. */
const PROMPT_CODES = new Set([CloseCode.GOING_AWAY, CloseCode.REBALANCE, CloseCode.TOKEN_EXPIRED]);

/**
 * How the client reacts to a close code: `prompt` (reconnect after a small jitter), `backoff`
 * (exponential backoff with full jitter) or `stop` (do not reconnect; report the close).
 *
 * `token` says what the client authenticates with: `none`, a `static` string or a `function`
 * that is asked again on every connect. A refused token (4004) is only worth retrying when the
 * next attempt may bring a different one.
 * @param {number} code
 * @param {{token?: "none" | "static" | "function"}} [context]
 * @returns {"prompt" | "backoff" | "stop"}
 */
export function reconnectPolicy(code, { token = "none" } = {}) {
  if (FATAL_CODES.has(code)) return "stop";
  if (code === CloseCode.UNAUTHORIZED) return token === "function" ? "backoff" : "stop";
  if (PROMPT_CODES.has(code)) return "prompt";
  return "backoff";
}

/** The longest delay setTimeout takes (about 24.8 days); longer ones fire at once. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/**
 * How long to wait before refreshing a token that expires at `exp` (Unix seconds): `refreshBeforeMs`
 * before it, but never later than half the remaining lifetime, so a short token is still
 * refreshed in time (and refused refreshes can be retried before it runs out). 0 when the token
 * has already expired.
 * @param {number} exp the token's `exp`, Unix seconds
 * @param {number} nowMs the current time, ms since the epoch
 * @param {number} refreshBeforeMs
 */
export function refreshDelay(exp, nowMs, refreshBeforeMs) {
  const remaining = exp * 1000 - nowMs;
  if (!(remaining > 0)) return 0;
  return Math.floor(Math.max(remaining - refreshBeforeMs, remaining / 2));
}

/**
 * Exponential backoff with full jitter: a uniformly random delay in [0, min(max, initial * 2^n)).
 * @param {number} attempt how many reconnects failed in a row before this one (0 for the first)
 * @param {{initialMs: number, maxMs: number}} backoff
 * @param {() => number} random a source of numbers in [0, 1)
 */
export function backoffDelay(attempt, backoff, random = Math.random) {
  const cap = Math.min(backoff.maxMs, backoff.initialMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}

/**
 * Whether an event name matches a subscription pattern (RabbitMQ topic syntax: `.`-separated
 * words, `*` is exactly one word, `#` is zero or more). The server sends an event once per
 * connection however many patterns match; the client uses this to route it to each handler.
 * @param {string} pattern
 * @param {string} name
 */
export function topicMatches(pattern, name) {
  const p = pattern.split(".");
  const n = name.split(".");
  // Positions reachable in `n` after consuming p[0..i]; a set keeps `#` linear per word.
  let states = new Set([0]);
  for (const word of p) {
    const next = new Set();
    for (const at of states) {
      if (word === "#") {
        for (let k = at; k <= n.length; k++) next.add(k);
      } else if (at < n.length && (word === "*" || word === n[at])) {
        next.add(at + 1);
      }
    }
    if (next.size === 0) return false;
    states = next;
  }
  return states.has(n.length);
}

/** The longest event id the service takes as `since`, in UTF-8 bytes. */
const MAX_EVENT_ID_BYTES = 255;

const utf8 = new TextEncoder();

/**
 * Whether `value` can be sent as `since`: a non-empty string of at most 255 UTF-8 bytes (the
 * service answers anything else with `invalid_request`). Event ids are UUIDv7 strings.
 * @param {unknown} value
 */
export function isEventId(value) {
  if (typeof value !== "string" || value === "") return false;
  // Up to 85 UTF-16 code units are at most 255 bytes in UTF-8: no need to encode the usual id.
  return value.length <= 85 || utf8.encode(value).length <= MAX_EVENT_ID_BYTES;
}

/**
 * A bounded memory of the most recent event ids, each with a value (the client keeps the set of
 * handlers an event was given to). Adding past the capacity forgets the oldest id. A capacity of
 * 0 remembers nothing.
 */
export class RecentIds {
  /** @param {number} capacity */
  constructor(capacity) {
    this.capacity = Math.max(0, Math.floor(Number(capacity) || 0));
    this._ids = new Map();
  }

  get size() {
    return this._ids.size;
  }

  has(id) {
    return this._ids.has(id);
  }

  /** The value stored with `id`, or undefined when it is not (or no longer) remembered. */
  get(id) {
    return this._ids.get(id);
  }

  /** Remembers `id` as the newest; forgets the oldest ones beyond the capacity. */
  add(id, value = true) {
    if (this.capacity === 0) return;
    this._ids.delete(id);
    this._ids.set(id, value);
    // A Map iterates in insertion order: the first key is the oldest.
    while (this._ids.size > this.capacity) this._ids.delete(this._ids.keys().next().value);
  }
}

/** An error the server sent in reply to a request, or the connection ending under a request. */
export class EventRouterError extends Error {
  /**
   * @param {string} code the server's error code (`invalid_pattern`, ...) or `closed`
   * @param {string} message
   * @param {{events?: string[], subscribed?: string[], closeCode?: number}} [details]
   */
  constructor(code, message, details = {}) {
    super(`${code}: ${message}`);
    this.name = "EventRouterError";
    this.code = code;
    this.serverMessage = message;
    this.events = details.events ?? [];
    this.subscribed = details.subscribed ?? [];
    this.closeCode = details.closeCode;
  }
}

const DEFAULTS = Object.freeze({
  backoff: { initialMs: 500, maxMs: 30_000 },
  promptJitterMs: 1000,
  connectTimeoutMs: 10_000,
  stableAfterMs: 10_000,
  pingIntervalMs: 20_000,
  pongTimeoutMs: 10_000,
  refreshBeforeMs: 30_000,
  autoConnect: true,
  recover: true,
  busyRetries: 5,
  dedupeWindow: 1000,
});

function toPatterns(patterns) {
  const list = typeof patterns === "string" ? [patterns] : Array.from(patterns ?? []);
  if (list.length === 0 || list.some((p) => typeof p !== "string")) {
    throw new TypeError("patterns must be a non-empty string or array of strings");
  }
  return [...new Set(list)];
}

/**
 * An `error` frame that refuses part of a subscribe (its `events`), the rest being answered apart.
 * `busy` with patterns refuses a recovery (a subscribe with `since`): nothing was subscribed.
 */
function isPartialError(frame) {
  return (
    frame.op === "error" &&
    (frame.code === "forbidden" || frame.code === "unavailable" || frame.code === "busy") &&
    Array.isArray(frame.events) &&
    frame.events.length > 0
  );
}

/** The patterns listed by the error frames (of one code, or all). */
function patternsOf(frames, code = null) {
  return frames.filter((f) => code === null || f.code === code).flatMap((f) => f.events ?? []);
}

function errorFromFrame(frame, subscribed = []) {
  return new EventRouterError(frame.code, frame.message, { events: frame.events, subscribed });
}

function makeEvent(type, detail) {
  // CustomEvent is global in browsers and Node 19+; a plain Event with `detail` elsewhere.
  if (typeof CustomEvent === "function") return new CustomEvent(type, { detail });
  const e = new Event(type);
  Object.defineProperty(e, "detail", { value: detail });
  return e;
}

/**
 * A connection to an event service.
 *
 * States: `idle` (not started), `connecting` (until the socket is open and, with a token,
 * authenticated), `open`, `reconnecting` (waiting out a delay), `closed` (by `close()` or after a
 * close code that must not be retried). Events (listen with `addEventListener`; data in
 * `event.detail`): `state`, `authenticated`, `open`, `close`, `event`, `resubscribed`,
 * `recovery`, `refreshed`, `revoked`, `error`.
 */
export class EventRouterClient extends EventTarget {
  /**
   * @param {string} url the service's WebSocket URL, e.g. `ws://127.0.0.1:8080/ws`
   * @param {import("./index.d.ts").ClientOptions} [options]
   */
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.options = {
      ...DEFAULTS,
      ...options,
      backoff: { ...DEFAULTS.backoff, ...(options.backoff ?? {}) },
    };
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError(
        "no WebSocket class: use Node 22+, `node --experimental-websocket` on Node 20, or pass options.WebSocket",
      );
    }
    this._random = options.random ?? Math.random;
    const token = options.token;
    if (token != null && !(typeof token === "function" || (typeof token === "string" && token))) {
      throw new TypeError("token must be a non-empty string or a function returning one");
    }
    /** `none`, `static` (a string) or `function` (asked on every connect and refresh). */
    this._tokenKind = token == null ? "none" : typeof token === "function" ? "function" : "static";
    /** The token being fetched for the connection being opened: a promise of {token} or {error}. */
    this._pendingToken = null;
    /** `{sub, exp}` of the current connection once authenticated. */
    this._session = null;
    this._refreshTimer = null;
    /** Refreshes that failed (or did not extend the token) in a row: the backoff's exponent. */
    this._refreshAttempt = 0;
    /** The server's refusal of the last `auth`, to explain the 4004 that follows it. */
    this._authError = null;
    this._state = "idle";
    this._ws = null;
    this._nextId = 1;
    /** @type {Map<number, object>} requests sent (or waiting to be sent), by id */
    this._requests = new Map();
    /** @type {Map<string, Set<Function>>} acknowledged patterns and their handlers */
    this._handlers = new Map();
    this._attempt = 0;
    this._reconnects = 0;
    this._timer = null;
    this._connectTimer = null;
    this._stableTimer = null;
    this._rebindTimer = null;
    this._heartbeat = null;
    this._lastReceived = 0;
    this._pingSentAt = 0;
    this._lastClose = null;
    this._opened = [];
    /**
     * The position: the id of the last event delivered to the application, sent as `since` when
     * resubscribing after a reconnect. One per client: a connection's events are one ordered
     * stream, and an id is a position in the service's history, valid for every pattern.
     */
    this._lastEventId = null;
    /** Ids of the last events delivered, each with the handlers it was given to (the duplicate guard). */
    this._recent = new RecentIds(this.options.dedupeWindow);
    this._duplicates = 0;
  }

  /**
   * The id of the last event delivered to the application (null before the first one, or after
   * a recovery the service could not do). After a reconnect the client resubscribes with it as
   * `since`; persist it to continue across page loads (`subscribe(..., {since})`).
   */
  get lastEventId() {
    return this._lastEventId;
  }

  /** Event frames that repeated an id delivered recently (not given again to the same listener). */
  get duplicates() {
    return this._duplicates;
  }

  /** `idle`, `connecting`, `open`, `reconnecting` or `closed`. */
  get state() {
    return this._state;
  }

  /** Patterns the server acknowledged and the client resubscribes after a reconnect. */
  get patterns() {
    return [...this._handlers].filter(([, handlers]) => handlers.size > 0).map(([p]) => p);
  }

  /** Successful reconnects so far. */
  get reconnects() {
    return this._reconnects;
  }

  /** The token's subject (`sub`) as the server accepted it; null when not authenticated. */
  get subject() {
    return this._session?.sub ?? null;
  }

  /**
   * When the current connection's token expires (its `exp`, in ms since the epoch, like
   * `Date.now()`); null when not authenticated. Refreshing moves it.
   */
  get tokenExpiresAt() {
    return typeof this._session?.exp === "number" ? this._session.exp * 1000 : null;
  }

  /** The last close seen: `{code, reason, wasClean}` or null. */
  get lastClose() {
    return this._lastClose;
  }

  /**
   * Opens the connection (and keeps it open). Resolves once it is open; rejects if the client
   * is closed before that, by `close()` or by a close code that is not retried.
   * @returns {Promise<void>}
   */
  connect() {
    if (this._state === "open") return Promise.resolve();
    const opened = new Promise((resolve, reject) => this._opened.push({ resolve, reject }));
    if (this._state === "idle" || this._state === "closed") {
      this._attempt = 0;
      this._open();
    }
    return opened;
  }

  /**
   * Closes the connection for good: no reconnect; requests still waiting are rejected with
   * code `closed`.
   */
  close(code = CloseCode.NORMAL, reason = "client closed") {
    this._clearTimers();
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      this._detach(ws);
      try {
        ws.close(code, reason);
      } catch {
        // Already closing.
      }
    }
    const wasClosed = this._state === "closed";
    this._session = null;
    this._authError = null;
    this._setState("closed");
    const error = new EventRouterError("closed", "the client was closed");
    this._failAll(error);
    for (const waiter of this._opened.splice(0)) waiter.reject(error);
    if (!wasClosed && ws) {
      this._emit("close", { code, reason, wasClean: true, willReconnect: false, byClient: true });
    }
  }

  /**
   * Subscribes `handler` to `patterns`. Resolves when the server acknowledged every pattern
   * (`subscribed`); rejects with an `EventRouterError` carrying the server's code and message.
   * Connects first when the client is idle. Requests made while disconnected are sent once the
   * connection is back.
   *
   * With `options.since` (an event id, e.g. `lastEventId` persisted before a page reload), the
   * server also replays the events matching these patterns published after that event, before
   * live ones; the subscription's `recovered` says whether it could (a `recovery` event too).
   * @param {string | string[]} patterns
   * @param {(event: import("./index.d.ts").RouterEvent) => void} handler
   * @param {{since?: string | null}} [options]
   * @returns {Promise<import("./index.d.ts").Subscription>}
   */
  subscribe(patterns, handler, { since = null } = {}) {
    const list = toPatterns(patterns);
    if (typeof handler !== "function") throw new TypeError("handler must be a function");
    if (since != null && !isEventId(since)) {
      throw new TypeError("since must be an event id: a non-empty string of at most 255 bytes");
    }
    // The handler holds each pattern as soon as the server acknowledges it, before the frames
    // that follow the acknowledgement (replayed events come right after it, possibly in the same
    // read) are dispatched. A partial `forbidden` or `unavailable` thus leaves the handler with
    // the patterns that were subscribed (they are resubscribed and can be unsubscribed), and
    // only them; the error lists both.
    const onAck = (acked) => {
      for (const p of acked) {
        if (!this._handlers.has(p)) this._handlers.set(p, new Set());
        this._handlers.get(p).add(handler);
      }
    };
    const extra = since == null ? { onAck } : { onAck, recovery: true, position: since, since };
    return this._request("subscribe", list, extra).then((frame) => {
      const sub = { patterns: list, unsubscribe: () => this.unsubscribe(list, handler) };
      if (since != null) sub.recovered = frame.recovered === true;
      return sub;
    });
  }

  /**
   * Removes `handler` from `patterns` (every handler when none is given). Patterns left without
   * a handler are unsubscribed at the server; resolves with those once it answered
   * `unsubscribed`.
   * @returns {Promise<string[]>}
   */
  async unsubscribe(patterns, handler) {
    const list = toPatterns(patterns);
    const release = [];
    for (const p of list) {
      const set = this._handlers.get(p);
      if (set && handler) set.delete(handler);
      if (!set || !handler || set.size === 0) release.push(p);
    }
    if (release.length === 0) return [];
    // Handlers go at once, so nothing reaches them after this call; the patterns are forgotten
    // (and no longer resubscribed) when the server confirms.
    for (const p of release) {
      const set = this._handlers.get(p);
      if (set && set.size > 0 && !handler) set.clear();
    }
    await this._request("unsubscribe", release);
    for (const p of release) {
      const set = this._handlers.get(p);
      if (set && set.size === 0) this._handlers.delete(p);
    }
    return release;
  }

  /**
   * Sends an application-level ping; resolves with the round trip in milliseconds.
   * @returns {Promise<number>}
   */
  async ping() {
    const started = Date.now();
    await this._request("ping", null);
    return Date.now() - started;
  }

  /**
   * Asks the token function for a new token now and sends it as a `refresh` (the client also does
   * this on its own before the token expires). Resolves with `{exp, expiresAt, removed}` once the
   * server accepted it; rejects with an `EventRouterError` (`unauthorized`: the connection keeps
   * its current token) or the token function's error. Needs `options.token` to be a function
   * and an authenticated connection.
   * @returns {Promise<import("./index.d.ts").RefreshedDetail>}
   */
  refreshToken() {
    return this._refresh(false);
  }

  async _refresh(scheduled) {
    if (this._tokenKind !== "function") {
      throw new TypeError("refreshToken() needs options.token to be a function");
    }
    const ws = this._ws;
    if (this._state !== "open" || !this._session) {
      throw new EventRouterError("closed", "not connected: the token is sent when the connection opens");
    }
    const token = await this._getToken();
    if (this._ws !== ws || this._state !== "open") {
      throw new EventRouterError("closed", "the connection closed while the token was fetched");
    }
    const req = this._newRequest("refresh", null, true);
    req.token = token;
    this._send(req);
    return this._onRefreshed(await req.promise, scheduled);
  }

  // --- connection -------------------------------------------------------------------------

  _open() {
    this._clearTimers();
    this._setState("connecting");
    // The token is fetched while the socket opens: the server's handshake timeout runs from the
    // upgrade, and the token function may have to ask the application's backend.
    this._pendingToken =
      this._tokenKind === "none"
        ? null
        : this._getToken().then(
            (token) => ({ token }),
            (error) => ({ error }),
          );
    let ws;
    try {
      ws = new this._WebSocket(this.url);
    } catch (error) {
      this._emit("error", { error });
      this._onClosed({ code: CloseCode.ABNORMAL, reason: String(error), wasClean: false });
      return;
    }
    this._ws = ws;
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (m) => this._onMessage(m);
    ws.onclose = (e) => {
      if (this._ws !== ws) return;
      this._ws = null;
      this._onClosed({ code: e.code, reason: e.reason, wasClean: e.wasClean });
    };
    // Once open, an error is always followed by a close event, which decides what happens next.
    // Before that, some runtimes (Node 20's WebSocket) report a failed connection with an error
    // and never a close: give up on this socket here, as a 1006.
    ws.onerror = () => {
      if (this._state === "connecting") this._abandon(ws, "connection failed");
    };
    // A handshake that hangs (a black-holed SYN, a proxy that never answers, a token function or
    // an `auth` that never answers) counts as failed.
    this._connectTimer = setTimeout(() => {
      if (this._ws === ws && this._state === "connecting") this._abandon(ws, "connect timeout");
    }, this.options.connectTimeoutMs);
  }

  /** Drops a socket that failed or went silent, and reconnects as after an abnormal close. */
  _abandon(ws, reason) {
    if (this._ws !== ws) return;
    this._ws = null;
    this._detach(ws);
    try {
      ws.close(CloseCode.NORMAL, reason);
    } catch {
      // Never opened, or already closing.
    }
    this._onClosed({ code: CloseCode.ABNORMAL, reason, wasClean: false });
  }

  _detach(ws) {
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
  }

  _onOpen(ws) {
    if (this._ws !== ws) return;
    if (this._tokenKind === "none") this._ready(ws);
    else this._authenticate(ws);
  }

  /** The token, from the string or the function; rejects unless it is a non-empty string. */
  async _getToken() {
    const source = this.options.token;
    const token = typeof source === "function" ? await source() : source;
    if (typeof token !== "string" || token === "") {
      throw new TypeError(`the token function returned ${token === "" ? "an empty string" : typeof token}, not a token`);
    }
    return token;
  }

  /**
   * Sends `auth` as the connection's first message and nothing else until `authenticated`: the
   * server closes a connection whose first request is anything else (4004). The state stays
   * `connecting` meanwhile, so requests wait in the queue.
   */
  async _authenticate(ws) {
    const { token, error } = await this._pendingToken;
    if (this._ws !== ws) return;
    if (error) {
      // The application could not produce a token (its backend is down, the user logged out):
      // a failed attempt like a refused connection, retried with backoff.
      this._emit("error", { error });
      this._abandon(ws, `no token: ${error.message}`);
      return;
    }
    const req = this._newRequest("auth", null, true);
    req.token = token;
    this._send(req);
    let frame;
    try {
      frame = await req.promise;
    } catch (refused) {
      if (this._ws !== ws || refused.code === "closed") return;
      this._emit("error", { error: refused });
      if (refused.code === "invalid_request" || refused.code === "unknown_op") {
        // The server does not use authentication (it is off there, or the server predates it):
        // it takes requests without a token, so go on unauthenticated (the error says so).
        this._ready(ws);
        return;
      }
      // `unauthorized`: the server closes with 4004 next, and the close decides what follows.
      this._authError = refused;
      return;
    }
    if (this._ws !== ws) return;
    this._session = { sub: frame.sub ?? null, exp: frame.exp };
    this._authError = null;
    this._emit("authenticated", {
      sub: this._session.sub,
      exp: frame.exp,
      expiresAt: this.tokenExpiresAt,
    });
    this._ready(ws);
  }

  /** The connection is usable: resubscribe, send what waited, start the timers. */
  _ready(ws) {
    if (this._ws !== ws) return;
    clearTimeout(this._connectTimer);
    const isReconnect = this._lastClose !== null;
    if (isReconnect) this._reconnects += 1;
    this._setState("open");
    this._lastReceived = Date.now();
    this._startHeartbeat();
    // Only a connection that stays up resets the backoff: a server that accepts and then closes
    // at once (4000, 4001) must not be hammered.
    this._stableTimer = setTimeout(() => {
      this._attempt = 0;
    }, this.options.stableAfterMs);
    this._resubscribe();
    // Requests made while disconnected (or in flight when the connection dropped) go now; the
    // server answers them in order after the resubscription.
    for (const req of this._requests.values()) {
      if (!req.internal) this._send(req);
    }
    this._refreshAttempt = 0;
    this._scheduleRefresh();
    this._emit("open", { url: this.url, reconnect: isReconnect, reconnects: this._reconnects });
    for (const waiter of this._opened.splice(0)) waiter.resolve();
  }

  /**
   * Plans the next refresh: `refreshDelay` before the token's exp, or a backoff delay after
   * refreshes that failed in a row. Only a token function can give a newer token.
   */
  _scheduleRefresh() {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (this._tokenKind !== "function" || typeof this._session?.exp !== "number") return;
    const attempt = this._refreshAttempt;
    const delay =
      attempt === 0
        ? refreshDelay(this._session.exp, Date.now(), this.options.refreshBeforeMs)
        : backoffDelay(attempt - 1, this.options.backoff, this._random);
    const wait = Math.min(delay, MAX_TIMER_MS);
    this._refreshTimer = setTimeout(() => {
      this._refreshTimer = null;
      if (wait < delay) this._scheduleRefresh();
      else this._autoRefresh();
    }, wait);
  }

  _autoRefresh() {
    this._refresh(true).catch((error) => {
      if (error.code === "closed" || this._state !== "open") return;
      // Refused (`unauthorized`, `rate_limited`) or no token from the function: the current token
      // stays valid until its exp, so try again with backoff. Should the token run out first, the
      // server closes with 4003 and the client reconnects with a fresh one.
      this._emit("error", { error });
      this._refreshAttempt += 1;
      this._scheduleRefresh();
    });
  }

  _onRefreshed(frame, scheduled = false) {
    const previous = this._session?.exp;
    if (typeof frame.exp === "number" && this._session) this._session.exp = frame.exp;
    const removed = Array.isArray(frame.removed) ? frame.removed : [];
    this._revoke(removed, "refresh");
    const detail = { exp: frame.exp, expiresAt: this.tokenExpiresAt, removed };
    this._emit("refreshed", detail);
    if (!(frame.exp > previous)) {
      // The function gave a token that expires no later than the one in place (a cached one,
      // say). Asked again at once, it would be asked ever faster until exp: back off instead.
      if (scheduled) {
        this._refreshAttempt += 1;
        this._emit("error", {
          error: new Error(
            `the token function returned a token that expires no later than the current one (exp ${frame.exp}); asking again with backoff`,
          ),
        });
      }
    } else {
      this._refreshAttempt = 0;
    }
    this._scheduleRefresh();
    return detail;
  }

  /**
   * Forgets patterns the token no longer allows: their handlers are dropped (nothing more can
   * arrive for them) and they are not resubscribed. Emits `revoked`.
   */
  _revoke(patterns, reason) {
    const dropped = patterns.filter((p) => this._handlers.delete(p));
    if (dropped.length > 0) this._emit("revoked", { patterns: dropped, reason });
  }

  /**
   * Subscribes again to the patterns held (or to `only`), in one request. With `recover` on, the
   * request carries the position as `since` (`position`: the one the patterns were lost at, for a
   * retry), so the server replays what was missed meanwhile; the answer is a `recovery` event.
   */
  _resubscribe(only = null, attempt = 0, position = undefined) {
    const held = this.patterns;
    const patterns = only ? only.filter((p) => held.includes(p)) : held;
    if (patterns.length === 0) return;
    const req = this._newRequest("subscribe", patterns, true);
    if (this.options.recover) {
      req.recovery = true;
      req.position = position === undefined ? this._lastEventId : position;
      req.since = req.position;
    }
    req.promise.then(
      () => this._emit("resubscribed", { patterns }),
      (error) => {
        if (error.code === "closed") return;
        // A partial failure may come as two errors (`forbidden` and `unavailable`): report each.
        const frames = [...req.refused, ...req.errors];
        const subscribed = [...req.held];
        const errors = frames.length ? frames.map((f) => errorFromFrame(f, subscribed)) : [error];
        for (const e of errors) this._emit("error", { error: e, patterns: e.events });
        if (error.code === "invalid_request" && req.since != null) {
          // The service refused the position itself (its limits differ from this client's): the
          // patterns are subscribed again without it, which reports `recovered: false`.
          if (this._lastEventId === req.since) this._lastEventId = null;
          this._resubscribe(patterns, attempt, null);
          return;
        }
        const forbidden = patternsOf(frames, "forbidden");
        const unavailable = patternsOf(frames, "unavailable");
        // `forbidden`: the token of this connection (a new one since the patterns were granted)
        // does not allow them; they are dropped for good, like a refresh's `removed`.
        this._revoke(forbidden, "forbidden");
        if (errors.every((e) => e.code === "forbidden") && subscribed.length > 0) {
          this._emit("resubscribed", { patterns: subscribed });
        }
        // `unavailable`: the broker could not bind these patterns right now; the handlers stay
        // and the client asks again with backoff while the connection lasts, from the same
        // position (the events of these patterns since then are still missing).
        if (unavailable.length > 0 && this._state === "open") {
          const delay = backoffDelay(attempt, this.options.backoff, this._random);
          clearTimeout(this._rebindTimer);
          this._rebindTimer = setTimeout(() => {
            if (this._state === "open") this._resubscribe(unavailable, attempt + 1, req.position);
          }, delay);
        }
      },
    );
    this._send(req);
  }

  /**
   * The server answered a recovery (`subscribed` to a subscribe with `since`): moves the position
   * and emits `recovery`, before the replayed events that follow the answer are dispatched.
   */
  _onRecoveryAnswer(req, frame, patterns) {
    const recovered = req.since != null && frame.recovered === true;
    if (recovered) {
      // Everything after `since` follows: it is a valid position until the first event arrives.
      if (this._lastEventId === null) this._lastEventId = req.since;
    } else if (req.position != null && this._lastEventId === req.position) {
      // The patterns are live from now on, but nothing names that point: the old position would
      // replay events from before it (delivered live meanwhile) should a later recovery find it.
      this._lastEventId = null;
    }
    this._emit("recovery", {
      recovered,
      since: req.position ?? null,
      patterns,
      reconnect: req.internal,
    });
  }

  /**
   * A recovery was refused with `busy` (too many wait on the instance; nothing was subscribed):
   * the same request is sent again, with the same `since`, after a backoff delay; after
   * `busyRetries` refusals, without `since` (live only, `recovered: false`).
   */
  _retryBusy(req) {
    req.refused.push(...req.errors);
    req.events = req.busy;
    req.busy = [];
    req.errors = [];
    let delay = 0;
    if (req.busyTries >= this.options.busyRetries) {
      req.since = null;
    } else {
      delay = backoffDelay(req.busyTries, this.options.backoff, this._random);
      req.busyTries += 1;
    }
    clearTimeout(req.retryTimer);
    req.retryTimer = setTimeout(() => {
      req.retryTimer = null;
      // Still waiting (not failed by a close) and connected; otherwise the next open sends it.
      if (this._requests.get(req.id) === req && this._state === "open") this._send(req, false);
    }, delay);
  }

  _onClosed({ code, reason, wasClean }) {
    this._clearTimers();
    this._lastClose = { code, reason, wasClean };
    this._session = null;
    const authError = this._authError;
    this._authError = null;
    if (this._state === "closed") return;
    const policy = reconnectPolicy(code, { token: this._tokenKind });
    if (policy === "stop") {
      this._setState("closed");
      const why = [reason, code === CloseCode.UNAUTHORIZED ? authError?.serverMessage : null]
        .filter(Boolean)
        .join(": ");
      const error = new EventRouterError(
        "closed",
        `the server closed the connection with ${code}${why ? ` (${why})` : ""}; not reconnecting, as retrying would repeat it`,
        { closeCode: code },
      );
      this._emit("close", { code, reason, wasClean, willReconnect: false });
      this._emit("error", { error });
      this._failAll(error);
      for (const waiter of this._opened.splice(0)) waiter.reject(error);
      return;
    }
    let delayMs;
    if (policy === "prompt") {
      // Many clients of the draining instance get this code at once: a small jitter spreads
      // them, the backoff is reset because nothing is wrong with the client or the network.
      // (4003: the next connect asks the token function for a fresh token.)
      this._attempt = 0;
      delayMs = Math.floor(this._random() * this.options.promptJitterMs);
    } else {
      delayMs = backoffDelay(this._attempt, this.options.backoff, this._random);
      this._attempt += 1;
    }
    // Internal resubscriptions in flight are rebuilt from the handlers on the next open.
    for (const [id, req] of this._requests) {
      clearTimeout(req.retryTimer);
      if (req.internal) {
        this._requests.delete(id);
        req.reject(new EventRouterError("closed", "the connection closed", { closeCode: code }));
      }
    }
    this._setState("reconnecting");
    this._emit("close", { code, reason, wasClean, willReconnect: true, delayMs, policy });
    this._timer = setTimeout(() => this._open(), delayMs);
  }

  _startHeartbeat() {
    const { pingIntervalMs, pongTimeoutMs } = this.options;
    if (!pingIntervalMs) return;
    // Browsers answer the server's WebSocket pings but never show them to scripts, so a dead
    // path (a NAT dropping the flow, a half-open TCP connection) is only noticed with an
    // application ping: after `pingIntervalMs` of silence send one; with no answer (or any
    // other frame) within `pongTimeoutMs`, drop the socket and reconnect.
    const tick = Math.max(50, Math.min(pingIntervalMs, pongTimeoutMs) / 2);
    this._heartbeat = setInterval(() => {
      const now = Date.now();
      if (this._pingSentAt && now - this._pingSentAt >= pongTimeoutMs) {
        if (this._ws) this._abandon(this._ws, "no answer to ping");
        return;
      }
      if (!this._pingSentAt && now - this._lastReceived >= pingIntervalMs) {
        this._pingSentAt = now;
        this._sendRaw({ op: "ping" });
      }
    }, tick);
  }

  _clearTimers() {
    clearTimeout(this._timer);
    clearTimeout(this._connectTimer);
    clearTimeout(this._stableTimer);
    clearTimeout(this._rebindTimer);
    clearTimeout(this._refreshTimer);
    clearInterval(this._heartbeat);
    this._timer = this._connectTimer = this._stableTimer = this._rebindTimer = this._heartbeat = null;
    this._refreshTimer = null;
    this._pingSentAt = 0;
  }

  _setState(state) {
    if (state === this._state) return;
    const previous = this._state;
    this._state = state;
    this._emit("state", { state, previous });
  }

  _emit(type, detail) {
    this.dispatchEvent(makeEvent(type, detail));
  }

  // --- requests ---------------------------------------------------------------------------

  _newRequest(op, events, internal = false) {
    const id = this._nextId++;
    // `acked`, `errors` and `busy` collect the partial replies of a subscribe to the current
    // attempt (see `_reply`); `held` every pattern acknowledged, `refused` the errors of attempts
    // retried after `busy`. A recovery (`recovery`) asks from `position`, sent as `since` (null
    // once given up after `busy`).
    const req = {
      id,
      op,
      events,
      internal,
      acked: [],
      errors: [],
      busy: [],
      held: new Set(),
      refused: [],
      recovery: false,
      position: null,
      since: null,
      busyTries: 0,
      retryTimer: null,
      onAck: null,
    };
    req.promise = new Promise((resolve, reject) => {
      req.resolve = resolve;
      req.reject = reject;
    });
    this._requests.set(id, req);
    return req;
  }

  _request(op, events, extra = null) {
    if (this._state === "closed") {
      return Promise.reject(
        new EventRouterError("closed", "the client is closed; call connect() to open it again"),
      );
    }
    const req = this._newRequest(op, events);
    if (extra) Object.assign(req, extra);
    if (this._state === "open") this._send(req);
    else if (this._state === "idle" && this.options.autoConnect) {
      this.connect().catch(() => {});
    }
    return req.promise;
  }

  _send(req, fresh = true) {
    const frame = { op: req.op, id: req.id };
    if (req.events) frame.events = req.events;
    if (req.since != null) frame.since = req.since;
    if (req.token) frame.token = req.token;
    clearTimeout(req.retryTimer);
    req.retryTimer = null;
    // Sent again after a reconnect: only the new connection's replies count. (A retry after
    // `busy` keeps what the earlier attempts were answered.)
    if (fresh) {
      req.acked = [];
      req.errors = [];
      req.busy = [];
    }
    this._sendRaw(frame);
  }

  _sendRaw(frame) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  _failAll(error) {
    for (const req of this._requests.values()) {
      clearTimeout(req.retryTimer);
      req.reject(error);
    }
    this._requests.clear();
  }

  _onMessage(message) {
    this._lastReceived = Date.now();
    this._pingSentAt = 0;
    if (typeof message.data !== "string") return;
    let frame;
    try {
      frame = JSON.parse(message.data);
    } catch (error) {
      this._emit("error", { error });
      return;
    }
    switch (frame.op) {
      case "event":
        this._dispatch(frame);
        break;
      case "subscribed":
      case "unsubscribed":
      case "pong":
      case "authenticated":
      case "refreshed":
      case "error":
        this._reply(frame);
        break;
      default:
        break;
    }
  }

  _reply(frame) {
    const req = typeof frame.id === "number" ? this._requests.get(frame.id) : undefined;
    if (!req) {
      // An error about a request the client did not make (or a pong for a heartbeat ping).
      if (frame.op === "error") {
        this._emit("error", {
          error: new EventRouterError(frame.code, frame.message, { events: frame.events }),
        });
      }
      return;
    }
    if (req.op === "subscribe" && (frame.op === "subscribed" || isPartialError(frame))) {
      // A subscribe may be answered in parts: the patterns that are not granted are refused
      // first (`forbidden`), those that bound are acknowledged (`subscribed`), those the broker
      // could not bind are refused last (`unavailable`), all with the request's id. It settles
      // once every requested pattern is accounted for.
      // A recovery refused with `busy` subscribed nothing: it is retried (see `_retryBusy`).
      if (frame.op === "subscribed") {
        const acked = Array.isArray(frame.events) ? frame.events : [];
        req.acked.push(...acked);
        for (const p of acked) req.held.add(p);
        // Synchronously: the replayed and live events right behind this frame must find the
        // handler in place, and the application must learn the outcome before them.
        req.onAck?.(acked);
        if (req.recovery) this._onRecoveryAnswer(req, frame, acked);
      } else if (frame.code === "busy" && req.since != null) {
        req.busy.push(...frame.events);
      } else {
        req.errors.push(frame);
      }
      const answered = new Set([...req.acked, ...patternsOf(req.errors), ...req.busy]);
      if (!req.events.every((p) => answered.has(p))) return;
      if (req.busy.length > 0) {
        this._retryBusy(req);
        return;
      }
      this._requests.delete(req.id);
      const errors = [...req.refused, ...req.errors];
      if (errors.length === 0) req.resolve(frame);
      else req.reject(errorFromFrame(errors[0], [...req.held]));
      return;
    }
    this._requests.delete(req.id);
    if (frame.op === "error") req.reject(errorFromFrame(frame, [...req.held]));
    else req.resolve(frame);
  }

  _dispatch(frame) {
    const event = { event: frame.event, id: frame.id, time: frame.time, data: frame.data };
    const id = typeof frame.id === "string" ? frame.id : null;
    // The duplicate guard: the service sends no event twice (recovery included), but a `since`
    // older than what this client already has (or two recoveries overlapping) can repeat events.
    // A recent id is given only to handlers that did not get it yet, and not emitted again.
    let called = id === null ? undefined : this._recent.get(id);
    if (called !== undefined) {
      this._duplicates += 1;
    } else {
      called = new Set();
      if (id !== null) this._recent.add(id, called);
      if (isEventId(id)) this._lastEventId = id;
      this._emit("event", event);
    }
    for (const [pattern, handlers] of this._handlers) {
      if (!topicMatches(pattern, event.event)) continue;
      for (const handler of handlers) {
        if (called.has(handler)) continue;
        called.add(handler);
        try {
          handler(event);
        } catch (error) {
          // A throwing handler must not stop delivery to the others.
          this._emit("error", { error });
        }
      }
    }
  }
}
