"""The sliding replay window for transport counters (RFC 6479, as WireGuard uses it).

One window per receiving keypair. A counter is accepted at most once, and only if it is not
older than the window behind the highest counter seen. The window is a ring of 64-bit blocks:
moving forward clears the blocks passed over, so the cost of a check does not depend on how far
the window jumps. With 128 blocks the window covers 8128 counters behind the newest, the same
as current wireguard-go. Counters at or above `limit` (REJECT_AFTER_MESSAGES) are refused.

The rule it keeps: `check` only answers; `accept` is called after the message authenticated, so
a forged counter can never move the window.
"""

from __future__ import annotations

_BLOCK_BITS_LOG = 6
_BLOCK_BITS = 1 << _BLOCK_BITS_LOG
_RING_BLOCKS = 1 << 7
_BLOCK_MASK = _RING_BLOCKS - 1
_BIT_MASK = _BLOCK_BITS - 1
WINDOW_SIZE = (_RING_BLOCKS - 1) * _BLOCK_BITS


class ReplayWindow:
    """Counters seen on one receiving keypair."""

    __slots__ = ("_ring", "last")

    def __init__(self) -> None:
        self.last = 0
        self._ring = [0] * _RING_BLOCKS

    def check(self, counter: int, limit: int) -> bool:
        """True if `counter` may be new: below `limit`, inside the window, not yet seen."""
        if counter >= limit:
            return False
        if counter > self.last:
            return True
        if self.last - counter > WINDOW_SIZE:
            return False
        block = self._ring[(counter >> _BLOCK_BITS_LOG) & _BLOCK_MASK]
        return not (block >> (counter & _BIT_MASK)) & 1

    def accept(self, counter: int, limit: int) -> bool:
        """Record `counter`; False (and nothing recorded) if it is a replay or out of window."""
        if counter >= limit:
            return False
        ring = self._ring
        block = counter >> _BLOCK_BITS_LOG
        if counter > self.last:
            current = self.last >> _BLOCK_BITS_LOG
            steps = min(block - current, _RING_BLOCKS)
            for i in range(current + 1, current + steps + 1):
                ring[i & _BLOCK_MASK] = 0
            self.last = counter
        elif self.last - counter > WINDOW_SIZE:
            return False
        index = block & _BLOCK_MASK
        bit = 1 << (counter & _BIT_MASK)
        old = ring[index]
        if old & bit:
            return False
        ring[index] = old | bit
        return True

    def accepts_run(self, first: int, count: int, limit: int) -> bool:
        """True if every counter of first..first+count-1 is new: the whole run is ahead of the
        window (the common case of an in-order batch); False means "check one by one"."""
        return first > self.last and first + count <= limit

    def accept_run(self, first: int, count: int) -> None:
        """Record first..first+count-1, after `accepts_run` said yes and all authenticated."""
        ring = self._ring
        end = first + count - 1
        current = self.last >> _BLOCK_BITS_LOG
        steps = min((end >> _BLOCK_BITS_LOG) - current, _RING_BLOCKS)
        for i in range(current + 1, current + steps + 1):
            ring[i & _BLOCK_MASK] = 0
        self.last = end
        counter = first
        while counter <= end:
            block = counter >> _BLOCK_BITS_LOG
            high = min(end, (block << _BLOCK_BITS_LOG) | _BIT_MASK)
            ring[block & _BLOCK_MASK] |= ((1 << (high - counter + 1)) - 1) << (counter & _BIT_MASK)
            counter = high + 1
