"""Wire formats of the WireGuard messages (whitepaper section 5.4) and of our extension.

This module owns the byte layouts and nothing else: packing and parsing, with every length
checked. A datagram that does not parse raises `MalformedMessage` with a short `reason` that
the device counts drops by. All integers are little-endian; the first byte is the type and the
next three are zero.

    type 1 initiation   148 B: type, sender u32, ephemeral 32, static 32+16, timestamp 12+16,
                               mac1 16, mac2 16
    type 2 response      92 B: type, sender u32, receiver u32, ephemeral 32, empty 0+16,
                               mac1 16, mac2 16
    type 3 cookie reply  64 B: type, receiver u32, nonce 24, cookie 16+16
    type 4 transport  >= 32 B: type, receiver u32, counter u64, AEAD(packet, padded to 16)

Extension (never sent to a peer that did not announce it; see `extension.py`):

    type 0x77 super-packet fragment: type u8, fragment index u8, fragment count u8, flags u8,
                               receiver u32, counter u64, then this fragment's share of
                               AEAD(virtio_net_hdr + super-packet)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tunnel.wireguard.keys import KEY_SIZE, MAC_SIZE, TAG_SIZE, TAI64N_SIZE, XNONCE_SIZE

MESSAGE_INITIATION = 1
MESSAGE_RESPONSE = 2
MESSAGE_COOKIE_REPLY = 3
MESSAGE_TRANSPORT = 4
MESSAGE_SUPER_FRAGMENT = 0x77

INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
KEEPALIVE_SIZE = TRANSPORT_HEADER_SIZE + TAG_SIZE
SUPER_HEADER_SIZE = 16
PADDING_MULTIPLE = 16

_INITIATION = struct.Struct("<II32s48s28s16s16s")
_RESPONSE = struct.Struct("<III32s16s16s16s")
_COOKIE_REPLY = struct.Struct("<II24s32s")
TRANSPORT_HEADER = struct.Struct("<IIQ")
SUPER_HEADER = struct.Struct("<BBBBIQ")

assert _INITIATION.size == INITIATION_SIZE
assert _RESPONSE.size == RESPONSE_SIZE
assert _COOKIE_REPLY.size == COOKIE_REPLY_SIZE


class MalformedMessage(ValueError):
    """A datagram that is not a well-formed message. `reason` names the drop counter."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Initiation:
    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes = bytes(MAC_SIZE)
    mac2: bytes = bytes(MAC_SIZE)

    def pack(self) -> bytes:
        return _INITIATION.pack(
            MESSAGE_INITIATION,
            self.sender,
            self.ephemeral,
            self.encrypted_static,
            self.encrypted_timestamp,
            self.mac1,
            self.mac2,
        )

    @classmethod
    def parse(cls, data: bytes) -> Initiation:
        if len(data) != INITIATION_SIZE:
            raise MalformedMessage("bad_length", f"initiation is {len(data)} bytes")
        kind, sender, eph, static, stamp, mac1, mac2 = _INITIATION.unpack(data)
        if kind != MESSAGE_INITIATION:
            raise MalformedMessage("bad_type", f"type field {kind:#x}")
        return cls(sender, eph, static, stamp, mac1, mac2)


@dataclass(frozen=True, slots=True)
class Response:
    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes = bytes(MAC_SIZE)
    mac2: bytes = bytes(MAC_SIZE)

    def pack(self) -> bytes:
        return _RESPONSE.pack(
            MESSAGE_RESPONSE,
            self.sender,
            self.receiver,
            self.ephemeral,
            self.encrypted_nothing,
            self.mac1,
            self.mac2,
        )

    @classmethod
    def parse(cls, data: bytes) -> Response:
        if len(data) != RESPONSE_SIZE:
            raise MalformedMessage("bad_length", f"response is {len(data)} bytes")
        kind, sender, receiver, eph, empty, mac1, mac2 = _RESPONSE.unpack(data)
        if kind != MESSAGE_RESPONSE:
            raise MalformedMessage("bad_type", f"type field {kind:#x}")
        return cls(sender, receiver, eph, empty, mac1, mac2)


@dataclass(frozen=True, slots=True)
class CookieReply:
    receiver: int
    nonce: bytes
    encrypted_cookie: bytes

    def pack(self) -> bytes:
        return _COOKIE_REPLY.pack(
            MESSAGE_COOKIE_REPLY, self.receiver, self.nonce, self.encrypted_cookie
        )

    @classmethod
    def parse(cls, data: bytes) -> CookieReply:
        if len(data) != COOKIE_REPLY_SIZE:
            raise MalformedMessage("bad_length", f"cookie reply is {len(data)} bytes")
        kind, receiver, nonce, cookie = _COOKIE_REPLY.unpack(data)
        if kind != MESSAGE_COOKIE_REPLY:
            raise MalformedMessage("bad_type", f"type field {kind:#x}")
        return cls(receiver, nonce, cookie)


def message_type(data: bytes) -> int:
    """The message type of a datagram, or raise for one too short or with non-zero reserved."""
    if len(data) < 4:
        raise MalformedMessage("truncated", f"{len(data)}-byte datagram")
    kind = data[0]
    if kind != MESSAGE_SUPER_FRAGMENT and (data[1] or data[2] or data[3]):
        raise MalformedMessage("bad_type", "reserved bytes are not zero")
    return kind


def padded_length(length: int, mtu: int) -> int:
    """Plaintext length after WireGuard's zero padding to a multiple of 16, capped at the MTU."""
    padded = (length + PADDING_MULTIPLE - 1) & ~(PADDING_MULTIPLE - 1)
    if mtu and length <= mtu < padded:
        return mtu
    return padded


# Sizes a reader may want without importing keys.py too.
__all__ = [
    "COOKIE_REPLY_SIZE",
    "INITIATION_SIZE",
    "KEEPALIVE_SIZE",
    "KEY_SIZE",
    "MESSAGE_COOKIE_REPLY",
    "MESSAGE_INITIATION",
    "MESSAGE_RESPONSE",
    "MESSAGE_SUPER_FRAGMENT",
    "MESSAGE_TRANSPORT",
    "RESPONSE_SIZE",
    "SUPER_HEADER",
    "SUPER_HEADER_SIZE",
    "TAI64N_SIZE",
    "TRANSPORT_HEADER",
    "TRANSPORT_HEADER_SIZE",
    "XNONCE_SIZE",
    "CookieReply",
    "Initiation",
    "MalformedMessage",
    "Response",
    "message_type",
    "padded_length",
]
