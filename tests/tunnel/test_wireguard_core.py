"""The sans-IO device: two (or three) devices wired back to back in virtual time.

Everything here is real protocol code; the only stand-in is the "network", a list of
datagrams handed from one device to the other, and the clock, a float we advance.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.wireguard.core import (
    Device,
    DeviceConfig,
    EndpointChanged,
    HandshakeCompleted,
    HandshakeGaveUp,
    KeypairsChanged,
    KeysZeroed,
    PeerConfig,
)
from tunnel.wireguard.keys import PrivateKey
from tunnel.wireguard.messages import MESSAGE_INITIATION, MESSAGE_TRANSPORT
from tunnel.wireguard.timers import TimerConfig

A_ADDR = ("198.18.0.11", 51820)
B_ADDR = ("198.18.0.12", 51820)


def ipv4_udp(src: str, dst: str, payload: bytes = b"hello") -> bytes:
    """A minimal IPv4/UDP packet (checksums are not looked at by WireGuard)."""
    total = 28 + len(payload)
    header = struct.pack(
        ">BBHHHBBH4s4s",
        0x45,
        0,
        total,
        0,
        0,
        64,
        17,
        0,
        bytes(int(x) for x in src.split(".")),
        bytes(int(x) for x in dst.split(".")),
    )
    return header + struct.pack(">HHHH", 1000, 2000, 8 + len(payload), 0) + payload


@dataclass
class Wire:
    """Two devices and the datagrams in flight between them."""

    a: Device
    b: Device
    now: float = 0.0
    delivered_to_a: list[bytes] = field(default_factory=list)
    delivered_to_b: list[bytes] = field(default_factory=list)
    captured: list[tuple[str, bytes]] = field(default_factory=list)

    def pump(self, drop: bool = False) -> int:
        """Deliver datagrams until both devices are quiet; returns how many moved."""
        moved = 0
        for _ in range(50):
            out_a = self.a.datagrams_to_send()
            out_b = self.b.datagrams_to_send()
            if not out_a and not out_b:
                break
            for data, addr in out_a:
                self.captured.append(("a->b", data))
                if not drop and addr == B_ADDR:
                    self.b.receive_datagram(data, A_ADDR, self.now)
                moved += 1
            for data, addr in out_b:
                self.captured.append(("b->a", data))
                if not drop and addr == A_ADDR:
                    self.a.receive_datagram(data, B_ADDR, self.now)
                moved += 1
        self.delivered_to_a += self.a.tun_writes()
        self.delivered_to_b += self.b.tun_writes()
        return moved

    def advance(self, seconds: float, step: float = 0.25, drop: bool = False) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            self.a.handle_timer(self.now)
            self.b.handle_timer(self.now)
            self.pump(drop=drop)


def make_wire(timers: TimerConfig | None = None, **device_kwargs: object) -> Wire:
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    cfg = timers or TimerConfig()
    a = Device(DeviceConfig(ka, timers=cfg, random_seed=1, **device_kwargs))  # type: ignore[arg-type]
    b = Device(DeviceConfig(kb, timers=cfg, random_seed=2, **device_kwargs))  # type: ignore[arg-type]
    a.add_peer(PeerConfig(kb.public_key, ("198.19.2.0/24",), endpoint=B_ADDR))
    b.add_peer(PeerConfig(ka.public_key, ("198.19.1.0/24",), endpoint=A_ADDR))
    return Wire(a, b)


def test_first_packet_triggers_handshake_then_flows_both_ways() -> None:
    wire = make_wire()
    packet = ipv4_udp("198.19.1.2", "198.19.2.2")
    wire.a.send_packet(packet, wire.now)
    wire.pump()
    assert wire.delivered_to_b == [packet]
    events_a = wire.a.events()
    assert HandshakeCompleted(wire.b.public_key, initiator=True) in events_a
    assert any(isinstance(e, KeypairsChanged) for e in events_a)
    # the responder confirms its "next" keypair when the initiator's keepalive/data arrives
    assert HandshakeCompleted(wire.a.public_key, initiator=False) in wire.b.events()
    reply = ipv4_udp("198.19.2.2", "198.19.1.2", b"world")
    wire.b.send_packet(reply, wire.now)
    wire.pump()
    assert wire.delivered_to_a == [reply]
    assert wire.a.counters == {} and wire.b.counters == {}


def test_responder_can_initiate_too() -> None:
    wire = make_wire()
    wire.b.send_packet(ipv4_udp("198.19.2.2", "198.19.1.9"), wire.now)
    wire.pump()
    assert len(wire.delivered_to_a) == 1


def test_packets_are_routed_by_longest_prefix_and_unrouted_ones_counted() -> None:
    ka, kb, kc = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    dev = Device(DeviceConfig(ka))
    dev.add_peer(PeerConfig(kb.public_key, ("198.19.0.0/16",), endpoint=B_ADDR))
    dev.add_peer(PeerConfig(kc.public_key, ("198.19.3.0/24",), endpoint=("198.18.0.13", 51820)))
    assert dev.allowed_ips.lookup(bytes([198, 19, 3, 7])) is dev.peer(kc.public_key)
    assert dev.allowed_ips.lookup(bytes([198, 19, 4, 7])) is dev.peer(kb.public_key)
    dev.send_packet(ipv4_udp("198.19.1.2", "198.18.5.5"), 0.0)
    dev.send_packet(b"\x00garbage", 0.0)
    assert dev.counters["no_route"] == 1 and dev.counters["bad_inner_packet"] == 1
    dev.send_packet(ipv4_udp("198.19.1.2", "198.19.3.7"), 0.0)
    ((initiation, addr),) = dev.datagrams_to_send()
    assert addr == ("198.18.0.13", 51820) and initiation[0] == MESSAGE_INITIATION


def test_inner_source_outside_allowed_ips_is_dropped_and_counted() -> None:
    wire = make_wire()
    wire.a.send_packet(ipv4_udp("198.19.1.2", "198.19.2.2"), wire.now)
    wire.pump()
    # A sends with a source that B did not allow for A (198.19.7.0/24 is nobody's)
    wire.a.send_packet(ipv4_udp("198.19.7.1", "198.19.2.2"), wire.now)
    wire.pump()
    assert len(wire.delivered_to_b) == 1
    assert wire.b.counters["bad_inner_source"] == 1


def test_replayed_truncated_and_forged_transport_messages_are_counted() -> None:
    wire = make_wire()
    wire.a.send_packet(ipv4_udp("198.19.1.2", "198.19.2.2"), wire.now)
    wire.pump()
    transports = [d for direction, d in wire.captured if direction == "a->b" and d[0] == 4]
    data_message = transports[-1]
    wire.b.receive_datagram(data_message, A_ADDR, wire.now)  # replay
    wire.b.receive_datagram(data_message[:20], A_ADDR, wire.now)  # truncated
    forged = bytearray(data_message)
    forged[8:16] = (10**6).to_bytes(8, "little")  # a fresh counter, but the tag cannot match
    wire.b.receive_datagram(bytes(forged), A_ADDR, wire.now)
    flipped = bytearray(data_message)
    flipped[-1] ^= 1  # same counter as a delivered message: refused before decryption
    wire.b.receive_datagram(bytes(flipped), A_ADDR, wire.now)
    unknown = bytearray(data_message)
    unknown[4:8] = b"\xde\xad\xbe\xef"
    wire.b.receive_datagram(bytes(unknown), A_ADDR, wire.now)
    wire.b.receive_datagram(b"\x09\x00\x00\x00" + bytes(40), A_ADDR, wire.now)
    wire.b.receive_datagram(b"\x04", A_ADDR, wire.now)
    assert wire.b.counters["replay"] == 2
    assert wire.b.counters["truncated"] == 2
    assert wire.b.counters["decrypt_failed"] == 1
    assert wire.b.counters["unknown_index"] == 1
    assert wire.b.counters["bad_type"] == 1
    assert len(wire.delivered_to_b) == 1


def test_replayed_truncated_and_forged_handshakes_are_counted() -> None:
    wire = make_wire()
    wire.a.send_packet(ipv4_udp("198.19.1.2", "198.19.2.2"), wire.now)
    wire.pump()
    initiation = next(d for _, d in wire.captured if d[0] == MESSAGE_INITIATION)
    wire.now += 1.0
    wire.b.receive_datagram(initiation, A_ADDR, wire.now)
    assert wire.b.counters["handshake_replay"] == 1
    wire.b.receive_datagram(initiation[:100], A_ADDR, wire.now)
    assert wire.b.counters["bad_length"] == 1
    forged = bytearray(initiation)
    forged[40] ^= 0x80  # inside the encrypted static key: mac1 no longer matches
    wire.b.receive_datagram(bytes(forged), A_ADDR, wire.now)
    assert wire.b.counters["bad_mac1"] == 1
    assert not wire.b.datagrams_to_send()


def test_wrong_static_key_never_completes_a_handshake() -> None:
    ka, kb, impostor = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    a = Device(DeviceConfig(ka))
    b = Device(DeviceConfig(kb))
    # A believes B's key is the impostor's; B knows A correctly
    a.add_peer(PeerConfig(impostor.public_key, ("198.19.2.0/24",), endpoint=B_ADDR))
    b.add_peer(PeerConfig(ka.public_key, ("198.19.1.0/24",), endpoint=A_ADDR))
    wire = Wire(a, b)
    a.send_packet(ipv4_udp("198.19.1.2", "198.19.2.2"), 0.0)
    wire.advance(30.0, step=1.0)
    assert b.counters["bad_mac1"] >= 1  # mac1 is keyed with the impostor's public key
    assert not any(isinstance(e, HandshakeCompleted) for e in a.events() + b.events())
    # and the other way round: B's initiations reach A, whose config does not know B
    b.send_packet(ipv4_udp("198.19.1.2", "198.19.1.3"), wire.now)
    b.send_packet(ipv4_udp("198.19.2.2", "198.19.1.3"), wire.now)
    wire.advance(6.0, step=1.0)
    assert a.counters["unknown_peer"] >= 1
    assert not wire.delivered_to_a and not wire.delivered_to_b


def test_under_load_requires_a_cookie_then_completes() -> None:
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    a = Device(DeviceConfig(ka, random_seed=1))
    b = Device(DeviceConfig(kb, random_seed=2, under_load_threshold=0))  # always under load
    a.add_peer(PeerConfig(kb.public_key, ("198.19.2.0/24",), endpoint=B_ADDR))
    b.add_peer(PeerConfig(ka.public_key, ("198.19.1.0/24",), endpoint=A_ADDR))
    wire = Wire(a, b)
    a.send_packet(ipv4_udp("198.19.1.2", "198.19.2.2"), wire.now)
    wire.pump()
    assert b.counters["needs_cookie"] == 1
    assert b.stats["cookie_replies_sent"] == 1 and a.stats["cookie_replies_received"] == 1
    assert not wire.delivered_to_b and b.stats["responses_sent"] == 0
    # the retry (after REKEY_TIMEOUT + jitter) carries mac2 and is answered
    wire.advance(6.0)
    assert b.stats["responses_sent"] == 1
    assert any(isinstance(e, HandshakeCompleted) for e in a.events())
    assert len(wire.delivered_to_b) == 1  # the staged packet went out on completion


def test_rekey_after_time_keeps_traffic_flowing() -> None:
    timers = TimerConfig(rekey_after_time=3.0, reject_after_time=6.0, keepalive_timeout=1.0)
    wire = make_wire(timers)
    sent = 0
    indices: set[int] = set()
    for _ in range(40):  # both sides talk, a quarter second apart
        wire.a.send_packet(ipv4_udp("198.19.1.2", "198.19.2.2", str(sent).encode()), wire.now)
        wire.advance(0.25, step=0.05)
        wire.b.send_packet(ipv4_udp("198.19.2.2", "198.19.1.2", str(sent).encode()), wire.now)
        wire.advance(0.25, step=0.05)
        sent += 1
        indices.update(
            int.from_bytes(d[4:8], "little") for _, d in wire.captured if d[0] == MESSAGE_TRANSPORT
        )
    handshakes = wire.a.stats["handshakes_completed"] + wire.b.stats["handshakes_completed"]
    assert handshakes >= 6  # several rekeys in 20 s of virtual time
    assert len(indices) >= 6
    # rekeying loses nothing: every packet arrived
    assert len(wire.delivered_to_b) == sent and len(wire.delivered_to_a) == sent
    assert wire.a.counters["expired_keypair"] == 0 and wire.b.counters["expired_keypair"] == 0


def test_rekey_after_messages() -> None:
    timers = TimerConfig(rekey_after_messages=20)
    wire = make_wire(timers)
    for i in range(60):
        wire.a.send_packet(ipv4_udp("198.19.1.2", "198.19.2.2", bytes([i])), wire.now)
        wire.pump()
        wire.advance(0.1, step=0.1)  # let the 5 s REKEY_TIMEOUT guard pass between attempts
        wire.now += 5.0
    assert wire.a.stats["initiations_sent"] >= 3
    assert len(wire.delivered_to_b) == 60


def test_keepalive_after_receiving_data_and_new_handshake_when_unanswered() -> None:
    wire = make_wire()
    wire.a.send_packet(ipv4_udp("198.19.1.2", "198.19.2.2"), wire.now)
    wire.pump()
    wire.captured.clear()
    wire.a.send_packet(ipv4_udp("198.19.1.2", "198.19.2.2"), wire.now)
    wire.pump()
    wire.advance(11.0)  # KEEPALIVE_TIMEOUT: B answers A's data with an empty transport message
    keepalives = [d for direction, d in wire.captured if direction == "b->a" and len(d) == 32]
    assert len(keepalives) == 1
    # now A sends data and B stays silent (drop everything): A starts a new handshake after
    # KEEPALIVE_TIMEOUT + REKEY_TIMEOUT
    wire.captured.clear()
    wire.a.send_packet(ipv4_udp("198.19.1.2", "198.19.2.2"), wire.now)
    wire.advance(16.0, drop=True)
    assert any(d[0] == MESSAGE_INITIATION for direction, d in wire.captured if direction == "a->b")


def test_persistent_keepalive() -> None:
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    a = Device(DeviceConfig(ka))
    b = Device(DeviceConfig(kb))
    a.add_peer(PeerConfig(kb.public_key, ("198.19.2.0/24",), B_ADDR, persistent_keepalive=2.0))
    b.add_peer(PeerConfig(ka.public_key, ("198.19.1.0/24",), A_ADDR))
    wire = Wire(a, b)
    a.send_packet(ipv4_udp("198.19.1.2", "198.19.2.2"), 0.0)
    wire.pump()
    wire.captured.clear()
    wire.advance(9.0)
    keepalives = [d for direction, d in wire.captured if direction == "a->b" and len(d) == 32]
    assert 3 <= len(keepalives) <= 5


def test_handshake_gives_up_then_zeroes_keys() -> None:
    timers = TimerConfig(rekey_attempt_time=10.0, rekey_timeout=1.0, reject_after_time=4.0)
    wire = make_wire(timers)
    wire.a.send_packet(ipv4_udp("198.19.1.2", "198.19.2.2"), wire.now)
    wire.advance(17.0, step=0.05, drop=True)
    events = wire.a.events()
    assert HandshakeGaveUp(wire.b.public_key) in events
    initiations = [d for direction, d in wire.captured if direction == "a->b"]
    assert len(initiations) == timers.max_handshake_attempts + 2  # first try + retries
    wire.advance(13.0, drop=True)
    assert KeysZeroed(wire.b.public_key) in wire.a.events()


def test_keys_expire_after_reject_after_time() -> None:
    timers = TimerConfig(rekey_after_time=100.0, reject_after_time=5.0)
    wire = make_wire(timers)
    wire.a.send_packet(ipv4_udp("198.19.1.2", "198.19.2.2"), wire.now)
    wire.pump()
    old = next(d for direction, d in reversed(wire.captured) if d[0] == MESSAGE_TRANSPORT)
    wire.now += 6.0
    wire.b.receive_datagram(old, A_ADDR, wire.now)
    assert wire.b.counters["expired_keypair"] == 1


def test_roaming_updates_the_endpoint() -> None:
    wire = make_wire()
    wire.a.send_packet(ipv4_udp("198.19.1.2", "198.19.2.2"), wire.now)
    wire.pump()
    wire.b.events()
    wire.a.send_packet(ipv4_udp("198.19.1.2", "198.19.2.2"), wire.now)
    ((message, _),) = wire.a.datagrams_to_send()
    wire.b.receive_datagram(message, ("198.18.0.99", 40000), wire.now)
    assert EndpointChanged(wire.a.public_key, ("198.18.0.99", 40000)) in wire.b.events()
    assert wire.b.peer(wire.a.public_key).endpoint == ("198.18.0.99", 40000)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=255))
def test_arbitrary_datagrams_never_raise(data: bytes, first: int) -> None:
    dev = Device(DeviceConfig(PrivateKey(bytes(range(32)))))
    dev.add_peer(PeerConfig(PrivateKey(bytes(range(1, 33))).public_key, ("198.19.2.0/24",)))
    for candidate in (data, bytes([first]) + data, bytes([first, 0, 0, 0]) + data):
        dev.receive_datagram(candidate, A_ADDR, 0.0)
    assert not dev.tun_writes()


def test_removing_a_peer_forgets_its_sessions() -> None:
    wire = make_wire()
    wire.a.send_packet(ipv4_udp("198.19.1.2", "198.19.2.2"), wire.now)
    wire.pump()
    wire.b.remove_peer(wire.a.public_key)
    wire.a.send_packet(ipv4_udp("198.19.1.2", "198.19.2.2"), wire.now)
    wire.pump()
    assert wire.b.counters["unknown_index"] == 1
    with pytest.raises(KeyError):
        wire.b.peer(wire.a.public_key)


def test_late_reports_from_workers_do_not_arm_stale_timers() -> None:
    """External data plane: a reply's receipt reported before the send that caused it must not
    leave the new-handshake timer armed (which would rekey an idle but healthy session)."""
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    dev = Device(DeviceConfig(ka, external_data_plane=True))
    other = Device(DeviceConfig(kb))
    dev.add_peer(PeerConfig(kb.public_key, ("198.19.2.0/24",), endpoint=B_ADDR))
    other.add_peer(PeerConfig(ka.public_key, ("198.19.1.0/24",), endpoint=A_ADDR))
    dev.request_handshake(kb.public_key, 0.0)
    for data, _ in dev.datagrams_to_send():
        other.receive_datagram(data, A_ADDR, 0.0)
    for data, _ in other.datagrams_to_send():
        dev.receive_datagram(data, B_ADDR, 0.0)
    peer = dev.peer(kb.public_key)
    index = peer.keypairs.current.local_index  # type: ignore[union-attr]
    timers = peer.timers
    timers.new_handshake = None
    # the receipt at t=1.2 is reported first, the send at t=1.0 after it
    dev.note_transport_received(kb.public_key, index, B_ADDR, True, now=1.3, at=1.2)
    dev.note_data_sent(kb.public_key, 5, True, now=1.3, at=1.0)
    assert timers.new_handshake is None
    # in causal order the send arms it and the receipt clears it, as in wireguard-go
    dev.note_data_sent(kb.public_key, 6, True, now=2.0, at=2.0)
    assert timers.new_handshake is not None
    dev.note_transport_received(kb.public_key, index, B_ADDR, True, now=2.1, at=2.1)
    assert timers.new_handshake is None
