"""tunnel.wireguard.send: the TX engine, TUN reads in, datagrams out (sans-IO; the split of
work between the engines and the control plane is described in plane.py).

It owns routing by allowed IPs, each peer's current keypair and send counter, and the packets
staged while no keypair is usable. The rule it keeps: a read becomes `Send`s whose buffers are
reused by the next call (send them first), and a read it cannot send is counted under a reason,
never raised.
"""

from __future__ import annotations

import collections
import itertools
import struct

import numpy as np

from tunnel.tun import (
    MAX_READ,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    VNET_HDR,
    VNET_HDR_SIZE,
)
from tunnel.wireguard.allowedips import AllowedIPs
from tunnel.wireguard.extension import SUPER_HEADER as _SUPER_HEADER
from tunnel.wireguard.extension import Fragmenter
from tunnel.wireguard.keys import TAG_SIZE
from tunnel.wireguard.messages import (
    MESSAGE_SUPER_FRAGMENT,
    MESSAGE_TRANSPORT,
    SUPER_HEADER_SIZE,
    TRANSPORT_HEADER,
    TRANSPORT_HEADER_SIZE,
    padded_length,
)
from tunnel.wireguard.plane import (
    Address,
    DataSent,
    HandshakeNeeded,
    PlaneCommand,
    PlaneConfig,
    RemovePeer,
    Report,
    Send,
    SendKeepalive,
    SetEndpoint,
    SetKeypairs,
    SetPeer,
    engine_fault,
)
from tunnel.wireguard.segment import Segmenter, SegmentError, complete_checksum
from tunnel.wireguard.session import Keypair

_NONCE_PREFIX = b"\x00\x00\x00\x00"
_NONCE = struct.Struct("<4xQ")  # the AEAD nonce of a counter
_TRANSPORT_TYPE_WORD = np.array([MESSAGE_TRANSPORT, 0, 0, 0, 0, 0, 0, 0], dtype=np.uint8)
_TRANSPORT_TYPE_WORD.setflags(write=False)
MAX_STAGED = 128
_MAX_VIEW_SIZES = 8  # datagram sizes whose buffer views are kept (one or two in practice)


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
            engine_fault(self.counters, "tx")
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
        cipher.encrypt_into(nonce, read, None, fragmenter.view[: length + TAG_SIZE])
        iovec, count = fragmenter.layout(length + TAG_SIZE, keypair.remote_index, counter)
        peer.sent = (counter + 1, True, self._now)
        self.stats["extension_messages_sent"] += 1
        size = fragmenter.max_datagram
        per_send = 65000 // size  # one UDP GSO send carries at most ~64 KB
        if count <= per_send:
            return [Send(iovec, size, peer.endpoint)]
        return [
            Send(iovec[start * 2 : (start + per_send) * 2], size, peer.endpoint)
            for start in range(0, count, per_send)
        ]

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
                Send(memoryview(s.payload()), s.segment_size, s.endpoint)
                for s in self._send(peer, keypair, read, now)
            )
        return sends
