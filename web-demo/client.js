// Fengda browser client — a small, dependency-free WebSocket client for the
// Fengda realtime hub. Copy this file into your own site if you like; it has
// no imports and works in every current browser.
//
// Customers (the chat widget):
//
//   import { FengdaClient } from '/client.js';
//   const client = new FengdaClient({ tenant: 'demo', user: 'alice' });
//   client.addEventListener('delta', (e) => render(e.detail.reply, e.detail.content));
//   client.addEventListener('done', (e) => finish(e.detail.reply, e.detail.text));
//   client.connect();
//   client.send('Tell me about the Gold Card');
//
// Contact-centre agents (the console, docs/protocol.md §14):
//
//   import { FengdaAgent } from '/client.js';
//   const agent = new FengdaAgent({ tenant: 'demo', user: 'anna', getToken });
//   agent.addEventListener('list', () => renderList(agent.conversations));
//   agent.addEventListener('transcript', (e) => renderTranscript(e.detail.transcript));
//   agent.connect();
//   agent.list();
//   agent.watch(conversationId);
//
// Both share one connection (the `Connection` class below), which takes care of:
//   * reconnecting with exponential backoff and jitter (capped at ~10 s), to
//     whichever hub node the load balancer picks;
//   * fetching a fresh token before every connection (`getToken`) and
//     answering `token.expiring` with `refresh`;
//   * queueing messages while offline and resending unacknowledged ones with
//     the same id (the hub acknowledges a resent id with its original seq and
//     never stores it twice), also after `unavailable` (the hub's store is
//     down) and `too_many_pending`;
//   * an application-level ping every 25 s, which also detects dead sockets.
//
// The customer client also resumes its conversation after a reconnect
// (`conversation` + `after` + `epoch`), de-duplicates replayed events by seq
// and by reply id, notices lost history (`history_lost`, reported as a
// `reset` event) and remembers the conversation id, its epoch and the last
// seq in sessionStorage. The agent client lists again and watches every
// watched conversation again, after the last seq it saw, on each reconnect.

/**
 * Close codes used by the hub.
 * @readonly
 * @enum {number}
 */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  POLICY: 1008,
  TOO_BIG: 1009,
  INTERNAL: 1011,
  CONVERSATION_NOT_FOUND: 4004,
  SLOW_CONSUMER: 4008,
  IDLE_TIMEOUT: 4010,
  BAD_REQUEST: 4400,
  TOO_MANY_SOCKETS: 4409,
  RATE_LIMITED: 4429,
  TOO_MANY_CONVERSATIONS: 4430,
  UNAVAILABLE: 4503,
  TOKEN_EXPIRED: 4001,
});

/** Tenant and user ids the hub accepts (it refuses others before the upgrade). */
export const ID_PATTERN = /^[A-Za-z0-9._:@-]{1,128}$/;

/** Conversation ids: only the hub's own (it refuses others before the upgrade). */
export const CONVERSATION_ID_PATTERN = /^[0-9a-f]{32}$/;

/** Close codes after which the client stays closed instead of reconnecting. */
const FINAL_CLOSE_CODES = new Set([CloseCode.NORMAL, CloseCode.POLICY, CloseCode.BAD_REQUEST]);

/**
 * Connection status, reported by the `status` event.
 * - `idle`: constructed, `connect()` not called yet
 * - `connecting`: first connection attempt in progress
 * - `open`: the hub said `ready`; messages flow
 * - `reconnecting`: the connection dropped; a new attempt is scheduled or running
 * - `closed`: stopped for good (`close()` was called, or the hub refused us)
 * @typedef {'idle'|'connecting'|'open'|'reconnecting'|'closed'} FengdaStatus
 */

/**
 * @typedef {object} FengdaClientOptions
 * @property {string} tenant  Tenant id.
 * @property {string} user    End-user id.
 * @property {string} [url]   Full WebSocket endpoint, e.g. `wss://chat.example.com/ws`.
 * @property {string} [base]  HTTP(S) or WS(S) origin of the hub, e.g. `https://chat.example.com`;
 *                            `/ws` is appended. Default: the page's own origin.
 * @property {boolean} [replayHistory=false]  On the first connection after construction, ask the
 *                            hub for the whole stored conversation (`after=0`) instead of resuming
 *                            after the remembered seq. Useful when a reloaded page wants to redraw
 *                            the transcript.
 * @property {Storage|null} [storage=sessionStorage]  Where the conversation id, its epoch and the
 *                            last seq are remembered; `null` to not remember anything.
 * @property {number} [pingIntervalMs=25000]  Application-level ping period.
 * @property {number} [pongTimeoutMs=10000]   A socket that stays silent this long after a ping
 *                            is considered dead and replaced.
 * @property {number} [minBackoffMs=500]   First reconnect delay (before jitter).
 * @property {number} [maxBackoffMs=10000] Reconnect delay cap.
 * @property {() => Promise<string>} [getToken]  Returns a fresh signed token for this tenant and
 *                            user (from your backend). Called before every connection, and
 *                            again on `token.expiring` to send `refresh`; the socket then carries
 *                            `?token=` instead of `tenant`/`user` (required when the hub runs in
 *                            jwt mode).
 * @property {typeof WebSocket} [WebSocket]  WebSocket implementation (for tests or Node).
 */

/**
 * Events (all are `CustomEvent`s; the payload is in `event.detail`):
 * - `status`  `{status, attempt?, delay?, code?, reason?}` — see {@link FengdaStatus}.
 * - `ready`   `{conversation, seq, epoch}` — the hub accepted the connection. `epoch` identifies
 *             the conversation's log (`null` from a hub that does not send it).
 * - `ack`     `{id, seq}` — a message you sent is stored. Fired once per id.
 * - `queued`  `{conversation, reply, position}` — the hub is busy: the question that `reply` will
 *             answer waits for a free slot at the NLP service. `position` is its estimated place
 *             in line (1 = next; `null` if the hub sent none). Fired again whenever the place
 *             changes, never after the reply's first `delta`; a question answered at once gets none.
 * - `delta`   `{conversation, reply, index, text, content}` — one streamed token of an assistant
 *             reply; `content` is the reply text so far. Duplicate indexes are dropped.
 * - `done`    `{conversation, reply, seq, text, fallback, interrupted, cancelled, replayed}` — a
 *             reply is complete; `text` is the authoritative whole reply: show it in place of the
 *             streamed one. Also fired (with `replayed: true`) when a reply whose stream was cut
 *             off by a reconnect comes back as a replayed message (finished while the socket was
 *             away, or cancelled because no socket came back in time: `cancelled: true`, `text`
 *             is what had streamed).
 * - `message` `{conversation, seq, from, id, text, fallback, interrupted, cancelled, name?, event?,
 *             agent?}` — any other durable event: replayed history, or something said on another
 *             socket of the conversation (agent, system, assistant, or the same customer on another
 *             device). The three flags describe assistant replies and are false otherwise. An
 *             agent's message has the agent's display `name`; a `system` one its `event`
 *             (`agent_joined`, `agent_left`, `waiting`, `assistant_back`) and, when it names an
 *             agent, `agent` and `name`.
 * - `typing`  `{conversation, from: 'agent', name, on}` — the agent answering the conversation
 *             started (`on: true`, repeated while typing) or stopped typing. Stop showing it on
 *             `on: false`, on that agent's next message, or a few seconds after the last `on: true`.
 * - `error`   `{code, message, id?, retry?}` — an error frame from the hub, or a client-side
 *             problem such as `frame_too_big`. With an `id` it is about that message, which was
 *             not stored. With `retry: true` the message stays queued and is resent with the same
 *             id by itself (`unavailable`, `too_many_pending`: after 2 s; `conversation_not_found`:
 *             in the new conversation after the reconnect), so an `ack` may still follow; without
 *             it the message was refused for good and gets no `ack`. `history_lost` is not
 *             reported here but as `reset`.
 * - `reset`   `{conversation, seq, epoch, previousEpoch, reason}` — the hub no longer has the
 *             conversation's earlier events (`reason: 'history_lost'`: its log was lost and
 *             recreated under a new epoch; `reason: 'rewound'`: the log is behind what this client
 *             already saw, e.g. after a Redis failover). The client has forgotten its last seq
 *             and the replies it saw and continues from `seq`; unacknowledged messages are
 *             resent as usual. Clear or mark the transcript shown so far: those events will never
 *             be replayed.
 * - `conversation` `{conversation, previous}` — the conversation id changed (new conversation,
 *             or the old one was not found on the hub).
 * @typedef {never} FengdaEvents
 */

