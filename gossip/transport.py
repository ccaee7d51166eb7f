"""The trio transport: one UDP socket and one TCP listener that move bytes and time for a `Node`.

This module owns the sockets, the tasks and the clock, and no protocol logic. The rule it keeps:
everything the protocol decides is decided by the sans-IO `gossip.node.Node`; this layer only
feeds it (`receive_packet`, `accept_stream`, `stream_opened`, `stream_data`, `stream_closed`,
`stream_failed`, `handle_timer` at `next_deadline()`) and carries out what it returns (datagrams,
stream opens/sends/closes, member events, join results). It never blocks the event loop: UDP
sends are non-blocking `sendto` calls, the UDP receive path does nothing but hand datagrams to
the Node, and every stream runs in its own task.

Embedding
---------
An application (the weavepy agent, the standalone `python -m gossip agent`) embeds a node so::

    config = GossipConfig.lan()
    async with GossipService(config, "node-a", bind=("127.0.0.1", 7946),
                             keyring=Keyring([key]), delegate=my_delegate,
                             tags={"role": "weavepy"}) as svc:
        await svc.join(["127.0.0.1:7947"])      # push/pull with each seed; JoinError if none did
        events = svc.events()                   # a trio MemoryReceiveChannel of MemberEvent
        async for event in events:              #   join, update, suspect, alive, failed, leave
            ...
        svc.members()                           # list[Member], ourselves included, any state
        svc.send_user_message(b"...")           # gossiped to all; or to="node-b", reliable=True
        svc.update_tags({"role": "x"})          # re-announced with a higher incarnation
        await svc.leave(timeout=5.0)            # graceful: peers see us as `left`
        svc.stats                               # ServiceStats: node counters + transport counters

Leaving the `async with` block without `leave()` stops the node abruptly: to its peers that is a
crash, and they will declare it failed. `bind` may use port 0: the service then picks a port that
is free for both UDP and TCP and advertises it (read `svc.address`). `advertise` defaults to the
bind address and is required when binding a wildcard address.

The delegate's hooks (`gossip.node.Delegate`) run inside the event loop, synchronously, while the
Node handles a packet or a stream; they must be quick and must not block. There is one event
channel (buffer `event_buffer`); if the application stops reading, further events are dropped and
counted in `stats.transport["events_dropped"]` rather than growing memory without bound.

Tasks (all children of one nursery opened in `__aenter__`)
---------------------------------------------------------
* the UDP reader: wait until the socket is readable, hand each datagram to the Node;
* the timer: sleep in a cancel scope whose deadline is the Node's `next_deadline()`, moved
  earlier whenever an input makes the Node want to wake sooner; then `handle_timer(now)`;
* the TCP acceptor: each inbound connection becomes a stream task, at most
  `limits.max_concurrent_push_pull` at once (memberlist's maxPushPullRequests); more are closed
  at once and counted in `stats.transport["inbound_refused"]`;
* one task per stream (inbound or opened by the Node), running a reader and a writer. The
  Node's stream deadline ends in a `CloseStream`, which cancels a connect in progress or closes
  the connection once queued data is written; a backstop cancel scope of the same length (plus a
  second) bounds every stream task even if that never came.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import ipaddress
import logging
import math
import random
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import trio

from gossip.config import GossipConfig
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
from gossip.hostport import parse_host_port
from gossip.keyring import Keyring
from gossip.limits import DEFAULT_LIMITS, Limits
from gossip.node import Delegate, Node
from gossip.serfcompat import SerfIntents
from gossip.tags import encode_tags

logger = logging.getLogger(__name__)

DEFAULT_PORT = 7946  # memberlist / serf BindPort
DEFAULT_EVENT_BUFFER = 4096
DEFAULT_LEAVE_TIMEOUT = 5.0
UDP_RECEIVE_BUFFER = 2 * 1024 * 1024  # memberlist udpRecvBufSize
UDP_BATCH = 64  # datagrams handled per wake-up before yielding to other tasks
STREAM_READ_CHUNK = 64 * 1024
STREAM_BACKSTOP_GRACE = 1.0
TCP_BACKLOG = 128
BIND_ATTEMPTS = 20  # port 0: tries to find a port free for both UDP and TCP
ACCEPT_ERROR_PAUSE = 0.1


class JoinError(Exception):
    """No seed could be contacted; `results` says what happened with each."""

    def __init__(self, results: Sequence[JoinResult]) -> None:
        self.results = list(results)
        reasons = "; ".join(f"{_format_address(r.addr)}: {r.error}" for r in results)
        super().__init__(f"failed to join any seed ({reasons or 'no seeds given'})")


@dataclass(slots=True)
class ServiceStats:
    """The Node's protocol counters plus the transport's own (socket errors, refusals)."""

    node: Stats
    transport: collections.Counter[str] = field(default_factory=collections.Counter)

    def drops(self) -> collections.Counter[str]:
        """Every drop by reason: the Node's (bad input) and the transport's."""
        return self.node.drops + self.transport


class _ObservingDelegate:
    """Passes every hook to the application's delegate (if any), and lets `SerfIntents` watch
    serf's Lamport clocks go by in user messages and push/pull state (read only)."""

    def __init__(self, inner: Delegate | None, intents: SerfIntents | None) -> None:
        self._inner = inner
        self._intents = intents

    def node_meta(self, limit: int) -> bytes:
        return self._inner.node_meta(limit) if self._inner is not None else b""

    def notify_msg(self, payload: bytes) -> None:
        if self._intents is not None:
            self._intents.observe_user_message(payload)
        if self._inner is not None:
            self._inner.notify_msg(payload)

    def get_broadcasts(self, overhead: int, limit: int) -> list[bytes]:
        return self._inner.get_broadcasts(overhead, limit) if self._inner is not None else []

    def local_state(self, join: bool) -> bytes:
        return self._inner.local_state(join) if self._inner is not None else b""

    def merge_remote_state(self, buf: bytes, join: bool) -> None:
        if self._intents is not None:
            self._intents.observe_user_state(buf)
        if self._inner is not None:
            self._inner.merge_remote_state(buf, join)


