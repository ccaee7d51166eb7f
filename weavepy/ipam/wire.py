"""IPAM messages on the wire: versioned, size-bounded msgpack behind a magic byte.

This module owns the byte format of every IPAM message and nothing else. Layout:

    0xC1  version(1)  msgpack [kind, cluster_id, era, sender, boot, generation, slot, body]

0xC1 is the one byte value msgpack never uses, and serf's user messages start with a small
type byte (0..~15), so an IPAM payload can never be mistaken for either; `is_ipam(data)` is
the router's test. Every message names its cluster and era, so a receiver can refuse a
foreign cluster before reading the body; and the sender's process (a random boot id), member
generation (0 when it is not a member) and decided slot, so a voter that lost its disk and
came back is not counted as a working voter, and a late message from before a join is not
mistaken for that.

The rules it keeps: decoding never trusts a length, a type or a count it has not checked;
anything off raises `IpamDecodeError` whose `reason` is a short metric label; encoding
refuses to produce a message larger than its kind allows."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

from weavepy.ipam.errors import IpamDecodeError
from weavepy.ipam.state import (
    ClusterState,
    Era,
    Value,
    check_name,
    parse_era,
    read_bool,
    read_float,
    read_int,
    read_list,
    read_mapping,
    read_str,
    value_from_plain,
    value_to_plain,
)

MAGIC = 0xC1
VERSION = 1
MAX_MESSAGE_BYTES = 2048  # every kind but STATE; typical messages are 60-400 bytes
MAX_STATE_BYTES = 4 * 1024 * 1024
UDP_SAFE_BYTES = 1000  # larger payloads should ride the gossip layer's reliable stream
MAX_ASKS = 4

Ballot = tuple[int, str, int]  # (round, proposer name, proposer boot id): totally ordered


class Kind(enum.IntEnum):
    HELLO = 1
    PREPARE = 2
    PROMISE = 3
    ACCEPT = 4
    ACCEPTED = 5
    NACK = 6
    DECIDED = 7
    BEHIND = 8
    STATE = 9
    STATE_REQUEST = 10


@dataclass(frozen=True, slots=True)
class Hello:
    """Presence: a stateless node (slot 0, empty cluster id) looking for a cluster, or a member."""

    slot: int


@dataclass(frozen=True, slots=True)
class Prepare:
    """Paxos phase 1a for `slot`; `ask` lists (name, generation) to attest liveness of."""

    slot: int
    ballot: Ballot
    ask: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Attestation:
    """A voter's view of (name, generation): alive in its gossip view, seconds since evidence."""

    name: str
    generation: int
    alive: bool
    evidence_age: float


@dataclass(frozen=True, slots=True)
class Promise:
    """Paxos phase 1b: promised `ballot`, with the voter's accepted value (if any)."""

    slot: int
    ballot: Ballot
    accepted: tuple[Ballot, Value] | None
    answers: tuple[Attestation, ...] = ()


@dataclass(frozen=True, slots=True)
class Accept:
    slot: int
    ballot: Ballot
    value: Value


@dataclass(frozen=True, slots=True)
class Accepted:
    slot: int
    ballot: Ballot


@dataclass(frozen=True, slots=True)
class Nack:
    """The voter promised a higher ballot for `slot`."""

    slot: int
    ballot: Ballot
    promised: Ballot


@dataclass(frozen=True, slots=True)
class Decided:
    """`value` was chosen for `slot` (apply it to the state at slot - 1)."""

    slot: int
    value: Value


@dataclass(frozen=True, slots=True)
class Behind:
    """The sender's decided state is at `slot`, too old to take part; please send state."""

    slot: int


@dataclass(frozen=True, slots=True)
class StateMsg:
    """A whole decided state (large: send reliably)."""

    state: ClusterState


@dataclass(frozen=True, slots=True)
class StateRequest:
    slot: int


Body = (
    Hello
    | Prepare
    | Promise
    | Accept
    | Accepted
    | Nack
    | Decided
    | Behind
    | StateMsg
    | StateRequest
)

