"""The data-plane engines with their control planes, wired back to back in one process.

Real engines, real control planes (core.Device in external mode), real crypto; the network is
a function that hands each Send to the other side as one UDP GRO read would arrive, and the TUN
is the list of reads we feed in and writes we collect.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.tunnel.test_wireguard_segment import tcp_packet, valid
from tunnel.tun import VNET_HDR, VNET_HDR_SIZE
from tunnel.wireguard.core import Device, DeviceConfig, PeerConfig
from tunnel.wireguard.keys import PrivateKey
from tunnel.wireguard.plane import (
    DataReceived,
    DataSent,
    HandshakeNeeded,
    PlaneConfig,
    Send,
    SetKeypairs,
    SetPeer,
    commands_for_event,
)
from tunnel.wireguard.receive import RxEngine
from tunnel.wireguard.send import TxEngine

A_ADDR = ("198.18.0.11", 51820)
B_ADDR = ("198.18.0.12", 51820)


@dataclass
class Node:
    core: Device
    tx: TxEngine
    rx: RxEngine
    addr: tuple[str, int]
    tun_writes: list[bytes] = field(default_factory=list)
    wire_out: list[tuple[bytes, int]] = field(default_factory=list)


def make_node(key: PrivateKey, addr: tuple[str, int]) -> Node:
    core = Device(DeviceConfig(key, external_data_plane=True, random_seed=len(addr[0])))
    plane = PlaneConfig()
    return Node(core, TxEngine(plane), RxEngine(plane), addr)


class Net:
    def __init__(self, extension: bool = False) -> None:
        ka, kb = PrivateKey.generate(), PrivateKey.generate()
        self.a, self.b = make_node(ka, A_ADDR), make_node(kb, B_ADDR)
        self.now = 0.0
        self.add(self.a, kb, ("198.19.2.0/24",), B_ADDR, extension)
        self.add(self.b, ka, ("198.19.1.0/24",), A_ADDR, extension)

    def add(
        self,
        node: Node,
        key: PrivateKey,
        ips: tuple[str, ...],
        endpoint: tuple[str, int],
        extension: bool,
    ) -> None:
        config = PeerConfig(key.public_key, ips, endpoint, extension_ok=extension)
        node.core.add_peer(config)
        command = SetPeer(key.public_key.raw, ips, endpoint, extension)
        node.rx.apply(command, self.now)
        node.tx.apply(command, self.now)

    def other(self, node: Node) -> Node:
        return self.b if node is self.a else self.a

    def deliver(self, node: Node, sends: list[Send]) -> None:
        peer = self.other(node)
        for send in sends:
            data = send.payload()
            node.wire_out.append((data, send.segment_size))
            batch = memoryview(bytearray(data))
            writes = peer.rx.process(batch, send.segment_size, node.addr, self.now)
            peer.tun_writes += [bytes(w) for w in writes]

    def settle(self) -> None:
        for _ in range(20):
            moved = False
            for node in (self.a, self.b):
                for data, _ in node.core.datagrams_to_send():
                    moved = True
                    self.other(node).core.receive_datagram(data, node.addr, self.now)
                for event in node.core.events():
                    for command in commands_for_event(event):
                        node.rx.apply(command, self.now)
                        self.deliver(node, node.tx.apply(command, self.now))
                        moved = True
                for data, source in node.rx.handshake_messages:
                    node.core.receive_datagram(data, source, self.now)
                    moved = True
                node.rx.handshake_messages.clear()
                for report in node.tx.reports() + node.rx.reports():
                    moved = True
                    key = report.peer
                    peer_key = next(
                        p.public_key for p in node.core.peers if p.public_key.raw == key
                    )
                    if isinstance(report, DataSent):
                        node.core.note_data_sent(
                            peer_key, report.send_counter, report.carried_data, self.now
                        )
                    elif isinstance(report, DataReceived):
                        node.core.note_transport_received(
                            peer_key,
                            report.local_index,
                            report.endpoint,
                            report.carried_data,
                            self.now,
                        )
                    elif isinstance(report, HandshakeNeeded):
                        node.core.request_handshake(peer_key, self.now)
            if not moved:
                return

    def send(self, node: Node, read: bytes) -> None:
        self.deliver(node, node.tx.process(memoryview(bytearray(read)), self.now))
        self.settle()


def vnet(gso_type: int = 0, gso_size: int = 0, csum: bool = False, hdr_len: int = 0) -> bytes:
    return VNET_HDR.pack(
        1 if csum else 0, gso_type, hdr_len, gso_size, 20 if csum else 0, 16 if csum else 0
    )


def super_read(payload: bytes, mss: int = 1368) -> bytes:
    packet = tcp_packet(payload, flags=0x18, partial=True)
    packet = packet[:12] + bytes([198, 19, 1, 2, 198, 19, 2, 2]) + packet[20:]
    # the packet keeps its partial checksum: src/dst in tcp_packet are the same addresses
    return vnet(1, mss, csum=True, hdr_len=len(packet)) + packet


def test_standard_transport_segments_and_coalesces_a_super_packet() -> None:
    net = Net()
    payload = os.urandom(1368 * 40)
    net.send(net.a, super_read(payload))  # staged: no keypair yet -> handshake -> flushed
    assert len(net.b.tun_writes) == 1
    write = net.b.tun_writes[0]
    flags, gso_type, hdr_len, gso_size, _, _ = VNET_HDR.unpack_from(write)
    assert (flags, gso_type, hdr_len, gso_size) == (1, 1, 40, 1368)
    assert write[VNET_HDR_SIZE + 40 :] == payload
    # on the wire: standard type-4 messages, one GSO send of 40 equal datagrams
    # (20 B IP + 20 B TCP + 1368 B = 1408 B, a multiple of 16: no padding)
    data, segment = next((d, s) for d, s in net.a.wire_out if s)
    assert segment == 16 + 1408 + 16 and len(data) == 40 * segment
    assert all(data[i] == 4 for i in range(0, len(data), segment))
    assert not net.a.rx.counters and not net.b.rx.counters
    assert not net.a.tx.counters and not net.b.tx.counters
    # the reply direction works too, and small packets pass with their checksum completed
    small = tcp_packet(b"ack", seq=9, partial=True)
    small = small[:12] + bytes([198, 19, 2, 2, 198, 19, 1, 2]) + small[20:]
    net.send(net.b, vnet(csum=True) + small)
    (reply,) = net.a.tun_writes
    assert reply[:VNET_HDR_SIZE] == bytes(VNET_HDR_SIZE) and valid(reply[VNET_HDR_SIZE:])


def test_extension_carries_the_super_packet_whole() -> None:
    net = Net(extension=True)
    read = super_read(os.urandom(60_000))
    net.send(net.a, read)
    assert net.b.tun_writes == [read]
    data, segment = next((d, s) for d, s in net.a.wire_out if s)
    assert data[0] == 0x77 and segment == 1472
    assert net.b.rx.stats["extension_messages_received"] == 1
    # a small packet (an ACK) is one fragment, opened where it lies
    ack = tcp_packet(b"", seq=5, partial=True)
    ack = ack[:12] + bytes([198, 19, 2, 2, 198, 19, 1, 2]) + ack[20:]
    net.send(net.b, vnet(csum=True) + ack)
    assert net.a.tun_writes == [vnet(csum=True) + ack]
    # a replayed extension message is refused
    net.b.tun_writes.clear()
    net.b.rx.process(memoryview(data), segment, A_ADDR, net.now)
    assert net.b.rx.counters["replay"] == 1 and not net.b.tun_writes


def test_extension_fragments_reassemble_when_split_across_reads() -> None:
    net = Net(extension=True)
    net.send(net.a, super_read(os.urandom(100)))  # handshake first
    net.b.tun_writes.clear()
    read = super_read(os.urandom(20_000))
    (send,) = net.a.tx.process(memoryview(bytearray(read)), net.now)
    data, size = send.payload(), send.segment_size
    pieces = [data[i : i + size] for i in range(0, len(data), size)]
    for piece in reversed(pieces):  # out of order, one datagram per read
        for write in net.b.rx.process(memoryview(piece), 0, A_ADDR, net.now):
            net.b.tun_writes.append(bytes(write))
    assert net.b.tun_writes == [read]


def test_engines_talk_to_a_plain_core_peer() -> None:
    """Our engines (node A) against the in-process standard path of core.Device (a stock peer)."""
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    a = make_node(ka, A_ADDR)
    stock = Device(DeviceConfig(kb))
    stock.add_peer(PeerConfig(ka.public_key, ("198.19.1.0/24",), A_ADDR))
    a.core.add_peer(PeerConfig(kb.public_key, ("198.19.2.0/24",), B_ADDR))
    command = SetPeer(kb.public_key.raw, ("198.19.2.0/24",), B_ADDR, False)
    a.rx.apply(command, 0.0)
    a.tx.apply(command, 0.0)
    payload = os.urandom(1368 * 5)
    a.tx.process(memoryview(bytearray(super_read(payload))), 0.0)  # staged
    received: list[bytes] = []
    for _ in range(10):
        for report in a.tx.reports():
            if isinstance(report, HandshakeNeeded):
                a.core.request_handshake(kb.public_key, 0.0)
            elif isinstance(report, DataSent):
                a.core.note_data_sent(kb.public_key, report.send_counter, True, 0.0)
        for data, _ in a.core.datagrams_to_send():
            stock.receive_datagram(data, A_ADDR, 0.0)
        for event in a.core.events():
            for c in commands_for_event(event):
                a.rx.apply(c, 0.0)
                for send in a.tx.apply(c, 0.0):
                    raw = send.payload()
                    size = send.segment_size or len(raw)
                    for i in range(0, len(raw), size):
                        stock.receive_datagram(raw[i : i + size], A_ADDR, 0.0)
        for data, _ in stock.datagrams_to_send():
            a.rx.process(memoryview(data), 0, B_ADDR, 0.0)
            for message, source in a.rx.handshake_messages:
                a.core.receive_datagram(message, source, 0.0)
            a.rx.handshake_messages.clear()
        received += stock.tun_writes()
    assert b"".join(p[40:] for p in received) == payload
    assert all(valid(p) for p in received)
    assert not stock.counters


def test_rx_counts_forged_truncated_and_foreign_source() -> None:
    net = Net()
    net.send(net.a, super_read(os.urandom(2000)))
    data, segment = next((d, s) for d, s in net.a.wire_out if s)
    first = bytearray(data[: segment or len(data)])
    rx = net.b.rx
    rx.process(memoryview(bytes(first[:20])), 0, A_ADDR, net.now)
    first[8:16] = struct.pack("<Q", 1 << 40)
    rx.process(memoryview(bytes(first)), 0, A_ADDR, net.now)
    rx.process(memoryview(b"\x05\x00\x00\x00" + bytes(60)), 0, A_ADDR, net.now)
    assert rx.counters["truncated"] == 1
    assert rx.counters["decrypt_failed"] == 1
    assert rx.counters["bad_type"] == 1
    # a packet whose source is outside A's allowed IPs
    foreign = tcp_packet(b"x" * 10, partial=True)
    foreign = foreign[:12] + bytes([198, 19, 9, 9, 198, 19, 2, 2]) + foreign[20:]
    net.send(net.a, vnet(csum=True) + foreign)
    assert rx.counters["bad_inner_source"] == 1


def test_messages_for_a_keypair_not_yet_installed_are_held_briefly() -> None:
    """In a worker the peer's first message can overtake the command carrying the keypair."""
    net = Net()
    net.send(net.a, super_read(os.urandom(500)))
    data = next(d for d, s in net.a.wire_out if s == 0 and d[0] == 4 and len(d) > 32)
    fresh = RxEngine(PlaneConfig())
    fresh.apply(SetPeer(net.a.core.public_key.raw, ("198.19.1.0/24",), A_ADDR, False), 0.0)
    assert fresh.process(memoryview(bytearray(data)), 0, A_ADDR, 0.0) == []
    assert not fresh.counters  # held, not dropped yet
    peer = next(iter(net.b.core.peers))
    slots = peer.keypairs
    snapshots = [k.snapshot() if k else None for k in (slots.current, slots.previous, slots.next)]
    fresh.apply(SetKeypairs(net.a.core.public_key.raw, *snapshots), 0.01)
    assert len(fresh.retry_held(0.01)) == 1
    # an index that never becomes known is counted once the hold time is over
    bogus = bytearray(data)
    bogus[4:8] = b"\xff\xff\xff\xff"
    fresh.process(memoryview(bogus), 0, A_ADDR, 1.0)
    fresh.expire_held(2.0)
    assert fresh.counters["unknown_index"] == 1


