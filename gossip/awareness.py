"""Local health awareness (Lifeguard "LHA-Probe"): how much this node trusts its own timing.

This module owns one integer, the health score, and the rule that scales timeouts by it.
The score counts evidence that *we* are the slow one: a probe that failed without the nacks
we expected, or a rumour we had to refute. It never leaves [0, max_multiplier - 1], and a
timeout scaled by it is `timeout * (score + 1)` (memberlist `awareness.go`).
"""

from __future__ import annotations


class Awareness:
    """The health score: 0 is healthy, `max_multiplier - 1` is the worst."""

    __slots__ = ("_max_multiplier", "_score")

    def __init__(self, max_multiplier: int) -> None:
        if max_multiplier < 1:
            raise ValueError("max_multiplier must be at least 1")
        self._max_multiplier = max_multiplier
        self._score = 0

    @property
    def score(self) -> int:
        return self._score

    def apply_delta(self, delta: int) -> None:
        """Add `delta`, clamped to [0, max_multiplier - 1]."""
        self._score = min(max(self._score + delta, 0), self._max_multiplier - 1)

    def scale(self, timeout: float) -> float:
        """Stretch `timeout` by the current score: a slow node waits longer before judging."""
        return timeout * (self._score + 1)
