// Type declarations of the event router's JavaScript client (index.js).

/** Close codes the event service sends. */
export declare const CloseCode: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  PROTOCOL_ERROR: 1002;
  UNSUPPORTED_DATA: 1003;
  ABNORMAL: 1006;
  INVALID_PAYLOAD: 1007;
  POLICY: 1008;
  TOO_BIG: 1009;
  INTERNAL: 1011;
  SLOW_CONSUMER: 4000;
  IDLE_TIMEOUT: 4001;
  REBALANCE: 4002;
  TOKEN_EXPIRED: 4003;
  UNAUTHORIZED: 4004;
  AUTH_TIMEOUT: 4005;
}>;

export type ReconnectPolicy = "prompt" | "backoff" | "stop";

/** What the client authenticates with: nothing, a fixed string, or a function asked each time. */
export type TokenKind = "none" | "static" | "function";

/**
 * `prompt` for 1001/4002/4003; `stop` for 1002/1003/1007/1008/1009, and for 4004 unless the token
 * is a `function` (then `backoff`); `backoff` for everything else (4005 included).
 */
export declare function reconnectPolicy(code: number, context?: { token?: TokenKind }): ReconnectPolicy;

/**
 * Milliseconds until a token expiring at `exp` (Unix seconds) is refreshed:
 * `max(remaining - refreshBeforeMs, remaining / 2)`, 0 once expired.
 */
export declare function refreshDelay(exp: number, nowMs: number, refreshBeforeMs: number): number;

export interface BackoffOptions {
  /** Upper bound of the first delay, in ms (default 500). */
  initialMs?: number;
  /** Upper bound of any delay, in ms (default 30000). */
  maxMs?: number;
}

/** A uniformly random delay in [0, min(maxMs, initialMs * 2^attempt)). */
export declare function backoffDelay(
  attempt: number,
  backoff: Required<BackoffOptions>,
  random?: () => number,
): number;

/** RabbitMQ topic matching: `*` is exactly one word, `#` zero or more. */
export declare function topicMatches(pattern: string, name: string): boolean;

/** Whether `value` can be sent as `since`: a non-empty string of at most 255 UTF-8 bytes. */
export declare function isEventId(value: unknown): value is string;

/**
 * A bounded memory of the most recent event ids, each with a value; adding past the capacity
 * forgets the oldest. The client's duplicate guard.
 */
export declare class RecentIds<V = true> {
  constructor(capacity: number);
  readonly capacity: number;
  readonly size: number;
  has(id: string): boolean;
  get(id: string): V | undefined;
  add(id: string, value?: V): void;
}

/** A connection token (a JWT), or where to get one. */
export type TokenSource = string | (() => string | Promise<string>);

export interface ClientOptions {
  /**
   * Authenticate every connection with this token: sent as `auth` before anything else. A
   * function is called on every connect and every refresh (fetch the token from the
   * application's backend there); with a string the connection ends at the token's exp.
   */
  token?: TokenSource;
  /** Refresh this long before the token's exp, in ms, and at half its remaining lifetime at the latest (default 30000). */
  refreshBeforeMs?: number;
  /** A WebSocket class when the runtime has no global one. */
  WebSocket?: typeof WebSocket;
  /** Backoff after failures, 4000/4001/4005 closes, refused tokens (from a function) and refreshes. */
  backoff?: BackoffOptions;
  /** Upper bound of the random delay before reconnecting after 1001/4002, in ms (default 1000). */
  promptJitterMs?: number;
  /** A connection attempt not open (and authenticated, with a token) after this long counts as failed, in ms (default 10000). */
  connectTimeoutMs?: number;
  /** A connection open this long resets the backoff, in ms (default 10000). */
  stableAfterMs?: number;
  /** Send an application ping after this much silence, in ms; 0 disables (default 20000). */
  pingIntervalMs?: number;
  /** Reconnect when nothing arrives this long after a ping, in ms (default 10000). */
  pongTimeoutMs?: number;
  /** Connect on the first subscribe when not connected yet (default true). */
  autoConnect?: boolean;
  /** Source of randomness in [0, 1) for the jitter (default Math.random). */
  random?: () => number;
  /**
   * Missed-event recovery (default true): after a reconnect, resubscribe with `since` = the
   * last event delivered, so the service replays what was published meanwhile; every answer is
   * a `recovery` event. False: resubscribe live only, as without recovery.
   */
  recover?: boolean;
  /**
   * How often a recovery refused with `busy` is retried, with backoff and the same `since`,
   * before subscribing live without it (`recovered: false`) (default 5).
   */
  busyRetries?: number;
  /** How many recent event ids the duplicate guard remembers; 0 turns it off (default 1000). */
  dedupeWindow?: number;
}

export interface SubscribeOptions {
  /**
   * An event id (a `lastEventId` persisted before a page reload, say): the service also replays
   * the events matching these patterns published after it, then live ones. Null: live only.
   */
  since?: string | null;
}

export type ConnectionState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

/** One event as the server pushed it. */
export interface RouterEvent<T = unknown> {
  /** The event name, e.g. `order.created`. */
  event: string;
  /** A unique id (UUIDv7). */
  id: string;
  /** Publish time, RFC 3339 with milliseconds. */
  time: string;
  /** The publisher's JSON. */
  data: T;
}

