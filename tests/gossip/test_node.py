"""The Node driven by hand: packets in, packets out, with virtual time.

Peers here are played by the test itself with the real codec (`gossip.wire`); nothing is mocked.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from gossip import wire
from gossip.config import GossipConfig
from gossip.events import (
    CloseStream,
    MemberEventKind,
    MemberState,
    OpenStream,
    StreamSend,
)
from gossip.messages import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    MessageType,
    Nack,
    PacketMessage,
    Ping,
    Suspect,
    UserMsg,
)
from gossip.node import Node

ME = (bytes([198, 18, 0, 1]), 7946)
PEERS = {f"peer-{i}": (bytes([198, 18, 0, i + 1]), 7946) for i in range(1, 8)}
CODEC = wire.PacketCodec(None, False)
VSN_PMAX4 = bytes([1, 4, 2, 2, 5, 5])


def make_node(config: GossipConfig | None = None, seed: int = 1, **kwargs: object) -> Node:
    node = Node(
        config or GossipConfig.lan(),
        "me",
        ME[0],
        ME[1],
        rng=random.Random(seed),
        compression=False,
        **kwargs,  # type: ignore[arg-type]
    )
    node.start(0.0)
    node.packets_to_send()
    node.events()
    return node


def packet(*messages: PacketMessage, crc: bool = False) -> bytes:
    return CODEC.encode([wire.encode_message(m) for m in messages], crc=crc)


def sent(node: Node) -> list[tuple[list[PacketMessage], tuple[bytes, int]]]:
    return [(CODEC.decode(data), addr) for data, addr in node.packets_to_send()]


def alive(name: str, incarnation: int = 1, vsn: bytes | None = None, meta: bytes = b"") -> Alive:
    addr, port = PEERS[name]
    kwargs = {} if vsn is None else {"vsn": vsn}
    return Alive(incarnation, name, addr, port, meta, **kwargs)


def introduce(node: Node, *names: str, now: float = 0.0, vsn: bytes | None = None) -> None:
    for name in names:
        node.receive_packet(packet(alive(name, vsn=vsn)), PEERS[name], now)
    node.packets_to_send()
    node.events()


def run_until(node: Node, until: float) -> None:
    """Fire every timer up to `until`, as a driver would."""
    while (deadline := node.next_deadline()) is not None and deadline <= until:
        node.handle_timer(deadline)


def first_of(messages: list[PacketMessage], kind: type) -> PacketMessage:
    return next(m for m in messages if isinstance(m, kind))


# -- ping / ack -------------------------------------------------------------------------------


def test_ping_is_acked_to_its_source_address() -> None:
    node = make_node()
    ping = Ping(7, "me", PEERS["peer-1"][0], PEERS["peer-1"][1], "peer-1")
    node.receive_packet(packet(ping), (b"\x7f\x00\x00\x01", 9999), 1.0)
    [(messages, addr)] = sent(node)
    assert addr == PEERS["peer-1"]
    assert first_of(messages, Ack) == Ack(7)


def test_ping_without_source_is_acked_to_the_sender() -> None:
    node = make_node()
    node.receive_packet(packet(Ping(8, "me")), PEERS["peer-2"], 1.0)
    [(messages, addr)] = sent(node)
    assert addr == PEERS["peer-2"]
    assert first_of(messages, Ack) == Ack(8)


def test_ping_for_another_node_is_dropped() -> None:
    node = make_node()
    node.receive_packet(packet(Ping(9, "someone-else")), PEERS["peer-1"], 1.0)
    assert node.packets_to_send() == []
    assert node.stats.drops["ping_wrong_node"] == 1


def test_acks_carry_pending_broadcasts() -> None:
    node = make_node()
    introduce(node, "peer-1")  # queues a re-broadcast of peer-1's alive
    node.receive_packet(packet(Ping(1, "me")), PEERS["peer-2"], 1.0)
    [(messages, _)] = sent(node)
    assert Ack(1) in messages
    assert any(isinstance(m, Alive) and m.node == "peer-1" for m in messages)


# -- indirect pings ---------------------------------------------------------------------------


def _indirect(nack: bool) -> IndirectPing:
    target_addr, target_port = PEERS["peer-3"]
    source_addr, source_port = PEERS["peer-1"]
    return IndirectPing(
        seq_no=42, target=target_addr, port=target_port, node="peer-3", nack=nack,
        source_addr=source_addr, source_port=source_port, source_node="peer-1",
    )


def test_indirect_ping_forwards_a_ping_and_relays_the_ack() -> None:
    node = make_node()
    node.receive_packet(packet(_indirect(nack=True)), PEERS["peer-1"], 1.0)
    [(messages, addr)] = sent(node)
    assert addr == PEERS["peer-3"]
    forwarded = first_of(messages, Ping)
    assert isinstance(forwarded, Ping)
    assert forwarded.node == "peer-3" and forwarded.source_node == "me"
    node.receive_packet(packet(Ack(forwarded.seq_no)), PEERS["peer-3"], 1.1)
    [(messages, addr)] = sent(node)
    assert addr == PEERS["peer-1"]
    assert first_of(messages, Ack) == Ack(42)
    run_until(node, 3.0)  # no nack after an ack
    assert not any(
        isinstance(m, Nack) for messages, _ in sent(node) for m in messages
    )


def test_indirect_ping_sends_a_nack_after_the_probe_timeout() -> None:
    node = make_node()
    node.receive_packet(packet(_indirect(nack=True)), PEERS["peer-1"], 1.0)
    node.packets_to_send()
    run_until(node, 1.49)
    assert not any(isinstance(m, Nack) for messages, _ in sent(node) for m in messages)
    run_until(node, 1.5)
    nacks = [(m, addr) for messages, addr in sent(node) for m in messages if isinstance(m, Nack)]
    assert nacks == [(Nack(42), PEERS["peer-1"])]
    assert node.stats.nacks_sent == 1


def test_indirect_ping_without_nack_request_stays_silent() -> None:
    node = make_node()
    node.receive_packet(packet(_indirect(nack=False)), PEERS["peer-1"], 1.0)
    node.packets_to_send()
    run_until(node, 2.0)
    assert not any(isinstance(m, Nack) for messages, _ in sent(node) for m in messages)


# -- probing ----------------------------------------------------------------------------------


Log = list[tuple[float, list[PacketMessage], tuple[bytes, int]]]


def advance(node: Node, until: float, answering: frozenset[str] = frozenset()) -> Log:
    """Fire timers up to `until`, logging every packet; peers in `answering` ack pings."""
    log: Log = []
    by_addr = {addr: name for name, addr in PEERS.items()}
    while (t := node.next_deadline()) is not None and t <= until:
        node.handle_timer(t)
        for messages, addr in sent(node):
            log.append((t, messages, addr))
            if by_addr.get(addr) not in answering:
                continue
            for message in messages:
                if isinstance(message, Ping):
                    node.receive_packet(packet(Ack(message.seq_no)), addr, t + 0.001)
    return log


def first_probe(log: Log) -> tuple[float, Ping, tuple[bytes, int]]:
    for t, messages, addr in log:
        for message in messages:
            if isinstance(message, Ping):
                return t, message, addr
    raise AssertionError("no probe sent")


def test_an_acked_probe_keeps_the_target_alive_and_improves_health() -> None:
    node = make_node()
    introduce(node, "peer-1")
    node.awareness.apply_delta(2)
    log = advance(node, 1.0)
    t0, ping, addr = first_probe(log)
    assert addr == PEERS["peer-1"] and ping.node == "peer-1"
    node.receive_packet(packet(Ack(ping.seq_no)), addr, t0 + 0.01)
    assert node.member_state("peer-1") is MemberState.ALIVE
    assert node.health_score == 1
    assert node.stats.probes == 1 and node.stats.probe_failures == 0


def _failing_probe(node: Node) -> tuple[float, Ping, tuple[bytes, int], Log]:
    """Run until the first probe's timeout has passed (nobody answers anything)."""
    log = advance(node, 1.0)
    t0, ping, target = first_probe(log)
    log += advance(node, t0 + 0.5)
    return t0, ping, target, log


