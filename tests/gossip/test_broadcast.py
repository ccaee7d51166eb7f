"""The transmit-limited queue, checked against memberlist's queue_test.go cases."""

from __future__ import annotations

from functools import partial

import pytest

from gossip.broadcast import TransmitLimitedQueue, retransmit_limit

MESSAGES = [b"%d. this is a test." % i for i in range(1, 5)]  # 18 bytes each


def _queue_all(queue: TransmitLimitedQueue, names: list[str] | None = None) -> None:
    for i, message in enumerate(MESSAGES):
        queue.queue(message, name=names[i] if names else f"n{i}")


@pytest.mark.parametrize(
    ("mult", "nodes", "expected"),
    [(3, 0, 0), (3, 1, 3), (3, 99, 6), (4, 9, 4), (4, 10, 8), (4, 999, 12), (4, 1000, 16)],
)
def test_retransmit_limit(mult: int, nodes: int, expected: int) -> None:
    assert retransmit_limit(mult, nodes) == expected


def test_overhead_counts_against_the_limit() -> None:
    queue = TransmitLimitedQueue(3)
    _queue_all(queue)
    assert len(queue.get_broadcasts(2, 80, num_nodes=10)) == 4  # 4 x (18 + 2) = 80
    assert len(queue.get_broadcasts(3, 80, num_nodes=10)) == 3


def test_each_broadcast_is_sent_at_most_the_limit() -> None:
    # memberlist TestTransmitLimited_GetBroadcasts_Limit: limit 2 at n=10, mult 1.
    queue = TransmitLimitedQueue(1)
    _queue_all(queue)
    assert len(queue.get_broadcasts(3, 80, num_nodes=10)) == 3
    assert len(queue.get_broadcasts(3, 80, num_nodes=10)) == 3
    assert len(queue.get_broadcasts(3, 80, num_nodes=10)) == 2
    assert queue.get_broadcasts(3, 80, num_nodes=10) == []
    assert len(queue) == 0


def test_fresh_broadcasts_go_first_and_newest_among_equals() -> None:
    queue = TransmitLimitedQueue(4)
    queue.queue(b"old-message", name="a")
    assert queue.get_broadcasts(2, 100, num_nodes=10) == [b"old-message"]
    queue.queue(b"new-message", name="b")
    queue.queue(b"newer-msg!!", name="c")  # same length as new-message: newest first
    # Room for one: the untransmitted tier wins, and within it the newest.
    assert queue.get_broadcasts(2, 13, num_nodes=10) == [b"newer-msg!!"]
    assert queue.get_broadcasts(2, 13, num_nodes=10) == [b"new-message"]
    # Now all three have one transmit: the newest of the tier again.
    assert queue.get_broadcasts(2, 13, num_nodes=10) == [b"newer-msg!!"]


def test_largest_that_fits_goes_first_within_a_tier() -> None:
    queue = TransmitLimitedQueue(4)
    queue.queue(b"s", name="small")
    queue.queue(b"large" * 10, name="large")
    queue.queue(b"medium" * 3, name="medium")
    assert queue.get_broadcasts(0, 20, num_nodes=10) == [b"medium" * 3, b"s"]
    assert queue.get_broadcasts(0, 100, num_nodes=10)[0] == b"large" * 10


def test_a_broadcast_is_never_picked_twice_for_one_packet() -> None:
    queue = TransmitLimitedQueue(10)
    queue.queue(b"only", name="x")
    assert queue.get_broadcasts(0, 1000, num_nodes=100) == [b"only"]


def test_same_name_invalidates_and_notifies() -> None:
    finished: list[str] = []
    queue = TransmitLimitedQueue(4)
    queue.queue(b"suspect n inc 4", name="n", on_finished=lambda: finished.append("suspect"))
    queue.queue(b"other", name="m")
    queue.queue(b"alive n inc 5", name="n")
    assert finished == ["suspect"]
    assert len(queue) == 2
    assert sorted(queue.get_broadcasts(0, 1000, num_nodes=10)) == [b"alive n inc 5", b"other"]


def test_unnamed_broadcasts_are_unique() -> None:
    queue = TransmitLimitedQueue(4)
    queue.queue(b"user-1")
    queue.queue(b"user-1")
    assert len(queue) == 2


def test_finished_runs_when_the_limit_is_reached() -> None:
    finished: list[bool] = []
    queue = TransmitLimitedQueue(1)  # limit 1 x ceil(log10(2)) = 1 for n=1
    queue.queue(b"leave", name="me", on_finished=lambda: finished.append(True))
    assert queue.get_broadcasts(0, 100, num_nodes=1) == [b"leave"]
    assert finished == [True]
    assert len(queue) == 0


def test_prune_keeps_the_freshest() -> None:
    # memberlist TestTransmitLimited_Prune: the oldest go first, and are notified.
    finished: list[str] = []
    queue = TransmitLimitedQueue(1)
    for name, message in zip(["test", "foo", "bar", "baz"], MESSAGES, strict=True):
        queue.queue(message, name=name, on_finished=partial(finished.append, name))
    queue.prune(2)
    assert finished == ["test", "foo"]
    assert sorted(queue.get_broadcasts(0, 1000, num_nodes=10)) == MESSAGES[2:]


def test_reset_notifies_everything() -> None:
    finished: list[int] = []
    queue = TransmitLimitedQueue(1)
    for i in range(3):
        queue.queue(b"x%d" % i, on_finished=partial(finished.append, i))
    queue.reset()
    assert sorted(finished) == [0, 1, 2]
    assert len(queue) == 0
