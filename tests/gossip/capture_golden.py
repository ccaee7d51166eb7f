"""Regenerate tests/gossip/golden/serf_captures.json: real bytes sent by Debian's serf.

How to run (needs only loopback; no root, no namespaces)::

    apt-get install -y serf           # Debian serf 0.9.4 = memberlist 0.2.2 + go-msgpack 0.5.5
    .venv/bin/python tests/gossip/capture_golden.py [--out tests/gossip/golden/serf_captures.json]

What it does (about 35 s): it starts serf agents on 127.0.0.1 (ports picked free at runtime in
20000-29999, every agent started and stopped by its PID), and a throwaway peer of ours built on
gossip.wire that joins them and records every UDP datagram and TCP stream serf sends it. Scenarios:

* plain: agents A and B (compression on, the default) and C (`-disable-compression`). Our peer
  joins A advertising a fake member X that never answers, so A sends us indirect pings and then
  gossips suspect/dead about X. We ping A over UDP and TCP, send indirect pings through A (one
  answered, one not: ack and nack), send A an encrypted stream it cannot read (errMsg), fire a
  user event and a query, let C join *us* (an uncompressed push/pull), stop B gracefully (a
  `dead` with From == Node), and finally go silent so serf suspects us (ping+suspect compound,
  TCP fallback pings).
* encrypted: agent E with `-encrypt`; our peer joins with the same key (encrypted streams and
  packets); the key is stored next to the captures so tests can decrypt them.

Captures are classified by their layering and message types ("shape"); up to three per shape are
kept. The script prints each serf [ERR]/[WARN] log line it saw, so a regression in what *we* send
shows up here too. Nothing in it runs during the unit tests, which only read the JSON.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from gossip import lzw  # noqa: E402
from gossip.keyring import Keyring  # noqa: E402
from gossip.messages import (  # noqa: E402
    Ack,
    DecodeError,
    IndirectPing,
    MessageType,
    NodeStateCode,
    Ping,
    PushNodeState,
    PushPull,
    UserMsg,
)
from gossip.tags import encode_tags  # noqa: E402
from gossip.wire import (  # noqa: E402
    PacketCodec,
    StreamDecoder,
    encode_message,
    encode_stream,
)

LOOPBACK = "127.0.0.1"
LOOPBACK_RAW = socket.inet_aton(LOOPBACK)
DEFAULT_OUT = REPO / "tests" / "gossip" / "golden" / "serf_captures.json"
KEEP_PER_SHAPE = 3


def free_port() -> int:
    """A port in 20000-29999 free for both TCP and UDP on loopback right now."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 30000)
        with contextlib.ExitStack() as stack:
            try:
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    s = stack.enter_context(socket.socket(socket.AF_INET, kind))
                    s.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-29999")


@dataclass
class Capture:
    scenario: str
    transport: str  # "udp" or "tcp"
    origin: str  # who sent it and why
    data: bytes
    key: bytes | None = None
    compression: bool | None = None  # the sender's setting, when we know who sent it


class SerfAgent:
    """One `serf agent` process on loopback, stopped by its PID."""

    def __init__(self, name: str, workdir: Path, args: list[str]) -> None:
        self.name = name
        self.port = free_port()
        self.rpc_port = free_port()
        self.log_path = workdir / f"serf-{name}.log"
        self.compression = "-disable-compression" not in args
        cmd = [
            "serf",
            "agent",
            f"-node={name}",
            f"-bind={LOOPBACK}:{self.port}",
            f"-rpc-addr={LOOPBACK}:{self.rpc_port}",
            "-log-level=debug",
            *args,
        ]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def rpc(self) -> str:
        return f"-rpc-addr={LOOPBACK}:{self.rpc_port}"

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serf {self.name} exited: {self.log_path.read_text()[-2000:]}")
            done = subprocess.run(["serf", "members", self.rpc], capture_output=True, timeout=5)
            if done.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"serf {self.name} did not start")

    def members(self) -> dict[str, str]:
        done = subprocess.run(
            ["serf", "members", self.rpc, "-format=json"], capture_output=True, timeout=5
        )
        return {m["name"]: m["status"] for m in json.loads(done.stdout)["members"]}

    def cli(self, *args: str) -> None:
        subprocess.run(
            ["serf", args[0], self.rpc, *args[1:]], capture_output=True, timeout=10, check=False
        )

    def stop(self, graceful: bool = True) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT if graceful else signal.SIGKILL)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


