// The console page and the JavaScript client in a real browser: Debian's Chromium, headless,
// driven over the DevTools protocol by puppeteer-core (which never downloads a browser).
//
// - The page served by a `--demo` instance: subscribe with its form, publish over HTTP and with
//   its form, see the events appear; the gauges come from /console/stats.
// - A drain: two instances on RabbitMQ behind a small round-robin balancer; SIGTERM the one the
//   page's client is connected to: the client gets 1001, reconnects promptly through the
//   balancer to the other instance, resubscribes and keeps receiving; from the router's history
//   stream it recovers what was published meanwhile, so the page shows every event once.
//
// Screenshots go to tests/browser/artifacts/ (git-ignored).

import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";

import puppeteer from "puppeteer-core";

import {
  Balancer,
  Service,
  publish,
  sleep,
  waitFor,
} from "../../event-service/clients/js/tests/support.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const artifacts = path.join(here, "artifacts");
const chromium = process.env.EVENTROUTER_CHROMIUM ?? "/usr/bin/chromium";

let browser;
let profile;
const services = [];

before(async () => {
  mkdirSync(artifacts, { recursive: true });
  profile = mkdtempSync(path.join(os.tmpdir(), "eventrouter-chromium-"));
  browser = await puppeteer.launch({
    executablePath: chromium,
    headless: true,
    userDataDir: profile,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
});

after(async () => {
  await browser?.close();
  await Promise.all(services.map((s) => s.stop("SIGKILL")));
  if (profile) rmSync(profile, { recursive: true, force: true });
});

async function service(args, name) {
  const s = await Service.start(args, { name });
  services.push(s);
  return s;
}

async function openPage(url) {
  const page = await browser.newPage();
  await page.setViewport({ width: 1280, height: 800 });
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console error: ${m.text()}`);
  });
  await page.goto(url, { waitUntil: "load" });
  await page.waitForFunction(() => window.consoleClient?.state === "open");
  return { page, problems };
}

/** The texts of the page's event list, newest first: `[name, data]`. */
function eventsShown(page) {
  return page.$$eval("#events li", (items) =>
    items.map((li) => [li.dataset.event, li.querySelector(".data").textContent]),
  );
}

async function subscribeWithForm(page, pattern) {
  await page.type("#pattern", pattern);
  await page.click("#subscribe-form button");
  await page.waitForSelector(`#patterns li[data-pattern="${pattern}"]`);
}

test("the console page subscribes, shows published events newest first, and its gauges", async () => {
  const svc = await service(["--demo"], "demo");
  const { page, problems } = await openPage(`${svc.httpUrl}/`);

  // The default subscription shows the demo ticks.
  await page.waitForSelector('#patterns li[data-pattern="demo.*"]');
  await page.waitForSelector('#events li[data-event="demo.tick"]', { timeout: 5_000 });

  await subscribeWithForm(page, "order.#");
  assert.match(await page.$eval("#subscribe-status", (e) => e.textContent), /subscribed order\.#/);
  await publish(svc.httpUrl, { event: "order.created", data: { id: 42, total: "9.99" } });
  await page.waitForSelector('#events li[data-event="order.created"]');

  // The publish form posts to /publish; the event comes back over the page's WebSocket.
  await page.$eval("#publish-event", (e) => {
    e.value = "order.shipped";
  });
  await page.$eval("#publish-data", (e) => {
    e.value = '{"id":42,"carrier":"post"}';
  });
  await page.click("#publish-form button");
  await page.waitForSelector('#events li[data-event="order.shipped"]');
  assert.match(await page.$eval("#publish-status", (e) => e.textContent), /202: accepted 1/);

  const orders = (await eventsShown(page)).filter(([name]) => name.startsWith("order."));
  assert.deepEqual(orders, [
    ["order.shipped", '{"id":42,"carrier":"post"}'],
    ["order.created", '{"id":42,"total":"9.99"}'],
  ]);

  // An invalid pattern is refused with the server's code, and nothing is added.
  await page.type("#pattern", "a..b");
  await page.click("#subscribe-form button");
  await page.waitForFunction(() =>
    document.querySelector("#subscribe-status").textContent.startsWith("invalid_pattern"),
  );
  assert.deepEqual(await page.evaluate(() => window.consoleClient.patterns.sort()), ["demo.*", "order.#"]);

  // Gauges: read from /console/stats (this page is the one connection; demo ticks flow).
  await page.waitForFunction(() => document.querySelector("#g-connections").textContent === "1");
  await page.waitForFunction(() => Number(document.querySelector("#g-deliveries").textContent) > 0, {
    timeout: 5_000,
  });
  assert.equal(await page.$eval("#g-recvq", (e) => e.textContent), "0 B");
  assert.equal(await page.$eval("#g-source", (e) => e.textContent), "memory");
  await page.screenshot({ path: path.join(artifacts, "console.png") });

  // Removing a pattern unsubscribes it at the server.
  await page.click('#patterns li[data-pattern="order.#"] button');
  await page.waitForFunction(() => !document.querySelector('#patterns li[data-pattern="order.#"]'));
  await waitFor(async () => (await svc.metric("eventrouter_subscriptions")) === 1, "one pattern left");

  assert.deepEqual(problems, []);
  await page.close();
});

test("the page's client survives a drain: 1001, prompt reconnect through the balancer, still receiving", async () => {
  const amqpUrl = process.env.EVENTROUTER_TEST_AMQP_URL;
  assert.ok(
    amqpUrl,
    "EVENTROUTER_TEST_AMQP_URL is not set: this test needs RabbitMQ; run it through tests/run (or tests/run --services and export what it prints)",
  );
  const tag = Math.random().toString(16).slice(2, 10);
  const amqp = (name) => [
    "--source", "amqp",
    "--amqp-url", amqpUrl,
    "--exchange", `browser-${tag}`,
    "--declare-exchange", "true",
    "--pod-name", `browser-${name}-${tag}`,
    "--queue-expires", "10s",
    "--drain-duration", "2s",
    "--history-stream", `browser-${tag}.history`,
    "--console",
  ];
  const a = await service(amqp("a"), "a");
  const b = await service(amqp("b"), "b");
  const lb = await Balancer.start([a, b]);
  try {
    await lb.allReady();
    const { page, problems } = await openPage(`${lb.httpUrl}/?subscribe=`);
    await page.evaluate(() => {
      window.closes = [];
      window.recoveries = [];
      window.consoleClient.addEventListener("close", (e) => window.closes.push(e.detail));
      window.consoleClient.addEventListener("recovery", (e) => window.recoveries.push(e.detail));
    });
    await subscribeWithForm(page, "drain.#");

    const onA = (await a.metric("eventrouter_connections")) === 1;
    const [from, to] = onA ? [a, b] : [b, a];
    assert.equal(await to.metric("eventrouter_connections"), 0);
    await publish(to.httpUrl, { event: "drain.before", data: { n: 0 } });
    await page.waitForSelector('#events li[data-event="drain.before"]');

    // Events keep being published, to the instance that stays, throughout.
    let n = 0;
    let publishing = true;
    const publisher = (async () => {
      while (publishing) {
        n += 1;
        await publish(to.httpUrl, { event: "drain.during", data: { n } });
        await sleep(100);
      }
    })();

    const signalled = Date.now();
    from.proc.kill("SIGTERM");
    await page.waitForFunction(() => window.consoleClient.reconnects === 1 && window.consoleClient.state === "open", {
      timeout: 10_000,
    });
    const took = Date.now() - signalled;
    const [close] = await page.evaluate(() => window.closes);
    assert.equal(close.code, 1001);
    assert.equal(close.policy, "prompt");
    assert.equal(close.willReconnect, true);
    assert.ok(close.delayMs < 1000, `jitter ${close.delayMs} ms`);
    // The only client is closed in the middle of the 2 s drain, then at most 1 s of jitter.
    assert.ok(took < 3_500, `reconnected ${took} ms after SIGTERM`);

    await waitFor(async () => (await to.metric("eventrouter_subscriptions")) === 1, "resubscribed on the other instance");
    const seenBefore = n;
    await page.waitForFunction(
      (after) => [...document.querySelectorAll('#events li[data-event="drain.during"]')].some(
        (li) => JSON.parse(li.querySelector(".data").textContent).n > after,
      ),
      { timeout: 5_000 },
      seenBefore,
    );
    publishing = false;
    await publisher;
    await publish(to.httpUrl, { event: "drain.after", data: { n: "last" } });
    await page.waitForSelector('#events li[data-event="drain.after"]');
    await page.screenshot({ path: path.join(artifacts, "drain.png") });

    // The other instance replayed, from the history stream, what was published while the client
    // reconnected: every event once, in order (the page lists the newest first).
    const recoveries = await page.evaluate(() => window.recoveries);
    assert.equal(recoveries.length, 1, JSON.stringify(recoveries));
    assert.equal(recoveries[0].recovered, true, JSON.stringify(recoveries[0]));
    assert.equal(recoveries[0].reconnect, true);
    assert.deepEqual(recoveries[0].patterns, ["drain.#"]);
    const during = (await eventsShown(page))
      .filter(([name]) => name === "drain.during")
      .map(([, data]) => JSON.parse(data).n)
      .reverse();
    assert.deepEqual(during, Array.from({ length: n }, (_, i) => i + 1), "every event once, in order");
    assert.equal(await page.evaluate(() => window.consoleClient.duplicates), 0);

    assert.equal((await from.exited).code, 0, "the drained instance exits cleanly");
    assert.equal(await to.metric("eventrouter_connections"), 1);
    assert.deepEqual(problems.filter((p) => !p.includes("WebSocket")), []);
    await page.close();
  } finally {
    await lb.stop();
  }
});
