"""The transmit-limited broadcast queue: which rumours ride on the next packet.

This module owns the queue of encoded messages waiting to be gossiped and the rules that pick
them (memberlist `queue.go`, `util.go retransmitLimit`):

* Every broadcast is sent at most `retransmit_mult * ceil(log10(n + 1))` times, where `n` is
  the number of nodes we know; then it is dropped and its `on_finished` callback runs.
* Fewer transmissions first: a fresh rumour beats one already sent. Within a tier, the largest
  message that still fits goes first, and among equal sizes the newest.
* A *named* broadcast (memberlist names them by the node they are about) replaces any queued
  broadcast with the same name: `alive(n, 5)` makes a queued `suspect(n, 4)` pointless.
  Unnamed broadcasts (user messages) are unique and never replace anything.
* Each pick costs `overhead` bytes on top of the message (the compound length field), and
  the picks never add up to more than `limit`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

Finished = Callable[[], None]


def retransmit_limit(retransmit_mult: int, num_nodes: int) -> int:
    """How many times one broadcast is sent in a cluster of `num_nodes`."""
    return retransmit_mult * math.ceil(math.log10(num_nodes + 1))


class _Broadcast:
    __slots__ = ("id", "message", "name", "on_finished", "transmits")

    def __init__(
        self, ident: int, message: bytes, name: str | None, on_finished: Finished | None
    ) -> None:
        self.id = ident
        self.message = message
        self.name = name
        self.on_finished = on_finished
        self.transmits = 0

    def sort_key(self) -> tuple[int, int]:
        # Ascending order of this key is "largest first, then newest first".
        return (-len(self.message), -self.id)

    def finish(self) -> None:
        if self.on_finished is not None:
            self.on_finished()


# (-length, -id, broadcast): ids are unique, so tuple comparison never reaches the object.
_Entry = tuple[int, int, _Broadcast]


class TransmitLimitedQueue:
    """Broadcasts grouped in tiers by transmit count; see the module docstring for the rules."""

    def __init__(self, retransmit_mult: int) -> None:
        self.retransmit_mult = retransmit_mult
        # transmits -> entries sorted by (-length, -id)
        self._tiers: dict[int, list[_Entry]] = {}
        self._by_name: dict[str, _Broadcast] = {}
        self._count = 0
        self._next_id = 0

    def __len__(self) -> int:
        return self._count

    def queue(
        self, message: bytes, *, name: str | None = None, on_finished: Finished | None = None
    ) -> None:
        """Add `message` with zero transmits, replacing a queued broadcast of the same name."""
        self._next_id += 1
        item = _Broadcast(self._next_id, message, name, on_finished)
        if name is not None:
            old = self._by_name.get(name)
            if old is not None:
                self._remove(old)
                old.finish()
        self._insert(item)

    def get_broadcasts(self, overhead: int, limit: int, num_nodes: int) -> list[bytes]:
        """Pick messages for one packet: at most `limit` bytes counting `overhead` per message."""
        if self._count == 0:
            return []
        transmit_limit = retransmit_limit(self.retransmit_mult, num_nodes)
        used = 0
        chosen: list[bytes] = []
        # Reinsert after the walk: a bumped broadcast must not be picked twice for one packet.
        bumped: list[_Broadcast] = []
        for transmits in sorted(self._tiers):
            tier = self._tiers[transmits]
            while tier:
                free = limit - used - overhead
                if free <= 0:
                    break
                index = bisect.bisect_left(tier, (-free, -(1 << 62)))
                if index == len(tier):
                    break  # nothing in this tier fits
                item = tier.pop(index)[2]
                self._count -= 1
                if item.name is not None:
                    del self._by_name[item.name]
                used += overhead + len(item.message)
                chosen.append(item.message)
                if item.transmits + 1 >= transmit_limit:
                    item.finish()
                else:
                    item.transmits += 1
                    bumped.append(item)
            if not tier:
                del self._tiers[transmits]
            if limit - used - overhead <= 0:
                break
        for item in bumped:
            self._insert(item)
        return chosen

    def prune(self, max_retain: int) -> None:
        """Drop the most-transmitted (oldest, smallest) broadcasts until `max_retain` remain."""
        while self._count > max_retain:
            worst_tier = max(self._tiers)
            item = self._tiers[worst_tier][-1][2]
            self._remove(item)
            item.finish()

    def reset(self) -> None:
        """Drop everything (each dropped broadcast's `on_finished` still runs)."""
        items = [entry[2] for tier in self._tiers.values() for entry in tier]
        self._tiers.clear()
        self._by_name.clear()
        self._count = 0
        for item in items:
            item.finish()

    def _insert(self, item: _Broadcast) -> None:
        tier = self._tiers.setdefault(item.transmits, [])
        negative_length, negative_id = item.sort_key()
        bisect.insort(tier, (negative_length, negative_id, item))
        if item.name is not None:
            self._by_name[item.name] = item
        self._count += 1

    def _remove(self, item: _Broadcast) -> None:
        tier = self._tiers[item.transmits]
        # A 2-tuple sorts just before the 3-tuple entry that starts with it.
        index = bisect.bisect_left(tier, item.sort_key())
        del tier[index]
        if not tier:
            del self._tiers[item.transmits]
        if item.name is not None:
            del self._by_name[item.name]
        self._count -= 1

