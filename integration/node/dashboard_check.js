// Loads discoproxy's dashboard in headless Debian Chromium (playwright-core, no downloaded
// browser) and checks what it shows.
//
//   node dashboard_check.js '<json spec>'
//
// spec: {
//   url:          the dashboard URL (may carry ?token=...)
//   screenshot:   where to save a PNG of the whole page (also saved when a check fails)
//   routes:       [[string, ...], ...]: for each list, one row of the routes table
//                 (#routes tbody tr) must contain every string in it
//   connections:  the same for the live connections table (#connections tbody tr)
//   min_updates:  successful refreshes to wait for (default 2: the page is polling)
//   unauthorized: true to expect the "unauthorized" banner instead of data
//   timeout_ms:   how long each wait may take (default 15000)
//   chromium:     the browser binary (default /usr/bin/chromium)
// }
//
// Prints one JSON line: {"ok": true, ...what the page showed} or {"ok": false, "error": ...}
// and exits 0 or 1.
"use strict";

const { chromium } = require("playwright-core");

const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

async function main() {
  const spec = JSON.parse(process.argv[2] || "{}");
  const timeout = spec.timeout_ms || 15000;
  const result = { ok: false, console: [], pageErrors: [], requests: [] };
  const browser = await chromium.launch({
    executablePath: spec.chromium || "/usr/bin/chromium",
    args: CHROMIUM_ARGS,
    timeout,
  });
  let page;
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    page = await context.newPage();
    page.setDefaultTimeout(timeout);
    page.on("console", (msg) => {
      if (msg.type() === "error" || msg.type() === "warning") result.console.push(`${msg.type()}: ${msg.text()}`);
    });
    page.on("pageerror", (err) => result.pageErrors.push(String(err)));
    page.on("response", (res) => {
      const url = new URL(res.url());
      result.requests.push({
        path: url.pathname,
        status: res.status(),
        authorization: res.request().headers()["authorization"] ? "bearer" : null,
      });
    });
    // A dialog would mean API text became markup somewhere.
    page.on("dialog", (dialog) => {
      result.pageErrors.push(`unexpected dialog: ${dialog.message()}`);
      dialog.dismiss().catch(() => {});
    });

    const response = await page.goto(spec.url, { waitUntil: "load" });
    result.status = response ? response.status() : null;
    result.title = await page.title();

    if (spec.unauthorized) {
      await page.waitForSelector("#unauthorized:not([hidden])");
      await page.waitForSelector('#status[data-state="unauthorized"]');
      result.banner = (await page.textContent("#unauthorized")).replace(/\s+/g, " ").trim();
    } else {
      // successful refreshes: the page loaded data and is polling (one every 2 s)
      const updates = spec.min_updates || 2;
      await page.waitForFunction((n) => Number(document.body.dataset.updates || 0) >= n, updates, {
        timeout: timeout + 2000 * updates,
      }).catch(() => { throw new Error(`the page did not refresh ${updates} times`); });
      await waitForRow(page, '#routes tbody tr[data-testid="route-row"]', spec.routes, "routes");
      await waitForRow(page, '#connections tbody tr[data-testid="connection-row"]', spec.connections, "connections");
      await page.waitForSelector('#chart-active svg [data-series="active"]')
        .catch(() => { throw new Error("the active-connections chart drew nothing"); });
      await page.waitForSelector("#chart-bytes svg")
        .catch(() => { throw new Error("the throughput chart was not drawn"); });
      result.status_text = await page.textContent("#status-text");
      result.routes = await rowTexts(page, "#routes tbody tr");
      result.connections = await rowTexts(page, "#connections tbody tr");
      result.providers = await rowTexts(page, "#providers tbody tr");
      result.stats = await page.$$eval(".stat", (els) =>
        Object.fromEntries(els.map((e) => [e.querySelector(".label").textContent, e.querySelector(".value").textContent])));
      result.chart = await page.$eval("#chart-active svg", (s) => {
        const r = s.getBoundingClientRect();
        return { width: Math.round(r.width), height: Math.round(r.height), paths: s.querySelectorAll("path").length };
      });
      result.updates = await page.evaluate(() => Number(document.body.dataset.updates));
    }
    if (result.pageErrors.length) throw new Error(`errors in the page: ${result.pageErrors.join("; ")}`);
    result.ok = true;
  } catch (err) {
    result.error = String(err && err.message ? err.message : err);
  } finally {
    if (page && spec.screenshot) {
      await page.screenshot({ path: spec.screenshot, fullPage: true }).then(
        () => { result.screenshot = spec.screenshot; },
        (err) => { result.screenshot_error = String(err); },
      );
    }
    await browser.close();
  }
  process.stdout.write(JSON.stringify(result) + "\n");
  process.exitCode = result.ok ? 0 : 1;
}

// Waits until, for each list of strings, one row matching selector contains all of them.
async function waitForRow(page, selector, wanted, table) {
  for (const texts of wanted || []) {
    await page.waitForFunction(
      ([sel, ts]) => [...document.querySelectorAll(sel)].some((r) => ts.every((t) => r.textContent.includes(t))),
      [selector, texts],
    ).catch(async () => {
      const rows = await rowTexts(page, selector);
      throw new Error(`no row of the ${table} table shows all of ${JSON.stringify(texts)}; rows: ${JSON.stringify(rows)}`);
    });
  }
}

async function rowTexts(page, selector) {
  return page.$$eval(selector, (rows) =>
    rows.map((r) => [...r.cells].map((c) => c.textContent.replace(/\s+/g, " ").trim()).join(" | ")));
}

main().catch((err) => {
  process.stdout.write(JSON.stringify({ ok: false, error: String(err && err.stack ? err.stack : err) }) + "\n");
  process.exitCode = 1;
});
