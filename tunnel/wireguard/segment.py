"""Userspace TSO and GRO: cut TCP super-packets into wire-sized segments, and glue them back.

Why: the TUN hands us (and accepts) 64 KB TCP super-packets with a virtio-net header, which is
what makes a Python data path fast. Stock WireGuard peers need one ordinary IP packet per
transport message, so on the way out a super-packet is segmented here, with every IP and TCP
checksum computed; on the way in, consecutive segments of one TCP flow are coalesced into one
super-packet written with `VIRTIO_NET_HDR_F_NEEDS_CSUM` and a GSO type, as the kernel's own GRO
would build it.

How it stays fast in Python: the work per super-packet is a fixed number of numpy operations,
not a loop over bytes. Segments are the rows of one matrix (header template + payload slice +
zero padding); per-row fields (lengths, IPv4 id, sequence numbers, flags) are written as
columns; checksums are row sums of the matrix viewed as 32-bit words (one's-complement sums do
not depend on word size or byte order, RFC 1071, so a native 32-bit sum folded to 16 bits and
byte-swapped equals the big-endian 16-bit sum).

The facts it relies on (Linux tcp_gso_segment, and wireguard-go's tun/offload_linux.go):
the kernel's `hdr_len` is not the header length (it is the skb's linear length), so the header
length is recomputed from csum_start and the TCP data offset; the IPv4 id grows by one per
segment; FIN and PSH stay only on the last segment, CWR only on the first; with NEEDS_CSUM the
TCP checksum field holds the folded pseudo-header sum over the whole super-packet's TCP length.

The rule it keeps: input it does not understand is passed through unchanged or refused with
`SegmentError` (counted by the caller), never guessed at.
"""

from __future__ import annotations

import functools
import struct

import numpy as np
import numpy.typing as npt

from tunnel.tun import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VNET_HDR,
    VNET_HDR_SIZE,
)
from tunnel.wireguard.messages import padded_length

TCP_FIN = 0x01
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_CWR = 0x80
IPPROTO_TCP = 6
IPPROTO_UDP = 17
MAX_SEGMENTS = 64

_U16 = struct.Struct(">H")

Matrix = npt.NDArray[np.uint8]


class SegmentError(ValueError):
    """A super-packet that cannot be segmented; `reason` names the drop counter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _swap16(value: int) -> int:
    return ((value & 0xFF) << 8) | (value >> 8)


def ones_complement_sum(data: bytes | bytearray | memoryview) -> int:
    """The folded 16-bit one's-complement sum of `data` read as big-endian words."""
    length = len(data)
    if length < 512:  # small (an ACK): one big-integer remainder beats numpy's call overhead
        total = (
            int.from_bytes(data, "big")
            if not length & 1
            else int.from_bytes(bytes(data) + b"\x00", "big")
        )
        folded = total % 0xFFFF
        return folded if folded or not total else 0xFFFF
    head = length & ~3
    total = int(np.frombuffer(data, dtype="<u4", count=head >> 2).sum(dtype=np.uint64))
    total = _swap16(_fold(total))
    tail = bytes(data[head:])
    if tail:
        tail += bytes(4 - len(tail))
        total += (tail[0] << 8 | tail[1]) + (tail[2] << 8 | tail[3])
    return _fold(total)


def pseudo_header_sum(
    source: bytes | memoryview, destination: bytes | memoryview, proto: int, length: int
) -> int:
    """Folded sum of the TCP/UDP pseudo-header (IPv4 or IPv6 by address size)."""
    return _fold(ones_complement_sum(bytes(source) + bytes(destination)) + proto + length)


def complete_checksum(packet: bytearray | memoryview, csum_start: int, csum_offset: int) -> None:
    """Finish a NEEDS_CSUM packet: the field holds the pseudo-header sum; store the checksum.

    Used for packets the kernel left with a partial checksum that go to a peer which cannot
    take the virtio header (a stock WireGuard peer).
    """
    at = csum_start + csum_offset
    if at + 2 > len(packet) or csum_start >= len(packet):
        raise SegmentError("bad_checksum_offsets")
    checksum = 0xFFFF ^ ones_complement_sum(packet[csum_start:])
    if checksum == 0 and csum_offset == 6:  # UDP: zero means "no checksum"
        checksum = 0xFFFF
    packet[at : at + 2] = _U16.pack(checksum)