def test_a_forged_gro_batch_is_refused_whole_and_reports_nothing() -> None:
    net = Net()
    net.send(net.a, super_read(os.urandom(1368 * 10)))
    data, segment = next((d, s) for d, s in net.a.wire_out if s)
    rx = net.b.rx
    rx.reports()
    forged = bytearray(data)
    for start in range(0, len(forged), segment):  # fresh counters, but every tag is wrong
        forged[start + 8 : start + 16] = (10**9 + start).to_bytes(8, "little")
    assert rx.process(memoryview(forged), segment, A_ADDR, net.now) == []
    assert rx.counters["decrypt_failed"] == 10
    assert rx.reports() == []
    # one bad datagram in an otherwise good batch: the rest is delivered, one drop counted
    net.b.tun_writes.clear()
    read = super_read(os.urandom(1368 * 10))
    (send,) = net.a.tx.process(memoryview(bytearray(read)), net.now)
    batch = bytearray(send.payload())
    batch[3 * send.segment_size + 100] ^= 0xFF
    writes = rx.process(memoryview(batch), send.segment_size, A_ADDR, net.now)
    assert rx.counters["decrypt_failed"] == 11
    delivered = sum(len(w) for w in writes)
    assert 0 < delivered < len(read)


def test_short_and_ragged_extension_reads_are_counted_not_raised() -> None:
    """Found by the atheris harness (bench/fuzz_atheris.py): a 1-byte 0x77 datagram raised
    IndexError in RxEngine.process; a GRO batch whose last datagram is shorter than a fragment
    header could too. Every such read must be dropped and counted."""
    net = Net(extension=True)
    net.send(net.a, super_read(os.urandom(100)))  # a real keypair exists on B
    rx = net.b.rx
    header = b"\x77\x00\x01\x00" + bytes(12)
    for length in range(1, 80):
        for body in (b"\x77" * length, (header + os.urandom(80))[:length]):
            for segment in (0, 1, 2, 15, 16, 17, 40):
                writes = rx.process(memoryview(bytearray(body)), segment, A_ADDR, net.now)
                assert writes == []
    # a batch of two full-header datagrams, the second cut to one byte
    ragged = bytearray(b"\x77\x00\x02\x00" + bytes(12) + os.urandom(40) + b"\x77")
    assert rx.process(memoryview(ragged), 56, A_ADDR, net.now) == []
    assert sum(rx.counters.values()) > 0
    assert not rx.counters["engine_error_rx"], "dropped by a check, not by the engine's guard"