/** Makes a unique id, also outside secure contexts where `crypto.randomUUID` is missing. */
function newId() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === 'function') return c.randomUUID();
  const b = new Uint8Array(16);
  if (c && typeof c.getRandomValues === 'function') c.getRandomValues(b);
  else for (let i = 0; i < 16; i++) b[i] = Math.floor(Math.random() * 256);
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** Returns sessionStorage when it is usable (it throws in some privacy modes). */
function defaultStorage() {
  try {
    const s = globalThis.sessionStorage;
    const probe = '__fengda_probe__';
    s.setItem(probe, '1');
    s.removeItem(probe);
    return s;
  } catch {
    return null;
  }
}

/** Keeps a Set from growing without bound (oldest entries go first). */
function rememberBounded(set, value, limit = 500) {
  set.add(value);
  if (set.size > limit) set.delete(set.values().next().value);
}

/** The message text the hub refuses as `empty_text`: only white space and zero-width characters. */
function checkedText(text, what) {
  const body = String(text ?? '').trim();
  if (/^[\s\u0085\u180e\u200b-\u200d\u2060\ufeff]*$/u.test(body)) throw new TypeError(`${what}: text is empty`);
  return body;
}

/**
 * Error codes after which a message is resent (same id) after RETRY_DELAY_MS, or after the
 * frame's `retry_after_ms` when it has one (a user's message rate).
 */
const RETRYABLE_ERRORS = new Set(['unavailable', 'too_many_pending', 'rate_limited']);
const RETRY_DELAY_MS = 2000;
/**
 * Error codes after which a customer message stays queued for the next connection: the hub closes
 * with 4004 and the message is resent, same id, in the conversation the reconnect gets.
 */
const REQUEUE_ERRORS = new Set(['conversation_not_found']);

/** How often a typist repeats `typing` `on: true` (the hub forgets it after about 4 s). */
export const TYPING_REPEAT_MS = 3000;
/** A typing indicator heard nothing of for this long is dropped (the hub's own expiry is ~4 s). */
const TYPING_SHOWN_MS = 6000;

/**
 * The durable events seen of one conversation: the highest seq below which every event has been
 * seen (seqs are gap-free, so this is what a reconnect resumes `after`), and the early ones above it.
 */
class SeqWindow {
  constructor(lastSeq = 0) {
    this.lastSeq = lastSeq;
    this.seenAbove = new Set();
  }

  /** Starts again from `seq` (nothing above it seen). */
  reset(seq = 0) {
    this.lastSeq = seq;
    this.seenAbove.clear();
  }

  /** Records a durable seq; returns false if it was seen already. */
  mark(seq) {
    if (!Number.isInteger(seq) || seq <= 0) return true; // no seq: cannot de-duplicate by it
    if (seq <= this.lastSeq || this.seenAbove.has(seq)) return false;
    this.seenAbove.add(seq);
    while (this.seenAbove.has(this.lastSeq + 1)) {
      this.lastSeq += 1;
      this.seenAbove.delete(this.lastSeq);
    }
    if (this.seenAbove.size > 1000) {
      // A hole that never fills (should not happen: seqs are gap-free). Give up on it.
      this.lastSeq = Math.min(...this.seenAbove) - 1;
      this.mark(this.lastSeq + 1);
    }
    return true;
  }
}

/** Assistant replies as they stream: tokens by index, and the ids of the finished ones. */
class ReplyStreams {
  constructor() {
    /** reply id → array of tokens by index */
    this.streams = new Map();
    this.done = new Set();
  }

  clear() {
    this.streams.clear();
    this.done.clear();
  }

  /** Whether the reply has streamed or finished (its stored form replaces what was shown). */
  known(reply) {
    return this.streams.has(reply) || this.done.has(reply);
  }

  /**
   * Adds one `reply.delta`; returns `{index, text, content}` (`content`: the contiguous text so
   * far), or null for a duplicate token or a finished reply.
   */
  delta(f) {
    if (this.done.has(f.reply)) return null;
    let tokens = this.streams.get(f.reply);
    if (!tokens) this.streams.set(f.reply, (tokens = []));
    const index = Number.isInteger(f.index) ? f.index : tokens.length;
    if (tokens[index] !== undefined) return null; // duplicate token
    tokens[index] = String(f.text ?? '');
    let content = '';
    for (const t of tokens) {
      if (t === undefined) break; // hole: show the contiguous prefix only
      content += t;
    }
    return { index, text: tokens[index], content };
  }

  /** Marks a reply finished; returns false if it already was. */
  finish(reply) {
    if (this.done.has(reply)) return false;
    rememberBounded(this.done, reply);
    this.streams.delete(reply);
    return true;
  }
}

/** How a reply ended, from a `reply.done` or a replayed `message` (absent flags are false). */
function replyFlags(f) {
  return { fallback: f.fallback === true, interrupted: f.interrupted === true, cancelled: f.cancelled === true };
}

/** The fields of a durable `message` event that are not about replies (agent and system events). */
function speakerFields(f) {
  const out = {};
  if (typeof f.name === 'string') out.name = f.name;
  if (typeof f.event === 'string') out.event = f.event;
  if (typeof f.agent === 'string') out.agent = f.agent;
  if (Number.isInteger(f.at)) out.at = f.at;
  return out;
}

/**
 * One socket to the hub, kept open: connecting, backoff, tokens, heartbeat and the outbox of
 * messages waiting for their acknowledgement. {@link FengdaClient} (a customer) and
 * {@link FengdaAgent} (an agent) build their protocol on it; a subclass gives the URL of the next
 * socket (`socketUrl`) and handles the frames (`onReady`, `onAppFrame`).
 * @extends EventTarget
 */
