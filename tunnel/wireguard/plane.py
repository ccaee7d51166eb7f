"""tunnel.wireguard.plane: what the control plane and the data-plane engines say to each other.

It owns the engines' shared config (`PlaneConfig`), the commands the control plane sends them
(`PlaneCommand`, made from control-plane events by `commands_for_event`), the reports they send
back (`Report`), the `Send` a TUN read becomes, and `engine_fault`, the engines' guard. The rule
it keeps: these are plain frozen values, the same whether the engines run in this process or
in worker processes (workers.py), so neither side needs to know which.

The data plane is two sans-IO engines that seal TUN reads into datagrams and open datagrams
into TUN writes, in batches, for whole super-packets; like wireguard-go's send.go and
receive.go, each direction has its own module.

Split of work (see core.py, "external data plane"):

* `core.Device` (control plane) runs handshakes, timers and keypair rotation. Its events
  (`KeypairsChanged`, `KeepaliveRequested`, `EndpointChanged`) become `PlaneCommand`s for the
  engines below (`commands_for_event`).
* `TxEngine` (send.py) owns sending: routing by allowed IPs, the current keypair and its send
  counter, packets staged while no keypair is usable. A TUN read (virtio-net header + packet)
  becomes one `Send`: a buffer of equal-size datagrams for one UDP GSO sendmsg.
  - to a stock WireGuard peer: a TCP super-packet is segmented (segment.py) and each segment
    sealed as a type-4 message; a packet with a partial checksum is completed first;
  - to a peer with `extension_ok`: the whole read is one AES-GCM message in fragments
    (extension.py).
* `RxEngine` (receive.py) owns receiving: the index table, replay windows and source checks.
  One UDP GRO read becomes TUN writes (standard segments coalesced by segment.Coalescer;
  extension messages written as the super-packet they carry) plus handshake messages to forward
  to the control plane.
* Both report back (`Report`) what the control plane's timers need: data sent with which
  counter, authenticated data received on which keypair from which address, handshakes needed.

The engines run in one process with the control plane (tests, small machines) or each in a
worker process (workers.py), one per direction, so that both cores work. Buffers returned by
`process` are reused by the next call: send or write them first.

Every drop is counted in `counters` under a reason, as in core.py.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field

from tunnel.wireguard.core import (
    EndpointChanged,
    Event,
    KeepaliveRequested,
    KeypairsChanged,
)
from tunnel.wireguard.session import KeypairSnapshot
from tunnel.wireguard.timers import TimerConfig

Address = tuple[str, int]
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PlaneConfig:
    mtu: int = 1420  # the TUN's MTU: the largest inner packet of a standard message
    max_datagram: int = 1472  # UDP payload that fits the underlay MTU (1500 - 28 for IPv4)
    timers: TimerConfig = field(default_factory=TimerConfig)
    verify_checksums: bool = True  # check checksums before writing coalesced runs


def engine_fault(counters: collections.Counter[str], direction: str) -> None:
    """An engine raised on some input: a bug, but one read must never take the data path
    down. Count it (`engine_error_tx|rx` in the drops) and log the first and every 1000th."""
    key = f"engine_error_{direction}"
    counters[key] += 1
    if counters[key] % 1000 == 1:
        log.exception(
            "the %s engine failed on one read (dropped; %d so far)", direction, counters[key]
        )


# ---------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class SetPeer:
    peer: bytes  # raw public key
    allowed_ips: tuple[str, ...]
    endpoint: Address | None
    extension_ok: bool


@dataclass(frozen=True, slots=True)
class RemovePeer:
    peer: bytes


@dataclass(frozen=True, slots=True)
class SetKeypairs:
    peer: bytes
    current: KeypairSnapshot | None
    previous: KeypairSnapshot | None
    next: KeypairSnapshot | None


@dataclass(frozen=True, slots=True)
class SetEndpoint:
    peer: bytes
    endpoint: Address


@dataclass(frozen=True, slots=True)
class SendKeepalive:
    peer: bytes


PlaneCommand = SetPeer | RemovePeer | SetKeypairs | SetEndpoint | SendKeepalive


def commands_for_event(event: Event) -> list[PlaneCommand]:
    """What a control-plane event means for the engines (others need nothing)."""
    if isinstance(event, KeypairsChanged):
        return [SetKeypairs(event.peer.raw, event.current, event.previous, event.next)]
    if isinstance(event, KeepaliveRequested):
        return [SendKeepalive(event.peer.raw)]
    if isinstance(event, EndpointChanged):
        return [SetEndpoint(event.peer.raw, event.endpoint)]
    return []


# ---------------------------------------------------------------------------- reports


@dataclass(frozen=True, slots=True)
class DataSent:
    peer: bytes
    send_counter: int
    carried_data: bool
    at: float  # when the last of these messages went out


@dataclass(frozen=True, slots=True)
class DataReceived:
    peer: bytes
    local_index: int
    endpoint: Address
    carried_data: bool
    at: float  # when the last of these messages arrived


@dataclass(frozen=True, slots=True)
class HandshakeNeeded:
    peer: bytes


Report = DataSent | DataReceived | HandshakeNeeded


@dataclass(frozen=True, slots=True)
class Send:
    """Datagrams for one sendmsg: equal `segment_size` pieces (the last may be shorter). Their
    bytes are one buffer, or an iovec (a list of buffers the kernel gathers in order)."""

    data: memoryview | list[memoryview]
    segment_size: int  # 0: a single datagram
    endpoint: Address

    def payload(self) -> bytes:
        """The datagrams' bytes in one piece (a copy)."""
        if isinstance(self.data, list):
            return b"".join(self.data)
        return bytes(self.data)