def test_unanswered_probe_goes_indirect_with_tcp_fallback_then_suspects() -> None:
    node = make_node()
    introduce(node, "peer-1", "peer-2", "peer-3", "peer-4")
    t0, ping, target, log = _failing_probe(node)
    requests = [(m, a) for _, ms, a in log for m in ms if isinstance(m, IndirectPing)]
    assert len(requests) == 3  # indirect_checks
    assert all(m.node == ping.node and m.seq_no == ping.seq_no and m.nack for m, _ in requests)
    assert target not in {a for _, a in requests}
    opens = [a for a in node.stream_actions() if isinstance(a, OpenStream)]
    assert [a.addr for a in opens] == [target]  # the TCP fallback ping
    # Two relays answer with nacks; one stays silent.
    node.receive_packet(packet(Nack(ping.seq_no)), requests[0][1], t0 + 0.9)
    node.receive_packet(packet(Nack(ping.seq_no)), requests[1][1], t0 + 0.9)
    advance(node, t0 + 1.0)
    assert node.member_state(ping.node) is MemberState.SUSPECT
    assert [a for a in node.stream_actions() if isinstance(a, CloseStream)]
    assert node.health_score == 1  # one missing nack
    assert node.stats.probe_failures == 1
    assert [(e.kind, e.name) for e in node.events()] == [(MemberEventKind.SUSPECT, ping.node)]


