"""The sans-IO gossip node: SWIM failure detection with Lifeguard, memberlist-compatible.

This module owns the protocol's *activity*: probing, indirect probes, the TCP fallback ping,
gossip, push/pull, streams and their deadlines. The member table and the rumour rules live in
`gossip.state`; bytes are made by `gossip.wire`. The rule it keeps: no I/O and no clock. Every
input carries `now`; every output is a value the driver collects (aioquic's contract):

    node.start(now); node.join([(addr, port)], now)
    loop:
        node.receive_packet(data, addr, now) / node.stream_*(id, ..., now) / node.handle_timer(now)
        send node.packets_to_send(); act on node.stream_actions(); read node.events()
        sleep until node.next_deadline()

Timing (memberlist `state.go`), all driven by `handle_timer`:

* Probe: every `probe_interval` (a ticker; one missed tick is remembered, as Go's ticker does)
  the next member in round-robin order gets a `ping` (plus a `suspect` about itself if it is
  already suspect: Lifeguard's buddy system). No `ack` within `probe_timeout`: ask
  `indirect_checks` random alive members to ping it for us (asking for a `nack` if they speak
  protocol 4+), and open a TCP ping to it if it speaks 3+. Any ack before the probe deadline,
  `probe_interval` scaled by our health score, is success (health +1); otherwise the member is
  suspected, and our health drops by the nacks that did not come (or by 1 if none were asked).
  As in memberlist, a relay sends its nack `probe_timeout` after it got the request, which is
  about when our deadline passes: at health 0 those nacks usually arrive late and count as
  missing (swift-cluster-membership#6 discusses this property of memberlist's timers).
* Gossip: every `gossip_interval`, pending broadcasts go to `gossip_nodes` random members
  (alive, suspect, or dead for less than `gossip_to_the_dead_time`).
* Push/pull: every `push_pull_interval * pushPullScale(n)`, a full state exchange over TCP with
  one random alive member. Joining is the same exchange with `join=True`.
* Every stream has a deadline (`tcp_timeout`; the probe deadline for a TCP ping).

Every packet we send is at most `udp_buffer_size` bytes and carries as many broadcasts as fit.
"""

from __future__ import annotations

import enum
import heapq
import logging
import math
import random
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Protocol

from gossip import wire
from gossip.awareness import Awareness
from gossip.broadcast import TransmitLimitedQueue
from gossip.config import META_MAX_SIZE, GossipConfig
from gossip.events import (
    Address,
    CloseStream,
    JoinResult,
    Member,
    MemberEvent,
    MemberState,
    OpenStream,
    Stats,
    StreamAction,
    StreamSend,
)
from gossip.keyring import PACKET_OVERHEAD, Keyring
from gossip.limits import DEFAULT_LIMITS, Limits
from gossip.messages import (
    Ack,
    Alive,
    Dead,
    DecodeError,
    ErrResp,
    IndirectPing,
    Nack,
    PacketMessage,
    Ping,
    PushNodeState,
    PushPull,
    StreamMessage,
    Suspect,
    UserMsg,
)
from gossip.state import VALID_ADDRESS_LENGTHS, MemberRecord, Membership
from gossip.wire import (
    COMPOUND_HEADER_OVERHEAD,
    COMPOUND_PART_OVERHEAD,
    CRC_OVERHEAD,
    MAX_COMPOUND_PARTS,
)

logger = logging.getLogger(__name__)

ALIVE, SUSPECT = MemberState.ALIVE, MemberState.SUSPECT
DEAD, LEFT = MemberState.DEAD, MemberState.LEFT

USER_MSG_OVERHEAD = 1  # [8]
PUSH_PULL_SCALE_THRESHOLD = 32
DEFAULT_LEAVE_TIMEOUT = 5.0  # serf's BroadcastTimeout


class Delegate(Protocol):
    """Application hooks (memberlist's `Delegate`): user data rides on membership traffic."""

    def node_meta(self, limit: int) -> bytes:
        """Our metadata (serf tags), at most `limit` bytes; read once at `start`."""
        ...

    def notify_msg(self, payload: bytes) -> None:
        """A user message arrived (by gossip, by packet or by stream)."""
        ...

    def get_broadcasts(self, overhead: int, limit: int) -> list[bytes]:
        """User messages to piggyback: each costs len + `overhead`, all within `limit`."""
        ...

    def local_state(self, join: bool) -> bytes:
        """Our user state for a push/pull."""
        ...

    def merge_remote_state(self, buf: bytes, join: bool) -> None:
        """A peer's user state from a push/pull."""
        ...


