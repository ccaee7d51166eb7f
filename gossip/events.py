"""What a gossip `Node` hands back to its driver: member views, events and stream requests.

This module owns the output types of the sans-IO core and nothing else. They are plain frozen
values: the driver (trio transport, simulator, tests) reads them and never mutates them.

* `Member` is one row of the membership table as the node sees it now.
* `MemberEvent` is a change to that table (join, update, suspect, alive again, failed, leave).
* `JoinResult` reports how one push/pull join attempt ended.
* `Stats` holds the node's counters (packets, drops by reason, probes, suspicions, refutations).
* `OpenStream`, `StreamSend` and `CloseStream` ask the driver to act on a TCP stream that the
  core names by an opaque integer id. Ids of streams the core opens are positive; a driver
  that accepts an inbound stream must give it an id the core is not using (a negative one).
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from gossip.messages import NodeStateCode
from gossip.tags import decode_tags

# A member's state is the same four-valued code push/pull carries on the wire.
MemberState = NodeStateCode

Address = tuple[bytes, int]


class MemberEventKind(enum.Enum):
    JOIN = "join"  # first seen, or back from dead/left
    UPDATE = "update"  # metadata changed while alive
    SUSPECT = "suspect"  # stopped answering probes; may still refute
    ALIVE = "alive"  # a suspect refuted (memberlist has no event for this; serf sees nothing)
    FAILED = "failed"  # declared dead by the failure detector
    LEAVE = "leave"  # left on purpose (dead with From == Node)


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    addr: bytes
    port: int
    meta: bytes
    state: MemberState
    incarnation: int
    vsn: bytes

    @property
    def tags(self) -> Mapping[str, str]:
        """The metadata read as serf tags (decoded on each access; never raises)."""
        return decode_tags(self.meta)

    @property
    def protocol_max(self) -> int:
        return self.vsn[1] if len(self.vsn) > 1 else 0


@dataclass(frozen=True, slots=True)
class MemberEvent:
    kind: MemberEventKind
    name: str
    addr: bytes
    port: int
    meta: bytes
    incarnation: int
    time: float  # the `now` of the call that produced it

    @property
    def tags(self) -> Mapping[str, str]:
        """The metadata read as serf tags (decoded on each access; never raises)."""
        return decode_tags(self.meta)


@dataclass(frozen=True, slots=True)
class JoinResult:
    """The end of one join attempt: `nodes` entries merged, or `error` saying why not."""

    addr: Address
    ok: bool
    nodes: int = 0
    error: str = ""


@dataclass(frozen=True, slots=True)
class OpenStream:
    stream_id: int
    addr: Address


@dataclass(frozen=True, slots=True)
class StreamSend:
    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class CloseStream:
    stream_id: int


StreamAction = OpenStream | StreamSend | CloseStream


@dataclass(slots=True)
class Stats:
    """Counters a node keeps about itself (monotonic; `drops` is keyed by reason)."""

    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    probes: int = 0
    probe_failures: int = 0
    indirect_pings_sent: int = 0
    tcp_fallback_pings: int = 0
    tcp_fallback_successes: int = 0
    nacks_sent: int = 0
    # Acks and nacks that came after their probe had ended (or were never ours). Late nacks are
    # normal: as in memberlist, a relay's nack is due just when the prober's deadline passes.
    late_acks: int = 0
    late_nacks: int = 0
    suspicions: int = 0
    suspicion_timeouts: int = 0
    refutations: int = 0
    push_pulls: int = 0
    push_pull_failures: int = 0
    streams_opened: int = 0
    streams_accepted: int = 0
    streams_failed: int = 0
