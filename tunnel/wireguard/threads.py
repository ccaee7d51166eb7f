"""tunnel.wireguard.threads: the data plane in one plain thread of the control process.

Why a thread: a packet should cost one wake-up of the thread that moves it, not a pass of the
trio loop (epoll re-arm, scheduler, other tasks). `PlaneThread` polls the TUN, the UDP socket
and an eventfd; it reads one packet per ready fd and looks again (a poll is cheaper than the
exception a read of an empty fd raises), hands each read to its sans-IO engine (send.py,
receive.py) and sends or writes the result itself. One thread serves both directions: on this
2-core sandbox it measured cheaper per Gbit and faster than one thread per direction, whose
GIL hand-offs cost more than the overlap wins (bench wireguard_ab).

What the control plane needs leaves through `post`, a thread-safe callable (the trio side uses
`TrioToken.run_sync_soon`): handshake messages at once; reports (what the timers need) as
soon as nothing is left to read when urgent, otherwise every `REPORT_INTERVAL`, posted once
the thread has been quiet for `QUIET` (under steady traffic, at the latest after twice the
interval). A post wakes the trio loop, which then holds the GIL for a while: in the middle of
a round trip (a ping's answer arrives a few hundred microseconds after its request left), it
would delay the answer. With nothing read since the last report and nothing held, the thread
sleeps until a packet or a command arrives (an idle agent pays no wake-ups for it).

The rules it keeps: only this thread touches the engines (commands are applied here), so they
need no locks; a packet read is sent or written before anything is posted; the thread stops
when asked (`stop`, then `join`) and never outlives the fds it polls; an exception that
escapes the loop (a dead fd, a bug; not a bad packet, which the engines count) ends the thread
and is handed to `on_failure`, so the owner fails the plane visibly instead of running half a
device.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence

from tunnel.tun import MAX_READ
from tunnel.wireguard.plane import Address, PlaneCommand, Report
from tunnel.wireguard.receive import RxEngine
from tunnel.wireguard.send import TxEngine
from tunnel.wireguard.workers import (
    _GRO_ANCILLARY,
    REPORT_INTERVAL,
    Transmitter,
    gro_segment_size,
)

log = logging.getLogger(__name__)
_MSG_TRUNC = int(socket.MSG_TRUNC)  # a plain int: `&` on the IntFlag costs a microsecond
QUIET = 0.002  # seconds without a packet before routine reports are posted

Post = Callable[..., None]  # post(fn, *args): run fn(*args) on the control plane, soon


class TxSide:
    """TUN reads -> TxEngine -> UDP sends."""

    def __init__(self, tun_fd: int, engine: TxEngine, transmitter: Transmitter) -> None:
        self.fd = tun_fd
        self.engine = engine
        self.transmitter = transmitter
        self._buffers = [bytearray(MAX_READ)]
        self._view = memoryview(self._buffers[0])
        self.reads = 0

    def apply(self, commands: Sequence[PlaneCommand], now: float) -> None:
        for command in commands:
            self.transmitter.send(self.engine.apply(command, now))
        self.transmitter.flush()

    def read(self, now: float) -> None:
        """One TUN read (the poll said it is readable), sealed and sent or gathered."""
        try:
            size = os.readv(self.fd, self._buffers)
        except BlockingIOError:
            return
        self.reads += 1
        self.transmitter.send(self.engine.process(self._view[:size], now))

    def reports(self) -> list[Report]:
        self.engine.stats["tun_reads"] = self.reads
        self.engine.stats["udp_send_calls"] = self.transmitter.calls
        return self.engine.reports()


class RxSide:
    """UDP (GRO) reads -> RxEngine -> TUN writes, and handshake messages to post."""

    def __init__(self, sock: socket.socket, tun_fd: int, engine: RxEngine) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.tun_fd = tun_fd
        self.engine = engine
        self.reads = 0
        self.writes = 0

    def apply(self, commands: Sequence[PlaneCommand], now: float) -> None:
        for command in commands:
            self.engine.apply(command, now)
        self._write(self.engine.retry_held(now))

    def _write(self, packets: list[bytes | bytearray | memoryview]) -> None:
        for packet in packets:
            try:
                os.write(self.tun_fd, packet)
                self.writes += 1
            except OSError as exc:
                self.engine.counters[f"tun_write_error_{exc.errno}"] += 1

    def read(self, now: float) -> list[tuple[bytes, Address]]:
        """One UDP read (the poll said it is readable), opened and written to the TUN; the
        handshake messages it held (to post)."""
        engine = self.engine
        try:
            size, ancillary, flags, source = self.sock.recvmsg_into(
                engine.read_buffers(), _GRO_ANCILLARY
            )
        except BlockingIOError:
            return []
        except OSError as exc:
            engine.counters[f"recv_error_{exc.errno}"] += 1
            return []
        self.reads += 1
        if flags & _MSG_TRUNC:
            engine.counters["truncated_read"] += 1
            return []
        segment = gro_segment_size(ancillary, size)
        self._write(engine.process_read(size, segment, (source[0], source[1]), now))
        messages = engine.handshake_messages
        if messages:
            engine.handshake_messages = []
        return messages

    def reports(self) -> list[Report]:
        self.engine.stats["udp_reads"] = self.reads
        self.engine.stats["tun_writes"] = self.writes
        return self.engine.reports()


class PlaneThread:
    """The thread that serves one TX and one RX side; see the module docstring."""

    def __init__(
        self,
        name: str,
        tx: TxSide,
        rx: RxSide,
        post: Post,
        deliver: Callable[[list[Report]], None],
        handshakes: Callable[[list[tuple[bytes, Address]]], None],
        on_failure: Callable[[BaseException], None],
    ) -> None:
        self.name = name
        self.tx = tx
        self.rx = rx
        self._post = post
        self._deliver = deliver
        self._handshakes = handshakes
        self._on_failure = on_failure
        self._queue: collections.deque[PlaneCommand] = collections.deque()
        self._waker = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def command(self, commands: Sequence[PlaneCommand]) -> None:
        self._queue.extend(commands)
        os.eventfd_write(self._waker, 1)

    def stop(self) -> None:
        self._stopping = True
        os.eventfd_write(self._waker, 1)

    def join(self, timeout: float) -> bool:
        """Wait for the thread to end (after `stop`); whether it did within `timeout` s."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self) -> None:
        """Release the eventfd (after the thread has ended)."""
        if not self._thread.is_alive() and self._waker >= 0:
            os.close(self._waker)
            self._waker = -1

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            log.exception("wg data-plane thread %s failed", self.name)
            self._on_failure(exc)

    def _report(self) -> None:
        reports = self.tx.reports() + self.rx.reports()
        if reports:
            self._post(self._deliver, reports)

    def _urgent(self) -> bool:
        return self.tx.engine.has_urgent_reports or self.rx.engine.has_urgent_reports

    def _loop(self) -> None:
        tx, rx, waker = self.tx, self.rx, self._waker
        tun_fd, udp_fd = tx.fd, rx.fd
        flush, rx_engine = tx.transmitter.flush, rx.engine
        poller = select.poll()
        for fd in (tun_fd, udp_fd, waker):
            poller.register(fd, select.POLLIN)
        poll, monotonic = poller.poll, time.monotonic
        last_report = last_packet = busy_since = monotonic()
        idle = True
        unreported = False  # packets or commands since the last report
        while True:
            ready = poll(0)
            if not ready:
                flush()  # the reads are done: send what the transmitter gathered
                now = monotonic()
                idle = True
                wake: float | None = None  # in how many seconds there is work without a packet
                if rx_engine.holding:
                    rx_engine.expire_held(now)
                    wake = REPORT_INTERVAL
                if self._urgent():
                    self._report()
                elif unreported:
                    if now - last_report >= REPORT_INTERVAL and (
                        now - last_packet >= QUIET or now - last_report >= 2 * REPORT_INTERVAL
                    ):
                        last_report, unreported = now, False
                        self._report()
                    else:  # when the reports may go
                        due = max(last_report + REPORT_INTERVAL, last_packet + QUIET) - now
                        wake = due if wake is None else min(wake, due)
                # idle with nothing pending, the thread sleeps until a packet or a command
                ready = poll(-1 if wake is None else max(1, math.ceil(wake * 1000)))
                if not ready:
                    continue
            now = monotonic()
            if idle:
                idle, busy_since = False, now
            tun_ready = False
            for fd, _ in ready:
                if fd == tun_fd:
                    tun_ready = True
                    tx.read(now)
                elif fd == udp_fd:
                    messages = rx.read(now)
                    if messages:
                        self._post(self._handshakes, messages)
                else:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(waker)
                    if self._stopping:
                        return
                    commands = list(self._queue)
                    for _ in commands:
                        self._queue.popleft()
                    tx.apply(commands, now)
                    rx.apply(commands, now)
            last_packet, unreported = now, True
            if not tun_ready:
                flush()
            if now - last_report >= REPORT_INTERVAL and now - busy_since >= REPORT_INTERVAL:
                # busy for a whole interval: report anyway, after what was read went out
                flush()
                last_report, unreported = now, False
                self._report()
