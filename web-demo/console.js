// The Fengda agent console: wires FengdaAgent (client.js) to console.html. The live list on the
// left, the watched conversation on the right. All text from the hub is inserted with
// textContent, never as HTML.
//
//   /console?tenant=demo&user=anna&name=Anna   (demo mode: the token comes from /demo/token)

import { FengdaAgent } from './client.js';

const $ = (selector) => document.querySelector(selector);
const list = $('#conversations');
const noConversations = $('#no-conversations');
const count = $('#conversation-count');
const view = $('#view');
const placeholder = $('#placeholder');
const transcriptEl = $('#console-transcript');
const typingLine = $('#typing-line');
const takeButton = $('#take');
const releaseButton = $('#release');
const replyForm = $('#reply-form');
const replyInput = $('#reply');
const replySend = $('#reply-send');
const noteForm = $('#note-form');
const noteInput = $('#note');
const notice = $('#console-notice');

const params = new URLSearchParams(location.search);
const tenant = params.get('tenant') || 'demo';
const user = params.get('user') || 'anna';
const name = params.get('name') || user.charAt(0).toUpperCase() + user.slice(1);

// The hub in demo mode mints short-lived agent tokens; a production console gets them from its
// own backend (with the agent's `name`, and `supervisor` for those who may steal).
const getToken = async () => {
  const query = new URLSearchParams({ tenant, user, role: 'agent', name });
  const response = await fetch(`/demo/token?${query}`, { cache: 'no-store' });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(`demo token: HTTP ${response.status} ${body.error || ''}`.trim());
  }
  return (await response.json()).token;
};

const agent = new FengdaAgent({ tenant, user, getToken });
/** @type {string|null} The conversation shown on the right. */
let selected = null;

// ---- small helpers ------------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** "just now", "42 s", "5 min", "2 h" since a time in ms. */
function since(ms) {
  if (!Number.isFinite(ms)) return '';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 5) return 'just now';
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  return `${Math.floor(s / 3600)} h ago`;
}

function ownerLabel(owner, agentId, agentName) {
  if (owner === 'waiting') return 'Waiting for an agent';
  if (owner === 'agent') return agentId === agent.agent ? 'You' : agentName || agentId || 'An agent';
  return 'Assistant';
}

/** When a summary last saw activity, for sorting the list (most recent first). */
function activity(summary) {
  return Math.max(summary.last?.at ?? 0, summary.customer_at ?? 0);
}

function showNotice(text) {
  notice.textContent = text;
  notice.hidden = !text;
}

// ---- the live list ------------------------------------------------------------------------

function renderList() {
  const summaries = [...agent.conversations.values()].sort((a, b) => activity(b) - activity(a));
  const items = summaries.map((c) => {
    const li = el('li', 'conversation-item');
    li.dataset.conversation = c.conversation;
    li.dataset.owner = c.owner;
    if (c.owner === 'waiting') li.classList.add('waiting');
    if (c.conversation === selected) li.classList.add('selected');
    const button = el('button', 'conversation-button');
    button.type = 'button';
    const top = el('div', 'item-top');
    const who = el('span', 'item-customer', c.customer);
    const dot = el('span', `presence-dot ${c.online ? 'online' : 'offline'}`);
    dot.title = c.online ? 'Customer online' : 'Customer offline';
    const owner = el('span', `owner-badge owner-${c.owner}`, ownerLabel(c.owner, c.agent, c.agent_name));
    if (c.owner === 'waiting' && c.owner_since) owner.title = `Asked for a person ${since(c.owner_since)}`;
    top.append(dot, who, owner);
    const last = el('div', 'item-last');
    if (c.typing) last.append(el('span', 'item-typing', 'typing…'));
    else if (c.last) last.textContent = `${c.last.from === 'customer' ? '' : `${c.last.from}: `}${c.last.text}`;
    const when = el('div', 'item-when');
    when.dataset.customerAt = c.customer_at ?? '';
    when.textContent = c.customer_at ? `customer wrote ${since(c.customer_at)}` : 'customer has not written';
    button.append(top, last, when);
    button.addEventListener('click', () => select(c.conversation));
    li.append(button);
    return li;
  });
  list.replaceChildren(...items);
  noConversations.hidden = items.length > 0;
  count.textContent = items.length ? `(${items.length})` : '';
}

// "customer wrote 12 s ago" ages by itself.
setInterval(() => {
  for (const when of list.querySelectorAll('.item-when')) {
    const at = Number(when.dataset.customerAt);
    if (at) when.textContent = `customer wrote ${since(at)}`;
  }
}, 1000);

// ---- the watched conversation ---------------------------------------------------------------

