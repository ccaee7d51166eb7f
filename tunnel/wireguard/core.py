"""The sans-IO WireGuard device: peers, handshakes, sessions, timers, routing and counters.

Theory of operation (aioquic's contract). The caller feeds the device three things:

    receive_datagram(data, addr, now)   a UDP datagram from the underlay
    send_packet(ip_packet, now)         an IP packet read from the TUN device
    handle_timer(now)                   when `next_deadline()` has passed

and drains three queues after each call:

    datagrams_to_send()   [(bytes, (ip, port)), ...] for the UDP socket
    tun_writes()          [bytes, ...] decrypted IP packets for the TUN device
    events()              HandshakeCompleted, EndpointChanged, KeypairsChanged, ...

`now` is monotonic seconds; the TAI64N timestamp of initiations is `now + wall_clock_offset`.
Nothing here reads a clock, sleeps or touches a socket.

Routing: an outgoing packet goes to the peer whose allowed IPs hold its destination (longest
prefix); an incoming packet is delivered only if its source is in the allowed IPs of the peer
whose keys authenticated it. Packets for a peer without a usable keypair are staged (at most
`max_staged_packets`, oldest dropped) and a handshake starts; they go out when it completes.

External data plane. With `external_data_plane=True` the device keeps the control plane
(handshakes, timers, keypair rotation) but never seals or opens data itself: data-plane
workers do, from keypair snapshots carried by `KeypairsChanged` events, and report back through
`note_data_sent` and `note_transport_received`. Keepalives are then requested with
`KeepaliveRequested` events, because the worker owns the send counter.

Every message that is dropped is counted in `counters` under its reason (`truncated`,
`bad_type`, `bad_length`, `bad_mac1`, `needs_cookie`, `rate_limited`, `decrypt_failed`,
`unknown_peer`, `unknown_index`, `handshake_replay`, `handshake_flood`, `unexpected_handshake`,
`replay`, `expired_keypair`, `bad_cookie_reply`, `bad_inner_packet`, `bad_inner_source`,
`no_route`, `no_endpoint`, `staged_overflow`); nothing a peer sends can raise out of
`receive_datagram`.
"""

from __future__ import annotations

import collections
import logging
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tunnel.wireguard.allowedips import AllowedIPs
from tunnel.wireguard.cookie import CookieChecker, CookieGenerator, LoadMonitor, RateLimiter
from tunnel.wireguard.keys import KEY_SIZE, PrivateKey, PublicKey, WeakPublicKey
from tunnel.wireguard.messages import (
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_SUPER_FRAGMENT,
    MESSAGE_TRANSPORT,
    CookieReply,
    Initiation,
    MalformedMessage,
    Response,
    message_type,
)
from tunnel.wireguard.noise import (
    Handshake,
    HandshakeError,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
    derive_keys,
    open_initiation,
)
from tunnel.wireguard.session import Keypair, KeypairSlots, KeypairSnapshot, TransportError
from tunnel.wireguard.timers import PeerTimers, TimerAction, TimerConfig

log = logging.getLogger(__name__)

Address = tuple[str, int]


# ---------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class PeerConfig:
    public_key: PublicKey
    allowed_ips: tuple[str, ...] = ()
    endpoint: Address | None = None
    preshared_key: bytes = bytes(KEY_SIZE)
    persistent_keepalive: float = 0.0
    extension_ok: bool = False  # the peer announced the weavepy super-packet extension


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    private_key: PrivateKey
    mtu: int = 1420
    timers: TimerConfig = field(default_factory=TimerConfig)
    under_load_threshold: int = 128  # handshake messages per second before requiring cookies
    wall_clock_offset: float = 0.0  # wall-clock time = now + offset (TAI64N timestamps)
    max_staged_packets: int = 128
    external_data_plane: bool = False
    random_seed: int | None = None  # jitter and index choice; None = from os.urandom


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    peer: PublicKey
    initiator: bool


@dataclass(frozen=True, slots=True)
class HandshakeGaveUp:
    peer: PublicKey


@dataclass(frozen=True, slots=True)
class EndpointChanged:
    peer: PublicKey
    endpoint: Address


@dataclass(frozen=True, slots=True)
class KeypairsChanged:
    """The peer's keypair slots changed; data-plane workers replace their copy."""

    peer: PublicKey
    current: KeypairSnapshot | None
    previous: KeypairSnapshot | None
    next: KeypairSnapshot | None


