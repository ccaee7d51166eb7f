"""serf's leave intent and Lamport clock (gossip.serfcompat): bytes and clock rules."""

from __future__ import annotations

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from gossip.serfcompat import (
    SERF_JOIN,
    SERF_LEAVE,
    SERF_PUSH_PULL,
    LamportClock,
    SerfIntents,
    encode_leave_intent,
)


def serf_message(kind: int, body: dict[bytes, object]) -> bytes:
    packed: bytes = msgpack.packb(body, use_bin_type=False)
    return bytes((kind,)) + packed


def decode_leave(data: bytes) -> dict[bytes, object]:
    assert data[0] == SERF_LEAVE
    decoded = msgpack.unpackb(data[1:], raw=True)
    assert isinstance(decoded, dict)
    return decoded


def test_leave_intent_is_serf_message_leave() -> None:
    data = encode_leave_intent(5, "py0")
    # go-msgpack old spec: a map keyed by the Go field names, strings as raw (fixraw 0xa3).
    assert data == b"\x00\x83\xa5LTime\x05\xa4Node\xa3py0\xa5Prune\xc2"
    assert decode_leave(data) == {b"LTime": 5, b"Node": b"py0", b"Prune": False}


def test_clock_stays_ahead_of_what_it_witnessed() -> None:
    clock = LamportClock()
    clock.witness(10)
    assert clock.time == 11
    clock.witness(3)
    assert clock.time == 11
    assert clock.increment() == 12


def test_leave_is_stamped_above_serf_join_intents_and_status_times() -> None:
    intents = SerfIntents()
    intents.observe_user_message(serf_message(SERF_JOIN, {b"LTime": 7, b"Node": b"s0"}))
    assert decode_leave(intents.leave_intent("py0"))[b"LTime"] == 8
    state = {
        b"LTime": 3,
        b"StatusLTimes": {b"s0": 4, b"py0": 20},
        b"LeftMembers": [],
        b"EventLTime": 1,
        b"Events": None,
        b"QueryLTime": 1,
    }
    intents.observe_user_state(serf_message(SERF_PUSH_PULL, state))
    first = decode_leave(intents.leave_intent("py0"))[b"LTime"]
    assert isinstance(first, int) and first > 20
    assert decode_leave(intents.leave_intent("py0"))[b"LTime"] == first + 1


@given(st.binary(max_size=200))
def test_anything_else_is_ignored(data: bytes) -> None:
    intents = SerfIntents()
    intents.observe_user_message(data)
    intents.observe_user_state(data)
    assert intents.clock.time >= 0
