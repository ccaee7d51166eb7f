"""The fast path with real pods behind bridges (weavepy.devtools.podnet), both ends ours.

- Super-packets reach the TUN from a real pod veth when the pod's gso_max_size is no larger
  than the TUN's, and do not when it is larger (docs/dataplane-facts.md): the TUN
  reads and messages counted by our sending side tell which. (How the receiving side merges
  messages back into super-packets depends on how they happen to arrive together; the merge
  itself is checked in test_wireguard_segment.py.)
- The super-packet extension carries pod traffic end to end, and a capture on the underlay
  sees only ciphertext.

These tests count what happened to a fixed amount of traffic; speed is bench.wireguard's.
Traffic is bounded: a fixed byte count over TCP, echo exchanges with counts and timeouts.
"""

from __future__ import annotations

import math
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_binary
from tunnel.tun import FAST_PATH_GSO_MAX_SIZE
from weavepy.devtools.podnet import PodPair, pod_ip

pytestmark = [pytest.mark.netns]

TRANSFER = 16 << 20  # bytes from pod 1 to pod 2 per case
MSS_MAX = 1420 - 40  # the largest TCP payload in one packet on the tunnel's MTU
PINNED_SEGMENTS = 48  # TCP's smallest super-packet, so its size does not follow the rate


def _counters(pods: PodPair, kind: str) -> list[dict[str, int]]:
    return [dict(status.get("stats", {})) for status in pods.status(kind)]


def _wait_counters(pods: PodPair, kind: str, what: str,
                   done: Callable[[list[dict[str, int]]], bool]) -> list[dict[str, int]]:
    """Poll the devices' reports (sent about twice a second) until `done`; bounded."""
    deadline = time.monotonic() + 20
    while True:
        found = _counters(pods, kind)
        if found and all(found) and done(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"the devices never reported {what}: {found}")
        time.sleep(0.1)


SINK = r"""
import socket, sys
host, size = sys.argv[1], int(sys.argv[2])
listener = socket.socket(); listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((host, 7200)); listener.listen(); listener.settimeout(30)
print("listening", flush=True)
conn, _ = listener.accept(); conn.settimeout(30)
received = 0
while chunk := conn.recv(1 << 20):
    received += len(chunk)
conn.sendall(str(received).encode()); conn.close()
"""

SOURCE = r"""
import socket, sys
host, size = sys.argv[1], int(sys.argv[2])
conn = socket.create_connection((host, 7200), timeout=30)
block = bytes(1 << 20)
sent = 0
while sent < size:
    sent += conn.send(block[: size - sent])
conn.shutdown(socket.SHUT_WR)
print(conn.recv(64).decode())
"""


def _transfer(pods: PodPair, size: int, label: str) -> None:
    """TCP from pod 1 to pod 2: exactly `size` bytes, every one of them received. (`label`
    names the sink's log, which must be new for the wait below.)"""
    sink = pods.start_in_pod(2, label, [sys.executable, "-c", SINK, pod_ip(2), str(size)])
    try:
        deadline = time.monotonic() + 10
        while "listening" not in sink.log_text():
            assert sink.alive() and time.monotonic() < deadline, sink.log_text()
            time.sleep(0.05)
        received = pods.run_in_pod(
            1, [sys.executable, "-c", SOURCE, pod_ip(2), str(size)], timeout=120)
    finally:
        sink.stop(timeout=2)
    assert int(received) == size


