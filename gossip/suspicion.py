"""The suspicion timer (Lifeguard "LHA-Suspicion"): how long a suspect has to refute.

This module owns the arithmetic of suspicion and one timer per suspect; it never reads a
clock (every method takes `now`) and never decides what happens when the timer runs out.

Rules (memberlist `suspicion.go`, `util.go suspicionTimeout`):

* The base timeout grows with the cluster: `min = mult * max(1, log10(max(1, n))) * interval`,
  with memberlist's truncation of the scale to whole milliseconds; `max = max_mult * min`.
* A fresh suspicion waits `max`, unless no confirmations are expected (`k < 1`), then `min`.
* Each *independent* confirmation (a `suspect` about the same node from a peer we have not
  counted yet; the first accuser never counts) moves the deadline, measured from the start, to
  `max - log(c + 1) / log(k + 1) * (max - min)` (floored to a millisecond), never below `min`.
  After `k` confirmations further ones are ignored: the timer is already at `min`.
"""

from __future__ import annotations

import math


def suspicion_timeout(suspicion_mult: int, num_nodes: int, probe_interval: float) -> float:
    """The minimum suspicion timeout for a cluster of `num_nodes` (seconds)."""
    node_scale = max(1.0, math.log10(max(1.0, float(num_nodes))))
    # Go: time.Duration(nodeScale*1000) * interval / 1000 truncates the scale to 1/1000.
    return suspicion_mult * math.floor(node_scale * 1000) * probe_interval / 1000


def remaining_suspicion_time(
    confirmations: int, k: int, elapsed: float, min_timeout: float, max_timeout: float
) -> float:
    """Time left (may be negative) after `confirmations` of `k`, `elapsed` s since the start."""
    fraction = math.log(confirmations + 1.0) / math.log(k + 1.0)
    raw = max_timeout - fraction * (max_timeout - min_timeout)
    timeout = math.floor(1000.0 * raw) / 1000.0
    return max(timeout, min_timeout) - elapsed


class Suspicion:
    """One node's suspicion timer: a deadline that confirmations pull in towards `min`."""

    __slots__ = ("_accusers", "_k", "_max", "_min", "_start", "confirmations", "deadline")

    def __init__(
        self, accuser: str, k: int, min_timeout: float, max_timeout: float, now: float
    ) -> None:
        self._k = k
        self._min = min_timeout
        self._max = max_timeout
        self._start = now
        # The first accuser is excluded: our own rumour may come back to us through gossip.
        self._accusers = {accuser}
        self.confirmations = 0
        self.deadline = now + (max_timeout if k >= 1 else min_timeout)

    def confirm(self, accuser: str, now: float) -> bool:
        """Count `accuser` once; True if it was new information worth re-gossiping."""
        if self.confirmations >= self._k or accuser in self._accusers:
            return False
        self._accusers.add(accuser)
        self.confirmations += 1
        remaining = remaining_suspicion_time(
            self.confirmations, self._k, now - self._start, self._min, self._max
        )
        self.deadline = now + remaining
        return True