def land(buffers: list[memoryview], data: bytes) -> None:
    """Put one read into recvmsg_into's buffers, in order, as the kernel does."""
    at = 0
    for buffer in buffers:
        piece = data[at : at + len(buffer)]
        buffer[: len(piece)] = piece
        at += len(piece)
    assert at == len(data), "the read did not fit the buffers"


def test_reads_land_scattered_while_extension_messages_arrive() -> None:
    """RxEngine.read_buffers / process_read: after a batch that is one extension message, the
    next reads land scattered (headers apart, ciphertext contiguous, opened where it lies);
    every other kind of read is put back in order and delivered exactly as before, and a run
    of standard messages sends the reads back to one linear buffer."""
    net = Net(extension=True)
    net.send(net.a, super_read(os.urandom(100)))  # handshake
    rx = net.b.rx

    def read(data: bytes, segment: int) -> list[bytes]:
        land(rx.read_buffers(), data)
        return [bytes(w) for w in rx.process_read(len(data), segment, A_ADDR, net.now)]

    def message(read_bytes: bytes) -> Send:
        (send,) = net.a.tx.process(memoryview(bytearray(read_bytes)), net.now)
        return send

    first, second = super_read(os.urandom(30_000)), super_read(os.urandom(60_000))
    assert len(rx.read_buffers()) == 1
    assert read(message(first).payload(), 1472) == [first]
    assert len(rx.read_buffers()) > 1, "an extension batch should switch to scattered reads"
    assert read(message(second).payload(), 1472) == [second]
    # one small message (an ACK) lands scattered and opens in place
    ack = tcp_packet(b"", seq=5, partial=True)
    ack = vnet(csum=True) + ack[:12] + bytes([198, 19, 1, 2, 198, 19, 2, 2]) + ack[20:]
    single = message(ack).payload()
    assert read(single, 0) == [ack]
    # a GRO batch of three ACKs does not fit the layout: put back in order, all delivered
    batch = b"".join(message(ack).payload() for _ in range(3))
    assert read(batch, len(single)) == [ack] * 3
    assert len(rx.read_buffers()) > 1, "small reads keep the scattered layout"
    # a message split across reads is reassembled, as before
    split = super_read(os.urandom(5_000))
    data = message(split).payload()
    assert read(data[:1472], 0) == [] and read(data[1472:], 1472) == [split]
    # a run of standard type-4 messages: delivered merged, and reads go linear again
    (peer,) = (p.public_key.raw for p in net.a.core.peers)
    net.a.tx.apply(SetPeer(peer, ("198.19.2.0/24",), B_ADDR, False), net.now)
    run = super_read(os.urandom(1368 * 20))
    standard = message(run)
    assert standard.segment_size == 16 + 1408 + 16
    (merged,) = read(standard.payload(), standard.segment_size)
    assert merged[VNET_HDR_SIZE:] == run[VNET_HDR_SIZE:]
    assert len(rx.read_buffers()) == 1
    assert not rx.counters, rx.counters


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(st.sampled_from([1, 16, 17, 100, 1472, 1473, 2944, 8000]), st.integers(1, 9000)),
        min_size=1,
        max_size=4,
    ),
    st.randoms(use_true_random=False),
    st.booleans(),
    st.one_of(
        st.sampled_from([0, 1, 16, 17, 100, 1456, 1471, 1472, 1473]),
        st.integers(min_value=0, max_value=2000),
    ),
)
def test_arbitrary_reads_through_either_layout_are_counted_never_raised(
    sizes: list[int], rng: Any, scattered: bool, segment: int
) -> None:
    """Whatever lands in read_buffers(), scattered or linear, process_read counts or delivers
    it; the engine's own guard (engine_error_rx) never has to catch anything. Half the reads
    start with the extension's type byte, so the scatter checks see plausible headers too."""
    net = Net(extension=True)
    net.send(net.a, super_read(os.urandom(100)))
    rx = net.b.rx
    if scattered:  # one whole message first, so the next reads land scattered
        (send,) = net.a.tx.process(memoryview(bytearray(super_read(os.urandom(9000)))), 0.0)
        data = send.payload()
        land(rx.read_buffers(), data)
        rx.process_read(len(data), 1472, A_ADDR, net.now)
        assert len(rx.read_buffers()) > 1
    for size in sizes:
        data = bytearray(rng.randbytes(size))
        if rng.random() < 0.5:
            data[0] = 0x77
        land(rx.read_buffers(), bytes(data))
        rx.process_read(len(data), segment, A_ADDR, net.now)
    assert not rx.counters["engine_error_rx"], rx.counters