class Connection extends EventTarget {
  constructor(options, defaults = {}) {
    super();
    const { tenant, user } = options || {};
    if (!tenant || !user) throw new TypeError(`${new.target.name}: tenant and user are required`);
    for (const [name, value] of [['tenant', tenant], ['user', user]]) {
      // The hub answers a bad id with HTTP 400 before the WebSocket opens, which a browser only
      // sees as an anonymous failure (close code 1006): refuse it here instead of retrying forever.
      if (!ID_PATTERN.test(String(value))) {
        throw new TypeError(`${new.target.name}: ${name} must be 1-128 characters of A-Z a-z 0-9 . _ : @ -`);
      }
    }
    this.tenant = String(tenant);
    this.user = String(user);
    this.endpoint = Connection.endpointFrom(options);
    this.options = {
      pingIntervalMs: 25000,
      pongTimeoutMs: 10000,
      minBackoffMs: 500,
      maxBackoffMs: 10000,
      ...defaults,
      ...options,
    };
    this.WebSocket = options.WebSocket || globalThis.WebSocket;

    /** @type {FengdaStatus} */
    this.status = 'idle';
    /** Frames with an `id` not yet acknowledged, in send order: id → frame. */
    this.outbox = new Map();
    this.ws = null;
    this.attempt = 0;
    this.stopped = true;
    this.reconnectTimer = null;
    this.pingTimer = null;
    this.pongTimer = null;
    /** Messages refused with `token_expired`, resent once a `refresh` is accepted. */
    this.afterRefresh = new Set();
    /** The token of the current or next connection (with `getToken`). */
    this.token = null;
    this.sentOnSocket = []; // ids written to the current socket and not yet acked

    this.onOnline = () => {
      if (this.status === 'reconnecting' && this.reconnectTimer) {
        clearTimeout(this.reconnectTimer);
        this.reconnectTimer = null;
        this.open();
      }
    };
  }

  /**
   * Resolves the WebSocket endpoint (without query string) from `url` / `base` / the page origin.
   * @param {{url?: string, base?: string}} options
   * @returns {string}
   */
  static endpointFrom({ url, base } = {}) {
    if (url) return String(url);
    const origin = base || (globalThis.location && globalThis.location.origin);
    if (!origin) throw new TypeError('FengdaClient: give `url` or `base` outside a browser page');
    const u = new URL(origin);
    if (u.protocol === 'http:') u.protocol = 'ws:';
    else if (u.protocol === 'https:') u.protocol = 'wss:';
    u.pathname = `${u.pathname.replace(/\/+$/, '')}/ws`;
    u.search = '';
    u.hash = '';
    return u.toString();
  }

  /** Starts connecting (and keeps reconnecting until {@link close}). Safe to call twice. */
  connect() {
    if (!this.stopped) return;
    this.stopped = false;
    this.attempt = 0;
    globalThis.addEventListener?.('online', this.onOnline);
    this.setStatus('connecting');
    this.open();
  }

  /** Whether the message (or note) with this id is still waiting for the hub's acknowledgement. */
  isPending(id) {
    return this.outbox.has(id);
  }

  /**
   * Stops for good: closes the socket with 1000 and cancels reconnects. Queued messages stay
   * queued and go out if you call {@link connect} again.
   */
  close() {
    this.stopped = true;
    globalThis.removeEventListener?.('online', this.onOnline);
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    this.dropSocket(CloseCode.NORMAL, 'client closed');
    this.setStatus('closed');
  }

  // ---- for subclasses --------------------------------------------------------------------

  /** @protected The URL of the next socket. */
  socketUrl() {
    throw new Error('socketUrl is not implemented');
  }

  /** @protected The hub's `ready` on a new socket. */
  onReady(_f) {}

  /** @protected Every other frame (after the connection's own: tokens, pong). */
  onAppFrame(_f) {}

  /** @protected The socket closed with `code` (before reconnecting or stopping). */
  onSocketClosed(_code) {}

  /** @protected Queues a frame with an `id` until its acknowledgement; sends it now if open. */
  enqueue(frame) {
    this.outbox.set(frame.id, frame);
    if (this.status === 'open') this.transmit(frame.id);
  }

  /** @protected Marks an id acknowledged; returns false if it was not waiting. */
  settle(id) {
    return this.outbox.delete(id);
  }

  /** @protected Resends everything not yet acknowledged, oldest first, with the same ids. */
  resendOutbox() {
    for (const id of this.outbox.keys()) this.transmit(id);
  }

  /**
   * @protected The hub refused the frame with this `id`: keeps it for a resend (returns true) if
   * that can help, else drops it.
   */
  refused(id, code, retryAfterMs) {
    if (RETRYABLE_ERRORS.has(code)) {
      // Not stored, but worth another try with the same id: the hub is busy, its store is down,
      // or we sent too fast.
      const delay = Number.isInteger(retryAfterMs) && retryAfterMs > 0 ? retryAfterMs : RETRY_DELAY_MS;
      setTimeout(() => {
        if (this.outbox.has(id) && this.ws && this.ws.readyState === 1) this.transmit(id);
      }, delay);
      return true;
    }
    if (code === 'token_expired') {
      // Not stored: resent once a `refresh` is accepted, or after the reconnect (with a fresh
      // token) that the hub's 4001 brings.
      this.afterRefresh.add(id);
      this.refreshToken(this.ws);
      return true;
    }
    this.outbox.delete(id);
    return false;
  }

  /** @protected */
  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  /** @protected */
  setStatus(status, extra = {}) {
    this.status = status;
    this.emit('status', { status, ...extra });
  }

