// End-to-end test of the agent console and the chat widget together, in one headless Chromium.
//
//   CUSTOMER_URL=http://127.0.0.1:8080 CONSOLE_URL=http://127.0.0.1:8081 SECOND_CONSOLE_URL=http://127.0.0.1:8082 \
//     ARTIFACT_DIR=/tmp/artifacts node console.test.mjs
//
// Environment:
//   CUSTOMER_URL        (required) hub node serving the customer's widget at `/`
//   CONSOLE_URL         (required) hub node serving Anna's console at `/console` (may be the same)
//   SECOND_CONSOLE_URL  (required) hub node serving Bob's console (may be the same)
//   ARTIFACT_DIR        (required) where console.png, console-customer.png (and *-failure.png) go
//   CHROMIUM_PATH       (optional) default /usr/bin/chromium
//
// The hub's answerer must be paced (a reply streams for a few seconds). Steps, each awaited:
//
//  1. A customer says "Hello" and gets the answer; Anna's console lists the conversation (the
//     customer online, answered by the assistant); Anna and Bob open it and see its history, and
//     each sees the other among the viewers.
//  2. The customer asks about the Gold Card: Anna sees the reply grow token by token (at least 3
//     distinct lengths) and takes over while it streams. The customer sees "Anna … has joined" and
//     no token of that reply after it; the console shows the reply stopped and Anna as the owner,
//     with the reply box enabled; Bob's console shows Anna as the owner and cannot take over.
//  3. Anna types: the customer sees "Anna is typing…"; Anna sends a message: the customer sees it
//     under Anna's name, and the typing indicator goes.
//  4. The customer types: Anna sees "Customer is typing…".
//  5. Anna writes a private note: Anna and Bob see it as a note; no customer frame ever carries it.
//  6. Anna hands back: the customer sees that Anna left.
//  7. The customer presses "Talk to a person": told a person will join; both consoles highlight the
//     conversation as waiting for an agent.
//
// Every page must keep to its Content-Security-Policy and throw nothing. Exits 0 on success.

import { existsSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { chromium } from 'playwright-core';

const OVERALL_TIMEOUT_MS = 75_000;
const STEP_MS = 15_000;
const NOTE = `Private: VIP customer ${randomBytes(3).toString('hex')}`;
const AGENT_MESSAGE = 'Hi, this is Anna from Support. I can help with the Gold Card.';

function fail(message) {
  console.error(`FAIL: ${message}`);
  console.error('console: 0 passed, 1 failed');
  process.exit(1);
}

const origin = (name) => {
  const value = (process.env[name] || '').replace(/\/+$/, '');
  if (!/^https?:\/\//.test(value)) fail(`${name} must be an http(s) origin, got ${JSON.stringify(value)}`);
  return value;
};
const customerUrl = origin('CUSTOMER_URL');
const consoleUrl = origin('CONSOLE_URL');
const secondConsoleUrl = origin('SECOND_CONSOLE_URL');
const artifactDir = process.env.ARTIFACT_DIR || '';
const executablePath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
if (!artifactDir) fail('ARTIFACT_DIR is not set (directory for screenshots)');
if (!existsSync(executablePath)) fail(`Chromium not found at ${executablePath}; install it with \`apt-get install -y chromium\``);
mkdirSync(artifactDir, { recursive: true });

const user = `browser-${randomBytes(6).toString('hex')}`;
const log = (...args) => console.log('[console-test]', ...args);

/** Records every frame each socket of the page receives, and CSP violations. */
function instrument() {
  const Native = window.WebSocket;
  window.__sockets = [];
  window.WebSocket = class extends Native {
    constructor(url, protocols) {
      super(url, protocols);
      this.__frames = [];
      this.addEventListener('message', (e) => this.__frames.push(JSON.parse(e.data)));
      window.__sockets.push(this);
    }
  };
  window.__cspViolations = [];
  document.addEventListener('securitypolicyviolation', (e) => {
    window.__cspViolations.push(`${e.violatedDirective} blocked ${e.blockedURI || 'inline'}`);
  });
}

/** Waits for `fn(arg)` in the page to be truthy; on timeout, fails with `what` and a look at the page. */
async function until(page, what, fn, arg, timeout = STEP_MS) {
  try {
    return await page.waitForFunction(fn, arg, { timeout, polling: 50 });
  } catch {
    const status = await page.evaluate(() => document.body.dataset.status).catch(() => '?');
    const frames = await page
      .evaluate(() => (window.__sockets || []).flatMap((ws) => ws.__frames).slice(-12).map((f) => JSON.stringify(f).slice(0, 160)))
      .catch(() => []);
    throw new Error(`${what}: not within ${timeout / 1000} s (page status ${status}; its last frames:\n    ${frames.join('\n    ')})`);
  }
}

async function open(context, url, name) {
  const page = await context.newPage();
  page.__errors = [];
  page.on('pageerror', (err) => {
    page.__errors.push(err.message);
    console.error(`[${name} uncaught exception] ${err.stack || err.message}`);
  });
  page.on('console', (msg) => {
    if (msg.type() === 'error') console.error(`[${name} console.error] ${msg.text()}`);
  });
  await page.addInitScript(instrument);
  log(`${name}: opening ${url}`);
  const response = await page.goto(url, { waitUntil: 'load', timeout: STEP_MS });
  if (!response || !response.ok()) throw new Error(`GET ${url} answered ${response ? response.status() : 'nothing'}`);
  if (!(response.headers()['content-security-policy'] || '').includes("connect-src 'self'")) {
    throw new Error(`${url} has no Content-Security-Policy limiting connections`);
  }
  await until(page, `${name} connects`, () => document.body.dataset.status === 'open');
  return page;
}

/** Opens the customer's conversation in a console and waits for its history. */
async function openConversation(page, name, customer) {
  await until(page, `${name}'s list shows the customer's conversation`,
    (u) => [...document.querySelectorAll('#conversations .item-customer')].some((el) => el.textContent === u), customer);
  const item = page.locator('#conversations li', { has: page.locator('.item-customer', { hasText: customer }) });
  await item.locator('button').click();
  await until(page, `${name} sees the conversation's history`,
    () => !document.querySelector('#view').hidden && document.querySelectorAll('#console-transcript .msg').length >= 2);
}

async function scenario(pages) {
  const { customer, anna, bob } = pages;

  // 1. A conversation exists, the consoles list it and open it.
  await customer.fill('#question', 'Hello');
  await customer.click('#send');
  await until(customer, 'the customer gets an answer to "Hello"', () => document.querySelector('#transcript .msg.assistant[data-done="true"]'));
  await openConversation(anna, 'Anna', user);
  const listed = await anna.evaluate((u) => {
    const li = [...document.querySelectorAll('#conversations li')].find((el) => el.querySelector('.item-customer').textContent === u);
    return { owner: li.dataset.owner, online: li.querySelector('.presence-dot').classList.contains('online'), last: li.querySelector('.item-last').textContent };
  }, user);
  if (listed.owner !== 'assistant' || !listed.online) throw new Error(`the list entry should show an online customer answered by the assistant: ${JSON.stringify(listed)}`);
  log(`Anna's list: ${JSON.stringify(listed)}`);
  await openConversation(bob, 'Bob', user);
  await until(anna, 'Anna sees Bob viewing', () => document.querySelector('#view-viewers').textContent.includes('Bob'));
  await until(bob, 'Bob sees Anna viewing', () => document.querySelector('#view-viewers').textContent.includes('Anna'));

  // 2. The reply grows in the console; Anna takes over while it streams.
  await anna.evaluate(() => {
    const transcript = document.querySelector('#console-transcript');
    const before = new Set(transcript.querySelectorAll('.msg.assistant'));
    const state = { lengths: [], reply: null, streamingAtTake: null, finalText: null, done: false };
    window.__grow = state;
    const check = () => {
      const bubble = [...transcript.querySelectorAll('.msg.assistant')].find((el) => !before.has(el));
      if (!bubble) return;
      state.reply = bubble.dataset.reply || state.reply;
      const n = bubble.textContent.length;
      if (n > 0 && !state.lengths.includes(n)) state.lengths.push(n);
      if (bubble.dataset.done === 'true') {
        state.done = true;
        state.finalText = bubble.textContent;
      }
    };
    new MutationObserver(check).observe(transcript, { childList: true, subtree: true, characterData: true, attributes: true });
  });
  await customer.fill('#question', 'Tell me about the Gold Card');
  await customer.click('#send');
  await until(anna, 'Anna sees the reply grow (3 distinct lengths)', () => window.__grow.lengths.length >= 3 && !window.__grow.done);
  const streaming = await anna.evaluate(() => !!document.querySelector('#console-transcript .msg.assistant.streaming'));
  if (!streaming) throw new Error('the reply should still be streaming when Anna takes over');
  await anna.click('#take');
  log('Anna took over');

  await until(customer, 'the customer sees Anna join',
    () => [...document.querySelectorAll('#transcript .msg.system')].some((el) => el.dataset.event === 'agent_joined' && el.textContent.includes('Anna')));
  await until(anna, 'the console shows the stopped reply and Anna as the owner',
    () => window.__grow.done && document.querySelector('#view').dataset.owner === 'me' && !document.querySelector('#reply').disabled);
  const grow = await anna.evaluate(() => window.__grow);
  log(`the console saw the reply at lengths ${JSON.stringify(grow.lengths)}; stored as ${JSON.stringify(grow.finalText)}`);
  await until(bob, "Bob's console shows Anna as the owner, without a take over",
    () => document.querySelector('#view-owner').textContent.includes('Anna') && document.querySelector('#take').disabled);
  await until(anna, "Anna's list shows her as the owner",
    (u) => [...document.querySelectorAll('#conversations li')].some((li) => li.querySelector('.item-customer').textContent === u && li.dataset.owner === 'agent'), user);

  await until(customer, "the customer's stopped reply says a person takes over",
    (reply) => [...document.querySelectorAll('#transcript .msg.assistant[data-done="true"]')]
      .some((el) => el.dataset.reply === reply && el.parentElement.querySelector('.caption')?.textContent.includes('taking over')), grow.reply);
  const frames = await customer.evaluate(() => window.__sockets.flatMap((ws) => ws.__frames));
  const joinedAt = frames.findIndex((f) => f.type === 'message' && f.from === 'system' && f.event === 'agent_joined');
  const late = frames.slice(joinedAt + 1).filter((f) => f.type === 'reply.delta');
  if (late.length) throw new Error(`the customer got ${late.length} token(s) after Anna joined: ${JSON.stringify(late.slice(0, 3))}`);
  const customerDeltas = frames.filter((f) => f.type === 'reply.delta' && f.reply === grow.reply).length;
  log(`the customer got ${customerDeltas} tokens of the reply, none after Anna joined`);

  // 3. Anna types, then sends.
  await anna.click('#reply');
  await anna.keyboard.type(AGENT_MESSAGE.slice(0, 12), { delay: 20 });
  await until(customer, 'the customer sees "Anna is typing…"', () => document.querySelector('#agent-typing')?.textContent.includes('Anna is typing'));
  await anna.keyboard.type(AGENT_MESSAGE.slice(12), { delay: 2 });
  await anna.keyboard.press('Enter');
  await until(customer, "the customer sees Anna's message under her name",
    (text) => [...document.querySelectorAll('#transcript .row.from-agent')].some((row) => row.querySelector('.msg.agent')?.textContent === text && row.querySelector('.who')?.textContent === 'Anna'),
    AGENT_MESSAGE);
  await until(customer, 'the typing indicator goes with the message', () => !document.querySelector('#agent-typing'));
  await until(anna, "Anna's transcript shows her message",
    (text) => [...document.querySelectorAll('#console-transcript .msg.agent')].some((el) => el.textContent === text && el.dataset.seq), AGENT_MESSAGE);

  // 4. The customer types.
  await customer.click('#question');
  await customer.keyboard.type('Thanks', { delay: 20 });
  await until(anna, 'Anna sees "Customer is typing…"', () => document.querySelector('#typing-line').textContent.includes('Customer is typing'));

  // 5. A private note.
  await anna.fill('#note', NOTE);
  await anna.click('#note-send');
  for (const [page, name] of [[anna, 'Anna'], [bob, 'Bob']]) {
    await until(page, `${name} sees the note, as a note`,
      (text) => [...document.querySelectorAll('#console-transcript .row.from-note .msg.note')].some((el) => el.textContent === text), NOTE);
  }

  // 6. Hand back.
  await anna.click('#release');
  await until(customer, 'the customer sees Anna leave',
    () => [...document.querySelectorAll('#transcript .msg.system')].some((el) => el.dataset.event === 'agent_left'));
  await until(anna, 'the console offers to take over again', () => !document.querySelector('#take').hidden && document.querySelector('#reply').disabled);

  // 7. The customer asks for a person: every console shows the conversation waiting.
  await until(customer, '"Talk to a person" is enabled again', () => !document.querySelector('#handoff').disabled);
  await customer.click('#handoff');
  await until(customer, 'the customer is told a person will join',
    () => [...document.querySelectorAll('#transcript .msg.system')].some((el) => el.dataset.event === 'waiting'));
  for (const [page, name] of [[anna, 'Anna'], [bob, 'Bob']]) {
    await until(page, `${name}'s list highlights the conversation as waiting for an agent`,
      (u) => [...document.querySelectorAll('#conversations li.waiting')].some((li) => li.querySelector('.item-customer').textContent === u), user);
  }

  const customerFrames = await customer.evaluate(() => JSON.stringify(window.__sockets.flatMap((ws) => ws.__frames)));
  if (customerFrames.includes(NOTE)) throw new Error('the private note reached a customer socket');
  await customer.screenshot({ path: path.join(artifactDir, 'console-customer.png') });
  await anna.screenshot({ path: path.join(artifactDir, 'console.png') });
  log(`screenshots: ${path.join(artifactDir, 'console.png')} ${path.join(artifactDir, 'console-customer.png')}`);

  const problems = [];
  for (const [name, page] of Object.entries(pages)) {
    if (page.__errors.length) problems.push(`${name}'s page threw: ${page.__errors.join(' | ')}`);
    const violations = await page.evaluate(() => window.__cspViolations);
    if (violations.length) problems.push(`${name}'s page broke its Content-Security-Policy: ${violations.join(' | ')}`);
  }
  if (problems.length) throw new Error(problems.join('\n  '));
}

async function main() {
  let browser;
  const pages = {};
  let timer;
  try {
    browser = await chromium.launch({
      executablePath,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
      timeout: 20_000,
    });
    // One browser, a context (own storage) per person.
    const context = async (width, height) => browser.newContext({ viewport: { width, height }, deviceScaleFactor: 1 });
    pages.customer = await open(await context(440, 760), `${customerUrl}/?tenant=demo&user=${user}`, 'customer');
    pages.anna = await open(await context(1100, 760), `${consoleUrl}/console?tenant=demo&user=anna&name=Anna`, 'Anna');
    pages.bob = await open(await context(1100, 760), `${secondConsoleUrl}/console?tenant=demo&user=bob&name=Bob`, 'Bob');
    const overall = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`overall timeout of ${OVERALL_TIMEOUT_MS / 1000} s exceeded`)), OVERALL_TIMEOUT_MS);
    });
    await Promise.race([scenario(pages), overall]);
    console.log('PASS: the console watched the reply grow, took over, typed and answered; the customer saw the agent join, type and answer');
    console.log('console: 1 passed, 0 failed');
    return 0;
  } catch (err) {
    console.error(`FAIL: ${err.message}`);
    for (const [name, page] of Object.entries(pages)) {
      const shot = path.join(artifactDir, `console-${name}-failure.png`);
      await page.screenshot({ path: shot, timeout: 5_000 }).then(() => console.error(`failure screenshot saved to ${shot}`), () => {});
    }
    console.error('console: 0 passed, 1 failed');
    return 1;
  } finally {
    clearTimeout(timer);
    if (browser) await browser.close().catch((err) => console.error(`closing Chromium failed: ${err.message}`));
  }
}

const hardStop = setTimeout(() => fail(`hard timeout (${OVERALL_TIMEOUT_MS / 1000 + 15} s): browser did not shut down`), OVERALL_TIMEOUT_MS + 15_000);
hardStop.unref();
process.exitCode = await main();
