"""RedisBroker: fan-out, history and shared state for any number of workers over Redis.

See :class:`hub.broker.base.Broker` for the contract. How this backend meets it:

Keys (cluster-safe: every key a script touches for channel ``C`` carries the hash tag
``{C}``, so they live in one slot; channel names never contain braces)::

    <prefix>:meta:{C}      hash  e=epoch, o=last offset          TTL meta_ttl, per publish
    <prefix>:stream:{C}    stream, entry id "<offset>-1",         TTL history_ttl, per publish
                           fields t=ts (ms), e=event, d=data
    <prefix>:ch:{C}        pub/sub channel of C (same slot as its keys: ready for SPUBLISH)
    <prefix>:control       pub/sub channel of control commands (every worker)
    <prefix>:canary:<id>   pub/sub channel of this worker's delivery canary
    <prefix>:presence:{C}      hash  client id -> user id        TTL: its newest entry's
    <prefix>:presence-exp:{C}  zset  client id -> expiry (ms)     TTL: its newest entry's
    <prefix>:nbf:<user>    string, revocation timestamp, EX ttl
    <prefix>:rl:<key>      string, GCRA theoretical arrival time (us), PX until full again

History size and TTL are per channel: its namespace's (``BrokerConfig.history_overrides``)
or the defaults, passed to the scripts as arguments (one script serves every namespace).

Publish is one Lua script: create the epoch if the meta hash is missing (a random
candidate passed as ARGV, so it is new whenever the hash was lost; the stale stream is
then deleted), ``HINCRBY`` the offset, ``XADD`` with id ``<offset>-1`` and
``MAXLEN ~ history_size``, refresh both TTLs, then ``PUBLISH`` ``offset\\nepoch\\nts\\n
event\\n`` followed by the raw data bytes. History and live delivery cannot disagree.

History age: stream ids are offsets, so ``XTRIM MINID`` cannot trim by time. Length is
bounded by ``MAXLEN ~`` (reads additionally cap to exactly ``history_size`` entries, as
the approximate trim may keep a few more); age is bounded for a quiet channel by the
stream key's TTL (``history_ttl`` after the last publication) and, for a busy one, at
read time: entries older than ``history_ttl`` are never returned, and the read that
first finds them trims them (``XTRIM MINID``). The meta hash lives longer
(``meta_ttl``, default 30 days and at least ``history_ttl``) so offsets and epoch stay
stable across quiet periods, as with the memory backend.

Live delivery: one dedicated pub/sub connection (RESP2, no socket read timeout, TCP
keepalive) read by one task that calls the handler synchronously in arrival order.
Dead connections are found by our own health check: when nothing arrived for
``health_check_interval`` seconds a PING is sent, and no answer within
``health_check_timeout`` aborts the connection. On any connection error the reader
reports ``on_broker_state(False)``, reconnects with capped jittered backoff, subscribes
the control channel, the canary and every remembered channel, and reports
``on_broker_state(True)`` once Redis confirmed them all. Publications that arrive while
subscriptions are being restored are not delivered (they are in history).

Commands (publish, history, ...) use a separate bounded pool with short connect and
command timeouts and no retries (a retried publish could be published twice), so they
fail fast with :class:`BrokerUnavailable` when Redis is down. A timed-out publish is
ambiguous: it may have been applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import random
import secrets
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.connection import BlockingConnectionPool, Connection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.maint_notifications import MaintNotificationsConfig

from ..protocol import Publication, StreamPosition
from .base import (
    Broker,
    BrokerHandler,
    BrokerUnavailable,
    HistoryResult,
    PublishRequest,
    RateLimitResult,
)

if TYPE_CHECKING:
    from . import BrokerConfig

logger = logging.getLogger("herald.broker")

_SUBSCRIBE_CHUNK = 1000  # channels per SUBSCRIBE / UNSUBSCRIBE command
_ERRORS = (RedisError, OSError, TimeoutError)

# Shared by the read scripts: make sure the channel has an epoch; sets ``epoch``, ``top``.
# KEYS[1] meta hash, KEYS[2] stream; ARGV[1] epoch candidate, ARGV[2] meta TTL (ms).
# The Redis server's time in milliseconds, as ``now_ms`` (a prefix of the scripts below).
_NOW_MS_LUA = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
"""

_ENSURE_EPOCH_LUA = """
local meta = redis.call('HMGET', KEYS[1], 'e', 'o')
local epoch = meta[1]
local top = tonumber(meta[2] or '0')
if not epoch then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('HSETNX', KEYS[1], 'e', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  epoch = ARGV[1]
  top = 0
end
"""

# KEYS[1] meta, KEYS[2] stream; ARGV: 1 epoch candidate, 2 meta TTL ms, 3 history size,
# 4 history TTL ms, 5 pub/sub channel, 6 event, 7 data. Returns {offset, epoch, ts}.
_PUBLISH_LUA = (
    _NOW_MS_LUA
    + """
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('HSETNX', KEYS[1], 'e', ARGV[1])
  epoch = ARGV[1]
end
local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local ts = now_ms
if tonumber(ARGV[3]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], offset .. '-1',
             't', ts, 'e', ARGV[6], 'd', ARGV[7])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
redis.call('PUBLISH', ARGV[5],
           offset .. '\\n' .. epoch .. '\\n' .. ts .. '\\n' .. ARGV[6] .. '\\n' .. ARGV[7])
return {offset, epoch, ts}
"""
)

