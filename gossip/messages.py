"""Memberlist message types as plain Python values: the contract between the codec and the core.

This module owns the *shape* of every memberlist message (types 0-13) and nothing else: no
bytes, no I/O, no behaviour. `gossip.wire` turns these values into memberlist's exact bytes
and back; `gossip.node` reasons about them. Field names follow memberlist's Go struct fields
(snake_case here, the exact Go names on the wire). Addresses are raw `bytes` (4 bytes for
IPv4, 16 for IPv6) exactly as memberlist carries `net.IP`; names and errors are `str`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class MessageType(enum.IntEnum):
    """memberlist's message-type byte (net.go: "ONLY APPEND TO THIS LIST")."""

    PING = 0
    INDIRECT_PING = 1
    ACK = 2
    SUSPECT = 3
    ALIVE = 4
    DEAD = 5
    PUSH_PULL = 6
    COMPOUND = 7
    USER = 8
    COMPRESS = 9
    ENCRYPT = 10
    NACK = 11
    HAS_CRC = 12
    ERR = 13
    HAS_LABEL = 244


class NodeStateCode(enum.IntEnum):
    """The `State` field of a push/pull node entry."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


# Vsn: [protocol min, protocol max, protocol current, delegate min, delegate max, delegate current]
DEFAULT_VSN: bytes = bytes([1, 5, 2, 2, 5, 5])


@dataclass(frozen=True, slots=True)
class Ping:
    seq_no: int
    node: str
    source_addr: bytes = b""
    source_port: int = 0
    source_node: str = ""


@dataclass(frozen=True, slots=True)
class IndirectPing:
    seq_no: int
    target: bytes
    port: int
    node: str
    nack: bool = False
    source_addr: bytes = b""
    source_port: int = 0
    source_node: str = ""


@dataclass(frozen=True, slots=True)
class Ack:
    seq_no: int
    payload: bytes = b""


@dataclass(frozen=True, slots=True)
class Nack:
    seq_no: int


@dataclass(frozen=True, slots=True)
class Suspect:
    incarnation: int
    node: str
    from_node: str  # Go field `From`


@dataclass(frozen=True, slots=True)
class Alive:
    incarnation: int
    node: str
    addr: bytes
    port: int
    meta: bytes = b""
    vsn: bytes = DEFAULT_VSN


@dataclass(frozen=True, slots=True)
class Dead:
    incarnation: int
    node: str
    from_node: str  # Go field `From`; equal to `node` means a graceful leave


@dataclass(frozen=True, slots=True)
class PushNodeState:
    name: str
    addr: bytes
    port: int
    meta: bytes
    incarnation: int
    state: NodeStateCode
    vsn: bytes = DEFAULT_VSN


@dataclass(frozen=True, slots=True)
class PushPull:
    """A push/pull exchange (stream only): header, node states, and opaque delegate state."""

    join: bool
    nodes: tuple[PushNodeState, ...] = ()
    user_state: bytes = b""


@dataclass(frozen=True, slots=True)
class UserMsg:
    """A delegate message: raw bytes that memberlist carries but never interprets."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class ErrResp:
    error: str


Message = (
    Ping | IndirectPing | Ack | Nack | Suspect | Alive | Dead | PushPull | UserMsg | ErrResp
)

# Messages that may travel in a UDP packet (alone, in a compound, compressed or CRC-wrapped).
PacketMessage = Ping | IndirectPing | Ack | Nack | Suspect | Alive | Dead | UserMsg
# Messages that may travel as the single message of a TCP stream.
StreamMessage = Ping | Ack | PushPull | UserMsg | ErrResp


class DecodeError(Exception):
    """A packet or stream was malformed; `reason` is a short label used as a metric key.

    A plain exception class, not a frozen dataclass: Python (contextlib, trio, exception groups)
    assigns `__traceback__`, `__cause__` and notes on exceptions it handles, and a frozen
    dataclass's `__setattr__` turns each of those into a TypeError.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason
