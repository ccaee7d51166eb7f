"""Interop and hostile-input tests against Debian's wireguard-go + wg, in sandbox namespaces.

Node n1 runs our device (`python -m tunnel.wireguard.device`), node n2 runs `wireguard-go`
configured with `wg set`; a third node, where present, plays an attacker. Tunnel addresses are
198.19.100.1 (ours) and 198.19.100.2 (wireguard-go). Every traffic source is bounded: `ping -c`,
numbered UDP streams, echo loops with counts and socket timeouts.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_binary
from tunnel.wireguard.cookie import LABEL_MAC1
from tunnel.wireguard.keys import PrivateKey, PublicKey, blake2s_hash, blake2s_mac

pytestmark = [pytest.mark.netns, pytest.mark.peer]

OURS, THEIRS = "198.19.100.1", "198.19.100.2"
PORT = 51820

ECHO_SERVER = r"""
import socket, sys, threading
kind, host, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if kind == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((host, port)); s.settimeout(20)
    for _ in range(count):
        data, addr = s.recvfrom(65535); s.sendto(data, addr)
else:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port)); s.listen(); s.settimeout(20)
    c, _ = s.accept(); c.settimeout(20)
    total = 0
    while total < count:
        data = c.recv(65536)
        if not data: break
        c.sendall(data); total += len(data)
"""

ECHO_CLIENT = r"""
import os, socket, sys
kind, host, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if kind == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
    ok = 0
    for i in range(count):
        payload = os.urandom(1000)
        s.sendto(payload, (host, port))
        try:
            if s.recvfrom(65535)[0] == payload: ok += 1
        except socket.timeout:
            pass
    print(ok)
else:
    import threading
    s = socket.create_connection((host, port), timeout=10)
    payload = os.urandom(count)
    sender = threading.Thread(target=s.sendall, args=(payload,), daemon=True)
    sender.start(); got = b""
    while len(got) < count:
        chunk = s.recv(65536)
        if not chunk: break
        got += chunk
    print(int(got == payload))
"""


class OurDevice:
    """Our device as a process in a node, configured by a JSON file, observed by its status."""

    def __init__(self, box: Any, node: Any, key: PrivateKey, directory: Path, **options: Any):
        self.node = node
        self.key = key
        self.config_path = directory / f"{node.name}-wg.json"
        self.status_path = directory / f"{node.name}-wg-status.json"
        self.config = {
            "name": box.prefix + "w",
            "private_key": key.to_base64(),
            "listen_port": PORT,
            "addresses": [f"{OURS}/24"],
            "status_file": str(self.status_path),
            **options,
        }
        self.write()
        self.process = node.start(
            "wg",
            [sys.executable, "-m", "tunnel.wireguard.device", str(self.config_path)],
            cwd=str(Path(__file__).resolve().parents[2]),
        )
        self.wait_for(lambda s: s["ready"], 30, "the device never became ready")

    def write(self) -> None:
        self.config_path.write_text(json.dumps(self.config))

    def set_peers(self, peers: list[dict[str, Any]]) -> None:
        self.config["peers"] = peers
        self.write()
        self.process.signal(1)  # SIGHUP: reload peers

    def status(self) -> dict[str, Any]:
        try:
            result: dict[str, Any] = json.loads(self.status_path.read_text())
            return result
        except (OSError, ValueError):
            return {"ready": False, "drops": {}, "stats": {}, "peers": []}

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.alive(), f"device died:\n{self.process.log_text()[-3000:]}"
            status = self.status()
            if predicate(status):
                return status
            time.sleep(0.1)
        raise AssertionError(f"{what}; status: {self.status()}\n{self.process.log_text()[-2000:]}")


class WireguardGo:
    def __init__(self, box: Any, node: Any, key: PrivateKey, directory: Path) -> None:
        self.node = node
        self.key = key
        self.name = box.prefix + "g"
        self.key_file = directory / f"{node.name}-wggo.key"
        self.key_file.write_text(key.to_base64())
        self.process = node.start(
            "wggo", ["wireguard-go", "-f", self.name], env={"WG_PROCESS_FOREGROUND": "1"}
        )
        deadline = time.monotonic() + 10
        while node.run(["ip", "link", "show", self.name], check=False).returncode != 0:
            assert time.monotonic() < deadline, self.process.log_text()
            time.sleep(0.05)
        node.run(
            ["wg", "set", self.name, "private-key", str(self.key_file), "listen-port", str(PORT)]
        )
        node.run(["ip", "addr", "add", f"{THEIRS}/24", "dev", self.name])
        node.run(["ip", "link", "set", self.name, "mtu", "1420", "up"])

    def set_peer(self, public: PublicKey, endpoint: str, allowed: str = f"{OURS}/32") -> None:
        self.node.run(
            [
                "wg",
                "set",
                self.name,
                "peer",
                public.to_base64(),
                "endpoint",
                endpoint,
                "allowed-ips",
                allowed,
            ]
        )

    def remove_peer(self, public: PublicKey) -> None:
        self.node.run(["wg", "set", self.name, "peer", public.to_base64(), "remove"])

    def latest_handshake(self, public: PublicKey) -> int:
        out = self.node.run(["wg", "show", self.name, "latest-handshakes"]).stdout
        for line in out.splitlines():
            key, _, when = line.partition("\t")
            if key == public.to_base64():
                return int(when)
        return 0


class Pair:
    def __init__(self, box: Any, directory: Path, **options: Any) -> None:
        require_binary("wireguard-go")
        require_binary("wg", "wireguard-tools")
        require_binary("ping", "iputils-ping")
        self.box = box
        self.n1, self.n2 = box.nodes[0], box.nodes[1]
        self.ours_key, self.theirs_key = PrivateKey.generate(), PrivateKey.generate()
        self.theirs = WireguardGo(box, self.n2, self.theirs_key, directory)
        self.theirs.set_peer(self.ours_key.public_key, f"{self.n1.underlay_ip}:{PORT}")
        self.ours = OurDevice(
            box, self.n1, self.ours_key, directory, peers=[self.peer_entry()], **options
        )

    def peer_entry(self, key: PublicKey | None = None) -> dict[str, Any]:
        return {
            "public_key": (key or self.theirs_key.public_key).to_base64(),
            "allowed_ips": [f"{THEIRS}/32"],
            "endpoint": [str(self.n2.underlay_ip), PORT],
        }

    def ping(self, node: Any, target: str, count: int = 3, deadline: int = 8) -> bool:
        """True if `count` echo replies come back within `deadline` seconds."""
        result = node.run(
            ["ping", "-c", str(count), "-i", "0.2", "-w", str(deadline), "-q", target],
            check=False,
            timeout=deadline + 5,
        )
        if result.returncode != 0:
            print(f"ping {target} from {node.name}: {result.stdout} {result.stderr}")
        return bool(result.returncode == 0)

    def handshakes(self) -> int:
        return int(self.ours.status()["stats"].get("handshakes_completed", 0))


def stat_at_least(name: str, value: int) -> Callable[[dict[str, Any]], bool]:
    return lambda status: int(status["stats"].get(name, 0)) >= value


def echo(server_node: Any, client_node: Any, host: str, kind: str, count: int) -> str:
    port = 7000 if kind == "tcp" else 7001
    server = server_node.start(
        f"echo-{kind}", [sys.executable, "-c", ECHO_SERVER, kind, host, str(port), str(count)]
    )
    try:
        time.sleep(0.3)
        return str(
            client_node.run(
                [sys.executable, "-c", ECHO_CLIENT, kind, host, str(port), str(count)], timeout=30
            ).stdout.strip()
        )
    finally:
        server.stop(timeout=2)


@pytest.mark.timeout(60)
def test_we_initiate_and_carry_tcp_and_udp_both_ways(sandbox_factory: Any, tmp_path: Path) -> None:
    pair = Pair(sandbox_factory(nodes=2), tmp_path)
    assert pair.ping(pair.n1, THEIRS)  # our side sends first: we initiate
    pair.ours.wait_for(stat_at_least("initiations_sent", 1), 5, "we never initiated")
    assert pair.theirs.latest_handshake(pair.ours_key.public_key) > 0
    # TCP both ways (a 2 MB echo: super-packets are segmented on our way out)
    assert echo(pair.n2, pair.n1, THEIRS, "tcp", 2_000_000) == "1"
    assert echo(pair.n1, pair.n2, OURS, "tcp", 2_000_000) == "1"
    # UDP both ways
    assert int(echo(pair.n2, pair.n1, THEIRS, "udp", 50)) >= 48
    assert int(echo(pair.n1, pair.n2, OURS, "udp", 50)) >= 48
    drops = pair.ours.status()["drops"]
    assert not {k: v for k, v in drops.items() if k not in ("replay",)}, drops


@pytest.mark.timeout(60)
def test_wireguard_go_initiates_data_plane_thread(sandbox_factory: Any, tmp_path: Path) -> None:
    pair = Pair(sandbox_factory(nodes=2), tmp_path, workers=False)
    assert pair.ping(pair.n2, OURS)  # their side sends first: they initiate
    status = pair.ours.wait_for(stat_at_least("responses_sent", 1), 5, "we never responded")
    assert status["stats"].get("initiations_sent", 0) == 0
    assert pair.ping(pair.n1, THEIRS)
    assert echo(pair.n1, pair.n2, OURS, "tcp", 1_000_000) == "1"


SEQUENCE_PORT = 7002
HELLO, READY = b"hello", b"ready"


def sequence_datagram(seq: int) -> bytes:
    """Datagram `seq` of a sequence stream: its number, then 960 bytes derived from it."""
    number = struct.pack("!Q", seq)
    return number + hashlib.blake2s(number).digest() * 30


def receive_sequence(host: str, count: int, idle: float) -> dict[str, Any]:
    """(Runs inside a node.) Receive a sequence stream of `count` datagrams on host; answer
    the sender's hellos; stop when all arrived or after `idle` seconds without a datagram.
    Returns what arrived: numbers missing, duplicated, damaged, and whether in order."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((host, SEQUENCE_PORT))
    sock.settimeout(idle)
    seen: list[int] = []
    damaged = 0
    while len(set(seen)) < count:
        try:
            data, sender = sock.recvfrom(65535)
        except TimeoutError:
            break
        if data == HELLO:
            sock.sendto(READY, sender)
            continue
        seq = struct.unpack("!Q", data[:8])[0] if len(data) >= 8 else -1
        if not 0 <= seq < count or data != sequence_datagram(seq):
            damaged += 1
            continue
        seen.append(seq)
    missing = sorted(set(range(count)) - set(seen))
    return {"received": len(set(seen)), "missing": missing[:20], "missing_count": len(missing),
            "duplicates": len(seen) - len(set(seen)), "damaged": damaged,
            "in_order": seen == sorted(seen)}