  /** @protected Sends a frame on the open socket; false if there is none. */
  write(frame) {
    if (!this.ws || this.ws.readyState !== 1) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  // ---- internals -------------------------------------------------------------------------

  /** @private */
  transmit(id) {
    const frame = this.outbox.get(id);
    if (frame && this.write(frame)) this.sentOnSocket.push(id);
  }

  /** @private Fetches a fresh token first when the client has `getToken`. */
  open() {
    if (this.stopped) return;
    if (!this.options.getToken) {
      this.openSocket();
      return;
    }
    Promise.resolve()
      .then(() => this.options.getToken())
      .then(
        (token) => {
          if (this.stopped || this.ws) return;
          this.token = String(token);
          this.openSocket();
        },
        (err) => {
          this.emit('error', { code: 'token_unavailable', message: String(err && err.message || err) });
          this.scheduleReconnect();
        },
      );
  }

  /** @private Asks `getToken` for a new token and sends it as `refresh` on `ws`. */
  refreshToken(ws) {
    if (!this.options.getToken) return;
    Promise.resolve()
      .then(() => this.options.getToken())
      .then(
        (token) => {
          this.token = String(token);
          if (ws === this.ws) this.write({ type: 'refresh', token: this.token });
        },
        (err) => this.emit('error', { code: 'token_unavailable', message: String(err && err.message || err) }),
      );
  }

  /** @private */
  openSocket() {
    if (this.stopped) return;
    let ws;
    try {
      ws = new this.WebSocket(this.socketUrl());
    } catch (err) {
      this.emit('error', { code: 'connect_failed', message: String(err && err.message || err) });
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    this.sentOnSocket = [];
    ws.onmessage = (ev) => this.onFrame(ws, ev.data);
    ws.onclose = (ev) => this.onClose(ws, ev.code, ev.reason);
    ws.onerror = () => { /* a close event always follows; handled there */ };
  }

  /** @private Detaches and closes the current socket without waiting for its close event. */
  dropSocket(code, reason) {
    const ws = this.ws;
    this.ws = null;
    this.stopHeartbeat();
    if (!ws) return;
    ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      ws.close(code, reason);
    } catch {
      /* already closed */
    }
  }

  /** @private */
  onClose(ws, code, reason) {
    if (ws !== this.ws) return;
    this.ws = null;
    this.stopHeartbeat();
    if (this.stopped) return;

    if (code === CloseCode.TOO_BIG) {
      // The hub refused a frame: the last message we wrote is the likely culprit. Drop it so a
      // reconnect does not resend it forever.
      const id = this.sentOnSocket.filter((x) => this.outbox.has(x)).pop();
      if (id) {
        const frame = this.outbox.get(id);
        this.outbox.delete(id);
        this.emit('error', {
          code: 'frame_too_big',
          message: 'That message is too long to send.',
          id,
          ...(frame.conversation ? { conversation: frame.conversation } : {}),
        });
      }
    }
    this.onSocketClosed(code);

    if (FINAL_CLOSE_CODES.has(code)) {
      this.stopped = true;
      globalThis.removeEventListener?.('online', this.onOnline);
      this.setStatus('closed', { code, reason });
      return;
    }
    // The user's conversation cap counts over an hour: not at once, after the longest backoff.
    if (code === CloseCode.TOO_MANY_CONVERSATIONS) this.attempt = Math.max(this.attempt, 30);
    this.scheduleReconnect({ code, reason });
  }

  /** @private Exponential backoff with jitter: delay in [d/2, d], d = min(max, min·2^attempt). */
  scheduleReconnect(extra = {}) {
    if (this.stopped || this.reconnectTimer) return;
    const { minBackoffMs, maxBackoffMs } = this.options;
    const ceiling = Math.min(maxBackoffMs, minBackoffMs * 2 ** this.attempt);
    const delay = Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
    this.attempt += 1;
    this.setStatus('reconnecting', { attempt: this.attempt, delay, ...extra });
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      this.open();
    }, delay);
  }

  /** @private */
  startHeartbeat() {
    this.stopHeartbeat();
    this.pingTimer = setInterval(() => {
      if (!this.ws || this.pongTimer) return;
      this.write({ type: 'ping' });
      this.pongTimer = setTimeout(() => {
        // No frame at all since the ping: the connection is dead even if the browser thinks not.
        this.pongTimer = null;
        this.dropSocket(CloseCode.NORMAL, 'ping timeout');
        this.scheduleReconnect({ reason: 'ping timeout' });
      }, this.options.pongTimeoutMs);
    }, this.options.pingIntervalMs);
  }

  /** @private */
  stopHeartbeat() {
    clearInterval(this.pingTimer);
    clearTimeout(this.pongTimer);
    this.pingTimer = null;
    this.pongTimer = null;
  }

  /** @private */
  onFrame(ws, data) {
    if (ws !== this.ws) return;
    clearTimeout(this.pongTimer); // any frame proves the socket is alive
    this.pongTimer = null;
    let f;
    try {
      f = JSON.parse(data);
    } catch {
      return; // not for us
    }
    if (!f || typeof f.type !== 'string') return;

    switch (f.type) {
      case 'token.expiring':
        this.refreshToken(ws);
        break;
      case 'refreshed':
        for (const id of this.afterRefresh) if (this.outbox.has(id)) this.transmit(id);
        this.afterRefresh.clear();
        break;
      case 'pong':
        break;
      case 'ready':
        this.attempt = 0;
        this.afterRefresh.clear(); // the outbox is resent after `ready`
        this.onReady(f);
        this.startHeartbeat();
        break;
      default:
        this.onAppFrame(f); // unknown frame types are ignored there, so the hub can add new ones
        break;
    }
  }
}

/**
 * Sends `typing` while someone types: `on: true` at once and every {@link TYPING_REPEAT_MS}, `on:
 * false` when they stop. `send(on)` writes the frame (nothing while offline: the hub's own expiry
 * covers that).
 */
class Typist {
  constructor(send) {
    this.send = send;
    this.timer = null;
  }

  get active() {
    return this.timer !== null;
  }

  start() {
    if (this.timer) return;
    this.send(true);
    this.timer = setInterval(() => this.send(true), TYPING_REPEAT_MS);
  }

  stop() {
    if (!this.timer) return;
    this.forget();
    this.send(false);
  }

  /** Stops repeating without a word (the socket is gone: the hub expires the indicator itself). */
  forget() {
    clearInterval(this.timer);
    this.timer = null;
  }
}

/**
 * A WebSocket client for one end user (a customer) of one tenant.
 * @extends EventTarget
 */
export class FengdaClient extends Connection {
  /** @param {FengdaClientOptions} options */
  constructor(options) {
    super(options);
    this.storage = options.storage === undefined ? defaultStorage() : options.storage;
    this.storageKey = `fengda:${encodeURIComponent(this.tenant)}:${encodeURIComponent(this.user)}`;

    /** @type {string|null} Current conversation id. */
    this.conversation = null;
    /** @type {string|null} Epoch of the conversation's log, from `ready` (sent back as `epoch`). */
    this.epoch = null;
    /** @type {{seq: number, epoch: string|null}|null} The current socket's `ready`. */
    this.lastReady = null;
    /** Durable events seen; `lastSeq` is what a reconnect resumes `after`. */
    this.seqs = new SeqWindow();
    /** The conversation has stored events (so the hub knows it by id), whether or not we hold them. */
    this.stored = false;
    /** The current socket's URL named the conversation (with `after` and `epoch`). */
    this.named = false;
    /** Until the first durable event after `ready` on a named socket: the `after` it resumed from. */
    this.replayAfter = null;
    /** Ids this client sent (to recognise our own messages when they are replayed). */
    this.ownIds = new Set();
    /** Assistant replies streaming and finished. */
    this.replies = new ReplyStreams();
    this.typist = new Typist((on) => this.write({ type: 'typing', on }));

    this.restore();
    if (this.options.replayHistory) this.seqs.reset(0);
  }

  /** Highest seq below which every durable event has been seen. */
  get lastSeq() {
    return this.seqs.lastSeq;
  }

  /**
   * Sends a customer message. While disconnected it is queued and sent after the reconnect;
   * if the socket drops before the hub acknowledges it, it is resent with the same id.
   * @param {string} text
   * @returns {string} the client message id (also reported by the `ack` event)
   */
  send(text) {
    const body = checkedText(text, 'FengdaClient.send');
    this.typist.stop();
    const id = newId();
    rememberBounded(this.ownIds, id);
    this.enqueue({ type: 'message', id, text: body });
    return id;
  }

  /**
   * Asks for a person (`handoff`): the conversation waits for an agent, and the hub says so with a
   * `system` message. Returns false while offline (nothing is queued: ask again when open).
   */
  handoff() {
    return this.write({ type: 'handoff' });
  }

  /**
   * The customer is typing (`true`: call on every keystroke, it is sent once and repeated every
   * 3 s) or stopped (`false`: on blur and when the input is emptied; sending stops it too).
   * @param {boolean} on
   */
  typing(on) {
    if (on) this.typist.start();
    else this.typist.stop();
  }

