"""A userspace WireGuard interface: TUN + UDP socket around the sans-IO core, run by trio.

Shape (see plane.py, send.py, receive.py and workers.py for the data plane):

    control (this module, trio)          data plane
    core.Device (handshakes, timers) --> PlaneCommands --> TxEngine: TUN -> UDP
          ^   handshake messages, reports <--------------- RxEngine: UDP -> TUN

With `workers=True` (the default) each engine runs in its own process, so both cores work;
with `workers=False` both run in one plain thread of this process, beside the trio loop (what
the agent does; threads.py says why a thread and not the trio loop). Either way the control
plane is the same `core.Device` in external data-plane mode, and handshake messages go out
from here on the shared UDP socket.

`WireGuardInterface` is what the agent embeds (`run()` in its nursery, `set_peer`,
`remove_peer`, `status()`, and `events` for handshakes and roaming). `python -m
tunnel.wireguard.device CONFIG.json` runs one interface standalone (tests, benchmarks): it
writes its status to the config's `status_file` and re-reads peers on SIGHUP. A peer's
`endpoint` there is `[host, port]`, already parsed by whoever wrote the file.

The rule it keeps: everything it starts it stops (workers by PID, the data-plane thread by
joining it, on exit or cancellation) before it closes the fds they use, and nothing it receives
can crash it; drops are counted by reason in `status()`. A data-plane thread or worker that
dies fails `run()` with the reason, so the owner sees it and restarts the interface.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import trio

from tunnel.tun import FAST_PATH_GSO_MAX_SIZE, Tun
from tunnel.wireguard import core
from tunnel.wireguard.core import DeviceConfig, PeerConfig
from tunnel.wireguard.keys import PrivateKey, PublicKey
from tunnel.wireguard.plane import (
    DataReceived,
    DataSent,
    HandshakeNeeded,
    PlaneCommand,
    PlaneConfig,
    RemovePeer,
    Report,
    SetPeer,
    commands_for_event,
)
from tunnel.wireguard.receive import RxEngine
from tunnel.wireguard.send import TxEngine
from tunnel.wireguard.threads import PlaneThread, RxSide, TxSide
from tunnel.wireguard.timers import TimerConfig
from tunnel.wireguard.workers import (
    UDP_GRO,
    HandshakeMessages,
    Stop,
    Transmitter,
    WorkerReports,
    WorkerStats,
    plane_config_to_json,
)

log = logging.getLogger(__name__)

Address = tuple[str, int]
SOCKET_BUFFER = 8 << 20
JOIN_TIMEOUT = 5.0  # seconds to wait for the data-plane thread on close


@dataclass(frozen=True, slots=True)
class InterfaceConfig:
    name: str
    private_key: PrivateKey
    listen_port: int = 51820
    listen_address: str = "0.0.0.0"
    mtu: int = 1420
    addresses: tuple[str, ...] = ()
    peers: tuple[PeerConfig, ...] = ()
    workers: bool = True
    timers: TimerConfig = field(default_factory=TimerConfig)
    gso_max_size: int = FAST_PATH_GSO_MAX_SIZE
    max_datagram: int = 1472
    under_load_threshold: int = 128
    verify_checksums: bool = True


class WireGuardInterface:
    """One interface: create it, then `await run()` inside a nursery."""

    def __init__(self, config: InterfaceConfig) -> None:
        self.config = config
        self.core = core.Device(
            DeviceConfig(
                config.private_key,
                mtu=config.mtu,
                timers=config.timers,
                under_load_threshold=config.under_load_threshold,
                wall_clock_offset=time.time() - time.monotonic(),
                external_data_plane=True,
            )
        )
        self.plane_config = PlaneConfig(
            mtu=config.mtu,
            max_datagram=config.max_datagram,
            timers=config.timers,
            verify_checksums=config.verify_checksums,
        )
        self.events: list[core.Event] = []  # handshakes, roaming...; the owner drains it
        self.worker_stats: dict[str, WorkerStats] = {}
        self._peer_keys: dict[bytes, PublicKey] = {}
        self._sock: socket.socket | None = None
        self._tun: Tun | None = None
        self._planes: list[_Plane] = []
        self._wake = trio.Event()
        for peer in config.peers:
            self._add_peer_to_core(peer)

    # ------------------------------------------------------------------ management

    def set_peer(self, peer: PeerConfig) -> None:
        log.info(
            "%s: peer %s allowed %s endpoint %s",
            self.config.name,
            peer.public_key,
            ",".join(peer.allowed_ips),
            peer.endpoint,
        )
        self._add_peer_to_core(peer)
        self._broadcast(
            [SetPeer(peer.public_key.raw, peer.allowed_ips, peer.endpoint, peer.extension_ok)]
        )

    def remove_peer(self, public_key: PublicKey) -> None:
        self.core.remove_peer(public_key)
        self._peer_keys.pop(public_key.raw, None)
        self._broadcast([RemovePeer(public_key.raw)])
        self._flush_core()

    def status(self) -> dict[str, Any]:
        counters: Counter[str] = Counter(self.core.counters)
        stats: Counter[str] = Counter(self.core.stats)
        for plane in self._planes:
            plane_counters, plane_stats = plane.counters()
            counters.update(plane_counters)
            stats.update(plane_stats)
        peers = []
        for peer in self.core.peers:
            current = peer.keypairs.current
            peers.append(
                {
                    "public_key": peer.public_key.to_base64(),
                    "endpoint": f"{peer.endpoint[0]}:{peer.endpoint[1]}" if peer.endpoint else None,
                    "allowed_ips": list(peer.allowed_ips),
                    "extension_ok": peer.extension_ok,
                    "last_handshake": peer.last_handshake_wall,
                    "has_keypair": current is not None,
                    "keypair_index": current.local_index if current else None,
                }
            )
        return {
            "name": self.config.name,
            "ready": bool(self._planes) and all(plane.ready for plane in self._planes),
            "public_key": self.core.public_key.to_base64(),
            "listen_port": self.config.listen_port,
            "workers": self.config.workers,
            "drops": dict(counters),
            "stats": dict(stats),
            "peers": peers,
            "time": time.time(),
        }

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        tun = Tun(config.name)
        self._tun = tun
        sock = _open_socket(config.listen_address, config.listen_port)
        self._sock = sock
        try:
            tun.configure(
                mtu=config.mtu, addresses=config.addresses, gso_max_size=config.gso_max_size
            )
            planes: list[_Plane]
            if config.workers:
                planes = [
                    _WorkerPlane("tx", tun.fds[0], sock, self.plane_config),
                    _WorkerPlane("rx", tun.fds[0], sock, self.plane_config),
                ]
            else:
                planes = [_ThreadPlane(tun.fds[0], sock, self.plane_config)]
            self._planes = planes
            for peer in self.core.peers:
                self._broadcast(
                    [
                        SetPeer(
                            peer.public_key.raw, peer.allowed_ips, peer.endpoint, peer.extension_ok
                        )
                    ]
                )
            async with trio.open_nursery() as nursery:
                for plane in planes:
                    nursery.start_soon(plane.serve, self)
                nursery.start_soon(self._timers)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                for plane in self._planes:
                    await plane.close()
            self._planes = []
            sock.close()
            tun.close()

    async def _timers(self) -> None:
        while True:
            deadline = self.core.next_deadline()
            now = time.monotonic()
            wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - now))
            with trio.move_on_after(wait):
                await self._wake.wait()
            self._wake = trio.Event()
            self.core.handle_timer(time.monotonic())
            self._flush_core(wake_timers=False)

    # ------------------------------------------------------------------ plumbing

    def _add_peer_to_core(self, peer: PeerConfig) -> None:
        self.core.add_peer(peer)
        self._peer_keys[peer.public_key.raw] = peer.public_key

    def _broadcast(self, commands: list[PlaneCommand]) -> None:
        for plane in self._planes:
            plane.command(commands)

    def handle_datagram(self, data: bytes, source: Address) -> None:
        """A handshake or cookie message from the data plane."""
        self.core.receive_datagram(data, source, time.monotonic())
        self._flush_core()

    def handle_reports(self, reports: list[Report]) -> None:
        now = time.monotonic()
        for report in reports:
            key = self._peer_keys.get(report.peer)
            if key is None:
                continue
            if isinstance(report, DataSent):
                self.core.note_data_sent(
                    key, report.send_counter, report.carried_data, now, report.at
                )
            elif isinstance(report, DataReceived):
                self.core.note_transport_received(
                    key, report.local_index, report.endpoint, report.carried_data, now, report.at
                )
            elif isinstance(report, HandshakeNeeded):
                self.core.request_handshake(key, now)
        self._flush_core()

    def _flush_core(self, wake_timers: bool = True) -> None:
        """Send the core's datagrams, turn its events into plane commands, and let the timer
        task re-read the next deadline (unless the timer task itself is flushing)."""
        sock = self._sock
        for data, addr in self.core.datagrams_to_send():
            if sock is None:
                continue
            try:
                sock.sendto(data, addr)
            except OSError as exc:  # EAGAIN or unreachable: the protocol retries
                self.core.counters[f"handshake_send_error_{exc.errno}"] += 1
        commands: list[PlaneCommand] = []
        for event in self.core.events():
            commands.extend(commands_for_event(event))
            self.events.append(event)
            if not isinstance(event, core.KeypairsChanged | core.KeepaliveRequested):
                log.info("%s: %s", self.config.name, event)
        if len(self.events) > 1000:
            del self.events[:-1000]
        if commands:
            self._broadcast(commands)
        if wake_timers:
            self._wake.set()


SO_SNDBUFFORCE = 32  # set buffer sizes beyond net.core.*mem_max (we run with CAP_NET_ADMIN)
SO_RCVBUFFORCE = 33


def _open_socket(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
    sock.bind((address, port))
    return sock


class _Plane:
    ready = True  # the data plane is running (a worker has reported in)

    def command(self, commands: list[PlaneCommand]) -> None:
        raise NotImplementedError

    async def serve(self, owner: WireGuardInterface) -> None:
        raise NotImplementedError

    def counters(self) -> tuple[dict[str, int], dict[str, int]]:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class _WorkerPlane(_Plane):
    """One engine in a child process, driven over a socketpair."""

    def __init__(self, role: str, tun_fd: int, sock: socket.socket, config: PlaneConfig) -> None:
        self.role = role
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        theirs_fd = theirs.detach()
        self.conn = Connection(ours.detach())
        argv = [
            sys.executable,
            "-m",
            "tunnel.wireguard.workers",
            role,
            str(tun_fd),
            str(sock.fileno()),
            str(theirs_fd),
            plane_config_to_json(config),
        ]
        self.process = subprocess.Popen(argv, pass_fds=(tun_fd, sock.fileno(), theirs_fd))
        os.close(theirs_fd)
        self._stats = WorkerStats(role, {}, {})
        self.ready = False

    def command(self, commands: list[PlaneCommand]) -> None:
        for command in commands:
            try:
                self.conn.send(command)
            except OSError:
                log.warning("wg %s worker is gone", self.role)

    async def serve(self, owner: WireGuardInterface) -> None:
        conn = self.conn
        while True:
            await trio.lowlevel.wait_readable(conn.fileno())
            try:
                while conn.poll():
                    message = conn.recv()
                    if isinstance(message, WorkerReports):
                        owner.handle_reports(message.reports)
                    elif isinstance(message, HandshakeMessages):
                        for data, source in message.messages:
                            owner.handle_datagram(data, source)
                    elif isinstance(message, WorkerStats):
                        self._stats = message
                        self.ready = True
            except EOFError:
                code = self.process.poll()
                raise RuntimeError(f"wg {self.role} worker exited (code {code})") from None

    def counters(self) -> tuple[dict[str, int], dict[str, int]]:
        return self._stats.counters, {f"{self.role}_{k}": v for k, v in self._stats.stats.items()}

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(Stop())
        for _ in range(40):
            if self.process.poll() is not None:
                break
            await trio.sleep(0.05)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(OSError):
            self.conn.close()


class _ThreadPlane(_Plane):
    """Both engines in one plain thread of this process (threads.py), beside the trio loop:
    a packet costs one wake-up of that thread, never a pass of the trio loop."""

    def __init__(self, tun_fd: int, sock: socket.socket, config: PlaneConfig) -> None:
        self.tx = TxEngine(config)
        self.rx = RxEngine(config)
        sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
        os.set_blocking(tun_fd, False)
        sock.setblocking(False)
        self._thread = PlaneThread(
            "wg-data",
            TxSide(tun_fd, self.tx, Transmitter(sock, self.tx.counters)),
            RxSide(sock, tun_fd, self.rx),
            self._post,
            self._reports,
            self._handshakes,
            self._fail,
        )
        self._owner: WireGuardInterface | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._failure: BaseException | None = None
        self._failed = trio.Event()

    def command(self, commands: list[PlaneCommand]) -> None:
        self._thread.command(commands)

    async def serve(self, owner: WireGuardInterface) -> None:
        self._owner = owner
        self._token = trio.lowlevel.current_trio_token()
        self._thread.start()
        await self._failed.wait()
        raise RuntimeError(f"wg data-plane thread failed: {self._failure!r}")

    def _post(self, fn: Callable[..., object], *args: Any) -> None:
        """Run `fn(*args)` in the trio thread soon (callable from any thread). An exception
        there fails this plane (so `run()`), never the trio run itself."""
        token = self._token
        if token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._guarded, fn, args)

    def _guarded(self, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception as exc:
            log.exception("wg control plane failed on what the data-plane thread sent")
            self._fail_now(exc)

    def _fail(self, exc: BaseException) -> None:
        self._post(self._fail_now, exc)

    def _fail_now(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self._failed.set()

    def _reports(self, reports: list[Report]) -> None:
        if self._owner is not None:
            self._owner.handle_reports(reports)

    def _handshakes(self, messages: list[tuple[bytes, Address]]) -> None:
        if self._owner is not None:
            for data, source in messages:
                self._owner.handle_datagram(data, source)

    def counters(self) -> tuple[dict[str, int], dict[str, int]]:
        # dict() copies in one step under the GIL while the thread keeps counting
        counters = Counter(dict(self.tx.counters))
        counters.update(dict(self.rx.counters))
        stats = Counter(dict(self.tx.stats))
        stats.update(dict(self.rx.stats))
        return dict(counters), dict(stats)

    async def close(self) -> None:
        self._thread.stop()
        if not await trio.to_thread.run_sync(self._thread.join, JOIN_TIMEOUT):
            log.error("the wg data-plane thread did not stop within %g s", JOIN_TIMEOUT)
        self._thread.close()


# ---------------------------------------------------------------------------- standalone


def _endpoint(raw: object) -> Address | None:
    """A peer's endpoint in the standalone config: null, or `[host, port]` as its writer parsed
    it (this package parses no `host:port` text; weavepy's parser is gossip.hostport)."""
    if raw is None:
        return None
    if (
        not isinstance(raw, list)
        or len(raw) != 2
        or not isinstance(raw[0], str)
        or type(raw[1]) is not int
        or not 0 < raw[1] < 65536
    ):
        raise ValueError(f"endpoint must be [host, port] with a port in 1..65535, got {raw!r}")
    return raw[0], raw[1]


def peer_from_json(raw: dict[str, Any]) -> PeerConfig:
    psk = raw.get("preshared_key")
    return PeerConfig(
        public_key=PublicKey.from_base64(raw["public_key"]),
        allowed_ips=tuple(raw.get("allowed_ips", ())),
        endpoint=_endpoint(raw.get("endpoint")),
        preshared_key=PrivateKey.from_base64(psk).raw if psk else bytes(32),
        persistent_keepalive=float(raw.get("persistent_keepalive", 0)),
        extension_ok=bool(raw.get("extension_ok", False)),
    )


def config_from_json(raw: dict[str, Any]) -> InterfaceConfig:
    timers = TimerConfig(**raw.get("timers", {}))
    return InterfaceConfig(
        name=raw["name"],
        private_key=PrivateKey.from_base64(raw["private_key"]),
        listen_port=int(raw.get("listen_port", 51820)),
        listen_address=raw.get("listen_address", "0.0.0.0"),
        mtu=int(raw.get("mtu", 1420)),
        addresses=tuple(raw.get("addresses", ())),
        peers=tuple(peer_from_json(p) for p in raw.get("peers", ())),
        workers=bool(raw.get("workers", True)),
        timers=timers,
        gso_max_size=int(raw.get("gso_max_size", FAST_PATH_GSO_MAX_SIZE)),
        max_datagram=int(raw.get("max_datagram", 1472)),
        under_load_threshold=int(raw.get("under_load_threshold", 128)),
        verify_checksums=bool(raw.get("verify_checksums", True)),
    )


async def _serve_standalone(path: Path) -> None:
    raw = json.loads(path.read_text())
    config = config_from_json(raw)
    status_file = Path(raw["status_file"]) if raw.get("status_file") else None
    interface = WireGuardInterface(config)

    def reload() -> None:
        fresh = config_from_json(json.loads(path.read_text()))
        wanted = {p.public_key: p for p in fresh.peers}
        for existing in list(interface.core.peers):
            if existing.public_key not in wanted:
                interface.remove_peer(existing.public_key)
        for peer_config in wanted.values():
            interface.set_peer(peer_config)

    async with trio.open_nursery() as nursery:
        await nursery.start(interface.run)
        nursery.start_soon(_watch_signals, reload, nursery.cancel_scope.cancel)
        while True:
            if status_file is not None:
                temporary = status_file.with_suffix(".tmp")
                temporary.write_text(json.dumps(interface.status()))
                temporary.replace(status_file)
            await trio.sleep(0.1)


async def _watch_signals(reload: Callable[[], None], stop: Callable[[], None]) -> None:
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                reload()
            else:
                stop()
                return


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tunnel.wireguard.device CONFIG.json", file=sys.stderr)  # noqa: T201
        return 2
    level = json.loads(Path(args[0]).read_text()).get("log_level", "INFO")
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(message)s")
    trio.run(_serve_standalone, Path(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