_KIND_OF: dict[type, Kind] = {
    Hello: Kind.HELLO,
    Prepare: Kind.PREPARE,
    Promise: Kind.PROMISE,
    Accept: Kind.ACCEPT,
    Accepted: Kind.ACCEPTED,
    Nack: Kind.NACK,
    Decided: Kind.DECIDED,
    Behind: Kind.BEHIND,
    StateMsg: Kind.STATE,
    StateRequest: Kind.STATE_REQUEST,
}


@dataclass(frozen=True, slots=True)
class Envelope:
    """One IPAM message: who sent it, for which cluster and era, and what it says."""

    cluster_id: str
    era: Era
    sender: str
    boot: int  # random per sender process start
    generation: int  # the sender's member generation; 0 if it is not a member
    slot: int  # the sender's decided slot when it sent this
    body: Body

    @property
    def kind(self) -> Kind:
        return _KIND_OF[type(self.body)]


class Outgoing(NamedTuple):
    """A payload to hand to the gossip layer: `to` a node name, or None to broadcast."""

    to: str | None
    payload: bytes


def is_ipam(data: bytes) -> bool:
    """True if a gossip user message (or push/pull user state) is ours, not serf's."""
    return len(data) >= 2 and data[0] == MAGIC


# --------------------------------------------------------------------------- encode


def encode(envelope: Envelope) -> bytes:
    body = envelope.body
    plain: Any
    if isinstance(body, Hello | Behind | StateRequest):
        plain = [body.slot]
    elif isinstance(body, Prepare):
        plain = [body.slot, list(body.ballot), [[n, g] for n, g in body.ask]]
    elif isinstance(body, Promise):
        accepted = None
        if body.accepted is not None:
            accepted = [list(body.accepted[0]), value_to_plain(body.accepted[1])]
        answers = [[a.name, a.generation, a.alive, a.evidence_age] for a in body.answers]
        plain = [body.slot, list(body.ballot), accepted, answers]
    elif isinstance(body, Accept):
        plain = [body.slot, list(body.ballot), value_to_plain(body.value)]
    elif isinstance(body, Accepted):
        plain = [body.slot, list(body.ballot)]
    elif isinstance(body, Nack):
        plain = [body.slot, list(body.ballot), list(body.promised)]
    elif isinstance(body, Decided):
        plain = [body.slot, value_to_plain(body.value)]
    else:  # StateMsg
        plain = body.state.to_plain()
    packed: bytes = msgpack.packb(
        [
            int(envelope.kind),
            envelope.cluster_id,
            list(envelope.era),
            envelope.sender,
            envelope.boot,
            envelope.generation,
            envelope.slot,
            plain,
        ],
        use_bin_type=True,
    )
    data = bytes([MAGIC, VERSION]) + packed
    limit = MAX_STATE_BYTES if isinstance(body, StateMsg) else MAX_MESSAGE_BYTES
    if len(data) > limit:
        raise ValueError(f"{envelope.kind.name} message of {len(data)} bytes exceeds {limit}")
    return data


def kind_of(data: bytes) -> Kind:
    """The kind of a message `encode` produced, without decoding it (for counting)."""
    return Kind(data[3])  # after the magic and version: fixarray(8), then the kind (< 128)


# --------------------------------------------------------------------------- decode