  /** Forgets the conversation (a new one starts on the next connection). */
  resetConversation() {
    const previous = this.conversation;
    this.conversation = null;
    this.epoch = null;
    this.seqs.reset(0);
    this.stored = false;
    this.replies.clear();
    this.persist();
    if (previous) this.emit('conversation', { conversation: null, previous });
  }

  // ---- internals -------------------------------------------------------------------------

  /** @private */
  restore() {
    if (!this.storage) return;
    try {
      const saved = JSON.parse(this.storage.getItem(this.storageKey) || 'null');
      if (saved && typeof saved.conversation === 'string' && CONVERSATION_ID_PATTERN.test(saved.conversation)) {
        this.conversation = saved.conversation;
        this.epoch = typeof saved.epoch === 'string' ? saved.epoch : null;
        this.seqs.reset(Number.isInteger(saved.seq) && saved.seq > 0 ? saved.seq : 0);
        this.stored = saved.stored === true || this.lastSeq > 0;
      }
    } catch {
      /* corrupt entry: start fresh */
    }
  }

  /** @private */
  persist() {
    if (!this.storage) return;
    try {
      if (this.conversation) {
        this.storage.setItem(
          this.storageKey,
          JSON.stringify({ conversation: this.conversation, epoch: this.epoch, seq: this.lastSeq, stored: this.stored }),
        );
      } else {
        this.storage.removeItem(this.storageKey);
      }
    } catch {
      /* storage full or unavailable: resuming is best effort */
    }
  }

  /** @protected Builds the URL for the next connection attempt. */
  socketUrl() {
    const u = new URL(this.endpoint, globalThis.location?.href);
    if (this.token) {
      // The token names the tenant and user; the hub takes them from it alone.
      u.searchParams.set('token', this.token);
    } else {
      u.searchParams.set('tenant', this.tenant);
      u.searchParams.set('user', this.user);
    }
    // A conversation exists from its first stored message on: with nothing stored and nothing sent,
    // naming it would only get 4004, so let the hub choose (the user's most recent, or a new one).
    // One that exists is always named, with `after` (0 to have it all replayed) and `epoch`.
    this.named = Boolean(this.conversation && (this.stored || this.outbox.size > 0));
    if (this.named) {
      u.searchParams.set('conversation', this.conversation);
      u.searchParams.set('after', String(this.lastSeq));
      // Lets the hub tell us (`history_lost`) if this conversation's log was lost and recreated.
      if (this.epoch) u.searchParams.set('epoch', this.epoch);
    }
    return u.toString();
  }

  /** @protected */
  onSocketClosed(code) {
    // The typing indicator went with the socket (the hub expires it); start again on the next key.
    this.typist.forget();
    if (code === CloseCode.CONVERSATION_NOT_FOUND) {
      // The hub does not know our conversation: start a new one (queued messages go there).
      this.resetConversation();
    }
  }

  /** @private Records a durable seq; returns false if it was seen already. */
  markSeq(seq) {
    if (this.replayAfter !== null && Number.isInteger(seq)) {
      // The replay's first event above `after` + 1: the events between were trimmed from the
      // log (it keeps the latest `conversation.log_cap`) and are gone (protocol §7).
      if (seq > this.replayAfter + 1 && this.lastSeq === this.replayAfter) this.seqs.reset(seq - 1);
      this.replayAfter = null;
    }
    if (!this.seqs.mark(seq)) return false;
    this.stored = true;
    this.persist();
    return true;
  }

  /** @private */
  acknowledge(id, seq) {
    if (!this.settle(id)) return; // already acked (e.g. a resend crossed a replay)
    this.emit('ack', { id, seq });
  }

  /** @protected */
  onReady(f) {
    const previous = this.conversation;
    // Not named, the hub chose: even our own id comes as it is now (say, recreated by another tab).
    const resumed = this.named && previous === f.conversation;
    const seq = Number.isInteger(f.seq) ? f.seq : 0;
    const epoch = typeof f.epoch === 'string' && f.epoch ? f.epoch : null;
    this.lastReady = { seq, epoch };
    let rewound = false;
    if (!resumed) {
      this.conversation = f.conversation;
      this.epoch = epoch;
      // Without `after` the hub replays nothing: start from its current seq.
      this.seqs.reset(seq);
      this.stored = seq > 0;
      if (previous !== f.conversation) this.emit('conversation', { conversation: f.conversation, previous });
    } else if (epoch && !this.epoch) {
      this.epoch = epoch; // first epoch learnt for this conversation (e.g. saved by an older client)
    } else if (epoch && epoch === this.epoch && seq < this.lastSeq) {
      // Same log, but behind what we already saw (e.g. Redis failed over to a replica that
      // missed the newest writes): those events are gone and their seqs will be reused.
      rewound = true;
    }
    // A different epoch than ours: the hub follows this frame with `history_lost` (it got our
    // epoch), and that is where we start over; until then our saved state stays as it was.
    this.replayAfter = resumed && !rewound && seq > this.lastSeq ? this.lastSeq : null;
    this.persist();
    this.setStatus('open');
    this.emit('ready', { conversation: f.conversation, seq: f.seq, epoch });
    if (rewound) this.startOver('rewound');
    this.resendOutbox();
  }

  /** @protected */
  onAppFrame(f) {
    switch (f.type) {
      case 'ack':
        this.markSeq(f.seq);
        this.acknowledge(f.id, f.seq);
        break;
      case 'queued': {
        // Only while the reply has not started: a late one must not revive a finished reply.
        if (this.replies.known(f.reply)) return;
        const position = Number.isInteger(f.position) && f.position > 0 ? f.position : null;
        this.emit('queued', { conversation: f.conversation, reply: f.reply, position });
        break;
      }
      case 'reply.delta': {
        const piece = this.replies.delta(f);
        if (piece) this.emit('delta', { conversation: f.conversation, reply: f.reply, ...piece });
        break;
      }
      case 'reply.done':
        this.markSeq(f.seq);
        this.finishReply(f, false);
        break;
      case 'message': {
        if (!this.markSeq(f.seq)) return;
        if (f.from === 'customer' && this.ownIds.has(f.id)) {
          // Our own message coming back in a replay: it is stored, i.e. acknowledged.
          this.acknowledge(f.id, f.seq);
          return;
        }
        if (f.from === 'assistant' && this.replies.known(f.id)) {
          // The stored form of a reply we already (partly) showed: it replaces the partial one.
          this.finishReply({ ...f, reply: f.id }, true);
          return;
        }
        if (f.from === 'assistant') rememberBounded(this.replies.done, f.id);
        this.emit('message', {
          conversation: f.conversation, seq: f.seq, from: f.from, id: f.id, text: f.text,
          ...replyFlags(f), ...speakerFields(f),
        });
        break;
      }
      case 'typing':
        if (f.from === 'agent') {
          this.emit('typing', { conversation: f.conversation, from: 'agent', name: String(f.name ?? ''), on: f.on === true });
        }
        break;
      case 'error': {
        if (f.code === 'history_lost') {
          // The conversation's log was lost and recreated: nothing was replayed, and what we saw
          // before will never come back. Start over from this socket's `ready`.
          this.startOver('history_lost');
          break;
        }
        const hasId = typeof f.id === 'string';
        let retry = false;
        if (hasId && REQUEUE_ERRORS.has(f.code)) {
          // Not stored; the hub closes with 4004 and the message goes to the next conversation.
          retry = true;
        } else if (hasId) {
          // Resent after a pause if the hub is busy; refused for good (empty, too long, ...) else.
          retry = this.refused(f.id, f.code, f.retry_after_ms);
        }
        this.emit('error', { code: f.code, message: f.message, ...(hasId ? { id: f.id, retry } : {}) });
        break;
      }
      default:
        break;
    }
  }

