"""Bytes captured from Debian's serf 0.9.4 (memberlist 0.2.2): we decode them, and re-encoding
what we decoded gives back serf's exact bytes, layer by layer (messages, compounds, LZW, CRC).

Only encryption nonces are random, so encrypted captures are compared after decryption. The
captures come from tests/gossip/capture_golden.py (its docstring says how to regenerate them).
"""

from __future__ import annotations

import base64
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import msgpack
import pytest

from gossip import lzw
from gossip.keyring import Keyring
from gossip.messages import (
    Ack,
    Alive,
    Dead,
    ErrResp,
    IndirectPing,
    MessageType,
    Nack,
    Ping,
    PushPull,
    Suspect,
    UserMsg,
)
from gossip.wire import (
    PacketCodec,
    StreamDecoder,
    decode_message,
    encode_compressed,
    encode_message,
    encode_stream,
    make_compound,
)

GOLDEN = json.loads((Path(__file__).parent / "golden" / "serf_captures.json").read_text())
CAPTURES: list[dict[str, Any]] = GOLDEN["captures"]
UDP = [c for c in CAPTURES if c["transport"] == "udp"]
TCP = [c for c in CAPTURES if c["transport"] == "tcp"]


def keyring_of(capture: dict[str, Any]) -> Keyring | None:
    key = capture["key_b64"]
    return Keyring([base64.b64decode(key)]) if key else None


def plaintext_packet(capture: dict[str, Any]) -> bytes:
    data = bytes.fromhex(capture["hex"])
    keyring = keyring_of(capture)
    return keyring.decrypt_packet(data) if keyring else data


def rebuild_packet(data: bytes) -> bytes:
    """Decode `data` one layer at a time and re-encode it with our encoder."""
    msg_type = data[0]
    if msg_type == MessageType.HAS_CRC:
        inner = rebuild_packet(data[5:])
        return struct.pack(">BI", MessageType.HAS_CRC, zlib.crc32(inner)) + inner
    if msg_type == MessageType.COMPRESS:
        wrapper = msgpack.unpackb(data[1:], raw=True)
        inner = lzw.decompress(wrapper[b"Buf"], 1 << 20)
        return encode_compressed(rebuild_packet(inner))
    if msg_type == MessageType.COMPOUND:
        count = data[1]
        lengths = struct.unpack_from(f">{count}H", data, 2)
        offset, parts = 2 + 2 * count, []
        for length in lengths:
            parts.append(rebuild_packet(data[offset : offset + length]))
            offset += length
        return make_compound(parts)
    (msg,) = decode_message(data)
    return encode_message(msg)


def test_the_goldens_cover_every_message_type() -> None:
    seen: set[str] = set()
    for capture in CAPTURES:
        seen.update(capture["shape"].replace(">", " ").replace("[", " ").split())
    text = " ".join(sorted(seen))
    for needle in (
        "ping", "indirect_ping", "ack", "suspect", "alive", "dead", "push_pull", "compound",
        "user(", "lzw", "enc", "nack", "crc", "err",
    ):  # fmt: skip
        assert needle in text, needle


@pytest.mark.parametrize("capture", UDP, ids=lambda c: c["name"])
def test_packet_decodes_and_reencodes_byte_for_byte(capture: dict[str, Any]) -> None:
    plain = plaintext_packet(capture)
    assert rebuild_packet(plain) == plain
    codec = PacketCodec(keyring_of(capture), compression=True)
    result = codec.decode_parts(bytes.fromhex(capture["hex"]))
    assert result.errors == []
    assert result.messages


@pytest.mark.parametrize("capture", UDP, ids=lambda c: c["name"])
def test_our_codec_builds_the_same_packet(capture: dict[str, Any]) -> None:
    """Where serf used a compound/LZW/CRC, PacketCodec.encode makes the same choice and bytes."""
    plain = plaintext_packet(capture)
    crc = plain[0] == MessageType.HAS_CRC
    body = plain[5:] if crc else plain
    messages = decode_message(body)
    parts = [encode_message(m) for m in messages]
    codec = PacketCodec(None, compression=capture["sender_compression"] is not False)
    assert codec.encode(parts, crc=crc) == plain


