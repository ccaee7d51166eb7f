"""The trio transport between our own nodes on 127.0.0.1: real sockets, real time, no mocks.

Every test binds port 0 (the service picks a port free for UDP and TCP), runs a fast profile
(`FAST` below) so failure detection and stream deadlines take a second or two, and is bounded
by `pytest.mark.timeout`.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial

import pytest
import trio

from gossip.config import GossipConfig
from gossip.events import MemberEvent, MemberEventKind, MemberState
from gossip.keyring import Keyring
from gossip.limits import DEFAULT_LIMITS
from gossip.messages import ErrResp
from gossip.transport import GossipService, JoinError
from gossip.wire import StreamDecoder
from tests.conftest import wait_until

LOOPBACK = "127.0.0.1"
# The local profile with quicker probes: a dead node is declared so in about 2 s. The LAN
# retransmit multiplier (4, not local's 2): with 2, a rumour is sent only twice in a cluster
# under 10, and one member in ~25 misses a join until the next push/pull, as in memberlist.
FAST = dataclasses.replace(
    GossipConfig.local(),
    probe_interval=0.5,
    probe_timeout=0.1,
    gossip_interval=0.05,
    retransmit_mult=4,
)


class Inbox:
    """A delegate that records user messages (the only hook these tests need)."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def node_meta(self, limit: int) -> bytes:
        return b""

    def notify_msg(self, payload: bytes) -> None:
        self.messages.append(payload)

    def get_broadcasts(self, overhead: int, limit: int) -> list[bytes]:
        return []

    def local_state(self, join: bool) -> bytes:
        return b""

    def merge_remote_state(self, buf: bytes, join: bool) -> None:
        pass


def states(svc: GossipService) -> dict[str, MemberState]:
    return {m.name: m.state for m in svc.members()}


def state_is(svc: GossipService, name: str, state: MemberState) -> bool:
    return states(svc).get(name) is state


def alive_names_are(svc: GossipService, names: set[str]) -> bool:
    return {n for n, st in states(svc).items() if st is MemberState.ALIVE} == names


def drain(svc: GossipService) -> list[MemberEvent]:
    events = []
    channel = svc.events()
    while True:
        try:
            events.append(channel.receive_nowait())
        except trio.WouldBlock:
            return events


@asynccontextmanager
async def cluster(
    count: int, config: GossipConfig = FAST, **kwargs: object
) -> AsyncIterator[list[GossipService]]:
    """`count` services; all but the first join the first."""
    async with AsyncExitStack() as stack:
        services = [
            await stack.enter_async_context(
                GossipService(config, f"n{i}", (LOOPBACK, 0), **kwargs)  # type: ignore[arg-type]
            )
            for i in range(count)
        ]
        for svc in services[1:]:
            assert await svc.join([services[0].address]) == 1
        names = {svc.name for svc in services}
        for svc in services:
            await wait_until(
                partial(alive_names_are, svc, names), 5, f"{svc.name} sees everyone alive"
            )
        yield services


@pytest.mark.timeout(20)
async def test_three_nodes_join_and_report_events() -> None:
    async with cluster(3) as (a, b, c):
        assert a.address[1] != 0
        events = drain(a)
        assert [(e.kind, e.name) for e in events if e.name == "n0"] == [
            (MemberEventKind.JOIN, "n0")
        ]
        assert {e.name for e in events if e.kind is MemberEventKind.JOIN} == {"n0", "n1", "n2"}
        joined = next(e for e in events if e.name == "n2")
        assert (joined.addr, joined.port) == (socket.inet_aton(LOOPBACK), c.address[1])
        assert a.stats.node.push_pulls >= 1
        b.update_tags({"role": "weavepy"})
        await wait_until(
            lambda: dict(next(m for m in c.members() if m.name == "n1").tags)
            == {"role": "weavepy"},
            5,
            "the new tags reach n2",
        )
        assert any(
            e.kind is MemberEventKind.UPDATE and e.name == "n1" for e in drain(c)
        ), "an update event"


