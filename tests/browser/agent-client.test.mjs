// Unit checks of client.js's agent API (FengdaAgent) and the customer additions (handoff,
// typing), in headless Chromium, against a scripted socket: no hub features are needed beyond
// serving /client.js.
//
//   FENGDA_URL=http://127.0.0.1:8080 node agent-client.test.mjs
//
// Environment:
//   FENGDA_URL    (required) origin of a running hub that serves /client.js
//   CHROMIUM_PATH (optional) Chromium binary, default /usr/bin/chromium
//
// The page imports /client.js and drives it with a fake WebSocket whose frames the check writes:
// the live list as a map (snapshot, update, removal), a watched transcript (history by seq, a reply
// growing from its deltas, a note placed after its `after` seq, typing, presence, owner changes
// with stale ones ignored), a message resent with the same id after a reconnect that lists and
// watches again after the last seq seen, a note acknowledged by its `note` frame, typing on/off
// frames, errors, a changed epoch starting the transcript over; and for customers `handoff`,
// `typing`, an agent's name and an agent's typing, a message resent with the same id after
// `rate_limited` (its `retry_after_ms`) and after `token_expired` (a `refresh`, then `refreshed`),
// the longest backoff after 4430, and a reloaded widget asking for its whole conversation
// (`after=0` with its epoch) unless it was never stored, and resuming after a replay of a log
// that kept only its latest events. Exits 0 on success.

import { existsSync } from 'node:fs';
import { chromium } from 'playwright-core';

const baseUrl = (process.env.FENGDA_URL || '').replace(/\/+$/, '');
const executablePath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';

