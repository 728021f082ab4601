// Herald browser client — protocol v1 (docs/protocol.md). Dependency-free ES module,
// no build step: served by the hub at /client/herald.js, typed by herald.d.ts.
//
//   import { Herald } from "/client/herald.js";
//   const herald = new Herald({ getToken: async () => accessToken });
//   herald.subscribe("user:42", (msg) => console.log(msg.event, msg.data));
//   herald.on("recovered", ({ channel, recovered }) => { if (!recovered) refetch(channel); });
//
// WebSocket (default): one connection, auth by first frame, channels added on the fly.
// SSE: EventSource on /sse with a short-lived subscribe token (EventSource cannot send
// headers). Both reconnect with capped, jittered exponential backoff and resume every
// channel from its last offset, so each message is seen exactly once, in order; a
// channel whose gap history could not fill gets a "recovered" event with
// `recovered: false` (refetch your state).

const SUBPROTOCOL = "herald.v1";
const DEFAULT_SSE_EVENTS = [
  "message",
  "user.created",
  "user.updated",
  "user.status_changed",
  "user.deleted",
];
const TERMINAL_REASONS = {
  4500: "bad_protocol",
  4501: "unauthorized",
  4502: "auth_timeout",
  4503: "forbidden_origin",
  4504: "user_disabled",
};

/** An error reported by the hub (or the client giving up). */
export class HeraldError extends Error {
  constructor(code, message, details = {}) {
    super(`${code}: ${message}`);
    this.name = "HeraldError";
    this.code = code;
    this.detail = message;
    this.channel = details.channel ?? null;
    this.closeCode = details.closeCode ?? null;
    this.status = details.status ?? null;
    this.terminal = details.terminal ?? false;
  }
}

function parseOffset(token) {
  if (typeof token !== "string") return null;
  const i = token.indexOf(":");
  if (i < 1) return null;
  const seq = Number(token.slice(0, i));
  const epoch = token.slice(i + 1);
  if (!Number.isSafeInteger(seq) || !epoch) return null;
  return { seq, epoch };
}

/** Whether a message at `offset` is new after `last` (same epoch and later, or a new epoch). */
function follows(offset, last) {
  const a = parseOffset(offset);
  const b = parseOffset(last);
  if (!a) return false;
  return !b || a.epoch !== b.epoch || a.seq > b.seq;
}

let CRC_TABLE = null;
function crc32(text) {
  if (!CRC_TABLE) {
    CRC_TABLE = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      CRC_TABLE[n] = c >>> 0;
    }
  }
  let crc = 0xffffffff;
  for (const byte of new TextEncoder().encode(text)) {
    crc = CRC_TABLE[(crc ^ byte) & 0xff] ^ (crc >>> 8);
  }
  return ((crc ^ 0xffffffff) >>> 0).toString(16).padStart(8, "0");
}

/** The SSE resume cursor for `channels` (sorted) from per-channel offsets. */
export function buildCursor(channels, offsets) {
  const sorted = [...channels].sort();
  return `${crc32(sorted.join("\n"))}.${sorted.map((ch) => offsets.get(ch) ?? "").join(",")}`;
}

/**
 * What to do after a connection ended: "immediate", "backoff", "refresh" (reconnect
 * with a fresh token) or "terminal". A `bye` payload wins over the bare close code.
 */
export function classifyClose(code, bye) {
  let reason = bye?.code ?? TERMINAL_REASONS[code] ?? "";
  let reconnect = typeof bye?.reconnect === "boolean" ? bye.reconnect : !(code >= 4500 && code <= 4999);
  if (code === 4003 || reason === "token_expired") return { action: "refresh", reason: "token_expired" };
  if (!reconnect) return { action: "terminal", reason: reason || "refused" };
  if (code === 1001 || reason === "shutdown") return { action: "immediate", reason: reason || "shutdown" };
  return { action: "backoff", reason: reason || `closed ${code}` };
}

/**
 * A resilient connection to a Herald hub.
 *
 * Events (`on(type, fn)`): "message" (every message), "connected", "disconnected",
 * "subscribed" (the hub confirmed a channel: what is published from now on arrives),
 * "recovered" (after a resume: `{channel, recovered, since, offset}`), "error",
 * "state" (the state string changed).
 */
