"""The drop reader: listens to the policy table's NFLOG group in the node's network namespace
and feeds the drop log. The I/O shell of nflog.py and droplog.py.

This module owns the netlink socket: it binds the group (nflog.bind_requests), waits on the
socket with trio, reads everything that is there, decodes it, names the interfaces, hands
each packet to the `DropLog` and writes the lines it returns. The rule it keeps: **nothing
runs while nothing is dropped** (one `wait_readable`, no timer), and a lost or malformed
message is counted, never fatal: the kernel's `ENOBUFS` (the socket's buffer overflowed) is
counted as `overflows` and reading goes on.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import trio

from weavepy.policy.compiler import CompiledPolicy
from weavepy.policy.droplog import DropLog
from weavepy.policy.model import ClusterState
from weavepy.policy.nflog import (
    NETLINK_NETFILTER,
    LoggedPacket,
    NflogDecoder,
    bind_requests,
    parse_acks,
)

__all__ = ["DropReader", "NflogBindError", "NflogSocket"]

log = logging.getLogger(__name__)

RECEIVE_BUFFER = 1 << 20
READ_SIZE = 1 << 16


class NflogBindError(OSError):
    """The kernel refused to make this socket the group's listener (EBUSY: another process
    listens to the group, EPERM: no CAP_NET_ADMIN)."""


class NflogSocket:
    """A netlink socket bound to one NFLOG group in the caller's network namespace."""

    def __init__(self, group: int) -> None:
        self.group = group
        self.overflows = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            self.sock.bind((0, 0))
            self._configure()
        except BaseException:
            self.sock.close()
            raise
        self.sock.setblocking(False)

    def _configure(self) -> None:
        self.sock.settimeout(5.0)
        for seq, request in enumerate(bind_requests(self.group, seq=1), start=1):
            self.sock.send(request)
            while True:
                acks = parse_acks(self.sock.recv(READ_SIZE))
                if seq in acks:
                    break
            if acks[seq]:
                raise NflogBindError(acks[seq], f"binding NFLOG group {self.group}: "
                                     f"{os.strerror(acks[seq])}")

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_available(self) -> list[bytes]:
        """Every datagram waiting on the socket, without blocking."""
        datagrams = []
        while True:
            try:
                datagrams.append(self.sock.recv(READ_SIZE))
            except BlockingIOError:
                return datagrams
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overflows += 1

    def close(self) -> None:
        self.sock.close()


def _interface_name(index: int | None) -> str | None:
    if index is None:
        return None
    try:
        return socket.if_indextoname(index)
    except OSError:
        return f"if{index}"


class DropReader:
    """Reads the NFLOG group and feeds `drops`. `snapshot` (the enforcer's) gives the live
    state and table; it is read when a drop arrives, and the drop log updated when the table
    changed. `clock` is monotonic (rate limits), `wallclock` stamps drops for status; `write`
    gets each log line (default: a warning)."""

    def __init__(self, drops: DropLog, group: int, *,
                 snapshot: Callable[[], tuple[ClusterState, CompiledPolicy | None]]
                 | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wallclock: Callable[[], float] = time.time,
                 write: Callable[[str], None] | None = None) -> None:
        self.drops = drops
        self.group = group
        self.decoder = NflogDecoder()
        self.clock = clock
        self.wallclock = wallclock
        self.write = write or log.warning
        self.snapshot = snapshot
        self.socket: NflogSocket | None = None
        self._seen: CompiledPolicy | None = None

    def handle(self, datagram: bytes) -> None:
        packets = self.decoder.feed(datagram)
        if packets and self.snapshot is not None:
            state, compiled = self.snapshot()
            if compiled is not None and compiled is not self._seen:
                self.drops.update(state, compiled)
                self._seen = compiled
        for packet in packets:
            named = replace(packet, in_name=_interface_name(packet.physindev or packet.indev),
                            out_name=_interface_name(packet.physoutdev or packet.outdev))
            self._observe(named)

    def _observe(self, packet: LoggedPacket) -> None:
        for line in self.drops.observe(packet, self.clock(), at=self.wallclock()):
            self.write(line)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        """Bind the group, report started, then read until cancelled."""
        nflog = NflogSocket(self.group)
        self.socket = nflog
        try:
            task_status.started()
            while True:
                await trio.lowlevel.wait_readable(nflog.sock)
                for datagram in nflog.read_available():
                    self.handle(datagram)
        finally:
            nflog.close()

    def counts(self) -> Counter[str]:
        """What was not a drop: the decoder's counts, and socket buffer overflows."""
        counts = Counter(self.decoder.counts)
        if self.socket is not None and self.socket.overflows:
            counts["overflows"] = self.socket.overflows
        return counts

    def status(self) -> dict[str, Any]:
        return {**self.drops.status(), "group": self.group, "errors": dict(self.counts())}
