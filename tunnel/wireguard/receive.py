"""tunnel.wireguard.receive: the RX engine, UDP reads in, TUN writes and handshake messages out
(sans-IO; the split of work between the engines and the control plane is described in
plane.py).

It owns the index table (local index -> peer and keypair), the replay windows and the inner
source checks, and briefly holds messages whose keypair command has not arrived yet. The rule
it keeps: nothing reaches the TUN unless it authenticated, passed its replay window and came
from an address its peer is allowed; every drop is counted under a reason, never raised.
"""

from __future__ import annotations

import collections
import itertools
import struct
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag

from tunnel.tun import MAX_READ, VNET_HDR_SIZE
from tunnel.wireguard.allowedips import AllowedIPs
from tunnel.wireguard.extension import Reassembly, Scatter, gather_batch
from tunnel.wireguard.keys import TAG_SIZE
from tunnel.wireguard.messages import (
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_SUPER_FRAGMENT,
    MESSAGE_TRANSPORT,
    SUPER_HEADER_SIZE,
    TRANSPORT_HEADER_SIZE,
)
from tunnel.wireguard.plane import (
    Address,
    DataReceived,
    PlaneCommand,
    PlaneConfig,
    RemovePeer,
    Report,
    SetKeypairs,
    SetPeer,
    engine_fault,
)
from tunnel.wireguard.segment import Coalescer, coalesce_rows
from tunnel.wireguard.session import Keypair

_NONCE_PREFIX = b"\x00\x00\x00\x00"
_TRANSPORT_FIELDS = struct.Struct("<IQ")  # receiver index, counter (at offset 4)
_NONCE = struct.Struct("<4xQ")  # the AEAD nonce of a counter
_HEADER = struct.Struct("<IIQ")  # type word, receiver index, counter
_COUNTER = struct.Struct("<Q")
_MAX_ROWS = 64  # a UDP GRO read holds at most 64 datagrams
_MAX_HELD = 32  # messages for not-yet-known indices kept at most ...
_HOLD_TIME = 0.2  # ... for this long
_MAX_VIEW_SIZES = 8  # datagram sizes whose buffer views are kept (one or two in practice)
READ_SIZE = 65536 + 4096  # the largest UDP (GRO) read


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
        # where UDP reads land (read_buffers / process_read): linear, or scattered while
        # extension messages arrive (see extension.Scatter)
        self._linear = bytearray(READ_SIZE)
        self._linear_buffers = [memoryview(self._linear)]
        self._scatter = Scatter(config.max_datagram, READ_SIZE)
        self._scattering = False
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

    @property
    def holding(self) -> bool:
        """Messages are held for a keypair not installed yet (`expire_held` them in time)."""
        return bool(self._held)

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

    def read_buffers(self) -> list[memoryview]:
        """Where the next UDP read should land (recvmsg_into); then call `process_read`.

        While whole extension messages arrive, a scatter list (extension.Scatter) that lands
        the ciphertext contiguous, so it is opened where it lies; otherwise one linear buffer.
        """
        return self._scatter.buffers if self._scattering else self._linear_buffers

    def process_read(
        self, size: int, segment_size: int, source: Address, now: float
    ) -> list[bytes | bytearray | memoryview]:
        """The read into `read_buffers()` of `size` bytes (GRO segment `segment_size`, 0 for
        none) -> TUN writes, as `process`. Never raises."""
        try:
            scatter = self._scatter
            if self._scattering:
                length = scatter.message(size, segment_size)
                if length is not None:
                    return self._open_extension(
                        scatter.cipher_view[:length], bytes(scatter.headers[4:16]), source,
                        now, reuse=True,
                    )
                scatter.linearize(size, self._linear)
                if size > scatter.max_datagram:  # not our kind of batch: read linearly
                    self._scattering = False
            else:
                linear = self._linear
                self._scattering = (
                    size > segment_size == scatter.max_datagram
                    and linear[0] == MESSAGE_SUPER_FRAGMENT
                )
        except Exception:
            engine_fault(self.counters, "rx")
            return []
        return self.process(memoryview(self._linear)[:size], segment_size, source, now)

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
            engine_fault(self.counters, "rx")
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
        if datagram[1] == 0 and datagram[2] == 1:  # a whole message (a batch of ACKs, say)
            return self._open_extension(
                datagram[SUPER_HEADER_SIZE:], bytes(datagram[4:16]), source, now
            )
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