@pytest.mark.timeout(20)
async def test_user_messages_broadcast_unreliable_and_reliable() -> None:
    inboxes = [Inbox(), Inbox(), Inbox()]
    async with AsyncExitStack() as stack:
        services = [
            await stack.enter_async_context(
                GossipService(FAST, f"u{i}", (LOOPBACK, 0), delegate=inbox)
            )
            for i, inbox in enumerate(inboxes)
        ]
        for svc in services[1:]:
            await svc.join([services[0].address])
        await wait_until(lambda: len(services[2].members()) == 3, 5, "u2 knows everyone")
        await wait_until(lambda: len(services[1].members()) == 3, 5, "u1 knows everyone")
        a, b, c = services
        a.send_user_message(b"to everyone")
        b.send_user_message(b"udp to u2", to="u2")
        c.send_user_message(b"tcp to u0", to="u0", reliable=True)
        await wait_until(
            lambda: all(b"to everyone" in inbox.messages for inbox in inboxes[1:]),
            5,
            "the broadcast reaches u1 and u2",
        )
        await wait_until(lambda: b"udp to u2" in inboxes[2].messages, 5, "the datagram arrives")
        await wait_until(lambda: b"tcp to u0" in inboxes[0].messages, 5, "the stream arrives")
        assert b"udp to u2" not in inboxes[0].messages
        big = bytes(range(256)) * 400  # 100 KiB: only a stream carries that
        a.send_user_message(big, to="u1", reliable=True)
        await wait_until(lambda: big in inboxes[1].messages, 5, "the big message arrives")
        with pytest.raises(LookupError):
            a.send_user_message(b"x", to="nobody")


@pytest.mark.timeout(20)
async def test_graceful_leave_is_seen_as_left() -> None:
    async with cluster(3) as (a, b, c):
        drain(a)
        assert await c.leave(timeout=2.0)
        for svc in (a, b):
            await wait_until(
                partial(state_is, svc, "n2", MemberState.LEFT), 5, f"{svc.name} sees n2 left"
            )
        assert any(e.kind is MemberEventKind.LEAVE and e.name == "n2" for e in drain(a))


@pytest.mark.timeout(20)
async def test_crashed_node_is_declared_failed() -> None:
    async with cluster(3) as (a, b, c):
        drain(a)
        async with GossipService(FAST, "victim", (LOOPBACK, 0)) as victim:
            await victim.join([a.address])
            await wait_until(lambda: "victim" in states(c), 5, "n2 learns of the victim")
        # Leaving the block without leave() is a crash: the sockets are simply gone.
        for svc in (a, b, c):
            await wait_until(
                partial(state_is, svc, "victim", MemberState.DEAD),
                10,
                f"{svc.name} declares the victim failed",
            )
        assert any(e.kind is MemberEventKind.FAILED and e.name == "victim" for e in drain(a))


@pytest.mark.timeout(20)
async def test_encrypted_cluster_rejects_a_node_with_another_key() -> None:
    key, other = bytes(range(32)), bytes(range(1, 33))
    async with cluster(2, keyring=Keyring([key])) as (a, b):
        async with GossipService(FAST, "stranger", (LOOPBACK, 0), keyring=Keyring([other])) as s:
            with pytest.raises(JoinError) as failure:
                await s.join([a.address])
            assert not failure.value.results[0].ok
            # The stranger's encrypted push/pull did not decrypt on our side: counted.
            assert a.stats.drops()["stream_decrypt"] == 1
            # And its datagrams do not decrypt either.
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                await raw.sendto(Keyring([other]).encrypt_packet(b"\x08hello"), a.address)
            await wait_until(lambda: a.stats.drops()["decrypt"] == 1, 2, "a counts the packet")
        assert "stranger" not in states(a) and "stranger" not in states(b)


@pytest.mark.timeout(20)
async def test_garbage_udp_is_counted_and_ignored() -> None:
    inbox = Inbox()
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(GossipService(FAST, "a", (LOOPBACK, 0), delegate=inbox))
        b = await stack.enter_async_context(GossipService(FAST, "b", (LOOPBACK, 0)))
        await b.join([a.address])
        garbage = [
            b"",  # empty datagram
            b"\xee\x01\x02",  # unknown message type
            b"\x00\x93\x01\x02",  # a ping whose body is an array of junk
            b"\x07\x05\x00\x01",  # a compound that lies about its parts
            b"\x0c\x00\x00\x00\x00\x00",  # a CRC that does not match
            b"\x09\x82\xa4Algo\x00\xa3Buf\xc4\x03abc",  # compressed garbage
            bytes(range(256)) * 200,  # a 51 KiB datagram of noise
        ]
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            for datagram in garbage:
                await raw.sendto(datagram, a.address)
        await wait_until(
            lambda: sum(a.stats.drops().values()) >= len(garbage) - 1, 2, "the drops are counted"
        )
        drops = a.stats.drops()
        assert drops["unknown_type"] >= 1
        assert drops["crc"] == 1
        # Still serving: a user message from b gets through.
        b.send_user_message(b"still here", to="a")
        await wait_until(lambda: b"still here" in inbox.messages, 2, "a still works")
        assert states(b)["a"] is MemberState.ALIVE