def test_indirect_ack_saves_the_probe() -> None:
    node = make_node()
    introduce(node, "peer-1", "peer-2")
    t0, ping, _, log = _failing_probe(node)
    [relay] = [a for _, ms, a in log for m in ms if isinstance(m, IndirectPing)]
    node.receive_packet(packet(Ack(ping.seq_no)), relay, t0 + 0.7)
    advance(node, t0 + 1.0, answering=frozenset(PEERS))
    assert node.member_state(ping.node) is MemberState.ALIVE
    assert node.stats.probe_failures == 0
    assert node.health_score == 0


def test_tcp_fallback_success_saves_the_probe() -> None:
    node = make_node()
    introduce(node, "peer-1")
    t0, ping, _, _ = _failing_probe(node)
    [open_stream] = [a for a in node.stream_actions() if isinstance(a, OpenStream)]
    node.stream_opened(open_stream.stream_id, t0 + 0.51)
    [write] = node.stream_actions()
    assert isinstance(write, StreamSend)
    assert wire.StreamDecoder().feed(write.data) == ping
    reply = wire.encode_stream(Ack(ping.seq_no), keyring=None, compression=False)
    node.stream_data(open_stream.stream_id, reply, t0 + 0.52)
    advance(node, t0 + 1.0)
    assert node.member_state(ping.node) is MemberState.ALIVE
    assert node.stats.tcp_fallback_successes == 1


def test_no_tcp_fallback_to_peers_below_protocol_3() -> None:
    node = make_node()
    introduce(node, "peer-1", vsn=bytes([1, 2, 2, 2, 5, 5]))
    _failing_probe(node)
    assert node.stats.indirect_pings_sent == 0  # nobody else to ask
    assert not [a for a in node.stream_actions() if isinstance(a, OpenStream)]


def test_nacks_are_only_requested_from_protocol_4_peers() -> None:
    node = make_node()
    introduce(node, "peer-1")
    introduce(node, "peer-2", vsn=bytes([1, 3, 2, 2, 5, 5]))
    _, _, target, log = _failing_probe(node)
    requests = [m for _, ms, _ in log for m in ms if isinstance(m, IndirectPing)]
    assert len(requests) == 1
    # The relay is whichever peer was not probed; only a protocol-4 relay is asked to nack.
    assert requests[0].nack is (target == PEERS["peer-2"])


def test_probing_a_suspect_sends_ping_and_suspect_together() -> None:
    # Lifeguard's buddy system: the suspect hears about it with the probe and can refute.
    node = make_node()
    introduce(node, "peer-1")
    node.receive_packet(packet(Suspect(1, "peer-1", "peer-9")), PEERS["peer-2"], 0.1)
    node.packets_to_send()
    t = node.next_deadline()
    while t is not None and t < 5.0:
        node.handle_timer(t)
        for messages, addr in sent(node):
            if any(isinstance(m, Ping) for m in messages):
                assert addr == PEERS["peer-1"]
                assert Suspect(1, "peer-1", "me") in messages
                return
        t = node.next_deadline()
    raise AssertionError("no probe sent")


# -- rumours and refutation -------------------------------------------------------------------


def test_alive_needs_a_higher_incarnation() -> None:
    node = make_node()
    introduce(node, "peer-1")
    node.receive_packet(packet(alive("peer-1", 1, meta=b"x")), PEERS["peer-1"], 1.0)
    assert node.member("peer-1").meta == b""  # type: ignore[union-attr]
    node.receive_packet(packet(alive("peer-1", 2, meta=b"x")), PEERS["peer-1"], 1.0)
    assert node.member("peer-1").meta == b"x"  # type: ignore[union-attr]
    assert [e.kind for e in node.events()] == [MemberEventKind.UPDATE]


