"""NFLOG packet messages built the kernel's way (nfnetlink_log.h), for the decoder's tests."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address


def attribute(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def ipv4_tcp(src: str, dst: str, sport: int, dport: int, flags: int = 0x02,
             protocol: int = 6) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0x4000, 64, protocol, 0,
                         IPv4Address(src).packed, IPv4Address(dst).packed)
    transport = struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 0x50, flags, 1024, 0, 0)
    return header + transport


def packet_message(payload: bytes, prefix: str = "", group: int = 6784, *,
                   indev: int | None = 3, outdev: int | None = 4, hook: int = 2,
                   physindev: int | None = None, seq: int = 0) -> bytes:
    body = struct.pack("!BBH", 2, 0, group)
    body += attribute(1, struct.pack("!HBB", 0x0800, hook, 0))  # NFULA_PACKET_HDR
    if indev is not None:
        body += attribute(4, struct.pack("!I", indev))
    if outdev is not None:
        body += attribute(5, struct.pack("!I", outdev))
    if physindev is not None:
        body += attribute(6, struct.pack("!I", physindev))
    body += attribute(3, struct.pack("!QQ", 1700000000, 250000))  # NFULA_TIMESTAMP
    body += attribute(9, payload)
    if prefix:
        body += attribute(10, prefix.encode() + b"\0")
    return struct.pack("=IHHII", 16 + len(body), 4 << 8 | 0, 0, seq, 0) + body
