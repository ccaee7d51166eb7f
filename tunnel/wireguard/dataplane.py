"""The data plane: sans-IO engines that seal TUN reads into datagrams and open datagrams into
TUN writes, in batches, for whole super-packets.

Split of work (see core.py, "external data plane"):

* `core.Device` (control plane) runs handshakes, timers and keypair rotation. Its events
  (`KeypairsChanged`, `KeepaliveRequested`, `EndpointChanged`) become `PlaneCommand`s for the
  engines below (`commands_for_event`).
* `TxEngine` owns sending: routing by allowed IPs, the current keypair and its send counter,
  packets staged while no keypair is usable. A TUN read (virtio-net header + packet) becomes
  one `Send`: a buffer of equal-size datagrams for one UDP GSO sendmsg.
  - to a stock WireGuard peer: a TCP super-packet is segmented (segment.py) and each segment
    sealed as a type-4 message; a packet with a partial checksum is completed first;
  - to a peer with `extension_ok`: the whole read is one AES-GCM message in fragments
    (extension.py).
* `RxEngine` owns receiving: the index table, replay windows and source checks. One UDP GRO
  read becomes TUN writes (standard segments coalesced by segment.Coalescer; extension
  messages written as the super-packet they carry) plus handshake messages to forward to the
  control plane.
* Both report back (`Report`) what the control plane's timers need: data sent with which
  counter, authenticated data received on which keypair from which address, handshakes needed.

The engines run in one process with the control plane (tests, small machines) or each in a
worker process (workers.py), one per direction, so that both cores work. Buffers returned by
`process` are reused by the next call: send or write them first.

Every drop is counted in `counters` under a reason, as in core.py.
"""

from __future__ import annotations

import collections
import itertools
import logging
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag

from tunnel.tun import (
    MAX_READ,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    VNET_HDR,
    VNET_HDR_SIZE,
)
from tunnel.wireguard.allowedips import AllowedIPs
from tunnel.wireguard.core import (
    EndpointChanged,
    Event,
    KeepaliveRequested,
    KeypairsChanged,
)
from tunnel.wireguard.extension import SUPER_HEADER as _SUPER_HEADER
from tunnel.wireguard.extension import Fragmenter, Reassembly, gather_batch
from tunnel.wireguard.keys import TAG_SIZE
from tunnel.wireguard.messages import (
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_SUPER_FRAGMENT,
    MESSAGE_TRANSPORT,
    SUPER_HEADER_SIZE,
    TRANSPORT_HEADER,
    TRANSPORT_HEADER_SIZE,
    padded_length,
)
from tunnel.wireguard.segment import (
    Coalescer,
    Segmenter,
    SegmentError,
    coalesce_rows,
    complete_checksum,
)
from tunnel.wireguard.session import Keypair, KeypairSnapshot
from tunnel.wireguard.timers import TimerConfig

Address = tuple[str, int]
_NONCE_PREFIX = b"\x00\x00\x00\x00"
_TRANSPORT_FIELDS = struct.Struct("<IQ")  # receiver index, counter (at offset 4)
_NONCE = struct.Struct("<4xQ")  # the AEAD nonce of a counter
_HEADER = struct.Struct("<IIQ")  # type word, receiver index, counter
_COUNTER = struct.Struct("<Q")
_TRANSPORT_TYPE_WORD = np.array([MESSAGE_TRANSPORT, 0, 0, 0, 0, 0, 0, 0], dtype=np.uint8)
_TRANSPORT_TYPE_WORD.setflags(write=False)
MAX_STAGED = 128
_MAX_ROWS = 64  # a UDP GRO read holds at most 64 datagrams
_MAX_HELD = 32  # messages for not-yet-known indices kept at most ...
_HOLD_TIME = 0.2  # ... for this long
log = logging.getLogger(__name__)
_MAX_VIEW_SIZES = 8  # datagram sizes whose buffer views are kept (one or two in practice)


@dataclass(frozen=True, slots=True)
class PlaneConfig:
    mtu: int = 1420  # the TUN's MTU: the largest inner packet of a standard message
    max_datagram: int = 1472  # UDP payload that fits the underlay MTU (1500 - 28 for IPv4)
    timers: TimerConfig = field(default_factory=TimerConfig)
    verify_checksums: bool = True  # check checksums before writing coalesced runs


def _engine_fault(counters: collections.Counter[str], direction: str) -> None:
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
    """Datagrams for one sendmsg: equal `segment_size` pieces (the last may be shorter)."""

    data: memoryview
    segment_size: int  # 0: a single datagram
    endpoint: Address


# ---------------------------------------------------------------------------- sending


