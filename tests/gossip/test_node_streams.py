"""The Node's stream side: join, push/pull, TCP ping, version checks, deadlines, bad input.

Two real Nodes are wired together by hand (`Wire` below moves their stream actions across);
a peer the test plays itself uses the real codec. Nothing is mocked.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip import wire
from gossip.config import GossipConfig
from gossip.events import CloseStream, MemberEventKind, MemberState, OpenStream, StreamSend
from gossip.messages import (
    Ack,
    ErrResp,
    NodeStateCode,
    Ping,
    PushNodeState,
    PushPull,
    StreamMessage,
    UserMsg,
)
from gossip.node import Node

A = (bytes([198, 18, 0, 1]), 7946)
B = (bytes([198, 18, 0, 2]), 7946)
VSN = GossipConfig.lan().vsn


class Recorder:
    """A delegate that keeps what it is given."""

    def __init__(self, state: bytes = b"") -> None:
        self.state = state
        self.messages: list[bytes] = []
        self.merged: list[tuple[bytes, bool]] = []

    def node_meta(self, limit: int) -> bytes:
        return b"\xff\x81\xa4role\xa7weavepy"

    def notify_msg(self, payload: bytes) -> None:
        self.messages.append(payload)

    def get_broadcasts(self, overhead: int, limit: int) -> list[bytes]:
        return []

    def local_state(self, join: bool) -> bytes:
        return self.state

    def merge_remote_state(self, buf: bytes, join: bool) -> None:
        self.merged.append((buf, join))


def make(name: str, addr: tuple[bytes, int], delegate: Recorder | None = None) -> Node:
    node = Node(
        GossipConfig.lan(), name, addr[0], addr[1], rng=random.Random(name), delegate=delegate
    )
    node.start(0.0)
    return node


class Wire:
    """Carries stream actions between two nodes, as a transport would, with zero delay."""

    def __init__(self, *nodes: Node) -> None:
        self.by_addr = {(n.addr, n.port): n for n in nodes}
        self.links: dict[tuple[int, int], tuple[Node, int]] = {}  # (id(node), sid) -> far end
        self.next_inbound = 0

    def pump(self, now: float) -> None:
        moved = True
        while moved:
            moved = False
            for node in list(self.by_addr.values()):
                for action in node.stream_actions():
                    moved = True
                    self._carry(node, action, now)

    def _carry(self, node: Node, action: object, now: float) -> None:
        if isinstance(action, OpenStream):
            peer = self.by_addr.get(action.addr)
            if peer is None:
                node.stream_failed(action.stream_id, now)
                return
            self.next_inbound -= 1
            self.links[(id(node), action.stream_id)] = (peer, self.next_inbound)
            self.links[(id(peer), self.next_inbound)] = (node, action.stream_id)
            peer.accept_stream(self.next_inbound, (node.addr, node.port), now)
            node.stream_opened(action.stream_id, now)
        elif isinstance(action, StreamSend):
            far = self.links.get((id(node), action.stream_id))
            if far is not None:
                far[0].stream_data(far[1], action.data, now)
        elif isinstance(action, CloseStream):
            far = self.links.pop((id(node), action.stream_id), None)
            if far is not None:
                self.links.pop((id(far[0]), far[1]), None)
                far[0].stream_closed(far[1], now)


def test_join_exchanges_state_both_ways() -> None:
    a_delegate, b_delegate = Recorder(b"a-state"), Recorder(b"b-state")
    a = make("a", A, delegate=a_delegate)
    b = make("b", B, delegate=b_delegate)
    link = Wire(a, b)
    b.join([A], 0.1)
    link.pump(0.1)
    assert [(r.ok, r.nodes) for r in b.join_results()] == [(True, 1)]
    assert a.member_state("b") is MemberState.ALIVE
    assert b.member_state("a") is MemberState.ALIVE
    assert a_delegate.merged == [(b"b-state", True)]
    assert b_delegate.merged == [(b"a-state", True)]
    joined = [e for e in b.events() if e.kind is MemberEventKind.JOIN and e.name == "a"]
    assert joined and joined[0].tags == {"role": "weavepy"}
    assert b.member("a").meta == a_delegate.node_meta(512)  # type: ignore[union-attr]


def test_join_to_nobody_fails_with_a_result() -> None:
    b = make("b", B)
    link = Wire(b)
    b.join([A], 0.1)
    link.pump(0.1)
    [result] = b.join_results()
    assert not result.ok and result.addr == A
    assert b.stats.push_pull_failures == 1


def test_join_that_never_answers_times_out() -> None:
    b = make("b", B)
    b.join([A], 0.1)
    [open_stream] = b.stream_actions()
    assert isinstance(open_stream, OpenStream)
    while (t := b.next_deadline()) is not None and t < 10.1:
        b.handle_timer(t)
    assert b.join_results() == []
    b.handle_timer(10.1)  # tcp_timeout after the open
    [result] = b.join_results()
    assert not result.ok and "timed out" in result.error
    assert CloseStream(open_stream.stream_id) in b.stream_actions()


def _push_pull_from(peer: str, vsn: bytes, *, join: bool = True) -> bytes:
    state = PushNodeState(peer, B[0], B[1], b"", 1, NodeStateCode.ALIVE, vsn)
    return wire.encode_stream(PushPull(join, (state,)), keyring=None, compression=True)


def _serve(node: Node, data: bytes, now: float = 1.0) -> list[StreamMessage]:
    node.accept_stream(-1, B, now)
    node.stream_data(-1, data, now)
    replies = []
    for action in node.stream_actions():
        if isinstance(action, StreamSend):
            message = wire.StreamDecoder().feed(action.data)
            assert message is not None
            replies.append(message)
    return replies


def test_inbound_push_pull_is_answered_then_merged() -> None:
    a = make("a", A)
    [reply] = _serve(a, _push_pull_from("b", VSN))
    assert isinstance(reply, PushPull) and reply.join
    assert [n.name for n in reply.nodes] == ["a"]
    assert a.member_state("b") is MemberState.ALIVE


@pytest.mark.parametrize(
    ("vsn", "why"),
    [
        (bytes([1, 5, 2, 0, 0, 0]), "delegate protocol version (0) is incompatible"),
        (bytes([1, 5, 9, 2, 5, 5]), "protocol version (9) is incompatible"),
        (bytes([3, 5, 3, 2, 5, 5]), "protocol version (2) is incompatible"),  # ours is then too old
    ],
)
def test_incompatible_versions_are_refused(vsn: bytes, why: str) -> None:
    a = make("a", A)
    replies = _serve(a, _push_pull_from("b", vsn))
    assert isinstance(replies[0], PushPull)  # like memberlist: we answer, then refuse to merge
    assert a.member("b") is None
    assert a.stats.drops["push_pull_incompatible"] == 1
    # The joiner's side: its join fails with the reason.
    b = Node(GossipConfig.lan(), "b", B[0], B[1], rng=random.Random(2))
    b.start(0.0)
    b.join([A], 0.0)
    [open_stream] = b.stream_actions()
    b.stream_opened(open_stream.stream_id, 0.0)
    b.stream_actions()
    own = PushNodeState("a", A[0], A[1], b"", 1, NodeStateCode.ALIVE, vsn)
    answer = wire.encode_stream(PushPull(True, (own,)), keyring=None, compression=False)
    b.stream_data(open_stream.stream_id, answer, 0.1)
    [result] = b.join_results()
    assert not result.ok and why in result.error
    assert b.member("a") is None


def test_remote_dead_in_push_pull_is_only_suspected() -> None:
    a = make("a", A)
    alive = PushNodeState("c", bytes([198, 18, 0, 3]), 7946, b"", 1, NodeStateCode.ALIVE, VSN)
    _serve(a, wire.encode_stream(PushPull(False, (alive,)), keyring=None, compression=False))
    dead = PushNodeState("c", bytes([198, 18, 0, 3]), 7946, b"", 1, NodeStateCode.DEAD, VSN)
    data = wire.encode_stream(PushPull(False, (dead,)), keyring=None, compression=False)
    a.accept_stream(-2, B, 2.0)
    a.stream_data(-2, data, 2.0)
    assert a.member_state("c") is MemberState.SUSPECT


def test_left_in_push_pull_is_a_leave() -> None:
    a = make("a", A)
    alive = PushNodeState("c", bytes([198, 18, 0, 3]), 7946, b"", 1, NodeStateCode.ALIVE, VSN)
    left = PushNodeState("c", bytes([198, 18, 0, 3]), 7946, b"", 1, NodeStateCode.LEFT, VSN)
    _serve(a, wire.encode_stream(PushPull(False, (alive, left)), keyring=None, compression=False))
    assert a.member_state("c") is MemberState.LEFT


def test_tcp_ping_is_acked_on_the_stream() -> None:
    a = make("a", A)
    ping = wire.encode_stream(Ping(77, "a"), keyring=None, compression=False)
    assert _serve(a, ping) == [Ack(77)]
    assert CloseStream(-1) in a.stream_actions() or a.stream_actions() == []


def test_tcp_ping_for_someone_else_is_not_acked() -> None:
    a = make("a", A)
    ping = wire.encode_stream(Ping(77, "zed"), keyring=None, compression=False)
    assert _serve(a, ping) == []
    assert a.stats.drops["stream_ping_wrong_node"] == 1


def test_reliable_user_message_reaches_the_delegate() -> None:
    recorder = Recorder()
    a = make("a", A, delegate=recorder)
    _serve(a, wire.encode_stream(UserMsg(b"\x01serf-join"), keyring=None, compression=True))
    assert recorder.messages == [b"\x01serf-join"]


def test_a_stream_split_in_tiny_pieces_still_decodes() -> None:
    a = make("a", A)
    data = _push_pull_from("b", VSN)
    a.accept_stream(-1, B, 1.0)
    for i in range(len(data)):
        a.stream_data(-1, data[i : i + 1], 1.0)
    assert a.member_state("b") is MemberState.ALIVE


def test_garbage_stream_gets_an_error_reply_and_is_closed() -> None:
    a = make("a", A)
    replies = _serve(a, b"\x63garbage")
    assert len(replies) == 1 and isinstance(replies[0], ErrResp)
    assert sum(a.stats.drops.values()) == 1


def test_inbound_stream_that_stalls_is_closed_at_the_deadline() -> None:
    a = make("a", A)
    a.accept_stream(-1, B, 1.0)
    a.stream_data(-1, _push_pull_from("b", VSN)[:10], 1.0)
    while (t := a.next_deadline()) is not None and t <= 11.0:
        a.handle_timer(t)
    assert CloseStream(-1) in a.stream_actions()


def test_stream_ids_in_use_are_refused() -> None:
    a = make("a", A)
    a.accept_stream(-1, B, 1.0)
    with pytest.raises(ValueError, match="in use"):
        a.accept_stream(-1, B, 1.0)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_packets_never_raise(data: bytes) -> None:
    a = make("a", A)
    a.receive_packet(data, B, 1.0)
    a.receive_packet(b"\x0c" + data, B, 1.0)  # behind a (wrong) CRC header
    a.receive_packet(b"\x07\x02\x00\x01\x00\x01" + data, B, 1.0)  # inside a compound


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_random_streams_never_raise(chunks: list[bytes]) -> None:
    a = make("a", A)
    a.accept_stream(-1, B, 1.0)
    for chunk in chunks:
        a.stream_data(-1, chunk, 1.0)
    a.stream_closed(-1, 2.0)