def _sum16(data: bytes | bytearray | memoryview) -> int:
    """One's-complement sum of big-endian 16-bit words, modulo 0xFFFF (even-length input).

    2**16 = 1 (mod 0xFFFF), so the big integer of the bytes is congruent to the word sum.
    """
    return int.from_bytes(data, "big") % 0xFFFF


# The header fields that differ between the segments of one super-packet, as records whose
# bytes are scattered into the header columns listed in Segmenter (big-endian on the wire).
_FIELDS_V4 = np.dtype(
    [
        ("length", ">u2"),
        ("ident", ">u2"),
        ("ip_checksum", ">u2"),
        ("seq", ">u4"),
        ("flags", "u1"),
        ("tcp_checksum", ">u2"),
    ]
)
_FIELDS_V6 = np.dtype([("length", ">u2"), ("seq", ">u4"), ("flags", "u1"), ("tcp_checksum", ">u2")])


class Segmenter:
    """Cuts TCP super-packets into IP packets, into one reusable matrix (one row each).

    Checksums are computed modulo 0xFFFF: a row's native little-endian 32-bit word sum S
    gives the big-endian 16-bit sum as 256 * S (mod 0xFFFF), and per-row header fields add
    in as plain integers (a 32-bit sequence number counts as itself, since 2**16 = 1). The
    checksum is 0xFFFF - total % 0xFFFF, which may be 0xFFFF where the folded form is 0: both
    are the same one's-complement zero and verify alike.
    """

    def __init__(self, mtu: int) -> None:
        self.mtu = mtu
        self.width = (padded_length(mtu, mtu) + 15) & ~15
        self.storage = np.zeros(MAX_SEGMENTS * self.width + 64, dtype=np.uint8)
        self.flat = memoryview(self.storage.data)  # row i starts at i * width
        self._index = np.arange(MAX_SEGMENTS, dtype=np.uint64)
        self._tcp_lengths = np.zeros(MAX_SEGMENTS, dtype=np.uint64)
        self._fields_v4 = np.zeros(MAX_SEGMENTS, dtype=_FIELDS_V4)
        self._fields_v6 = np.zeros(MAX_SEGMENTS, dtype=_FIELDS_V6)
        # header columns of each record's bytes, in record order (csum_start 20 / 40)
        self._columns_v4 = np.array([2, 3, 4, 5, 10, 11, 24, 25, 26, 27, 33, 36, 37], np.intp)
        self._columns_v6 = np.array([4, 5, 44, 45, 46, 47, 53, 56, 57], np.intp)

    def segment(
        self, packet: memoryview, gso_type: int, gso_size: int, csum_start: int
    ) -> list[int]:
        """Segment `packet` (an IP packet, no vnet header) that carries a GSO TCP header.

        Fills rows of `flat` (row i = segment i, zero padded) and returns each row's plaintext
        length after WireGuard padding. The rows are reused by the next call.
        """
        kind = gso_type & ~VIRTIO_NET_HDR_GSO_ECN
        if kind not in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6):
            raise SegmentError("unsupported_gso")
        total = len(packet)
        if csum_start + 20 > total or gso_size <= 0:
            raise SegmentError("bad_gso_header")
        tcp_header = (packet[csum_start + 12] >> 4) * 4
        header = csum_start + tcp_header
        if tcp_header < 20 or header > total:
            raise SegmentError("bad_gso_header")
        v4 = kind == VIRTIO_NET_HDR_GSO_TCPV4
        if v4 and (packet[0] != 0x45 or csum_start != 20):
            raise SegmentError("bad_gso_header")  # IPv4 options: not supported
        if not v4 and (packet[0] >> 4 != 6 or csum_start != 40):
            raise SegmentError("bad_gso_header")  # IPv6 extension headers: not supported
        payload = total - header
        count = max(1, -(-payload // gso_size))
        if count > MAX_SEGMENTS or header + gso_size > self.mtu:
            raise SegmentError("too_many_segments")
        width = self.width
        rows = self.storage[: count * width].reshape(count, width)
        last = payload - (count - 1) * gso_size

        # rows: header template, payload slice, zero padding
        source = np.frombuffer(packet, dtype=np.uint8)
        rows[:, :header] = source[:header]
        if count > 1:
            rows[: count - 1, header : header + gso_size] = source[
                header : header + (count - 1) * gso_size
            ].reshape(count - 1, gso_size)
        rows[:, header + gso_size :] = 0
        rows[count - 1, header + last : header + gso_size] = 0
        rows[count - 1, header : header + last] = source[total - last :]

        # per-row numbers: every varying header field of a row is one record of `fields`,
        # scattered into the rows' header columns in one assignment at the end
        fields = self._fields_v4[:count] if v4 else self._fields_v6[:count]
        index = self._index[:count]
        tcp_lengths = self._tcp_lengths[:count]
        tcp_lengths.fill(tcp_header + gso_size)
        tcp_lengths[count - 1] = tcp_header + last
        seqs = index * gso_size + int.from_bytes(packet[csum_start + 4 : csum_start + 8], "big")
        seqs &= 0xFFFFFFFF
        fields["seq"] = seqs
        flags = packet[csum_start + 13]
        middle = flags & ~(TCP_FIN | TCP_PSH | TCP_CWR)
        first_flags = (flags & ~(TCP_FIN | TCP_PSH)) if count > 1 else flags
        last_flags = flags & ~TCP_CWR
        tcp_flags = fields["flags"]
        tcp_flags.fill(middle)
        tcp_flags[0] = first_flags
        if count > 1:
            tcp_flags[count - 1] = last_flags

        if v4:  # IPv4 header: length, id, checksum (template sum with those fields zeroed)
            ip_lengths = tcp_lengths + csum_start
            idents = (index + int.from_bytes(packet[4:6], "big")) & 0xFFFF
            fields["length"] = ip_lengths
            fields["ident"] = idents
            template = bytes(packet[:2]) + bytes(4) + bytes(packet[6:10]) + bytes(packet[12:20])
            fields["ip_checksum"] = 0xFFFF - (ip_lengths + idents + _sum16(template)) % 0xFFFF
            pseudo = _sum16(packet[12:20]) + IPPROTO_TCP
            columns = self._columns_v4
        else:
            fields["length"] = tcp_lengths
            pseudo = _sum16(packet[8:40]) + IPPROTO_TCP
            columns = self._columns_v6

        # TCP checksum: pseudo-header + header template (seq, checksum zero; middle flags)
        # + sequence + payload, per row
        tcp_template = bytearray(packet[csum_start:header])
        tcp_template[4:8] = bytes(4)
        tcp_template[13] = middle
        tcp_template[16:18] = bytes(2)
        totals = rows[:, header:].view("<u4").sum(axis=1, dtype=np.uint64)
        totals *= np.uint64(256)
        totals += tcp_lengths + seqs + (pseudo + _sum16(tcp_template))
        totals[0] += first_flags - middle
        if count > 1:
            totals[count - 1] += last_flags - middle
        fields["tcp_checksum"] = 0xFFFF - totals % 0xFFFF
        rows[:, columns] = fields.view(np.uint8).reshape(count, -1)

        mtu = self.mtu
        plain = [padded_length(header + gso_size, mtu)] * count
        plain[count - 1] = padded_length(header + last, mtu)
        return plain


class Coalescer:
    """Glues consecutive in-order segments of one TCP flow into one TUN write (userspace GRO).

    Feed decrypted IP packets with `add`; `take` returns the finished writes, each a vnet
    header plus packet. A packet that cannot be merged goes out alone with an all-zero vnet
    header (the kernel then checks its checksums itself).

    With `verify` set, a run's checksums are checked before it is written with NEEDS_CSUM
    (the kernel will not look again). One's-complement sums add, and a valid segment's sum over
    pseudo-header, TCP header and payload (checksum included) is 0 modulo 0xFFFF, so the run is
    valid when the total over all its segments is: one numpy sum over the merged payload plus a
    small integer per header. A run that fails is written segment by segment instead.
    """

    def __init__(self, verify: bool = True, max_size: int = 65535) -> None:
        self.verify = verify
        self.max_size = max_size
        self.writes: list[bytes | bytearray | memoryview] = []
        self.coalesced_segments = 0
        self.failed_verifications = 0
        self._run: list[memoryview] = []
        self._key = b""
        self._next_seq = 0
        self._gso_size = 0
        self._length = 0  # IP packet length of the run so far
        self._header = 0
        self._ip_header = 0
        self._closed = False  # PSH seen, or a short segment: nothing may follow

    def add(self, packet: memoryview) -> None:
        length = len(packet)
        first = packet[0] if length >= 40 else 0
        if first == 0x45:
            if (
                packet[9] != IPPROTO_TCP
                or packet[6] & 0x3F
                or packet[7]
                or (packet[2] << 8 | packet[3]) != length
            ):
                self._single(packet)
                return
            ip_header = 20
        elif first >> 4 == 6 and length >= 60:
            if packet[6] != IPPROTO_TCP or 40 + (packet[4] << 8 | packet[5]) != length:
                self._single(packet)
                return
            ip_header = 40
        else:
            self._single(packet)
            return
        tcp_header = (packet[ip_header + 12] >> 4) * 4
        header = ip_header + tcp_header
        flags = packet[ip_header + 13]
        payload = length - header
        if tcp_header < 20 or payload <= 0 or flags & ~TCP_PSH != TCP_ACK:
            self._single(packet)
            return
        seq = int.from_bytes(packet[ip_header + 4 : ip_header + 8], "big")
        # flow: TOS/TTL (traffic class/hop limit), addresses, ports, ack, data offset, options
        if ip_header == 20:
            key = b"".join(
                (packet[0:2], packet[8:9], packet[12:24], packet[28:33], packet[40:header])
            )
        else:
            key = b"".join(
                (packet[0:4], packet[7:8], packet[8:44], packet[48:53], packet[60:header])
            )
        run = self._run
        if (
            run
            and not self._closed
            and seq == self._next_seq
            and key == self._key
            and payload <= self._gso_size
            and self._length + payload <= self.max_size
        ):
            run.append(packet)
            self._length += payload
            self._next_seq = (seq + payload) & 0xFFFFFFFF
            if payload < self._gso_size or flags & TCP_PSH:
                self._closed = True
            return
        self.flush()
        run.append(packet)
        self._key = key
        self._gso_size = payload
        self._next_seq = (seq + payload) & 0xFFFFFFFF
        self._length = length
        self._header = header
        self._ip_header = ip_header
        self._closed = bool(flags & TCP_PSH)

    def _single(self, packet: memoryview) -> None:
        self.flush()
        self.writes.append(_PLAIN_VNET + packet)

    def flush(self) -> None:
        run = self._run
        if not run:
            return
        if len(run) == 1:
            self.writes.append(_PLAIN_VNET + run[0])
            run.clear()
            return
        header, ip_header, total = self._header, self._ip_header, self._length
        out = bytearray(VNET_HDR_SIZE + total)
        first = run[0]
        out[VNET_HDR_SIZE : VNET_HDR_SIZE + header] = first[:header]
        at = VNET_HDR_SIZE + header
        for packet in run:
            chunk = packet[header:]
            out[at : at + len(chunk)] = chunk
            at += len(chunk)
        if self.verify and not self._run_checksums_valid(out):
            self.failed_verifications += 1
            self.writes.extend(_PLAIN_VNET + packet for packet in run)
            run.clear()
            return
        view = memoryview(out)[VNET_HDR_SIZE:]
        view[ip_header + 13] = run[-1][ip_header + 13]  # PSH of the last segment, if any
        tcp_length = total - ip_header
        if ip_header == 20:
            view[2:4] = _U16.pack(total)
            view[10:12] = b"\x00\x00"
            view[10:12] = _U16.pack(0xFFFF ^ ones_complement_sum(view[:20]))
            pseudo = pseudo_header_sum(view[12:16], view[16:20], IPPROTO_TCP, tcp_length)
            gso_type = VIRTIO_NET_HDR_GSO_TCPV4
        else:
            view[4:6] = _U16.pack(tcp_length)
            pseudo = pseudo_header_sum(view[8:24], view[24:40], IPPROTO_TCP, tcp_length)
            gso_type = VIRTIO_NET_HDR_GSO_TCPV6
        view[ip_header + 16 : ip_header + 18] = _U16.pack(pseudo)
        VNET_HDR.pack_into(
            out, 0, VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, header, self._gso_size, ip_header, 16
        )
        self.coalesced_segments += len(run)
        self.writes.append(out)
        run.clear()

    def _run_checksums_valid(self, merged: bytearray) -> bool:
        ip_header, header = self._ip_header, self._header
        run = self._run
        if self._gso_size & 1:  # odd segments break 16-bit alignment of the merged payload
            return all(_segment_valid(p, ip_header) for p in run)
        first = run[0]
        addresses = first[12:20] if ip_header == 20 else first[8:40]
        tcp_header = header - ip_header
        total = len(run) * (int.from_bytes(addresses, "big") + IPPROTO_TCP)
        for packet in run:
            total += len(packet) - ip_header + int.from_bytes(packet[ip_header:header], "big")
        total = total % 0xFFFF + ones_complement_sum(
            memoryview(merged)[VNET_HDR_SIZE + ip_header + tcp_header :]
        )
        return total % 0xFFFF == 0

    def take(self) -> list[bytes | bytearray | memoryview]:
        self.flush()
        out, self.writes = self.writes, []
        return out


_PLAIN_VNET = bytes(VNET_HDR_SIZE)  # GSO none, checksum complete


# IPv4+TCP header columns that must be equal in every segment of one run: version/IHL, TOS,
# fragment field, TTL, protocol, addresses, ports, acknowledgement, data offset.
_RUN_COLUMNS_V4 = np.array([0, 1, 6, 7, 8, 9, *range(12, 24), *range(28, 33)], dtype=np.intp)
_RUN_COLUMNS_V4.setflags(write=False)


@functools.lru_cache(maxsize=16)
def _run_masks(header: int) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Header columns (IPv4 + TCP of `header` bytes) free to differ from the first row's in
    a mergeable run: for the rows before the last, and for the last."""
    free_last = np.ones(header, dtype=np.bool_)
    free_last[_RUN_COLUMNS_V4] = False
    free_last[40:header] = False  # TCP options
    free_body = free_last.copy()
    free_body[[2, 3, 33]] = False  # full length; flags (a bare ACK, checked on the first row)
    free_body.setflags(write=False)
    free_last.setflags(write=False)
    return free_body, free_last


def coalesce_rows(
    rows: Matrix, last_plain: int, verify: bool, out: bytearray | None = None
) -> bytearray | memoryview | None:
    """Merge a GRO batch of decrypted IPv4/TCP segments in one step, or None if they are not one
    in-order run (the caller then feeds them to a `Coalescer` one by one).

    `rows` holds one plaintext per row, every row but the last exactly `rows.shape[1]` bytes
    long (the datagrams of one UDP GRO read are equal-sized), the last `last_plain` bytes.
    The checks are those of `Coalescer.add`, done as column operations. The checksum check
    sums whole rows, WireGuard's zero padding included: padding that is not zero can only make
    the check fail, and a failed check just means the per-packet path (where the kernel checks
    every segment) takes the batch. With `out` (at least 65545 bytes) the result is written
    there and a view of it returned, so nothing is allocated per batch.
    """
    count, stride = rows.shape
    first = rows[0]
    if count < 2 or first[0] != 0x45 or first[9] != IPPROTO_TCP or first[6] & 0x3F or first[7]:
        return None
    header = 20 + (int(first[32]) >> 4) * 4
    if header < 40 or header >= stride or stride & 1:
        return None
    full = int(first[2]) << 8 | int(first[3])
    last = rows[count - 1]
    final = int(last[2]) << 8 | int(last[3])
    gso_size, last_payload = full - header, final - header
    if full > stride or final > last_plain or not 0 < last_payload <= gso_size:
        return None
    # header bytes every row shares with the first (rows but the last also share the total
    # length and the flags, which must be a bare ACK there); the last may add PSH
    free_body, free_last = _run_masks(header)
    heads = rows[:, :header]
    if not (
        ((heads[:-1] == first[:header]) | free_body).all()
        and ((heads[count - 1] == first[:header]) | free_last).all()
    ):
        return None
    if int(first[33]) != TCP_ACK or int(last[33]) | TCP_PSH != TCP_ACK | TCP_PSH:
        return None
    seqs = np.ascontiguousarray(rows[:, 24:28]).view(">u4").ravel().astype(np.uint32)
    if not (seqs[1:] - seqs[:-1] == gso_size).all():  # uint32 differences wrap like TCP's
        return None
    address_sum = _sum16(first[12:20].tobytes())
    pseudo = address_sum + IPPROTO_TCP
    if verify:
        # 32-bit words when rows allow (they do: padded plaintexts are multiples of 16); a
        # little-endian u4 sum is congruent to the u2 sum modulo 0xFFFF, at half the cost
        words = rows[:, 20:].view("<u4") if (stride - 20) % 4 == 0 else rows[:, 20:].view("<u2")
        native = int(words.sum(dtype=np.uint64))
        total = 256 * native + count * pseudo + (count - 1) * (full - 20) + final - 20
        if total % 0xFFFF:
            return None
    total_length = header + (count - 1) * gso_size + last_payload
    if total_length > 65535:
        return None
    size = VNET_HDR_SIZE + total_length
    if out is None:
        out = bytearray(size)
    target = np.frombuffer(out, dtype=np.uint8, count=size)
    target[VNET_HDR_SIZE : VNET_HDR_SIZE + header] = first[:header]
    body = VNET_HDR_SIZE + header
    middle = (count - 1) * gso_size
    target[body : body + middle].reshape(count - 1, gso_size)[:] = rows[:-1, header:full]
    target[body + middle :] = last[header:final]
    view = memoryview(out)[VNET_HDR_SIZE:size]
    view[33] = int(last[33])
    view[2:4] = _U16.pack(total_length)
    view[10:12] = b"\x00\x00"
    view[10:12] = _U16.pack(0xFFFF - _sum16(view[:20]))
    view[36:38] = _U16.pack(_fold(pseudo + total_length - 20) or 0xFFFF)
    VNET_HDR.pack_into(
        out, 0, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, header, gso_size, 20, 16
    )
    return out if len(out) == size else memoryview(out)[:size]


def _segment_valid(packet: memoryview, ip_header: int) -> bool:
    if ip_header == 20:
        pseudo = pseudo_header_sum(
            packet[12:16], packet[16:20], IPPROTO_TCP, len(packet) - ip_header
        )
    else:
        pseudo = pseudo_header_sum(
            packet[8:24], packet[24:40], IPPROTO_TCP, len(packet) - ip_header
        )
    return _fold(pseudo + ones_complement_sum(packet[ip_header:])) == 0xFFFF


__all__ = [
    "VIRTIO_NET_HDR_GSO_NONE",
    "Coalescer",
    "SegmentError",
    "Segmenter",
    "complete_checksum",
    "ones_complement_sum",
    "pseudo_header_sum",
]