  /**
   * @private Forgets what this client saw of the conversation (the hub no longer has it) and
   * continues from the current socket's `ready`. Unacknowledged messages stay queued; they were
   * already resent after `ready`.
   * @param {'history_lost'|'rewound'} reason
   */
  startOver(reason) {
    const ready = this.lastReady || { seq: 0, epoch: null };
    const previousEpoch = this.epoch;
    if (ready.epoch) this.epoch = ready.epoch;
    this.seqs.reset(ready.seq);
    this.replayAfter = null;
    this.replies.clear();
    this.persist();
    this.emit('reset', {
      conversation: this.conversation, seq: this.lastSeq, epoch: this.epoch, previousEpoch, reason,
    });
  }

  /** @private */
  finishReply(f, replayed) {
    if (!this.replies.finish(f.reply)) return;
    this.emit('done', {
      conversation: f.conversation,
      reply: f.reply,
      seq: f.seq,
      text: String(f.text ?? ''),
      ...replyFlags(f),
      replayed,
    });
  }
}

/**
 * What an agent sees of one watched conversation: the `watching` snapshot kept up to date
 * (`owner`, `presence`), its durable events by seq, the assistant's replies as they grow, the
 * notes, and who is typing. {@link FengdaAgent} keeps one per watched conversation; read it in
 * the `transcript` event.
 */
export class WatchedConversation {
  constructor(conversation) {
    this.conversation = conversation;
    /** @type {string|null} The customer's user id. */
    this.customer = null;
    /** @type {'assistant'|'waiting'|'agent'|null} Who answers (null until `watching`). */
    this.owner = null;
    /** @type {string|null} The owning agent's id and display name, when `owner` is `agent`. */
    this.agent = null;
    this.agentName = null;
    this.ownerEpoch = -1;
    /** Whether the customer has a socket open on some hub node. */
    this.online = false;
    /** @type {{agent: string, name: string}[]} The agents watching. */
    this.viewers = [];
    /** @type {string|null} The conversation log's epoch, from `watching`. */
    this.epoch = null;
    /** Durable events: seq → `{seq, from, id, text, name?, event?, agent?, fallback, interrupted, cancelled}`. */
    this.events = new Map();
    /** Notes: id → `{id, seq, after, agent, name, text, at}`. */
    this.notes = new Map();
    /** Replies streaming now: reply id → `{reply, content}`. */
    this.live = new Map();
    /** Questions waiting for the NLP service: reply id → place in line (null if unknown). */
    this.queued = new Map();
    /** Who is typing: `customer` or `agent:<id>` → `{from, agent?, name?, note}`. */
    this.typing = new Map();
    /** @private */
    this.seqs = new SeqWindow();
    /** @private Events with a seq up to this came in the `watch` snapshot's history. */
    this.historyUpTo = 0;
    /** @private */
    this.replies = new ReplyStreams();
    /** @private typing key → expiry timer */
    this.typingTimers = new Map();
    /** Whether a `watching` snapshot has arrived. */
    this.ready = false;
  }

  /** The `after` to watch again with: every durable event up to it has been seen. */
  get lastSeq() {
    return this.seqs.lastSeq;
  }

  /** The highest seq seen (the conversation's length as far as this transcript knows). */
  get seq() {
    return Math.max(this.seqs.lastSeq, ...this.events.keys(), 0);
  }

  /**
   * Everything in display order: the durable events by seq, each note after the event it was
   * written after (`after`), then the questions waiting and the replies streaming.
   * @returns {Array<{kind: 'event'|'note'|'queued'|'streaming'} & object>}
   */
  items() {
    const notesAfter = new Map();
    for (const note of [...this.notes.values()].sort((a, b) => a.seq - b.seq)) {
      const list = notesAfter.get(note.after) || [];
      list.push({ kind: 'note', ...note });
      notesAfter.set(note.after, list);
    }
    const out = [...(notesAfter.get(0) || [])];
    notesAfter.delete(0);
    for (const seq of [...this.events.keys()].sort((a, b) => a - b)) {
      out.push({ kind: 'event', ...this.events.get(seq) });
      for (const note of notesAfter.get(seq) || []) out.push(note);
      notesAfter.delete(seq);
    }
    // Notes written after events this transcript does not have (older than its history, or not
    // arrived yet): in order at the end of the durable part.
    for (const after of [...notesAfter.keys()].sort((a, b) => a - b)) out.push(...notesAfter.get(after));
    for (const [reply, position] of this.queued) out.push({ kind: 'queued', reply, position });
    for (const live of this.live.values()) out.push({ kind: 'streaming', ...live });
    return out;
  }

  /** @private Adds a durable event; returns false if it was there already. */
  addEvent(seq, event) {
    if (!Number.isInteger(seq) || seq <= 0) return false;
    if (seq > this.historyUpTo && !this.seqs.mark(seq)) return false;
    if (this.events.has(seq)) return false;
    this.events.set(seq, { seq, ...event });
    return true;
  }

  /** @private Forgets the events (a log lost and recreated, or rewound). */
  clearEvents() {
    this.events.clear();
    this.live.clear();
    this.queued.clear();
    this.replies.clear();
    this.seqs.reset(0);
    this.historyUpTo = 0;
  }

  /** @private */
  setTyping(key, entry, onExpire) {
    clearTimeout(this.typingTimers.get(key));
    this.typingTimers.delete(key);
    if (!entry) {
      this.typing.delete(key);
      return;
    }
    this.typing.set(key, entry);
    // The hub expires typing by itself; a lost `on: false` must not leave it shown forever.
    this.typingTimers.set(key, setTimeout(() => {
      this.typingTimers.delete(key);
      this.typing.delete(key);
      onExpire();
    }, TYPING_SHOWN_MS));
  }

  /** @private */
  clearTyping() {
    for (const timer of this.typingTimers.values()) clearTimeout(timer);
    this.typingTimers.clear();
    this.typing.clear();
  }
}

/**
 * @typedef {object} FengdaAgentOptions
 * @property {string} tenant  Tenant id.
 * @property {string} user    The agent's user id (the token's `sub`).
 * @property {() => Promise<string>} getToken  Returns a fresh token with `role: agent` (agents
 *                            cannot connect with query identities). Called before every
 *                            connection and on `token.expiring`.
 * @property {string} [url]   Full WebSocket endpoint; or `base`, as for {@link FengdaClient}.
 * @property {string} [base]
 * @property {number} [pingIntervalMs=25000]
 * @property {number} [pongTimeoutMs=10000]
 * @property {number} [minBackoffMs=500]
 * @property {number} [maxBackoffMs=10000]
 * @property {typeof WebSocket} [WebSocket]
 */

