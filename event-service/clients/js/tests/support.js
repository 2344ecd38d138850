// Test support: runs the real event-service binary on loopback ports, a small TCP round-robin
// balancer that follows the instances' readiness (as a Kubernetes Service does), and helpers to
// publish over HTTP and wait for conditions. Shared with the browser tests in tests/browser.

import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "../../../..");

/** The event-service binary: $EVENTROUTER_SERVICE_BIN, else the cargo debug build. */
export function serviceBinary() {
  const explicit = process.env.EVENTROUTER_SERVICE_BIN;
  if (explicit) return explicit;
  const target = process.env.CARGO_TARGET_DIR ?? path.join(repo, "target");
  const bin = path.join(target, "debug", "event-service");
  if (!existsSync(bin)) {
    throw new Error(
      `${bin} does not exist: run \`cargo build -p event-service\` or set EVENTROUTER_SERVICE_BIN`,
    );
  }
  return bin;
}

/** Resolves after `ms`. */
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `check` until it returns a truthy value (returned) or `timeoutMs` passes (throws). */
export async function waitFor(check, what, timeoutMs = 10_000, everyMs = 25) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(everyMs);
  }
}

/**
 * One event-service process. `start` runs it with both ports on 127.0.0.1 (port 0 unless
 * `--listen` is given) and JSON logs, and reads the bound addresses from its start-up line.
 */
export class Service {
  static async start(args = [], { env = {}, name = "service" } = {}) {
    const listen = args.includes("--listen") ? [] : ["--listen", "127.0.0.1:0"];
    const proc = spawn(
      serviceBinary(),
      [...listen, "--admin-listen", "127.0.0.1:0", "--log-format", "json", ...args],
      { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] },
    );
    const service = new Service(proc, name);
    await service._started;
    return service;
  }

  constructor(proc, name) {
    this.proc = proc;
    this.name = name;
    this.log = [];
    this.exited = new Promise((resolve) => proc.once("exit", (code, signal) => resolve({ code, signal })));
    this._started = new Promise((resolve, reject) => {
      let buffered = "";
      const onLine = (line) => {
        this.log.push(line);
        let entry;
        try {
          entry = JSON.parse(line);
        } catch {
          return;
        }
        const f = entry.fields ?? {};
        if (f.message === "event service started") {
          this.addr = f.listen;
          this.adminAddr = f.admin;
          resolve();
        }
      };
      for (const stream of [proc.stdout, proc.stderr]) {
        stream.setEncoding("utf8");
        stream.on("data", (chunk) => {
          buffered += chunk;
          let nl;
          while ((nl = buffered.indexOf("\n")) >= 0) {
            onLine(buffered.slice(0, nl));
            buffered = buffered.slice(nl + 1);
          }
        });
      }
      this.exited.then(({ code, signal }) =>
        reject(
          new Error(
            `${name} exited before starting (code ${code}, signal ${signal}):\n${this.log.join("\n")}`,
          ),
        ),
      );
    });
  }

  get port() {
    return Number(this.addr.split(":").pop());
  }
  get httpUrl() {
    return `http://${this.addr}`;
  }
  get wsUrl() {
    return `ws://${this.addr}/ws`;
  }
  get adminUrl() {
    return `http://${this.adminAddr}`;
  }

  /** A metric's value from the admin port's /metrics (summed over its series). */
  async metric(name) {
    const text = await (await fetch(`${this.adminUrl}/metrics`)).text();
    let sum = null;
    for (const line of text.split("\n")) {
      if (line.startsWith(`${name} `) || line.startsWith(`${name}{`)) {
        sum = (sum ?? 0) + Number(line.slice(line.lastIndexOf(" ") + 1));
      }
    }
    return sum;
  }

  /** Sends `signal` and waits for the process to end. */
  async stop(signal = "SIGTERM") {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill(signal);
    return this.exited;
  }
}

/** POSTs events to a service's /publish; resolves with the parsed answer, throws unless 202. */
export async function publish(httpUrl, events) {
  const res = await fetch(`${httpUrl}/publish`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(events),
  });
  const body = await res.json();
  if (res.status !== 202) throw new Error(`publish answered ${res.status}: ${JSON.stringify(body)}`);
  return body;
}

/**
 * A TCP round-robin balancer on 127.0.0.1 in front of event-service instances. Like a
 * Kubernetes Service it only sends new connections to instances whose /readyz answers 200
 * (checked every `checkEveryMs`), so a draining instance stops getting new clients at once.
 * `cut()` plays a network outage: open connections are reset and new ones refused until
 * `restore()`, while the instances keep running.
 */
export class Balancer {
  static async start(backends, { checkEveryMs = 100 } = {}) {
    const b = new Balancer(backends, checkEveryMs);
    await b._check();
    await new Promise((resolve) => b.server.listen(0, "127.0.0.1", resolve));
    b.port = b.server.address().port;
    return b;
  }

  constructor(backends, checkEveryMs) {
    this.backends = backends.map((service) => ({ service, ready: false }));
    this.next = 0;
    this.sockets = new Set();
    this.routed = [];
    this.down = false;
    this.server = net.createServer((client) => this._route(client));
    this._timer = setInterval(() => this._check(), checkEveryMs);
  }

  get httpUrl() {
    return `http://127.0.0.1:${this.port}`;
  }
  get wsUrl() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  /** Waits until every backend answers /readyz with 200 (an AMQP source connects first). */
  async allReady(timeoutMs = 15_000) {
    await waitFor(() => this.backends.every((b) => b.ready), "every backend to be ready", timeoutMs);
  }

  async _check() {
    await Promise.all(
      this.backends.map(async (b) => {
        try {
          const res = await fetch(`${b.service.httpUrl}/readyz`, { signal: AbortSignal.timeout(1000) });
          await res.arrayBuffer();
          b.ready = res.status === 200;
        } catch {
          b.ready = false;
        }
      }),
    );
  }

  /** Resets every open connection and refuses new ones until `restore()`. */
  cut() {
    this.down = true;
    for (const s of this.sockets) s.destroy();
  }

  restore() {
    this.down = false;
  }

  _route(client) {
    const ready = this.backends.filter((b) => b.ready);
    if (this.down || ready.length === 0) {
      client.destroy();
      return;
    }
    const backend = ready[this.next++ % ready.length];
    this.routed.push(backend.service.name);
    const upstream = net.connect(backend.service.port, "127.0.0.1");
    for (const s of [client, upstream]) {
      this.sockets.add(s);
      s.on("close", () => this.sockets.delete(s));
      s.on("error", () => {});
    }
    client.pipe(upstream);
    upstream.pipe(client);
    client.on("close", () => upstream.destroy());
    upstream.on("close", () => client.destroy());
  }

  async stop() {
    clearInterval(this._timer);
    for (const s of this.sockets) s.destroy();
    await new Promise((resolve) => this.server.close(resolve));
  }
}

/** Collects the client's events of one type into an array (for assertions). */
export function record(client, type) {
  const seen = [];
  client.addEventListener(type, (e) => seen.push(e.detail));
  return seen;
}
