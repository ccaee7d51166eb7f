"""The suspicion timer against memberlist's own numbers (util_test.go, suspicion_test.go)."""

from __future__ import annotations

import pytest

from gossip.suspicion import Suspicion, remaining_suspicion_time, suspicion_timeout


@pytest.mark.parametrize(
    ("num_nodes", "expected"),
    [(5, 1.0), (10, 1.0), (50, 1.698), (100, 2.0), (500, 2.698), (1000, 3.0)],
)
def test_suspicion_timeout_matches_memberlist(num_nodes: int, expected: float) -> None:
    # memberlist TestSuspicionTimeout: suspicionTimeout(3, n, 1s) / 3
    assert suspicion_timeout(3, num_nodes, 1.0) / 3 == pytest.approx(expected, abs=1e-9)


def test_lan_profile_minimum_timeouts() -> None:
    # The research note's worked examples (LAN: mult 4, interval 1 s).
    assert suspicion_timeout(4, 5, 1.0) == pytest.approx(4.0)
    assert suspicion_timeout(4, 50, 1.0) == pytest.approx(6.792)
    assert suspicion_timeout(4, 1000, 1.0) == pytest.approx(12.0)
    assert suspicion_timeout(4, 0, 1.0) == pytest.approx(4.0)  # never below one scale


@pytest.mark.parametrize(
    ("confirmations", "k", "elapsed", "expected"),
    [(0, 3, 0.0, 30.0), (1, 3, 2.0, 14.0), (2, 3, 3.0, 4.81), (3, 3, 4.0, -2.0),
     (4, 3, 5.0, -3.0), (5, 3, 10.0, -8.0)],
)
def test_remaining_time_matches_memberlist(
    confirmations: int, k: int, elapsed: float, expected: float
) -> None:
    # memberlist TestSuspicion_remainingSuspicionTime (min 2 s, max 30 s)
    remaining = remaining_suspicion_time(confirmations, k, elapsed, 2.0, 30.0)
    assert remaining == pytest.approx(expected, abs=1e-9)


def test_fresh_suspicion_waits_max_then_min_without_expected_confirmations() -> None:
    assert Suspicion("me", 3, 0.5, 2.0, now=100.0).deadline == 102.0
    assert Suspicion("me", 0, 0.5, 2.0, now=100.0).deadline == 100.5


@pytest.mark.parametrize(
    ("accusers", "new_info", "expected_deadline"),
    [
        ([], [], 2.0),
        (["me", "foo"], [False, True], 1.25),
        (["me", "foo", "foo", "foo"], [False, True, False, False], 1.25),
        (["me", "foo", "bar"], [False, True, True], 0.811),  # memberlist allows +-25 ms: 810
        (["me", "foo", "bar", "baz"], [False, True, True, True], 0.5),
        (["me", "foo", "bar", "baz", "zoo"], [False, True, True, True, False], 0.5),
    ],
)
def test_confirmations_pull_the_deadline_in(
    accusers: list[str], new_info: list[bool], expected_deadline: float
) -> None:
    # memberlist TestSuspicion_Timer: k=3, min 500 ms, max 2 s, first accuser "me".
    suspicion = Suspicion("me", 3, 0.5, 2.0, now=0.0)
    for i, accuser in enumerate(accusers):
        assert suspicion.confirm(accuser, now=0.025 * (i + 1)) is new_info[i]
    assert suspicion.deadline == pytest.approx(expected_deadline, abs=1e-9)
    assert suspicion.confirmations == sum(new_info)


def test_zero_k_ignores_confirmations() -> None:
    suspicion = Suspicion("me", 0, 0.025, 30.0, now=0.0)
    assert suspicion.confirm("foo", now=0.01) is False
    assert suspicion.deadline == 0.025


def test_late_confirmation_can_put_the_deadline_in_the_past() -> None:
    # memberlist TestSuspicion_Timer_Immediate: the timer must fire at once.
    suspicion = Suspicion("me", 1, 0.1, 30.0, now=0.0)
    assert suspicion.confirm("foo", now=0.2)
    assert suspicion.deadline <= 0.2
