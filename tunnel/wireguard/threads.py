"""tunnel.wireguard.threads: the data plane in plain threads of the control process.

Why threads: a packet should cost one wake-up of the thread that moves it, not a pass of the
trio loop (epoll re-arm, scheduler, other tasks). Each side below is one direction around its
sans-IO engine (send.py, receive.py); a `PlaneThread` polls the fds of its sides plus an
eventfd, drains whatever is readable (up to `BATCH` reads per side) and sends or writes the
results itself. Commands reach a thread through its queue and eventfd; what the control plane
needs (reports, handshake messages) leaves through `post`, a thread-safe callable (the trio
side uses `TrioToken.run_sync_soon`).

The rules it keeps: only the thread that owns an engine touches it (commands are applied by
that thread), so engines need no locks; a thread stops when asked (`stop`, then `join`) and
never outlives the fds it polls; an exception that escapes a loop (a bug or a dead fd, not a
bad packet: the engines count those) ends the thread and is handed to `on_failure`, so the
owner fails the plane visibly instead of running half a device.
"""

from __future__ import annotations

import collections
import contextlib
import logging
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

Post = Callable[..., None]  # post(fn, *args): run fn(*args) on the control plane, soon


class TxSide:
    """TUN reads -> TxEngine -> UDP sends."""

    def __init__(self, tun_fd: int, engine: TxEngine, transmitter: Transmitter) -> None:
        self.fd = tun_fd
        self.engine = engine
        self.transmitter = transmitter
        self._buffer = bytearray(MAX_READ)
        self._buffers = [self._buffer]
        self._view = memoryview(self._buffer)
        self.reads = 0

    def apply(self, commands: Sequence[PlaneCommand], now: float) -> None:
        for command in commands:
            self.transmitter.send(self.engine.apply(command, now))
        self.transmitter.flush()

    def read(self, now: float) -> None:
        """One TUN read (the poll said it is readable), sealed and queued or sent."""
        try:
            size = os.readv(self.fd, self._buffers)
        except BlockingIOError:
            return
        self.reads += 1
        self.transmitter.send(self.engine.process(self._view[:size], now))

    def idle(self) -> None:
        """Nothing more to read for now: send what the transmitter gathered."""
        self.transmitter.flush()

    def urgent(self) -> bool:
        return self.engine.has_urgent_reports

    def reports(self, post: Post, deliver: Callable[[list[Report]], None]) -> None:
        self.engine.stats["tun_reads"] = self.reads
        self.engine.stats["udp_send_calls"] = self.transmitter.calls
        reports = self.engine.reports()
        if reports:
            post(deliver, reports)


class RxSide:
    """UDP (GRO) reads -> RxEngine -> TUN writes; handshake messages to the control plane."""

    def __init__(
        self,
        sock: socket.socket,
        tun_fd: int,
        engine: RxEngine,
        post: Post,
        handshakes: Callable[[list[tuple[bytes, Address]]], None],
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.tun_fd = tun_fd
        self.engine = engine
        self._post = post
        self._handshakes = handshakes
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

    def read(self, now: float) -> None:
        """One UDP read (the poll said it is readable): opened and written to the TUN."""
        engine = self.engine
        try:
            size, ancillary, flags, source = self.sock.recvmsg_into(
                engine.read_buffers(), _GRO_ANCILLARY
            )
        except BlockingIOError:
            return
        except OSError as exc:
            engine.counters[f"recv_error_{exc.errno}"] += 1
            return
        self.reads += 1
        if flags & _MSG_TRUNC:
            engine.counters["truncated_read"] += 1
            return
        segment = gro_segment_size(ancillary, size)
        self._write(engine.process_read(size, segment, (source[0], source[1]), now))
        if engine.handshake_messages:
            self._post(self._handshakes, engine.handshake_messages)
            engine.handshake_messages = []

    def idle(self) -> None:
        """Nothing more to read for now."""
        self.engine.expire_held(time.monotonic())

    def urgent(self) -> bool:
        return self.engine.has_urgent_reports

    def reports(self, post: Post, deliver: Callable[[list[Report]], None]) -> None:
        self.engine.stats["udp_reads"] = self.reads
        self.engine.stats["tun_writes"] = self.writes
        reports = self.engine.reports()
        if reports:
            post(deliver, reports)


Side = TxSide | RxSide


class PlaneThread:
    """One thread serving one or more sides; see the module docstring."""

    def __init__(
        self,
        name: str,
        sides: Sequence[Side],
        post: Post,
        deliver: Callable[[list[Report]], None],
        on_failure: Callable[[BaseException], None],
    ) -> None:
        self.name = name
        self.sides = list(sides)
        self._post = post
        self._deliver = deliver
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

    def _loop(self) -> None:
        poller = select.poll()
        sides = {side.fd: side for side in self.sides}
        for fd in sides:
            poller.register(fd, select.POLLIN)
        waker = self._waker
        poller.register(waker, select.POLLIN)
        poll, monotonic = poller.poll, time.monotonic
        idle_ms = int(REPORT_INTERVAL * 1000)
        last_report = monotonic()
        # Read while anything is readable (one read per ready fd, then look again: a poll is
        # cheaper than the exception a read of an empty fd raises). A side whose fd is not
        # ready finishes its batch (`idle`); when nothing is ready, block.
        while True:
            ready = poll(0)
            if not ready:
                for side in self.sides:
                    side.idle()
                ready = poll(idle_ms)
            now = monotonic()
            readable = {fd for fd, _ in ready}
            if waker in readable:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(waker)
                if self._stopping:
                    return
                commands = list(self._queue)
                for _ in commands:
                    self._queue.popleft()
                for side in self.sides:
                    side.apply(commands, now)
            if readable:
                for fd, side in sides.items():
                    if fd in readable:
                        side.read(now)
                    else:
                        side.idle()
            if now - last_report >= REPORT_INTERVAL or any(s.urgent() for s in self.sides):
                last_report = now
                for side in self.sides:
                    side.reports(self._post, self._deliver)