@dataclass(frozen=True, slots=True)
class KeepaliveRequested:
    """External data plane only: send a keepalive to this peer (it owns the counter)."""

    peer: PublicKey


@dataclass(frozen=True, slots=True)
class KeysZeroed:
    peer: PublicKey


Event = (
    HandshakeCompleted
    | HandshakeGaveUp
    | EndpointChanged
    | KeypairsChanged
    | KeepaliveRequested
    | KeysZeroed
)


# ---------------------------------------------------------------------------- peer


class Peer:
    """Everything the device keeps about one remote static key."""

    __slots__ = (
        "allowed_ips",
        "cookies",
        "endpoint",
        "extension_ok",
        "handshake",
        "keypairs",
        "last_handshake_wall",
        "last_received_at",
        "last_sent_at",
        "public_key",
        "rx_bytes",
        "staged",
        "timers",
        "tx_bytes",
    )

    def __init__(
        self,
        config: PeerConfig,
        local_static: PrivateKey,
        timer_config: TimerConfig,
        rng: random.Random,
        max_staged: int,
    ) -> None:
        self.public_key = config.public_key
        self.allowed_ips = config.allowed_ips
        self.endpoint = config.endpoint
        self.extension_ok = config.extension_ok
        self.handshake = Handshake(local_static, config.public_key, config.preshared_key)
        self.cookies = CookieGenerator(config.public_key, timer_config.cookie_refresh_time)
        self.timers = PeerTimers(timer_config, rng, config.persistent_keepalive)
        self.keypairs = KeypairSlots()
        self.staged: collections.deque[bytes] = collections.deque(maxlen=max_staged)
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.last_handshake_wall = 0.0
        # when transport messages last went out / came in; reports from data-plane workers
        # can arrive out of causal order, and the timers must not act on a stale one
        self.last_sent_at = float("-inf")
        self.last_received_at = float("-inf")

    def __repr__(self) -> str:
        return f"Peer({self.public_key.to_base64()[:8]}…, endpoint={self.endpoint})"


@dataclass(slots=True)
class _IndexEntry:
    peer: Peer
    keypair: Keypair | None  # None: the index names an in-progress handshake


# ---------------------------------------------------------------------------- device