function fail(message) {
  console.error(`FAIL: ${message}`);
  console.error('agent-client: 0 passed, 1 failed');
  process.exit(1);
}
if (!/^https?:\/\//.test(baseUrl)) fail(`FENGDA_URL must be an http(s) origin, got ${JSON.stringify(baseUrl)}`);
if (!existsSync(executablePath)) fail(`Chromium not found at ${executablePath}; install it with \`apt-get install -y chromium\``);

/** Runs in the page: returns the list of failed expectations (empty when all hold). */
async function checks() {
  const { FengdaAgent, FengdaClient } = await import('/client.js');
  const problems = [];
  const expect = (ok, what, got) => {
    if (!ok) problems.push(`${what}${got === undefined ? '' : ` (got ${JSON.stringify(got)})`}`);
  };
  const tick = (ms = 0) => new Promise((resolve) => setTimeout(resolve, ms));

  class FakeSocket {
    constructor(url) {
      this.url = url;
      this.sent = [];
      this.readyState = 0;
      FakeSocket.all.push(this);
    }
    send(data) {
      this.sent.push(JSON.parse(data));
    }
    close() {
      this.readyState = 3;
    }
    /** The hub sends a frame (the first one opens the socket). */
    hub(frame) {
      this.readyState = 1;
      this.onmessage({ data: JSON.stringify(frame) });
    }
    drop(code = 4000) {
      this.readyState = 3;
      this.onclose({ code, reason: 'test' });
    }
    types() {
      return this.sent.map((f) => f.type);
    }
  }
  FakeSocket.all = [];
  const nextSocket = async (count) => {
    for (let i = 0; i < 200 && FakeSocket.all.length < count; i++) await tick(5);
    return FakeSocket.all[count - 1];
  };

  // ---- the agent ----------------------------------------------------------------------------
  const C = 'c0ffee00c0ffee00c0ffee00c0ffee00';
  const agent = new FengdaAgent({
    tenant: 'demo', user: 'anna', base: location.origin, WebSocket: FakeSocket,
    getToken: async () => 'tok-1', minBackoffMs: 10, maxBackoffMs: 20,
  });
  const events = [];
  for (const type of ['ready', 'list', 'transcript', 'ack', 'error']) {
    agent.addEventListener(type, (e) => events.push({ type, ...e.detail }));
  }
  agent.connect();
  agent.list();
  let ws = await nextSocket(1);
  const url = new URL(ws.url);
  expect(url.pathname === '/ws' && url.searchParams.get('token') === 'tok-1' && [...url.searchParams.keys()].length === 1,
    'an agent connects with its token only', ws.url);
  ws.hub({ type: 'ready', role: 'agent', agent: 'anna', name: 'Anna', supervisor: false });
  expect(agent.status === 'open' && agent.name === 'Anna' && agent.agent === 'anna', 'ready sets the agent', [agent.status, agent.name]);
  expect(JSON.stringify(ws.types()) === '["list"]', 'the list asked before ready goes out after it', ws.types());

  // The list: a snapshot, then changes, kept as a map.
  const summary = (id, extra) => ({ conversation: id, customer: `cust-${id.slice(0, 4)}`, owner: 'assistant', owner_epoch: 0, online: true, typing: false, last: null, customer_at: null, viewers: [], ...extra });
  const D = 'd00d00d00d00d00d00d00d00d00d00d0';
  ws.hub({ type: 'conversations', conversations: [summary(C), summary(D)] });
  expect(agent.conversations.size === 2, 'the snapshot fills the map', agent.conversations.size);
  ws.hub({ type: 'conversation', ...summary(C, { owner: 'waiting', owner_epoch: 1, typing: true }) });
  expect(agent.conversations.get(C).owner === 'waiting' && agent.conversations.get(C).typing === true && !('type' in agent.conversations.get(C)),
    'a change replaces the entry', agent.conversations.get(C));
  ws.hub({ type: 'conversation.removed', conversation: D });
  expect(agent.conversations.size === 1 && !agent.conversations.has(D), 'a removal deletes it', [...agent.conversations.keys()]);

  // Watching: history, then live; a note after its `after` seq; a reply growing from its deltas.
  const w = agent.watch(C);
  expect(JSON.stringify(ws.sent.at(-1)) === JSON.stringify({ type: 'watch', conversation: C }), 'the first watch has no `after`', ws.sent.at(-1));
  ws.hub({ type: 'watching', conversation: C, customer: 'alice', seq: 2, epoch: 'e1', owner: 'assistant', owner_epoch: 0, online: true, viewers: [{ agent: 'anna', name: 'Anna' }] });
  ws.hub({ type: 'message', conversation: C, seq: 1, from: 'customer', id: 'm1', text: 'Hello' });
  ws.hub({ type: 'message', conversation: C, seq: 2, from: 'assistant', id: 'r-1', text: 'Hi! How can I help?' });
  ws.hub({ type: 'message', conversation: C, seq: 2, from: 'assistant', id: 'r-1', text: 'Hi! How can I help?' });
  ws.hub({ type: 'note', conversation: C, id: 'n1', seq: 1, after: 1, agent: 'bob', name: 'Bob', text: 'VIP customer', at: 1 });
  ws.hub({ type: 'message', conversation: C, seq: 3, from: 'customer', id: 'm2', text: 'Tell me about the Gold Card' });
  ws.hub({ type: 'queued', conversation: C, reply: 'r-2', position: 2 });
  expect(w.items().at(-1).kind === 'queued' && w.items().at(-1).position === 2, 'a waiting question is shown with its place', w.items().at(-1));
  const grown = [];
  agent.addEventListener('transcript', (e) => {
    if (e.detail.change === 'delta') grown.push(e.detail.transcript.live.get('r-2').content);
  });
  for (const [index, text] of [[0, 'The'], [1, ' Gold'], [1, ' Gold'], [2, ' Card']]) {
    ws.hub({ type: 'reply.delta', conversation: C, reply: 'r-2', index, text });
  }
  expect(JSON.stringify(grown) === JSON.stringify(['The', 'The Gold', 'The Gold Card']), 'the reply grows token by token, a repeated index once', grown);
  expect(w.items().at(-1).kind === 'streaming' && !w.items().some((i) => i.kind === 'queued'), 'the first token ends the wait', w.items().map((i) => i.kind));
  ws.hub({ type: 'reply.done', conversation: C, reply: 'r-2', seq: 4, text: 'The Gold Card is great.', fallback: false, interrupted: true });
  const order = w.items().map((i) => (i.kind === 'note' ? `note:${i.id}` : i.kind === 'event' ? `${i.seq}:${i.from}` : i.kind));
  expect(JSON.stringify(order) === JSON.stringify(['1:customer', 'note:n1', '2:assistant', '3:customer', '4:assistant']),
    'events by seq once each, the note after seq 1, the stored reply in place of the streamed one', order);
  expect(w.events.get(4).interrupted === true && w.events.get(4).text === 'The Gold Card is great.', 'the stored reply keeps its flags', w.events.get(4));

  // Typing, presence and owner.
  ws.hub({ type: 'typing', conversation: C, from: 'customer', on: true });
  expect(w.typing.has('customer'), 'the customer types');
  ws.hub({ type: 'typing', conversation: C, from: 'customer', on: false });
  expect(!w.typing.has('customer'), 'and stops');
  ws.hub({ type: 'typing', conversation: C, from: 'agent', agent: 'bob', name: 'Bob', on: true, note: true });
  expect(w.typing.get('agent:bob')?.note === true && w.typing.get('agent:bob')?.name === 'Bob', 'another agent types a note', [...w.typing]);
  ws.hub({ type: 'presence', conversation: C, online: false, viewers: [{ agent: 'anna', name: 'Anna' }, { agent: 'bob', name: 'Bob' }] });
  expect(w.online === false && w.viewers.length === 2, 'presence updates online and viewers', [w.online, w.viewers]);
  ws.hub({ type: 'owner', conversation: C, owner: 'agent', agent: 'anna', agent_name: 'Anna', owner_epoch: 2 });
  ws.hub({ type: 'owner', conversation: C, owner: 'assistant', owner_epoch: 1 });
  expect(w.owner === 'agent' && w.agent === 'anna' && w.agentName === 'Anna' && w.ownerEpoch === 2, 'an owner change applies, a stale one does not', [w.owner, w.ownerEpoch]);

  // Typing frames: on once (repeats are timed), off when stopped and before a message.
  const before = ws.sent.length;
  agent.typing(C, true);
  agent.typing(C, true);
  const typed = ws.sent.slice(before);
  expect(JSON.stringify(typed) === JSON.stringify([{ type: 'typing', conversation: C, on: true }]), 'typing on is sent once per burst', typed);

  // A message: typing stops, then the message; it is resent with the same id after a reconnect.
  const id = agent.message(C, '  Hello, I am Anna.  ');
  const sent = ws.sent.slice(before + 1);
  expect(JSON.stringify(sent) === JSON.stringify([{ type: 'typing', conversation: C, on: false }, { type: 'message', conversation: C, id, text: 'Hello, I am Anna.' }]),
    'sending stops typing, then sends the trimmed message', sent);
  expect(agent.isPending(id), 'the message waits for its ack');
  ws.drop();
  ws = await nextSocket(2);
  expect(ws !== FakeSocket.all[0], 'a dropped socket is replaced');
  ws.hub({ type: 'ready', role: 'agent', agent: 'anna', name: 'Anna', supervisor: false });
  expect(JSON.stringify(ws.sent) === JSON.stringify([
    { type: 'list' },
    { type: 'watch', conversation: C, after: 4 },
    { type: 'message', conversation: C, id, text: 'Hello, I am Anna.' },
  ]), 'after a reconnect: list, watch after the last seq seen, the unacknowledged message with its id', ws.sent);
  ws.hub({ type: 'watching', conversation: C, customer: 'alice', seq: 4, epoch: 'e1', owner: 'agent', agent: 'anna', agent_name: 'Anna', owner_epoch: 2, online: true, viewers: [] });
  ws.hub({ type: 'ack', conversation: C, id, seq: 5 });
  ws.hub({ type: 'ack', conversation: C, id, seq: 5 });
  expect(!agent.isPending(id) && w.events.get(5)?.from === 'agent' && w.events.get(5)?.name === 'Anna' && w.events.get(5)?.text === 'Hello, I am Anna.',
    'the ack puts the message in the transcript with the agent\'s name', w.events.get(5));
  expect(events.filter((e) => e.type === 'ack' && e.id === id).length === 1, 'one ack event per message', events.filter((e) => e.type === 'ack'));

  // A note: acknowledged by its `note` frame.
  const noteId = agent.note(C, 'Asked about fees twice');
  expect(JSON.stringify(ws.sent.at(-1)) === JSON.stringify({ type: 'note', conversation: C, id: noteId, text: 'Asked about fees twice' }), 'a note frame', ws.sent.at(-1));
  ws.hub({ type: 'note', conversation: C, id: noteId, seq: 2, after: 5, agent: 'anna', name: 'Anna', text: 'Asked about fees twice', at: 2 });
  expect(!agent.isPending(noteId) && w.items().at(-1).kind === 'note' && w.items().at(-1).id === noteId, 'the note frame acknowledges it and places it after seq 5', w.items().at(-1));

  // Errors: the owner is named; a refused message is dropped; a busy hub gets it again.
  ws.hub({ type: 'error', code: 'already_owned', message: 'owned', conversation: D, agent: 'bob', agent_name: 'Bob' });
  const owned = events.filter((e) => e.type === 'error').at(-1);
  expect(owned.code === 'already_owned' && owned.agentName === 'Bob' && owned.conversation === D, 'already_owned names the owner', owned);
  const refused = agent.message(C, 'too late');
  ws.hub({ type: 'error', code: 'not_owner', message: 'not yours', conversation: C, id: refused });
  expect(!agent.isPending(refused) && events.filter((e) => e.type === 'error').at(-1).retry === false, 'not_owner drops the message');

  // Take, release, unwatch.
  agent.take(D, { steal: true });
  agent.release(C);
  expect(JSON.stringify(ws.sent.slice(-2)) === JSON.stringify([{ type: 'take', conversation: D, steal: true }, { type: 'release', conversation: C }]), 'take with steal, release', ws.sent.slice(-2));

  // A new epoch on watching again: the transcript starts over from the hub's history.
  ws.drop();
  ws = await nextSocket(3);
  ws.hub({ type: 'ready', role: 'agent', agent: 'anna', name: 'Anna', supervisor: false });
  ws.hub({ type: 'watching', conversation: C, customer: 'alice', seq: 1, epoch: 'e2', owner: 'assistant', owner_epoch: 0, online: true, viewers: [] });
  expect(w.events.size === 0 && JSON.stringify(ws.sent.at(-1)) === JSON.stringify({ type: 'watch', conversation: C }), 'a lost log: cleared, watched again from its history', [w.events.size, ws.sent.at(-1)]);
  agent.unwatch(C);
  expect(!agent.watched.has(C) && JSON.stringify(ws.sent.at(-1)) === JSON.stringify({ type: 'unwatch', conversation: C }), 'unwatch forgets it');
  agent.close();

  // ---- the customer additions ---------------------------------------------------------------
  FakeSocket.all = [];
  const customer = new FengdaClient({ tenant: 'demo', user: 'alice', base: location.origin, WebSocket: FakeSocket, storage: null });
  const got = [];
  for (const type of ['message', 'typing']) customer.addEventListener(type, (e) => got.push({ type, ...e.detail }));
  customer.connect();
  const cs = await nextSocket(1);
  cs.hub({ type: 'ready', conversation: C, seq: 0, epoch: 'e1' });
  expect(customer.handoff() === true && cs.sent.at(-1).type === 'handoff', 'handoff sends a handoff frame', cs.sent.at(-1));
  const typingFrom = cs.sent.length;
  customer.typing(true);
  customer.typing(true);
  await tick(3100); // a typist repeats `on: true` every 3 s, so the hub's ~4 s expiry never ends it early
  customer.typing(false);
  expect(JSON.stringify(cs.sent.slice(typingFrom)) === JSON.stringify([{ type: 'typing', on: true }, { type: 'typing', on: true }, { type: 'typing', on: false }]),
    'customer typing: on at once and again after 3 s, then off', cs.sent.slice(typingFrom));
  cs.hub({ type: 'message', conversation: C, seq: 1, from: 'system', id: 's1', text: 'Anna from Support has joined the conversation.', event: 'agent_joined', agent: 'anna', name: 'Anna' });
  cs.hub({ type: 'typing', conversation: C, from: 'agent', name: 'Anna', on: true });
  cs.hub({ type: 'message', conversation: C, seq: 2, from: 'agent', id: 'a1', text: 'Hello', name: 'Anna' });
  const [joined, typing, said] = got;
  expect(joined?.event === 'agent_joined' && joined?.name === 'Anna', 'a system event carries its event and agent', joined);
  expect(typing?.type === 'typing' && typing?.name === 'Anna' && typing?.on === true, 'the agent\'s typing is reported', typing);
  expect(said?.from === 'agent' && said?.name === 'Anna' && said?.text === 'Hello', 'an agent\'s message carries the name', said);

  // Refusals worth another try keep the message, same id: after the user's message rate's
  // `retry_after_ms`, and after an accepted `refresh` for an expired token.
  const errors = [];
  customer.addEventListener('error', (e) => errors.push(e.detail));
  const fast = customer.send('Too fast');
  cs.hub({ type: 'error', code: 'rate_limited', id: fast, retry_after_ms: 50, message: 'slow down' });
  expect(errors.at(-1)?.retry === true, 'rate_limited with an id is retried', errors.at(-1));
  await tick(150);
  expect(cs.sent.filter((f) => f.id === fast).length === 2, 'resent with the same id after retry_after_ms', cs.sent.filter((f) => f.id === fast));
  cs.hub({ type: 'ack', id: fast, seq: 3 });
  customer.close();

  let tokens = 0;
  const renewing = new FengdaClient({
    tenant: 'demo', user: 'alice', base: location.origin, WebSocket: FakeSocket, storage: null,
    getToken: async () => `token-${++tokens}`,
  });
  const sockets = FakeSocket.all.length;
  renewing.connect();
  const rs = await nextSocket(sockets + 1);
  rs.hub({ type: 'ready', conversation: C, seq: 3, epoch: 'e1' });
  const late = renewing.send('After exp');
  rs.hub({ type: 'error', code: 'token_expired', id: late, message: 'expired' });
  for (let i = 0; i < 100 && !rs.sent.some((f) => f.type === 'refresh'); i++) await tick(5);
  expect(rs.sent.some((f) => f.type === 'refresh' && f.token === 'token-2'), 'token_expired on a message sends a refresh', rs.types());
  rs.hub({ type: 'refreshed', exp: 0 });
  expect(rs.sent.filter((f) => f.id === late).length === 2, 'then resends the message, same id', rs.sent.filter((f) => f.id === late));

  // 4430: the user's conversation cap counts over an hour; the reconnect waits the longest backoff.
  const statuses = [];
  renewing.addEventListener('status', (e) => statuses.push(e.detail));
  rs.drop(4430);
  const waiting = statuses.find((s) => s.status === 'reconnecting');
  expect(waiting?.delay >= 5000, 'after 4430 the reconnect waits at least half the longest backoff', waiting);
  renewing.close();

  // A reloaded widget asks for the whole conversation it remembers (conversation, after=0, epoch);
  // one whose conversation was never stored lets the hub choose.
  const storage = new Map();
  const store = { getItem: (k) => storage.get(k) ?? null, setItem: (k, v) => storage.set(k, v), removeItem: (k) => storage.delete(k) };
  store.setItem('fengda:demo:alice', JSON.stringify({ conversation: C, epoch: 'e1', seq: 3 }));
  const reloaded = new FengdaClient({ tenant: 'demo', user: 'alice', base: location.origin, WebSocket: FakeSocket, storage: store, replayHistory: true });
  const opened = FakeSocket.all.length;
  reloaded.connect();
  const again = await nextSocket(opened + 1);
  const asked = new URL(again.url).searchParams;
  expect(asked.get('conversation') === C && asked.get('after') === '0' && asked.get('epoch') === 'e1',
    'a reload with replayHistory names the conversation with after=0 and its epoch', again.url);
  again.hub({ type: 'ready', conversation: C, seq: 3, epoch: 'e1' });
  for (const seq of [1, 2, 3]) again.hub({ type: 'message', conversation: C, seq, from: 'customer', id: `m${seq}`, text: 'hi' });
  expect(reloaded.lastSeq === 3, 'the replay brings lastSeq back', reloaded.lastSeq);
  reloaded.close();
  // A log that kept only its latest events (`conversation.log_cap`): the replay starts above
  // `after` + 1, the events before it are gone, and the client resumes after the last it got.
  store.setItem('fengda:demo:alice', JSON.stringify({ conversation: C, epoch: 'e1', seq: 10 }));
  const trimmed = new FengdaClient({ tenant: 'demo', user: 'alice', base: location.origin, WebSocket: FakeSocket, storage: store, replayHistory: true });
  const beforeTrim = FakeSocket.all.length;
  trimmed.connect();
  const cut = await nextSocket(beforeTrim + 1);
  cut.hub({ type: 'ready', conversation: C, seq: 12, epoch: 'e1' });
  for (const seq of [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]) cut.hub({ type: 'message', conversation: C, seq, from: 'customer', id: `m${seq}`, text: 'hi' });
  expect(trimmed.lastSeq === 12, 'a replay of a trimmed log brings lastSeq to its end', trimmed.lastSeq);
  cut.drop(4000);
  const next = await nextSocket(beforeTrim + 2);
  expect(new URL(next.url).searchParams.get('after') === '12', 'and the next socket resumes after it', next.url);
  trimmed.close();
  store.setItem('fengda:demo:alice', JSON.stringify({ conversation: C, epoch: 'e1', seq: 0, stored: false }));
  const fresh = new FengdaClient({ tenant: 'demo', user: 'alice', base: location.origin, WebSocket: FakeSocket, storage: store, replayHistory: true });
  const beforeFresh = FakeSocket.all.length;
  fresh.connect();
  const unnamed = await nextSocket(beforeFresh + 1);
  expect(!new URL(unnamed.url).searchParams.has('conversation'), 'a conversation never stored is not named', unnamed.url);
  fresh.close();
  return problems;
}

const browser = await chromium.launch({ executablePath, args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run'], timeout: 20_000 });
try {
  const page = await browser.newPage();
  const pageErrors = [];
  page.on('pageerror', (err) => pageErrors.push(err.message));
  // Any same-origin page without a policy against module imports; the console's own CSP allows
  // 'self' scripts too, but /healthz keeps the page free of the console's own socket.
  await page.goto(`${baseUrl}/healthz`);
  const problems = await page.evaluate(checks);
  if (pageErrors.length) problems.push(`uncaught: ${pageErrors.join(' | ')}`);
  if (problems.length) fail(`${problems.length} agent API check(s) failed:\n  ${problems.join('\n  ')}`);
  console.log('PASS: the agent API keeps the list, transcripts, ownership, typing and the outbox as the protocol says');
  console.log('agent-client: 1 passed, 0 failed');
} finally {
  await browser.close();
}