def test_alive_with_another_address_is_a_conflict() -> None:
    node = make_node()
    introduce(node, "peer-1")
    other = Alive(5, "peer-1", PEERS["peer-2"][0], 7946)
    node.receive_packet(packet(other), PEERS["peer-2"], 1.0)
    assert node.member("peer-1").addr == PEERS["peer-1"][0]  # type: ignore[union-attr]
    assert node.stats.drops["alive_conflict"] == 1


def test_left_node_may_come_back_with_a_new_address() -> None:
    node = make_node()
    introduce(node, "peer-1")
    node.receive_packet(packet(Dead(1, "peer-1", "peer-1")), PEERS["peer-1"], 1.0)
    assert node.member_state("peer-1") is MemberState.LEFT
    node.receive_packet(packet(Alive(2, "peer-1", PEERS["peer-2"][0], 7946)), PEERS["peer-2"], 2)
    assert node.member("peer-1").addr == PEERS["peer-2"][0]  # type: ignore[union-attr]
    kinds = [e.kind for e in node.events()]
    assert kinds == [MemberEventKind.LEAVE, MemberEventKind.JOIN]


def test_suspect_then_timeout_declares_dead() -> None:
    node = make_node()
    introduce(node, "peer-1", "peer-2")
    node.receive_packet(packet(Suspect(1, "peer-1", "peer-2")), PEERS["peer-2"], 1.0)
    assert node.member_state("peer-1") is MemberState.SUSPECT
    # n=3 (k = 4 - 2 = 2 > n - 2 = 1, so k = 0): the minimum timeout, 4 s.
    live = frozenset({"peer-2"})
    advance(node, 4.99, answering=live)
    assert node.member_state("peer-1") is MemberState.SUSPECT
    advance(node, 5.0, answering=live)
    assert node.member_state("peer-1") is MemberState.DEAD
    kinds = [e.kind for e in node.events()]
    assert kinds == [MemberEventKind.SUSPECT, MemberEventKind.FAILED]
    assert node.stats.suspicion_timeouts == 1


def test_confirmations_shorten_the_suspicion() -> None:
    node = make_node()
    introduce(node, *PEERS)  # n = 8: k = 2, min 4 s, max 24 s
    node.receive_packet(packet(Suspect(1, "peer-1", "peer-2")), PEERS["peer-2"], 0.0)
    # peer-1 acks our probes (so we add no confirmation of our own) but never refutes.
    live = frozenset(PEERS)
    advance(node, 10.0, answering=live)
    assert node.member_state("peer-1") is MemberState.SUSPECT
    node.receive_packet(packet(Suspect(1, "peer-1", "peer-2")), PEERS["peer-2"], 10.0)  # dup
    node.receive_packet(packet(Suspect(1, "peer-1", "peer-3")), PEERS["peer-3"], 10.0)
    advance(node, 11.0, answering=live)  # one confirmation: 11.4 s after the start
    assert node.member_state("peer-1") is MemberState.SUSPECT
    advance(node, 11.5, answering=live)
    assert node.member_state("peer-1") is MemberState.DEAD


def test_alive_refutes_a_suspicion() -> None:
    node = make_node()
    introduce(node, "peer-1", "peer-2")
    node.receive_packet(packet(Suspect(1, "peer-1", "peer-2")), PEERS["peer-2"], 1.0)
    node.receive_packet(packet(alive("peer-1", 2)), PEERS["peer-1"], 2.0)
    advance(node, 60.0, answering=frozenset({"peer-1", "peer-2"}))
    assert node.member_state("peer-1") is MemberState.ALIVE
    assert [e.kind for e in node.events()] == [MemberEventKind.SUSPECT, MemberEventKind.ALIVE]


def test_dead_from_itself_is_a_leave() -> None:
    node = make_node()
    introduce(node, "peer-1")
    node.receive_packet(packet(Dead(1, "peer-1", "peer-1")), PEERS["peer-1"], 1.0)
    assert node.member_state("peer-1") is MemberState.LEFT
    assert [e.kind for e in node.events()] == [MemberEventKind.LEAVE]


def test_older_dead_is_ignored() -> None:
    node = make_node()
    introduce(node, "peer-1")
    node.receive_packet(packet(alive("peer-1", 5)), PEERS["peer-1"], 1.0)
    node.receive_packet(packet(Dead(4, "peer-1", "peer-2")), PEERS["peer-2"], 1.0)
    assert node.member_state("peer-1") is MemberState.ALIVE