# KEYS[1] meta, KEYS[2] stream; ARGV[1] epoch candidate, ARGV[2] meta TTL ms.
_POSITION_LUA = (
    _ENSURE_EPOCH_LUA
    + """
return {epoch, top}
"""
)

# KEYS[1] meta; ARGV[1] the epoch seen, ARGV[2] the offset seen, ARGV[3] a new epoch.
# Lost writes: the top went back in the same epoch. Returns 1 if the epoch was replaced.
_RESET_EPOCH_LUA = """
local meta = redis.call('HMGET', KEYS[1], 'e', 'o')
if meta[1] ~= ARGV[1] or tonumber(meta[2] or '0') >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'e', ARGV[3])
return 1
"""

# KEYS[1] meta, KEYS[2] stream; ARGV: 1 epoch candidate, 2 meta TTL ms, 3 history size,
# 4 history TTL ms, 5 since offset ('' = none), 6 since epoch, 7 limit (-1 = none).
# Returns {epoch, top, recovered, id1, ts1, event1, data1, id2, ...}.
_HISTORY_LUA = (
    _NOW_MS_LUA
    + _ENSURE_EPOCH_LUA
    + """
local first = top - tonumber(ARGV[3]) + 1
if first < 1 then first = 1 end
local limit = tonumber(ARGV[7])
local horizon = now_ms - tonumber(ARGV[4])
local function ts_of(entry) return tonumber(entry[2][2]) end
local function pack(entries, out)
  for i = 1, #entries do
    local entry = entries[i]
    local f = entry[2]
    out[#out + 1] = entry[1]
    out[#out + 1] = f[2]
    out[#out + 1] = f[4]
    out[#out + 1] = f[6]
  end
  return out
end
if ARGV[5] ~= '' then
  local since = tonumber(ARGV[5])
  if ARGV[6] ~= epoch or since > top or since + 1 < first then return {epoch, top, 0} end
  if since == top then return {epoch, top, 1} end
  local count = top - since
  if limit >= 0 and limit < count then count = limit end
  local want = count
  if want < 1 then want = 1 end
  local entries = redis.call('XRANGE', KEYS[2], (since + 1) .. '-0', '+', 'COUNT', want)
  local head = entries[1]
  if not head or head[1] ~= (since + 1) .. '-1' or ts_of(head) < horizon then
    return {epoch, top, 0}
  end
  if count == 0 then return {epoch, top, 1} end
  return pack(entries, {epoch, top, 1})
end
local head = redis.call('XRANGE', KEYS[2], first .. '-0', '+', 'COUNT', 1)[1]
if not head then return {epoch, top, 1} end
local start = tonumber(string.match(head[1], '^(%d+)'))
if ts_of(head) < horizon then
  -- expired entries are a prefix: find the first live one and trim the rest
  local lo, hi = start + 1, top + 1
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local entry = redis.call('XRANGE', KEYS[2], mid .. '-1', mid .. '-1')[1]
    if entry and ts_of(entry) >= horizon then hi = mid else lo = mid + 1 end
  end
  redis.call('XTRIM', KEYS[2], 'MINID', lo .. '-0')
  start = lo
end
local count = top - start + 1
if limit >= 0 and limit < count then count = limit end
if count <= 0 then return {epoch, top, 1} end
return pack(redis.call('XRANGE', KEYS[2], start .. '-0', '+', 'COUNT', count), {epoch, top, 1})
"""
)

# GCRA, same semantics as MemoryBroker.rate_limit, in integer microseconds of server time.
# KEYS[1] bucket; ARGV[1] emission interval (us), ARGV[2] burst.
# Returns {allowed, remaining, retry_after_us, reset_after_us}.
_RATE_LIMIT_LUA = """
local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * (tonumber(ARGV[2]) - 1)
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now_us then tat = now_us end
local allow_at = tat - tolerance
if now_us < allow_at then
  return {0, 0, math.ceil(allow_at - now_us), math.ceil(tat - now_us)}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat),
           'PX', math.max(1, math.ceil((new_tat - now_us) / 1000)))
local remaining = math.floor((tolerance - (new_tat - now_us)) / interval + 1e-9) + 1
if remaining < 0 then remaining = 0 end
return {1, remaining, 0, math.ceil(new_tat - now_us)}
"""

# A user's token not-before time only moves forward: a revocation delivered late (the
# API's outbox after an outage) must not undo a later one. KEYS[1]; ARGV[1] timestamp,
# ARGV[2] TTL (s), which is extended, never shortened.
_NOT_BEFORE_LUA = """
local current = redis.call('GET', KEYS[1])
if current and tonumber(current) >= tonumber(ARGV[1]) then
  if redis.call('TTL', KEYS[1]) < tonumber(ARGV[2]) then
    redis.call('EXPIRE', KEYS[1], ARGV[2])
  end
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""

# A user's connection slots: a sorted set slot -> expiry (ms of server time). KEYS[1];
# ARGV[1] slot, ARGV[2] limit, ARGV[3] TTL (ms). Returns 1 if the slot is now held.
_CLAIM_SLOT_LUA = (
    _NOW_MS_LUA
    + """
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if not redis.call('ZSCORE', KEYS[1], ARGV[1])
   and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now_ms + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""
)