def send_sequence(host: str, count: int, gap: float) -> int:
    """(Runs inside a node.) Say hello until the receiver answers (so no datagram of the stream
    can arrive before it listens), then send the `count` datagrams `gap` seconds apart."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(0.2)
    for _ in range(100):
        sock.sendto(HELLO, (host, SEQUENCE_PORT))
        try:
            if sock.recv(16) == READY:
                break
        except TimeoutError:
            continue
    else:
        raise AssertionError(f"no receiver answered at {host}:{SEQUENCE_PORT}")
    for seq in range(count):
        sock.sendto(sequence_datagram(seq), (host, SEQUENCE_PORT))
        time.sleep(gap)
    return count


@pytest.mark.timeout(120)
def test_rekey_under_traffic_loses_nothing(sandbox_factory: Any, tmp_path: Path) -> None:
    """Numbered UDP datagrams both ways while our side rekeys every 2 s: every one arrives,
    once and intact (UDP, so a loss is seen, not retransmitted away)."""
    timers = {
        "rekey_after_time": 2.0,
        "reject_after_time": 4.0,
        "keepalive_timeout": 1.0,
        "rekey_timeout": 1.0,
    }
    count, gap = 2500, 0.002  # at least 5 s of traffic: two rekeys or more fall inside it
    pair = Pair(sandbox_factory(nodes=2), tmp_path, timers=timers)
    # 20 ms more on wireguard-go's way out, as on a long link: after each of our initiations
    # it keeps sending on the old session until our first packet on the new one reaches it,
    # so ten or so datagrams per rekey arrive here under the previous keypair.
    pair.n2.netem(delay_ms=20)
    assert pair.ping(pair.n1, THEIRS)
    before = pair.handshakes()
    results: dict[str, Any] = {}
    streams = [
        ("to wireguard-go", pair.n2, pair.n1, THEIRS),
        ("to us", pair.n1, pair.n2, OURS),
    ]
    receivers = [
        threading.Thread(target=lambda name=name, node=receiver, host=host: results.update(
            {name: node.call(receive_sequence, host, count, 10.0, timeout=90)}))
        for name, receiver, _, host in streams
    ]
    senders = [
        threading.Thread(target=lambda node=sender, host=host: node.call(
            send_sequence, host, count, gap, timeout=90))
        for _, _, sender, host in streams
    ]
    for thread in receivers + senders:
        thread.start()
    for thread in senders + receivers:
        thread.join()
    rekeys = pair.handshakes() - before
    assert rekeys >= 2, f"only {rekeys} handshakes while the traffic ran"
    for name, _, _, _ in streams:
        got = results[name]
        assert (got["missing_count"], got["duplicates"], got["damaged"]) == (0, 0, 0), (
            f"{name}: {got}; our drops: {pair.ours.status()['drops']}")
    # and a ping series across more rekeys loses nothing either (-c with -w: all or fail)
    assert pair.ping(pair.n1, THEIRS, count=10)


@pytest.mark.timeout(60)
def test_cookie_reply_interop_when_under_load(sandbox_factory: Any, tmp_path: Path) -> None:
    """Every handshake message finds us "under load": wireguard-go must decrypt our cookie
    reply (XChaCha20-Poly1305) and come back with a valid mac2 before we answer."""
    pair = Pair(sandbox_factory(nodes=2), tmp_path, under_load_threshold=0)
    assert pair.ping(pair.n2, OURS, deadline=15)  # wg-go retries after REKEY_TIMEOUT (5 s)
    status = pair.ours.wait_for(stat_at_least("responses_sent", 1), 5, "no response sent")
    assert status["stats"]["cookie_replies_sent"] >= 1
    assert status["drops"]["needs_cookie"] >= 1


def capture(iface: str, source: str, seconds: float) -> list[bytes]:
    """UDP payloads from `source` to our port seen on `iface` (runs inside a node), until one
    initiation and three data messages were seen or `seconds` passed."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    sock.bind((iface, 0))
    sock.settimeout(0.2)
    found: list[bytes] = []
    deadline = time.monotonic() + seconds
    wanted = socket.inet_aton(source)

    def enough() -> bool:
        data = [p for p in found if p[0] == 4 and len(p) > 32]
        return any(p[0] == 1 for p in found) and len(data) >= 3

    while not enough() and time.monotonic() < deadline:
        try:
            frame = sock.recv(65535)
        except TimeoutError:
            continue
        ip = frame[14:]
        if ip[9] != 17 or ip[12:16] != wanted:
            continue
        header = (ip[0] & 0x0F) * 4
        if struct.unpack(">H", ip[header + 2 : header + 4])[0] != PORT:
            continue
        found.append(ip[header + 8 :])
    return found