export class Herald {
  constructor(options = {}) {
    const origin = typeof location !== "undefined" ? location.origin : "";
    this.url = String(options.url ?? origin).replace(/\/+$/, "").replace(/\/(ws|sse)$/, "");
    if (!options.getToken && !options.token) throw new TypeError("pass getToken or token");
    this.getToken = options.getToken ?? (async () => options.token);
    this.canRefresh = Boolean(options.getToken);
    this.getSubscribeToken = options.getSubscribeToken ?? null;
    this.transport = options.transport === "sse" ? "sse" : "websocket";
    this.backoff = { initial: 250, max: 15000, factor: 2, jitter: 0.5, ...(options.backoff ?? {}) };
    this.refreshMargin = options.refreshMargin ?? 30;
    this.sseEvents = new Set([...DEFAULT_SSE_EVENTS, ...(options.sseEvents ?? [])]);
    this.state = "idle";
    this.node = null;
    this.expiresAt = null;
    this.reconnects = 0;
    this._listeners = new Map();
    this._channels = new Map(); // channel -> { refs, handlers:Set, offset, onServer }
    this._attempt = 0;
    this._refreshFailures = 0;
    this._timers = new Set();
    this._ws = null;
    this._es = null;
    this._cursor = null; // { key, id } last SSE id and the channel set it belongs to
    this._nextId = 1;
    this._pending = new Map(); // request id -> { kind, channel, since }
    this._bye = null;
    this._lastError = null;
    this._opened = false;
    this._onOnline = () => {
      if (this._waiting) this._reconnectNow();
    };
    if (typeof window !== "undefined") window.addEventListener("online", this._onOnline);
    if (options.autoConnect !== false) queueMicrotask(() => this.connect());
  }

  // -- events -----------------------------------------------------------------------------