/**
 * Events of {@link FengdaAgent} (`CustomEvent`s, payload in `event.detail`):
 * - `status`  as for {@link FengdaClient}.
 * - `ready`   `{agent, name, supervisor}` — the hub accepted the agent socket.
 * - `list`    `{change: 'snapshot'|'update'|'removed', conversation?}` — the live list
 *             (`agent.conversations`, a Map id → summary) changed.
 * - `transcript` `{conversation, change, transcript}` — a watched conversation changed;
 *             `transcript` is its {@link WatchedConversation}; `change` is one of `watching`,
 *             `message`, `delta`, `done`, `queued`, `note`, `typing`, `presence`, `owner`, `ack`,
 *             `reset`, `unwatched`.
 * - `ack`     `{conversation, id, seq?, kind}` — a message (`kind: 'message'`, with its `seq`) or a note
 *             (`kind: 'note'`) you sent is stored.
 * - `error`   `{code, message, conversation?, id?, retry?, agent?, agentName?}` — an `error` frame
 *             (e.g. `already_owned` with the owner, `not_owner`, `forbidden`), or a client-side
 *             problem. With an `id` it is about that message or note, which was not stored; with
 *             `retry: true` it is resent by itself.
 * @typedef {never} FengdaAgentEvents
 */

/**
 * A WebSocket client for a contact-centre agent of one tenant (docs/protocol.md §14): the live
 * list, watched conversations, ownership, messages, notes and typing.
 * @extends EventTarget
 */
export class FengdaAgent extends Connection {
  /** @param {FengdaAgentOptions} options */
  constructor(options) {
    super(options);
    if (typeof this.options.getToken !== 'function') {
      throw new TypeError('FengdaAgent: getToken is required (agents connect with a token)');
    }
    /** @type {string|null} The agent's id, display name and steal right, from `ready`. */
    this.agent = null;
    this.name = null;
    this.supervisor = false;
    /** The live list: conversation id → summary (docs/protocol.md §14), while {@link list} is on. */
    this.conversations = new Map();
    /** Watched conversations: id → {@link WatchedConversation}. */
    this.watched = new Map();
    /** Whether the list was asked for (asked again after every reconnect). */
    this.listing = false;
    /** @private conversation id → Typist */
    this.typists = new Map();
  }

  /** Asks for the live list: a snapshot, then its changes, also after reconnects. */
  list() {
    this.listing = true;
    this.write({ type: 'list' });
  }

  /** Stops the list's changes (and forgets the list). */
  unlist() {
    this.listing = false;
    this.conversations.clear();
    this.write({ type: 'unlist' });
    this.emit('list', { change: 'snapshot' });
  }

  /**
   * Watches a conversation: its history, then everything live, kept in
   * `agent.watched.get(conversation)` (also after reconnects, from the last seq seen).
   * @returns {WatchedConversation}
   */
  watch(conversation) {
    let w = this.watched.get(conversation);
    if (!w) this.watched.set(conversation, (w = new WatchedConversation(conversation)));
    this.sendWatch(w);
    return w;
  }

  /** Stops watching a conversation and forgets its transcript. */
  unwatch(conversation) {
    const w = this.watched.get(conversation);
    if (!w) return;
    this.typing(conversation, false);
    w.clearTyping();
    this.watched.delete(conversation);
    this.write({ type: 'unwatch', conversation });
    this.changed(w, 'unwatched');
  }

  /**
   * Takes the conversation over (and watches it). `steal: true` takes it from another agent
   * (supervisors only). The outcome is an `owner` change in the transcript, or an `error`
   * (`already_owned` naming the owner, `forbidden`). Returns false while offline.
   */
  take(conversation, { steal = false } = {}) {
    if (!this.watched.has(conversation)) this.watched.set(conversation, new WatchedConversation(conversation));
    return this.write({ type: 'take', conversation, ...(steal ? { steal: true } : {}) });
  }

  /** Hands the conversation back to the assistant. Returns false while offline. */
  release(conversation) {
    this.typing(conversation, false);
    return this.write({ type: 'release', conversation });
  }

  /**
   * Sends a message to the customer (only the owner may). Queued while offline and resent with
   * the same id until acknowledged. Stops this agent's typing in the conversation.
   * @returns {string} the message id (reported by `ack`)
   */
  message(conversation, text) {
    return this.sendDurable('message', conversation, checkedText(text, 'FengdaAgent.message'));
  }

  /**
   * Writes a private note (agents only; never shown to the customer). Queued and resent like a
   * message; its `note` frame from the hub acknowledges it.
   * @returns {string} the note id
   */
  note(conversation, text) {
    return this.sendDurable('note', conversation, checkedText(text, 'FengdaAgent.note'));
  }

  /**
   * The agent is typing in the conversation (`true`: call on every keystroke; sent once and
   * repeated every 3 s) or stopped (`false`: on blur, and sending stops it). `note: true` while
   * typing a note, which the customer never sees.
   */
  typing(conversation, on, { note = false } = {}) {
    let typist = this.typists.get(conversation);
    if (on) {
      if (typist && typist.note !== note) {
        typist.stop();
        typist = null;
      }
      if (!typist) {
        typist = new Typist((isOn) => this.write({ type: 'typing', conversation, on: isOn, ...(note ? { note: true } : {}) }));
        typist.note = note;
        this.typists.set(conversation, typist);
      }
      typist.start();
    } else if (typist) {
      typist.stop();
      this.typists.delete(conversation);
    }
  }

  // ---- internals -------------------------------------------------------------------------

  /** @private */
  sendDurable(type, conversation, text) {
    this.typing(conversation, false);
    const id = newId();
    this.enqueue({ type, conversation, id, text });
    return id;
  }

  /** @private */
  sendWatch(w) {
    // Events seen so far are kept: ask for what came after them only.
    const after = w.ready && w.lastSeq > 0 ? { after: w.lastSeq } : {};
    w.asked = Object.keys(after).length > 0;
    this.write({ type: 'watch', conversation: w.conversation, ...after });
  }

  /** @private */
  changed(w, change) {
    this.emit('transcript', { conversation: w.conversation, change, transcript: w });
  }

  /** @protected Agents connect with their token only. */
  socketUrl() {
    const u = new URL(this.endpoint, globalThis.location?.href);
    if (this.token) u.searchParams.set('token', this.token);
    return u.toString();
  }

  /** @protected */
  onSocketClosed() {
    for (const typist of this.typists.values()) typist.forget();
    this.typists.clear();
    for (const w of this.watched.values()) {
      if (w.typing.size) {
        w.clearTyping();
        this.changed(w, 'typing');
      }
    }
  }

  /** @protected */
  onReady(f) {
    this.agent = typeof f.agent === 'string' ? f.agent : this.user;
    this.name = typeof f.name === 'string' ? f.name : this.agent;
    this.supervisor = f.supervisor === true;
    this.setStatus('open');
    this.emit('ready', { agent: this.agent, name: this.name, supervisor: this.supervisor, role: f.role ?? null });
    if (this.listing) this.write({ type: 'list' });
    for (const w of this.watched.values()) this.sendWatch(w);
    this.resendOutbox();
  }