def push_pull_scale(interval: float, num_nodes: int) -> float:
    """memberlist pushPullScale: push/pull less often above 32 members."""
    if num_nodes <= PUSH_PULL_SCALE_THRESHOLD:
        return interval
    multiplier = math.ceil(math.log2(num_nodes) - math.log2(PUSH_PULL_SCALE_THRESHOLD)) + 1
    return multiplier * interval


class _Timer:
    __slots__ = ("action", "cancelled", "when")

    def __init__(self, when: float, action: Callable[[float], None]) -> None:
        self.when = when
        self.action = action
        self.cancelled = False


class _TimerQueue:
    """A heap of one-shot timers; cancelled ones are skipped when they surface."""

    __slots__ = ("_counter", "_heap")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Timer]] = []
        self._counter = 0

    def schedule(self, when: float, action: Callable[[float], None]) -> _Timer:
        timer = _Timer(when, action)
        self._counter += 1
        heapq.heappush(self._heap, (when, self._counter, timer))
        return timer

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop(self) -> _Timer:
        return heapq.heappop(self._heap)[2]


class _Probe:
    """One probe of one member, from ping to verdict."""

    __slots__ = (
        "deadline",
        "deadline_timer",
        "expected_nacks",
        "incarnation",
        "nacks",
        "seq_no",
        "target",
        "tcp_ok",
        "tcp_stream",
        "timeout_timer",
    )

    def __init__(self, target: MemberRecord, seq_no: int, deadline: float) -> None:
        self.target = target
        self.incarnation = target.incarnation
        self.seq_no = seq_no
        self.deadline = deadline
        self.expected_nacks = 0
        self.nacks = 0
        self.tcp_ok = False
        self.tcp_stream: int | None = None
        self.timeout_timer: _Timer | None = None
        self.deadline_timer: _Timer | None = None


class _Relay:
    """An indirect ping we run for someone else: forward their ack, or nack on timeout."""

    __slots__ = ("requester", "requester_name", "seq_no", "timer", "wants_nack")

    def __init__(self, seq_no: int, requester: Address, requester_name: str, nack: bool) -> None:
        self.seq_no = seq_no
        self.requester = requester
        self.requester_name = requester_name
        self.wants_nack = nack
        self.timer: _Timer | None = None


class _StreamRole(enum.Enum):
    PUSH_PULL = "push_pull"  # we initiated a push/pull (or a join)
    PING = "ping"  # we initiated a TCP fallback ping
    USER = "user"  # we initiated a reliable user message
    INBOUND = "inbound"  # a peer connected to us


class _Stream:
    __slots__ = ("addr", "decoder", "id", "join", "payload", "probe", "role", "timer")

    def __init__(self, stream_id: int, role: _StreamRole, addr: Address, payload: bytes) -> None:
        self.id = stream_id
        self.role = role
        self.addr = addr
        self.payload = payload
        self.join = False
        self.probe: _Probe | None = None
        self.decoder: wire.StreamDecoder | None = None
        self.timer: _Timer | None = None