class _Stream:
    """The transport's side of one TCP stream the Node knows by `id`."""

    __slots__ = (
        "closing",
        "connected",
        "core_done",
        "id",
        "inbound",
        "pending",
        "scope",
        "wakeup",
    )

    def __init__(self, stream_id: int, inbound: bool, backstop: float) -> None:
        self.id = stream_id
        self.inbound = inbound
        self.pending: collections.deque[bytes] = collections.deque()
        self.closing = False  # the Node asked to close (or the peer did): finish writing, close
        self.connected = inbound
        self.core_done = False  # the Node has forgotten this stream: tell it nothing more
        self.scope = trio.CancelScope(deadline=backstop)
        self.wakeup = trio.lowlevel.ParkingLot()


class GossipService:
    """One gossip member on the network: a `Node` driven by trio sockets and timers."""

    def __init__(
        self,
        config: GossipConfig,
        name: str,
        bind: tuple[str, int],
        advertise: tuple[str, int] | None = None,
        *,
        keyring: Keyring | None = None,
        delegate: Delegate | None = None,
        tags: Mapping[str, str] | None = None,
        meta: bytes | None = None,
        limits: Limits = DEFAULT_LIMITS,
        rng: random.Random | None = None,
        event_buffer: int = DEFAULT_EVENT_BUFFER,
        serf_compat: bool = True,
    ) -> None:
        if tags is not None and meta is not None:
            raise ValueError("give tags or meta, not both")
        self.config = config
        self.name = name
        self._bind = bind
        self._advertise = advertise
        self._keyring = keyring
        # With serf_compat, a leave also sends serf's leave intent, so serf says `left`.
        self._serf = SerfIntents() if serf_compat else None
        self._delegate = _ObservingDelegate(delegate, self._serf)
        self._meta = encode_tags(tags, limits.meta_max_size) if tags is not None else meta or b""
        self._limits = limits
        self._rng = rng if rng is not None else random.Random()
        self._event_send, self._event_receive = trio.open_memory_channel[MemberEvent](
            event_buffer
        )
        self._node: Node | None = None
        self._nursery: trio.Nursery | None = None
        self._exit_stack: contextlib.AsyncExitStack | None = None
        self._udp: socket.socket | None = None
        self._tcp: trio.socket.SocketType | None = None
        self._family = socket.AF_INET
        self._address: tuple[str, int] = bind
        self._address_advertised: tuple[str, int] = bind
        self._streams: dict[int, _Stream] = {}
        self._next_inbound_id = 0
        self._inbound_active = 0
        self._timer_scope: trio.CancelScope | None = None
        self._join_inbox: list[JoinResult] = []
        self._join_arrived = trio.lowlevel.ParkingLot()
        self._left = trio.Event()
        self.transport_stats: collections.Counter[str] = collections.Counter()

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> GossipService:
        await self._open_sockets()
        try:
            self._node = self._make_node()
        except BaseException:
            self._close_sockets()
            raise
        assert self._tcp is not None
        stack = contextlib.AsyncExitStack()
        try:
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            self._node.start(trio.current_time())
            self._flush()
            self._nursery.start_soon(self._udp_reader)
            self._nursery.start_soon(self._timer_loop)
            self._nursery.start_soon(self._acceptor, trio.SocketListener(self._tcp))
        except BaseException:
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
            await stack.aclose()
            self._close_sockets()
            raise
        self._exit_stack = stack
        return self

    def _make_node(self) -> Node:
        host, port = self._advertise if self._advertise is not None else self._address
        if self._advertise is not None and port == 0:
            port = self._address[1]
        advertised = _pack_ip(host)
        if advertised is None or _is_unspecified(host):
            raise ValueError(f"advertise address {host!r} must be a specific IP address")
        self._address_advertised = (host, port)
        return Node(
            self.config,
            self.name,
            advertised,
            port,
            meta=self._meta,
            keyring=self._keyring,
            delegate=self._delegate,
            rng=self._rng,
            limits=self._limits,
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._nursery is not None and self._exit_stack is not None
        self._nursery.cancel_scope.cancel()
        try:
            return await self._exit_stack.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # The body's own error, alone: hand it back as it was raised, not wrapped.
            if exc is not None and len(group.exceptions) == 1 and group.exceptions[0] is exc:
                raise exc from None
            raise
        finally:
            self._close_sockets()
            self._event_send.close()

    async def _open_sockets(self) -> None:
        host, port = self._bind
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        except ValueError:
            raise ValueError(f"bind address {host!r} must be an IP address") from None
        self._family = family
        last_error: OSError | None = None
        for _ in range(BIND_ATTEMPTS if port == 0 else 1):
            tcp = trio.socket.socket(family, socket.SOCK_STREAM)
            udp = socket.socket(family, socket.SOCK_DGRAM)
            try:
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                await tcp.bind((host, port))
                actual = tcp.getsockname()[1]
                udp.bind((host, actual))
            except OSError as exc:
                tcp.close()
                udp.close()
                last_error = exc
                if port == 0 and exc.errno == errno.EADDRINUSE:
                    continue
                raise OSError(exc.errno, f"cannot bind {host}:{port}: {exc.strerror}") from None
            tcp.listen(TCP_BACKLOG)
            udp.setblocking(False)
            try:
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
            except OSError:  # a smaller buffer still works; memberlist also just tries
                logger.debug("could not raise the UDP receive buffer")
            self._tcp, self._udp = tcp, udp
            self._address = (host, actual)
            return
        assert last_error is not None
        raise OSError(last_error.errno, f"cannot find a free port on {host}: {last_error}")

    def _close_sockets(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()

    # -- the application's API ---------------------------------------------------------------

    @property
    def node(self) -> Node:
        """The sans-IO core (read it; drive it only through this service)."""
        if self._node is None:
            raise RuntimeError("the service is not running; use `async with`")
        return self._node

    @property
    def address(self) -> tuple[str, int]:
        """The address and port we are bound to (the real port when port 0 was asked for)."""
        return self._address

    @property
    def advertise_address(self) -> tuple[str, int]:
        """The address and port peers reach us at."""
        return self._address_advertised

    @property
    def stats(self) -> ServiceStats:
        return ServiceStats(self.node.stats, self.transport_stats)

    def events(self) -> trio.MemoryReceiveChannel[MemberEvent]:
        """The channel of member events (our own join first). There is one: clone it to share."""
        return self._event_receive

    def members(self) -> list[Member]:
        """Every member the node knows of, ourselves included, in any state."""
        return self.node.members()

    async def join(self, seeds: Iterable[str | tuple[str, int]]) -> int:
        """Push/pull with every seed (`"host:port"` or `(host, port)`); return how many answered.

        Each attempt ends within the profile's `tcp_timeout`. Raise `JoinError` if none did.
        """
        addrs: list[Address] = []
        for seed in seeds:
            host, port = (
                parse_host_port(seed, default_port=DEFAULT_PORT) if isinstance(seed, str) else seed
            )
            addrs.append(await self._resolve(host, port))
        if not addrs:
            raise JoinError([])
        wanted = collections.Counter(addrs)
        results: list[JoinResult] = []
        self.node.join(addrs, trio.current_time())
        self._flush()
        # The Node ends every attempt by its stream deadline; the backstop only guards that.
        with trio.move_on_after(self.config.tcp_timeout + STREAM_BACKSTOP_GRACE):
            while wanted:
                results.extend(self._take_join_results(wanted))
                if wanted:
                    await self._join_arrived.park()
        for addr in wanted.elements():
            results.append(JoinResult(addr, False, error="no answer"))
        ok = sum(1 for r in results if r.ok)
        if not ok:
            raise JoinError(results)
        return ok

    def send_user_message(
        self, payload: bytes, to: str | None = None, *, reliable: bool = False
    ) -> None:
        """Gossip `payload` to everyone (`to` None), or send it to one member by UDP, or by TCP
        if `reliable`. The bytes reach the peers' delegate `notify_msg`."""
        self.node.send_user_message(to, payload, trio.current_time(), reliable=reliable)
        self._flush()

    def update_tags(self, tags: Mapping[str, str]) -> None:
        """Replace our serf tags (node metadata) and re-announce ourselves."""
        self.update_meta(encode_tags(tags, self._limits.meta_max_size))

    def update_meta(self, meta: bytes) -> None:
        """Replace our raw node metadata and re-announce ourselves."""
        self.node.update_meta(meta, trio.current_time())
        self._flush()

    async def leave(self, timeout: float = DEFAULT_LEAVE_TIMEOUT) -> bool:
        """Announce a graceful leave and wait until it went out (or `timeout`).

        Return True if the broadcast went out its full number of times (or nobody was left to
        tell). The node keeps answering until the service exits.
        """
        node = self.node
        now = trio.current_time()
        if self._serf is not None and any(
            m.state is MemberState.ALIVE and m.name != self.name for m in node.members()
        ):
            node.send_user_message(None, self._serf.leave_intent(self.name), now)
        node.leave(now, timeout)
        self._flush()
        with trio.move_on_after(timeout + STREAM_BACKSTOP_GRACE):
            await self._left.wait()
        return node.left

    # -- feeding the node and acting on its outputs --------------------------------------------

    def _flush(self) -> None:
        """Carry out everything the Node produced since the last input, then re-arm the timer."""
        node = self.node
        for data, addr in node.packets_to_send():
            self._send_datagram(data, addr)
        for action in node.stream_actions():
            self._apply(action)
        for event in node.events():
            self._publish(event)
        results = node.join_results()
        if results:
            self._join_inbox.extend(results)
            self._join_arrived.unpark_all()
        if node.left and not self._left.is_set():
            self._left.set()
        scope = self._timer_scope
        if scope is not None:
            deadline = node.next_deadline()
            if deadline is not None and deadline < scope.deadline:
                scope.deadline = deadline

    def _send_datagram(self, data: bytes, addr: Address) -> None:
        assert self._udp is not None
        target = self._socket_address(addr)
        if target is None:
            self.transport_stats["udp_bad_address"] += 1
            return
        try:
            self._udp.sendto(data, target)
        except BlockingIOError:
            self.transport_stats["udp_send_would_block"] += 1
        except OSError as exc:
            self.transport_stats["udp_send_error"] += 1
            logger.debug("sending a datagram to %s:%d failed: %s", target[0], target[1], exc)

    def _publish(self, event: MemberEvent) -> None:
        try:
            self._event_send.send_nowait(event)
        except trio.WouldBlock:
            self.transport_stats["events_dropped"] += 1
            logger.warning("event channel full; dropped %s %s", event.kind.value, event.name)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.transport_stats["events_dropped"] += 1

    def _take_join_results(self, wanted: collections.Counter[Address]) -> list[JoinResult]:
        taken: list[JoinResult] = []
        keep: list[JoinResult] = []
        for result in self._join_inbox:
            if wanted[result.addr] > 0:
                wanted[result.addr] -= 1
                if wanted[result.addr] == 0:
                    del wanted[result.addr]
                taken.append(result)
            else:
                keep.append(result)
        self._join_inbox = keep
        return taken

    # -- UDP -----------------------------------------------------------------------------------

    async def _udp_reader(self) -> None:
        udp = self._udp
        assert udp is not None
        node = self.node
        size = self._limits.udp_receive_size
        while True:
            await trio.lowlevel.wait_readable(udp)
            now = trio.current_time()
            for _ in range(UDP_BATCH):
                try:
                    data, source = udp.recvfrom(size)
                except BlockingIOError:
                    break
                except OSError as exc:  # e.g. an ICMP error queued on the socket
                    self.transport_stats["udp_receive_error"] += 1
                    logger.debug("UDP receive error: %s", exc)
                    continue
                addr = _node_address(source)
                if addr is None:
                    self.transport_stats["udp_bad_source"] += 1
                    continue
                node.receive_packet(data, addr, now)
            self._flush()

    # -- timers --------------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        node = self.node
        while True:
            deadline = node.next_deadline()
            with trio.CancelScope(deadline=math.inf if deadline is None else deadline) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            node.handle_timer(trio.current_time())
            self._flush()

    # -- TCP -----------------------------------------------------------------------------------

    async def _acceptor(self, listener: trio.SocketListener) -> None:
        assert self._nursery is not None
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: back off, keep serving
                self.transport_stats["tcp_accept_error"] += 1
                logger.warning("accepting a TCP connection failed: %s", exc)
                await trio.sleep(ACCEPT_ERROR_PAUSE)
                continue
            if self._inbound_active >= self._limits.max_concurrent_push_pull:
                self.transport_stats["inbound_refused"] += 1
                logger.warning("too many pending inbound streams; refusing one")
                await trio.aclose_forcefully(stream)
                continue
            try:
                addr = _node_address(stream.socket.getpeername())
            except OSError:  # the peer is already gone
                addr = None
            if addr is None:
                self.transport_stats["tcp_bad_source"] += 1
                await trio.aclose_forcefully(stream)
                continue
            self._next_inbound_id -= 1
            now = trio.current_time()
            handle = _Stream(self._next_inbound_id, True, self._backstop(now))
            self._streams[handle.id] = handle
            self._inbound_active += 1
            self._nursery.start_soon(self._run_stream, handle, None, stream)
            self.node.accept_stream(handle.id, addr, now)
            self._flush()

    def _backstop(self, now: float) -> float:
        return now + self.config.tcp_timeout + STREAM_BACKSTOP_GRACE

    def _apply(self, action: StreamAction) -> None:
        if isinstance(action, OpenStream):
            assert self._nursery is not None
            handle = _Stream(action.stream_id, False, self._backstop(trio.current_time()))
            self._streams[handle.id] = handle
            self._nursery.start_soon(self._run_stream, handle, action.addr, None)
            return
        handle_or_none = self._streams.get(action.stream_id)
        if handle_or_none is None:
            self.transport_stats["action_on_unknown_stream"] += 1
            return
        handle = handle_or_none
        if isinstance(action, StreamSend):
            handle.pending.append(action.data)
        elif isinstance(action, CloseStream):
            handle.core_done = True
            handle.closing = True
            if not handle.connected:
                handle.scope.cancel()
        handle.wakeup.unpark_all()

    async def _run_stream(
        self, handle: _Stream, connect_to: Address | None, stream: trio.SocketStream | None
    ) -> None:
        try:
            with handle.scope:
                if stream is None:
                    assert connect_to is not None
                    stream = await self._connect(handle, connect_to)
                    if stream is None:
                        return
                async with trio.open_nursery() as pair:
                    pair.start_soon(self._read_stream, handle, stream, pair.cancel_scope)
                    await self._write_stream(handle, stream)
                    pair.cancel_scope.cancel()
            if handle.scope.cancelled_caught and trio.current_time() >= handle.scope.deadline:
                self.transport_stats["stream_backstop"] += 1
                self._fail(handle, "stream outlived its deadline")
        finally:
            self._streams.pop(handle.id, None)
            if handle.inbound:
                self._inbound_active -= 1
            if stream is not None:
                await trio.aclose_forcefully(stream)

    async def _connect(self, handle: _Stream, addr: Address) -> trio.SocketStream | None:
        target = self._socket_address(addr)
        if target is None:
            self.transport_stats["tcp_bad_address"] += 1
            self._fail(handle, "bad address")
            return None
        sock = trio.socket.socket(self._family, socket.SOCK_STREAM)
        try:
            await sock.connect(target)
        except OSError as exc:
            sock.close()
            self.transport_stats["tcp_connect_error"] += 1
            logger.debug("connecting to %s:%d failed: %s", target[0], target[1], exc)
            self._fail(handle, str(exc))
            return None
        except BaseException:
            sock.close()
            raise
        stream = trio.SocketStream(sock)
        handle.connected = True
        if not handle.core_done:
            self.node.stream_opened(handle.id, trio.current_time())
            self._flush()
        return stream

    async def _write_stream(self, handle: _Stream, stream: trio.SocketStream) -> None:
        try:
            while True:
                while handle.pending:
                    await stream.send_all(handle.pending.popleft())
                if handle.closing:
                    return
                await handle.wakeup.park()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.transport_stats["tcp_write_error"] += 1
            self._fail(handle, f"write failed: {exc}")

    async def _read_stream(
        self, handle: _Stream, stream: trio.SocketStream, pair: trio.CancelScope
    ) -> None:
        node = self.node
        try:
            while not handle.core_done:
                data = await stream.receive_some(STREAM_READ_CHUNK)
                if not data:
                    handle.core_done = True
                    node.stream_closed(handle.id, trio.current_time())
                    self._flush()
                    break
                node.stream_data(handle.id, data, trio.current_time())
                self._flush()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.transport_stats["tcp_read_error"] += 1
            self._fail(handle, f"read failed: {exc}")
            pair.cancel()
            return
        # The Node is done with this stream (or the peer closed it): let the writer finish.
        handle.closing = True
        handle.wakeup.unpark_all()

    def _fail(self, handle: _Stream, reason: str) -> None:
        handle.closing = True
        handle.wakeup.unpark_all()
        if handle.core_done:
            return
        handle.core_done = True
        logger.debug("stream %d failed: %s", handle.id, reason)
        self.node.stream_failed(handle.id, trio.current_time())
        self._flush()

    # -- addresses -----------------------------------------------------------------------------

    def _socket_address(self, addr: Address) -> tuple[str, int] | None:
        ip, port = addr
        if len(ip) == 4:
            if self._family == socket.AF_INET:
                return socket.inet_ntop(socket.AF_INET, ip), port
            return "::ffff:" + socket.inet_ntop(socket.AF_INET, ip), port
        if len(ip) == 16 and self._family == socket.AF_INET6:
            return socket.inet_ntop(socket.AF_INET6, ip), port
        return None

    async def _resolve(self, host: str, port: int) -> Address:
        packed = _pack_ip(host)
        if packed is not None:
            return packed, port
        infos = await trio.socket.getaddrinfo(host, port, self._family, socket.SOCK_STREAM)
        if not infos:
            raise OSError(errno.ENOENT, f"cannot resolve {host!r}")
        resolved = _pack_ip(str(infos[0][4][0]))
        assert resolved is not None
        return resolved, port


def _pack_ip(host: str) -> bytes | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.packed
    return ip.packed


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _node_address(sockaddr: object) -> Address | None:
    """A socket address as the Node's (packed IP, port); IPv4-mapped IPv6 becomes IPv4."""
    if not isinstance(sockaddr, tuple) or len(sockaddr) < 2:
        return None
    packed = _pack_ip(str(sockaddr[0]))
    if packed is None:
        return None
    return packed, int(sockaddr[1])


def _format_address(addr: Address) -> str:
    ip, port = addr
    try:
        text = str(ipaddress.ip_address(ip))
    except ValueError:
        text = ip.hex()
    return f"[{text}]:{port}" if len(ip) == 16 else f"{text}:{port}"