@pytest.mark.parametrize("capture", TCP, ids=lambda c: c["name"])
def test_stream_decodes_whole_and_byte_by_byte(capture: dict[str, Any]) -> None:
    data = bytes.fromhex(capture["hex"])
    keyring = keyring_of(capture)
    whole = StreamDecoder(keyring).feed(data)
    assert whole is not None
    decoder = StreamDecoder(keyring)
    results = [decoder.feed(data[i : i + 1]) for i in range(len(data))]
    assert results[-1] == whole
    assert all(r is None for r in results[:-1])
    decoder.eof()


@pytest.mark.parametrize("capture", TCP, ids=lambda c: c["name"])
def test_stream_reencodes_byte_for_byte(capture: dict[str, Any]) -> None:
    data = bytes.fromhex(capture["hex"])
    keyring = keyring_of(capture)
    msg = StreamDecoder(keyring).feed(data)
    assert msg is not None
    if keyring is not None:
        (length,) = struct.unpack(">I", data[1:5])
        assert length == len(data) - 5
        data = keyring.decrypt_stream_payload(data[:5], data[5:])
        # Our frame has the same length for the same plaintext; only the nonce differs.
        ours = encode_stream(msg, keyring=keyring, compression=True)
        assert ours[:5] == bytes.fromhex(capture["hex"])[:5]
    compressed = data[0] == MessageType.COMPRESS
    assert encode_stream(msg, keyring=None, compression=compressed) == data


def messages_by_origin(origin: str) -> list[Any]:
    out: list[Any] = []
    for capture in CAPTURES:
        if capture["origin"] != origin:
            continue
        data = bytes.fromhex(capture["hex"])
        if capture["transport"] == "tcp":
            out.append(StreamDecoder(keyring_of(capture)).feed(data))
        else:
            out.extend(PacketCodec(keyring_of(capture), compression=True).decode(data))
    return out


def all_packet_messages() -> list[Any]:
    out: list[Any] = []
    for capture in UDP:
        out.extend(
            PacketCodec(keyring_of(capture), compression=True).decode(bytes.fromhex(capture["hex"]))
        )
    return out


def test_field_values_match_what_the_scenario_did() -> None:
    (join_reply,) = messages_by_origin("join reply from A")
    assert isinstance(join_reply, PushPull) and join_reply.join
    (serf_a,) = join_reply.nodes
    assert serf_a.name == "serf-a" and serf_a.addr == bytes([127, 0, 0, 1])
    assert serf_a.vsn == bytes([1, 5, 2, 2, 5, 5])  # memberlist PCur 2, serf delegate 2..5
    assert join_reply.user_state[:1] == b"\x02"  # serf messagePushPull

    (tcp_ack,) = messages_by_origin("tcp ping reply from A")
    assert tcp_ack == Ack(1002, b"")
    (err,) = messages_by_origin("error reply from A")
    assert err == ErrResp("Remote state is encrypted and encryption is not configured")

    packets = all_packet_messages()
    acks = {m.seq_no: m for m in packets if isinstance(m, Ack)}
    assert acks[1000].payload[:1] == b"\x01"  # serf's ack carries its Vivaldi coordinate
    assert acks[1003] == Ack(1003, b"")  # an ack relayed for an indirect ping has nil payload
    assert Nack(1004) in packets  # the indirect ping to the silent ghost came back as a nack
    pings = [m for m in packets if isinstance(m, Ping)]
    assert any(p.source_node.startswith("serf-") and len(p.source_addr) == 4 for p in pings)
    assert any(isinstance(m, IndirectPing) and m.node == "ghost-x" and m.nack for m in packets)
    assert any(isinstance(m, Suspect) and m.node == "ghost-x" for m in packets)
    assert any(isinstance(m, Suspect) and m.node == "pycap" for m in packets)
    assert any(isinstance(m, Dead) and m.node == m.from_node == "serf-b" for m in packets)
    assert any(isinstance(m, Alive) and m.node == "pycap" and m.port > 0 for m in packets)
    assert any(isinstance(m, UserMsg) and m.payload[:1] == b"\x03" for m in packets)  # event


def test_serf_accepted_what_we_sent_when_the_goldens_were_captured() -> None:
    """The capture run also checked the other direction: serf answered our LZW-compressed,
    CRC-wrapped and encrypted packets and streams, and listed our peer as alive."""
    checks = GOLDEN["serf_accepted_our_bytes"]
    assert len(checks) >= 7
    assert all(checks.values()), checks
