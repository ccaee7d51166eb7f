"""The fast path with real pods behind bridges (bench.wireguard.PodNetwork), both ends ours.

- Super-packets reach the TUN from a real pod veth when the pod's gso_max_size is no larger
  than the TUN's, and do not when it is larger (docs/dataplane-facts.md): the TUN
  reads counted by our sending worker tell which.
- The super-packet extension carries pod traffic end to end, and a capture on the underlay
  sees only ciphertext.

Traffic is bounded: iperf3 -t 2 and echo exchanges with counts and timeouts.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bench.wireguard import TUN_GSO_MAX_SIZE, PodNetwork, _start_in, pod_ip
from tests.conftest import require_binary

pytestmark = [pytest.mark.netns]


def _stats(network: PodNetwork, kind: str) -> list[dict[str, Any]]:
    time.sleep(0.7)  # workers report their counters every half second
    return [status["stats"] for status in network.status(kind)]


@pytest.mark.timeout(90)
def test_super_packets_reach_the_tun_only_when_the_pod_gso_max_size_fits(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    require_binary("iperf3")
    box = sandbox_factory(nodes=2)
    network = PodNetwork(box, tmp_path)
    try:
        network.add_weavepy("weavepy-standard", extension=False, port=51821)
        results = {}
        for pod_gso in (TUN_GSO_MAX_SIZE, 65536):
            network.use("weavepy-standard", pod_gso_max_size=pod_gso)
            before = _stats(network, "weavepy-standard")[0]
            network.iperf(1, 2, [])
            after = _stats(network, "weavepy-standard")
            reads = after[0]["tx_tun_reads"] - before.get("tx_tun_reads", 0)
            gso = after[0].get("tx_tun_gso_reads", 0) - before.get("tx_tun_gso_reads", 0)
            results[pod_gso] = (gso, reads, after[1].get("rx_batches_merged", 0))
        gso_fit, reads_fit, merged = results[TUN_GSO_MAX_SIZE]
        gso_big, reads_big, _ = results[65536]
        # fits: nearly every read of the bulk direction is a super-packet
        assert reads_fit > 100 and gso_fit / reads_fit > 0.8, results
        # too large for the TUN: the kernel segments before the TUN, reads are single packets
        # (the few super-packets left are bursts that happened to stay under 62000 bytes)
        assert reads_big > 1000 and gso_big / reads_big < 0.2, results
        # and the receiving side coalesced our standard messages back into super-packets
        assert merged > 50, results
    finally:
        network.close()


MARKER = b"weavepy-plaintext-marker-" * 40


def _sniff(iface: str, seconds: float, enough: int) -> bytes:
    """Everything crossing `iface` (runs inside a node) until `enough` bytes or `seconds`."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
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


@pytest.mark.timeout(90)
def test_extension_carries_pod_traffic_and_the_underlay_sees_no_plaintext(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    require_binary("ping", "iputils-ping")
    box = sandbox_factory(nodes=2)
    network = PodNetwork(box, tmp_path)
    try:
        network.add_weavepy("weavepy-extension", extension=True, port=51822)
        network.use("weavepy-extension")
        assert network.ping(count=3) > 0
        payload = (MARKER * 50)[:60_000]  # one write is a super-packet's worth
        captured: list[bytes] = []
        sniffer = threading.Thread(
            target=lambda: captured.append(
                box.nodes[0].call(_sniff, "eth0", 15.0, 25 * len(payload), timeout=30)
            )
        )
        sniffer.start()
        time.sleep(1.0)
        server = _start_in(
            box,
            network.pods[1],
            "echo",
            [sys.executable, "-c", ECHO, pod_ip(2), "20", payload.hex(), "server"],
        )
        try:
            time.sleep(0.5)
            result = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    network.pods[0],
                    sys.executable,
                    "-c",
                    ECHO,
                    pod_ip(2),
                    "20",
                    payload.hex(),
                    "client",
                ],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
        finally:
            server.stop(timeout=2)
        sniffer.join()
        assert result.stdout.strip() == "20"
        wire = captured[0]
        assert len(wire) > 20 * len(payload)  # the exchange did cross this link
        assert MARKER[:32] not in wire
        stats = _stats(network, "weavepy-extension")
        assert stats[0]["tx_extension_messages_sent"] > 0
        assert stats[1]["rx_extension_messages_received"] > 0
        drops = [status["drops"] for status in network.status("weavepy-extension")]
        assert drops == [{}, {}], drops
    finally:
        network.close()