def _gossiped_self_alive(node: Node, until: float) -> list[Alive]:
    run_until(node, until)
    return [
        m for messages, _ in sent(node) for m in messages
        if isinstance(m, Alive) and m.node == "me"
    ]


@pytest.mark.parametrize("rumour", [Suspect(3, "me", "peer-1"), Dead(3, "me", "peer-1")])
def test_suspect_or_dead_about_us_is_refuted(rumour: Suspect | Dead) -> None:
    node = make_node()
    introduce(node, "peer-1")
    node.receive_packet(packet(rumour), PEERS["peer-1"], 1.0)
    assert node.incarnation == 4
    assert node.member_state("me") is MemberState.ALIVE
    assert node.stats.refutations == 1
    assert node.health_score == 1
    refutations = _gossiped_self_alive(node, 2.0)
    assert refutations and all(m.incarnation == 4 for m in refutations)


def test_stale_alive_about_us_with_other_meta_is_refuted() -> None:
    node = make_node()
    introduce(node, "peer-1")
    stale = Alive(1, "me", ME[0], ME[1], b"old-meta")
    node.receive_packet(packet(stale), PEERS["peer-1"], 1.0)
    assert node.incarnation == 2
    assert node.stats.refutations == 1


def test_identical_alive_about_us_is_not_refuted() -> None:
    node = make_node()
    introduce(node, "peer-1")
    same = Alive(1, "me", ME[0], ME[1], b"", GossipConfig.lan().vsn)
    node.receive_packet(packet(same), PEERS["peer-1"], 1.0)
    assert node.incarnation == 1
    assert node.stats.refutations == 0


# -- versions and validation ------------------------------------------------------------------


@pytest.mark.parametrize("vsn", [bytes([0, 5, 2, 2, 5, 5]), bytes([3, 2, 2, 2, 5, 5])])
def test_alive_with_nonsense_protocol_versions_is_ignored(vsn: bytes) -> None:
    node = make_node()
    node.receive_packet(packet(alive("peer-1", vsn=vsn)), PEERS["peer-1"], 1.0)
    assert node.member("peer-1") is None
    assert node.stats.drops["alive_bad_version"] == 1


def test_alive_with_a_bad_address_or_oversized_meta_is_ignored() -> None:
    node = make_node()
    node.receive_packet(packet(Alive(1, "x", b"\x01\x02\x03", 7946)), PEERS["peer-1"], 1.0)
    node.receive_packet(packet(Alive(1, "y", ME[0], 7946, b"m" * 513)), PEERS["peer-1"], 1.0)
    assert node.member("x") is None and node.member("y") is None
    assert node.stats.drops["alive_invalid"] == 2


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x00", b"\xff\xff\xff", b"\x07\x05\x00", b"\x0c\x00\x00\x00\x00\x04",
     b"\x09\x81\xa4Algo\x00", b"\x04\x93\x01\x02\x03", bytes(range(256))],
)
def test_garbage_is_counted_and_dropped(garbage: bytes) -> None:
    node = make_node()
    node.receive_packet(garbage, PEERS["peer-1"], 1.0)
    assert node.packets_to_send() == []
    assert sum(node.stats.drops.values()) >= 1


def test_packets_before_start_are_dropped() -> None:
    node = Node(GossipConfig.lan(), "me", ME[0], ME[1], rng=random.Random(1))
    node.receive_packet(packet(Ping(1, "me")), PEERS["peer-1"], 0.0)
    assert node.stats.drops["not_started"] == 1


# -- what goes out ----------------------------------------------------------------------------


def test_crc_only_for_recipients_speaking_protocol_5() -> None:
    node = make_node()
    introduce(node, "peer-1")  # default Vsn: PMax 5
    introduce(node, "peer-2", vsn=VSN_PMAX4)
    node.receive_packet(packet(Ping(1, "me", source_node="peer-1")), PEERS["peer-1"], 1.0)
    node.receive_packet(packet(Ping(2, "me", source_node="peer-2")), PEERS["peer-2"], 1.0)
    first, second = node.packets_to_send()
    assert first[0][0] == MessageType.HAS_CRC
    assert second[0][0] != MessageType.HAS_CRC


