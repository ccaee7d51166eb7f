"""gossip.wire: exact encodings, go-msgpack's lenient decoding, packet layers and stream framing.

Byte-for-byte agreement with real serf traffic lives in test_wire_golden.py; this file pins the
rules one at a time, including the ones serf never exercised (limits, malformed input).
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip import lzw
from gossip.keyring import Keyring
from gossip.limits import DEFAULT_LIMITS, Limits
from gossip.messages import (
    DEFAULT_VSN,
    Ack,
    Alive,
    Dead,
    DecodeError,
    ErrResp,
    IndirectPing,
    Message,
    MessageType,
    Nack,
    NodeStateCode,
    PacketMessage,
    Ping,
    PushNodeState,
    PushPull,
    StreamMessage,
    Suspect,
    UserMsg,
)
from gossip.wire import (
    PacketCodec,
    StreamDecoder,
    compound_size,
    decode_message,
    decode_message_parts,
    encode_compressed,
    encode_message,
    encode_stream,
    make_compound,
    pack_parts,
)

IP = bytes([198, 18, 0, 1])
IP6 = bytes(range(16))


def body(**fields: Any) -> bytes:
    """A msgpack map in the given key order, old-spec raw strings."""
    packed: bytes = msgpack.packb({k.encode(): v for k, v in fields.items()}, use_bin_type=False)
    return packed


# -- encoding ---------------------------------------------------------------------------------


def test_ping_is_a_sorted_map_and_omits_empty_source_fields() -> None:
    assert encode_message(Ping(1, "n1")) == b"\x00" + body(Node=b"n1", SeqNo=1)
    full = Ping(7, "n1", IP, 7946, "me")
    assert encode_message(full) == b"\x00" + body(
        Node=b"n1", SeqNo=7, SourceAddr=IP, SourceNode=b"me", SourcePort=7946
    )


def test_empty_byte_fields_are_nil_like_a_go_nil_slice() -> None:
    assert encode_message(Ack(5)) == b"\x02\x82\xa7Payload\xc0\xa5SeqNo\x05"
    alive = encode_message(Alive(1, "a", IP, 1, b"", b""))
    assert b"\xa4Meta\xc0" in alive and b"\xa3Vsn\xc0" in alive


def test_strings_and_bytes_use_old_spec_raw_formats() -> None:
    enc = encode_message(UserMsg(b"")) + encode_message(Suspect(1, "x" * 40, "y" * 70000))
    assert b"\xd9" not in enc[:60] and b"\xc4" not in enc[:60]
    assert b"\xda\x00\x28" + b"x" * 40 in enc  # raw16 for a 40-byte string
    assert b"\xdb\x00\x01\x11\x70" in enc  # raw32 for 70000 bytes


def test_user_message_packet_form_is_unframed() -> None:
    assert encode_message(UserMsg(b"\x01serf")) == b"\x08\x01serf"
    assert decode_message(b"\x08\x01serf") == [UserMsg(b"\x01serf")]


def test_indirect_ping_alive_dead_nack_err_round_trip() -> None:
    msgs: list[Message] = [
        IndirectPing(9, IP6, 7946, "target", True, IP, 1234, "me"),
        Alive(3, "node", IP, 7946, b"\xff\x80", DEFAULT_VSN),
        Dead(4, "node", "node"),
        Nack(2**32 - 1),
    ]
    for msg in msgs:
        assert decode_message(encode_message(msg)) == [msg]
    err = encode_message(ErrResp("boom"))
    assert err == b"\x0d" + body(Error=b"boom")


def test_names_that_are_not_utf8_survive() -> None:
    raw = b"\x05" + body(From=b"\xff\xfe", Incarnation=1, Node=b"caf\xc3\xa9")
    (dead,) = decode_message(raw)
    assert isinstance(dead, Dead) and dead.node == "café"
    assert encode_message(dead) == raw


@pytest.mark.parametrize(
    ("msg", "error"),
    [
        (Ping(2**32, "n"), ValueError),
        (Ping(-1, "n"), ValueError),
        (Alive(1, "a", IP, 70000), ValueError),
        (Ping(1, b"bytes-name"), TypeError),  # type: ignore[arg-type]
        (Ack(1, "text"), TypeError),  # type: ignore[arg-type]
    ],
)
def test_encoding_invalid_values_is_a_programming_error(msg: Message, error: type) -> None:
    with pytest.raises(error):
        encode_message(msg)


def test_push_pull_stream_body() -> None:
    node = PushNodeState("n", IP, 7946, b"", 2, NodeStateCode.DEAD)
    encoded = encode_message(PushPull(True, (node,), b"state"))
    header = body(Join=True, Nodes=1, UserStateLen=5)
    node_map = body(
        Addr=IP, Incarnation=2, Meta=None, Name=b"n", Port=7946, State=2, Vsn=DEFAULT_VSN
    )
    assert encoded == b"\x06" + header + node_map + b"state"


def test_tcp_user_message_has_a_length_header() -> None:
    data = encode_stream(UserMsg(b"abc"), keyring=None, compression=False)
    assert data == b"\x08" + body(UserMsgLen=3) + b"abc"


# -- lenient decoding, as go-msgpack ----------------------------------------------------------


def test_decoder_accepts_new_spec_types_any_int_width_and_any_key_order() -> None:
    raw = (
        b"\x04\x86"
        + b"\xa4Node\xd9\x01a"  # str8
        + b"\xa4Addr\xc4\x04"
        + IP  # bin8
        + b"\xa4Port\xd1\x1f\x0a"  # int16 for a uint16 field
        + b"\xabIncarnation\xcf"
        + (5).to_bytes(8, "big")  # uint64
        + b"\xa4Meta\xc5\x00\x01x"  # bin16
        + b"\xa3Vsn\x96\x01\x05\x02\x02\x05\x05"  # an array of uint8
    )
    assert decode_message(raw) == [Alive(5, "a", IP, 7946, b"x", DEFAULT_VSN)]


def test_missing_fields_take_zero_values_and_unknown_keys_are_skipped() -> None:
    raw = b"\x00" + body(SeqNo=3, Future=b"field", Node=None)
    assert decode_message(raw) == [Ping(3, "")]


def test_struct_in_array_form_maps_by_declaration_order() -> None:
    raw = b"\x03" + msgpack.packb([7, b"node", b"from"], use_bin_type=False)
    assert decode_message(raw) == [Suspect(7, "node", "from")]


def test_bool_accepts_fixnum_zero_and_one() -> None:
    raw = b"\x01" + body(Nack=1, Node=b"x", Port=1, SeqNo=1, Target=IP)
    (ind,) = decode_message(raw)
    assert isinstance(ind, IndirectPing) and ind.nack is True


def test_trailing_bytes_after_a_struct_are_ignored_like_go() -> None:
    assert decode_message(encode_message(Nack(3)) + b"\xc1junk") == [Nack(3)]


@pytest.mark.parametrize(
    "raw",
    [
        b"\x0b" + body(SeqNo=2**32),  # overflows uint32
        b"\x0b" + body(SeqNo=-1),  # negative into unsigned
        b"\x0b" + body(SeqNo=b"1"),  # a string into an int
        b"\x0b" + body(SeqNo=1.5),  # a float into an int
        b"\x00" + body(SeqNo=1, Node=5),  # an int into a string
        b"\x04" + body(Port=65536),
        b"\x01" + body(Nack=2),
        b"\x04" + body(Addr=[1, 2, 300]),
    ],
)
def test_out_of_range_or_wrong_type_fields_are_field_errors(raw: bytes) -> None:
    with pytest.raises(DecodeError) as err:
        decode_message(raw)
    assert err.value.reason == "field"


# -- packets ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty"),
        (b"\x06" + body(Nodes=0), "unknown_type"),  # push/pull is stream-only
        (b"\x0a\x00", "unknown_type"),
        (b"\x0d" + body(Error=b"x"), "unknown_type"),
        (b"\xf4\x01x\x00", "unknown_type"),  # labels are not spoken by memberlist 0.2.2
        (b"\x63", "unknown_type"),
        (b"\x00\xc1", "msgpack"),
        (b"\x00\x91", "msgpack"),  # truncated
        (b"\x00\x05", "msgpack"),  # not a map
        (b"\x07", "compound"),
        (b"\x07\x02\x00\x01", "compound"),
        (b"\x09" + body(Algo=1, Buf=b"x"), "compress"),
        (b"\x09" + body(Algo=0, Buf=lzw.compress(b"")), "compress"),  # empty inside
        (b"\x09" + body(Algo=0, Buf=b"\xff"), "lzw"),
    ],
)
def test_malformed_packets_raise_a_decode_error_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as err:
        decode_message(raw)
    assert err.value.reason == reason


def test_crc_is_verified_and_only_recognised_outermost() -> None:
    inner = encode_message(Ping(1, "n"))
    good = struct.pack(">BI", 12, zlib.crc32(inner)) + inner
    assert decode_message(good) == [Ping(1, "n")]
    bad = struct.pack(">BI", 12, zlib.crc32(inner) ^ 1) + inner
    with pytest.raises(DecodeError, match="crc"):
        decode_message(bad)
    with pytest.raises(DecodeError) as err:
        decode_message(make_compound([good, inner]))
    assert err.value.reason == "unknown_type"


def test_a_crc_byte_too_short_for_a_checksum_is_an_unknown_type() -> None:
    with pytest.raises(DecodeError) as err:
        decode_message(b"\x0c\x00\x00")
    assert err.value.reason == "unknown_type"


def test_one_bad_compound_part_does_not_cost_the_others() -> None:
    good1, good2 = encode_message(Ping(1, "a")), encode_message(Nack(2))
    packet = make_compound([good1, b"\x00\xc1", good2])
    result = decode_message_parts(packet)
    assert result.messages == [Ping(1, "a"), Nack(2)]
    assert [e.reason for e in result.errors] == ["msgpack"]
    truncated = make_compound([good1, good2])[:-2]
    result = decode_message_parts(truncated)
    assert result.messages == [Ping(1, "a")]
    assert [e.reason for e in result.errors] == ["compound"]


def test_nesting_is_bounded() -> None:
    packet = encode_message(Nack(1))
    for _ in range(DEFAULT_LIMITS.max_packet_nesting):
        packet = make_compound([packet])
    assert decode_message(packet) == [Nack(1)]
    with pytest.raises(DecodeError) as err:
        decode_message(make_compound([packet]))
    assert err.value.reason == "too_deep"
    deep = b"\x07\x01\x00\x03" * 20000 + b"\x0b\x80"  # 20000 levels in one 80 KB packet
    with pytest.raises(DecodeError):
        decode_message(deep)


def test_a_packet_compression_bomb_stops_at_the_packet_cap() -> None:
    bomb = encode_compressed(b"\x08" + bytes(3 * 1024 * 1024))
    assert len(bomb) < 16_000
    with pytest.raises(DecodeError) as err:
        decode_message(bomb)
    assert err.value.reason == "lzw"
    roomy = Limits(max_packet_decompressed_bytes=4 * 1024 * 1024)
    assert decode_message(bomb, roomy) == [UserMsg(bytes(3 * 1024 * 1024))]


def test_make_compound_layout_and_limits() -> None:
    assert make_compound([b"ab", b"c"]) == b"\x07\x02\x00\x02\x00\x01abc"
    with pytest.raises(ValueError):
        make_compound([b"x"] * 256)
    with pytest.raises(ValueError):
        make_compound([bytes(65536)])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=1600), max_size=400))
def test_pack_parts_fits_the_budget_and_keeps_every_part(sizes: list[int]) -> None:
    budget = 1400
    parts = [bytes([i % 256]) * n for i, n in enumerate(sizes)]
    groups = pack_parts(parts, budget)
    flat = [p for g in groups for p in g]
    assert sorted(flat) == sorted(parts)
    for group in groups:
        assert 1 <= len(group) <= 255
        assert compound_size([len(p) for p in group]) <= budget or len(group) == 1
        order = [parts.index(p) for p in group]
        assert order == sorted(order)  # given order kept inside a packet
    # First fit never leaves two packets that could have been one (so it is within 2x optimal).
    for i, first in enumerate(groups):
        for second in groups[i + 1 :]:
            if len(first) + len(second) <= 255:
                assert compound_size([len(p) for p in first + second]) > budget


packet_messages = st.one_of(
    st.builds(Ping, st.integers(0, 2**32 - 1), st.text(max_size=20)),
    st.builds(Ack, st.integers(0, 2**32 - 1), st.binary(max_size=40)),
    st.builds(Nack, st.integers(0, 2**32 - 1)),
    st.builds(Suspect, st.integers(0, 2**32 - 1), st.text(max_size=20), st.text(max_size=20)),
    st.builds(
        Alive,
        st.integers(0, 2**32 - 1),
        st.text(max_size=20),
        st.sampled_from([IP, IP6]),
        st.integers(0, 65535),
        st.binary(max_size=100),
        st.binary(min_size=6, max_size=6),
    ),
    st.builds(UserMsg, st.binary(max_size=300)),
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(packet_messages, min_size=1, max_size=40),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_packet_codec_round_trips(
    msgs: list[PacketMessage], compression: bool, crc: bool, encrypted: bool
) -> None:
    keyring = Keyring([b"k" * 32]) if encrypted else None
    codec = PacketCodec(keyring, compression)
    payloads = codec.pack([encode_message(m) for m in msgs], crc=crc)
    decoded = [m for p in payloads for m in codec.decode(p)]
    assert sorted(map(repr, decoded)) == sorted(map(repr, msgs))
    assert all(len(p) <= DEFAULT_LIMITS.udp_buffer_size for p in payloads)


def test_compression_is_used_only_when_smaller() -> None:
    codec = PacketCodec(None, compression=True)
    small = encode_message(Ping(1, "n"))
    assert codec.encode([small], crc=False) == small
    big = encode_message(UserMsg(b"abc" * 300))
    assert codec.encode([big], crc=False)[0] == MessageType.COMPRESS


def test_encryption_layer_and_rolling_upgrade_switches() -> None:
    ring = Keyring([os.urandom(32)])
    part = encode_message(Nack(9))
    sealed = PacketCodec(ring, False).encode([part], crc=True)
    assert PacketCodec(ring, False).decode(sealed) == [Nack(9)]
    assert PacketCodec(ring, False).overhead(crc=True) == 5 + 29
    with pytest.raises(DecodeError) as err:
        PacketCodec(Keyring([os.urandom(32)]), False).decode(sealed)
    assert err.value.reason == "decrypt"
    with pytest.raises(DecodeError) as err:
        PacketCodec(ring, False).decode(part)  # plaintext refused by default
    assert err.value.reason == "decrypt"
    assert PacketCodec(ring, False, verify_incoming=False).decode(part) == [Nack(9)]
    assert PacketCodec(ring, False, verify_outgoing=False).encode([part], crc=False) == part


# -- streams ----------------------------------------------------------------------------------

stream_messages: list[StreamMessage] = [
    Ping(1, "n", IP, 7946, "me"),
    Ack(2, b"payload"),
    Ack(3),
    ErrResp("remote error"),
    UserMsg(b""),
    UserMsg(b"u" * 5000),
    PushPull(False),
    PushPull(
        True,
        tuple(PushNodeState(f"n{i}", IP, i, b"m", i, NodeStateCode(i % 4)) for i in range(50)),
        b"s" * 3000,
    ),
]


@pytest.mark.parametrize("msg", stream_messages, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("compression", [False, True])
@pytest.mark.parametrize("encrypted", [False, True])
def test_stream_round_trip_in_any_chunking(
    msg: StreamMessage, compression: bool, encrypted: bool
) -> None:
    keyring = Keyring([os.urandom(16)]) if encrypted else None
    data = encode_stream(msg, keyring=keyring, compression=compression)
    for chunk in (1, 7, 1000, len(data)):
        decoder = StreamDecoder(keyring)
        results = [decoder.feed(data[i : i + chunk]) for i in range(0, len(data), chunk)]
        assert results[-1] == msg and not any(results[:-1])
        assert decoder.done
        decoder.eof()


def test_bytes_after_the_message_are_ignored() -> None:
    data = encode_stream(Ack(1), keyring=None, compression=False)
    decoder = StreamDecoder()
    assert decoder.feed(data + b"\x00more") == Ack(1)
    assert decoder.feed(b"still more") is None


def test_eof_in_the_middle_is_truncated_and_eof_before_anything_is_fine() -> None:
    StreamDecoder().eof()
    data = encode_stream(PushPull(True, (), b"xyz"), keyring=None, compression=False)
    decoder = StreamDecoder()
    assert decoder.feed(data[:-1]) is None
    with pytest.raises(DecodeError) as err:
        decoder.eof()
    assert err.value.reason == "truncated"


def header(msg_type: int, **fields: Any) -> bytes:
    return bytes([msg_type]) + body(**fields)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (header(6, Nodes=2**31, UserStateLen=0, Join=False), "too_large"),
        (header(6, Nodes=-1, UserStateLen=0, Join=False), "too_large"),
        (header(6, Nodes=0, UserStateLen=2**31, Join=False), "too_large"),
        (header(6, Nodes=0, UserStateLen=-5, Join=False), "too_large"),
        (header(8, UserMsgLen=20 * 1024 * 1024 + 1), "too_large"),
        (b"\x0a\xff\xff\xff\xff", "decrypt"),  # encrypted, and we have no keyring
        (b"\x04" + body(Node=b"x"), "unknown_type"),  # alive is packet-only
        (b"\x07\x01", "unknown_type"),
        (b"\x09" + body(Algo=0, Buf=lzw.compress(b"\x09" + body(Algo=0, Buf=b""))), "unknown_type"),
        (b"\x09" + body(Algo=3, Buf=b""), "compress"),
        (b"\x09" + body(Algo=0, Buf=lzw.compress(b"")), "compress"),
        (b"\x09" + body(Algo=0, Buf=lzw.compress(b"\x06" + body(Nodes=1))), "truncated"),
        (b"\x00\xc1", "msgpack"),
        (header(6, Nodes=1, UserStateLen=0, Join=False) + body(State=9), "field"),
    ],
)
def test_bad_streams_are_refused_as_soon_as_they_show_it(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as err:
        StreamDecoder().feed(data)
    assert err.value.reason == reason


def test_encrypted_stream_length_is_checked_before_buffering() -> None:
    decoder = StreamDecoder(Keyring([os.urandom(32)]))
    with pytest.raises(DecodeError) as err:
        decoder.feed(struct.pack(">BI", 10, 20 * 1024 * 1024 + 1))
    assert err.value.reason == "too_large"


def test_encryption_policy_on_streams() -> None:
    ring = Keyring([os.urandom(32)])
    plain = encode_stream(Ack(1), keyring=None, compression=True)
    with pytest.raises(DecodeError) as err:
        StreamDecoder(ring).feed(plain)
    assert err.value.reason == "not_encrypted"
    assert StreamDecoder(ring, verify_incoming=False).feed(plain) == Ack(1)
    sealed = encode_stream(Ack(1), keyring=ring, compression=True, label=b"lbl")
    assert StreamDecoder(ring, label=b"lbl").feed(sealed) == Ack(1)
    with pytest.raises(DecodeError) as err:
        StreamDecoder(ring).feed(sealed)
    assert err.value.reason == "decrypt"


def test_limits_are_configurable() -> None:
    tight = Limits(max_push_state_nodes=2, max_user_msg_bytes=10, max_push_state_bytes=100)
    nodes = tuple(PushNodeState(f"n{i}", IP, 1, b"", 1, NodeStateCode.ALIVE) for i in range(3))
    for msg in (PushPull(False, nodes), UserMsg(b"x" * 11), PushPull(False, (), b"s" * 101)):
        with pytest.raises(DecodeError) as err:
            StreamDecoder(limits=tight).feed(encode_stream(msg, keyring=None, compression=False))
        assert err.value.reason == "too_large"


def test_a_failed_stream_stays_failed() -> None:
    decoder = StreamDecoder()
    with pytest.raises(DecodeError) as first:
        decoder.feed(b"\x04garbage")
    with pytest.raises(DecodeError) as again:
        decoder.feed(encode_stream(Ack(1), keyring=None, compression=False))
    assert again.value is first.value
    with pytest.raises(DecodeError):
        decoder.eof()
