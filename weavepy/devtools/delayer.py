"""NFQUEUE delayer: netem-style delay, jitter and reordering for a sandbox node's link.

This kernel has no netem qdisc, so the sandbox sends a node's outgoing underlay packets to an
NFQUEUE (an iptables rule in the node's namespace) and this process holds each one for its
delay before accepting it. The rule it keeps: every queued packet gets exactly one verdict,
at its due time; on exit the kernel releases the rest (``--queue-bypass`` lets traffic flow
when no delayer listens). It speaks nfnetlink_queue directly (no C library needed).
"""

from __future__ import annotations

import argparse
import heapq
import logging
import random
import select
import signal
import socket
import struct
import time

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
AF_INET = 2
MAX_HELD = 4096


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(msg_type: int, queue: int, attrs: bytes, seq: int) -> bytes:
    body = struct.pack("=BBH", AF_INET, 0, socket.htons(queue)) + attrs
    header = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type,
                         NLM_F_REQUEST, seq, 0)
    return header + body


def _packet_ids(data: bytes) -> list[int]:
    """Packet ids from a buffer of netlink messages (malformed ones are skipped)."""
    ids: list[int] = []
    offset = 0
    while offset + 16 <= len(data):
        length, msg_type, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, offset)
        if length < 16 or offset + length > len(data):
            break
        if msg_type == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            pos = offset + 20  # nlmsghdr + nfgenmsg
            end = offset + length
            while pos + 4 <= end:
                alen, akind = struct.unpack_from("=HH", data, pos)
                if alen < 4:
                    break
                if akind & 0x7FFF == NFQA_PACKET_HDR and alen >= 10:
                    ids.append(struct.unpack_from("!I", data, pos + 4)[0])
                pos += (alen + 3) & ~3
        offset += (length + 3) & ~3
    return ids


def run(queue: int, delay_ms: float, jitter_ms: float, reorder: float, seed: int | None) -> None:
    rng = random.Random(seed)
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    seq = 1
    cmd = struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0)
    sock.send(_message(NFQNL_MSG_CONFIG, queue, _attr(NFQA_CFG_CMD, cmd), seq))
    params = struct.pack("!IB", 0, NFQNL_COPY_META)
    maxlen = struct.pack("!I", MAX_HELD)
    seq += 1
    sock.send(_message(NFQNL_MSG_CONFIG, queue,
                       _attr(NFQA_CFG_PARAMS, params) + _attr(NFQA_CFG_QUEUE_MAXLEN, maxlen), seq))
    held: list[tuple[float, int, int]] = []  # (due, order, packet id)
    order = 0
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("bound to queue %d", queue)
    log.info("delaying queue %d by %.1f ms +- %.1f ms, reorder %.3f",
             queue, delay_ms, jitter_ms, reorder)
    while not stopping:
        now = time.monotonic()
        while held and held[0][0] <= now:
            _due, _order, packet_id = heapq.heappop(held)
            seq += 1
            verdict = struct.pack("!II", NF_ACCEPT, packet_id)
            sock.send(_message(NFQNL_MSG_VERDICT, queue, _attr(NFQA_VERDICT_HDR, verdict), seq))
        timeout = max(0.0, held[0][0] - now) if held else 0.5
        ready, _, _ = select.select([sock], [], [], timeout)
        if not ready:
            continue
        data = sock.recv(1 << 16)
        now = time.monotonic()
        for packet_id in _packet_ids(data):
            if reorder > 0 and rng.random() < reorder:
                due = now
            else:
                wait = delay_ms + (rng.uniform(-jitter_ms, jitter_ms) if jitter_ms else 0.0)
                due = now + max(0.0, wait) / 1000.0
            order += 1
            heapq.heappush(held, (due, order, packet_id))
    sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queue", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--reorder", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    run(args.queue, args.delay_ms, args.jitter_ms, args.reorder, args.seed)


if __name__ == "__main__":
    main()
