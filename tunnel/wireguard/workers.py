"""Data-plane worker processes: one moves TUN -> UDP (sealing), one UDP -> TUN (opening).

Why processes: the two directions are independent CPU-bound loops; in one process they share
the GIL (research: one process per direction is +12-41 %). Each worker is a plain blocking loop
around one sans-IO engine (send.py or receive.py): poll, drain up to `BATCH` reads, hand each to the
engine, send or write what it returns. No trio here: the loop is the hot path.

Plumbing. The control process (device.py) starts a worker with
`python -m tunnel.wireguard.workers ROLE CONFIG_JSON` and passes it three file descriptors
(`pass_fds`): the TUN queue, the UDP socket and its end of a Unix socketpair. Over that pair
(multiprocessing.connection framing, pickled objects between our own processes) control sends
`PlaneCommand`s and `Stop`; the worker sends back lists of `Report`s (every
REPORT_INTERVAL, at once when urgent), handshake messages it received (rx), and its
counters (`WorkerStats`, every STATS_INTERVAL). A worker whose control pipe closes exits: it
never outlives the device.

Shared descriptors share their file status flags: whoever sets O_NONBLOCK on the UDP socket
sets it for everyone, so senders here wait for POLLOUT on EAGAIN instead of assuming blocking.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from tunnel.tun import MAX_READ
from tunnel.wireguard.plane import PlaneConfig, Report, Send
from tunnel.wireguard.receive import RxEngine
from tunnel.wireguard.send import TxEngine
from tunnel.wireguard.timers import TimerConfig

log = logging.getLogger(__name__)

UDP_SEGMENT = 103
UDP_GRO = 104
BATCH = 64  # reads per wake-up before looking at the control pipe again
REPORT_INTERVAL = 0.1  # routine reports; urgent ones (handshakes, roaming) go at once
POLL_TIMEOUT_MS = 20
STATS_INTERVAL = 0.5
_GRO_ANCILLARY = socket.CMSG_SPACE(4)
_SEGMENT_SIZE = struct.Struct("=H")


@dataclass(frozen=True, slots=True)
class Stop:
    pass


@dataclass(frozen=True, slots=True)
class HandshakeMessages:
    messages: list[tuple[bytes, tuple[str, int]]]


@dataclass(frozen=True, slots=True)
class WorkerReports:
    reports: list[Report]


@dataclass(frozen=True, slots=True)
class WorkerStats:
    role: str
    counters: dict[str, int]
    stats: dict[str, int]


def plane_config_to_json(config: PlaneConfig) -> str:
    timers = {k: getattr(config.timers, k) for k in TimerConfig.__dataclass_fields__}
    return json.dumps(
        {
            "mtu": config.mtu,
            "max_datagram": config.max_datagram,
            "verify_checksums": config.verify_checksums,
            "timers": timers,
        }
    )


def plane_config_from_json(text: str) -> PlaneConfig:
    raw = json.loads(text)
    return PlaneConfig(
        mtu=raw["mtu"],
        max_datagram=raw["max_datagram"],
        verify_checksums=raw["verify_checksums"],
        timers=TimerConfig(**raw["timers"]),
    )


class Transmitter:
    """Sends `Send`s on a UDP socket: UDP GSO for runs, waiting out EAGAIN.

    Single datagrams of equal size to one endpoint (a burst of TCP ACKs, say) are gathered
    into one UDP GSO send; call `flush` when the batch of reads is done.
    """

    def __init__(self, sock: socket.socket, counters: Counter[str]) -> None:
        self.sock = sock
        self.counters = counters
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLOUT)
        self.calls = 0
        self._run = bytearray(65536)
        self._run_view = memoryview(self._run)
        self._run_length = 0
        self._run_count = 0
        self._run_size = 0
        self._run_endpoint: tuple[str, int] | None = None

    def send(self, sends: list[Send]) -> None:
        for item in sends:
            if item.segment_size or isinstance(item.data, list):
                self.flush()
                self._transmit(item.data, item.segment_size, item.endpoint)
                continue
            size = len(item.data)
            if self._run_count and (
                size != self._run_size
                or item.endpoint != self._run_endpoint
                or self._run_length + size > len(self._run)
                or self._run_count >= 64
            ):
                self.flush()
            at = self._run_length
            self._run_view[at : at + size] = item.data
            self._run_length = at + size
            self._run_count += 1
            self._run_size = size
            self._run_endpoint = item.endpoint

    def flush(self) -> None:
        if not self._run_count or self._run_endpoint is None:
            return
        segment = self._run_size if self._run_count > 1 else 0
        self._transmit(self._run_view[: self._run_length], segment, self._run_endpoint)
        self._run_length = self._run_count = 0

    def _transmit(
        self, data: memoryview | list[memoryview], segment_size: int, endpoint: tuple[str, int]
    ) -> None:
        sock = self.sock
        buffers = data if isinstance(data, list) else [data]
        for _ in range(100):
            try:
                if segment_size:
                    sock.sendmsg(
                        buffers,
                        [(socket.SOL_UDP, UDP_SEGMENT, _SEGMENT_SIZE.pack(segment_size))],
                        0,
                        endpoint,
                    )
                else:
                    sock.sendmsg(buffers, (), 0, endpoint)
                self.calls += 1
                return
            except BlockingIOError:
                self._poll.poll(100)
            except OSError as exc:
                self.counters[f"send_error_{exc.errno}"] += 1
                return
        self.counters["send_stalled"] += 1


def gro_segment_size(ancillary: list[tuple[int, int, bytes]], default: int) -> int:
    for level, kind, data in ancillary:
        if level == socket.SOL_UDP and kind == UDP_GRO and len(data) >= 2:
            return int.from_bytes(data[:4] if len(data) >= 4 else data[:2], sys.byteorder)
    return default


def _control_messages(conn: Connection, ready: list[tuple[int, int]]) -> list[Any] | None:
    """The control plane's commands waiting on `conn` if the poll said it is readable; None
    when the worker must stop (a `Stop` command, or the control process is gone)."""
    control_fd = conn.fileno()
    if not any(fd == control_fd for fd, _ in ready):
        return []
    messages = []
    try:
        while conn.poll():
            message = conn.recv()
            if isinstance(message, Stop):
                return None
            messages.append(message)
    except EOFError:
        return None
    return messages


def run_tx(tun_fd: int, sock: socket.socket, conn: Connection, config: PlaneConfig) -> None:
    """The sending loop: TUN reads -> TxEngine -> UDP."""
    engine = TxEngine(config)
    transmitter = Transmitter(sock, engine.counters)
    os.set_blocking(tun_fd, False)
    poller = select.poll()
    poller.register(tun_fd, select.POLLIN)
    poller.register(conn.fileno(), select.POLLIN)
    buffer = bytearray(MAX_READ)
    view = memoryview(buffer)
    readv = os.readv
    process = engine.process
    send = transmitter.send
    last_report = last_stats = 0.0
    reads = 0
    timeout = POLL_TIMEOUT_MS
    while True:
        ready = poller.poll(timeout)
        now = time.monotonic()
        commands = _control_messages(conn, ready)
        if commands is None:
            return
        if commands:
            for command in commands:
                send(engine.apply(command, now))
            transmitter.flush()
        for _ in range(BATCH):
            try:
                size = readv(tun_fd, [buffer])
            except BlockingIOError:
                break
            reads += 1
            send(process(view[:size], now))
        transmitter.flush()
        if engine.has_urgent_reports or now - last_report >= REPORT_INTERVAL:
            last_report = now
            reports = engine.reports()
            if reports:
                conn.send(WorkerReports(reports))
        if now - last_stats >= STATS_INTERVAL:
            last_stats = now
            engine.stats["tun_reads"] = reads
            engine.stats["udp_send_calls"] = transmitter.calls
            conn.send(WorkerStats("tx", dict(engine.counters), dict(engine.stats)))


def run_rx(tun_fd: int, sock: socket.socket, conn: Connection, config: PlaneConfig) -> None:
    """The receiving loop: UDP (GRO) reads -> RxEngine -> TUN writes; handshakes to control."""
    engine = RxEngine(config)
    sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(conn.fileno(), select.POLLIN)
    recvmsg_into = sock.recvmsg_into
    write = os.write
    process_read, read_buffers = engine.process_read, engine.read_buffers
    last_report = last_stats = 0.0
    reads = writes = 0
    dontwait = socket.MSG_DONTWAIT

    def write_all(packets: list[bytes | bytearray | memoryview]) -> None:
        nonlocal writes
        for packet in packets:
            try:
                write(tun_fd, packet)
                writes += 1
            except OSError as exc:
                engine.counters[f"tun_write_error_{exc.errno}"] += 1

    timeout = POLL_TIMEOUT_MS
    while True:
        ready = poller.poll(timeout)
        now = time.monotonic()
        commands = _control_messages(conn, ready)
        if commands is None:
            return
        if commands:
            for command in commands:
                engine.apply(command, now)
            write_all(engine.retry_held(now))
        engine.expire_held(now)
        for _ in range(BATCH):
            try:
                size, ancillary, flags, source = recvmsg_into(
                    read_buffers(), _GRO_ANCILLARY, dontwait
                )
            except BlockingIOError:
                break
            except OSError as exc:
                engine.counters[f"recv_error_{exc.errno}"] += 1
                break
            reads += 1
            if flags & socket.MSG_TRUNC:
                engine.counters["truncated_read"] += 1
                continue
            segment = gro_segment_size(ancillary, size)
            write_all(process_read(size, segment, (source[0], source[1]), now))
            if engine.handshake_messages:
                conn.send(HandshakeMessages(engine.handshake_messages))
                engine.handshake_messages = []
            if engine.has_urgent_reports:
                conn.send(WorkerReports(engine.reports()))
        if now - last_report >= REPORT_INTERVAL:
            last_report = now
            reports = engine.reports()
            if reports:
                conn.send(WorkerReports(reports))
        if now - last_stats >= STATS_INTERVAL:
            last_stats = now
            engine.stats["udp_reads"] = reads
            engine.stats["tun_writes"] = writes
            conn.send(WorkerStats("rx", dict(engine.counters), dict(engine.stats)))


def main(argv: list[str]) -> int:
    """python -m tunnel.wireguard.workers tx|rx TUN_FD UDP_FD CONTROL_FD CONFIG_JSON"""
    role, tun_fd, udp_fd, control_fd, config_json = argv
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s wg-{role} %(message)s")
    config = plane_config_from_json(config_json)
    sock = socket.socket(fileno=int(udp_fd))
    conn = Connection(int(control_fd))
    loop = run_tx if role == "tx" else run_rx
    try:
        loop(int(tun_fd), sock, conn, config)
    except (BrokenPipeError, ConnectionResetError, EOFError):
        pass  # control went away: so do we
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    # Run the module's importable twin, so the replies it pickles name
    # `tunnel.wireguard.workers` (which any parent can unpickle), not `__main__`.
    from tunnel.wireguard.workers import main as importable_main

    sys.exit(importable_main(sys.argv[1:]))
