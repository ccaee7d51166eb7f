"""A virtual-time simulator: thousands of gossip `Node`s over a virtual network.

This module owns virtual time and the virtual network, and nothing of the protocol: it drives
`gossip.node.Node` through its public sans-IO API only (packets in and out, stream requests,
timers, events), so whatever it shows is what the real node does.

Theory of operation: one heap of timed deliveries (a packet, a stream event, a node's next
timer, a scripted action) is popped in time order; each pop sets `now` and calls one node; what
the node then wants to send is turned into new timed deliveries:

* Packets cross a `Link` (loss probability, one-way delay plus uniform jitter). Each directed
  pair may have its own link; everything else uses the default one.
* Streams are reliable and ordered: connecting takes one delay to the acceptor and a round trip
  back to the opener; data arrives in order after one delay. Connecting to an address where no
  node runs fails after a round trip (a reset); across a partition nothing arrives at all, so
  the core's own deadline has to fire.
* A partition is a set of groups; nodes in different groups cannot exchange anything.
* A killed node's sockets close (peers' streams see EOF) and it stops running; a restarted node
  is a fresh `Node` with the same name and address (a new process), optionally rejoining.
* A stalled node (a blocked event loop) runs nothing until the stall ends; everything that
  reached it meanwhile waits. When it wakes it first runs its overdue timers, then the queued
  inputs in arrival order, all at the wake-up time: the pessimistic order, in which a queued ack
  does not save a probe whose deadline passed during the stall.
* A lagging node reads its input late but keeps its timers on time (`set_inbound_lag`).

Everything random (loss, jitter, each node's own rng) derives from one seed, so a run replays.
"""

from __future__ import annotations

import gc
import heapq
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

from gossip.config import GossipConfig
from gossip.events import (
    Address,
    CloseStream,
    JoinResult,
    MemberEvent,
    MemberState,
    OpenStream,
    StreamSend,
)
from gossip.keyring import Keyring
from gossip.messages import NodeStateCode, PushNodeState
from gossip.node import Node

logger = logging.getLogger(__name__)

GOSSIP_PORT = 7946

# Kinds of heap entries.
_PACKET = 0
_TIMER = 1
_STREAM_ACCEPT = 2
_STREAM_OPENED = 3
_STREAM_DATA = 4
_STREAM_CLOSED = 5
_STREAM_FAILED = 6
_WAKE = 7
_ACTION = 8


@dataclass(frozen=True, slots=True)
class Link:
    """One direction of a virtual link."""

    loss: float = 0.0
    delay: float = 0.0005  # one-way, seconds
    jitter: float = 0.0  # extra uniform delay in [0, jitter)


@dataclass(slots=True)
class SimStats:
    packets_sent: int = 0
    packets_delivered: int = 0
    packets_lost: int = 0  # to link loss
    packets_blocked: int = 0  # to partitions, or to a stopped node
    bytes_sent: int = 0
    streams_opened: int = 0


@dataclass(eq=False, slots=True)
class SimNode:
    """A node's seat in the simulation: its address, its current `Node`, its condition."""

    name: str
    address: Address
    node: Node
    running: bool = True
    stalled_until: float = 0.0
    backlog: list[tuple[int, object]] = field(default_factory=list)
    timer_at: float | None = None
    events: list[MemberEvent] = field(default_factory=list)
    join_results: list[JoinResult] = field(default_factory=list)
    stop_when_left: bool = False
    inbound_lag: float = 0.0  # see Simulation.set_inbound_lag
    next_inbound_stream: int = 0  # inbound stream ids are negative


@dataclass(slots=True)
class _Connection:
    """One side of a simulated TCP connection: where its bytes go."""

    peer: SimNode
    peer_node: Node  # the process at the far end when it was opened
    peer_stream: int
    last_delivery: float = 0.0


class Simulation:
    """Many nodes, one virtual clock; see the module docstring."""

    def __init__(
        self,
        config: GossipConfig | None = None,
        *,
        seed: int = 0,
        link: Link | None = None,
        encrypt: bool = False,
        compression: bool = False,
        record_events: bool = True,
    ) -> None:
        self.config = config or GossipConfig.lan()
        self.rng = random.Random(seed)
        self.default_link = link or Link()
        self.links: dict[tuple[str, str], Link] = {}
        self.keyring = Keyring([self.rng.randbytes(32)]) if encrypt else None
        self.compression = compression
        self.record_events = record_events
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self.by_address: dict[Address, SimNode] = {}
        self.stats = SimStats()
        self.event_hooks: list[Callable[[SimNode, MemberEvent], None]] = []
        self._groups: dict[str, int] = {}
        # (time, tiebreak, kind, seat or action, the Node it was meant for, argument)
        self._heap: list[tuple[float, int, int, object, Node | None, object]] = []
        self._counter = 0
        self._connections: dict[tuple[int, int], _Connection] = {}  # (id(node), stream id)

    # -- building the cluster ----------------------------------------------------------------

    def add_node(
        self,
        name: str | None = None,
        *,
        config: GossipConfig | None = None,
        meta: bytes = b"",
        join: Sequence[str] = (),
        start: bool = True,
    ) -> SimNode:
        """A new node at the next free address; started (and joining `join`) unless told not."""
        index = len(self.nodes) + 1
        if index >= 1 << 16:
            raise ValueError("the simulator hands out at most 65535 addresses")
        name = name or f"node-{index}"
        if name in self.nodes:
            raise ValueError(f"a node named {name!r} exists")
        address = (bytes([198, 18, index >> 8, index & 0xFF]), GOSSIP_PORT)
        seat = SimNode(name, address, self._make_node(name, address, config, meta))
        self.nodes[name] = seat
        self.by_address[address] = seat
        if start:
            seat.node.start(self.now)
            if join:
                seat.node.join([self.nodes[j].address for j in join], self.now)
            self._flush(seat)
        return seat

    def add_converged_cluster(
        self, count: int, *, config: GossipConfig | None = None, prefix: str = "node-"
    ) -> list[SimNode]:
        """`count` started nodes that already know each other (via `Node.seed_members`), as
        if the cluster had formed long ago: the cheap way to a large converged cluster."""
        collecting = gc.isenabled()
        gc.disable()  # count**2 long-lived records: generational GC would rescan them all
        try:
            return self._add_converged_cluster(count, config, prefix)
        finally:
            if collecting:
                gc.enable()

    def _add_converged_cluster(
        self, count: int, config: GossipConfig | None, prefix: str
    ) -> list[SimNode]:
        seats = [
            self.add_node(f"{prefix}{len(self.nodes) + 1}", config=config)
            for _ in range(count)
        ]
        config = config or self.config
        entries = [
            PushNodeState(
                name=seat.name,
                addr=seat.address[0],
                port=seat.address[1],
                meta=b"",
                incarnation=1,
                state=NodeStateCode.ALIVE,
                vsn=config.vsn,
            )
            for seat in seats
        ]
        for seat in seats:
            seat.node.seed_members(entries, self.now)
            self._flush(seat)
        return seats

    def _make_node(
        self, name: str, address: Address, config: GossipConfig | None, meta: bytes
    ) -> Node:
        return Node(
            config or self.config,
            name,
            address[0],
            address[1],
            meta=meta,
            keyring=self.keyring,
            rng=random.Random(self.rng.getrandbits(64)),
            compression=self.compression,
        )

    # -- scripted faults ---------------------------------------------------------------------

    def kill(self, name: str) -> None:
        """Stop a node abruptly: no leave, its streams reset."""
        seat = self.nodes[name]
        if not seat.running:
            return
        seat.running = False
        seat.backlog.clear()
        dead = id(seat.node)
        for key, connection in list(self._connections.items()):
            if key[0] == dead:
                del self._connections[key]
                at = self._arrival(seat, connection.peer)
                self._push(
                    at, _STREAM_CLOSED, connection.peer, connection.peer_node,
                    connection.peer_stream,
                )

    def restart(self, name: str, *, join: Sequence[str] = ()) -> SimNode:
        """Run a fresh process (a new `Node`) in the seat of `name`, optionally joining."""
        seat = self.nodes[name]
        self.kill(name)
        seat.node = self._make_node(name, seat.address, None, b"")
        seat.running = True
        seat.stalled_until = 0.0
        seat.timer_at = None
        seat.node.start(self.now)
        if join:
            seat.node.join([self.nodes[j].address for j in join], self.now)
        self._flush(seat)
        return seat

    def leave(self, name: str, *, stop: bool = True) -> None:
        """Gracefully leave; with `stop`, the node stops once its leave has gone out."""
        seat = self.nodes[name]
        seat.stop_when_left = stop
        seat.node.leave(self.now)
        self._flush(seat)

    def partition(self, *groups: Iterable[str]) -> None:
        """Split the network: nodes talk only within their group (unlisted nodes form one)."""
        self._groups = {name: index for index, group in enumerate(groups, 1) for name in group}

    def heal(self) -> None:
        self._groups = {}

    def stall(self, name: str, duration: float) -> None:
        """Block `name`'s event loop for `duration` seconds from now."""
        seat = self.nodes[name]
        until = self.now + duration
        if until > seat.stalled_until:
            seat.stalled_until = until
            self._push(until, _WAKE, seat, seat.node, None)

    def make_slow(
        self, name: str, *, stall: float, every: float, start: float | None = None
    ) -> None:
        """Stall `name` for `stall` seconds every `every` seconds (a starved event loop)."""
        if not 0 < stall < every:
            raise ValueError("need 0 < stall < every")

        def stall_again(sim: Simulation) -> None:
            if sim.nodes[name].running:
                sim.stall(name, stall)
            sim.at(sim.now + every, stall_again)

        self.at(self.now if start is None else start, stall_again)

    def set_inbound_lag(self, name: str, lag: float) -> None:
        """Make `name` read everything that reaches it `lag` seconds late while its timers
        still fire on time: a receive path that has fallen behind (a backed-up socket buffer,
        a starved reader task), the "slow message processing" Lifeguard was built for."""
        if lag < 0:
            raise ValueError("lag must not be negative")
        self.nodes[name].inbound_lag = lag

    def at(self, when: float, action: Callable[[Simulation], None]) -> None:
        """Run `action(sim)` at virtual time `when`."""
        self._push(max(when, self.now), _ACTION, action, None, None)

    # -- running -----------------------------------------------------------------------------

    def run_until(self, when: float) -> None:
        heap = self._heap
        pop = heapq.heappop
        dispatch = self._dispatch
        while heap and heap[0][0] <= when:
            at, _, kind, seat, node, arg = pop(heap)
            self.now = at
            if kind == _ACTION:
                seat(self)  # type: ignore[operator]
            else:
                dispatch(kind, seat, node, arg)  # type: ignore[arg-type]
        self.now = max(self.now, when)

    def run_for(self, duration: float) -> None:
        self.run_until(self.now + duration)

    def run_until_true(
        self, condition: Callable[[], bool], *, timeout: float, step: float = 0.1
    ) -> bool:
        """Advance in `step`s until `condition()` holds (True) or `timeout` passes (False)."""
        deadline = self.now + timeout
        while not condition():
            if self.now >= deadline:
                return False
            self.run_until(min(self.now + step, deadline))
        return True

    # -- observing ---------------------------------------------------------------------------

    def running(self) -> list[SimNode]:
        return [seat for seat in self.nodes.values() if seat.running]

    def views_agree(self, names: Iterable[str], state: MemberState) -> bool:
        """True if every running node sees every one of `names` in `state`."""
        names = list(names)
        for seat in self.nodes.values():
            if not seat.running:
                continue
            node = seat.node
            for name in names:
                if name != seat.name and node.member_state(name) is not state:
                    return False
        return True

    def converged(self) -> bool:
        """Every running node sees exactly the running nodes as alive."""
        live = [seat.name for seat in self.nodes.values() if seat.running]
        alive = MemberState.ALIVE
        for seat in self.nodes.values():
            if not seat.running:
                continue
            if seat.node.count_members(alive) != len(live):
                return False
            if not all(seat.node.member_state(name) is alive for name in live):
                return False
        return True

    # -- the machinery -----------------------------------------------------------------------

    def _push(self, at: float, kind: int, seat: object, node: Node | None, arg: object) -> None:
        self._counter += 1
        heapq.heappush(self._heap, (at, self._counter, kind, seat, node, arg))

    def _link(self, source: SimNode, target: SimNode) -> Link:
        if self.links:
            return self.links.get((source.name, target.name), self.default_link)
        return self.default_link

    def _arrival(self, source: SimNode, target: SimNode) -> float:
        """When something sent now from `source` is handled by `target` (streams: no jitter)."""
        return self.now + self._link(source, target).delay + target.inbound_lag

    def _connected(self, source: SimNode, target: SimNode) -> bool:
        groups = self._groups
        return not groups or groups.get(source.name, 0) == groups.get(target.name, 0)

    def _dispatch(self, kind: int, seat: SimNode, node: Node | None, arg: object) -> None:
        if kind == _TIMER:
            self._timer(seat, arg)  # type: ignore[arg-type]
            return
        if kind == _WAKE:
            self._wake(seat, node)  # type: ignore[arg-type]
            return
        if kind == _PACKET:
            node = seat.node  # whoever runs at the address now gets the packet
        if not seat.running or seat.node is not node:
            if kind == _PACKET:
                self.stats.packets_blocked += 1
            return
        if self.now < seat.stalled_until:
            seat.backlog.append((kind, arg))
            return
        self._handle_input(seat.node, kind, arg)
        self._flush(seat)

    def _timer(self, seat: SimNode, at: float) -> None:
        if seat.timer_at != at:
            return  # superseded by an earlier timer entry
        seat.timer_at = None
        if not seat.running or self.now < seat.stalled_until:
            return  # a stalled node runs its timers when it wakes
        seat.node.handle_timer(self.now)
        self._flush(seat)

    def _wake(self, seat: SimNode, node: Node) -> None:
        if not seat.running or seat.node is not node or self.now < seat.stalled_until:
            return
        node.handle_timer(self.now)
        backlog, seat.backlog = seat.backlog, []
        for kind, arg in backlog:
            self._handle_input(node, kind, arg)
        self._flush(seat)

    def _handle_input(self, node: Node, kind: int, arg: object) -> None:
        now = self.now
        if kind == _PACKET:
            packet = cast(tuple[bytes, Address], arg)
            self.stats.packets_delivered += 1
            node.receive_packet(packet[0], packet[1], now)
        elif kind == _STREAM_DATA:
            chunk = cast(tuple[int, bytes], arg)
            node.stream_data(chunk[0], chunk[1], now)
        elif kind == _STREAM_ACCEPT:
            accept = cast(tuple[int, Address], arg)
            node.accept_stream(accept[0], accept[1], now)
        elif kind == _STREAM_OPENED:
            node.stream_opened(arg, now)  # type: ignore[arg-type]
        elif kind == _STREAM_CLOSED:
            self._connections.pop((id(node), arg), None)  # type: ignore[arg-type]
            node.stream_closed(arg, now)  # type: ignore[arg-type]
        elif kind == _STREAM_FAILED:
            self._connections.pop((id(node), arg), None)  # type: ignore[arg-type]
            node.stream_failed(arg, now)  # type: ignore[arg-type]

    def _flush(self, seat: SimNode) -> None:
        """Carry out everything the node asked for, and re-arm its timer."""
        node = seat.node
        now = self.now
        stats = self.stats
        for data, address in node.packets_to_send():
            stats.packets_sent += 1
            stats.bytes_sent += len(data)
            target = self.by_address.get(address)
            if target is None or not target.running or not self._connected(seat, target):
                stats.packets_blocked += 1
                continue
            link = self._link(seat, target)
            if link.loss and self.rng.random() < link.loss:
                stats.packets_lost += 1
                continue
            delay = link.delay + target.inbound_lag
            if link.jitter:
                delay += self.rng.random() * link.jitter
            self._push(now + delay, _PACKET, target, None, (data, seat.address))
        for action in node.stream_actions():
            if isinstance(action, StreamSend):
                self._stream_send(seat, node, action.stream_id, action.data)
            elif isinstance(action, OpenStream):
                self._stream_open(seat, node, action.stream_id, action.addr)
            elif isinstance(action, CloseStream):
                self._stream_close(seat, node, action.stream_id)
        events = node.events()
        if events:
            if self.record_events:
                seat.events.extend(events)
            for hook in self.event_hooks:
                for event in events:
                    hook(seat, event)
        seat.join_results.extend(node.join_results())
        if seat.stop_when_left and node.left:
            self.kill(seat.name)
            return
        deadline = node.next_deadline()
        if deadline is not None and (seat.timer_at is None or deadline < seat.timer_at):
            seat.timer_at = deadline
            self._push(max(deadline, now), _TIMER, seat, None, deadline)

    def _stream_open(self, seat: SimNode, node: Node, stream_id: int, address: Address) -> None:
        self.stats.streams_opened += 1
        target = self.by_address.get(address)
        if target is None or not self._connected(seat, target):
            return  # the SYNs vanish: the core's deadline will fire
        there = self._arrival(seat, target)
        back = there + self._arrival(target, seat) - self.now  # a round trip
        if not target.running:
            self._push(back, _STREAM_FAILED, seat, node, stream_id)
            return
        target.next_inbound_stream -= 1
        inbound = target.next_inbound_stream
        self._connections[(id(node), stream_id)] = _Connection(target, target.node, inbound)
        self._connections[(id(target.node), inbound)] = _Connection(seat, node, stream_id)
        self._push(there, _STREAM_ACCEPT, target, target.node, (inbound, seat.address))
        self._push(back, _STREAM_OPENED, seat, node, stream_id)

    def _stream_send(self, seat: SimNode, node: Node, stream_id: int, data: bytes) -> None:
        connection = self._connections.get((id(node), stream_id))
        if connection is None or not self._connected(seat, connection.peer):
            return
        at = max(self._arrival(seat, connection.peer), connection.last_delivery)
        connection.last_delivery = at
        self._push(
            at, _STREAM_DATA, connection.peer, connection.peer_node,
            (connection.peer_stream, data),
        )

    def _stream_close(self, seat: SimNode, node: Node, stream_id: int) -> None:
        connection = self._connections.pop((id(node), stream_id), None)
        if connection is None:
            return
        at = max(self._arrival(seat, connection.peer), connection.last_delivery)
        self._push(
            at, _STREAM_CLOSED, connection.peer, connection.peer_node, connection.peer_stream
        )

