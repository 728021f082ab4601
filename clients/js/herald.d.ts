// Type declarations for herald.js, the Herald browser client (protocol v1).
// Served by the hub at /client/herald.d.ts next to /client/herald.js.

/** One message published on a channel. */
export interface HeraldMessage<T = unknown> {
  channel: string;
  /** Event name, e.g. "user.updated". */
  event: string;
  /** Exactly the JSON that was published. */
  data: T;
  /** Opaque "<seq>:<epoch>" token; pass it back as `since` to resume after this message. */
  offset: string;
  /** Publish time, milliseconds since the Unix epoch. */
  ts: number;
}

export interface ConnectedEvent {
  transport: "websocket" | "sse";
  /** The hub worker holding this connection. */
  node: string | null;
  subject: string | null;
}

export interface DisconnectedEvent {
  /** WebSocket close code (SSE: the `close_code` of the hub's `disconnect` event). */
  code: number;
  /** e.g. "shutdown", "slow_consumer", "force_reconnect", "user_disabled". */
  reason: string;
  /** Whether the client will reconnect by itself. */
  reconnect: boolean;
}

/** The hub confirmed a channel: everything published on it from now on is delivered. */
export interface SubscribedEvent {
  channel: string;
  /** Where the channel stood when confirmed. */
  offset: string;
}

/** After a resume: `recovered: false` means messages were lost — refetch your state. */
export interface RecoveredEvent {
  channel: string;
  recovered: boolean;
  /** The offset the client resumed from. */
  since: string;
  /** Where the channel stands now. */
  offset: string;
}

export type HeraldState =
  | "idle"
  | "connecting"
  | "connected"
  | "reconnecting"
  | "failed"
  | "closed";

export interface HeraldEvents {
  message: HeraldMessage;
  connected: ConnectedEvent;
  disconnected: DisconnectedEvent;
  subscribed: SubscribedEvent;
  recovered: RecoveredEvent;
  error: HeraldError;
  state: HeraldState;
}

export interface BackoffOptions {
  /** First delay in ms (default 250). */
  initial?: number;
  /** Cap in ms (default 15000). */
  max?: number;
  /** Growth per attempt (default 2). */
  factor?: number;
  /** Fraction of the delay that is random, 0..1 (default 0.5). */
  jitter?: number;
}

export interface HeraldOptions {
  /** Hub base URL (default: the page's origin). */
  url?: string;
  /** Returns a valid access token; called before each connection and to refresh it. */
  getToken?: () => Promise<string> | string;
  /** A fixed token (no refresh: the client stops when it expires). */
  token?: string;
  /** "websocket" (default) or "sse" (EventSource). */
  transport?: "websocket" | "sse";
  /** SSE only: how to get a subscribe token (default: POST /api/v1/tokens/subscribe). */
  getSubscribeToken?: () => Promise<string>;
  /**
   * SSE only: event names to listen for. EventSource cannot listen to "every event", so
   * names beyond the user.* events must be declared here or with `listen()`.
   */
  sseEvents?: string[];
  backoff?: BackoffOptions;
  /** Refresh the token this many seconds before it expires (default 30). */
  refreshMargin?: number;
  /** Connect at once (default true); otherwise call `connect()`. */
  autoConnect?: boolean;
}

export interface SubscribeOptions {
  /** Resume after this stored offset. */
  since?: string;
}

export interface HeraldSubscription {
  readonly channel: string;
  /** The last offset processed on this channel. */
  readonly offset: string | null;
  unsubscribe(): void;
}

export declare class HeraldError extends Error {
  readonly code: string;
  readonly detail: string;
  readonly channel: string | null;
  readonly closeCode: number | null;
  readonly status: number | null;
  /** True when the client gave up (no reconnect without a change, e.g. a new token). */
  terminal: boolean;
}

export declare class Herald {
  constructor(options: HeraldOptions);
  readonly url: string;
  readonly transport: "websocket" | "sse";
  readonly state: HeraldState;
  readonly node: string | null;
  /** Expiry of the current token, Unix seconds. */
  readonly expiresAt: number | null;
  readonly reconnects: number;
  /** The last offset processed per channel. */
  readonly offsets: Record<string, string>;

  on<K extends keyof HeraldEvents>(type: K, fn: (event: HeraldEvents[K]) => void): () => void;
  off<K extends keyof HeraldEvents>(type: K, fn: (event: HeraldEvents[K]) => void): void;
  subscribe<T = unknown>(
    channel: string,
    handler?: (message: HeraldMessage<T>) => void,
    options?: SubscribeOptions,
  ): HeraldSubscription;
  /** SSE: also listen for this event name. */
  listen(eventName: string): void;
  connect(): void;
  close(): void;
}

/** The SSE resume cursor of `channels` from per-channel offsets. */
export declare function buildCursor(channels: Iterable<string>, offsets: Map<string, string>): string;

export declare function classifyClose(
  code: number,
  bye?: { code?: string; reconnect?: boolean } | null,
): { action: "immediate" | "backoff" | "refresh" | "terminal"; reason: string };

export default Herald;