class Node:
    """One gossip member; see the module docstring for the driving contract."""

    def __init__(
        self,
        config: GossipConfig,
        name: str,
        addr: bytes,
        port: int,
        *,
        meta: bytes = b"",
        keyring: Keyring | None = None,
        delegate: Delegate | None = None,
        rng: random.Random,
        limits: Limits = DEFAULT_LIMITS,
        compression: bool | None = None,
    ) -> None:
        if not name:
            raise ValueError("a node needs a name")
        if len(addr) not in VALID_ADDRESS_LENGTHS:
            raise ValueError("addr must be a packed IPv4 (4 bytes) or IPv6 (16 bytes) address")
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is out of range")
        if len(meta) > META_MAX_SIZE:
            raise ValueError(f"meta is {len(meta)} bytes, more than {META_MAX_SIZE}")
        self.config = config
        self.name = name
        self.addr = addr
        self.port = port
        self.rng = rng
        self._meta = meta
        self._delegate = delegate
        self._keyring = keyring
        self._limits = limits
        self._compression = config.enable_compression if compression is None else compression
        self._codec = wire.PacketCodec(keyring, self._compression, limits)
        encrypt_overhead = PACKET_OVERHEAD if keyring is not None else 0
        # Bytes a packet may hold before compression, CRC and encryption wrap it. memberlist
        # leaves the CRC out of this sum (its packets can exceed 1400 bytes); we do not.
        self._packet_budget = config.udp_buffer_size - encrypt_overhead - CRC_OVERHEAD
        self.stats = Stats()
        self.awareness = Awareness(config.awareness_max_multiplier)
        self._broadcasts = TransmitLimitedQueue(config.retransmit_mult)
        self._user_broadcasts = TransmitLimitedQueue(config.retransmit_mult)
        self._members = Membership(
            config,
            name,
            rng=rng,
            broadcasts=self._broadcasts,
            awareness=self.awareness,
            stats=self.stats,
        )
        self._timers = _TimerQueue()
        self._outbox: list[tuple[bytes, Address]] = []
        self._stream_actions: list[StreamAction] = []
        self._join_results: list[JoinResult] = []
        self._ack_handlers: dict[int, _Probe | _Relay] = {}
        self._streams: dict[int, _Stream] = {}
        self._next_stream_id = 0
        self._seq_no = 0
        self._probe: _Probe | None = None
        self._probe_tick_pending = False
        self._next_probe_tick = 0.0
        self._next_gossip_tick = 0.0
        self._started = False
        self.left = False
        self.leave_deadline: float | None = None
        self._packet_handlers: dict[type, Callable[[PacketMessage, Address, float], None]] = {
            Ping: self._on_ping,  # type: ignore[dict-item]
            IndirectPing: self._on_indirect_ping,  # type: ignore[dict-item]
            Ack: self._on_ack,  # type: ignore[dict-item]
            Nack: self._on_nack,  # type: ignore[dict-item]
            Alive: self._on_alive,  # type: ignore[dict-item]
            Suspect: self._on_suspect,  # type: ignore[dict-item]
            Dead: self._on_dead,  # type: ignore[dict-item]
            UserMsg: self._on_user,  # type: ignore[dict-item]
        }

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Announce ourselves (incarnation 1) and start the probe, gossip and push/pull timers."""
        if self._started:
            raise RuntimeError("node already started")
        self._started = True
        meta = self._meta
        if not meta and self._delegate is not None:
            meta = self._delegate.node_meta(META_MAX_SIZE)
            if len(meta) > META_MAX_SIZE:
                raise ValueError(f"delegate meta is {len(meta)} bytes, more than {META_MAX_SIZE}")
        me = Alive(
            incarnation=self._members.next_incarnation(),
            node=self.name,
            addr=self.addr,
            port=self.port,
            meta=meta,
            vsn=self.config.vsn,
        )
        self._members.apply_alive(me, now, bootstrap=True)
        config = self.config
        # A random stagger keeps a cluster started at once from ticking in lockstep.
        self._next_probe_tick = now + self.rng.uniform(0, config.probe_interval)
        self._timers.schedule(self._next_probe_tick, self._on_probe_tick)
        self._next_gossip_tick = now + self.rng.uniform(0, config.gossip_interval)
        self._timers.schedule(self._next_gossip_tick, self._on_gossip_tick)
        if config.push_pull_interval > 0:
            first = now + self.rng.uniform(0, config.push_pull_interval)
            self._timers.schedule(first, self._on_push_pull_tick)

    def join(self, addrs: Iterable[Address], now: float) -> None:
        """Push/pull with each seed; each attempt ends in a `JoinResult` (see `join_results`)."""
        self._require_started()
        for addr in addrs:
            self._start_push_pull(addr, join=True, now=now)

    def leave(self, now: float, timeout: float = DEFAULT_LEAVE_TIMEOUT) -> None:
        """Broadcast our own `dead` (a graceful leave); `left` turns True once it has been sent
        its full number of times, at once if nobody else is alive, or after `timeout`."""
        self._require_started()
        if self._members.leaving:
            return
        self._members.leaving = True
        me = self._members.local
        anyone_to_tell = self._members.any_other_alive()
        self._members.apply_dead(
            Dead(me.incarnation, self.name, self.name), now, on_finished=self._leave_sent
        )
        if not anyone_to_tell:
            self.left = True
            return
        self.leave_deadline = now + timeout
        self._timers.schedule(self.leave_deadline, self._leave_timed_out)

    def update_meta(self, meta: bytes, now: float) -> None:
        """Change our metadata and re-announce ourselves with a higher incarnation."""
        if len(meta) > META_MAX_SIZE:
            raise ValueError(f"meta is {len(meta)} bytes, more than {META_MAX_SIZE}")
        self._meta = meta
        if not self._started:
            return
        me = self._members.local
        alive = Alive(
            incarnation=self._members.next_incarnation(),
            node=self.name,
            addr=me.addr,
            port=me.port,
            meta=meta,
            vsn=self.config.vsn,
        )
        self._members.apply_alive(alive, now, bootstrap=True)

    def send_user_message(
        self, to_name: str | None, payload: bytes, now: float, reliable: bool = False
    ) -> None:
        """Send delegate bytes: gossiped to everyone (`to_name` None), or to one member by
        UDP or, if `reliable`, over a TCP stream."""
        self._require_started()
        framed = wire.encode_message(UserMsg(payload))
        if to_name is None:
            if reliable:
                raise ValueError("a broadcast cannot be reliable; name a member")
            room = self._packet_budget - COMPOUND_HEADER_OVERHEAD - COMPOUND_PART_OVERHEAD
            if len(framed) > room:
                raise ValueError(f"a {len(payload)}-byte user message does not fit in a packet")
            self._user_broadcasts.queue(framed)
            return
        record = self._members.get(to_name)
        if record is None:
            raise LookupError(f"no member named {to_name!r}")
        if reliable:
            data = wire.encode_stream(
                UserMsg(payload), keyring=self._keyring, compression=self._compression
            )
            self._open_stream(_StreamRole.USER, record.address, data, now + self.config.tcp_timeout)
            return
        if len(framed) > self._packet_budget:
            raise ValueError(f"a {len(payload)}-byte user message does not fit in a packet")
        self._send_parts([framed], record.address, record)

    # -- reading the node --------------------------------------------------------------------

    @property
    def health_score(self) -> int:
        return self.awareness.score

    @property
    def incarnation(self) -> int:
        return self._members.incarnation

    def members(self) -> list[Member]:
        """Every member we know of, ourselves included, in any state (dead ones until reaped)."""
        return [record.view() for record in self._members]

    def member(self, name: str) -> Member | None:
        record = self._members.get(name)
        return None if record is None else record.view()

    def member_state(self, name: str) -> MemberState | None:
        """A cheap look-up of one member's state (no view is built)."""
        record = self._members.get(name)
        return None if record is None else record.state

    def count_members(self, *states: MemberState) -> int:
        """How many known members are in one of `states` (all members if none given)."""
        if not states:
            return len(self._members)
        return sum(1 for record in self._members if record.state in states)

    def seed_members(self, entries: Iterable[PushNodeState], now: float) -> None:
        """Adopt alive members quietly (no gossip, no events). Not a protocol path: it lets a
        simulator start from a converged cluster without paying for its formation."""
        self._require_started()
        self._members.seed(entries, now)

    def local_state(self) -> list[PushNodeState]:
        """What we would send in a push/pull."""
        return [record.push_state() for record in self._members]

    # -- outputs -----------------------------------------------------------------------------

    def packets_to_send(self) -> list[tuple[bytes, Address]]:
        packets, self._outbox = self._outbox, []
        return packets

    def stream_actions(self) -> list[StreamAction]:
        actions, self._stream_actions = self._stream_actions, []
        return actions

    def events(self) -> list[MemberEvent]:
        events, self._members.events = self._members.events, []
        return events

    def join_results(self) -> list[JoinResult]:
        results, self._join_results = self._join_results, []
        return results

    def next_deadline(self) -> float | None:
        timer = self._timers.next_deadline()
        suspicion = self._members.next_deadline()
        if timer is None:
            return suspicion
        if suspicion is None:
            return timer
        return min(timer, suspicion)

    # -- inputs ------------------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        """Run everything due at or before `now`, earliest first."""
        timers = self._timers
        members = self._members
        while True:
            timer_at = timers.next_deadline()
            suspicion_at = members.next_deadline()
            if suspicion_at is not None and suspicion_at <= now and (
                timer_at is None or suspicion_at <= timer_at
            ):
                members.expire(now)
                continue
            if timer_at is None or timer_at > now:
                return
            timers.pop().action(now)

    def receive_packet(self, data: bytes, addr: Address, now: float) -> None:
        """One UDP datagram from `addr`. Malformed input is counted in `stats.drops` by reason."""
        stats = self.stats
        if not self._started:
            stats.drops["not_started"] += 1
            return
        stats.packets_in += 1
        stats.bytes_in += len(data)
        # Like memberlist, the good parts of a compound are handled even if others are bad.
        decoded = self._codec.decode_parts(data)
        for error in decoded.errors:
            stats.drops[error.reason] += 1
            logger.debug("dropped (part of) a packet from %s: %s", addr, error)
        handlers = self._packet_handlers
        for message in decoded.messages:
            handlers[type(message)](message, addr, now)

    def accept_stream(self, stream_id: int, addr: Address, now: float) -> None:
        """A peer opened a stream to us. `stream_id` must not be one the core is using."""
        if stream_id in self._streams:
            raise ValueError(f"stream id {stream_id} is already in use")
        self.stats.streams_accepted += 1
        inbound = sum(1 for s in self._streams.values() if s.role is _StreamRole.INBOUND)
        if not self._started or inbound >= self.config.max_push_pull_requests:
            self.stats.drops["stream_refused"] += 1
            self._stream_actions.append(CloseStream(stream_id))
            return
        stream = _Stream(stream_id, _StreamRole.INBOUND, addr, b"")
        stream.decoder = wire.StreamDecoder(self._keyring, self._limits)
        self._streams[stream_id] = stream
        stream.timer = self._timers.schedule(
            now + self.config.tcp_timeout, partial(self._stream_deadline, stream_id)
        )

    def stream_opened(self, stream_id: int, now: float) -> None:
        """A stream we asked for is connected: we write our message."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.role is _StreamRole.INBOUND:
            return
        self._stream_actions.append(StreamSend(stream_id, stream.payload))
        if stream.role is _StreamRole.USER:
            self._close_stream(stream)

    def stream_data(self, stream_id: int, data: bytes, now: float) -> None:
        """Bytes arrived on a stream."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.decoder is None:
            return
        try:
            message = stream.decoder.feed(data)
        except DecodeError as exc:
            self.stats.drops[f"stream_{exc.reason}"] += 1
            logger.warning("bad stream from %s: %s", stream.addr, exc)
            if stream.role is _StreamRole.INBOUND:
                self._reply(stream, ErrResp(str(exc)))
            self._close_stream(stream)
            self._stream_failed(stream, str(exc))
            return
        if message is None:
            return
        if stream.role is _StreamRole.INBOUND:
            self._serve(stream, message, now)
        elif stream.role is _StreamRole.PUSH_PULL:
            self._close_stream(stream)
            self._push_pull_answered(stream, message, now)
        elif stream.role is _StreamRole.PING:
            self._close_stream(stream)
            self._tcp_ping_answered(stream, message)

    def stream_closed(self, stream_id: int, now: float) -> None:
        """The peer closed the stream (EOF). The core forgets it; the driver releases it."""
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._cancel(stream.timer)
            self._stream_failed(stream, "closed before a complete message")

    def stream_failed(self, stream_id: int, now: float) -> None:
        """Connecting, reading or writing failed. The core forgets the stream."""
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._cancel(stream.timer)
            self._stream_failed(stream, "stream failed")

    # -- probing -----------------------------------------------------------------------------

    def _on_probe_tick(self, now: float) -> None:
        interval = self.config.probe_interval
        self._next_probe_tick += interval
        if self._next_probe_tick <= now:  # we were stalled: skip the ticks we missed
            missed = math.floor((now - self._next_probe_tick) / interval) + 1
            self._next_probe_tick += missed * interval
        self._timers.schedule(self._next_probe_tick, self._on_probe_tick)
        if self._probe is not None:
            self._probe_tick_pending = True
            return
        self._start_probe(now)

    def _start_probe(self, now: float) -> None:
        target = self._members.next_probe_target(now)
        if target is None:
            return
        config = self.config
        self.stats.probes += 1
        interval = config.probe_interval
        if config.lifeguard:
            interval = self.awareness.scale(interval)
        probe = _Probe(target, self._next_seq_no(), now + interval)
        self._probe = probe
        self._ack_handlers[probe.seq_no] = probe
        ping = Ping(probe.seq_no, target.name, self.addr, self.port, self.name)
        if target.state is ALIVE or not config.lifeguard:
            self._send_message(ping, target.address, target)
        else:
            # Buddy system: tell a suspect it is suspected, so it can refute at once.
            suspect = Suspect(target.incarnation, target.name, self.name)
            parts = [wire.encode_message(ping), wire.encode_message(suspect)]
            self._send_parts(parts, target.address, target)
        probe.timeout_timer = self._timers.schedule(
            now + config.probe_timeout, partial(self._probe_timed_out, probe)
        )
        probe.deadline_timer = self._timers.schedule(
            probe.deadline, partial(self._probe_deadline, probe)
        )

    def _probe_timed_out(self, probe: _Probe, now: float) -> None:
        """No direct ack in time: indirect pings through others, and a TCP ping in parallel."""
        if probe is not self._probe:
            return
        target = probe.target
        me = self.name
        peers = self._members.random_members(
            self.config.indirect_checks,
            lambda r: r.name == me or r.name == target.name or r.state is not ALIVE,
        )
        for peer in peers:
            wants_nack = self.config.lifeguard and peer.protocol_max >= 4
            if wants_nack:
                probe.expected_nacks += 1
            request = IndirectPing(
                seq_no=probe.seq_no,
                target=target.addr,
                port=target.port,
                node=target.name,
                nack=wants_nack,
                source_addr=self.addr,
                source_port=self.port,
                source_node=me,
            )
            self._send_message(request, peer.address, peer)
        self.stats.indirect_pings_sent += len(peers)
        if not self.config.disable_tcp_pings and target.protocol_max >= 3:
            self.stats.tcp_fallback_pings += 1
            ping = Ping(probe.seq_no, target.name, self.addr, self.port, me)
            data = wire.encode_stream(ping, keyring=self._keyring, compression=self._compression)
            stream = self._open_stream(_StreamRole.PING, target.address, data, probe.deadline)
            stream.probe = probe
            probe.tcp_stream = stream.id

    def _probe_deadline(self, probe: _Probe, now: float) -> None:
        """The probe ran out of time: unless TCP got through, suspect the target."""
        if probe is not self._probe:
            return
        self._ack_handlers.pop(probe.seq_no, None)
        if probe.tcp_ok:
            logger.warning(
                "reached %s over TCP but UDP probes failed; the network may be misconfigured",
                probe.target.name,
            )
            self._end_probe(probe, now, health_delta=-1)
            return
        # Lifeguard: missing nacks mean *we* may be the slow one; with none asked, assume so.
        expected = probe.expected_nacks
        delta = max(expected - probe.nacks, 0) if expected > 0 else 1
        self.stats.probe_failures += 1
        logger.info("suspect %s has failed, no acks received", probe.target.name)
        suspect = Suspect(probe.incarnation, probe.target.name, self.name)
        self._members.apply_suspect(suspect, now)
        self._end_probe(probe, now, health_delta=delta)

    def _end_probe(self, probe: _Probe, now: float, *, health_delta: int) -> None:
        self._probe = None
        self._ack_handlers.pop(probe.seq_no, None)
        self._cancel(probe.timeout_timer)
        self._cancel(probe.deadline_timer)
        if probe.tcp_stream is not None:
            stream = self._streams.get(probe.tcp_stream)
            if stream is not None:
                self._close_stream(stream)
        if self.config.lifeguard:
            self.awareness.apply_delta(health_delta)
        if self._probe_tick_pending:
            self._probe_tick_pending = False
            self._start_probe(now)

    # -- packet handlers ---------------------------------------------------------------------

    def _on_ping(self, ping: Ping, addr: Address, now: float) -> None:
        if ping.node and ping.node != self.name:
            self.stats.drops["ping_wrong_node"] += 1
            return
        reply_to = addr
        if ping.source_port and len(ping.source_addr) in VALID_ADDRESS_LENGTHS:
            reply_to = (ping.source_addr, ping.source_port)
        recipient = self._members.get(ping.source_node) if ping.source_node else None
        self._send_message(Ack(ping.seq_no), reply_to, recipient)

    def _on_indirect_ping(self, request: IndirectPing, addr: Address, now: float) -> None:
        if len(request.target) not in VALID_ADDRESS_LENGTHS:
            self.stats.drops["indirect_ping_bad_target"] += 1
            return
        requester = addr
        if request.source_port and len(request.source_addr) in VALID_ADDRESS_LENGTHS:
            requester = (request.source_addr, request.source_port)
        relay = _Relay(request.seq_no, requester, request.source_node, request.nack)
        seq_no = self._next_seq_no()
        self._ack_handlers[seq_no] = relay
        relay.timer = self._timers.schedule(
            now + self.config.probe_timeout, partial(self._relay_expired, seq_no, relay)
        )
        ping = Ping(seq_no, request.node, self.addr, self.port, self.name)
        target = (request.target, request.port or self.port)
        self._send_message(ping, target, self._members.get(request.node))

    def _relay_expired(self, seq_no: int, relay: _Relay, now: float) -> None:
        if self._ack_handlers.get(seq_no) is not relay:
            return  # already acked and forwarded
        del self._ack_handlers[seq_no]
        if relay.wants_nack:
            self.stats.nacks_sent += 1
            recipient = self._members.get(relay.requester_name)
            self._send_message(Nack(relay.seq_no), relay.requester, recipient)

    def _on_ack(self, ack: Ack, addr: Address, now: float) -> None:
        handler = self._ack_handlers.pop(ack.seq_no, None)
        if handler is None:
            self.stats.late_acks += 1  # after its probe ended, or never ours
            return
        if isinstance(handler, _Probe):
            if handler is self._probe:
                self._end_probe(handler, now, health_delta=-1)
            return
        self._cancel(handler.timer)
        recipient = self._members.get(handler.requester_name)
        self._send_message(Ack(handler.seq_no), handler.requester, recipient)

    def _on_nack(self, nack: Nack, addr: Address, now: float) -> None:
        handler = self._ack_handlers.get(nack.seq_no)
        if isinstance(handler, _Probe):
            handler.nacks += 1
        else:
            self.stats.late_nacks += 1

    def _on_alive(self, alive: Alive, addr: Address, now: float) -> None:
        if alive.port == 0:  # protocol 1 peers carry no port: assume ours
            alive = Alive(
                alive.incarnation, alive.node, alive.addr, self.port, alive.meta, alive.vsn
            )
        self._members.apply_alive(alive, now)

    def _on_suspect(self, suspect: Suspect, addr: Address, now: float) -> None:
        self._members.apply_suspect(suspect, now)

    def _on_dead(self, dead: Dead, addr: Address, now: float) -> None:
        self._members.apply_dead(dead, now)

    def _on_user(self, message: UserMsg, addr: Address, now: float) -> None:
        if self._delegate is not None:
            self._delegate.notify_msg(message.payload)

    # -- gossip and push/pull ----------------------------------------------------------------

    def _on_gossip_tick(self, now: float) -> None:
        interval = self.config.gossip_interval
        self._next_gossip_tick += interval
        if self._next_gossip_tick <= now:
            missed = math.floor((now - self._next_gossip_tick) / interval) + 1
            self._next_gossip_tick += missed * interval
        self._timers.schedule(self._next_gossip_tick, self._on_gossip_tick)
        if not self._broadcasts and not self._user_broadcasts and self._delegate is None:
            return
        me = self.name
        grace = self.config.gossip_to_the_dead_time

        def excluded(record: MemberRecord) -> bool:
            state = record.state
            if record.name == me or state is LEFT:
                return True
            return state is DEAD and now - record.state_change > grace

        limit = self._packet_budget - COMPOUND_HEADER_OVERHEAD
        for target in self._members.random_members(self.config.gossip_nodes, excluded):
            messages = self._get_broadcasts(COMPOUND_PART_OVERHEAD, limit)
            if not messages:
                return
            for start in range(0, len(messages), MAX_COMPOUND_PARTS):
                self._send_parts(
                    messages[start : start + MAX_COMPOUND_PARTS], target.address, target
                )

    def _on_push_pull_tick(self, now: float) -> None:
        interval = push_pull_scale(self.config.push_pull_interval, len(self._members))
        self._timers.schedule(now + interval, self._on_push_pull_tick)
        me = self.name
        peers = self._members.random_members(
            1, lambda r: r.name == me or r.state is not ALIVE
        )
        if peers:
            self._start_push_pull(peers[0].address, join=False, now=now)

    def _start_push_pull(self, addr: Address, *, join: bool, now: float) -> None:
        user_state = self._delegate.local_state(join) if self._delegate is not None else b""
        message = PushPull(join=join, nodes=tuple(self.local_state()), user_state=user_state)
        data = wire.encode_stream(message, keyring=self._keyring, compression=self._compression)
        stream = self._open_stream(
            _StreamRole.PUSH_PULL, addr, data, now + self.config.tcp_timeout
        )
        stream.join = join

    def _push_pull_answered(self, stream: _Stream, message: StreamMessage, now: float) -> None:
        if isinstance(message, ErrResp):
            self._stream_failed(stream, f"remote error: {message.error}")
            return
        if not isinstance(message, PushPull):
            self.stats.drops["push_pull_unexpected_reply"] += 1
            self._stream_failed(stream, f"expected a push/pull reply, got {type(message).__name__}")
            return
        error = self._merge(message, now)
        if error is not None:
            self._stream_failed(stream, error)
            return
        self.stats.push_pulls += 1
        if stream.join:
            self._join_results.append(JoinResult(stream.addr, True, nodes=len(message.nodes)))

    def _merge(self, message: PushPull, now: float) -> str | None:
        error = self._members.verify_protocol(message.nodes)
        if error is not None:
            self.stats.drops["push_pull_incompatible"] += 1
            logger.error("refusing a push/pull merge: %s", error)
            return error
        self._members.merge_remote(message.nodes, now, default_port=self.port)
        if message.user_state and self._delegate is not None:
            self._delegate.merge_remote_state(message.user_state, message.join)
        return None

    def _tcp_ping_answered(self, stream: _Stream, message: StreamMessage) -> None:
        probe = stream.probe
        if isinstance(message, Ack) and probe is not None and message.seq_no == probe.seq_no:
            probe.tcp_ok = True
            self.stats.tcp_fallback_successes += 1
        else:
            self.stats.drops["tcp_ping_bad_reply"] += 1

    # -- streams -----------------------------------------------------------------------------

    def _open_stream(
        self, role: _StreamRole, addr: Address, payload: bytes, deadline: float
    ) -> _Stream:
        self._next_stream_id += 1
        stream = _Stream(self._next_stream_id, role, addr, payload)
        if role is not _StreamRole.USER:
            stream.decoder = wire.StreamDecoder(self._keyring, self._limits)
        stream.timer = self._timers.schedule(deadline, partial(self._stream_deadline, stream.id))
        self._streams[stream.id] = stream
        self.stats.streams_opened += 1
        self._stream_actions.append(OpenStream(stream.id, addr))
        return stream

    def _serve(self, stream: _Stream, message: StreamMessage, now: float) -> None:
        """Answer one inbound stream message (memberlist handleConn)."""
        if isinstance(message, Ping):
            if message.node and message.node != self.name:
                self.stats.drops["stream_ping_wrong_node"] += 1
            else:
                self._reply(stream, Ack(message.seq_no))
            self._close_stream(stream)
        elif isinstance(message, PushPull):
            delegate = self._delegate
            user_state = delegate.local_state(message.join) if delegate is not None else b""
            reply = PushPull(
                join=message.join, nodes=tuple(self.local_state()), user_state=user_state
            )
            # Like memberlist, answer before merging: a peer we refuse still gets our state.
            self._reply(stream, reply)
            self._close_stream(stream)
            if self._merge(message, now) is None:
                self.stats.push_pulls += 1
        elif isinstance(message, UserMsg):
            self._close_stream(stream)
            if self._delegate is not None:
                self._delegate.notify_msg(message.payload)
        else:
            self.stats.drops[f"stream_unexpected_{type(message).__name__.lower()}"] += 1
            self._close_stream(stream)

    def _reply(self, stream: _Stream, message: StreamMessage) -> None:
        data = wire.encode_stream(message, keyring=self._keyring, compression=self._compression)
        self._stream_actions.append(StreamSend(stream.id, data))

    def _close_stream(self, stream: _Stream) -> None:
        if self._streams.pop(stream.id, None) is None:
            return
        self._cancel(stream.timer)
        self._stream_actions.append(CloseStream(stream.id))

    def _stream_deadline(self, stream_id: int, now: float) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        self._close_stream(stream)
        self._stream_failed(stream, "timed out")

    def _stream_failed(self, stream: _Stream, reason: str) -> None:
        if stream.role is _StreamRole.INBOUND:
            return
        self.stats.streams_failed += 1
        if stream.role is _StreamRole.PUSH_PULL:
            self.stats.push_pull_failures += 1
            logger.warning("push/pull with %s failed: %s", stream.addr, reason)
            if stream.join:
                self._join_results.append(JoinResult(stream.addr, False, error=reason))
        elif stream.role is _StreamRole.USER:
            logger.warning("reliable user message to %s failed: %s", stream.addr, reason)

    # -- sending -----------------------------------------------------------------------------

    def _send_message(
        self, message: PacketMessage, addr: Address, recipient: MemberRecord | None
    ) -> None:
        """Send one message, filling the rest of the packet with broadcasts."""
        encoded = wire.encode_message(message)
        room = self._packet_budget - COMPOUND_HEADER_OVERHEAD - COMPOUND_PART_OVERHEAD
        room -= len(encoded)
        extra = self._get_broadcasts(COMPOUND_PART_OVERHEAD, room) if room > 0 else []
        self._send_parts([encoded, *extra] if extra else [encoded], addr, recipient)

    def _send_parts(
        self, parts: Sequence[bytes], addr: Address, recipient: MemberRecord | None
    ) -> None:
        """Send encoded messages as one packet; CRC-protected if the recipient speaks 5+."""
        crc = recipient is not None and recipient.protocol_max >= 5
        data = self._codec.encode(list(parts), crc=crc)
        self._outbox.append((data, addr))
        self.stats.packets_out += 1
        self.stats.bytes_out += len(data)

    def _get_broadcasts(self, overhead: int, limit: int) -> list[bytes]:
        """Membership rumours first, then user broadcasts, then the delegate's."""
        num_nodes = len(self._members)
        messages = self._broadcasts.get_broadcasts(overhead, limit, num_nodes)
        room = limit - sum(len(m) + overhead for m in messages)
        if self._user_broadcasts and room > overhead + USER_MSG_OVERHEAD:
            user = self._user_broadcasts.get_broadcasts(overhead, room, num_nodes)
            room -= sum(len(m) + overhead for m in user)
            messages.extend(user)
        if self._delegate is not None and room > overhead + USER_MSG_OVERHEAD:
            for payload in self._delegate.get_broadcasts(overhead + USER_MSG_OVERHEAD, room):
                cost = len(payload) + USER_MSG_OVERHEAD + overhead
                if cost > room:
                    self.stats.drops["delegate_broadcast_too_large"] += 1
                    continue
                room -= cost
                messages.append(wire.encode_message(UserMsg(payload)))
        return messages

    # -- small helpers -----------------------------------------------------------------------

    def _next_seq_no(self) -> int:
        self._seq_no = (self._seq_no + 1) & 0xFFFFFFFF
        return self._seq_no

    def _leave_sent(self) -> None:
        self.left = True

    def _leave_timed_out(self, now: float) -> None:
        if not self.left:
            logger.warning("timed out waiting for the leave broadcast to go out")
            self.left = True

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("call start(now) first")

    @staticmethod
    def _cancel(timer: _Timer | None) -> None:
        if timer is not None:
            timer.cancelled = True