@pytest.mark.timeout(20)
async def test_garbage_tcp_is_counted_answered_and_closed() -> None:
    async with GossipService(FAST, "a", (LOOPBACK, 0)) as a:
        stream = await trio.open_tcp_stream(*a.address)
        async with stream:
            await stream.send_all(b"\xee" + b"junk" * 10)
            reply = b""
            with trio.fail_after(3):
                while chunk := await stream.receive_some(4096):
                    reply += chunk
        # memberlist answers a bad stream with an errMsg (type 13) and hangs up.
        answer = StreamDecoder(None, DEFAULT_LIMITS).feed(reply)
        assert isinstance(answer, ErrResp) and "unknown_type" in answer.error
        assert a.stats.drops()["stream_unknown_type"] == 1
        assert states(a) == {"a": MemberState.ALIVE}


@pytest.mark.timeout(30)
async def test_silent_tcp_peer_is_cut_by_the_stream_deadline() -> None:
    """A peer that connects and never speaks is hung up on by the Node's stream deadline, not
    by the transport's backstop, and its slot is freed. When exactly the deadline falls is the
    sans-IO core's business, checked in virtual time by test_node_streams'
    test_inbound_stream_that_stalls_is_closed_at_the_deadline."""
    config = dataclasses.replace(FAST, tcp_timeout=1.0)
    async with GossipService(config, "a", (LOOPBACK, 0)) as a:
        stream = await trio.open_tcp_stream(*a.address)
        async with stream:
            received = b""
            with trio.fail_after(20):  # bounds the test; EOF is the behaviour under test
                while chunk := await stream.receive_some(4096):
                    received += chunk
        assert received == b""  # nothing was said to a peer that said nothing
        assert a.transport_stats["stream_backstop"] == 0
        async with GossipService(config, "b", (LOOPBACK, 0)) as b:
            assert await b.join([a.address]) == 1


@pytest.mark.timeout(30)
async def test_inbound_streams_are_capped() -> None:
    config = dataclasses.replace(FAST, tcp_timeout=20.0)
    async with GossipService(config, "a", (LOOPBACK, 0)) as a:
        cap = 128
        extra = 5
        clients: list[trio.SocketStream] = []
        try:
            for _ in range(cap + extra):
                clients.append(await trio.open_tcp_stream(*a.address))
            await wait_until(
                lambda: a.transport_stats["inbound_refused"] == extra, 5, "the extras are refused"
            )
            # The refused ones see EOF at once; the first `cap` are still held open.
            closed = 0
            for client in clients:
                with trio.move_on_after(0.01):
                    if await client.receive_some(10) == b"":
                        closed += 1
            assert closed == extra
        finally:
            for client in clients:
                await client.aclose()
        # Once they are gone, a real peer is served again.
        async with GossipService(config, "b", (LOOPBACK, 0)) as b:
            assert await b.join([a.address]) == 1


@pytest.mark.timeout(20)
async def test_join_failures_are_reported() -> None:
    with socket.socket() as unused:
        unused.bind((LOOPBACK, 0))
        closed_port = unused.getsockname()[1]
    async with GossipService(FAST, "a", (LOOPBACK, 0)) as a:
        with pytest.raises(JoinError) as failure:
            await a.join([f"{LOOPBACK}:{closed_port}"])
        assert [r.ok for r in failure.value.results] == [False]
        assert a.stats.node.push_pull_failures == 1


async def test_port_zero_binds_udp_and_tcp_on_the_same_port() -> None:
    async with GossipService(FAST, "a", (LOOPBACK, 0)) as a:
        host, port = a.address
        assert host == LOOPBACK and port > 0
        assert a.advertise_address == a.address
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, pytest.raises(OSError):
            udp.bind((LOOPBACK, port))
        with socket.socket() as tcp, pytest.raises(OSError):
            tcp.bind((LOOPBACK, port))


async def test_bad_bind_and_advertise_addresses_are_refused() -> None:
    with pytest.raises(ValueError, match="must be an IP address"):
        async with GossipService(FAST, "a", ("localhost", 0)):
            pass
    with pytest.raises(ValueError, match="specific IP address"):
        async with GossipService(FAST, "a", ("0.0.0.0", 0)):
            pass