class Peer:
    """Our throwaway memberlist peer: answers pings and push/pulls, records what serf sends."""

    def __init__(self, name: str, scenario: str, keyring: Keyring | None) -> None:
        self.name = name
        self.scenario = scenario
        self.keyring = keyring
        self.key = keyring.primary if keyring else None
        # Like a Go node with EnableCompression: packets LZW'd when smaller, streams always.
        self.codec = PacketCodec(keyring, compression=True)
        self.acks: set[int] = set()  # sequence numbers serf acked over UDP
        self.port = free_port()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((LOOPBACK, self.port))
        self.udp.settimeout(0.2)
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((LOOPBACK, self.port))
        self.tcp.listen(16)
        self.tcp.settimeout(0.2)
        self.answering = True
        self.agent_ports: dict[int, SerfAgent] = {}  # UDP source port -> the serf that sent it
        self.extra_nodes: list[PushNodeState] = []
        self.captures: list[Capture] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._udp_loop, daemon=True),
            threading.Thread(target=self._tcp_loop, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def know(self, agent: SerfAgent) -> SerfAgent:
        self.agent_ports[agent.port] = agent
        return agent

    def record(
        self, transport: str, origin: str, data: bytes, compression: bool | None = None
    ) -> None:
        capture = Capture(self.scenario, transport, origin, data, self.key, compression)
        with self._lock:
            self.captures.append(capture)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self.udp.close()
        self.tcp.close()

    # -- what we advertise ---------------------------------------------------------------------

    def self_state(self) -> PushNodeState:
        return PushNodeState(
            name=self.name,
            addr=LOOPBACK_RAW,
            port=self.port,
            meta=encode_tags({"role": "capture", "impl": "weavepy"}),
            incarnation=1,
            state=NodeStateCode.ALIVE,
        )

    def push_pull(self, join: bool) -> PushPull:
        return PushPull(join=join, nodes=(self.self_state(), *self.extra_nodes))

    # -- UDP -----------------------------------------------------------------------------------

    def _udp_loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.udp.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            agent = self.agent_ports.get(addr[1])
            if agent is None:
                self.record("udp", f"udp from port {addr[1]}", data)
            else:
                self.record("udp", f"udp from {agent.name}", data, agent.compression)
            try:
                messages = self.codec.decode_parts(data).messages
            except DecodeError:
                continue
            for msg in messages:
                if isinstance(msg, Ack):
                    self.acks.add(msg.seq_no)
                if isinstance(msg, Ping) and self.answering:
                    to = (socket.inet_ntoa(msg.source_addr), msg.source_port)
                    if not msg.source_addr:
                        to = addr
                    self.send_udp(to, [encode_message(Ack(msg.seq_no))])

    def send_udp(self, to: tuple[str, int], parts: list[bytes], crc: bool = False) -> None:
        self.udp.sendto(self.codec.encode(parts, crc=crc), to)

    # -- TCP -----------------------------------------------------------------------------------

    def _tcp_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _read_stream(
        self,
        conn: socket.socket,
        origin: str,
        timeout: float = 5.0,
        compression: bool | None = None,
    ) -> object:
        decoder = StreamDecoder(self.keyring)
        raw = bytearray()
        msg = None
        conn.settimeout(timeout)
        try:
            while msg is None:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                raw += chunk
                msg = decoder.feed(chunk)
        except TimeoutError:
            pass
        except DecodeError as err:
            print(f"  !! our decoder rejected a serf stream ({origin}): {err}", file=sys.stderr)
        if raw:
            self.record("tcp", origin, bytes(raw), compression)
        return msg

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            msg = self._read_stream(conn, "tcp inbound")
            reply: PushPull | Ack | None = None
            if isinstance(msg, PushPull):
                reply = self.push_pull(msg.join)
            elif isinstance(msg, Ping) and self.answering:
                reply = Ack(msg.seq_no)
            if reply is not None:
                conn.sendall(encode_stream(reply, keyring=self.keyring, compression=True))
                time.sleep(0.2)

    def request(self, port: int, msg: object, origin: str, raw: bytes | None = None) -> object:
        """Open a stream to serf, send `msg` (or `raw` bytes), and record serf's reply."""
        with socket.create_connection((LOOPBACK, port), timeout=5) as conn:
            if raw is None:
                raw = encode_stream(msg, keyring=self.keyring, compression=True)  # type: ignore[arg-type]
            conn.sendall(raw)
            agent = self.agent_ports.get(port)
            return self._read_stream(conn, origin, compression=agent.compression if agent else None)


@contextlib.contextmanager
def agents(workdir: Path) -> Iterator[list[SerfAgent]]:
    started: list[SerfAgent] = []
    try:
        yield started
    finally:
        for agent in reversed(started):
            agent.stop(graceful=False)


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    print(f"  (timed out waiting for {what})", file=sys.stderr)


def check(checks: dict[str, bool], what: str, ok: bool) -> None:
    checks[what] = ok
    print(f"  {'ok  ' if ok else 'FAIL'} serf accepted {what}", file=sys.stderr)


def plain_scenario(workdir: Path, checks: dict[str, bool]) -> list[Capture]:
    print("scenario plain", file=sys.stderr)
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # fake member X: never answers
    silent.bind((LOOPBACK, free_port()))
    silent_port = silent.getsockname()[1]
    peer = Peer("pycap", "plain", keyring=None)
    peer.extra_nodes.append(
        PushNodeState("ghost-x", LOOPBACK_RAW, silent_port, b"", 1, NodeStateCode.ALIVE)
    )
    try:
        with agents(workdir) as started:
            long_tag = "weave-" * 40
            a = peer.know(
                SerfAgent("serf-a", workdir, ["-tag", "role=anchor", "-tag", f"desc={long_tag}"])
            )
            started.append(a)
            a.wait_ready()
            peer.request(a.port, peer.push_pull(join=True), "join reply from A")
            b = peer.know(
                SerfAgent(
                    "serf-b",
                    workdir,
                    [
                        "-tag",
                        "role=second",
                        "-tag",
                        f"desc={long_tag}",
                        f"-join={LOOPBACK}:{a.port}",
                    ],
                )
            )
            started.append(b)
            b.wait_ready()
            wait_until(lambda: len(a.members()) >= 4, 10, "4 members on A")
            print(f"  A sees: {a.members()}", file=sys.stderr)
            time.sleep(1.0)
            # Requests serf answers: UDP ping, TCP ping, indirect pings (ack and nack).
            seq = 1000
            peer.send_udp((LOOPBACK, a.port), [encode_message(Ping(seq, "serf-a"))])
            peer.send_udp(
                (LOOPBACK, a.port),
                [encode_message(Ping(seq + 1, "serf-a", LOOPBACK_RAW, peer.port, peer.name))],
            )
            peer.request(a.port, Ping(seq + 2, "serf-a"), "tcp ping reply from A")
            # Indirect pings through A: serf-b answers (A relays an ack), ghost-x never does (nack).
            for seq_no, target_port, node in (
                (seq + 3, b.port, "serf-b"),
                (seq + 4, silent_port, "ghost-x"),
            ):
                req = IndirectPing(
                    seq_no,
                    LOOPBACK_RAW,
                    target_port,
                    node,
                    nack=True,
                    source_addr=LOOPBACK_RAW,
                    source_port=peer.port,
                    source_node=peer.name,
                )
                peer.send_udp((LOOPBACK, a.port), [encode_message(req)])
            # A stream A cannot read: it answers with errMsg.
            bogus = struct.pack(">BI", MessageType.ENCRYPT, 45) + bytes(45)
            peer.request(a.port, None, "error reply from A", raw=bogus)
            # A reliable user message to A (serf ignores an unknown serf type, but reads it).
            peer.request(a.port, UserMsg(b"\x7fhello"), "reply to tcp user msg")
            # Our LZW and CRC framing, which serf must read to answer.
            filler = encode_message(UserMsg(b"\x7f" + b"weavepy " * 60))
            peer.send_udp((LOOPBACK, a.port), [encode_message(Ping(2000, "serf-a")), filler])
            peer.send_udp((LOOPBACK, a.port), [encode_message(Ping(2001, "serf-a"))], crc=True)
            reply = peer.request(a.port, Ping(2002, "serf-a"), "compressed tcp ping reply")
            time.sleep(0.5)
            check(checks, "an LZW-compressed UDP compound", 2000 in peer.acks)
            check(checks, "a CRC-wrapped UDP ping", 2001 in peer.acks)
            check(checks, "an LZW-compressed TCP ping", reply == Ack(2002, b""))
            check(checks, "our compressed join push/pull", a.members().get("pycap") == "alive")
            a.cli("event", "capture-event", "payload-" * 8)
            a.cli("query", "-timeout=1s", "capture-query", "q")
            time.sleep(1.0)
            # C joins *us*, without compression.
            c = peer.know(
                SerfAgent(
                    "serf-c", workdir, ["-disable-compression", f"-join={LOOPBACK}:{peer.port}"]
                )
            )
            started.append(c)
            c.wait_ready()
            time.sleep(6.0)  # X gets suspected and declared dead meanwhile
            b.stop(graceful=True)  # leave: dead with From == Node
            time.sleep(3.0)
            peer.answering = False  # go silent: serf suspects us
            time.sleep(9.0)
            peer.answering = True
            time.sleep(1.0)
            for agent in started:
                agent.stop(graceful=True)
            report_logs(started)
    finally:
        peer.close()
        silent.close()
    return peer.captures


def encrypted_scenario(workdir: Path, checks: dict[str, bool]) -> list[Capture]:
    print("scenario encrypted", file=sys.stderr)
    key = os.urandom(32)
    peer = Peer("pycap-enc", "encrypted", keyring=Keyring([key]))
    try:
        with agents(workdir) as started:
            e = peer.know(
                SerfAgent("serf-e", workdir, [f"-encrypt={base64.b64encode(key).decode()}"])
            )
            started.append(e)
            e.wait_ready()
            peer.request(e.port, peer.push_pull(join=True), "encrypted join reply from E")
            wait_until(lambda: len(e.members()) >= 2, 10, "2 members on E")
            peer.send_udp((LOOPBACK, e.port), [encode_message(Ping(77, "serf-e"))], crc=True)
            reply = peer.request(e.port, Ping(78, "serf-e"), "encrypted tcp ping reply from E")
            check(checks, "an encrypted, compressed TCP ping", reply == Ack(78, b""))
            e.cli("event", "capture-enc-event", "x" * 20)
            time.sleep(0.5)
            check(checks, "an encrypted CRC-wrapped UDP ping", 77 in peer.acks)
            check(checks, "our encrypted join push/pull", e.members().get("pycap-enc") == "alive")
            time.sleep(4.0)
            e.stop(graceful=True)
            report_logs(started)
    finally:
        peer.close()
    return peer.captures


def report_logs(started: list[SerfAgent]) -> None:
    for agent in started:
        for line in agent.log_path.read_text(errors="replace").splitlines():
            if "[ERR]" in line or "[WARN]" in line:
                print(f"  {agent.name}: {line.strip()}", file=sys.stderr)


# -- classification ----------------------------------------------------------------------------


def packet_shape(data: bytes) -> str:
    """A short description of a plaintext packet's layers and messages."""
    t = data[0]
    if t == MessageType.HAS_CRC and len(data) >= 5:
        return "crc>" + packet_shape(data[5:])
    if t == MessageType.COMPOUND:
        n = data[1]
        lengths = struct.unpack_from(f">{n}H", data, 2)
        offset = 2 + 2 * n
        parts = []
        for length in lengths:
            parts.append(packet_shape(data[offset : offset + length]))
            offset += length
        return "compound[" + ",".join(parts) + "]"
    if t == MessageType.COMPRESS:
        import msgpack

        inner = msgpack.unpackb(data[1:], raw=True)
        return "lzw>" + packet_shape(lzw.decompress(inner[b"Buf"], 1 << 24))
    if t == MessageType.USER:
        return f"user({data[1] if len(data) > 1 else '-'})"
    return MessageType(t).name.lower()


def shape_of(capture: Capture) -> str:
    data = capture.data
    prefix = ""
    if capture.transport == "udp":
        if capture.key is not None:
            data = Keyring([capture.key]).decrypt_packet(data)
            prefix = "enc>"
        return "udp:" + prefix + packet_shape(data)
    if data[0] == MessageType.ENCRYPT:
        (length,) = struct.unpack_from(">I", data, 1)
        assert capture.key is not None
        data = Keyring([capture.key]).decrypt_stream_payload(data[:5], data[5 : 5 + length])
        prefix = "enc>"
    if data[0] == MessageType.COMPRESS:
        import msgpack

        unpacker = msgpack.Unpacker(raw=True)
        unpacker.feed(data[1:])
        data = lzw.decompress(unpacker.unpack()[b"Buf"], 1 << 26)
        prefix += "lzw>"
    return "tcp:" + prefix + MessageType(data[0]).name.lower()


def select(captures: list[Capture]) -> list[dict[str, object]]:
    kept: dict[str, list[Capture]] = {}
    for capture in captures:
        try:
            shape = shape_of(capture)
        except Exception as exc:  # a capture tool: report and keep going
            print(f"  !! cannot classify a capture from {capture.origin}: {exc}", file=sys.stderr)
            shape = "unclassified"
        group = kept.setdefault(shape, [])
        if len(group) < KEEP_PER_SHAPE:
            group.append(capture)
    out: list[dict[str, object]] = []
    for shape, group in sorted(kept.items()):
        for i, capture in enumerate(group):
            out.append(
                {
                    "name": f"{capture.scenario}/{shape}/{i}",
                    "scenario": capture.scenario,
                    "transport": capture.transport,
                    "origin": capture.origin,
                    "shape": shape,
                    "key_b64": base64.b64encode(capture.key).decode() if capture.key else None,
                    "sender_compression": capture.compression,
                    "hex": capture.data.hex(),
                }
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if shutil.which("serf") is None:
        print("serf is not installed: apt-get install -y serf", file=sys.stderr)
        return 2
    version = subprocess.run(["serf", "version"], capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory(prefix="weavepy-capture-") as tmp:
        workdir = Path(tmp)
        checks: dict[str, bool] = {}
        captures = plain_scenario(workdir, checks) + encrypted_scenario(workdir, checks)
    entries = select(captures)
    doc = {
        "about": "Bytes Debian serf sent to a weavepy test peer on loopback; regenerate with "
        "tests/gossip/capture_golden.py (see its docstring).",
        "serf_version": " / ".join(version.split("\n")[:2]),
        "captured": time.strftime("%Y-%m-%d"),
        "serf_accepted_our_bytes": checks,
        "captures": entries,
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    shapes = sorted({str(e["shape"]) for e in entries})
    print(
        f"{len(captures)} captures, kept {len(entries)} in {len(shapes)} shapes:", file=sys.stderr
    )
    for shape in shapes:
        print(f"  {shape}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