  /** @protected */
  onAppFrame(f) {
    switch (f.type) {
      case 'conversations': {
        if (!Array.isArray(f.conversations)) return;
        this.conversations = new Map(f.conversations.filter((c) => c && typeof c.conversation === 'string').map((c) => [c.conversation, c]));
        this.emit('list', { change: 'snapshot' });
        return;
      }
      case 'conversation': {
        if (typeof f.conversation !== 'string') return;
        const { type: _type, ...summary } = f;
        this.conversations.set(f.conversation, summary);
        this.emit('list', { change: 'update', conversation: f.conversation });
        return;
      }
      case 'conversation.removed':
        if (this.conversations.delete(f.conversation)) this.emit('list', { change: 'removed', conversation: f.conversation });
        return;
      case 'error':
        this.onError(f);
        return;
      case 'ack': {
        // Our own message is stored: it joins its transcript (the hub sends it to the others only).
        const frame = this.outbox.get(f.id);
        if (!frame || !this.settle(f.id)) return; // a resend's second ack
        const w = this.watched.get(frame.conversation);
        w?.addEvent(f.seq, { from: 'agent', id: f.id, text: frame.text, name: this.name, agent: this.agent, ...replyFlags({}) });
        this.emit('ack', { conversation: frame.conversation, id: f.id, seq: f.seq, kind: 'message' });
        if (w) this.changed(w, 'ack');
        return;
      }
      case 'note':
        // Our own note is stored (also when its conversation is not watched here).
        if (typeof f.id === 'string' && this.settle(f.id)) this.emit('ack', { conversation: f.conversation, id: f.id, kind: 'note' });
        break;
      default:
        break;
    }
    const w = this.watched.get(f.conversation);
    if (!w) return; // a frame of a conversation no longer watched
    switch (f.type) {
      case 'watching': {
        const epoch = typeof f.epoch === 'string' ? f.epoch : null;
        const seq = Number.isInteger(f.seq) ? f.seq : 0;
        if (w.ready && ((w.epoch && epoch && epoch !== w.epoch) || seq < w.lastSeq)) {
          // The log was lost and recreated, or is behind what we saw: start over from its history.
          w.clearEvents();
          w.ready = false;
          w.epoch = epoch;
          this.changed(w, 'reset');
          this.write({ type: 'watch', conversation: w.conversation });
          return;
        }
        if (!w.asked) {
          // History without `after`: the newest events up to `seq` (de-duplicated by seq), then live
          // from `seq` on.
          w.historyUpTo = Math.max(w.historyUpTo, seq);
          if (w.seqs.lastSeq < seq) w.seqs.reset(seq);
        }
        w.ready = true;
        w.epoch = epoch;
        w.customer = typeof f.customer === 'string' ? f.customer : w.customer;
        this.applyOwner(w, f);
        w.online = f.online === true;
        w.viewers = Array.isArray(f.viewers) ? f.viewers : [];
        this.changed(w, 'watching');
        return;
      }
      case 'message': {
        if (f.from === 'assistant' && w.replies.known(f.id)) {
          // The stored form of a reply seen streaming: it replaces the partial one.
          w.replies.finish(f.id);
          w.live.delete(f.id);
        } else if (f.from === 'assistant') {
          rememberBounded(w.replies.done, f.id);
        }
        const event = { from: f.from, id: f.id, text: String(f.text ?? ''), ...replyFlags(f), ...speakerFields(f) };
        if (!w.addEvent(f.seq, event)) return;
        if (f.from === 'agent' && this.settle(f.id)) this.emit('ack', { conversation: w.conversation, id: f.id, seq: f.seq, kind: 'message' });
        if (f.from === 'customer') w.setTyping('customer', null);
        this.changed(w, 'message');
        return;
      }
      case 'queued': {
        if (w.replies.known(f.reply)) return;
        w.queued.set(f.reply, Number.isInteger(f.position) && f.position > 0 ? f.position : null);
        this.changed(w, 'queued');
        return;
      }
      case 'reply.delta': {
        const piece = w.replies.delta(f);
        if (!piece) return;
        w.queued.delete(f.reply);
        w.live.set(f.reply, { reply: f.reply, content: piece.content });
        this.changed(w, 'delta');
        return;
      }
      case 'reply.done': {
        w.replies.finish(f.reply);
        w.live.delete(f.reply);
        w.queued.delete(f.reply);
        w.addEvent(f.seq, { from: 'assistant', id: f.reply, text: String(f.text ?? ''), ...replyFlags(f) });
        this.changed(w, 'done');
        return;
      }
      case 'note': {
        if (typeof f.id !== 'string') return;
        w.notes.set(f.id, {
          id: f.id, seq: f.seq, after: Number.isInteger(f.after) ? f.after : 0,
          agent: f.agent, name: f.name, text: String(f.text ?? ''), at: f.at,
        });
        this.changed(w, 'note');
        return;
      }
      case 'typing': {
        const key = f.from === 'customer' ? 'customer' : `agent:${f.agent}`;
        const entry = f.on === true
          ? { from: f.from, ...(f.from === 'agent' ? { agent: f.agent, name: f.name ?? f.agent } : {}), note: f.note === true }
          : null;
        w.setTyping(key, entry, () => this.changed(w, 'typing'));
        this.changed(w, 'typing');
        return;
      }
      case 'presence':
        w.online = f.online === true;
        if (Array.isArray(f.viewers)) w.viewers = f.viewers;
        this.changed(w, 'presence');
        return;
      case 'owner':
        if (this.applyOwner(w, f)) this.changed(w, 'owner');
        return;
      default:
        return; // unknown frame types are ignored so the hub can add new ones
    }
  }

  /** @private Applies an owner change unless it is older than the one we have. */
  applyOwner(w, f) {
    const epoch = Number.isInteger(f.owner_epoch) ? f.owner_epoch : w.ownerEpoch;
    if (epoch < w.ownerEpoch) return false;
    w.ownerEpoch = epoch;
    w.owner = typeof f.owner === 'string' ? f.owner : w.owner;
    w.agent = w.owner === 'agent' ? (f.agent ?? null) : null;
    w.agentName = w.owner === 'agent' ? (f.agent_name ?? f.agent ?? null) : null;
    if (w.owner !== 'agent' || w.agent !== this.agent) {
      // No longer ours: stop saying we type a reply.
      const typist = this.typists.get(w.conversation);
      if (typist && !typist.note) this.typing(w.conversation, false);
    }
    return true;
  }

  /** @private */
  onError(f) {
    const conversation = typeof f.conversation === 'string' ? f.conversation : undefined;
    const hasId = typeof f.id === 'string';
    let retry = false;
    if (hasId) retry = this.refused(f.id, f.code, f.retry_after_ms);
    else if (conversation && ['conversation_not_found', 'too_many_watched'].includes(f.code)) {
      // The watch (or take) did not happen: forget the transcript.
      const w = this.watched.get(conversation);
      if (w) {
        this.watched.delete(conversation);
        this.changed(w, 'unwatched');
      }
    }
    this.emit('error', {
      code: f.code,
      message: f.message,
      ...(conversation ? { conversation } : {}),
      ...(hasId ? { id: f.id, retry } : {}),
      ...(typeof f.agent === 'string' ? { agent: f.agent, agentName: f.agent_name ?? f.agent } : {}),
    });
  }
}