  /** Listen for an event; returns a function that removes the listener. */
  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return () => this.off(type, fn);
  }

  off(type, fn) {
    this._listeners.get(type)?.delete(fn);
  }

  _emit(type, payload) {
    for (const fn of [...(this._listeners.get(type) ?? [])]) {
      try {
        fn(payload);
      } catch (err) {
        console.error(`herald: "${type}" listener failed`, err);
      }
    }
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit("state", state);
  }

  // -- channels -----------------------------------------------------------------------------

  /**
   * Subscribe to `channel`; `handler(msg)` gets its messages. `options.since` resumes
   * from a stored offset. Returns `{ channel, unsubscribe(), offset }`.
   */
  subscribe(channel, handler, options = {}) {
    let entry = this._channels.get(channel);
    const added = !entry;
    if (!entry) {
      entry = { refs: 0, handlers: new Set(), offset: options.since ?? null, onServer: false };
      this._channels.set(channel, entry);
    }
    entry.refs += 1;
    if (handler) entry.handlers.add(handler);
    if (added) this._channelsChanged();
    let active = true;
    return {
      channel,
      get offset() {
        return entry.offset;
      },
      unsubscribe: () => {
        if (!active) return;
        active = false;
        if (handler) entry.handlers.delete(handler);
        entry.refs -= 1;
        if (entry.refs <= 0 && this._channels.get(channel) === entry) {
          this._channels.delete(channel);
          this._channelsChanged(channel);
        }
      },
    };
  }

  /** Listen to more SSE event names (EventSource needs each name up front). */
  listen(eventName) {
    if (this.sseEvents.has(eventName)) return;
    this.sseEvents.add(eventName);
    this._es?.addEventListener(eventName, this._sseHandler);
  }

  /** The last offset processed per channel (store it, pass it back as `since`). */
  get offsets() {
    const out = {};
    for (const [ch, entry] of this._channels) if (entry.offset) out[ch] = entry.offset;
    return out;
  }

  _channelsChanged(removed) {
    if (this.transport === "websocket") {
      if (this.state !== "connected") return;
      if (removed) this._send({ op: "unsubscribe", channel: removed, id: this._id("unsubscribe", removed) });
      this._syncSubscriptions();
    } else if (this.state === "connected" || this.state === "connecting") {
      this._closeTransport();
      this._reconnectNow();
    } else if (this.state === "idle" && this._opened) {
      this._reconnectNow();
    }
  }

  // -- lifecycle ----------------------------------------------------------------------------

  /** Open the connection (called automatically unless `autoConnect: false`). */
  connect() {
    if (this.state === "closed" || this.state === "failed") return;
    if (this._ws || this._es || this.state === "connecting") return;
    this._opened = true;
    this._clearTimers();
    this._waiting = false;
    if (this.transport === "sse") {
      if (this._channels.size === 0) {
        this._setState("idle");
        return;
      }
      this._openSSE();
    } else {
      this._openWebSocket();
    }
  }

  /** Close for good; no reconnect. */
  close() {
    this._clearTimers();
    this._closeTransport();
    if (typeof window !== "undefined") window.removeEventListener("online", this._onOnline);
    const was = this.state;
    this._setState("closed");
    if (was === "connected") this._emit("disconnected", { code: 1000, reason: "client_closed", reconnect: false });
  }

  _closeTransport() {
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(1000);
      } catch {
        /* already closed */
      }
    }
    const es = this._es;
    this._es = null;
    if (es) es.close();
    for (const entry of this._channels.values()) entry.onServer = false;
    this._pending.clear();
  }

  _timer(fn, ms) {
    const t = setTimeout(() => {
      this._timers.delete(t);
      fn();
    }, ms);
    this._timers.add(t);
    return t;
  }

  _clearTimers() {
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    this._watchdog = null;
  }

  _connectionEnded(code, bye, error) {
    const wasConnected = this.state === "connected";
    this._clearTimers();
    this._closeTransport();
    if (this.state === "closed") return;
    let { action, reason } = classifyClose(code, bye);
    if (error?.code === "token_expired" && this.canRefresh) action = "refresh";
    if (action === "refresh") {
      this._refreshFailures = wasConnected ? 0 : this._refreshFailures + 1;
      if (!this.canRefresh || this._refreshFailures >= 2) action = "terminal";
    }
    const reconnect = action !== "terminal";
    if (wasConnected) this._emit("disconnected", { code, reason, reconnect });
    if (!reconnect) {
      const err =
        error ?? new HeraldError(reason, bye?.message ?? `connection closed (${code})`, { closeCode: code });
      err.terminal = true;
      err.closeCode = code;
      this._setState("failed");
      this._emit("error", err);
      return;
    }
    let delay;
    if ((action === "immediate" && wasConnected) || action === "refresh") {
      delay = Math.random() * 250;
    } else {
      const b = this.backoff;
      const ceiling = Math.min(b.max, b.initial * b.factor ** Math.min(this._attempt, 64));
      delay = ceiling * (1 - b.jitter * Math.random());
      this._attempt += 1;
    }
    this._setState("reconnecting");
    this._waiting = true;
    this._timer(() => this._reconnectNow(), delay);
  }

  _reconnectNow() {
    this._clearTimers();
    this._waiting = false;
    if (this.state === "closed" || this.state === "failed") return;
    this.reconnects += this._opened ? 1 : 0;
    this._setState("idle");
    this.connect();
  }

  _connected(frame) {
    this._attempt = 0;
    this.node = frame.node ?? null;
    this.expiresAt = typeof frame.expires_at === "number" ? frame.expires_at : null;
    this._setState("connected");
    this._emit("connected", { transport: this.transport, node: this.node, subject: frame.subject ?? null });
  }

  // -- delivery -----------------------------------------------------------------------------

  _deliver(env) {
    const entry = this._channels.get(env.channel);
    if (!entry || !follows(env.offset, entry.offset)) return;
    entry.offset = env.offset;
    const msg = { channel: env.channel, event: env.event, data: env.data, offset: env.offset, ts: env.ts };
    for (const fn of [...entry.handlers]) {
      try {
        fn(msg);
      } catch (err) {
        console.error("herald: channel handler failed", err);
      }
    }
    this._emit("message", msg);
  }

  /** The hub confirmed `channel` at `offset` (its top), after a subscribe with `since`. */
  _subscribed(channel, offset, recovered, since) {
    const entry = this._channels.get(channel);
    if (!entry) return;
    if (!since) {
      if (follows(offset, entry.offset)) entry.offset = offset;
    } else if (!recovered) {
      entry.offset = offset;
    }
    // From here on, everything published on the channel is delivered.
    this._emit("subscribed", { channel, offset });
    if (since) this._emit("recovered", { channel, recovered: Boolean(recovered), since, offset });
  }

  // -- WebSocket ----------------------------------------------------------------------------

  _id(kind, channel, since = null) {
    const id = this._nextId++;
    this._pending.set(id, { kind, channel, since });
    return id;
  }

  _send(frame) {
    if (this._ws && this._ws.readyState === WebSocket.OPEN) this._ws.send(JSON.stringify(frame));
  }

  async _openWebSocket() {
    this._setState("connecting");
    this._bye = null;
    this._lastError = null;
    let token;
    try {
      token = await this.getToken();
    } catch (err) {
      this._emit("error", new HeraldError("token_provider", String(err?.message ?? err)));
      this._connectionEnded(1006, null, null);
      return;
    }
    if (this.state !== "connecting") return; // closed meanwhile
    const wsUrl = this.url.replace(/^http/, "ws") + "/ws";
    let ws;
    try {
      ws = new WebSocket(wsUrl, SUBPROTOCOL);
    } catch (err) {
      this._setState("failed");
      this._emit("error", new HeraldError("bad_url", String(err?.message ?? err), { terminal: true }));
      return;
    }
    this._ws = ws;
    ws.onopen = () => ws.send(JSON.stringify({ op: "auth", token, id: 0 }));
    ws.onmessage = (event) => {
      this._kickWatchdog();
      for (const line of String(event.data).split("\n")) {
        if (!line.trim()) continue;
        let obj;
        try {
          obj = JSON.parse(line);
        } catch {
          this._emit("error", new HeraldError("bad_frame", "server frame is not JSON"));
          continue;
        }
        this._onFrame(obj);
      }
    };
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._connectionEnded(event.code, this._bye, this._authError(event.code));
    };
  }

  _authError(code) {
    const e = this._lastError;
    if (!e || this.state === "connected") return null;
    return new HeraldError(e.code, e.message ?? "", { closeCode: code });
  }

  _onFrame(obj) {
    switch (obj.op) {
      case "message":
        this._deliver(obj);
        break;
      case "connected":
        this._connected(obj);
        this._kickWatchdog(obj.heartbeat);
        this._scheduleRefresh();
        this._syncSubscriptions();
        break;
      case "ack":
        this._onAck(obj);
        break;
      case "error":
        this._onError(obj);
        break;
      case "bye":
        this._bye = obj;
        break;
      case "ping":
        this._send({ op: "pong" });
        break;
      default:
        break; // pong, and ops this client does not know
    }
  }

  _syncSubscriptions() {
    for (const [channel, entry] of this._channels) {
      if (entry.onServer) continue;
      entry.onServer = true;
      const since = entry.offset;
      const frame = { op: "subscribe", channel };
      if (since) frame.since = since;
      frame.id = this._id("subscribe", channel, since);
      this._send(frame);
    }
  }

  _onAck(obj) {
    const req = this._pending.get(obj.id);
    if (!req) return;
    this._pending.delete(obj.id);
    if (req.kind === "subscribe") this._subscribed(req.channel, obj.offset, obj.recovered, req.since);
    else if (req.kind === "refresh" && typeof obj.expires_at === "number") {
      this.expiresAt = obj.expires_at;
      this._scheduleRefresh();
    }
  }

  _onError(obj) {
    const req = this._pending.get(obj.id);
    this._pending.delete(obj.id);
    if (this.state !== "connected") {
      this._lastError = obj; // the auth failure; the close follows
      return;
    }
    const err = new HeraldError(obj.code, obj.message ?? "", { channel: req?.channel ?? null });
    if (req?.kind === "subscribe" && obj.code !== "already_subscribed") {
      const entry = this._channels.get(req.channel);
      if (entry) entry.onServer = false;
      this._channels.delete(req.channel);
    }
    this._emit("error", err);
  }

  _kickWatchdog(heartbeat) {
    if (heartbeat) this._heartbeat = heartbeat;
    if (!this._heartbeat || this.transport !== "websocket") return;
    if (this._watchdog) {
      clearTimeout(this._watchdog);
      this._timers.delete(this._watchdog);
    }
    // The hub sends something at least every heartbeat; silence means a dead link.
    this._watchdog = this._timer(() => {
      if (this._ws) this._connectionEnded(4002, { code: "heartbeat_timeout", reconnect: true }, null);
    }, (this._heartbeat * 2 + 5) * 1000);
  }

  _scheduleRefresh() {
    if (!this.canRefresh || !this.expiresAt || this.transport !== "websocket") return;
    const remaining = this.expiresAt - Date.now() / 1000;
    const margin = Math.min(this.refreshMargin, Math.max(remaining / 3, 1));
    const ws = this._ws;
    this._timer(async () => {
      if (this._ws !== ws || this.state !== "connected") return;
      try {
        const token = await this.getToken();
        this._send({ op: "refresh", token, id: this._id("refresh", null) });
      } catch (err) {
        this._emit("error", new HeraldError("token_provider", String(err?.message ?? err)));
      }
    }, Math.max(remaining - margin, 0.5) * 1000);
  }

  // -- SSE ------------------------------------------------------------------------------------

  async _subscribeToken() {
    if (this.getSubscribeToken) return this.getSubscribeToken();
    const access = await this.getToken();
    const response = await fetch(`${this.url}/api/v1/tokens/subscribe`, {
      method: "POST",
      headers: { Authorization: `Bearer ${access}` },
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const e = body?.error ?? {};
      throw new HeraldError(e.code ?? "unauthorized", e.message ?? `HTTP ${response.status}`, {
        status: response.status,
      });
    }
    return body.token;
  }

  /** Why a /sse request is refused, if it is refused for good (null: retry later). */
  async _probeSSE(url) {
    const ctrl = new AbortController();
    try {
      const response = await fetch(url, { signal: ctrl.signal, headers: { Accept: "text/event-stream" } });
      if (response.ok || response.status === 429 || response.status >= 500) {
        ctrl.abort();
        return null;
      }
      const body = await response.json().catch(() => ({}));
      const e = body?.error ?? {};
      return {
        status: response.status,
        code: e.code ?? (response.status === 403 ? "forbidden" : "unauthorized"),
        message: e.message ?? `HTTP ${response.status}`,
      };
    } catch {
      return null;
    }
  }

  async _openSSE() {
    this._setState("connecting");
    const channels = [...this._channels.keys()].sort();
    const key = channels.join("\n");
    let token;
    try {
      token = await this._subscribeToken();
    } catch (err) {
      const terminal = err instanceof HeraldError && (err.status === 401 || err.status === 403);
      this._connectionEnded(terminal ? 4501 : 1006, terminal ? { code: err.code, message: err.detail, reconnect: false } : null, terminal ? err : null);
      return;
    }
    if (this.state !== "connecting") return;
    const params = new URLSearchParams();
    for (const ch of channels) params.append("channel", ch);
    params.set("token", token);
    // Every message as the default "message" event: EventSource cannot listen to
    // names it does not know in advance.
    params.set("named", "0");
    const sent = new Map();
    for (const ch of channels) {
      const offset = this._channels.get(ch)?.offset;
      if (offset) sent.set(ch, offset);
    }
    if (sent.size) {
      const cursor = this._cursor?.key === key ? this._cursor.id : buildCursor(channels, sent);
      params.set("lastEventId", cursor);
    }
    const url = `${this.url}/sse?${params}`;
    const es = new EventSource(url);
    this._es = es;
    this._sseHandler = (event) => {
      if (this._es !== es) return;
      let env;
      try {
        env = JSON.parse(event.data);
      } catch {
        return;
      }
      if (env.op === "message") this._deliver(env);
      if (event.lastEventId) this._cursor = { key, id: event.lastEventId };
    };
    for (const name of this.sseEvents) es.addEventListener(name, this._sseHandler);
    es.addEventListener("connected", (event) => {
      if (this._es !== es) return;
      const frame = JSON.parse(event.data);
      this._connected(frame);
      for (const ch of channels) {
        const info = frame.channels?.[ch];
        if (!info) continue;
        // `recovered` is present when a cursor was sent (ours, or EventSource's own
        // Last-Event-ID on its reconnects); it then resumed from our current offset.
        const since = "recovered" in info ? (this._channels.get(ch)?.offset ?? null) : null;
        this._subscribed(ch, info.offset, info.recovered, since);
      }
      if (event.lastEventId) this._cursor = { key, id: event.lastEventId };
    });
    es.addEventListener("disconnect", (event) => {
      if (this._es !== es) return;
      let bye = null;
      try {
        bye = JSON.parse(event.data);
      } catch {
        /* keep null */
      }
      this._connectionEnded(bye?.close_code ?? 1000, bye, null);
    });
    es.onerror = async () => {
      if (this._es !== es) return;
      if (es.readyState === EventSource.CLOSED) {
        // EventSource gave up on an HTTP error, which it does not expose: ask once more
        // with fetch to tell "refused for good" (401/403/400) from "try again later".
        const refused = this.state === "connecting" ? await this._probeSSE(url) : null;
        if (this._es !== es) return;
        if (refused) {
          const bye = { code: refused.code, message: refused.message, reconnect: false };
          const err = new HeraldError(refused.code, refused.message, { status: refused.status });
          this._connectionEnded(4501, bye, err);
        } else {
          // e.g. the subscribe token expired: take over with a fresh one and ?lastEventId=.
          this._connectionEnded(1006, null, null);
        }
      } else if (this.state === "connected") {
        // EventSource reconnects by itself, sending Last-Event-ID.
        this.reconnects += 1;
        this._setState("connecting");
        this._emit("disconnected", { code: 1006, reason: "network", reconnect: true });
      }
    };
  }
}

export default Herald;