def decode(data: bytes) -> Envelope:
    """Parse one IPAM message; raises IpamDecodeError with a metric-friendly reason."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise IpamDecodeError("not_bytes", type(data).__name__)
    data = bytes(data)
    if len(data) < 3 or data[0] != MAGIC:
        raise IpamDecodeError("not_ipam", "missing magic byte 0xC1")
    if data[1] != VERSION:
        raise IpamDecodeError(
            "bad_version", f"IPAM wire version {data[1]}, this node speaks {VERSION}"
        )
    if len(data) > MAX_STATE_BYTES:
        raise IpamDecodeError("too_large", f"{len(data)} bytes")
    # Only a STATE may be large: [fixarray(8), kind, ...], so bytes 2-3 tell before parsing.
    if len(data) > MAX_MESSAGE_BYTES and data[2:4] != bytes([0x98, Kind.STATE]):
        raise IpamDecodeError("too_large", f"{len(data)} bytes for a small message kind")
    try:
        top = msgpack.unpackb(
            data[2:],
            raw=False,
            strict_map_key=True,
            max_array_len=70000,
            max_map_len=64,
            max_str_len=1024,
            max_bin_len=0,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException) as exc:  # every msgpack parse error
        raise IpamDecodeError("bad_msgpack", f"{type(exc).__name__}: {exc}") from exc
    try:
        kind_code, cluster_id, era, sender, boot, generation, sender_slot, plain = read_list(top, 8)
        try:
            kind = Kind(read_int(kind_code))
        except ValueError as exc:
            raise IpamDecodeError("unknown_kind", str(kind_code)) from exc
        if kind is not Kind.STATE and len(data) > MAX_MESSAGE_BYTES:
            raise IpamDecodeError("too_large", f"{kind.name} of {len(data)} bytes")
        cluster = read_str(cluster_id)
        if len(cluster) > 64:
            raise ValueError("cluster id longer than 64 characters")
        sender_generation = read_int(generation)
        if sender_generation < 0:
            raise ValueError("negative generation")
        envelope = Envelope(
            cluster,
            parse_era(era),
            check_name(read_str(sender)),
            read_int(boot),
            sender_generation,
            _slot(sender_slot),
            _decode_body(kind, plain),
        )
    except IpamDecodeError:
        raise
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        raise IpamDecodeError("bad_shape", f"{type(exc).__name__}: {exc}") from exc
    if (
        isinstance(envelope.body, StateMsg)
        and envelope.body.state.cluster_id != envelope.cluster_id
    ):
        raise IpamDecodeError("bad_state", "state's cluster id differs from the envelope's")
    return envelope


def parse_ballot(data: object) -> Ballot:
    round_, name, boot = read_list(data, 3)
    return (read_int(round_), check_name(read_str(name)), read_int(boot))


def _slot(data: object) -> int:
    slot = read_int(data)
    if slot < 0:
        raise ValueError("negative slot")
    return slot


def _decode_body(kind: Kind, plain: object) -> Body:
    if kind is Kind.STATE:
        return StateMsg(ClusterState.from_plain(read_mapping(plain, "state")))
    items = read_list(plain)
    if kind in (Kind.HELLO, Kind.BEHIND, Kind.STATE_REQUEST):
        (slot,) = read_list(items, 1)
        if kind is Kind.HELLO:
            return Hello(_slot(slot))
        if kind is Kind.BEHIND:
            return Behind(_slot(slot))
        return StateRequest(_slot(slot))
    if kind is Kind.PREPARE:
        slot, ballot, ask = read_list(items, 3)
        asks = tuple(
            (check_name(read_str(n)), read_int(g))
            for n, g in (read_list(a, 2) for a in read_list(ask))
        )
        if len(asks) > MAX_ASKS:
            raise ValueError(f"{len(asks)} attestation questions, at most {MAX_ASKS}")
        return Prepare(_slot(slot), parse_ballot(ballot), asks)
    if kind is Kind.PROMISE:
        slot, ballot, accepted, answers = read_list(items, 4)
        parsed_accepted: tuple[Ballot, Value] | None = None
        if accepted is not None:
            accepted_ballot, value = read_list(accepted, 2)
            parsed_accepted = (parse_ballot(accepted_ballot), value_from_plain(value))
        parsed_answers = []
        for answer in read_list(answers):
            name, generation, alive, age = read_list(answer, 4)
            parsed_answers.append(
                Attestation(
                    check_name(read_str(name)),
                    read_int(generation),
                    read_bool(alive),
                    read_float(age),
                )
            )
        if len(parsed_answers) > MAX_ASKS:
            raise ValueError("too many attestations")
        return Promise(_slot(slot), parse_ballot(ballot), parsed_accepted, tuple(parsed_answers))
    if kind is Kind.ACCEPT:
        slot, ballot, value = read_list(items, 3)
        return Accept(_slot(slot), parse_ballot(ballot), value_from_plain(value))
    if kind is Kind.ACCEPTED:
        slot, ballot = read_list(items, 2)
        return Accepted(_slot(slot), parse_ballot(ballot))
    if kind is Kind.NACK:
        slot, ballot, promised = read_list(items, 3)
        return Nack(_slot(slot), parse_ballot(ballot), parse_ballot(promised))
    slot, value = read_list(items, 2)  # DECIDED
    return Decided(_slot(slot), value_from_plain(value))
