"""nfnetlink_log (NFLOG) messages: the requests that bind a log group, and the decoder of the
packets the kernel logs to it. Sans-IO: bytes in, typed values out.

This module owns the wire format of the netfilter log subsystem (NFNL_SUBSYS_ULOG, the
kernel's include/uapi/linux/netfilter/nfnetlink_log.h): netlink headers, the nfgenmsg
header, attributes (host-order length and type, values big-endian), and the IPv4 and
TCP/UDP headers at the start of a logged payload. The reader (dropreader.py) moves the
bytes; the drop log (droplog.py) gives them meaning.

The rule it keeps: **a malformed message is counted and dropped, never raised.** `feed()`
takes whatever one `recv` returned and yields the packets it could decode; everything else
goes into `NflogDecoder.counts` (`malformed`, `errors`, `overrun`, `other`).
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field
from ipaddress import IPv4Address

__all__ = [
    "COPY_RANGE",
    "NETLINK_NETFILTER",
    "LoggedPacket",
    "NflogDecoder",
    "bind_requests",
    "parse_acks",
]

NETLINK_NETFILTER = 12
AF_UNSPEC = 0
AF_INET = 2  # NFPROTO_IPV4 too
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
MSG_PACKET = NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET
MSG_CONFIG = NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_CONFIG

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER

# packet attributes (enum nfulnl_attr_type)
NFULA_PACKET_HDR = 1
NFULA_TIMESTAMP = 3
NFULA_IFINDEX_INDEV = 4
NFULA_IFINDEX_OUTDEV = 5
NFULA_IFINDEX_PHYSINDEV = 6
NFULA_IFINDEX_PHYSOUTDEV = 7
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10

# config attributes (enum nfulnl_attr_config) and commands (enum nfulnl_msg_config_cmds)
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_TIMEOUT = 4
NFULA_CFG_QTHRESH = 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_PF_BIND = 3
NFULNL_COPY_PACKET = 2

# An IPv4 header with options (60 bytes) and the first 8 bytes of TCP/UDP: ports and,
# for TCP, the flags (byte 13) need 14.
COPY_RANGE = 80

HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid (host order)
NFGEN = struct.Struct("!BBH")     # nfgenmsg: family, version, res_id (the group, big-endian)
ATTR = struct.Struct("=HH")       # nlattr: len, type (host order)

PROTOCOL_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 132: "SCTP"}


@dataclass(frozen=True)
class LoggedPacket:
    """One packet the kernel logged: the log rule's prefix and group, where it was (hook,
    interface indexes; `physindev`/`physoutdev` are bridge ports for bridged traffic), when,
    and what the IPv4 header and TCP/UDP/SCTP ports say. `sport`/`dport` are None for other
    protocols or a truncated payload; `tcp_flags` is None unless TCP. Interface names are
    filled in by the reader (the kernel sends only indexes)."""

    group: int
    prefix: str
    family: int = AF_INET
    hook: int | None = None
    timestamp: float | None = None
    indev: int | None = None
    outdev: int | None = None
    physindev: int | None = None
    physoutdev: int | None = None
    src: IPv4Address | None = None
    dst: IPv4Address | None = None
    protocol: int | None = None
    sport: int | None = None
    dport: int | None = None
    tcp_flags: int | None = None
    in_name: str | None = None
    out_name: str | None = None

    @property
    def protocol_name(self) -> str:
        if self.protocol is None:
            return "?"
        return PROTOCOL_NAMES.get(self.protocol, f"proto-{self.protocol}")

    @property
    def is_new_tcp(self) -> bool:
        """A plain SYN (SYN without ACK): the first packet of a TCP connection."""
        return self.tcp_flags is not None and self.tcp_flags & 0x12 == 0x02


def _message(msg_type: int, seq: int, family: int, group: int, attrs: list[tuple[int, bytes]],
             ) -> bytes:
    body = bytearray(NFGEN.pack(family, 0, group))
    for kind, value in attrs:
        body += ATTR.pack(ATTR.size + len(value), kind) + value
        body += b"\0" * (-len(body) % 4)
    return HEADER.pack(HEADER.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_ACK, seq,
                       0) + bytes(body)


def bind_requests(group: int, *, seq: int = 1, copy_range: int = COPY_RANGE,
                  queue_threshold: int = 1, timeout_cs: int = 0) -> list[bytes]:
    """The config requests that make this socket the listener of `group`: bind the IPv4
    family (a no-op on Linux >= 3.17, kept for older kernels), bind the group, then copy
    the first `copy_range` bytes of each packet, send after `queue_threshold` packets or
    `timeout_cs` hundredths of a second. One request per message, each with an ACK, with
    sequence numbers from `seq`."""
    mode = struct.pack("!IBB", copy_range, NFULNL_COPY_PACKET, 0)
    return [
        _message(MSG_CONFIG, seq, AF_INET, 0,
                 [(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_PF_BIND]))]),
        _message(MSG_CONFIG, seq + 1, AF_UNSPEC, group,
                 [(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))]),
        _message(MSG_CONFIG, seq + 2, AF_UNSPEC, group,
                 [(NFULA_CFG_MODE, mode),
                  (NFULA_CFG_QTHRESH, struct.pack("!I", queue_threshold)),
                  (NFULA_CFG_TIMEOUT, struct.pack("!I", timeout_cs))]),
    ]


def _messages(data: bytes) -> tuple[list[tuple[int, int, bytes]], bool]:
    """(type, seq, payload) of each netlink message in `data`, and whether all of it parsed."""
    found: list[tuple[int, int, bytes]] = []
    offset = 0
    while offset + HEADER.size <= len(data):
        length, kind, _flags, seq, _pid = HEADER.unpack_from(data, offset)
        if length < HEADER.size or offset + length > len(data):
            return found, False
        found.append((kind, seq, data[offset + HEADER.size:offset + length]))
        offset += (length + 3) & ~3
    return found, offset >= len(data)


def parse_acks(data: bytes) -> dict[int, int]:
    """Sequence number -> errno (0: done) of every netlink ACK or error in `data`."""
    acks = {}
    for kind, seq, payload in _messages(data)[0]:
        if kind == NLMSG_ERROR and len(payload) >= 4:
            acks[seq] = -struct.unpack_from("=i", payload)[0]
    return acks


def _attributes(payload: bytes, start: int) -> dict[int, bytes] | None:
    attrs: dict[int, bytes] = {}
    offset = start
    while offset + ATTR.size <= len(payload):
        length, kind = ATTR.unpack_from(payload, offset)
        if length < ATTR.size or offset + length > len(payload):
            return None
        attrs[kind & NLA_TYPE_MASK] = payload[offset + ATTR.size:offset + length]
        offset += (length + 3) & ~3
    if offset < len(payload) and len(payload) - offset >= ATTR.size:
        return None
    return attrs


def _u32(attrs: dict[int, bytes], kind: int) -> int | None:
    value = attrs.get(kind)
    if value is None:
        return None
    if len(value) != 4:
        raise ValueError(f"attribute {kind} has {len(value)} bytes, not 4")
    return int(struct.unpack("!I", value)[0])


def _decode_packet(group: int, family: int, attrs: dict[int, bytes]) -> LoggedPacket:
    """Raises ValueError on a malformed attribute (the decoder counts it)."""
    header = attrs.get(NFULA_PACKET_HDR)
    hook = None
    if header is not None:
        if len(header) < 4:
            raise ValueError("short packet header")
        hook = header[2]
    prefix_bytes = attrs.get(NFULA_PREFIX, b"")
    prefix = prefix_bytes.split(b"\0", 1)[0].decode("utf-8", "replace")
    timestamp = None
    stamp = attrs.get(NFULA_TIMESTAMP)
    if stamp is not None:
        if len(stamp) != 16:
            raise ValueError("timestamp is not 16 bytes")
        seconds, micros = struct.unpack("!QQ", stamp)
        timestamp = seconds + micros / 1e6
    src = dst = protocol = sport = dport = flags = None
    payload = attrs.get(NFULA_PAYLOAD)
    if payload is not None and family == AF_INET:
        if len(payload) < 20 or payload[0] >> 4 != 4 or payload[0] & 0xF < 5:
            raise ValueError("payload is not an IPv4 header")
        src, dst, protocol = IPv4Address(payload[12:16]), IPv4Address(payload[16:20]), payload[9]
        first_fragment = struct.unpack_from("!H", payload, 6)[0] & 0x1FFF == 0
        transport = payload[(payload[0] & 0xF) * 4:]
        if first_fragment and protocol in (6, 17, 132) and len(transport) >= 4:
            sport, dport = struct.unpack_from("!HH", transport)
            if protocol == 6 and len(transport) >= 14:
                flags = transport[13]
    return LoggedPacket(
        group=group, prefix=prefix, family=family, hook=hook, timestamp=timestamp,
        indev=_u32(attrs, NFULA_IFINDEX_INDEV), outdev=_u32(attrs, NFULA_IFINDEX_OUTDEV),
        physindev=_u32(attrs, NFULA_IFINDEX_PHYSINDEV),
        physoutdev=_u32(attrs, NFULA_IFINDEX_PHYSOUTDEV),
        src=src, dst=dst, protocol=protocol, sport=sport, dport=dport, tcp_flags=flags)


@dataclass
class NflogDecoder:
    """Decodes datagrams from an NFLOG socket. `counts` keeps what was not a packet:
    `malformed` (a message or attribute that does not parse), `errors` (netlink errors and
    ACKs), `overrun`, `other` (messages of another type)."""

    counts: Counter[str] = field(default_factory=Counter)

    def feed(self, datagram: bytes) -> list[LoggedPacket]:
        messages, complete = _messages(datagram)
        if not complete:
            self.counts["malformed"] += 1
        packets = []
        for kind, _seq, payload in messages:
            if kind == MSG_PACKET:
                decoded = self._packet(payload)
                if decoded is None:
                    self.counts["malformed"] += 1
                else:
                    packets.append(decoded)
            elif kind == NLMSG_ERROR:
                self.counts["errors"] += 1
            elif kind == NLMSG_OVERRUN:
                self.counts["overrun"] += 1
            elif kind != NLMSG_DONE:
                self.counts["other"] += 1
        return packets

    @staticmethod
    def _packet(payload: bytes) -> LoggedPacket | None:
        if len(payload) < NFGEN.size:
            return None
        family, _version, group = NFGEN.unpack_from(payload)
        attrs = _attributes(payload, NFGEN.size)
        if attrs is None:
            return None
        try:
            return _decode_packet(group, family, attrs)
        except ValueError:
            return None
