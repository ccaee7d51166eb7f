"""The sliver of serf's own layer that a memberlist-only member needs to look right to serf.

Serf decides `left` versus `failed` by its *intents*, not by memberlist: a member whose leave
intent (`messageLeave`, serf user-message type 0) arrived before or after memberlist reported it
gone is `left`; without one it is `failed` (serf/serf.go handleNodeLeave, handleNodeLeaveIntent,
v0.9.4). An intent is ignored unless its Lamport time is above the one serf holds for that
member, so we keep a Lamport clock that witnesses every serf clock we see go by: the `LTime` of
serf join/leave intents, and the `LTime` and `StatusLTimes` of serf's push/pull user state
(`messagePushPull`, type 2). Serf's own `Leave()` sends `LTime = clock.Time()` and then
increments; we do the same.

This module is sans-IO and never raises on input: bytes that are not a serf message we can read
are simply not witnessed. Encoding follows go-msgpack's old spec (strings as raw, a map keyed by
the Go field names in declaration order), as everywhere in memberlist.
"""

from __future__ import annotations

from typing import Any

import msgpack

SERF_LEAVE = 0  # serf messageLeaveType
SERF_JOIN = 1  # serf messageJoinType
SERF_PUSH_PULL = 2  # serf messagePushPullType
_MAX_CONTAINER = 1 << 16  # a push/pull lists every member's status time
_MAX_LTIME = (1 << 64) - 1


class LamportClock:
    """serf's LamportClock: `witness` keeps us one ahead of anything seen."""

    __slots__ = ("_counter",)

    def __init__(self) -> None:
        self._counter = 0

    @property
    def time(self) -> int:
        return self._counter

    def increment(self) -> int:
        self._counter += 1
        return self._counter

    def witness(self, other: int) -> None:
        if 0 <= other < _MAX_LTIME and other >= self._counter:
            self._counter = other + 1


class SerfIntents:
    """Watches serf's clocks go by and writes the leave intent serf needs to say `left`."""

    __slots__ = ("clock",)

    def __init__(self) -> None:
        self.clock = LamportClock()

    def observe_user_message(self, payload: bytes) -> None:
        """A user message arrived; if it is a serf join/leave intent, witness its time."""
        if not payload or payload[0] not in (SERF_LEAVE, SERF_JOIN):
            return
        body = _unpack_map(payload[1:])
        if body is not None:
            self._witness(body.get(b"LTime"))

    def observe_user_state(self, buf: bytes) -> None:
        """A push/pull's user state arrived; if it is serf's, witness every clock in it."""
        if not buf or buf[0] != SERF_PUSH_PULL:
            return
        body = _unpack_map(buf[1:])
        if body is None:
            return
        self._witness(body.get(b"LTime"))
        status_times = body.get(b"StatusLTimes")
        if isinstance(status_times, dict):
            for value in status_times.values():
                self._witness(value)

    def leave_intent(self, node: str, prune: bool = False) -> bytes:
        """serf's `messageLeave` for `node`, stamped as serf's Leave() stamps it."""
        ltime = self.clock.time
        self.clock.increment()
        return encode_leave_intent(ltime, node, prune)

    def _witness(self, value: Any) -> None:
        if type(value) is int:
            self.clock.witness(value)


def encode_leave_intent(ltime: int, node: str, prune: bool = False) -> bytes:
    """`[0] + msgpack(messageLeave{LTime, Node, Prune})`, as a serf agent sends it."""
    body = {b"LTime": ltime, b"Node": node.encode("utf-8", "surrogateescape"), b"Prune": prune}
    packed: bytes = msgpack.packb(body, use_bin_type=False)
    return bytes((SERF_LEAVE,)) + packed


def _unpack_map(data: bytes) -> dict[Any, Any] | None:
    try:
        value = msgpack.unpackb(
            data,
            raw=True,
            strict_map_key=False,
            max_array_len=_MAX_CONTAINER,
            max_map_len=_MAX_CONTAINER,
            max_ext_len=0,
        )
    except msgpack.ExtraData as extra:
        value = extra.unpacked
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    return value if isinstance(value, dict) else None
