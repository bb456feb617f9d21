// End-to-end test of the Fengda web demo in headless Chromium.
//
//   FENGDA_URL=http://127.0.0.1:8080 ARTIFACT_DIR=/tmp/artifacts node chat.test.mjs
//
// Environment:
//   FENGDA_URL    (required) origin of a running hub that serves the web demo at `/`
//   ARTIFACT_DIR  (required) where chat.png (and chat-failure.png on failure) are written
//   CHROMIUM_PATH (optional) Chromium binary, default /usr/bin/chromium (Debian's `chromium`)
//
// Opens the chat page, asks "Tell me about the Gold Card" and checks that the answer streams in
// token by token (at least 3 distinct lengths before `data-done`), ends non-empty and mentions
// "Gold Card", and that the customer's bubble shows the question. Then asks "How much does it
// cost?", drops the socket after the first tokens and keeps the page offline until the answer
// has finished on the hub: the answer that comes back in the replay must take the place of the
// partial one. The page must send a Content-Security-Policy and break none of it. Exits 0 on success.

import { existsSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { chromium } from 'playwright-core';

const OVERALL_TIMEOUT_MS = 60_000;
const QUESTION = 'Tell me about the Gold Card';
const FOLLOW_UP = 'How much does it cost?';

function fail(message) {
  console.error(`FAIL: ${message}`);
  console.error('browser: 0 passed, 1 failed');
  process.exit(1);
}

const baseUrl = (process.env.FENGDA_URL || '').replace(/\/+$/, '');
const artifactDir = process.env.ARTIFACT_DIR || '';
const executablePath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';

if (!baseUrl) fail('FENGDA_URL is not set (e.g. FENGDA_URL=http://127.0.0.1:8080)');
if (!/^https?:\/\//.test(baseUrl)) fail(`FENGDA_URL must start with http:// or https://, got ${baseUrl}`);
if (!artifactDir) fail('ARTIFACT_DIR is not set (directory for screenshots)');
if (!existsSync(executablePath)) {
  fail(`Chromium not found at ${executablePath}; install it with \`apt-get install -y chromium\` or set CHROMIUM_PATH`);
}
mkdirSync(artifactDir, { recursive: true });

const user = `browser-${randomBytes(6).toString('hex')}`;
const pageUrl = `${baseUrl}/?tenant=demo&user=${user}`;
const log = (...args) => console.log('[browser-test]', ...args);

/** Runs the scenario; throws on any failed expectation. */
async function scenario(page, pageErrors) {
  // Every WebSocket the page opens, and a switch that sends new ones nowhere (a page offline).
  await page.addInitScript(() => {
    const Native = window.WebSocket;
    window.__sockets = [];
    window.__offline = false;
    window.WebSocket = class extends Native {
      constructor(url, protocols) {
        super(window.__offline ? String(url).replace('/ws?', '/offline?') : url, protocols);
        window.__sockets.push(this);
      }
    };
    // Whatever the page's Content-Security-Policy blocks (the widget must need nothing it forbids).
    window.__cspViolations = [];
    document.addEventListener('securitypolicyviolation', (e) => {
      window.__cspViolations.push(`${e.violatedDirective} blocked ${e.blockedURI || 'inline'}`);
    });
  });
  log(`opening ${pageUrl}`);
  const response = await page.goto(pageUrl, { waitUntil: 'load', timeout: 15_000 });
  if (!response || !response.ok()) {
    throw new Error(`GET ${pageUrl} answered ${response ? response.status() : 'nothing'}`);
  }
  if (!(response.headers()['content-security-policy'] || '').includes("connect-src 'self'")) {
    throw new Error(`the page has no Content-Security-Policy limiting connections: ${JSON.stringify(response.headers())}`);
  }

  await page
    .waitForFunction(() => document.body.dataset.status === 'open', null, { timeout: 15_000 })
    .catch(async () => {
      const status = await page.evaluate(() => document.body.dataset.status).catch(() => '?');
      throw new Error(`page never connected: body[data-status] is "${status}" after 15 s`);
    });
  log('socket is open');

  // Watch the transcript before sending: record every distinct length of the new assistant
  // bubble's text until it is marked done.
  await page.evaluate(() => {
    const transcript = document.querySelector('#transcript');
    if (!transcript) throw new Error('#transcript is missing');
    const before = new Set(transcript.querySelectorAll('.msg.assistant'));
    const state = { lengths: [], texts: [], done: false, finalText: null, reply: null };
    window.__fengdaTest = state;
    let bubble = null;
    const check = () => {
      if (!bubble) {
        bubble = [...transcript.querySelectorAll('.msg.assistant')].find((el) => !before.has(el)) || null;
        if (!bubble) return;
        state.reply = bubble.dataset.reply || null;
      }
      const text = bubble.textContent || '';
      if (!state.lengths.includes(text.length)) {
        state.lengths.push(text.length);
        state.texts.push(text);
      }
      if (bubble.dataset.done === 'true' && !state.done) {
        state.done = true;
        state.finalText = text;
        observer.disconnect();
      }
    };
    const observer = new MutationObserver(check);
    observer.observe(transcript, { childList: true, subtree: true, characterData: true, attributes: true });
  });

  await page.fill('#question', QUESTION);
  await page.click('#send');
  log(`sent "${QUESTION}"`);

  await page
    .waitForFunction(() => window.__fengdaTest && window.__fengdaTest.done, null, { timeout: 30_000, polling: 100 })
    .catch(async () => {
      const s = await page.evaluate(() => window.__fengdaTest).catch(() => null);
      throw new Error(`assistant reply never got data-done="true" within 30 s (seen so far: ${JSON.stringify(s)})`);
    });

  const state = await page.evaluate(() => window.__fengdaTest);
  const customerTexts = await page.$$eval('#transcript .msg.customer', (els) => els.map((el) => el.textContent));

  log(`reply ${state.reply}: ${state.lengths.length} distinct lengths ${JSON.stringify(state.lengths)}`);
  log(`final answer: ${JSON.stringify(state.finalText)}`);

  const problems = [];
  const nonEmptySteps = state.lengths.filter((n) => n > 0);
  if (nonEmptySteps.length < 3) {
    problems.push(`answer grew in ${nonEmptySteps.length} step(s) ${JSON.stringify(state.lengths)}; expected at least 3 (no streaming?)`);
  }
  if (!state.reply) problems.push('assistant bubble has no data-reply attribute');
  if (!state.finalText || !state.finalText.trim()) problems.push('final answer is empty');
  else if (!state.finalText.includes('Gold Card')) problems.push(`final answer does not mention "Gold Card": ${JSON.stringify(state.finalText)}`);
  if (!customerTexts.some((t) => t.includes(QUESTION))) {
    problems.push(`no customer bubble shows the question; customer bubbles: ${JSON.stringify(customerTexts)}`);
  }
  if (pageErrors.length) problems.push(`page threw uncaught exception(s): ${pageErrors.join(' | ')}`);
  const violations = await page.evaluate(() => window.__cspViolations);
  if (violations.length) problems.push(`Content-Security-Policy violations: ${violations.join(' | ')}`);

  if (problems.length) throw new Error(problems.join('\n  '));
  await replayReplacesPartialReply(page);

  const shot = path.join(artifactDir, 'chat.png');
  await page.screenshot({ path: shot });
  log(`screenshot saved to ${shot}`);
}

/** The socket drops mid-reply; the reply finishes on the hub and comes back in the replay. */
async function replayReplacesPartialReply(page) {
  const before = await page.$$eval('#transcript .msg.assistant', (els) => els.length);
  await page.fill('#question', FOLLOW_UP);
  await page.click('#send');
  const partial = await page
    .waitForFunction(
      (n) => {
        const bubble = document.querySelectorAll('#transcript .msg.assistant')[n];
        return bubble && bubble.textContent.length > 0 && bubble.dataset.done !== 'true' ? bubble.textContent : null;
      },
      before,
      { timeout: 15_000, polling: 'raf' },
    )
    .then((handle) => handle.jsonValue());
  // Offline: the socket goes (4000, so the client reconnects) and new ones fail until the answer is complete.
  await page.evaluate(() => {
    window.__offline = true;
    window.__sockets.at(-1).close(4000, 'offline');
  });
  log(`socket dropped mid-reply at ${JSON.stringify(partial)}`);
  await new Promise((resolve) => setTimeout(resolve, 2_500));
  await page.evaluate(() => {
    window.__offline = false;
  });
  const final = await page
    .waitForFunction(
      (n) => {
        const bubble = document.querySelectorAll('#transcript .msg.assistant')[n];
        return bubble && bubble.dataset.done === 'true' ? bubble.textContent : null;
      },
      before,
      { timeout: 20_000, polling: 100 },
    )
    .then((handle) => handle.jsonValue())
    .catch(() => {
      throw new Error(`the reply cut off at ${JSON.stringify(partial)} never completed after the reconnect`);
    });
  const bubbles = await page.$$eval('#transcript .msg.assistant', (els) => els.map((el) => el.textContent));
  log(`replayed answer: ${JSON.stringify(final)}`);
  const problems = [];
  if (bubbles.length !== before + 1) problems.push(`expected ${before + 1} assistant bubbles, got ${JSON.stringify(bubbles)}`);
  if (!final.startsWith(partial) || final.length <= partial.length) {
    problems.push(`the replayed answer ${JSON.stringify(final)} does not complete the partial ${JSON.stringify(partial)}`);
  }
  if (!final.includes('$120')) problems.push(`the answer is not about the Gold Card's fee: ${JSON.stringify(final)}`);
  const sockets = await page.evaluate(() => window.__sockets.length);
  if (sockets < 3) problems.push(`expected a dropped socket, failed attempts and a new one; ${sockets} socket(s) opened`);
  if (problems.length) throw new Error(problems.join('\n  '));
}

async function main() {
  let browser;
  let page;
  const pageErrors = [];
  let timer;
  try {
    try {
      browser = await chromium.launch({
        executablePath,
        args: [
          '--headless',
          '--no-sandbox',
          '--disable-gpu',
          '--disable-quic',
          '--no-first-run',
          '--disable-background-networking',
          '--disable-component-update',
          '--disable-sync',
        ],
        timeout: 20_000,
      });
    } catch (err) {
      throw new Error(`could not launch Chromium at ${executablePath}: ${err.message}`);
    }
    const context = await browser.newContext({ viewport: { width: 480, height: 800 }, deviceScaleFactor: 1 });
    page = await context.newPage();
    page.on('console', (msg) => {
      if (msg.type() === 'error') console.error(`[page console.error] ${msg.text()}`);
    });
    page.on('pageerror', (err) => {
      pageErrors.push(err.message);
      console.error(`[page uncaught exception] ${err.stack || err.message}`);
    });

    const overall = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`overall timeout of ${OVERALL_TIMEOUT_MS / 1000} s exceeded`)), OVERALL_TIMEOUT_MS);
    });
    await Promise.race([scenario(page, pageErrors), overall]);
    console.log('PASS: Gold Card answer streamed into the chat widget, and a replayed answer replaced a cut-off one');
    console.log('browser: 1 passed, 0 failed');
    return 0;
  } catch (err) {
    console.error(`FAIL: ${err.message}`);
    if (page) {
      const shot = path.join(artifactDir, 'chat-failure.png');
      await page.screenshot({ path: shot, timeout: 5_000 }).then(
        () => console.error(`failure screenshot saved to ${shot}`),
        () => {},
      );
    }
    console.error('browser: 0 passed, 1 failed');
    return 1;
  } finally {
    clearTimeout(timer);
    if (browser) await browser.close().catch((err) => console.error(`closing Chromium failed: ${err.message}`));
  }
}

// Hard stop in case closing the browser itself hangs.
const hardStop = setTimeout(() => fail(`hard timeout (${OVERALL_TIMEOUT_MS / 1000 + 15} s): browser did not shut down`), OVERALL_TIMEOUT_MS + 15_000);
hardStop.unref();
process.exitCode = await main();