function select(conversation) {
  if (conversation === selected) return;
  if (selected) {
    agent.typing(selected, false);
    const previous = agent.watched.get(selected);
    // Keep watching what we own (its messages matter); let the rest go.
    if (!(previous && previous.owner === 'agent' && previous.agent === agent.agent)) agent.unwatch(selected);
  }
  selected = conversation;
  transcriptEl.replaceChildren();
  replyInput.value = '';
  noteInput.value = '';
  showNotice('');
  view.hidden = false;
  placeholder.hidden = true;
  view.dataset.conversation = conversation;
  agent.watch(conversation);
  renderList();
  renderView();
}

/** The key of a transcript item: a reply keeps its bubble from its first token to its stored form. */
function itemKey(item) {
  if (item.kind === 'note') return `n:${item.id}`;
  if (item.kind === 'queued') return `q:${item.reply}`;
  if (item.kind === 'streaming') return `r:${item.reply}`;
  if (item.from === 'assistant') return `r:${item.id}`;
  return `e:${item.seq}`;
}

function itemRow(item) {
  if (item.kind === 'note') {
    const row = el('div', 'row from-note');
    const column = el('div', 'column');
    column.append(el('div', 'who', `Note · ${item.name || item.agent || 'agent'} · only agents see this`));
    const bubble = el('div', 'msg note', item.text);
    bubble.dataset.id = item.id;
    column.append(bubble);
    row.append(column);
    return row;
  }
  if (item.kind === 'queued') {
    const row = el('div', 'row from-assistant');
    row.append(el('div', 'caption queue-status', item.position ? `Waiting for the assistant: #${item.position} in line` : 'Waiting for the assistant…'));
    return row;
  }
  const role = item.kind === 'streaming' ? 'assistant' : item.from;
  const row = el('div', `row from-${['customer', 'assistant', 'agent', 'system'].includes(role) ? role : 'system'}`);
  const column = el('div', 'column');
  const label = role === 'customer' ? 'Customer' : role === 'assistant' ? 'Assistant' : role === 'agent' ? (item.name || item.agent || 'Agent') : null;
  if (label) column.append(el('div', 'who', label));
  const bubble = el('div', `msg ${role}`);
  column.append(bubble);
  row.append(column);
  return row;
}

function updateRow(row, item) {
  if (item.kind === 'note' || item.kind === 'queued') {
    if (item.kind === 'queued') {
      row.querySelector('.queue-status').textContent = item.position ? `Waiting for the assistant: #${item.position} in line` : 'Waiting for the assistant…';
    }
    return;
  }
  const bubble = row.querySelector('.msg');
  const text = item.kind === 'streaming' ? item.content : item.text;
  if (bubble.textContent !== text) bubble.textContent = text;
  if (item.kind === 'streaming') {
    bubble.classList.add('streaming');
    bubble.dataset.reply = item.reply;
    return;
  }
  bubble.classList.remove('streaming');
  bubble.dataset.seq = String(item.seq);
  bubble.dataset.id = item.id;
  if (item.from === 'assistant') {
    bubble.dataset.reply = item.id;
    bubble.dataset.done = 'true';
  }
  if (item.event) bubble.dataset.event = item.event;
  const flags = ['interrupted', 'cancelled', 'fallback'].filter((f) => item[f]);
  bubble.classList.toggle('interrupted', flags.length > 0);
  const caption = row.querySelector('.caption');
  const captionText = item.interrupted && !item.fallback ? 'Stopped: an agent took over'
    : item.cancelled ? 'Stopped before it finished'
      : item.fallback ? 'Fallback answer (the NLP service failed)' : '';
  if (captionText && !caption) row.querySelector('.column').append(el('div', 'caption muted', captionText));
  else if (caption) caption.textContent = captionText;
}

function renderTranscript(w) {
  const nearBottom = transcriptEl.scrollHeight - transcriptEl.scrollTop - transcriptEl.clientHeight < 80;
  const existing = new Map([...transcriptEl.children].map((row) => [row.dataset.key, row]));
  const rows = [];
  for (const item of w.items()) {
    const key = itemKey(item);
    let row = existing.get(key);
    if (!row) {
      row = itemRow(item);
      row.dataset.key = key;
    }
    existing.delete(key);
    updateRow(row, item);
    rows.push(row);
  }
  for (const row of existing.values()) row.remove();
  // Re-append in order (moves only what is out of place).
  rows.forEach((row, i) => {
    if (transcriptEl.children[i] !== row) transcriptEl.insertBefore(row, transcriptEl.children[i] || null);
  });
  if (nearBottom) transcriptEl.scrollTop = transcriptEl.scrollHeight;
}

