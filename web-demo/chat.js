// The Fengda demo chat widget: wires FengdaClient (client.js) to the page.
// All text from the user or the hub is inserted with textContent, never as HTML.

import { FengdaClient } from './client.js';

const $ = (selector) => document.querySelector(selector);
const transcript = $('#transcript');
const form = $('#composer');
const input = $('#question');
const statusText = $('#status-text');
const reconnectButton = $('#reconnect');
const handoffButton = $('#handoff');
const whoami = $('#whoami');

// ---- who are we ---------------------------------------------------------------------------

function randomUserId() {
  const bytes = new Uint8Array(5);
  crypto.getRandomValues(bytes);
  return `web-${Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('')}`;
}

function persistentUserId() {
  const key = 'fengda-demo:user';
  try {
    let id = localStorage.getItem(key);
    if (!id) {
      id = randomUserId();
      localStorage.setItem(key, id);
    }
    return id;
  } catch {
    return randomUserId(); // storage disabled: a fresh identity per page load
  }
}

const params = new URLSearchParams(location.search);
const tenant = params.get('tenant') || 'demo';
const user = params.get('user') || persistentUserId();

// ---- transcript rendering -----------------------------------------------------------------

const ROLE_LABELS = { assistant: 'Assistant', agent: 'Agent', system: 'System', customer: 'You' };

/** Whether the transcript is scrolled (nearly) to the bottom. */
function nearBottom() {
  return transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 80;
}

/** Runs a DOM change and keeps the transcript pinned to the bottom if it was there. */
function withScroll(change) {
  const stick = nearBottom();
  const result = change();
  if (stick) transcript.scrollTop = transcript.scrollHeight;
  return result;
}

/**
 * Appends a message row and returns its bubble (the `.msg` element, whose textContent is exactly
 * the message text). `name` is the agent's display name, for an agent's message.
 * @param {'customer'|'assistant'|'agent'|'system'} role
 * @param {string} text
 * @param {string} [name]
 */
function addBubble(role, text, name) {
  return withScroll(() => {
    const row = document.createElement('div');
    row.className = `row from-${role}`;
    if (role === 'assistant' || role === 'agent') {
      const avatar = document.createElement('div');
      avatar.className = 'avatar';
      avatar.setAttribute('aria-hidden', 'true');
      avatar.textContent = role === 'agent' ? initial(name || ROLE_LABELS.agent) : 'F';
      row.append(avatar);
    }
    const column = document.createElement('div');
    column.className = 'column';
    if (role === 'agent') {
      const who = document.createElement('div');
      who.className = 'who';
      who.textContent = name || ROLE_LABELS.agent;
      column.append(who);
    }
    const bubble = document.createElement('div');
    bubble.className = `msg ${role}`;
    bubble.textContent = text;
    column.append(bubble);
    row.append(column);
    transcript.append(row);
    return bubble;
  });
}

/** The first letter of a name, for an avatar. */
function initial(name) {
  return (Array.from(name.trim())[0] || '?').toUpperCase();
}

/** Adds a small caption under a bubble (e.g. "Not sent"). */
function setCaption(bubble, text, kind = '') {
  const column = bubble.parentElement;
  let caption = column.querySelector('.caption');
  if (!text) {
    caption?.remove();
    return;
  }
  if (!caption) {
    caption = document.createElement('div');
    column.append(caption);
  }
  caption.className = `caption ${kind}`.trim();
  caption.textContent = text;
}

/** A polite, non-message notice in the transcript (errors, connection news). */
function addNotice(text, kind = 'info') {
  const last = transcript.lastElementChild;
  if (last && last.classList.contains('notice') && last.textContent === text) return; // no repeats
  withScroll(() => {
    const notice = document.createElement('div');
    notice.className = `notice ${kind}`;
    notice.setAttribute('role', kind === 'error' ? 'alert' : 'status');
    notice.textContent = text;
    transcript.append(notice);
  });
}

/**
 * Finds the assistant bubble of a reply, creating it if needed. A new bubble takes the place of
 * the reply's "in line" row, if it had one.
 */
function replyBubble(replyId) {
  for (const el of transcript.querySelectorAll('.msg.assistant[data-reply]')) {
    if (el.dataset.reply === replyId) return el;
  }
  hideTyping();
  const bubble = addBubble('assistant', '');
  bubble.dataset.reply = replyId;
  const waiting = queuedRows.get(replyId);
  if (waiting) {
    waiting.row.replaceWith(bubble.closest('.row'));
    dropQueued(replyId);
  }
  return bubble;
}

