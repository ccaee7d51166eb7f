"""Userspace TSO/GRO against an independent pure-Python checksum (no numpy in the oracle)."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.tun import VNET_HDR, VNET_HDR_SIZE
from tunnel.wireguard.segment import (
    Coalescer,
    Segmenter,
    SegmentError,
    coalesce_rows,
    complete_checksum,
    ones_complement_sum,
)

SRC4, DST4 = bytes([198, 19, 1, 2]), bytes([198, 19, 2, 2])
SRC6 = bytes.fromhex("fd000000000000000000000000000002")
DST6 = bytes.fromhex("fd000000000000000000000000000003")


def oracle_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp_packet(
    payload: bytes,
    *,
    seq: int = 1000,
    flags: int = 0x10,
    v6: bool = False,
    options: bytes = b"",
    ident: int = 7,
    partial: bool = False,
) -> bytes:
    """A TCP/IP packet; with `partial` its TCP checksum holds the pseudo-header sum (as TSO)."""
    tcp_len = 20 + len(options) + len(payload)
    offset = (20 + len(options)) // 4
    tcp = struct.pack(">HHIIBBHHH", 40000, 5201, seq, 555, offset << 4, flags, 502, 0, 0)
    tcp += options + payload
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    if v6:
        pseudo = src + dst + struct.pack(">IxxxB", tcp_len, 6)
    else:
        pseudo = src + dst + struct.pack(">HH", 6, tcp_len)
    check = oracle_sum(pseudo) if partial else 0xFFFF ^ oracle_sum(pseudo + tcp)
    tcp = tcp[:16] + struct.pack(">H", check) + tcp[18:]
    if v6:
        ip = struct.pack(">IHBB", 0x60000000, tcp_len, 6, 64) + src + dst
    else:
        ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, ident, 0x4000, 64, 6, 0, src, dst)
        ip = ip[:10] + struct.pack(">H", 0xFFFF ^ oracle_sum(ip)) + ip[12:]
    return ip + tcp


def valid(packet: bytes) -> bool:
    if packet[0] >> 4 == 4:
        if oracle_sum(packet[:20]) != 0xFFFF:
            return False
        tcp = packet[20:]
        pseudo = packet[12:20] + struct.pack(">HH", 6, len(tcp))
    else:
        tcp = packet[40:]
        pseudo = packet[8:40] + struct.pack(">IxxxB", len(tcp), 6)
    return oracle_sum(pseudo + tcp) == 0xFFFF


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("size", [1, 1347, 1348, 1349, 5000, 60_000])
def test_segments_are_valid_and_carry_the_payload(v6: bool, size: int) -> None:
    payload = os.urandom(size)
    options = bytes([1, 1, 8, 10]) + bytes(8)  # NOP NOP timestamp: a 32-byte TCP header
    ip_header = 40 if v6 else 20
    mss = 1420 - ip_header - 32
    super_packet = tcp_packet(payload, flags=0x18 | 0x80, v6=v6, options=options, partial=True)
    segmenter = Segmenter(mtu=1420)
    lengths = segmenter.segment(memoryview(super_packet), 4 if v6 else 1, mss, ip_header)
    header = ip_header + 32
    got = b""
    for i, plain in enumerate(lengths):
        ip_len = header + min(mss, size - i * mss)
        packet = bytes(segmenter.flat[i * segmenter.width : i * segmenter.width + plain])
        assert plain >= ip_len and not any(packet[ip_len:])  # zero padding only
        packet = packet[:ip_len]
        assert valid(packet), f"segment {i} has a bad checksum"
        flags = packet[ip_header + 13]
        first, last = i == 0, i == len(lengths) - 1
        assert bool(flags & 0x80) == first and bool(flags & 0x08) == last
        assert int.from_bytes(packet[ip_header + 4 : ip_header + 8], "big") == 1000 + i * mss
        if not v6:
            assert int.from_bytes(packet[4:6], "big") == 7 + i
        got += packet[header:]
    assert got == payload


def test_segmenter_refuses_what_it_cannot_cut() -> None:
    segmenter = Segmenter(mtu=1420)
    packet = tcp_packet(os.urandom(3000), partial=True)
    with pytest.raises(SegmentError):
        segmenter.segment(memoryview(packet), 5, 1000, 20)  # UDP L4 GSO is not requested
    with pytest.raises(SegmentError):
        segmenter.segment(memoryview(packet), 1, 1000, 22)  # csum_start not the TCP header
    with pytest.raises(SegmentError):
        segmenter.segment(memoryview(packet[:30]), 1, 1000, 20)
    with pytest.raises(SegmentError):
        segmenter.segment(memoryview(packet), 1, 1, 20)  # more than 64 segments


def test_complete_checksum_of_a_partial_packet() -> None:
    packet = bytearray(tcp_packet(os.urandom(999), partial=True))
    assert not valid(bytes(packet))
    complete_checksum(packet, 20, 16)
    assert valid(bytes(packet))


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=0, max_size=3000))
def test_ones_complement_sum_matches_the_oracle(data: bytes) -> None:
    ours, theirs = ones_complement_sum(data), oracle_sum(data)
    assert ours == theirs or {ours, theirs} <= {0, 0xFFFF}


def test_coalescer_rebuilds_one_super_packet() -> None:
    mss, payload = 1368, os.urandom(1368 * 30 + 100)
    segments = [
        tcp_packet(
            payload[i : i + mss], seq=1000 + i, flags=0x18 if i + mss >= len(payload) else 0x10
        )
        for i in range(0, len(payload), mss)
    ]
    coalescer = Coalescer()
    for segment in segments:
        coalescer.add(memoryview(segment))
    (write,) = coalescer.take()
    assert VNET_HDR.unpack_from(write) == (1, 1, 40, mss, 20, 16)
    packet = bytes(write[VNET_HDR_SIZE:])
    assert packet[40:] == payload
    assert oracle_sum(packet[:20]) == 0xFFFF  # the IPv4 header checksum is complete
    assert packet[33] == 0x18  # PSH of the last segment
    # the TCP checksum field holds the folded pseudo-header sum over the whole TCP length
    pseudo = packet[12:20] + struct.pack(">HH", 6, len(packet) - 20)
    assert int.from_bytes(packet[36:38], "big") == oracle_sum(pseudo)
    assert coalescer.coalesced_segments == len(segments)


def test_coalescer_splits_flows_gaps_and_bad_checksums() -> None:
    run = [tcp_packet(os.urandom(100), seq=1000 + 100 * i) for i in range(3)]
    gap = tcp_packet(os.urandom(100), seq=5000)
    corrupted = bytearray(tcp_packet(os.urandom(100), seq=5100))
    corrupted[-1] ^= 0xFF
    odd = bytes([0x45]) + bytes(39)
    coalescer = Coalescer()
    for packet in [*run, gap, corrupted, odd]:
        coalescer.add(memoryview(bytes(packet)))
    writes = coalescer.take()
    # run merged; gap + corrupted fail verification and go out alone; the odd one alone
    assert len(writes) == 1 + 2 + 1
    assert coalescer.failed_verifications == 1
    assert all(bytes(w[:VNET_HDR_SIZE]) == bytes(VNET_HDR_SIZE) for w in writes[1:])


def test_segment_then_coalesce_round_trip() -> None:
    payload = os.urandom(40_000)
    super_packet = tcp_packet(payload, flags=0x18, partial=True)
    segmenter = Segmenter(mtu=1420)
    lengths = segmenter.segment(memoryview(super_packet), 1, 1380, 20)
    coalescer = Coalescer()
    for i, plain in enumerate(lengths):
        segment = bytes(segmenter.flat[i * segmenter.width : i * segmenter.width + plain])
        coalescer.add(memoryview(segment[: int.from_bytes(segment[2:4], "big")]))
    (write,) = coalescer.take()
    assert bytes(write[VNET_HDR_SIZE + 40 :]) == payload


def test_coalesce_rows_merges_a_gro_batch_and_refuses_a_broken_one() -> None:
    mss = 1368
    payload = os.urandom(mss * 20 + 77)
    segments = [
        tcp_packet(payload[i : i + mss], seq=7 + i, flags=0x18 if i + mss >= len(payload) else 0x10)
        for i in range(0, len(payload), mss)
    ]
    stride = 1408  # plaintext of a full datagram: 20 + 20 + 1368, no padding
    rows = np.zeros((len(segments), stride), dtype=np.uint8)
    for i, segment in enumerate(segments):
        rows[i, : len(segment)] = np.frombuffer(segment, dtype=np.uint8)
    last_plain = (len(segments[-1]) + 15) & ~15
    merged = coalesce_rows(rows, last_plain, verify=True)
    assert merged is not None
    assert VNET_HDR.unpack_from(merged) == (1, 1, 40, mss, 20, 16)
    assert bytes(merged[VNET_HDR_SIZE + 40 :]) == payload
    assert oracle_sum(bytes(merged[VNET_HDR_SIZE : VNET_HDR_SIZE + 20])) == 0xFFFF
    # a corrupted byte fails verification; a gap in sequence numbers is not one run
    broken = rows.copy()
    broken[3, 500] ^= 0x55
    assert coalesce_rows(broken, last_plain, verify=True) is None
    assert coalesce_rows(broken, last_plain, verify=False) is not None
    gap = rows.copy()
    gap[5, 24:28] = np.frombuffer((99).to_bytes(4, "big"), dtype=np.uint8)
    assert coalesce_rows(gap, last_plain, verify=False) is None


def test_coalesce_rows_refuses_header_differences_a_merge_would_hide() -> None:
    mss = 1000
    payload = os.urandom(mss * 6 + 10)
    segments = [
        tcp_packet(payload[i : i + mss], seq=7 + i, flags=0x18 if i + mss >= len(payload) else 0x10)
        for i in range(0, len(payload), mss)
    ]
    stride = 1040
    rows = np.zeros((len(segments), stride), dtype=np.uint8)
    for i, segment in enumerate(segments):
        rows[i, : len(segment)] = np.frombuffer(segment, dtype=np.uint8)
    last_plain = (len(segments[-1]) + 15) & ~15
    assert coalesce_rows(rows, last_plain, verify=False) is not None
    # (row, column, value): PSH or FIN in a middle row, a short middle row, another TTL,
    # another port, another ACK number, a first row that is not a bare ACK
    for row, column, value in [
        (2, 33, 0x18),
        (3, 33, 0x11),
        (2, 3, 0x00),
        (4, 8, 1),
        (1, 21, 9),
        (5, 29, 1),
        (0, 33, 0x18),
    ]:
        changed = rows.copy()
        changed[row, column] = value
        assert coalesce_rows(changed, last_plain, verify=False) is None, (row, column)
    # the last row may differ in length and carry PSH (it does here), not FIN
    fin = rows.copy()
    fin[-1, 33] = 0x11
    assert coalesce_rows(fin, last_plain, verify=False) is None