# KEYS[1] a user's slots; ARGV[1] TTL (ms), then the slots to hold for another TTL.
_REFRESH_SLOTS_LUA = (
    _NOW_MS_LUA
    + """
local ttl = tonumber(ARGV[1])
local expire_at = now_ms + ttl
local scored = {}
for i = 2, #ARGV do
  scored[#scored + 1] = expire_at
  scored[#scored + 1] = ARGV[i]
  if #scored >= 1000 or i == #ARGV then
    redis.call('ZADD', KEYS[1], unpack(scored))
    scored = {}
  end
end
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 0
"""
)

# Presence of one channel: a hash client -> user and a sorted set client -> expiry (ms of
# server time). KEYS[1] hash, KEYS[2] sorted set; ARGV[1] TTL (ms), then client, user pairs.
# Both keys live as long as their longest-lived entry.
_PRESENCE_UPDATE_LUA = (
    _NOW_MS_LUA
    + """
local ttl = tonumber(ARGV[1])
local expire_at = now_ms + ttl
local scored, fields = {}, {}
for i = 2, #ARGV, 2 do
  scored[#scored + 1] = expire_at
  scored[#scored + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
  if #fields >= 1000 or i + 1 >= #ARGV then
    redis.call('ZADD', KEYS[2], unpack(scored))
    redis.call('HSET', KEYS[1], unpack(fields))
    scored, fields = {}, {}
  end
end
for _, key in ipairs(KEYS) do
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
return 0
"""
)

# KEYS[1] hash, KEYS[2] sorted set. Drops expired entries, returns {client, user, ...}.
_PRESENCE_GET_LUA = (
    _NOW_MS_LUA
    + """
while true do
  local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms, 'LIMIT', 0, 1000)
  if #expired == 0 then break end
  redis.call('ZREM', KEYS[2], unpack(expired))
  redis.call('HDEL', KEYS[1], unpack(expired))
end
return redis.call('HGETALL', KEYS[1])
"""
)

_KIND_SUBSCRIBE = b"subscribe"
_KIND_UNSUBSCRIBE = b"unsubscribe"
_KIND_PONG = b"pong"
_COMMAND_OF = {_KIND_SUBSCRIBE: b"SUBSCRIBE", _KIND_UNSUBSCRIBE: b"UNSUBSCRIBE"}


# Readiness checks whose canary Redis accepted but the pub/sub connection never delivered,
# in a row, before that connection is dropped and made again (see check_delivery).
CANARIES_LOST_BEFORE_RECONNECT = 3


class _ProtocolDesync(Exception):
    """The pub/sub connection answered something we did not ask for."""


class _HealthCheckFailed(Exception):
    """The pub/sub connection did not answer a PING in time."""


def _transport_of(conn: Any) -> asyncio.WriteTransport | None:
    writer = getattr(conn, "_writer", None)
    transport = getattr(writer, "transport", None)
    return transport if isinstance(transport, asyncio.WriteTransport) else None