@pytest.mark.timeout(180)
def test_super_packets_reach_the_tun_only_when_the_pod_gso_max_size_fits(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    pods = PodPair(sandbox_factory(nodes=2), tmp_path)
    pods.add_devices("standard", extension=False, port=51821)
    # TCP sizes its super-packets by its rate and the path's RTT; pin the smallest at 48
    # segments (more than 62000 bytes) so that what reaches the TUN depends only on the pod's
    # gso_max_size, however busy the machine is
    pods.run_in_pod(1, ["sysctl", "-qw", f"net.ipv4.tcp_min_tso_segs={PINNED_SEGMENTS}"])
    segments_at_least = math.ceil(TRANSFER / MSS_MAX)
    results = {}
    for pod_gso in (FAST_PATH_GSO_MAX_SIZE, 65536):
        pods.use("standard", pod_gso_max_size=pod_gso)
        before = _wait_counters(pods, "standard", "their counters", lambda found: True)
        _transfer(pods, TRANSFER, f"sink-{pod_gso}")
        after = _wait_counters(
            pods, "standard", f"at least {segments_at_least} messages sent",
            lambda found, b=before: found[0].get("tx_messages_sent", 0)
            - b[0].get("tx_messages_sent", 0) >= segments_at_least)
        results[pod_gso] = {key: after[0].get(key, 0) - before[0].get(key, 0)
                            for key in ("tx_tun_reads", "tx_tun_gso_reads", "tx_messages_sent")}
    fits, too_big = results[FAST_PATH_GSO_MAX_SIZE], results[65536]
    # fits: the TUN hands over super-packets, nearly every read is one, and so there are far
    # fewer reads than segments
    assert fits["tx_tun_gso_reads"] * 5 > fits["tx_tun_reads"] * 4, results
    assert fits["tx_tun_reads"] * 4 < fits["tx_messages_sent"], results
    # too large for the TUN: the kernel segments a super-packet of 62000 bytes or more before
    # the TUN, so its segments arrive as single reads (45 or more per split super-packet);
    # the ones that happen to stay smaller still pass whole, so only that much is certain
    single_fit = fits["tx_tun_reads"] - fits["tx_tun_gso_reads"]
    single_big = too_big["tx_tun_reads"] - too_big["tx_tun_gso_reads"]
    assert single_big >= math.ceil(FAST_PATH_GSO_MAX_SIZE / MSS_MAX), results
    assert single_big > single_fit, results


MARKER = b"weavepy-plaintext-marker-" * 40
SO_RCVBUFFORCE = 33  # Linux; not in the socket module of Python 3.11


def _sniff(iface: str, seconds: float, enough: int) -> bytes:
    """Everything crossing `iface` (runs inside a node) until `enough` bytes or `seconds`."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)  # so no frame is missed
    sock.bind((iface, 0))
    sock.settimeout(0.1)
    seen = bytearray()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(seen) < enough:
        try:
            seen += sock.recv(65535)
        except TimeoutError:
            continue
    return bytes(seen)


ECHO = r"""
import socket, sys
host, count, payload = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
if sys.argv[4] == "server":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 7100)); s.listen(); s.settimeout(20)
    c, _ = s.accept(); c.settimeout(20)
    for _ in range(count):
        data = b""
        while len(data) < len(payload):
            data += c.recv(len(payload) - len(data))
        c.sendall(data)
else:
    c = socket.create_connection((host, 7100), timeout=10)
    ok = 0
    for _ in range(count):
        c.sendall(payload); data = b""
        while len(data) < len(payload):
            data += c.recv(len(payload) - len(data))
        ok += data == payload
    print(ok)
"""


@pytest.mark.timeout(120)
def test_extension_carries_pod_traffic_and_the_underlay_sees_no_plaintext(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    require_binary("ping", "iputils-ping")
    box = sandbox_factory(nodes=2)
    pods = PodPair(box, tmp_path)
    pods.add_devices("extension", extension=True, port=51822)
    pods.use("extension")
    pods.run_in_pod(1, ["ping", "-c", "3", "-i", "0.2", "-w", "10", pod_ip(2)])
    payload = (MARKER * 50)[:60_000]  # one write is a super-packet's worth
    captured: list[bytes] = []
    sniffer = threading.Thread(
        target=lambda: captured.append(
            box.nodes[0].call(_sniff, "eth0", 15.0, 25 * len(payload), timeout=30)
        )
    )
    sniffer.start()
    time.sleep(1.0)
    server = pods.start_in_pod(
        2, "echo", [sys.executable, "-c", ECHO, pod_ip(2), "20", payload.hex(), "server"])
    try:
        time.sleep(0.5)
        answered = pods.run_in_pod(
            1, [sys.executable, "-c", ECHO, pod_ip(2), "20", payload.hex(), "client"])
    finally:
        server.stop(timeout=2)
    sniffer.join()
    assert answered.strip() == "20"
    wire = captured[0]
    assert len(wire) > 20 * len(payload)  # the exchange did cross this link
    assert MARKER[:32] not in wire
    _wait_counters(pods, "extension", "extension messages both ways", lambda found: (
        found[0].get("tx_extension_messages_sent", 0) > 0
        and found[1].get("rx_extension_messages_received", 0) > 0))
    drops = [status["drops"] for status in pods.status("extension")]
    assert drops == [{}, {}], drops
