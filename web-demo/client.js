// Fengda browser client — a small, dependency-free WebSocket client for the
// Fengda realtime hub. Copy this file into your own site if you like; it has
// no imports and works in every current browser.
//
//   import { FengdaClient } from '/client.js';
//   const client = new FengdaClient({ tenant: 'demo', user: 'alice' });
//   client.addEventListener('delta', (e) => render(e.detail.reply, e.detail.content));
//   client.addEventListener('done', (e) => finish(e.detail.reply, e.detail.text));
//   client.connect();
//   client.send('Tell me about the Gold Card');
//
// What it takes care of:
//   * reconnecting with exponential backoff and jitter (capped at ~10 s), to
//     whichever hub node the load balancer picks;
//   * resuming the conversation after a reconnect (`conversation` + `after` +
//     `epoch`) and de-duplicating replayed events by seq and by reply id;
//   * noticing when the hub lost the conversation's history (`history_lost`:
//     the log was recreated under a new epoch) and starting over from the new
//     log, reported as a `reset` event so the page can clear its transcript;
//   * queueing messages while offline and resending unacknowledged ones with
//     the same id (the hub acknowledges a resent id with its original seq and
//     never answers it twice), also after `unavailable` (the hub's store is
//     down) and `too_many_pending`;
//   * an application-level ping every 25 s, which also detects dead sockets;
//   * remembering the conversation id, its epoch and the last seq in
//     sessionStorage.

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
 * - `message` `{conversation, seq, from, id, text, fallback, interrupted, cancelled}` — any other
 *             durable event: replayed history, or something said on another socket of the
 *             conversation (agent, system, assistant, or the same customer on another device).
 *             The three flags describe assistant replies and are false otherwise.
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

/** Error codes after which a message is resent (same id) after RETRY_DELAY_MS. */
const RETRYABLE_ERRORS = new Set(['unavailable', 'too_many_pending']);
const RETRY_DELAY_MS = 2000;
/**
 * Error codes after which a message stays queued for the next connection: the hub closes with
 * 4004 and the message is resent, same id, in the conversation the reconnect gets.
 */
const REQUEUE_ERRORS = new Set(['conversation_not_found']);

/**
 * A WebSocket client for one end user of one tenant.
 * @extends EventTarget
 */
export class FengdaClient extends EventTarget {
  /** @param {FengdaClientOptions} options */
  constructor(options) {
    super();
    const { tenant, user } = options || {};
    if (!tenant || !user) throw new TypeError('FengdaClient: tenant and user are required');
    for (const [name, value] of [['tenant', tenant], ['user', user]]) {
      // The hub answers a bad id with HTTP 400 before the WebSocket opens, which a browser only
      // sees as an anonymous failure (close code 1006): refuse it here instead of retrying forever.
      if (!ID_PATTERN.test(String(value))) {
        throw new TypeError(`FengdaClient: ${name} must be 1-128 characters of A-Z a-z 0-9 . _ : @ -`);
      }
    }
    this.tenant = String(tenant);
    this.user = String(user);
    this.endpoint = FengdaClient.endpointFrom(options);
    this.options = {
      pingIntervalMs: 25000,
      pongTimeoutMs: 10000,
      minBackoffMs: 500,
      maxBackoffMs: 10000,
      ...options,
    };
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    this.storage = options.storage === undefined ? defaultStorage() : options.storage;
    this.storageKey = `fengda:${encodeURIComponent(this.tenant)}:${encodeURIComponent(this.user)}`;

    /** @type {FengdaStatus} */
    this.status = 'idle';
    /** @type {string|null} Current conversation id. */
    this.conversation = null;
    /** @type {string|null} Epoch of the conversation's log, from `ready` (sent back as `epoch`). */
    this.epoch = null;
    /** @type {{seq: number, epoch: string|null}|null} The current socket's `ready`. */
    this.lastReady = null;
    /**
     * Highest seq below which every durable event has been seen (seqs are gap-free, so this is
     * what we resume `after`). Events above it that arrived early are kept in `seenAbove`.
     */
    this.lastSeq = 0;
    this.seenAbove = new Set();

    /** Messages not yet acknowledged, in send order: id → text. */
    this.outbox = new Map();
    /** Ids this client sent (to recognise our own messages when they are replayed). */
    this.ownIds = new Set();
    /** Streaming replies: reply id → array of tokens by index. */
    this.streams = new Map();
    /** Reply ids already finished. */
    this.doneReplies = new Set();

    this.ws = null;
    this.attempt = 0;
    this.stopped = true;
    this.reconnectTimer = null;
    this.pingTimer = null;
    this.pongTimer = null;
    /** The token of the current or next connection (with `getToken`). */
    this.token = null;
    this.sentOnSocket = []; // ids written to the current socket and not yet acked

    this.restore();
    if (this.options.replayHistory) this.lastSeq = 0;

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

  /**
   * Sends a customer message. While disconnected it is queued and sent after the reconnect;
   * if the socket drops before the hub acknowledges it, it is resent with the same id.
   * @param {string} text
   * @returns {string} the client message id (also reported by the `ack` event)
   */
  send(text) {
    const body = String(text ?? '').trim();
    // The hub's rule for `empty_text`: only white space and zero-width characters.
    if (/^[\s\u0085\u180e\u200b-\u200d\u2060\ufeff]*$/u.test(body)) {
      throw new TypeError('FengdaClient.send: text is empty');
    }
    const id = newId();
    this.outbox.set(id, body);
    rememberBounded(this.ownIds, id);
    if (this.status === 'open') this.transmit(id, body);
    return id;
  }

  /** Whether the message with this id is still waiting for the hub's acknowledgement. */
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

  /** Forgets the conversation (a new one starts on the next connection). */
  resetConversation() {
    const previous = this.conversation;
    this.conversation = null;
    this.epoch = null;
    this.lastSeq = 0;
    this.seenAbove.clear();
    this.streams.clear();
    this.doneReplies.clear();
    this.persist();
    if (previous) this.emit('conversation', { conversation: null, previous });
  }

  // ---- internals -------------------------------------------------------------------------

  /** @private */
  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  /** @private */
  setStatus(status, extra = {}) {
    this.status = status;
    this.emit('status', { status, ...extra });
  }

  /** @private */
  restore() {
    if (!this.storage) return;
    try {
      const saved = JSON.parse(this.storage.getItem(this.storageKey) || 'null');
      if (saved && typeof saved.conversation === 'string' && CONVERSATION_ID_PATTERN.test(saved.conversation)) {
        this.conversation = saved.conversation;
        this.epoch = typeof saved.epoch === 'string' ? saved.epoch : null;
        this.lastSeq = Number.isInteger(saved.seq) && saved.seq > 0 ? saved.seq : 0;
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
          JSON.stringify({ conversation: this.conversation, epoch: this.epoch, seq: this.lastSeq }),
        );
      } else {
        this.storage.removeItem(this.storageKey);
      }
    } catch {
      /* storage full or unavailable: resuming is best effort */
    }
  }

