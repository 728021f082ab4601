"""Registry: this worker's connections by channel and by user.

Only local state lives here; anything shared between workers goes through the broker.
Fan-out encodes each publication once and hands the same bytes to every subscriber.
"""

from __future__ import annotations

from collections.abc import Iterable

from .connection import Connection
from .protocol import Publication, StreamPosition, encode_message


class Registry:
    def __init__(self) -> None:
        self.connections: set[Connection] = set()
        self._by_channel: dict[str, dict[Connection, None]] = {}
        self._by_user: dict[str, set[Connection]] = {}
        # Last position fanned out per channel: drops duplicates after a resync and
        # tells the resync where to read history from.
        self._positions: dict[str, StreamPosition] = {}
        # Channels whose position was only noted at subscribe time (nothing fanned out
        # since): concurrent first subscribers keep the lowest of their tops.
        self._noted: set[str] = set()
        # Channels whose missed messages are being read from history after a broker
        # reconnect: live publications wait here meanwhile.
        self._syncing: dict[str, list[Publication]] = {}

    def __len__(self) -> int:
        return len(self.connections)

    @property
    def channel_count(self) -> int:
        return len(self._by_channel)

    @property
    def subscription_count(self) -> int:
        return sum(len(subs) for subs in self._by_channel.values())

    def add(self, conn: Connection) -> None:
        self.connections.add(conn)
        user = conn.user_id
        if user is not None:
            self._by_user.setdefault(user, set()).add(conn)

    def remove(self, conn: Connection) -> list[str]:
        """Forget ``conn``; returns the channels that have no local subscriber left."""
        self.connections.discard(conn)
        user = conn.user_id
        if user is not None:
            conns = self._by_user.get(user)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del self._by_user[user]
        emptied = [ch for ch in list(conn.channels) if self.unsubscribe(conn, ch)]
        return emptied

    def user_connections(self, user_id: str) -> list[Connection]:
        return list(self._by_user.get(user_id, ()))

    def user_connection_count(self, user_id: str) -> int:
        return len(self._by_user.get(user_id, ()))

    def subscribe(self, conn: Connection, channel: str) -> bool:
        """Add a subscription; returns True if it is the channel's first local one."""
        subs = self._by_channel.get(channel)
        first = subs is None
        if subs is None:
            subs = self._by_channel[channel] = {}
        subs[conn] = None
        conn.channels.add(channel)
        return first

    def unsubscribe(self, conn: Connection, channel: str) -> bool:
        """Remove a subscription; returns True if the channel has no local subscriber left."""
        conn.channels.discard(channel)
        subs = self._by_channel.get(channel)
        if subs is None:
            return False
        subs.pop(conn, None)
        if subs:
            return False
        del self._by_channel[channel]
        self._positions.pop(channel, None)
        self._noted.discard(channel)
        return True

    def has_subscribers(self, channel: str) -> bool:
        return channel in self._by_channel

    def channels(self) -> Iterable[str]:
        return self._by_channel.keys()

    def subscribers(self, channel: str) -> list[Connection]:
        return list(self._by_channel.get(channel, ()))

    def position(self, channel: str) -> StreamPosition | None:
        return self._positions.get(channel)

    def note_position(self, channel: str, position: StreamPosition) -> None:
        """Record the top a subscriber learnt at subscribe time, if nothing is known yet.

        Never moves a known position forward: publications up to a newcomer's top may
        still be on their way to this worker, and the channel's other subscribers must
        get them (each connection itself drops what precedes its own subscription). Nor
        across epochs: a resync must see that the older subscribers' history was lost.
        """
        if channel not in self._by_channel:
            return
        known = self._positions.get(channel)
        if known is None:
            self._positions[channel] = position
            self._noted.add(channel)
        elif (
            channel in self._noted
            and known.epoch == position.epoch
            and position.offset < known.offset
        ):
            self._positions[channel] = position

    def fanout(self, publication: Publication) -> int:
        """Queue ``publication`` on every local subscriber; returns how many."""
        channel = publication.channel
        pending = self._syncing.get(channel)
        if pending is not None:
            pending.append(publication)
            return 0
        subs = self._by_channel.get(channel)
        if not subs:
            return 0
        last = self._positions.get(channel)
        if (
            last is not None
            and last.epoch == publication.epoch
            and publication.offset <= last.offset
        ):
            return 0  # already delivered (a resync replayed it)
        self._positions[channel] = publication.position
        if self._noted:
            self._noted.discard(channel)
        message = encode_message(publication)
        # enqueue never mutates the registry (an overflowing connection is only marked
        # closed; its handler task removes it later), so no copy is needed.
        for conn in subs:
            conn.enqueue_message(message)
        return len(subs)

    def begin_sync(self, channel: str) -> None:
        self._syncing.setdefault(channel, [])

    def end_sync(self, channel: str, replay: list[Publication]) -> int:
        """Fan out ``replay`` then the live publications held meanwhile, in order and
        without duplicates; returns how many publications went out."""
        held = self._syncing.pop(channel, [])
        return sum(1 for pub in [*replay, *held] if self.fanout(pub))
