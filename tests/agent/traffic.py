"""Real traffic for the agent tests: echo servers, clients, and a VXLAN capture on the hub.

Everything here runs inside sandbox namespaces: servers as sandbox processes (stopped by PID
with the sandbox), clients and the capture as `call_in_netns` children. Each is bounded in
count and time.
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from dataclasses import dataclass

ECHO_SERVER = r"""
import socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((host, port))
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind((host, port))
tcp.listen(64)
def serve_udp():
    while True:
        data, peer = udp.recvfrom(2048)
        udp.sendto(b"udp:" + data, peer)
def serve_tcp():
    while True:
        conn, _ = tcp.accept()
        with conn:
            conn.settimeout(5)
            data = conn.recv(2048)
            conn.sendall(b"tcp:" + data)
threading.Thread(target=serve_udp, daemon=True).start()
print("listening", flush=True)
serve_tcp()
"""


def echo_server_argv(host: str, port: int) -> list[str]:
    return [sys.executable, "-c", ECHO_SERVER, host, str(port)]


def tcp_echo(src: str, dst: str, port: int, payload: bytes, timeout: float = 3.0) -> bytes:
    """Connect from `src` to dst:port, send `payload`, return the answer (b"" on failure)."""
    try:
        with socket.create_connection((dst, port), timeout=timeout,
                                      source_address=(src, 0)) as conn:
            conn.sendall(payload)
            return conn.recv(2048)
    except OSError:
        return b""


def udp_echo(src: str, dst: str, port: int, payload: bytes, tries: int = 3,
             timeout: float = 1.0) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((src, 0))
        sock.settimeout(timeout)
        for _ in range(tries):
            try:
                sock.sendto(payload, (dst, port))
                return sock.recvfrom(2048)[0]
            except OSError:
                continue
    return b""


@dataclass(frozen=True)
class VxlanFrame:
    outer_src: str
    outer_dst: str
    vni: int
    inner_src: str
    inner_dst: str
    inner_proto: int


def capture_vxlan(port: int, seconds: float, limit: int = 5000) -> list[VxlanFrame]:
    """AF_PACKET capture on every interface of this namespace (the hub: each bridge port) for
    `seconds` (at most `limit` frames): every IPv4/UDP packet to `port` whose payload is a
    VXLAN header (I flag) carrying Ethernet + IPv4."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
    sock.settimeout(0.2)
    frames: list[VxlanFrame] = []
    deadline = time.monotonic() + seconds
    seen = 0
    try:
        while time.monotonic() < deadline and seen < limit:
            try:
                data = sock.recv(65535)
            except TimeoutError:
                continue
            seen += 1
            if len(data) < 14 + 20 + 8 + 8 + 14 + 20 or data[12:14] != b"\x08\x00":
                continue
            ip = data[14:]
            ihl = (ip[0] & 0x0F) * 4
            if ip[9] != 17:
                continue
            udp = ip[ihl:]
            dport = struct.unpack("!H", udp[2:4])[0]
            if dport != port:
                continue
            vx = udp[8:16]
            if not vx[0] & 0x08:
                continue
            vni = int.from_bytes(vx[4:7], "big")
            inner = udp[16:]
            if inner[12:14] != b"\x08\x00":
                continue
            inner_ip = inner[14:]
            frames.append(VxlanFrame(socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20]),
                                     vni, socket.inet_ntoa(inner_ip[12:16]),
                                     socket.inet_ntoa(inner_ip[16:20]), inner_ip[9]))
    finally:
        sock.close()
    return frames
