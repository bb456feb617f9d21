// End-to-end test of the Fengda web demo in headless Chromium.
//
//   FENGDA_URL=http://127.0.0.1:8080 ARTIFACT_DIR=/tmp/artifacts node chat.test.mjs
//
// Environment:
//   FENGDA_URL    (required) origin of a running hub that serves the web demo at `/`
//   ARTIFACT_DIR  (required) where chat.png (and chat-failure.png on failure) are written
//   CHROMIUM_PATH (optional) Chromium binary, default /usr/bin/chromium (Debian's `chromium`)
//
// Opens the chat page and holds one conversation of four questions across three reconnects:
//
//  1. "Tell me about the Gold Card" streams in token by token (at least 3 distinct lengths before
//     `data-done`), ends non-empty and mentions "Gold Card"; the customer's bubble shows it.
//  2. "How much does it cost?": the socket drops after the first tokens and the page stays offline
//     until the answer is stored on the hub (another socket of the conversation sees it): the
//     answer that comes back in the replay takes the place of the partial one.
//  3. Between replies: the page goes offline, the customer's other device asks a question and
//     gets its answer; back online, the page's resume shows both, once each.
//  4. "I lost my card": the socket drops after the first tokens and the page comes back at once:
//     the rest of the answer streams live on the new socket and completes the same bubble.
//  5. The page is reloaded: it asks for the whole conversation (`after=0`, its epoch) and redraws
//     the same transcript; then a question the other device asks while it is offline shows after
//     the reconnect, which resumes after what was redrawn.
//
// At the end, against the conversation's log as the hub stores it: the page's sockets received
// every durable event (ack, reply.done, message) exactly once and in seq order, each reconnect
// asked for `after=` the last seq seen before it, and the transcript shows every stored event
// once, in order, with each reply's whole stored text. The page must send a
// Content-Security-Policy and break none of it. Exits 0 on success.

import { existsSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { chromium } from 'playwright-core';

const OVERALL_TIMEOUT_MS = 60_000;
const QUESTION = 'Tell me about the Gold Card';
const FOLLOW_UP = 'How much does it cost?';
const OTHER_DEVICE_QUESTION = 'What are my transfer limits?';
const LAST_QUESTION = 'I lost my card';

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
    // Each socket keeps every frame it received (`__frames`), in order.
    const Native = window.WebSocket;
    window.__NativeWebSocket = Native;
    window.__sockets = [];
    window.__offline = false;
    window.WebSocket = class extends Native {
      constructor(url, protocols) {
        super(window.__offline ? String(url).replace('/ws?', '/offline?') : url, protocols);
        this.__frames = [];
        this.addEventListener('message', (e) => this.__frames.push(JSON.parse(e.data)));
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
  await missedQuestionIsReplayed(page);
  await replyContinuesLiveAfterQuickReconnect(page);
  await everyEventExactlyOnce(page, pageErrors);
  await reloadRedrawsTheTranscriptAndResumes(page);

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
  const reply = await page.$$eval('#transcript .msg.assistant', (els, n) => els[n].dataset.reply, before);
  // Offline (the client reconnects, and fails) until the answer is stored on the hub.
  await goOffline(page);
  log(`socket dropped mid-reply at ${JSON.stringify(partial)}`);
  await otherDevice(page, { waitForReply: reply });
  await goOnline(page);
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
  if (problems.length) throw new Error(problems.join('\n  '));
}

/** The conversation the page is in (from its first socket's `ready`). */
async function conversationOf(page) {
  return page.evaluate(() => window.__sockets[0].__frames.find((f) => f.type === 'ready').conversation);
}

/** Drops the page's socket (4000, so the client reconnects) and makes every new one fail. */
async function goOffline(page) {
  await page.evaluate(() => {
    window.__offline = true;
    window.__sockets.at(-1).close(4000, 'offline');
  });
  await page.waitForFunction(() => document.body.dataset.status === 'reconnecting', null, { timeout: 5_000 });
}

/**
 * Back online: the browser's `online` event makes the client reconnect at once instead of at the
 * end of its backoff (sent until the client is open: an attempt may be under way when it comes).
 */
async function goOnline(page) {
  await page.evaluate(() => {
    window.__offline = false;
  });
  await page.waitForFunction(
    () => {
      if (document.body.dataset.status === 'open') return true;
      window.dispatchEvent(new Event('online'));
      return false;
    },
    null,
    { timeout: 10_000, polling: 50 },
  );
}

/**
 * Another socket of the same conversation (the customer's other device), outside the page's
 * client, resuming with `after=0`. With `ask`, it sends that message and returns the `reply.done`
 * that answers it; with `waitForReply`, it returns once that reply is stored (live `reply.done`
 * or replayed `message`); with neither, it returns the whole stored log (the replay up to
 * `ready.seq`). Resolves with {frames, done, log}.
 */
async function otherDevice(page, { ask = null, waitForReply = null } = {}) {
  const conversation = await conversationOf(page);
  return page.evaluate(
    ({ user, conversation, ask, waitForReply }) =>
      new Promise((resolve, reject) => {
        const url = new URL('/ws', location.href);
        url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
        url.search = new URLSearchParams({ tenant: 'demo', user, conversation, after: '0' }).toString();
        const ws = new window.__NativeWebSocket(url);
        const frames = [];
        let ready = null;
        let acked = false;
        const finish = (result) => {
          clearTimeout(timer);
          ws.onclose = null;
          ws.close(1000);
          resolve({ frames, ...result });
        };
        const timer = setTimeout(() => {
          ws.close(1000);
          reject(new Error(`the other device waited 15 s in vain; it got ${JSON.stringify(frames)}`));
        }, 15_000);
        ws.onclose = (e) => reject(new Error(`the other device's socket closed (${e.code}); it got ${JSON.stringify(frames)}`));
        ws.onmessage = (e) => {
          const f = JSON.parse(e.data);
          frames.push(f);
          if (f.type === 'ready') {
            ready = f;
            if (ask) ws.send(JSON.stringify({ type: 'message', id: ask.id, text: ask.text }));
          }
          if (ask) {
            if (f.type === 'ack' && f.id === ask.id) acked = true;
            if (acked && f.type === 'reply.done') finish({ done: f });
          } else if (waitForReply) {
            const stored = (f.type === 'reply.done' && f.reply === waitForReply)
              || (f.type === 'message' && f.from === 'assistant' && f.id === waitForReply);
            if (stored) finish({ done: f });
          }
          const log = frames.filter((x) => x.type === 'message');
          if (!ask && !waitForReply && ready && (ready.seq === 0 || log.at(-1)?.seq === ready.seq)) finish({ log });
        };
      }),
    { user, conversation, ask, waitForReply },
  );
}

/** Between replies: while the page is offline another device asks; the page's resume shows it. */
async function missedQuestionIsReplayed(page) {
  await goOffline(page);
  const { done } = await otherDevice(page, { ask: { id: `other-device-${randomBytes(4).toString('hex')}`, text: OTHER_DEVICE_QUESTION } });
  log(`while the page was offline the other device asked and got reply ${done.reply} (seq ${done.seq})`);
  await goOnline(page);
  await page
    .waitForFunction(
      (reply) => [...document.querySelectorAll('#transcript .msg.assistant')].some((el) => el.dataset.reply === reply && el.dataset.done === 'true'),
      done.reply,
      { timeout: 10_000, polling: 100 },
    )
    .catch(() => {
      throw new Error(`the reply ${done.reply} given while the page was offline never showed after the reconnect`);
    });
}

/** Mid-reply, back at once: the rest of the reply streams live on the new socket. */
async function replyContinuesLiveAfterQuickReconnect(page) {
  const before = await page.$$eval('#transcript .msg.assistant', (els) => els.length);
  await page.fill('#question', LAST_QUESTION);
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
  const reply = await page.$$eval('#transcript .msg.assistant', (els, n) => els[n].dataset.reply, before);
  await goOffline(page);
  await goOnline(page);
  log(`socket dropped at ${JSON.stringify(partial)} and came back at once`);
  const final = await page
    .waitForFunction(
      (n) => {
        const bubble = document.querySelectorAll('#transcript .msg.assistant')[n];
        return bubble && bubble.dataset.done === 'true' ? bubble.textContent : null;
      },
      before,
      { timeout: 20_000, polling: 100 },
    )
    .then((handle) => handle.jsonValue());
  const live = await page.evaluate(
    (reply) => window.__sockets.at(-1).__frames.filter((f) => f.reply === reply).map((f) => (f.type === 'reply.delta' ? f.index : f.type)),
    reply,
  );
  log(`after the reconnect the new socket got ${JSON.stringify(live)} of reply ${reply}`);
  const problems = [];
  if (live.length < 2 || live.at(-1) !== 'reply.done' || !(live[0] > 0)) {
    problems.push(`expected the reply's next deltas (index above 0) then its reply.done live on the new socket, got ${JSON.stringify(live)}`);
  }
  if (!final.startsWith(partial) || final.length <= partial.length) {
    problems.push(`the answer ${JSON.stringify(final)} does not complete the partial ${JSON.stringify(partial)}`);
  }
  if (problems.length) throw new Error(problems.join('\n  '));
}

/**
 * A reload redraws the transcript from the hub (the widget asks for the whole conversation,
 * `after=0`), and the page then resumes after what it redrew: a question asked on the other
 * device while it is offline shows after the reconnect.
 */
async function reloadRedrawsTheTranscriptAndResumes(page) {
  const bubbles = () => page.$$eval('#transcript .msg', (els) => els.map((el) => el.textContent));
  const before = await bubbles();
  const conversation = await conversationOf(page);
  const epoch = await page.evaluate(() => window.__sockets[0].__frames.find((f) => f.type === 'ready').epoch);
  await page.reload({ waitUntil: 'load', timeout: 15_000 });
  await page.waitForFunction(() => document.body.dataset.status === 'open', null, { timeout: 15_000 });
  const url = new URL(await page.evaluate(() => window.__sockets[0].url));
  const resume = { conversation: url.searchParams.get('conversation'), after: url.searchParams.get('after'), epoch: url.searchParams.get('epoch') };
  if (JSON.stringify(resume) !== JSON.stringify({ conversation, after: '0', epoch })) {
    throw new Error(`after the reload the page asked for ${JSON.stringify(resume)}, not the whole conversation ${conversation} (after=0, epoch ${epoch})`);
  }
  await page
    .waitForFunction((n) => document.querySelectorAll('#transcript .msg').length >= n, before.length, { timeout: 10_000, polling: 100 })
    .catch(() => {});
  const after = await bubbles();
  if (JSON.stringify(after) !== JSON.stringify(before)) {
    throw new Error(`the reloaded page shows ${JSON.stringify(after)}, not the transcript it had ${JSON.stringify(before)}`);
  }
  log(`the reload redrew ${after.length} bubbles`);
  await missedQuestionIsReplayed(page);
  const resumed = new URL(await page.evaluate(() => window.__sockets.at(-1).url)).searchParams.get('after');
  if (resumed === '0' || resumed === null) throw new Error(`after the reload the page resumed with after=${resumed}, not after what it redrew`);
}

/** The page saw the stored log exactly once, in order, and shows it exactly once. */
async function everyEventExactlyOnce(page, pageErrors) {
  const { log: stored } = await otherDevice(page);
  const expected = [QUESTION, 'assistant', FOLLOW_UP, 'assistant', OTHER_DEVICE_QUESTION, 'assistant', LAST_QUESTION, 'assistant'];
  const problems = [];
  const shape = stored.map((m) => (m.from === 'customer' ? m.text : m.from));
  if (JSON.stringify(shape) !== JSON.stringify(expected)) problems.push(`the stored log is ${JSON.stringify(shape)}, expected ${JSON.stringify(expected)}`);
  if (stored.some((m, i) => m.seq !== i + 1)) problems.push(`stored seqs are not 1..${stored.length}: ${JSON.stringify(stored.map((m) => m.seq))}`);

  const sockets = await page.evaluate(() =>
    window.__sockets.map((ws) => ({
      url: ws.url,
      durable: ws.__frames.filter((f) => ['ack', 'reply.done', 'message'].includes(f.type)).map((f) => f.seq),
      ready: ws.__frames.find((f) => f.type === 'ready') || null,
    })),
  );
  const opened = sockets.filter((s) => new URL(s.url).pathname === '/ws');
  const failed = sockets.length - opened.length;
  log(`${opened.length} socket(s) reached the hub, ${failed} attempt(s) failed while offline`);
  const conversation = await conversationOf(page);
  let seen = 0;
  for (const [i, s] of opened.entries()) {
    const params = new URL(s.url).searchParams;
    if (i > 0) {
      const resume = { conversation: params.get('conversation'), after: params.get('after'), epoch: params.get('epoch') };
      const want = { conversation, after: String(seen), epoch: opened[0].ready && opened[0].ready.epoch };
      if (JSON.stringify(resume) !== JSON.stringify(want)) problems.push(`socket ${i} resumed with ${JSON.stringify(resume)}, expected ${JSON.stringify(want)}`);
    }
    log(`socket ${i}: after=${params.get('after')} got seqs ${JSON.stringify(s.durable)}`);
    seen = Math.max(seen, ...s.durable);
  }
  const received = opened.flatMap((s) => s.durable);
  const all = stored.map((m) => m.seq);
  if (JSON.stringify(received) !== JSON.stringify(all)) {
    problems.push(`the page's sockets got durable seqs ${JSON.stringify(received)}; every stored one once and in order is ${JSON.stringify(all)}`);
  }
  if (opened.length !== 4) problems.push(`expected the first socket and 3 reconnects, got ${opened.length} sockets at /ws`);
  if (failed < 1) problems.push('no reconnect attempt failed while the page was offline');

  const shown = await page.$$eval('#transcript .msg', (els) =>
    els.map((el) => ({ role: el.classList.contains('assistant') ? 'assistant' : 'customer', text: el.textContent, done: el.dataset.done === 'true' })),
  );
  const want = stored.map((m) => ({ role: m.from, text: m.text, done: m.from === 'assistant' }));
  if (JSON.stringify(shown) !== JSON.stringify(want)) {
    problems.push(`the transcript shows\n    ${JSON.stringify(shown)}\n  the stored log is\n    ${JSON.stringify(want)}`);
  }
  if (pageErrors.length) problems.push(`page threw uncaught exception(s): ${pageErrors.join(' | ')}`);
  const violations = await page.evaluate(() => window.__cspViolations);
  if (violations.length) problems.push(`Content-Security-Policy violations: ${violations.join(' | ')}`);
  if (problems.length) throw new Error(problems.join('\n  '));
  log(`the transcript shows the ${stored.length} stored events once each, in order`);
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
    console.log('PASS: four answers streamed into the chat widget across three reconnects, every stored event shown once and in order');
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