function renderView() {
  const w = selected && agent.watched.get(selected);
  if (!w) return;
  const summary = agent.conversations.get(selected);
  $('#view-customer').textContent = w.customer || summary?.customer || selected;
  const online = $('#view-online');
  online.textContent = w.online ? 'online' : 'offline';
  online.className = `presence ${w.online ? 'online' : 'offline'}`;
  const owner = $('#view-owner');
  owner.textContent = !w.owner ? '' : w.owner === 'waiting' ? 'Waiting for an agent' : `Answered by: ${ownerLabel(w.owner, w.agent, w.agentName)}`;
  owner.className = `owner-badge owner-${w.owner || 'unknown'}`;
  const others = w.viewers.filter((v) => v.agent !== agent.agent).map((v) => v.name || v.agent);
  $('#view-viewers').textContent = others.length ? `Also viewing: ${others.join(', ')}` : '';

  const mine = w.owner === 'agent' && w.agent === agent.agent;
  const otherAgent = w.owner === 'agent' && !mine;
  view.dataset.owner = mine ? 'me' : w.owner || '';
  releaseButton.hidden = !mine;
  takeButton.hidden = mine;
  takeButton.textContent = otherAgent ? `Take over from ${w.agentName || w.agent}` : 'Take over';
  takeButton.disabled = agent.status !== 'open' || (otherAgent && !agent.supervisor);
  takeButton.title = otherAgent && !agent.supervisor ? `${w.agentName || w.agent} answers this conversation` : '';
  replyInput.disabled = !mine;
  replySend.disabled = !mine;
  replyInput.placeholder = mine ? 'Reply to the customer' : 'Take over to reply';
  if (!mine && document.activeElement === replyInput) agent.typing(selected, false);

  const typing = [...w.typing.entries()]
    .filter(([key]) => key !== `agent:${agent.agent}`)
    .map(([, t]) => (t.from === 'customer' ? 'Customer is typing…' : `${t.name} is typing${t.note ? ' a note' : ''}…`));
  typingLine.textContent = typing.join(' · ');
  renderTranscript(w);
}

// ---- wiring ---------------------------------------------------------------------------------

const STATUS_TEXT = { idle: 'Starting…', connecting: 'Connecting…', open: 'Online', reconnecting: 'Reconnecting…', closed: 'Disconnected' };

agent.addEventListener('status', (e) => {
  document.body.dataset.status = e.detail.status;
  $('#status-text').textContent = STATUS_TEXT[e.detail.status] || e.detail.status;
  renderView();
});

agent.addEventListener('ready', (e) => {
  $('#whoami').textContent = `${e.detail.name} · ${tenant}${e.detail.supervisor ? ' · supervisor' : ''}`;
  showNotice('');
});

agent.addEventListener('list', () => renderList());

agent.addEventListener('transcript', (e) => {
  if (e.detail.conversation === selected) {
    if (e.detail.change === 'unwatched') {
      selected = null;
      view.hidden = true;
      placeholder.hidden = false;
      return;
    }
    renderView();
  }
});

const FRIENDLY_ERRORS = {
  not_owner: 'You no longer answer this conversation: nothing was sent.',
  forbidden: 'You are not allowed to do that.',
  too_many_watched: 'You watch too many conversations: close some first.',
  conversation_not_found: 'That conversation no longer exists.',
  token_unavailable: 'Could not get a sign-in token; retrying…',
};

agent.addEventListener('error', (e) => {
  const { code, message, agentName } = e.detail;
  if (code === 'already_owned') showNotice(`${agentName} already answers this conversation.`);
  else showNotice(FRIENDLY_ERRORS[code] || `Error: ${code}${message ? ` — ${message}` : ''}`);
});

takeButton.addEventListener('click', () => {
  const w = agent.watched.get(selected);
  showNotice('');
  agent.take(selected, { steal: w?.owner === 'agent' && w.agent !== agent.agent });
});
releaseButton.addEventListener('click', () => agent.release(selected));

replyForm.addEventListener('submit', (e) => {
  e.preventDefault();
  const text = replyInput.value.trim();
  if (!text || !selected) return;
  agent.message(selected, text);
  replyInput.value = '';
});
replyInput.addEventListener('input', () => agent.typing(selected, replyInput.value.trim() !== ''));
replyInput.addEventListener('blur', () => agent.typing(selected, false));

noteForm.addEventListener('submit', (e) => {
  e.preventDefault();
  const text = noteInput.value.trim();
  if (!text || !selected) return;
  agent.note(selected, text);
  noteInput.value = '';
});
noteInput.addEventListener('input', () => agent.typing(selected, noteInput.value.trim() !== '', { note: true }));
noteInput.addEventListener('blur', () => agent.typing(selected, false));

agent.connect();
agent.list();
