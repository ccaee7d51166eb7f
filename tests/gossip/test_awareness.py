"""Local health awareness: the score's bounds and how it stretches timeouts."""

from __future__ import annotations

import pytest

from gossip.awareness import Awareness


def test_score_is_clamped_to_zero_and_max_minus_one() -> None:
    awareness = Awareness(8)
    awareness.apply_delta(-1)
    assert awareness.score == 0
    awareness.apply_delta(3)
    assert awareness.score == 3
    awareness.apply_delta(100)
    assert awareness.score == 7
    awareness.apply_delta(-2)
    assert awareness.score == 5


def test_scale_multiplies_by_score_plus_one() -> None:
    awareness = Awareness(8)
    assert awareness.scale(1.0) == 1.0
    awareness.apply_delta(7)
    assert awareness.scale(1.0) == 8.0  # memberlist: probe interval backs off to 8 s
    assert awareness.scale(0.5) == 4.0


def test_max_multiplier_of_one_never_scales() -> None:
    awareness = Awareness(1)
    awareness.apply_delta(5)
    assert awareness.score == 0
    assert awareness.scale(2.0) == 2.0


def test_max_multiplier_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Awareness(0)
