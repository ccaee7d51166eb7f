"""The NFLOG decoder and request builder: packets decode to what was logged, and any bytes
(random, truncated, flipped) are counted and dropped, never raised."""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address

from hypothesis import given
from hypothesis import strategies as st

from tests.policy.nflog_messages import attribute, ipv4_tcp, packet_message
from weavepy.policy.nflog import (
    MSG_CONFIG,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NflogDecoder,
    bind_requests,
    parse_acks,
)

addresses = st.integers(0, 2**32 - 1).map(lambda n: str(IPv4Address(n)))
ports = st.integers(0, 65535)
prefixes = st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=60)


def test_a_logged_tcp_syn_decodes() -> None:
    message = packet_message(ipv4_tcp("198.19.0.2", "198.19.0.3", 41000, 80),
                             "weavepy-policy drop ingress-0123456789 ", physindev=7)
    decoder = NflogDecoder()
    [packet] = decoder.feed(message)
    assert packet.prefix == "weavepy-policy drop ingress-0123456789 "
    assert (packet.group, packet.family, packet.hook) == (6784, socket.AF_INET, 2)
    assert (packet.indev, packet.outdev, packet.physindev) == (3, 4, 7)
    assert packet.src == IPv4Address("198.19.0.2") and packet.dst == IPv4Address("198.19.0.3")
    assert (packet.protocol_name, packet.sport, packet.dport) == ("TCP", 41000, 80)
    assert packet.is_new_tcp and packet.timestamp == 1700000000.25
    assert not decoder.counts


@given(addresses, addresses, ports, ports, st.sampled_from([6, 17, 1]), prefixes,
       st.integers(0, 255), st.integers(1, 4))
def test_packets_round_trip(src: str, dst: str, sport: int, dport: int, protocol: int,
                            prefix: str, flags: int, copies: int) -> None:
    message = packet_message(ipv4_tcp(src, dst, sport, dport, flags, protocol), prefix)
    decoder = NflogDecoder()
    packets = decoder.feed(message * copies)  # several messages in one datagram
    assert len(packets) == copies and not decoder.counts
    for packet in packets:
        assert (str(packet.src), str(packet.dst), packet.protocol) == (src, dst, protocol)
        assert packet.prefix == prefix
        if protocol == 1:
            assert packet.sport is None and packet.dport is None
        else:
            assert (packet.sport, packet.dport) == (sport, dport)
        assert packet.tcp_flags == (flags if protocol == 6 else None)


@given(st.binary(max_size=300))
def test_any_bytes_are_counted_never_raised(data: bytes) -> None:
    decoder = NflogDecoder()
    packets = decoder.feed(data)
    assert len(packets) + sum(decoder.counts.values()) >= (1 if len(data) >= 16 else 0)


@given(st.data())
def test_damaged_messages_are_counted_never_raised(data: st.DataObject) -> None:
    message = bytearray(packet_message(ipv4_tcp("198.19.0.2", "198.19.0.3", 1, 80), "p x y"))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(message) - 1))
        message[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(message)))
    decoder = NflogDecoder()
    packets = decoder.feed(bytes(message[:cut]))
    assert len(packets) <= 1
    if not packets:
        assert cut < 16 or sum(decoder.counts.values()) >= 1


def test_malformed_pieces_are_counted() -> None:
    good = packet_message(ipv4_tcp("198.19.0.2", "198.19.0.3", 1, 80))
    decoder = NflogDecoder()
    assert decoder.feed(good[:-3]) == []  # truncated: the length says more
    not_ipv4 = packet_message(b"\x60" + bytes(39))
    assert decoder.feed(not_ipv4) == []
    bad_ifindex = (struct.pack("=IHHII", 16 + 4 + 8, 4 << 8, 0, 0, 0)
                   + struct.pack("!BBH", 2, 0, 1) + attribute(4, b"\1\2"))
    assert decoder.feed(bad_ifindex) == []
    assert len(decoder.feed(good)) == 1
    assert decoder.counts["malformed"] == 3


def test_bind_requests_are_acked_config_messages() -> None:
    requests = bind_requests(86, seq=10, copy_range=80, queue_threshold=1, timeout_cs=0)
    assert len(requests) == 3
    for seq, request in enumerate(requests, start=10):
        length, kind, flags, number, _pid = struct.unpack_from("=IHHII", request)
        assert (length, kind, number) == (len(request), MSG_CONFIG, seq)
        assert flags == NLM_F_REQUEST | NLM_F_ACK
    family, _version, group = struct.unpack_from("!BBH", requests[1], 16)
    assert (family, group) == (socket.AF_UNSPEC, 86)
    assert requests[1][20:25] == struct.pack("=HH", 5, 1) + b"\x01"  # CMD BIND
    mode = requests[2][20:32]
    assert mode == struct.pack("=HH", 10, 2) + struct.pack("!IBB", 80, 2, 0) + b"\0\0"


def test_acks_are_read_by_sequence_number() -> None:
    ack = struct.pack("=IHHII", 36, 2, 0, 7, 0) + struct.pack("=i", 0) + bytes(16)
    error = struct.pack("=IHHII", 36, 2, 0, 8, 0) + struct.pack("=i", -16) + bytes(16)
    assert parse_acks(ack + error) == {7: 0, 8: 16}
    assert parse_acks(b"\xff" * 7) == {}