class Device:
    """A WireGuard interface's protocol state, without I/O."""

    def __init__(self, config: DeviceConfig, random_bytes: Callable[[int], bytes] = os.urandom):
        self.config = config
        self._timer_config = config.timers
        self._random = random.Random(config.random_seed)
        self._static = config.private_key
        self._peers: dict[PublicKey, Peer] = {}
        self._indices: dict[int, _IndexEntry] = {}
        self.allowed_ips: AllowedIPs[Peer] = AllowedIPs()
        self._cookie_checker = CookieChecker(
            config.private_key.public_key, config.timers.cookie_refresh_time, random_bytes
        )
        self._load = LoadMonitor(config.under_load_threshold, config.timers.under_load_after_time)
        self._rate_limiter = RateLimiter()
        self._datagrams: list[tuple[bytes, Address]] = []
        self._tun: list[bytes] = []
        self._events: collections.deque[Event] = collections.deque()
        self.counters: collections.Counter[str] = collections.Counter()  # drops by reason
        self.stats: collections.Counter[str] = collections.Counter()  # everything else

    # ------------------------------------------------------------------ peers

    @property
    def public_key(self) -> PublicKey:
        return self._static.public_key

    def add_peer(self, config: PeerConfig) -> None:
        """Add a peer, or update an existing one in place (keys and sessions are kept)."""
        if config.public_key == self.public_key:
            raise ValueError("a device cannot be its own peer")
        peer = self._peers.get(config.public_key)
        if peer is None:
            try:
                peer = Peer(
                    config,
                    self._static,
                    self._timer_config,
                    self._random,
                    self.config.max_staged_packets,
                )
            except WeakPublicKey as exc:
                raise ValueError(f"unusable peer public key {config.public_key}") from exc
            self._peers[config.public_key] = peer
        else:
            peer.endpoint = config.endpoint or peer.endpoint
            peer.extension_ok = config.extension_ok
            peer.timers.persistent_keepalive_interval = config.persistent_keepalive
            if config.preshared_key != peer.handshake.preshared_key:
                peer.handshake.preshared_key = config.preshared_key
        peer.allowed_ips = config.allowed_ips
        self.allowed_ips.remove_value(peer)
        for prefix in config.allowed_ips:
            self.allowed_ips.insert(prefix, peer)

    def remove_peer(self, public_key: PublicKey) -> None:
        peer = self._peers.pop(public_key, None)
        if peer is None:
            return
        self.allowed_ips.remove_value(peer)
        self._zero_peer(peer)
        peer.timers.stop()

    def peer(self, public_key: PublicKey) -> Peer:
        return self._peers[public_key]

    @property
    def peers(self) -> Iterable[Peer]:
        return self._peers.values()

    # ------------------------------------------------------------------ outputs

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out, self._datagrams = self._datagrams, []
        return out

    def tun_writes(self) -> list[bytes]:
        out, self._tun = self._tun, []
        return out

    def events(self) -> list[Event]:
        out = list(self._events)
        self._events.clear()
        return out

    def next_deadline(self) -> float | None:
        deadlines = [d for p in self._peers.values() if (d := p.timers.next_deadline()) is not None]
        return min(deadlines) if deadlines else None

    # ------------------------------------------------------------------ inputs

    def send_packet(self, packet: bytes, now: float) -> None:
        """Route one IP packet from the TUN device to its peer (or stage it)."""
        destination = _destination(packet)
        if destination is None:
            self.counters["bad_inner_packet"] += 1
            return
        peer = self.allowed_ips.lookup(destination)
        if peer is None:
            self.counters["no_route"] += 1
            return
        if len(peer.staged) == peer.staged.maxlen:
            self.counters["staged_overflow"] += 1
        peer.staged.append(packet)
        self._send_staged(peer, now)

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """Handle one UDP datagram; malformed or unauthenticated input is counted and dropped."""
        try:
            kind = message_type(data)
            if kind == MESSAGE_TRANSPORT:
                self._receive_transport(data, addr, now)
            elif kind in (MESSAGE_INITIATION, MESSAGE_RESPONSE):
                self._receive_handshake(kind, data, addr, now)
            elif kind == MESSAGE_COOKIE_REPLY:
                self._receive_cookie_reply(data, now)
            elif kind == MESSAGE_SUPER_FRAGMENT:
                self.counters["extension_in_core"] += 1  # handled by the data-plane engines
            else:
                self.counters["bad_type"] += 1
        except MalformedMessage as exc:
            self.counters[exc.reason] += 1
        except HandshakeError as exc:
            self.counters[exc.reason] += 1
        except TransportError as exc:
            self.counters[exc.reason] += 1

    def handle_timer(self, now: float) -> None:
        for peer in list(self._peers.values()):
            for action in peer.timers.expired(now):
                self._timer_action(peer, action, now)

    def note_backlog(self, queued_handshakes: int, now: float) -> None:
        """The runner reports handshake messages waiting; a long queue means under load."""
        self._load.note_backlog(queued_handshakes, now)

    # ------------------------------------------------------------------ external data plane

    def note_data_sent(
        self,
        public_key: PublicKey,
        send_counter: int,
        carried_data: bool,
        now: float,
        at: float | None = None,
    ) -> None:
        """A worker sent transport messages to this peer (counter = its next counter), last at
        `at` (default: now)."""
        peer = self._peers.get(public_key)
        if peer is None:
            return
        current = peer.keypairs.current
        if current is not None:
            current.send_counter = max(current.send_counter, send_counter)
        self._after_transport_sent(peer, carried_data, now, now if at is None else at)

    def note_transport_received(
        self,
        public_key: PublicKey,
        local_index: int,
        addr: Address,
        carried_data: bool,
        now: float,
        at: float | None = None,
    ) -> None:
        """A worker authenticated transport messages from this peer on keypair `local_index`,
        last at `at` (default: now)."""
        entry = self._indices.get(local_index)
        if entry is None or entry.keypair is None or entry.peer.public_key != public_key:
            return
        self._after_transport_received(
            entry.peer, entry.keypair, addr, carried_data, now, now if at is None else at
        )

    def request_handshake(self, public_key: PublicKey, now: float) -> None:
        """A worker has packets for this peer but no usable keypair."""
        peer = self._peers.get(public_key)
        if peer is not None:
            self._initiate(peer, now, retry=False)

    # ------------------------------------------------------------------ sending

    def _send_staged(self, peer: Peer, now: float) -> None:
        c = self._timer_config
        keypair = peer.keypairs.current
        if keypair is None or not keypair.usable_for_sending(
            now, c.reject_after_time, c.reject_after_messages
        ):
            self._initiate(peer, now, retry=False)
            return
        if self.config.external_data_plane:
            peer.staged.clear()
            return
        if not peer.staged:
            return
        if peer.endpoint is None:
            self.counters["no_endpoint"] += len(peer.staged)
            peer.staged.clear()
            return
        carried_data = False
        mtu = self.config.mtu
        while peer.staged:
            packet = peer.staged.popleft()
            carried_data = carried_data or bool(packet)
            message = keypair.seal(packet, mtu)
            peer.tx_bytes += len(message)
            self._datagrams.append((message, peer.endpoint))
        self._after_transport_sent(peer, carried_data, now)

    def _after_transport_sent(
        self, peer: Peer, carried_data: bool, now: float, at: float | None = None
    ) -> None:
        at = now if at is None else at
        timers = peer.timers
        timers.any_authenticated_packet_traversal(at)
        if at >= peer.last_received_at:  # nothing arrived after this send
            timers.any_authenticated_packet_sent()
            if carried_data:
                timers.data_sent(at)
        peer.last_sent_at = max(peer.last_sent_at, at)
        # keep the key fresh (sending side)
        keypair = peer.keypairs.current
        c = self._timer_config
        if keypair is not None and (
            keypair.send_counter > c.rekey_after_messages
            or (keypair.is_initiator and now - keypair.created > c.rekey_after_time)
        ):
            self._initiate(peer, now, retry=False)

    def _send_keepalive(self, peer: Peer, now: float) -> None:
        if self.config.external_data_plane:
            c = self._timer_config
            current = peer.keypairs.current
            if current is not None and current.usable_for_sending(
                now, c.reject_after_time, c.reject_after_messages
            ):
                self._events.append(KeepaliveRequested(peer.public_key))
            else:
                self._initiate(peer, now, retry=False)
            return
        if not peer.staged:
            peer.staged.append(b"")
        self._send_staged(peer, now)

    def _new_index(self, entry: _IndexEntry) -> int:
        while True:
            index = self._random.getrandbits(32)
            if index not in self._indices:
                self._indices[index] = entry
                return index

    def _initiate(self, peer: Peer, now: float, retry: bool) -> None:
        if not retry:
            peer.timers.handshake_attempts = 0
        hs = peer.handshake
        if now - hs.last_sent_at < self._timer_config.rekey_timeout:
            return
        hs.last_sent_at = now
        self._drop_handshake_index(hs)
        index = self._new_index(_IndexEntry(peer, None))
        message = create_initiation(hs, index, now + self.config.wall_clock_offset)
        packed = peer.cookies.add_macs(message.pack(), now)
        peer.timers.any_authenticated_packet_traversal(now)
        peer.timers.any_authenticated_packet_sent()
        if peer.endpoint is None:
            self.counters["no_endpoint"] += 1
        else:
            log.debug("%r: sending initiation (retry=%s)", peer, retry)
            peer.tx_bytes += len(packed)
            self._datagrams.append((packed, peer.endpoint))
            self.stats["initiations_sent"] += 1
        peer.timers.handshake_initiated(now)

    def _drop_handshake_index(self, hs: Handshake) -> None:
        entry = self._indices.get(hs.local_index)
        if entry is not None and entry.keypair is None:
            del self._indices[hs.local_index]

    # ------------------------------------------------------------------ receiving

    def _receive_handshake(self, kind: int, data: bytes, addr: Address, now: float) -> None:
        message: Initiation | Response = (
            Initiation.parse(data) if kind == MESSAGE_INITIATION else Response.parse(data)
        )
        if not self._cookie_checker.check_mac1(data):
            self.counters["bad_mac1"] += 1
            return
        self._load.note_handshake(now)
        if self._load.under_load(now):
            if not self._cookie_checker.check_mac2(data, addr, now):
                reply = self._cookie_checker.create_reply(data, message.sender, addr, now)
                self._datagrams.append((reply, addr))
                self.counters["needs_cookie"] += 1
                self.stats["cookie_replies_sent"] += 1
                return
            if not self._rate_limiter.allow(addr[0], now):
                self.counters["rate_limited"] += 1
                return
        if isinstance(message, Initiation):
            self._receive_initiation(message, data, addr, now)
        else:
            self._receive_response(message, data, addr, now)

    def _receive_initiation(
        self, message: Initiation, data: bytes, addr: Address, now: float
    ) -> None:
        opened = open_initiation(self._static, message)
        peer = self._peers.get(opened.remote_static)
        if peer is None:
            raise HandshakeError("unknown_peer", "initiation from an unconfigured static key")
        consume_initiation(
            peer.handshake, opened, now, self._timer_config.handshake_initiation_rate
        )
        peer.timers.any_authenticated_packet_traversal(now)
        peer.timers.any_authenticated_packet_received()
        self._set_endpoint(peer, addr)
        peer.rx_bytes += len(data)
        self.stats["initiations_received"] += 1
        self._send_response(peer, now)

    def _send_response(self, peer: Peer, now: float) -> None:
        hs = peer.handshake
        hs.last_sent_at = now
        self._drop_handshake_index(hs)
        entry = _IndexEntry(peer, None)
        index = self._new_index(entry)
        message = create_response(hs, index)
        packed = peer.cookies.add_macs(message.pack(), now)
        self._begin_session(peer, entry, now)
        peer.timers.session_derived(now)
        peer.timers.any_authenticated_packet_traversal(now)
        peer.timers.any_authenticated_packet_sent()
        assert peer.endpoint is not None  # just set from the initiation's source
        peer.tx_bytes += len(packed)
        self._datagrams.append((packed, peer.endpoint))
        self.stats["responses_sent"] += 1

    def _receive_response(self, message: Response, data: bytes, addr: Address, now: float) -> None:
        entry = self._indices.get(message.receiver)
        if entry is None or entry.keypair is not None:
            raise HandshakeError("unknown_index", "response to no pending initiation")
        peer = entry.peer
        consume_response(peer.handshake, message)
        self._set_endpoint(peer, addr)
        peer.rx_bytes += len(data)
        peer.timers.any_authenticated_packet_traversal(now)
        peer.timers.any_authenticated_packet_received()
        self._begin_session(peer, entry, now)
        peer.timers.session_derived(now)
        self._handshake_complete(peer, initiator=True, now=now)
        self._send_keepalive(peer, now)

    def _begin_session(self, peer: Peer, entry: _IndexEntry, now: float) -> None:
        keys = derive_keys(peer.handshake)
        keypair = Keypair(
            keys.send_key,
            keys.receive_key,
            keys.is_initiator,
            keys.local_index,
            keys.remote_index,
            created=now,
        )
        entry.keypair = keypair  # the handshake's index now names the keypair
        for dropped in peer.keypairs.install(keypair):
            self._indices.pop(dropped.local_index, None)
        self._keypairs_changed(peer)

    def _handshake_complete(self, peer: Peer, initiator: bool, now: float) -> None:
        peer.timers.handshake_complete()
        peer.last_handshake_wall = now + self.config.wall_clock_offset
        self.stats["handshakes_completed"] += 1
        self._events.append(HandshakeCompleted(peer.public_key, initiator))

    def _receive_cookie_reply(self, data: bytes, now: float) -> None:
        reply = CookieReply.parse(data)
        entry = self._indices.get(reply.receiver)
        if entry is None:
            self.counters["unknown_index"] += 1
            return
        if entry.peer.cookies.consume_reply(reply, now):
            self.stats["cookie_replies_received"] += 1
        else:
            self.counters["bad_cookie_reply"] += 1

    def _receive_transport(self, data: bytes, addr: Address, now: float) -> None:
        if len(data) < 32:
            raise TransportError("truncated")
        entry = self._indices.get(int.from_bytes(data[4:8], "little"))
        if entry is None or entry.keypair is None:
            raise TransportError("unknown_index")
        keypair = entry.keypair
        c = self._timer_config
        if now - keypair.created >= c.reject_after_time:
            raise TransportError("expired_keypair")
        packet = keypair.open(data, c.reject_after_messages)
        peer = entry.peer
        peer.rx_bytes += len(data)
        self._after_transport_received(peer, keypair, addr, bool(packet), now)
        if packet:
            self._tun.append(self._check_inner(peer, packet))  # raises on a bad packet
        else:
            self.stats["keepalives_received"] += 1

    def _check_inner(self, peer: Peer, packet: bytes) -> bytes:
        version = packet[0] >> 4
        if version == 4 and len(packet) >= 20:
            length = int.from_bytes(packet[2:4], "big")
            if length < 20 or length > len(packet):
                raise TransportError("bad_inner_packet")
            source = packet[12:16]
        elif version == 6 and len(packet) >= 40:
            length = 40 + int.from_bytes(packet[4:6], "big")
            if length > len(packet):
                raise TransportError("bad_inner_packet")
            source = packet[8:24]
        else:
            raise TransportError("bad_inner_packet")
        if self.allowed_ips.lookup(source) is not peer:
            raise TransportError("bad_inner_source")
        return packet[:length] if length < len(packet) else packet

    def _after_transport_received(
        self,
        peer: Peer,
        keypair: Keypair,
        addr: Address,
        carried_data: bool,
        now: float,
        at: float | None = None,
    ) -> None:
        at = now if at is None else at
        promoted, dropped = peer.keypairs.received_with(keypair)
        if promoted:
            if dropped is not None:
                self._indices.pop(dropped.local_index, None)
            self._keypairs_changed(peer)
            self._handshake_complete(peer, initiator=False, now=now)
            self._send_staged(peer, now)
        self._set_endpoint(peer, addr)
        # keep the key fresh (receiving side): the initiator rekeys before the keypair expires
        c = self._timer_config
        current = peer.keypairs.current
        timers = peer.timers
        if (
            not timers.sent_last_minute_handshake
            and current is not None
            and current.is_initiator
            and now - current.created > c.reject_after_time - c.keepalive_timeout - c.rekey_timeout
        ):
            timers.sent_last_minute_handshake = True
            self._initiate(peer, now, retry=False)
        timers.any_authenticated_packet_traversal(at)
        if at >= peer.last_sent_at:  # nothing went out after this receipt
            timers.any_authenticated_packet_received()
            if carried_data:
                timers.data_received(at)
        peer.last_received_at = max(peer.last_received_at, at)

    def _set_endpoint(self, peer: Peer, addr: Address) -> None:
        if peer.endpoint != addr:
            peer.endpoint = addr
            self._events.append(EndpointChanged(peer.public_key, addr))

    def _keypairs_changed(self, peer: Peer) -> None:
        slots = peer.keypairs

        def snap(k: Keypair | None) -> KeypairSnapshot | None:
            return k.snapshot() if k is not None else None

        self._events.append(
            KeypairsChanged(
                peer.public_key, snap(slots.current), snap(slots.previous), snap(slots.next)
            )
        )

    # ------------------------------------------------------------------ timers

    def _timer_action(self, peer: Peer, action: TimerAction, now: float) -> None:
        if action is TimerAction.RETRANSMIT_HANDSHAKE:
            log.debug("%r: handshake unanswered, retrying", peer)
            self._initiate(peer, now, retry=True)
        elif action is TimerAction.GIVE_UP_HANDSHAKE:
            log.info("%r: handshake did not complete, giving up", peer)
            peer.staged.clear()
            self._events.append(HandshakeGaveUp(peer.public_key))
        elif action is TimerAction.SEND_KEEPALIVE:
            self._send_keepalive(peer, now)
            peer.timers.keepalive_fired(now)
        elif action is TimerAction.NEW_HANDSHAKE:
            log.debug("%r: no reply to our data, starting a new handshake", peer)
            self._initiate(peer, now, retry=False)
        elif action is TimerAction.ZERO_KEY_MATERIAL:
            log.debug("%r: no new keys for 3 * REJECT_AFTER_TIME, zeroing", peer)
            self._zero_peer(peer)
            self._events.append(KeysZeroed(peer.public_key))
        elif action is TimerAction.PERSISTENT_KEEPALIVE:
            self._send_keepalive(peer, now)

    def _zero_peer(self, peer: Peer) -> None:
        for keypair in peer.keypairs.clear():
            self._indices.pop(keypair.local_index, None)
        self._drop_handshake_index(peer.handshake)
        peer.handshake.clear()
        peer.staged.clear()
        self._keypairs_changed(peer)


def _destination(packet: bytes) -> bytes | None:
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        return packet[16:20]
    if version == 6 and len(packet) >= 40:
        return packet[24:40]
    return None