def test_packets_stay_within_the_udp_buffer_even_with_many_broadcasts() -> None:
    node = make_node()
    many = {f"member-{i:04d}": bytes([198, 18, 1 + i // 250, 1 + i % 250]) for i in range(400)}
    for name, addr in many.items():
        node.receive_packet(packet(Alive(1, name, addr, 7946, b"m" * 200)), (addr, 7946), 0.0)
    packets = []
    for t in range(50):
        node.handle_timer(t * 0.2)
        packets += node.packets_to_send()
    assert packets
    assert max(len(data) for data, _ in packets) <= 1400


def test_encrypted_packets_stay_within_the_udp_buffer() -> None:
    from gossip.keyring import Keyring

    keyring = Keyring([bytes(range(32))])
    node = make_node(keyring=keyring)
    codec = wire.PacketCodec(keyring, False)
    for i in range(300):
        addr = bytes([198, 18, 2, i % 250 + 1])
        message = wire.encode_message(Alive(1, f"m{i}", addr, 7946, b"m" * 100))
        node.receive_packet(codec.encode([message], crc=False), (addr, 7946), 0.0)
    assert sum(node.stats.drops.values()) == 0
    packets = []
    for t in range(30):
        node.handle_timer(t * 0.2)
        packets += node.packets_to_send()
    assert packets and max(len(data) for data, _ in packets) <= 1400
    assert codec.decode(packets[0][0])  # and they decrypt


def test_user_broadcasts_are_gossiped() -> None:
    node = make_node()
    introduce(node, "peer-1")
    node.send_user_message(None, b"\x03hello serf", 1.0)
    run_until(node, 2.0)
    payloads = [m.payload for ms, _ in sent(node) for m in ms if isinstance(m, UserMsg)]
    assert b"\x03hello serf" in payloads


def test_reliable_user_message_uses_a_stream() -> None:
    node = make_node()
    introduce(node, "peer-1")
    node.send_user_message("peer-1", b"direct", 1.0, reliable=True)
    [open_stream] = node.stream_actions()
    assert isinstance(open_stream, OpenStream) and open_stream.addr == PEERS["peer-1"]
    node.stream_opened(open_stream.stream_id, 1.01)
    write, close = node.stream_actions()
    assert isinstance(write, StreamSend) and isinstance(close, CloseStream)
    assert wire.StreamDecoder().feed(write.data) == UserMsg(b"direct")


def test_user_message_to_unknown_member_raises() -> None:
    node = make_node()
    with pytest.raises(LookupError):
        node.send_user_message("nobody", b"x", 1.0)


def test_meta_update_is_announced_with_a_higher_incarnation() -> None:
    node = make_node()
    introduce(node, "peer-1")
    node.update_meta(b"\xffnew", 1.0)
    assert node.incarnation == 2
    assert node.member("me").meta == b"\xffnew"  # type: ignore[union-attr]
    announced = _gossiped_self_alive(node, 2.0)
    assert announced and announced[-1].meta == b"\xffnew" and announced[-1].incarnation == 2
    with pytest.raises(ValueError, match="512"):
        node.update_meta(b"x" * 513, 2.0)


# -- leaving ----------------------------------------------------------------------------------


def test_leave_broadcasts_dead_from_self_and_finishes_after_sending() -> None:
    node = make_node()
    introduce(node, "peer-1")
    node.leave(1.0)
    assert node.member_state("me") is MemberState.LEFT
    assert not node.left
    leaves = []
    t = 1.0
    while not node.left and t < 10:
        t += 0.2
        run_until(node, t)
        leaves += [m for ms, _ in sent(node) for m in ms if isinstance(m, Dead)]
    assert node.left
    assert t < 5.0  # done by transmits, not by the 5 s timeout
    assert set(leaves) == {Dead(1, "me", "me")}
    assert len(leaves) == 4  # retransmit limit: 4 x ceil(log10(2 + 1))


def test_leave_alone_finishes_at_once() -> None:
    node = make_node()
    node.leave(1.0)
    assert node.left


def test_no_refutation_while_leaving() -> None:
    node = make_node()
    introduce(node, "peer-1")
    node.leave(1.0)
    node.receive_packet(packet(alive("peer-1", 2), Suspect(1, "me", "peer-1")), PEERS["peer-1"], 1)
    assert node.stats.refutations == 0
    assert node.member_state("me") is MemberState.LEFT


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="probe_timeout"):
        dataclasses.replace(GossipConfig.lan(), probe_timeout=2.0)
    assert GossipConfig.lan().vsn == bytes([1, 5, 2, 2, 5, 5])
    assert GossipConfig.wan().probe_interval == 5.0
    assert GossipConfig.local().gossip_interval == 0.1