/** Shows a finished reply (live or replayed) in place of whatever streamed of it. */
function finishReply(replyId, text, { fallback, cancelled, interrupted }) {
  const bubble = replyBubble(replyId);
  withScroll(() => {
    bubble.textContent = text;
    bubble.classList.remove('streaming');
    bubble.dataset.done = 'true';
    if (fallback) {
      bubble.classList.add('fallback');
      setCaption(bubble, 'Automated answer — an agent can follow up if you need more help.', 'muted');
    } else if (cancelled) {
      bubble.classList.add('cancelled');
      setCaption(bubble, text ? 'This answer was stopped before it finished.' : 'Not answered — please ask again.', 'muted');
    } else if (interrupted) {
      // Stopped without a fallback: a person from the team took over the conversation.
      bubble.classList.add('cancelled');
      setCaption(bubble, 'A person from our team is taking over from here.', 'muted');
    }
  });
}

// "Assistant is typing" dots, shown between a question and the first token of the answer.
let typingRow = null;
let typingTimer = null;

/** A row with the typing dots, and room under them for a status line. */
function typingIndicator() {
  const row = document.createElement('div');
  row.className = 'row from-assistant typing';
  row.setAttribute('aria-label', 'Assistant is typing');
  const avatar = document.createElement('div');
  avatar.className = 'avatar';
  avatar.setAttribute('aria-hidden', 'true');
  avatar.textContent = 'F';
  const column = document.createElement('div');
  column.className = 'column';
  const dots = document.createElement('div');
  dots.className = 'dots';
  dots.append(...[0, 1, 2].map(() => document.createElement('span')));
  column.append(dots);
  row.append(avatar, column);
  return row;
}

function showTyping() {
  if (typingRow) return;
  withScroll(() => {
    typingRow = typingIndicator();
    transcript.append(typingRow);
  });
  clearTimeout(typingTimer);
  typingTimer = setTimeout(hideTyping, 30000);
}

function hideTyping() {
  clearTimeout(typingTimer);
  typingRow?.remove();
  typingRow = null;
}

// "Anna is typing…", while the agent answering the conversation types (the hub's `typing`). It
// goes away on `on: false`, on the agent's message, and by itself a few seconds after the last
// `on: true` (the agent repeats it every 3 s while typing), so it can never stick.
let agentTypingRow = null;
let agentTypingTimer = null;
const AGENT_TYPING_SHOWN_MS = 6000;

function showAgentTyping(name) {
  const label = `${name || ROLE_LABELS.agent} is typing…`;
  if (!agentTypingRow) {
    agentTypingRow = typingIndicator();
    agentTypingRow.classList.replace('from-assistant', 'from-agent');
    agentTypingRow.id = 'agent-typing';
    agentTypingRow.querySelector('.avatar').textContent = initial(name || ROLE_LABELS.agent);
    const caption = document.createElement('div');
    caption.className = 'caption typing-label';
    agentTypingRow.querySelector('.column').append(caption);
    withScroll(() => transcript.append(agentTypingRow));
  }
  agentTypingRow.setAttribute('aria-label', label);
  agentTypingRow.querySelector('.typing-label').textContent = label;
  clearTimeout(agentTypingTimer);
  agentTypingTimer = setTimeout(hideAgentTyping, AGENT_TYPING_SHOWN_MS);
}

function hideAgentTyping() {
  clearTimeout(agentTypingTimer);
  agentTypingRow?.remove();
  agentTypingRow = null;
}

// Questions waiting for a free slot at the NLP service (the hub sends `queued`): reply id →
// {row, status, timer}. The row is the typing dots with the place in line under them; the
// answer's bubble replaces it at the first token (see replyBubble). The status line is outside
// any `.msg`, so a bubble's text stays exactly the answer.
const queuedRows = new Map();
/** Drop a waiting row that heard nothing for this long (the hub bounds the wait itself). */
const QUEUED_ROW_TIMEOUT_MS = 120000;

function queuedText(position) {
  if (position === 1) return "You're next in line…";
  if (position > 1) return `You're #${position} in line…`;
  return 'Waiting for a free assistant…';
}