class _TxPeer:
    __slots__ = (
        "endpoint",
        "extension_ok",
        "handshake_requested_at",
        "key",
        "keypair",
        "sent",
        "staged",
    )

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.endpoint: Address | None = None
        self.extension_ok = False
        self.keypair: Keypair | None = None
        self.staged: collections.deque[bytes] = collections.deque(maxlen=MAX_STAGED)
        self.sent: tuple[int, bool, float] | None = None  # unreported (counter, data, time)
        self.handshake_requested_at = float("-inf")


class TxEngine:
    """TUN reads in, datagrams out."""

    def __init__(self, config: PlaneConfig) -> None:
        self.config = config
        self._reject_after_time = config.timers.reject_after_time
        self._reject_after = config.timers.reject_after_messages
        self._peers: dict[bytes, _TxPeer] = {}
        self._routes: AllowedIPs[_TxPeer] = AllowedIPs()
        self._segmenter = Segmenter(config.mtu)
        self._fragmenter = Fragmenter(config.max_datagram)
        self._out = bytearray(128 * (config.max_datagram + 64))
        self._out_view = memoryview(self._out)
        self._out_array = np.frombuffer(self._out, dtype=np.uint8)
        self._arange = np.arange(128, dtype=np.uint64)
        self._plain = bytearray(MAX_READ + 64)
        self._plain_view = memoryview(self._plain)
        self._cipher = bytearray(MAX_READ + 64)
        self._cipher_view = memoryview(self._cipher)
        self._seal_view_cache: dict[
            int, tuple[list[memoryview], list[memoryview], list[memoryview]]
        ] = {}
        self._handshake_reports: list[Report] = []
        self._now = 0.0
        self.counters: collections.Counter[str] = collections.Counter()
        self.stats: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ commands

    def apply(self, command: PlaneCommand, now: float) -> list[Send]:
        self._now = now
        if isinstance(command, SetPeer):
            peer = self._peers.get(command.peer)
            if peer is None:
                peer = self._peers[command.peer] = _TxPeer(command.peer)
            peer.endpoint = command.endpoint or peer.endpoint
            peer.extension_ok = command.extension_ok
            self._routes.remove_value(peer)
            for prefix in command.allowed_ips:
                self._routes.insert(prefix, peer)
            return []
        if isinstance(command, RemovePeer):
            gone = self._peers.pop(command.peer, None)
            if gone is not None:
                self._routes.remove_value(gone)
            return []
        peer = self._peers.get(command.peer)
        if peer is None:
            return []
        if isinstance(command, SetKeypairs):
            current = command.current
            if current is None:
                peer.keypair = None
            elif peer.keypair is None or peer.keypair.local_index != current.local_index:
                peer.keypair = Keypair.from_snapshot(current)
                peer.keypair.send_counter = 0
            return self._flush_staged(peer, now)
        if isinstance(command, SetEndpoint):
            peer.endpoint = command.endpoint
            return self._flush_staged(peer, now)
        if isinstance(command, SendKeepalive):
            if peer.staged:
                return self._flush_staged(peer, now)
            return self._seal_plain(peer, memoryview(b""), now)
        raise TypeError(f"unknown command {command!r}")

    @property
    def has_urgent_reports(self) -> bool:
        """A handshake is needed: the control plane should hear now, not at the next tick."""
        return bool(self._handshake_reports)

    def reports(self) -> list[Report]:
        out: list[Report] = []
        for peer in self._peers.values():
            if peer.sent is not None:
                out.append(DataSent(peer.key, *peer.sent))
                peer.sent = None
        out.extend(self._handshake_reports)
        self._handshake_reports.clear()
        return out

    # ------------------------------------------------------------------ data

    def process(self, read: memoryview, now: float) -> list[Send]:
        """One TUN read (virtio-net header + IP packet) -> zero or more Sends. Never raises:
        an exception (a bug) costs this read only, counted as `engine_error_tx`."""
        try:
            return self._process(read, now)
        except Exception:
            _engine_fault(self.counters, "tx")
            return []

    def _process(self, read: memoryview, now: float) -> list[Send]:
        self._now = now
        if len(read) < VNET_HDR_SIZE + 20:
            self.counters["tun_truncated"] += 1
            return []
        packet = read[VNET_HDR_SIZE:]
        version = packet[0] >> 4
        if version == 4:
            destination = packet[16:20]
        elif version == 6 and len(packet) >= 40:
            destination = packet[24:40]
        else:
            self.counters["bad_inner_packet"] += 1
            return []
        peer = self._routes.lookup(destination)
        if peer is None:
            self.counters["no_route"] += 1
            return []
        if read[1]:  # gso_type: the kernel handed over a super-packet
            self.stats["tun_gso_reads"] += 1
        keypair = peer.keypair
        if (
            keypair is None
            or peer.endpoint is None
            or keypair.send_counter >= self._reject_after
            or now - keypair.created >= self._reject_after_time
        ):
            self._stage(peer, read, now)
            return []
        return self._send(peer, keypair, read, now)

    def _send(self, peer: _TxPeer, keypair: Keypair, read: memoryview, now: float) -> list[Send]:
        if peer.extension_ok:
            return self._send_extension(peer, keypair, read)
        flags, gso_type, _, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(read, 0)
        packet = read[VNET_HDR_SIZE:]
        if gso_type != VIRTIO_NET_HDR_GSO_NONE:
            try:
                lengths = self._segmenter.segment(packet, gso_type, gso_size, csum_start)
            except SegmentError as exc:
                self.counters[exc.reason] += 1
                return []
            return self._seal_rows(peer, keypair, lengths)
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            try:
                complete_checksum(packet, csum_start, csum_offset)
            except SegmentError as exc:
                self.counters[exc.reason] += 1
                return []
        if len(packet) > self.config.mtu:
            self.counters["oversized_packet"] += 1
            return []
        return self._seal_plain(peer, packet, now)

    def _seal_plain(self, peer: _TxPeer, packet: memoryview, now: float) -> list[Send]:
        keypair = peer.keypair
        if (
            keypair is None
            or peer.endpoint is None
            or keypair.send_counter >= self._reject_after
            or now - keypair.created >= self._reject_after_time
        ):
            self.counters["no_keypair"] += 1
            return []
        length = len(packet)
        plain_length = padded_length(length, self.config.mtu)
        plain = self._plain_view[:plain_length]
        plain[:length] = packet
        if plain_length > length:
            plain[length:] = bytes(plain_length - length)
        counter = keypair.send_counter
        keypair.send_counter = counter + 1
        out = self._out_view
        TRANSPORT_HEADER.pack_into(out, 0, MESSAGE_TRANSPORT, keypair.remote_index, counter)
        end = TRANSPORT_HEADER_SIZE + plain_length + TAG_SIZE
        keypair.sender.encrypt_into(
            _NONCE_PREFIX + out[8:16], plain, None, out[TRANSPORT_HEADER_SIZE:end]
        )
        peer.sent = (counter + 1, bool(length) or (peer.sent is not None and peer.sent[1]), now)
        self.stats["messages_sent"] += 1
        return [Send(out[:end], 0, peer.endpoint)]

    def _seal_rows(self, peer: _TxPeer, keypair: Keypair, lengths: list[int]) -> list[Send]:
        """Seal the segmenter's rows as consecutive type-4 messages in the output buffer.

        Headers are written for all rows at once with the receiver field zeroed, so that bytes
        4..16 of each header are that message's AEAD nonce (32 zero bits + counter) and can be
        passed to the cipher in place; the receiver index is filled in afterwards.
        """
        assert peer.endpoint is not None
        count = len(lengths)
        full_plain, last_plain = lengths[0], lengths[-1]
        datagram = TRANSPORT_HEADER_SIZE + full_plain + TAG_SIZE
        counter = keypair.send_counter
        heads = self._out_array[: count * datagram].reshape(count, datagram)[:, :16]
        heads[:, 0:8] = _TRANSPORT_TYPE_WORD
        heads[:, 8:16] = (
            (self._arange[:count] + np.uint64(counter))
            .astype("<u8")
            .view(np.uint8)
            .reshape(count, 8)
        )
        out = self._out_view
        encrypt_into = keypair.sender.encrypt_into
        if count > 1:
            nonces, plains, seals = self._seal_views(full_plain)
            # one C-level loop over cached views of the fixed buffers: no per-segment slicing
            collections.deque(
                map(
                    encrypt_into,
                    nonces[: count - 1],
                    plains[: count - 1],
                    itertools.repeat(None, count - 1),
                    seals[: count - 1],
                ),
                maxlen=0,
            )
        at = (count - 1) * datagram
        row = (count - 1) * self._segmenter.width
        body = at + TRANSPORT_HEADER_SIZE
        end = body + last_plain + TAG_SIZE
        rows = self._segmenter.flat
        encrypt_into(out[at + 4 : body], rows[row : row + last_plain], None, out[body:end])
        heads[:, 4:8] = np.frombuffer(struct.pack("<I", keypair.remote_index), dtype=np.uint8)
        keypair.send_counter = counter + count
        peer.sent = (counter + count, True, self._now)
        self.stats["messages_sent"] += count
        self.stats["super_packets_segmented"] += 1
        return [Send(out[:end], datagram if count > 1 else 0, peer.endpoint)]

    def _seal_views(
        self, full_plain: int
    ) -> tuple[list[memoryview], list[memoryview], list[memoryview]]:
        """Nonce, plaintext-row and ciphertext views for segments of `full_plain` bytes, made
        once per segment size (the buffers never move)."""
        views = self._seal_view_cache.get(full_plain)
        if views is None:
            out, rows, width = self._out_view, self._segmenter.flat, self._segmenter.width
            datagram = TRANSPORT_HEADER_SIZE + full_plain + TAG_SIZE
            limit = min(len(out) // datagram, len(rows) // width)
            starts = [(i * datagram, i * width) for i in range(limit)]
            views = (
                [out[at + 4 : at + TRANSPORT_HEADER_SIZE] for at, _ in starts],
                [rows[row : row + full_plain] for _, row in starts],
                [out[at + TRANSPORT_HEADER_SIZE : at + datagram] for at, _ in starts],
            )
            if len(self._seal_view_cache) >= _MAX_VIEW_SIZES:
                self._seal_view_cache.clear()
            self._seal_view_cache[full_plain] = views
        return views

    def _send_extension(self, peer: _TxPeer, keypair: Keypair, read: memoryview) -> list[Send]:
        assert peer.endpoint is not None
        length = len(read)
        counter = keypair.send_counter
        keypair.send_counter = counter + 1
        cipher = keypair.extension_ciphers[0]
        fragmenter = self._fragmenter
        nonce = _NONCE.pack(counter)
        if length + TAG_SIZE <= fragmenter.chunk:
            # one fragment (a TCP ACK, a small packet): header and ciphertext in place
            out = self._out_view
            _SUPER_HEADER.pack_into(
                out, 0, MESSAGE_SUPER_FRAGMENT, 0, 1, 0, keypair.remote_index, counter
            )
            end = SUPER_HEADER_SIZE + length + TAG_SIZE
            cipher.encrypt_into(nonce, read, None, out[SUPER_HEADER_SIZE:end])
            peer.sent = (counter + 1, True, self._now)
            self.stats["extension_messages_sent"] += 1
            return [Send(out[:end], 0, peer.endpoint)]
        sealed = self._cipher_view[: length + TAG_SIZE]
        cipher.encrypt_into(nonce, read, None, sealed)
        used, count = fragmenter.layout(sealed, keypair.remote_index, counter)
        peer.sent = (counter + 1, True, self._now)
        self.stats["extension_messages_sent"] += 1
        view = memoryview(fragmenter.buffer)
        size = fragmenter.max_datagram
        per_send = 65000 // size  # one UDP GSO send carries at most ~64 KB
        if count <= per_send:
            return [Send(view[:used], size if count > 1 else 0, peer.endpoint)]
        sends = []
        for start in range(0, count, per_send):
            stop = min(used, (start + per_send) * size)
            pieces = min(per_send, count - start)
            sends.append(Send(view[start * size : stop], size if pieces > 1 else 0, peer.endpoint))
        return sends

    def _stage(self, peer: _TxPeer, read: memoryview, now: float) -> None:
        if len(peer.staged) == peer.staged.maxlen:
            self.counters["staged_overflow"] += 1
        peer.staged.append(bytes(read))
        if now - peer.handshake_requested_at > 0.25:
            peer.handshake_requested_at = now
            self._handshake_reports.append(HandshakeNeeded(peer.key))

    def _flush_staged(self, peer: _TxPeer, now: float) -> list[Send]:
        keypair = peer.keypair
        if not peer.staged or keypair is None or peer.endpoint is None:
            return []
        sends: list[Send] = []
        while peer.staged:
            read = memoryview(bytearray(peer.staged.popleft()))
            # each Send reuses the output buffer: materialise before the next one
            sends.extend(
                Send(memoryview(bytes(s.data)), s.segment_size, s.endpoint)
                for s in self._send(peer, keypair, read, now)
            )
        return sends


# ---------------------------------------------------------------------------- receiving


@dataclass(frozen=True, slots=True)
class _Held:
    """A message held until its receiver index is known (see RxEngine._hold)."""

    receiver: int
    payload: bytes  # a type-4 datagram, or an extension message's ciphertext
    key: bytes | None  # the extension header's receiver + counter; None for type 4
    source: Address
    at: float


class _RxPeer:
    __slots__ = ("key", "keypairs", "last_endpoint", "next_index", "pending")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.keypairs: dict[int, Keypair] = {}
        self.next_index: int | None = None
        self.last_endpoint: Address | None = None
        # local index -> unreported receipt (endpoint, carried data, time)
        self.pending: dict[int, tuple[Address, bool, float]] = {}


class RxEngine:
    """UDP reads in, TUN writes and handshake messages out."""

    def __init__(self, config: PlaneConfig) -> None:
        self.config = config
        self._reject_after_time = config.timers.reject_after_time
        self._reject_after = config.timers.reject_after_messages
        self._peers: dict[bytes, _RxPeer] = {}
        self._indices: dict[int, tuple[_RxPeer, Keypair]] = {}
        self._sources: AllowedIPs[_RxPeer] = AllowedIPs()
        self._coalescer = Coalescer(verify=config.verify_checksums)
        self._row_width = max(config.max_datagram, 2048)
        self._rows = np.zeros(_MAX_ROWS * self._row_width, dtype=np.uint8)
        self._rows_flat = memoryview(self._rows.data)
        self._arange = np.arange(_MAX_ROWS, dtype=np.uint64)
        self._cipher = bytearray(MAX_READ + 256)
        self._cipher_view = memoryview(self._cipher)
        self._reassembly = Reassembly()
        self._open_view_cache: dict[int, tuple[list[slice], list[slice], list[memoryview]]] = {}
        # one reusable output for the result of a fast-path batch (written before the next)
        self._out = bytearray(VNET_HDR_SIZE + 65536 + 64)
        self._held: collections.deque[_Held] = collections.deque()
        self._urgent: list[Report] = []
        self.handshake_messages: list[tuple[bytes, Address]] = []
        self.counters: collections.Counter[str] = collections.Counter()
        self.stats: collections.Counter[str] = collections.Counter()

    def apply(self, command: PlaneCommand, now: float) -> None:
        if isinstance(command, SetPeer):
            peer = self._peers.get(command.peer)
            if peer is None:
                peer = self._peers[command.peer] = _RxPeer(command.peer)
            self._sources.remove_value(peer)
            for prefix in command.allowed_ips:
                self._sources.insert(prefix, peer)
        elif isinstance(command, RemovePeer):
            gone = self._peers.pop(command.peer, None)
            if gone is not None:
                self._sources.remove_value(gone)
                for index in gone.keypairs:
                    self._indices.pop(index, None)
        elif isinstance(command, SetKeypairs):
            peer = self._peers.get(command.peer)
            if peer is None:
                return
            wanted = {
                s.local_index: s
                for s in (command.current, command.previous, command.next)
                if s is not None
            }
            for index in list(peer.keypairs):
                if index not in wanted:
                    del peer.keypairs[index]
                    self._indices.pop(index, None)
            for index, snapshot in wanted.items():
                if index not in peer.keypairs:  # keep existing keypairs (their replay windows)
                    keypair = Keypair.from_snapshot(snapshot)
                    peer.keypairs[index] = keypair
                    self._indices[index] = (peer, keypair)
            peer.next_index = command.next.local_index if command.next is not None else None

    def _hold(self, held: _Held) -> None:
        """Keep a message for an unknown index briefly: in a worker, the command with its
        keypair may still be in the control pipe (the control plane installs a keypair and the
        peer's first message can overtake the command). Bounded in count and age; whatever is
        not claimed in time is counted as `unknown_index`."""
        queue = self._held
        while queue and (len(queue) >= _MAX_HELD or held.at - queue[0].at > _HOLD_TIME):
            queue.popleft()
            self.counters["unknown_index"] += 1
        queue.append(held)

    def retry_held(self, now: float) -> list[bytes | bytearray | memoryview]:
        """Re-process held messages whose index is now known (call after `apply`)."""
        queue = self._held
        if not queue:
            return []
        writes: list[bytes | bytearray | memoryview] = []
        self._held = collections.deque()
        for held in queue:
            if held.receiver in self._indices:
                if held.key is None:  # a type-4 datagram (process() reuses its output buffer)
                    data = memoryview(bytearray(held.payload))
                    writes.extend(bytes(w) for w in self.process(data, len(data), held.source, now))
                else:  # an extension message's ciphertext
                    cipher = self._cipher_view[: len(held.payload)]
                    cipher[:] = held.payload
                    writes.extend(self._open_extension(cipher, held.key, held.source, now))
            elif now - held.at > _HOLD_TIME:
                self.counters["unknown_index"] += 1
            else:
                self._held.append(held)
        return writes

    def expire_held(self, now: float) -> None:
        queue = self._held
        while queue and now - queue[0].at > _HOLD_TIME:
            queue.popleft()
            self.counters["unknown_index"] += 1

    def reports(self) -> list[Report]:
        out = self._urgent
        self._urgent = []
        for peer in self._peers.values():
            for index, (endpoint, data, at) in peer.pending.items():
                out.append(DataReceived(peer.key, index, endpoint, data, at))
            peer.pending.clear()
        return out

    @property
    def has_urgent_reports(self) -> bool:
        """Reports that should reach the control plane now (a new keypair confirmed, roaming)."""
        return bool(self._urgent)

    def process(
        self, batch: memoryview, segment_size: int, source: Address, now: float
    ) -> list[bytes | bytearray | memoryview]:
        """One UDP read (possibly a GRO batch of equal-size datagrams) -> TUN writes.

        Transport messages are decrypted into rows of one matrix; a batch that is one in-order
        TCP run is merged with column operations (segment.coalesce_rows), anything else goes
        through the per-packet Coalescer. Never raises: an exception (a bug) costs this read
        only, counted as `engine_error_rx`.
        """
        try:
            return self._process(batch, segment_size, source, now)
        except Exception:
            _engine_fault(self.counters, "rx")
            return []

    def _process(
        self, batch: memoryview, segment_size: int, source: Address, now: float
    ) -> list[bytes | bytearray | memoryview]:
        total = len(batch)
        if total == 0:
            return []
        if segment_size <= 0 or segment_size > total:
            segment_size = total
        if batch[0] == MESSAGE_SUPER_FRAGMENT and total > SUPER_HEADER_SIZE:
            if total == segment_size and batch[1] == 0 and batch[2] == 1:
                # one datagram, one fragment: open the ciphertext where it lies
                return self._open_extension(
                    batch[SUPER_HEADER_SIZE:], bytes(batch[4:16]), source, now, reuse=True
                )
            length = gather_batch(batch, segment_size, self._cipher)
            if length is not None:
                return self._open_extension(
                    self._cipher_view[:length], bytes(batch[4:16]), source, now, reuse=True
                )
        if segment_size > self._row_width or total > self._row_width * _MAX_ROWS:
            self.counters["oversized_read"] += 1
            return []
        if batch[0] == MESSAGE_TRANSPORT and segment_size < total and not batch.readonly:
            fast = self._transport_run(batch, segment_size, source, now)
            if fast is not None:
                return fast
        writes: list[bytes | bytearray | memoryview] = []
        opened: list[tuple[int, _RxPeer, int]] = []  # row offset, peer, plaintext length
        rows = self._rows_flat
        row = 0
        for start in range(0, total, segment_size):
            datagram = batch[start : start + segment_size]
            kind = datagram[0]
            if kind == MESSAGE_TRANSPORT:
                result = self._open_transport(datagram, rows[row : row + segment_size], source, now)
                if result is not None:
                    opened.append((row, result[0], result[1]))
            elif kind == MESSAGE_SUPER_FRAGMENT:
                writes.extend(self._fragment(datagram, source, now))
            elif kind in (MESSAGE_INITIATION, MESSAGE_RESPONSE, MESSAGE_COOKIE_REPLY):
                self.handshake_messages.append((bytes(datagram), source))
            else:
                self.counters["bad_type"] += 1
            row += segment_size
        if opened:
            writes.extend(
                self._deliver(opened, segment_size, whole=len(opened) * segment_size >= total)
            )
        return writes

    def _deliver(
        self, opened: list[tuple[int, _RxPeer, int]], segment_size: int, whole: bool
    ) -> list[bytes | bytearray | memoryview]:
        """Decrypted rows -> TUN writes: merged in one step if possible, else one by one."""
        if whole and len(opened) >= 2:
            merged = self._merge(opened, segment_size)
            if merged is not None:
                return [merged]
        rows = self._rows_flat
        coalescer = self._coalescer
        for at, peer, plain_length in opened:
            if plain_length:
                packet = self._inner(peer, rows[at : at + plain_length])
                if packet is not None:
                    coalescer.add(packet)
        return coalescer.take()

    def _transport_run(
        self, batch: memoryview, segment_size: int, source: Address, now: float
    ) -> list[bytes | bytearray | memoryview] | None:
        """The fast path: a GRO read of type-4 messages for one keypair with consecutive
        counters, all ahead of the replay window. None means "not this shape" and nothing was
        consumed: the general path then takes the read.

        The receiver field of each header is zeroed in place so that header bytes 4..16 are the
        AEAD nonce; the read buffer is ours (recvmsg_into), so that costs nothing.
        """
        total = len(batch)
        count = -(-total // segment_size)
        plain = segment_size - TRANSPORT_HEADER_SIZE - TAG_SIZE
        last_start = (count - 1) * segment_size
        last_plain = total - last_start - TRANSPORT_HEADER_SIZE - TAG_SIZE
        if plain <= 0 or last_plain <= 0 or count > _MAX_ROWS:
            return None
        type_word, receiver, first = _HEADER.unpack_from(batch, 0)
        if type_word != MESSAGE_TRANSPORT:
            return None
        entry = self._indices.get(receiver)
        if entry is None:
            return None
        peer, keypair = entry
        replay = keypair.replay
        if now - keypair.created >= self._reject_after_time or not replay.accepts_run(
            first, count, self._reject_after
        ):
            return None
        full = total // segment_size
        array = np.frombuffer(batch, dtype=np.uint8)
        heads = array[: full * segment_size].reshape(full, segment_size)[:, :16]
        counters = np.ascontiguousarray(heads[:, 8:16]).view("<u8").ravel()
        if (
            not (heads[:, :8] == heads[0, :8]).all()
            or not (counters == self._arange[:full] + np.uint64(first)).all()
        ):
            return None
        if full < count and (
            batch[last_start : last_start + 8] != batch[0:8]
            or _COUNTER.unpack_from(batch, last_start + 8)[0] != first + count - 1
        ):
            return None
        heads[:, 4:8] = 0
        if full < count:
            batch[last_start + 4 : last_start + 8] = b"\x00\x00\x00\x00"
        decrypt_into = keypair.receiver.decrypt_into
        rows = self._rows_flat
        failed: list[int] = []
        last_body = last_start + TRANSPORT_HEADER_SIZE
        if count > 1:
            nonce_slices, body_slices, row_views = self._open_views(segment_size)
            pick = batch.__getitem__
            try:  # one C-level loop; a forged message sends us to the per-message loop
                collections.deque(
                    map(
                        decrypt_into,
                        map(pick, nonce_slices[: count - 1]),
                        map(pick, body_slices[: count - 1]),
                        itertools.repeat(None, count - 1),
                        row_views[: count - 1],
                    ),
                    maxlen=0,
                )
            except InvalidTag:
                for start in range(0, last_start, segment_size):
                    body = start + TRANSPORT_HEADER_SIZE
                    try:
                        decrypt_into(
                            batch[start + 4 : body],
                            batch[body : start + segment_size],
                            None,
                            rows[start : start + plain],
                        )
                    except InvalidTag:
                        failed.append(start)
        try:
            decrypt_into(
                batch[last_start + 4 : last_body],
                batch[last_body:total],
                None,
                rows[last_start : last_start + last_plain],
            )
        except InvalidTag:
            failed.append(last_start)
        if len(failed) == count:
            self.counters["decrypt_failed"] += count
            return []
        self._note_received(peer, receiver, source, True, now)
        self.stats["fast_batches"] += 1
        if not failed:
            replay.accept_run(first, count)
            merged = self._merge_rows(peer, count, segment_size, last_plain)
            if merged is not None:
                return [merged]
            opened = [(start, peer, plain) for start in range(0, last_start, segment_size)]
            opened.append((last_start, peer, last_plain))
            return self._deliver(opened, segment_size, whole=False)
        self.counters["decrypt_failed"] += len(failed)
        for start in range(0, total, segment_size):
            if start not in failed:
                replay.accept(first + start // segment_size, self._reject_after)
        opened = [
            (start, peer, plain if start != last_start else last_plain)
            for start in range(0, total, segment_size)
            if start not in failed
        ]
        return self._deliver(opened, segment_size, whole=False)

    def _open_views(self, segment_size: int) -> tuple[list[slice], list[slice], list[memoryview]]:
        """Per datagram size: slices of a GRO read for each message's nonce and ciphertext,
        and views of the rows their plaintexts go to (made once; the rows never move)."""
        views = self._open_view_cache.get(segment_size)
        if views is None:
            plain = segment_size - TRANSPORT_HEADER_SIZE - TAG_SIZE
            starts = range(0, _MAX_ROWS * segment_size, segment_size)
            rows = self._rows_flat
            views = (
                [slice(at + 4, at + TRANSPORT_HEADER_SIZE) for at in starts],
                [slice(at + TRANSPORT_HEADER_SIZE, at + segment_size) for at in starts],
                [rows[at : at + plain] for at in starts],
            )
            if len(self._open_view_cache) >= _MAX_VIEW_SIZES:
                self._open_view_cache.clear()  # sizes come from the wire: keep the cache small
            self._open_view_cache[segment_size] = views
        return views

    def _merge(
        self, opened: list[tuple[int, _RxPeer, int]], segment_size: int
    ) -> bytearray | memoryview | None:
        """The whole batch decrypted, from one peer: try to merge it with column operations."""
        peer = opened[0][1]
        for _, other, plain_length in opened:
            if other is not peer or plain_length == 0:
                return None
        return self._merge_rows(peer, len(opened), segment_size, opened[-1][2])

    def _merge_rows(
        self, peer: _RxPeer, count: int, segment_size: int, last_plain: int
    ) -> bytearray | memoryview | None:
        plain = segment_size - TRANSPORT_HEADER_SIZE - TAG_SIZE
        rows = self._rows[: count * segment_size].reshape(count, segment_size)[:, :plain]
        first = rows[0]
        if first[0] != 0x45 or self._sources.lookup(first[12:16].tobytes()) is not peer:
            return None  # the per-packet path counts whatever is wrong
        merged = coalesce_rows(rows, last_plain, self.config.verify_checksums, self._out)
        if merged is not None:
            self.stats["packets_received"] += count
            self.stats["batches_merged"] += 1
        return merged

    def _open_transport(
        self, datagram: memoryview, row: memoryview, source: Address, now: float
    ) -> tuple[_RxPeer, int] | None:
        """Authenticate and decrypt one type-4 message into `row`; None (counted) if dropped."""
        length = len(datagram)
        if length < TRANSPORT_HEADER_SIZE + TAG_SIZE:
            self.counters["truncated"] += 1
            return None
        if datagram[1] or datagram[2] or datagram[3]:
            self.counters["bad_type"] += 1
            return None
        receiver, counter = _TRANSPORT_FIELDS.unpack_from(datagram, 4)
        entry = self._indices.get(receiver)
        if entry is None:
            self._hold(_Held(receiver, bytes(datagram), None, source, now))
            return None
        peer, keypair = entry
        if now - keypair.created >= self._reject_after_time:
            self.counters["expired_keypair"] += 1
            return None
        replay = keypair.replay
        if not replay.check(counter, self._reject_after):
            self.counters["replay"] += 1
            return None
        plain_length = length - TRANSPORT_HEADER_SIZE - TAG_SIZE
        try:
            keypair.receiver.decrypt_into(
                _NONCE.pack(counter), datagram[TRANSPORT_HEADER_SIZE:], None, row[:plain_length]
            )
        except InvalidTag:
            self.counters["decrypt_failed"] += 1
            return None
        if not replay.accept(counter, self._reject_after):
            self.counters["replay"] += 1
            return None
        self._note_received(peer, receiver, source, plain_length > 0, now)
        if plain_length == 0:
            self.stats["keepalives_received"] += 1
        return peer, plain_length

    def _inner(self, peer: _RxPeer, plain: memoryview) -> memoryview | None:
        """Trim padding and check the source address; None (counted) if not deliverable."""
        version = plain[0] >> 4
        if version == 4 and len(plain) >= 20:
            length = plain[2] << 8 | plain[3]
            if length < 20 or length > len(plain):
                self.counters["bad_inner_packet"] += 1
                return None
            source = plain[12:16]
        elif version == 6 and len(plain) >= 40:
            length = 40 + (plain[4] << 8 | plain[5])
            if length > len(plain):
                self.counters["bad_inner_packet"] += 1
                return None
            source = plain[8:24]
        else:
            self.counters["bad_inner_packet"] += 1
            return None
        if self._sources.lookup(source) is not peer:
            self.counters["bad_inner_source"] += 1
            return None
        return plain[:length]

    def _note_received(
        self, peer: _RxPeer, index: int, source: Address, data: bool, now: float
    ) -> None:
        previous = peer.pending.get(index)
        peer.pending[index] = (source, data or (previous is not None and previous[1]), now)
        if index == peer.next_index or source != peer.last_endpoint:
            # a responder's next keypair is confirmed, or the peer roamed: tell control now
            peer.last_endpoint = source
            if index == peer.next_index:
                peer.next_index = None
            self._urgent.append(DataReceived(peer.key, index, source, data, now))

    def _fragment(
        self, datagram: memoryview, source: Address, now: float
    ) -> list[bytes | bytearray | memoryview]:
        if len(datagram) <= SUPER_HEADER_SIZE:
            self.counters["truncated"] += 1
            return []
        try:
            complete = self._reassembly.add(datagram)
        except ValueError:
            self.counters["bad_fragment"] += 1
            return []
        if complete is None:
            return []
        key, ciphertext = complete
        view = self._cipher_view[: len(ciphertext)]
        view[:] = ciphertext
        return self._open_extension(view, key, source, now)

    def _open_extension(
        self, ciphertext: memoryview, key: bytes, source: Address, now: float, reuse: bool = False
    ) -> list[bytes | bytearray | memoryview]:
        receiver, counter = _TRANSPORT_FIELDS.unpack(key)
        entry = self._indices.get(receiver)
        if entry is None:
            self._hold(_Held(receiver, bytes(ciphertext), key, source, now))
            return []
        peer, keypair = entry
        if now - keypair.created >= self._reject_after_time:
            self.counters["expired_keypair"] += 1
            return []
        if not keypair.replay.check(counter, self._reject_after):
            self.counters["replay"] += 1
            return []
        length = len(ciphertext) - TAG_SIZE
        if length < VNET_HDR_SIZE + 20:
            self.counters["truncated"] += 1
            return []
        if length > len(self._out):
            self.counters["oversized_message"] += 1
            return []
        out = memoryview(self._out)[:length] if reuse else memoryview(bytearray(length))
        try:
            keypair.extension_ciphers[1].decrypt_into(
                _NONCE_PREFIX + key[4:12], ciphertext, None, out
            )
        except InvalidTag:
            self.counters["decrypt_failed"] += 1
            return []
        if not keypair.replay.accept(counter, self._reject_after):
            self.counters["replay"] += 1
            return []
        self._note_received(peer, receiver, source, True, now)
        packet = out[VNET_HDR_SIZE:]
        inner = self._inner(peer, packet)
        if inner is None:
            return []
        if len(inner) != len(packet):
            self.counters["bad_inner_packet"] += 1
            return []
        self.stats["extension_messages_received"] += 1
        return [out]


def apply_all(
    tx: TxEngine, rx: RxEngine, commands: Iterable[PlaneCommand], now: float
) -> list[Send]:
    """Hand the same commands to both engines (in-process use); returns the resulting sends."""
    sends: list[Send] = []
    for command in commands:
        rx.apply(command, now)
        sends.extend(tx.apply(command, now))
    return sends
