// Drives Debian's Chromium through playwright-core for the Python browser tests (tests/browser/page.py).
// Reads one JSON command per line on stdin, answers one JSON line per command on stdout:
//   {"id": 1, "op": "open", "url": "...", "userDataDir": "...", "width": 1400, "height": 900}
//   {"id": 2, "op": "eval", "expr": "..."}                 -> value of the (awaited) expression
//   {"id": 3, "op": "wait", "expr": "...", "timeout": ms}  -> null once the expression is truthy
//   {"id": 4, "op": "type", "selector": "...", "text": "..."}  (real key presses into the element)
//   {"id": 5, "op": "press", "key": "Escape"}
//   {"id": 6, "op": "screenshot", "path": "...", "clip": optional {x, y, width, height} in page pixels}
//   {"id": 7, "op": "log"}                                  -> console errors and page errors so far
//   {"id": 8, "op": "close"}
// Never downloads a browser: the executable is given by NEWBIE_CHROMIUM (default /usr/bin/chromium).
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const CHROMIUM_FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];

let context = null;
let page = null;
const log = [];

const ops = {
  async open({ url, userDataDir, width = 1400, height = 900 }) {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: process.env.NEWBIE_CHROMIUM || '/usr/bin/chromium',
      headless: true,
      args: CHROMIUM_FLAGS,
      viewport: { width, height },
    });
    page = context.pages()[0] ?? await context.newPage();
    page.on('console', (m) => { if (m.type() === 'error') log.push(`console: ${m.text()}`); });
    page.on('pageerror', (e) => log.push(`page error: ${e.message}`));
    await page.goto(url);
    return page.url();
  },
  eval: ({ expr }) => page.evaluate(expr),
  async wait({ expr, timeout = 30000 }) {
    await page.waitForFunction(expr, null, { timeout, polling: 100 });
    return null;
  },
  async type({ selector, text }) {
    await page.locator(selector).first().pressSequentially(text);
    return null;
  },
  async press({ key }) {
    await page.keyboard.press(key);
    return null;
  },
  async screenshot({ path, clip }) {
    await page.screenshot(clip ? { path, clip } : { path });
    return path;
  },
  log: () => log.slice(),
  async close() {
    if (context) await context.close();
    context = null;
    return null;
  },
};

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const command = JSON.parse(line);
  let answer;
  try {
    const value = await ops[command.op](command);
    answer = JSON.stringify({ id: command.id, ok: true, value: value === undefined ? null : value });
  } catch (error) {
    answer = JSON.stringify({ id: command.id, ok: false, error: String(error?.stack || error) });
  }
  process.stdout.write(answer + '\n');
  if (command.op === 'close') break;
}
if (context) await context.close();