export type EventHandler = (event: RouterEvent) => void;

export interface Subscription {
  /** The patterns acknowledged by the server. */
  patterns: string[];
  /**
   * Only with `since`: true when every missed event follows (before live ones); false when the
   * service could not replay them (re-read the state from the application's backend).
   */
  recovered?: boolean;
  /** Removes this subscription's handler from its patterns. */
  unsubscribe(): Promise<string[]>;
}

export declare class EventRouterError extends Error {
  /** The server's error code (`invalid_pattern`, `forbidden`, `unauthorized`, `rate_limited`, ...) or `closed`. */
  code: string;
  /** The server's message. */
  serverMessage: string;
  /** The patterns the error concerns (`forbidden`, `unavailable`, `busy`). */
  events: string[];
  /** Patterns of the same request that were subscribed (a partial `forbidden` or `unavailable`); the handler holds them. */
  subscribed: string[];
  /** The close code, when the connection ended under the request. */
  closeCode?: number;
}

export interface StateDetail {
  state: ConnectionState;
  previous: ConnectionState;
}
export interface OpenDetail {
  url: string;
  reconnect: boolean;
  reconnects: number;
}
export interface CloseDetail {
  code: number;
  reason: string;
  wasClean: boolean;
  willReconnect: boolean;
  /** Delay before the next attempt (when willReconnect). */
  delayMs?: number;
  policy?: ReconnectPolicy;
  byClient?: boolean;
}
export interface AuthenticatedDetail {
  /** The token's subject. */
  sub: string | null;
  /** The token's expiry, Unix seconds (the JWT claim). */
  exp: number;
  /** The same in ms since the epoch. */
  expiresAt: number;
}
export interface RefreshedDetail {
  /** The new token's expiry, Unix seconds. */
  exp: number;
  /** The same in ms since the epoch. */
  expiresAt: number;
  /** Patterns the new token no longer allows; the server unsubscribed them. */
  removed: string[];
}
export interface RevokedDetail {
  /** Patterns dropped, with their handlers; they are not resubscribed. */
  patterns: string[];
  /** `refresh`: a refresh's `removed`; `forbidden`: refused when resubscribing with a new token. */
  reason: "refresh" | "forbidden";
}
export interface RecoveryDetail {
  /**
   * True: the events missed since `since` follow, then live ones. False: they do not (the
   * position is unknown to the service or too old, the gap too long, the history off, `busy`
   * every time, or the client had no position); the patterns are live all the same: re-read the
   * state from the application's backend.
   */
  recovered: boolean;
  /** The position asked from; null when the client had none (it had received no event). */
  since: string | null;
  /** The patterns this answer subscribed. */
  patterns: string[];
  /** True for the resubscription after a reconnect, false for a `subscribe()` with `since`. */
  reconnect: boolean;
}
export interface ErrorDetail {
  error: Error;
  patterns?: string[];
}

export interface ClientEventMap {
  state: CustomEvent<StateDetail>;
  open: CustomEvent<OpenDetail>;
  close: CustomEvent<CloseDetail>;
  event: CustomEvent<RouterEvent>;
  resubscribed: CustomEvent<{ patterns: string[] }>;
  recovery: CustomEvent<RecoveryDetail>;
  authenticated: CustomEvent<AuthenticatedDetail>;
  refreshed: CustomEvent<RefreshedDetail>;
  revoked: CustomEvent<RevokedDetail>;
  error: CustomEvent<ErrorDetail>;
}

export declare class EventRouterClient extends EventTarget {
  constructor(url: string, options?: ClientOptions);
  readonly url: string;
  readonly state: ConnectionState;
  /** Patterns held and resubscribed after a reconnect. */
  readonly patterns: string[];
  /** Successful reconnects so far. */
  readonly reconnects: number;
  readonly lastClose: { code: number; reason: string; wasClean: boolean } | null;
  /** The token's subject as the server accepted it; null when not authenticated. */
  readonly subject: string | null;
  /** The current connection's token expiry in ms since the epoch; null when not authenticated. */
  readonly tokenExpiresAt: number | null;
  /**
   * The id of the last event delivered (the position reconnects recover from); null before the
   * first one and after a recovery that failed.
   */
  readonly lastEventId: string | null;
  /** Event frames that repeated a recently delivered id (the duplicate guard's count). */
  readonly duplicates: number;

  connect(): Promise<void>;
  close(code?: number, reason?: string): void;
  subscribe(patterns: string | string[], handler: EventHandler, options?: SubscribeOptions): Promise<Subscription>;
  unsubscribe(patterns: string | string[], handler?: EventHandler): Promise<string[]>;
  ping(): Promise<number>;
  /** Gets a token from the token function now and sends it as `refresh` (needs a function). */
  refreshToken(): Promise<RefreshedDetail>;

  addEventListener<K extends keyof ClientEventMap>(
    type: K,
    listener: (event: ClientEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
  removeEventListener<K extends keyof ClientEventMap>(
    type: K,
    listener: (event: ClientEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions,
  ): void;
}