def send_datagrams(payloads: list[bytes], target: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for payload in payloads:
        sock.sendto(payload, (target, PORT))
        time.sleep(0.002)


@pytest.mark.timeout(60)
def test_replayed_truncated_and_forged_messages_are_dropped_and_counted(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    pair = Pair(sandbox_factory(nodes=2), tmp_path)
    caught: list[bytes] = []
    sniffer = threading.Thread(
        target=lambda: caught.extend(
            pair.n1.call(capture, "eth0", pair.n2.underlay_ip, 10.0, timeout=30)
        )
    )
    sniffer.start()
    time.sleep(0.5)
    assert pair.ping(pair.n2, OURS, count=4)  # wireguard-go initiates, then sends data
    sniffer.join()
    initiations = [p for p in caught if p[0] == 1]
    transports = [p for p in caught if p[0] == 4 and len(p) > 32]
    assert initiations and transports, [p[:4] for p in caught]
    forged_transport = bytearray(transports[0])
    forged_transport[8:16] = struct.pack("<Q", 1 << 40)
    forged_handshake = bytearray(initiations[0])
    forged_handshake[50] ^= 0x01
    hostile = [
        *transports,  # replays
        transports[0][:20],  # truncated
        bytes(forged_transport),  # fresh counter, wrong tag
        initiations[0],  # replayed initiation (timestamp not newer)
        bytes(forged_handshake),  # mac1 no longer matches
        initiations[0][:100],  # truncated handshake
        b"\x09\x00\x00\x00" + bytes(60),  # unknown type
    ]
    before = pair.ours.status()["drops"]
    pair.n2.call(send_datagrams, hostile, pair.n1.underlay_ip)
    expected = {
        "replay": len(transports),
        "truncated": 1,
        "decrypt_failed": 1,
        "handshake_replay": 1,
        "bad_mac1": 1,
        "bad_length": 1,
        "bad_type": 1,
    }

    def counted(status: dict[str, Any]) -> bool:
        drops = status["drops"]
        return all(drops.get(k, 0) - before.get(k, 0) >= n for k, n in expected.items())

    pair.ours.wait_for(counted, 5, "not every hostile message was counted")
    assert pair.ping(pair.n1, THEIRS)  # and the session is unharmed


@pytest.mark.timeout(60)
def test_a_wrong_static_key_never_completes_a_handshake(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    pair = Pair(sandbox_factory(nodes=2), tmp_path)
    impostor = PrivateKey.generate().public_key
    pair.ours.set_peers([pair.peer_entry(impostor)])  # we expect someone else at n2
    pair.ours.wait_for(
        lambda s: s["peers"] and s["peers"][0]["public_key"] == impostor.to_base64(),
        5,
        "reload did not apply",
    )
    assert not pair.ping(pair.n1, THEIRS, count=2, deadline=2)
    assert not pair.ping(pair.n2, OURS, count=2, deadline=2)
    status = pair.ours.wait_for(
        lambda s: s["drops"].get("unknown_peer", 0) >= 1,
        10,
        "wireguard-go's initiations were not refused as unknown",
    )
    assert status["stats"].get("handshakes_completed", 0) == 0
    assert pair.theirs.latest_handshake(pair.ours_key.public_key) == 0


def flood(target: str, public_b64: str, seconds: float, limit: int) -> int:
    """Handshake initiations with a valid mac1 and junk inside, as fast as we can (bounded)."""
    mac1_key = blake2s_hash(LABEL_MAC1, PublicKey.from_base64(public_b64).raw)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + seconds
    while sent < limit and time.monotonic() < deadline:
        body = b"\x01\x00\x00\x00" + os.urandom(112)
        try:
            sock.sendto(body + blake2s_mac(mac1_key, body) + bytes(16), (target, PORT))
            sent += 1
        except BlockingIOError:
            time.sleep(0.001)
    return sent


@pytest.mark.timeout(90)
def test_an_initiation_flood_gets_cookies_and_the_device_stays_responsive(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    box = sandbox_factory(nodes=3)
    pair = Pair(box, tmp_path, under_load_threshold=64)
    attacker = box.nodes[2]
    assert pair.ping(pair.n1, THEIRS)  # a session before the flood
    sent: list[int] = []
    flooder = threading.Thread(
        target=lambda: sent.append(
            attacker.call(
                flood,
                pair.n1.underlay_ip,
                pair.ours_key.public_key.to_base64(),
                8.0,
                60_000,
                timeout=40,
            )
        )
    )
    flooder.start()
    try:
        time.sleep(1.0)
        # the existing session keeps working during the flood
        assert pair.ping(pair.n1, THEIRS, count=5)
        # a fresh handshake from wireguard-go completes despite the flood (with a cookie)
        pair.theirs.remove_peer(pair.ours_key.public_key)
        pair.theirs.set_peer(pair.ours_key.public_key, f"{pair.n1.underlay_ip}:{PORT}")
        before = pair.ours.status()["stats"].get("responses_sent", 0)
        assert pair.ping(pair.n2, OURS, deadline=15)
        pair.ours.wait_for(stat_at_least("responses_sent", before + 1), 5, "no new handshake")
    finally:
        flooder.join()
    assert sent, "the flood did not finish"
    status = pair.ours.wait_for(stat_at_least("cookie_replies_sent", 100), 5, "few cookies")
    assert status["drops"]["needs_cookie"] > 100
    assert pair.ping(pair.n1, THEIRS)