  /** @private Builds the URL for the next connection attempt. */
  socketUrl() {
    const u = new URL(this.endpoint, globalThis.location?.href);
    if (this.token) {
      // The token names the tenant and user; the hub takes them from it alone.
      u.searchParams.set('token', this.token);
    } else {
      u.searchParams.set('tenant', this.tenant);
      u.searchParams.set('user', this.user);
    }
    // A conversation exists from its first stored message on: with nothing seen and nothing sent,
    // naming it would only get 4004, so let the hub choose (the user's most recent, or a new one).
    if (this.conversation && (this.lastSeq > 0 || this.outbox.size > 0)) {
      u.searchParams.set('conversation', this.conversation);
      u.searchParams.set('after', String(this.lastSeq));
      // Lets the hub tell us (`history_lost`) if this conversation's log was lost and recreated.
      if (this.epoch) u.searchParams.set('epoch', this.epoch);
    }
    return u.toString();
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

    if (code === CloseCode.CONVERSATION_NOT_FOUND) {
      // The hub does not know our conversation: start a new one (queued messages go there).
      this.resetConversation();
    } else if (code === CloseCode.TOO_BIG) {
      // The hub refused a frame: the last message we wrote is the likely culprit. Drop it so a
      // reconnect does not resend it forever.
      const id = this.sentOnSocket.filter((x) => this.outbox.has(x)).pop();
      if (id) {
        this.outbox.delete(id);
        this.emit('error', { code: 'frame_too_big', message: 'That message is too long to send.', id });
      }
    }

    if (FINAL_CLOSE_CODES.has(code)) {
      this.stopped = true;
      globalThis.removeEventListener?.('online', this.onOnline);
      this.setStatus('closed', { code, reason });
      return;
    }
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
  write(frame) {
    if (!this.ws || this.ws.readyState !== 1) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  /** @private */
  transmit(id, text) {
    if (this.write({ type: 'message', id, text })) this.sentOnSocket.push(id);
  }

  /** @private Records a durable seq; returns false if it was seen already. */
  markSeq(seq) {
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
      this.markSeq(this.lastSeq + 1);
      return true;
    }
    this.persist();
    return true;
  }

  /** @private */
  acknowledge(id, seq) {
    if (!this.outbox.has(id)) return; // already acked (e.g. a resend crossed a replay)
    this.outbox.delete(id);
    this.emit('ack', { id, seq });
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
        break;
      case 'ready': {
        const previous = this.conversation;
        const resumed = previous !== null && previous === f.conversation;
        const seq = Number.isInteger(f.seq) ? f.seq : 0;
        const epoch = typeof f.epoch === 'string' && f.epoch ? f.epoch : null;
        this.lastReady = { seq, epoch };
        let rewound = false;
        if (!resumed) {
          this.conversation = f.conversation;
          this.epoch = epoch;
          this.seenAbove.clear();
          // Without `after` the hub replays nothing: start from its current seq.
          this.lastSeq = seq;
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
        this.persist();
        this.attempt = 0;
        this.setStatus('open');
        this.emit('ready', { conversation: f.conversation, seq: f.seq, epoch });
        if (rewound) this.startOver('rewound');
        this.startHeartbeat();
        // Resend everything not yet acknowledged, oldest first, with the same ids.
        for (const [id, text] of this.outbox) this.transmit(id, text);
        break;
      }
      case 'ack':
        this.markSeq(f.seq);
        this.acknowledge(f.id, f.seq);
        break;
      case 'queued': {
        // Only while the reply has not started: a late one must not revive a finished reply.
        if (this.doneReplies.has(f.reply) || this.streams.has(f.reply)) return;
        const position = Number.isInteger(f.position) && f.position > 0 ? f.position : null;
        this.emit('queued', { conversation: f.conversation, reply: f.reply, position });
        break;
      }
      case 'reply.delta': {
        if (this.doneReplies.has(f.reply)) return;
        let tokens = this.streams.get(f.reply);
        if (!tokens) this.streams.set(f.reply, (tokens = []));
        const index = Number.isInteger(f.index) ? f.index : tokens.length;
        if (tokens[index] !== undefined) return; // duplicate token
        tokens[index] = String(f.text ?? '');
        let content = '';
        for (const t of tokens) {
          if (t === undefined) break; // hole: show the contiguous prefix only
          content += t;
        }
        this.emit('delta', { conversation: f.conversation, reply: f.reply, index, text: tokens[index], content });
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
        if (f.from === 'assistant' && (this.streams.has(f.id) || this.doneReplies.has(f.id))) {
          // The stored form of a reply we already (partly) showed: it replaces the partial one.
          this.finishReply({ ...f, reply: f.id }, true);
          return;
        }
        if (f.from === 'assistant') rememberBounded(this.doneReplies, f.id);
        this.emit('message', {
          conversation: f.conversation, seq: f.seq, from: f.from, id: f.id, text: f.text, ...replyFlags(f),
        });
        break;
      }
      case 'error': {
        if (f.code === 'history_lost') {
          // The conversation's log was lost and recreated: nothing was replayed, and what we saw
          // before will never come back. Start over from this socket's `ready`.
          this.startOver('history_lost');
          break;
        }
        const hasId = typeof f.id === 'string';
        let retry = false;
        if (hasId && RETRYABLE_ERRORS.has(f.code)) {
          // Not stored, but worth another try with the same id: the hub is busy or its store is down.
          const id = f.id;
          retry = true;
          setTimeout(() => {
            if (this.outbox.has(id) && this.ws && this.ws.readyState === 1) this.transmit(id, this.outbox.get(id));
          }, RETRY_DELAY_MS);
        } else if (hasId && REQUEUE_ERRORS.has(f.code)) {
          // Not stored; the hub closes with 4004 and the message goes to the next conversation.
          retry = true;
        } else if (hasId) {
          // The hub refused the message itself (empty, too long, ...): resending cannot help.
          this.outbox.delete(f.id);
        }
        this.emit('error', { code: f.code, message: f.message, ...(hasId ? { id: f.id, retry } : {}) });
        break;
      }
      case 'pong':
        break;
      default:
        break; // unknown frame types are ignored so the hub can add new ones
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
    this.lastSeq = ready.seq;
    this.seenAbove.clear();
    this.streams.clear();
    this.doneReplies.clear();
    this.persist();
    this.emit('reset', {
      conversation: this.conversation, seq: this.lastSeq, epoch: this.epoch, previousEpoch, reason,
    });
  }

  /** @private */
  finishReply(f, replayed) {
    if (this.doneReplies.has(f.reply)) return;
    rememberBounded(this.doneReplies, f.reply);
    this.streams.delete(f.reply);
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

/** How a reply ended, from a `reply.done` or a replayed `message` (absent flags are false). */
function replyFlags(f) {
  return { fallback: f.fallback === true, interrupted: f.interrupted === true, cancelled: f.cancelled === true };
}