function showQueued(replyId, position) {
  let waiting = queuedRows.get(replyId);
  if (!waiting) {
    let row = typingRow;
    if (row) {
      // The dots of the question just sent: that question is the one waiting.
      clearTimeout(typingTimer);
      typingRow = null;
    } else {
      row = typingIndicator();
      withScroll(() => transcript.append(row));
    }
    row.dataset.queuedReply = replyId;
    const status = document.createElement('div');
    status.className = 'caption queue-status';
    row.querySelector('.column').append(status);
    waiting = { row, status, timer: null };
    queuedRows.set(replyId, waiting);
  }
  withScroll(() => {
    waiting.status.textContent = queuedText(position);
  });
  clearTimeout(waiting.timer);
  waiting.timer = setTimeout(() => dropQueued(replyId), QUEUED_ROW_TIMEOUT_MS);
}

function dropQueued(replyId) {
  const waiting = queuedRows.get(replyId);
  if (!waiting) return;
  clearTimeout(waiting.timer);
  waiting.row.remove();
  queuedRows.delete(replyId);
}

function dropAllQueued() {
  for (const replyId of [...queuedRows.keys()]) dropQueued(replyId);
}

// ---- client wiring ------------------------------------------------------------------------

let client;
try {
  // The hub in demo mode mints short-lived tokens; a production page gets them from its own backend.
  const getToken = async () => {
    const query = new URLSearchParams({ tenant, user });
    const response = await fetch(`/demo/token?${query}`, { cache: 'no-store' });
    if (!response.ok) throw new Error(`demo token: HTTP ${response.status}`);
    return (await response.json()).token;
  };
  client = new FengdaClient({ tenant, user, replayHistory: true, getToken });
} catch (err) {
  addNotice(`This chat link is not valid (${err.message.replace(/^FengdaClient: /, '')}).`, 'error');
  statusText.textContent = 'Not connected';
  throw err;
}
/** Customer bubbles by client message id. */
const sentBubbles = new Map();

/**
 * Whether a person (or the wait for one) answers the conversation instead of the assistant, from
 * the `system` events: then a question gets no "assistant is typing" dots.
 */
let withPerson = false;
const PERSON_EVENTS = { agent_joined: true, waiting: true, agent_left: false, assistant_back: false };

const STATUS_TEXT = {
  idle: 'Starting…',
  connecting: 'Connecting…',
  open: 'Online — we usually answer right away',
  reconnecting: 'Reconnecting…',
  closed: 'Disconnected',
};

client.addEventListener('status', (e) => {
  const { status } = e.detail;
  document.body.dataset.status = status;
  statusText.textContent = STATUS_TEXT[status] || status;
  reconnectButton.hidden = status !== 'closed';
  handoffButton.disabled = status !== 'open' || withPerson;
  if (status !== 'open') {
    // `queued` frames are not replayed: a reconnect shows the answer when it comes.
    hideTyping();
    hideAgentTyping();
    dropAllQueued();
  }
});

client.addEventListener('ready', (e) => {
  whoami.textContent = `tenant ${tenant} · user ${user} · conversation ${e.detail.conversation}`;
});

// The hub no longer has the conversation's earlier messages (its history was lost): drop them from
// the transcript and say so. Messages still waiting for their ack were resent into the new history,
// so they stay, after the note.
client.addEventListener('reset', () => {
  const waiting = new Set([...sentBubbles.values()].map((bubble) => bubble.closest('.row')));
  for (const el of [...transcript.children]) {
    if (el.classList.contains('welcome') || el === typingRow || waiting.has(el)) continue;
    el.remove();
  }
  dropAllQueued();
  addNotice('Earlier messages are no longer available.', 'info');
  withScroll(() => {
    for (const row of waiting) if (row) transcript.append(row);
    if (typingRow) transcript.append(typingRow);
  });
});

client.addEventListener('ack', (e) => {
  const bubble = sentBubbles.get(e.detail.id);
  if (!bubble) return;
  bubble.classList.remove('pending');
  bubble.dataset.seq = String(e.detail.seq);
  setCaption(bubble, '');
  sentBubbles.delete(e.detail.id);
});

// The hub is busy: show the waiting question's place in line until its answer starts.
client.addEventListener('queued', (e) => {
  const { reply, position } = e.detail;
  const answered = [...transcript.querySelectorAll('.msg.assistant[data-reply]')].some((el) => el.dataset.reply === reply);
  if (!answered) showQueued(reply, position);
});