class RedisBroker:
    """Redis pub/sub for fan-out, Redis Streams for history, Lua for atomicity."""

    def __init__(
        self,
        config: BrokerConfig,
        *,
        connect_timeout: float | None = None,
        command_timeout: float | None = None,
        health_check_interval: float | None = None,
        health_check_timeout: float | None = None,
        reconnect_backoff: tuple[float, float] = (0.1, 2.0),
        max_connections: int | None = None,
        meta_ttl: int = 30 * 24 * 3600,
    ) -> None:
        # Keyword arguments (tests) override the configuration (HERALD_REDIS_*).
        connect_timeout = config.connect_timeout if connect_timeout is None else connect_timeout
        command_timeout = config.command_timeout if command_timeout is None else command_timeout
        if health_check_interval is None:
            health_check_interval = config.health_check_interval
        if health_check_timeout is None:
            health_check_timeout = config.health_check_timeout
        max_connections = config.max_connections if max_connections is None else max_connections
        for size, ttl in [
            (config.history_size, config.history_ttl),
            *config.history_overrides.values(),
        ]:
            if size < 0 or ttl < 1:
                raise ValueError("history sizes must be >= 0 and history TTLs >= 1 second")
        self._config = config
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._health_interval = health_check_interval
        self._health_timeout = health_check_timeout
        self._backoff_base, self._backoff_cap = reconnect_backoff
        self._meta_ttl = meta_ttl
        # (history size, history TTL ms, meta TTL ms) as script arguments, per namespace
        self._limits_default = self._script_limits(config.history_size, config.history_ttl)
        self._limits_by_namespace = {
            namespace: self._script_limits(size, ttl)
            for namespace, (size, ttl) in config.history_overrides.items()
        }

        prefix = config.prefix
        self._prefix = prefix
        self._worker_id = secrets.token_hex(8)
        self._control_key = f"{prefix}:control".encode()
        self._canary_key = f"{prefix}:canary:{self._worker_id}".encode()

        url_options: dict[str, Any] = dict(parse_url(config.url))
        password = url_options.get("password")
        self._secrets = [s for s in (password,) if isinstance(s, str) and s]
        connection_class = url_options.pop("connection_class", Connection)
        url_options.pop("timeout", None)
        pool_size = int(url_options.pop("max_connections", max_connections))
        url_options["decode_responses"] = False
        url_options["retry"] = Retry(NoBackoff(), 0)

        command_options = dict(url_options)
        command_options.setdefault("socket_timeout", command_timeout)
        command_options.setdefault("socket_connect_timeout", connect_timeout)
        self._pool = BlockingConnectionPool(
            connection_class=connection_class,
            max_connections=pool_size,
            timeout=command_timeout,
            # redis-py 8 skips its stale-connection check on checkout while maintenance
            # notifications are "auto" (the RESP3 default): a pooled connection to a Redis
            # that restarted would fail the next command instead of being replaced.
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
            **command_options,
        )
        self._redis = Redis(connection_pool=self._pool)
        self._publish_script = self._redis.register_script(_PUBLISH_LUA)
        self._position_script = self._redis.register_script(_POSITION_LUA)
        self._history_script = self._redis.register_script(_HISTORY_LUA)
        self._rate_limit_script = self._redis.register_script(_RATE_LIMIT_LUA)
        self._not_before_script = self._redis.register_script(_NOT_BEFORE_LUA)
        self._claim_slot_script = self._redis.register_script(_CLAIM_SLOT_LUA)
        self._reset_epoch_script = self._redis.register_script(_RESET_EPOCH_LUA)
        self._presence_update_script = self._redis.register_script(_PRESENCE_UPDATE_LUA)
        self._presence_get_script = self._redis.register_script(_PRESENCE_GET_LUA)

        # The pub/sub connection: RESP2 (plain lists, no push handlers), no read timeout.
        self._sub_class = connection_class
        self._sub_options = dict(url_options)
        self._sub_options.update(
            socket_timeout=None,
            socket_connect_timeout=connect_timeout,
            health_check_interval=0,
            protocol=2,
        )

        self._handler: BrokerHandler | None = None
        self._closed = False
        self._connected = False  # pub/sub up and every subscription restored
        self._reported = False  # last state told to the handler (True after start)
        self._wanted: dict[bytes, str] = {}  # remembered subscriptions: key -> channel
        # Per pub/sub connection:
        self._conn: Any = None
        self._transport: asyncio.WriteTransport | None = None
        self._subs: dict[bytes, asyncio.Future[None]] = {}  # issued SUBSCRIBEs, resolved on ack
        self._acks: deque[tuple[bytes, bytes, asyncio.Future[None] | None]] = deque()
        self._ops: list[tuple[bytes, bytes, asyncio.Future[None] | None]] = []  # not yet sent
        self._flush_task: asyncio.Task[None] | None = None
        self._restore_marker: asyncio.Future[None] | None = None
        self._rx_at = 0.0
        self._ready: asyncio.Future[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._canaries: dict[bytes, asyncio.Future[None]] = {}
        self._canaries_lost = 0  # in a row, on the current pub/sub connection
        self._last_failure_log: dict[str, float] = {}

    # -- keys and limits --------------------------------------------------------------------

    def _script_limits(self, size: int, ttl: int) -> tuple[str, str, str]:
        return str(size), str(ttl * 1000), str(max(self._meta_ttl, ttl) * 1000)

    def _limits(self, channel: str) -> tuple[str, str, str]:
        """History size, history TTL (ms) and meta TTL (ms) of ``channel``: its
        namespace's (the part before ``:``) when the config overrides it."""
        if self._limits_by_namespace:
            limits = self._limits_by_namespace.get(channel.partition(":")[0])
            if limits is not None:
                return limits
        return self._limits_default

    def _channel_keys(self, channel: str) -> tuple[str, str, str]:
        if "{" in channel or "}" in channel:
            raise ValueError("channel names must not contain braces")
        tag = "{" + channel + "}"
        p = self._prefix
        return f"{p}:meta:{tag}", f"{p}:stream:{tag}", f"{p}:ch:{tag}"

    def _presence_keys(self, channel: str) -> list[str]:
        if "{" in channel or "}" in channel:
            raise ValueError("channel names must not contain braces")
        tag = "{" + channel + "}"
        return [f"{self._prefix}:presence:{tag}", f"{self._prefix}:presence-exp:{tag}"]

    def _pubsub_key(self, channel: str) -> bytes:
        return self._channel_keys(channel)[2].encode()

    # -- errors -----------------------------------------------------------------------------

    def _describe(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"[:300]
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _log_failure(self, op: str, exc: BaseException) -> None:
        now = time.monotonic()
        level = logging.DEBUG
        if now - self._last_failure_log.get(op, -math.inf) >= 10.0:
            self._last_failure_log[op] = now
            level = logging.WARNING
        if isinstance(exc, ResponseError):  # not an outage: a script or server-side error
            level = logging.WARNING
        logger.log(level, "redis %s failed: %s", op, self._describe(exc))

    @contextlib.contextmanager
    def _guard(self, op: str) -> Iterator[None]:
        """Map Redis and socket errors to :class:`BrokerUnavailable`, without their text's
        secrets and without chaining the original exception."""
        try:
            yield
        except BrokerUnavailable:
            raise
        except _ERRORS as exc:
            self._log_failure(op, exc)
            message = f"redis {op} failed: {self._describe(exc)}"
        else:
            return
        raise BrokerUnavailable(message)

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected and not self._closed

    async def start(self, handler: BrokerHandler) -> None:
        if self._supervisor is not None and not self._supervisor.done():
            raise RuntimeError("RedisBroker already started")
        self._handler = handler
        self._closed = False
        self._reported = False
        loop = asyncio.get_running_loop()
        self._ready = ready = loop.create_future()
        with self._guard("connect"):
            async with asyncio.timeout(self._connect_timeout + self._command_timeout):
                await self._redis.ping()
            conn = await self._open()
        self._supervisor = asyncio.create_task(self._supervise(conn), name="herald-redis-broker")
        await asyncio.wait([ready], timeout=self._command_timeout)
        if not ready.done() or ready.cancelled():
            await self.aclose()
            raise BrokerUnavailable("redis did not confirm the broker's subscriptions in time")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._connected = False
        tasks = [t for t in (self._supervisor, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._supervisor = None
        self._tasks.clear()
        conn = self._conn
        if conn is not None:
            await self._discard(conn)
        self._reset_connection_state()
        self._wanted.clear()
        self._canaries.clear()
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()
        with contextlib.suppress(Exception):
            await self._pool.aclose()

    # -- subscriptions ----------------------------------------------------------------------

    async def subscribe(self, channels: Sequence[str]) -> None:
        keys = []
        for channel in channels:
            key = self._pubsub_key(channel)
            self._wanted[key] = channel
            keys.append(key)
        if self._closed:
            raise BrokerUnavailable("broker is closed")
        if not self._connected or self._conn is None:
            raise BrokerUnavailable("redis pub/sub is disconnected; will subscribe on reconnect")
        waits: list[asyncio.Future[None]] = []
        for key in keys:
            fut = self._subs.get(key)
            if fut is None:
                fut = self._queue(_KIND_SUBSCRIBE, key)
            if not fut.done():
                waits.append(fut)
        if not waits:
            return
        self._kick_flush()
        # asyncio.wait neither cancels the shared futures on timeout nor when we are cancelled.
        await asyncio.wait(waits, timeout=self._command_timeout)
        if not all(f.done() and not f.cancelled() for f in waits):
            raise BrokerUnavailable("redis did not confirm the subscription in time")

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        queued = False
        for channel in channels:
            key = self._pubsub_key(channel)
            self._wanted.pop(key, None)
            if self._subs.pop(key, None) is not None and self._conn is not None:
                self._ops.append((_KIND_UNSUBSCRIBE, key, None))
                queued = True
        if queued:
            self._kick_flush()

    def _queue(self, kind: bytes, key: bytes) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if kind == _KIND_SUBSCRIBE:
            self._subs[key] = fut
        self._ops.append((kind, key, fut))
        return fut

    def _kick_flush(self) -> None:
        """Send queued (UN)SUBSCRIBE/PING commands from a task, so that calls made in the
        same loop iteration share one write and one SUBSCRIBE command."""
        conn = self._conn
        if conn is None or not self._ops:
            return
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = self._spawn(self._flush(conn), "herald-redis-flush")

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _flush(self, conn: Any) -> None:
        while self._ops and conn is self._conn:
            ops, self._ops = self._ops, []
            commands: list[list[bytes]] = []
            previous = b""
            for kind, key, fut in ops:
                self._acks.append((kind, key, fut))
                if kind == _KIND_PONG:
                    commands.append([b"PING"])
                    previous = b""
                elif kind != previous or len(commands[-1]) > _SUBSCRIBE_CHUNK:
                    commands.append([_COMMAND_OF[kind], key])
                    previous = kind
                else:
                    commands[-1].append(key)
            if not conn.is_connected:
                self._kill(conn)
                return
            try:
                async with asyncio.timeout(self._command_timeout):
                    await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            except _ERRORS as exc:
                logger.warning("redis pub/sub write failed: %s", self._describe(exc))
                self._kill(conn)
                return

    # -- the pub/sub connection -------------------------------------------------------------

    async def _open(self) -> Any:
        """Connect a new pub/sub connection and queue every subscription on it."""
        conn = self._sub_class(**self._sub_options)
        try:
            async with asyncio.timeout(self._connect_timeout + self._command_timeout):
                await conn.connect()
        except BaseException:
            await self._discard(conn)
            raise
        self._reset_connection_state()
        self._conn = conn
        self._transport = _transport_of(conn)
        self._rx_at = asyncio.get_running_loop().time()
        marker = None
        for key in (self._control_key, self._canary_key, *self._wanted):
            marker = self._queue(_KIND_SUBSCRIBE, key)
        self._restore_marker = marker
        self._kick_flush()
        return conn

    def _kill(self, conn: Any) -> None:
        """Abort a pub/sub connection at once (even with unsent data), waking its reader."""
        if conn is self._conn and self._transport is not None:
            self._transport.abort()

    async def _discard(self, conn: Any) -> None:
        transport = self._transport if conn is self._conn else _transport_of(conn)
        if transport is not None:
            transport.abort()
        with contextlib.suppress(Exception):
            await conn.disconnect(nowait=True)
        if conn is self._conn:
            self._conn = None
            self._transport = None

    def _reset_connection_state(self) -> None:
        self._canaries_lost = 0
        for fut in self._subs.values():
            fut.cancel()
        for _, _, pending in self._acks:
            if pending is not None:
                pending.cancel()
        for _, _, pending in self._ops:
            if pending is not None:
                pending.cancel()
        self._subs.clear()
        self._acks.clear()
        self._ops.clear()
        self._flush_task = None
        self._restore_marker = None
        for fut in self._canaries.values():
            fut.cancel()

    async def _supervise(self, conn: Any) -> None:
        """Run the reader on ``conn``; when it fails, reconnect, forever (until cancelled)."""
        while True:
            reader = asyncio.create_task(self._read_loop(conn), name="herald-redis-reader")
            health = asyncio.create_task(self._health_loop(conn), name="herald-redis-health")
            try:
                await self._await_restored(reader)
                await asyncio.wait([reader])
            except Exception:  # a bug here must not end reconnection: drop this connection
                logger.exception("redis pub/sub supervisor failed; reconnecting")
            finally:
                self._connected = False
                reader.cancel()
                health.cancel()
                await asyncio.gather(reader, health, return_exceptions=True)
            error = None if reader.cancelled() else reader.exception()
            if not self._closed:
                if error is not None and not isinstance(error, (*_ERRORS, _ProtocolDesync)):
                    logger.error("redis pub/sub reader failed unexpectedly", exc_info=error)
                else:
                    logger.warning(
                        "redis pub/sub connection lost (%s); reconnecting",
                        self._describe(error) if error else "closed",
                    )
            await self._discard(conn)
            self._connection_lost()
            conn = await self._reconnect()

    async def _await_restored(self, reader: asyncio.Task[None]) -> None:
        """Wait until Redis confirmed every subscription, then report the broker connected.
        Channels subscribed meanwhile (their ``subscribe`` raised) are added until none is
        missing."""
        while True:
            marker = self._restore_marker
            if marker is not None:
                await asyncio.wait([marker, reader], return_when=asyncio.FIRST_COMPLETED)
                if reader.done() or not marker.done() or marker.cancelled():
                    return
            missing = [key for key in self._wanted if key not in self._subs]
            if not missing:
                break
            for key in missing:
                marker = self._queue(_KIND_SUBSCRIBE, key)
            self._restore_marker = marker
            self._kick_flush()
        self._restore_marker = None
        self._connected = True
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)
            self._reported = True
            logger.info("redis broker connected")
        elif not self._reported:
            self._reported = True
            logger.info("redis broker reconnected; %d channels resubscribed", len(self._wanted))
            self._notify_state(True)

    def _connection_lost(self) -> None:
        self._connected = False
        self._reset_connection_state()
        if self._reported and not self._closed:
            self._reported = False
            self._notify_state(False)

    def _notify_state(self, connected: bool) -> None:
        if self._handler is None:
            return
        try:
            self._handler.on_broker_state(connected)
        except Exception:
            logger.exception("broker handler failed in on_broker_state")

    async def _reconnect(self) -> Any:
        attempt = 0
        while True:
            delay = min(self._backoff_cap, self._backoff_base * 2**attempt)
            attempt += 1
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            try:
                return await self._open()
            except _ERRORS as exc:
                level = logging.WARNING if attempt % 10 == 0 else logging.DEBUG
                logger.log(
                    level, "redis reconnect attempt %d failed: %s", attempt, self._describe(exc)
                )
            except Exception:
                logger.exception("redis reconnect attempt %d failed unexpectedly", attempt)

    async def _health_loop(self, conn: Any) -> None:
        """PING the pub/sub connection when it was quiet; abort it if the PING goes
        unanswered, so a half-open connection cannot leave us deaf forever."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._health_interval)
            if loop.time() - self._rx_at < self._health_interval or conn is not self._conn:
                continue
            sent_at = loop.time()
            self._ops.append((_KIND_PONG, b"", None))
            self._kick_flush()
            await asyncio.sleep(self._health_timeout)
            if self._rx_at < sent_at and conn is self._conn:
                logger.warning(
                    "redis pub/sub health check got no reply in %.1fs", self._health_timeout
                )
                self._kill(conn)
                raise _HealthCheckFailed

    async def _read_loop(self, conn: Any) -> None:
        loop = asyncio.get_running_loop()
        read = conn.read_response
        while True:
            response = await read(timeout=math.inf, disconnect_on_error=False)
            self._rx_at = loop.time()
            self._dispatch(response)

    def _dispatch(self, response: Any) -> None:
        if not isinstance(response, list) or len(response) < 2:
            raise _ProtocolDesync("unexpected pub/sub reply")
        kind = response[0]
        if kind == b"message":
            key = response[1]
            channel = self._wanted.get(key)
            if channel is not None:
                if self._connected:
                    self._deliver(channel, response[2])
            elif key == self._control_key:
                self._deliver_control(response[2])
            elif key == self._canary_key:
                waiter = self._canaries.pop(response[2], None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            return
        if not self._acks:
            raise _ProtocolDesync(f"unexpected {kind!r} reply")
        expected, key, fut = self._acks.popleft()
        if kind != expected or (key and response[1] != key):
            raise _ProtocolDesync(f"expected {expected!r} reply, got {kind!r}")
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _deliver(self, channel: str, payload: bytes) -> None:
        try:
            offset, epoch, ts, event, data = payload.split(b"\n", 4)
            publication = Publication(
                channel, int(offset), epoch.decode(), event.decode(), data, int(ts)
            )
        except ValueError:
            logger.warning("malformed publication on %r ignored", channel)
            return
        handler = self._handler
        if handler is None:
            return
        try:
            handler.on_publication(publication)
        except Exception:
            logger.exception("broker handler failed in on_publication")

    def _deliver_control(self, payload: bytes) -> None:
        try:
            command = orjson.loads(payload)
        except orjson.JSONDecodeError:
            logger.warning("malformed control command ignored")
            return
        if not isinstance(command, dict) or self._handler is None:
            return
        try:
            self._handler.on_control(command)
        except Exception:
            logger.exception("broker handler failed in on_control")

    # -- publishing and history -------------------------------------------------------------

    @staticmethod
    def _epoch_candidate() -> str:
        return os.urandom(6).hex()

    def _publish_args(self, channel: str, event: str, data: bytes) -> tuple[list[str], list[Any]]:
        if "\n" in event:
            raise ValueError("event names must not contain newlines")
        meta, stream, pubsub = self._channel_keys(channel)
        size, ttl_ms, meta_ttl_ms = self._limits(channel)
        args: list[Any] = [
            self._epoch_candidate(),
            meta_ttl_ms,
            size,
            ttl_ms,
            pubsub,
            event,
            data,
        ]
        return [meta, stream], args

    @staticmethod
    def _publication(channel: str, event: str, data: bytes, result: Any) -> Publication:
        offset, epoch, ts = result
        return Publication(channel, int(offset), epoch.decode(), event, data, int(ts))

    async def publish(self, channel: str, event: str, data: bytes) -> Publication:
        keys, args = self._publish_args(channel, event, data)
        with self._guard("publish"):
            result = await self._publish_script(keys=keys, args=args)
        return self._publication(channel, event, data, result)

    async def publish_batch(self, requests: Sequence[PublishRequest]) -> list[Publication]:
        if not requests:
            return []
        prepared = [self._publish_args(r.channel, r.event, r.data) for r in requests]
        results = await self._run_script_batch("publish_batch", _PUBLISH_LUA, prepared)
        return [
            self._publication(r.channel, r.event, r.data, result)
            for r, result in zip(requests, results, strict=True)
        ]

    async def _run_script_batch(
        self, op: str, script: str, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """Run ``script`` once per ``(keys, args)`` in one pipeline (one round trip).

        ``SCRIPT LOAD`` goes first in the same round trip, so the ``EVALSHA`` calls after it
        cannot miss the script even right after a Redis restart, and nothing is retried
        (a retry could reorder or duplicate). Raises :class:`BrokerUnavailable` if any call
        failed; the calls before it took effect.
        """
        pipe = self._redis.pipeline(transaction=False)
        pipe.script_load(script)
        sha = _sha1(script)
        for keys, args in calls:
            pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
        with self._guard(op):
            results = await pipe.execute(raise_on_error=False)
        failures = [r for r in results if isinstance(r, Exception)]
        if failures:
            done = sum(1 for r in results[1:] if not isinstance(r, Exception))
            logger.error(
                "redis %s: %d of %d calls done; first error: %s",
                op,
                done,
                len(calls),
                self._describe(failures[0]),
            )
            raise BrokerUnavailable(f"redis {op} failed after {done} of {len(calls)} calls")
        return list(results[1:])

    async def history(
        self, channel: str, *, since: StreamPosition | None = None, limit: int | None = None
    ) -> HistoryResult:
        meta, stream, _ = self._channel_keys(channel)
        size, ttl_ms, meta_ttl_ms = self._limits(channel)
        args: list[str | int] = [
            self._epoch_candidate(),
            meta_ttl_ms,
            size,
            ttl_ms,
            "" if since is None else str(since.offset),
            "" if since is None else since.epoch,
            -1 if limit is None else max(limit, 0),
        ]
        with self._guard("history"):
            result = await self._history_script(keys=[meta, stream], args=args)
        epoch = result[0].decode()
        publications = [
            Publication(
                channel,
                int(result[i].partition(b"-")[0]),
                epoch,
                result[i + 2].decode(),
                result[i + 3],
                int(result[i + 1]),
            )
            for i in range(3, len(result), 4)
        ]
        return HistoryResult(publications, StreamPosition(int(result[1]), epoch), bool(result[2]))

    async def position(self, channel: str) -> StreamPosition:
        meta, stream, _ = self._channel_keys(channel)
        with self._guard("position"):
            result = await self._position_script(
                keys=[meta, stream], args=[self._epoch_candidate(), self._limits(channel)[2]]
            )
        return StreamPosition(int(result[1]), result[0].decode())

    async def reset_epoch_if_behind(self, channel: str, seen: StreamPosition) -> bool:
        meta = self._channel_keys(channel)[0]
        with self._guard("reset_epoch_if_behind"):
            replaced = await self._reset_epoch_script(
                keys=[meta], args=[seen.epoch, seen.offset, self._epoch_candidate()]
            )
        if replaced:
            logger.warning(
                "channel %s: redis lost writes (top behind offset %d); new epoch",
                channel,
                seen.offset,
            )
        return bool(int(replaced))

    # -- control, canary, revocation, rate limits -------------------------------------------

    async def send_control(self, command: dict[str, Any]) -> None:
        payload = orjson.dumps(command)
        with self._guard("send_control"):
            await self._redis.publish(self._control_key, payload)

    async def check_delivery(self, timeout: float) -> bool:
        """Also a self-heal: a pub/sub connection that answers PINGs but has not
        delivered ``CANARIES_LOST_BEFORE_RECONNECT`` canaries in a row (which Redis took)
        is dropped, so the supervisor reconnects, resubscribes and resyncs from history."""
        conn = self._conn
        if not self.connected or conn is None:
            return False
        token = secrets.token_hex(8).encode()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._canaries[token] = waiter
        published = False
        try:
            async with asyncio.timeout(timeout):
                await self._redis.publish(self._canary_key, token)
                published = True
                await asyncio.wait([waiter])
            delivered = waiter.done() and not waiter.cancelled()
        except _ERRORS as exc:
            logger.debug("delivery check failed: %s", self._describe(exc))
            delivered = False
        finally:
            self._canaries.pop(token, None)
        if delivered:
            self._canaries_lost = 0
        elif published and conn is self._conn:
            self._canaries_lost += 1
            if self._canaries_lost >= CANARIES_LOST_BEFORE_RECONNECT:
                logger.warning(
                    "redis pub/sub delivered none of %d canaries in a row; reconnecting it",
                    self._canaries_lost,
                )
                self._canaries_lost = 0
                self._kill(conn)
        return delivered

    async def set_user_not_before(self, user_id: str, timestamp: float, ttl: int) -> None:
        key = f"{self._prefix}:nbf:{user_id}"
        with self._guard("set_user_not_before"):
            if ttl <= 0:
                await self._redis.delete(key)
            else:
                await self._not_before_script(keys=[key], args=[repr(float(timestamp)), ttl])

    async def get_user_not_before(self, user_id: str) -> float | None:
        with self._guard("get_user_not_before"):
            value = await self._redis.get(f"{self._prefix}:nbf:{user_id}")
        return None if value is None else float(value)

    async def rate_limit(self, key: str, *, rate: float, burst: int) -> RateLimitResult:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        interval_us = repr(1_000_000.0 / rate)
        with self._guard("rate_limit"):
            result = await self._rate_limit_script(
                keys=[f"{self._prefix}:rl:{key}"], args=[interval_us, burst]
            )
        allowed, remaining, retry_after_us, reset_after_us = (int(v) for v in result)
        return RateLimitResult(
            bool(allowed), burst, remaining, retry_after_us / 1e6, reset_after_us / 1e6
        )

    # -- presence ---------------------------------------------------------------------------

    async def presence_update(self, updates: Mapping[str, Mapping[str, str]], ttl: int) -> None:
        ttl_ms = str(max(ttl, 1) * 1000)
        calls: list[tuple[Sequence[str], Sequence[Any]]] = []
        for channel, members in updates.items():
            if members:
                args = [ttl_ms]
                for client, user in members.items():
                    args += (client, user)
                calls.append((self._presence_keys(channel), args))
        if calls:
            await self._run_script_batch("presence_update", _PRESENCE_UPDATE_LUA, calls)

    async def presence_remove(self, channel: str, client_ids: Sequence[str]) -> None:
        if not client_ids:
            return
        members, expiries = self._presence_keys(channel)
        pipe = self._redis.pipeline(transaction=True)  # same slot: MULTI/EXEC is fine
        pipe.hdel(members, *client_ids)
        pipe.zrem(expiries, *client_ids)
        with self._guard("presence_remove"):
            await pipe.execute()

    async def presence(self, channel: str) -> dict[str, str]:
        with self._guard("presence"):
            flat = await self._presence_get_script(keys=self._presence_keys(channel))
        return {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}

    def _slots_key(self, user_id: str) -> str:
        return f"{self._prefix}:slots:{user_id}"

    async def claim_connection_slots(
        self, claims: Sequence[tuple[str, str]], limit: int, ttl: int
    ) -> list[bool]:
        if not claims:
            return []
        ttl_ms = max(ttl, 1) * 1000
        if len(claims) == 1:  # the usual case: one EVALSHA costs a third less than a batch
            user_id, slot = claims[0]
            with self._guard("claim_connection_slots"):
                held = await self._claim_slot_script(
                    keys=[self._slots_key(user_id)], args=[slot, limit, ttl_ms]
                )
            return [bool(int(held))]
        calls = [([self._slots_key(user_id)], [slot, limit, ttl_ms]) for user_id, slot in claims]
        results = await self._run_script_batch("claim_connection_slots", _CLAIM_SLOT_LUA, calls)
        return [bool(int(held)) for held in results]

    async def refresh_connection_slots(self, slots: Mapping[str, Sequence[str]], ttl: int) -> None:
        ttl_ms = max(ttl, 1) * 1000
        calls = [
            ([self._slots_key(user_id)], [ttl_ms, *ids]) for user_id, ids in slots.items() if ids
        ]
        if calls:
            await self._run_script_batch("refresh_connection_slots", _REFRESH_SLOTS_LUA, calls)

    async def release_connection_slots(self, slots: Mapping[str, Sequence[str]]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for user_id, ids in slots.items():
            if ids:
                pipe.zrem(self._slots_key(user_id), *ids)
        if len(pipe):
            with self._guard("release_connection_slots"):
                await pipe.execute()


def _sha1(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


_conforms: type[Broker] = RedisBroker
