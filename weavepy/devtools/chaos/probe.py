"""Pod-to-pod probes for chaos runs: a UDP echo prober that runs inside a pod's namespace.

It owns the probe wire format and the bookkeeping of outstanding probes. `ProbeLedger` is the
sans-IO core (fed send times, replies and the clock, returns finished results); `main` is the
thin loop that moves datagrams and time, answers other pods' probes, and writes one JSON line
per finished probe to stdout for the runner to read. The rules it keeps: a bounded rate (one
probe per target per interval), every probe ends exactly once (a reply before its deadline,
or a timeout), and malformed datagrams are counted and dropped.

Wire format (big-endian): magic ``b"WPPR"``, kind (0 request, 1 reply), sequence (u64).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import selectors
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["FinishedProbe", "ProbeLedger", "decode", "encode", "main"]

log = logging.getLogger(__name__)

MAGIC = b"WPPR"
HEADER = struct.Struct("!4sBQ")
REQUEST, REPLY = 0, 1
DEFAULT_PORT = 7799


class ProbeDecodeError(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode(kind: int, seq: int) -> bytes:
    return HEADER.pack(MAGIC, kind, seq)


def decode(data: bytes) -> tuple[int, int]:
    """(kind, seq) of a probe datagram; ProbeDecodeError(reason) if it is not one."""
    if len(data) != HEADER.size:
        raise ProbeDecodeError("bad_length")
    magic, kind, seq = HEADER.unpack(data)
    if magic != MAGIC:
        raise ProbeDecodeError("bad_magic")
    if kind not in (REQUEST, REPLY):
        raise ProbeDecodeError("bad_kind")
    return kind, seq


@dataclass(frozen=True)
class FinishedProbe:
    target: str
    sent: float
    deadline: float
    ok: bool
    rtt_ms: float | None

    def to_json(self) -> str:
        return json.dumps({"dst": self.target, "sent": self.sent, "deadline": self.deadline,
                           "ok": self.ok, "rtt_ms": self.rtt_ms})


@dataclass
class ProbeLedger:
    """Outstanding probes by sequence number. Times are the caller's monotonic seconds."""

    timeout: float
    next_seq: int = 1
    outstanding: dict[int, tuple[str, float]] = field(default_factory=dict)
    drops: Counter[str] = field(default_factory=Counter)

    def send(self, target: str, now: float) -> bytes:
        seq = self.next_seq
        self.next_seq += 1
        self.outstanding[seq] = (target, now)
        return encode(REQUEST, seq)

    def reply(self, data: bytes, now: float) -> FinishedProbe | None:
        try:
            kind, seq = decode(data)
        except ProbeDecodeError as exc:
            self.drops[exc.reason] += 1
            return None
        if kind != REPLY:
            self.drops["request_on_reply_path"] += 1
            return None
        entry = self.outstanding.pop(seq, None)
        if entry is None:
            self.drops["late_or_unknown_reply"] += 1  # duplicates and late replies land here
            return None
        target, sent = entry
        if now > sent + self.timeout:
            return FinishedProbe(target, sent, sent + self.timeout, False, None)
        return FinishedProbe(target, sent, sent + self.timeout, True,
                             round((now - sent) * 1000, 3))

    def expire(self, now: float) -> list[FinishedProbe]:
        done = [seq for seq, (_, sent) in self.outstanding.items() if now > sent + self.timeout]
        results = []
        for seq in done:
            target, sent = self.outstanding.pop(seq)
            results.append(FinishedProbe(target, sent, sent + self.timeout, False, None))
        return results


def answer(data: bytes) -> bytes | None:
    """The reply to a request datagram, or None if it is not a valid request."""
    try:
        kind, seq = decode(data)
    except ProbeDecodeError:
        return None
    return encode(REPLY, seq) if kind == REQUEST else None


def run(targets: dict[str, tuple[str, int]], port: int, interval: float, timeout: float,
        duration: float | None) -> None:
    """Answer probes on `port` and probe every target each `interval`, until killed."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("0.0.0.0", port))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("0.0.0.0", 0))
    server.setblocking(False)
    client.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ, "server")
    selector.register(client, selectors.EVENT_READ, "client")
    ledger = ProbeLedger(timeout)
    out = sys.stdout
    started = time.monotonic()
    next_round = started
    print(json.dumps({"ready": True, "port": port}), file=out, flush=True)
    while duration is None or time.monotonic() - started < duration:
        now = time.monotonic()
        if now >= next_round:
            for name, addr in targets.items():
                try:
                    client.sendto(ledger.send(name, now), addr)
                except OSError as exc:  # no route right now: the probe simply times out
                    log.debug("probe to %s: %s", name, exc)
            next_round += interval
            if next_round < now:  # we were stopped: do not burst to catch up
                next_round = now + interval
        for key, _ in selector.select(max(0.0, min(next_round, now + 0.05) - time.monotonic())):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            while True:
                try:
                    data, addr = sock.recvfrom(64)
                except BlockingIOError:
                    break
                if key.data == "server":
                    reply = answer(data)
                    if reply is not None:
                        with contextlib.suppress(OSError):
                            server.sendto(reply, addr)
                else:
                    finished = ledger.reply(data, time.monotonic())
                    if finished is not None:
                        print(finished.to_json(), file=out, flush=True)
        for finished in ledger.expire(time.monotonic()):
            print(finished.to_json(), file=out, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="UDP echo prober for weavepy chaos runs")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--target", action="append", default=[],
                        help="NAME=IP (repeatable): a pod to probe")
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=None)
    args = parser.parse_args(argv)
    targets = {}
    for spec in args.target:
        name, _, ip = spec.partition("=")
        targets[name] = (ip, args.port)
    run(targets, args.port, args.interval, args.timeout, args.duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