client.addEventListener('delta', (e) => {
  const { reply, content } = e.detail;
  const bubble = replyBubble(reply);
  if (bubble.dataset.done === 'true') return;
  withScroll(() => {
    bubble.classList.add('streaming');
    bubble.textContent = content;
  });
});

client.addEventListener('done', (e) => {
  hideTyping();
  finishReply(e.detail.reply, e.detail.text, e.detail);
});

client.addEventListener('message', (e) => {
  const { from, id, text, seq } = e.detail;
  if (from === 'assistant') {
    finishReply(id, text, e.detail);
    return;
  }
  const role = ['customer', 'agent', 'system'].includes(from) ? from : 'system';
  if (role === 'agent') {
    hideTyping();
    hideAgentTyping();
  }
  if (role === 'system' && e.detail.event in PERSON_EVENTS) {
    withPerson = PERSON_EVENTS[e.detail.event];
    handoffButton.disabled = withPerson || client.status !== 'open';
    if (withPerson) hideTyping();
  }
  const bubble = addBubble(role, text, e.detail.name);
  bubble.dataset.seq = String(seq);
  bubble.dataset.id = id;
  if (e.detail.event) bubble.dataset.event = e.detail.event;
  // The agent's typing row stays the last row while it is shown.
  if (agentTypingRow) withScroll(() => transcript.append(agentTypingRow));
});

client.addEventListener('typing', (e) => {
  if (e.detail.on) showAgentTyping(e.detail.name);
  else hideAgentTyping();
});

const FRIENDLY_ERRORS = {
  text_too_long: 'That message is too long — please shorten it and try again.',
  frame_too_big: 'That message is too long — please shorten it and try again.',
  empty_text: 'Please type a message first.',
  too_many_pending: 'You are sending messages faster than we can answer — please wait a moment.',
  rate_limited: 'You are sending messages very fast — we will send this one in a moment.',
  token_expired: 'Your session is being renewed — we will send this in a moment.',
  too_many_conversations: 'You have started many conversations recently — please try again later.',
  unavailable: 'Our assistant is briefly unavailable — we will keep trying.',
  conversation_not_found: 'This conversation is no longer available — continuing in a new one.',
};

client.addEventListener('error', (e) => {
  const { code, message, id, retry } = e.detail;
  hideTyping();
  if (id && sentBubbles.has(id)) {
    const bubble = sentBubbles.get(id);
    if (retry) {
      // Still queued: the client sends it again with the same id, and an ack may follow.
      setCaption(bubble, 'Not delivered yet — retrying…', 'muted');
    } else {
      bubble.classList.remove('pending');
      bubble.classList.add('failed');
      setCaption(bubble, 'Not sent', 'error');
      sentBubbles.delete(id);
    }
  }
  const friendly = FRIENDLY_ERRORS[code];
  addNotice(friendly || `Sorry, something went wrong${message ? `: ${message}` : '.'}`, 'error');
  if (!friendly && code) console.warn('Fengda error frame', code, message);
});

// ---- composer -----------------------------------------------------------------------------

function send(text) {
  const body = text.trim();
  if (!body) return;
  const id = client.send(body);
  const bubble = addBubble('customer', body);
  bubble.dataset.id = id;
  if (client.isPending(id)) {
    bubble.classList.add('pending');
    if (client.status !== 'open') setCaption(bubble, 'Will send when reconnected…', 'muted');
    sentBubbles.set(id, bubble);
  }
  if (!withPerson) showTyping();
  transcript.scrollTop = transcript.scrollHeight;
}

form.addEventListener('submit', (e) => {
  e.preventDefault();
  send(input.value);
  input.value = '';
  input.focus();
});

// Enter while an input method (e.g. Chinese pinyin) is composing confirms the text, not sends.
input.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && (e.isComposing || e.keyCode === 229)) e.preventDefault();
});

for (const chip of document.querySelectorAll('#suggestions .chip')) {
  chip.addEventListener('click', () => send(chip.textContent));
}

reconnectButton.addEventListener('click', () => client.connect());

// Ask for a person: the hub answers with a `system` `waiting` message (or nothing, if a person
// already answers).
handoffButton.addEventListener('click', () => {
  if (client.handoff()) handoffButton.disabled = true;
});

// Tell the agent we are typing: on every keystroke while there is text, off when the input is
// emptied or loses focus (sending stops it too).
input.addEventListener('input', () => client.typing(input.value.trim() !== ''));
input.addEventListener('blur', () => client.typing(false));

client.connect();
input.focus();
