"""Fuzzing the decoders: random bytes and mutated serf captures never raise anything but
DecodeError, and hostile size claims are refused before memory is spent on them."""

from __future__ import annotations

import os
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz_atheris import golden_captures
from gossip.keyring import Keyring
from gossip.limits import DEFAULT_LIMITS, Limits
from gossip.messages import DecodeError
from gossip.wire import PacketCodec, StreamDecoder, decode_message, encode_compressed

KEY = os.urandom(32)


# decrypted where needed, so mutations reach the layers below encryption
UDP = golden_captures("udp")
TCP = golden_captures("tcp")


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xDB, 0xDF, 0xFF]))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at : at + draw(st.integers(1, 8))]
    return bytes(data)


def decode_packet_strictly(data: bytes) -> None:
    try:
        decode_message(data)
    except DecodeError as err:
        assert err.reason and isinstance(err.reason, str)
    result = PacketCodec(None, compression=True).decode_parts(data)
    assert all(isinstance(e, DecodeError) for e in result.errors)


def feed_stream(data: bytes, chunk: int, keyring: Keyring | None = None) -> None:
    decoder = StreamDecoder(keyring)
    try:
        for i in range(0, len(data), chunk):
            decoder.feed(data[i : i + chunk])
        decoder.eof()
    except DecodeError as err:
        assert err.reason and isinstance(err.reason, str)


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=1500))
def test_random_packets(data: bytes) -> None:
    decode_packet_strictly(data)


@FUZZ
@given(st.sampled_from(range(14)), st.binary(max_size=200))
def test_random_bodies_behind_every_type_byte(msg_type: int, rest: bytes) -> None:
    decode_packet_strictly(bytes([msg_type]) + rest)
    feed_stream(bytes([msg_type]) + rest, 3)


@FUZZ
@given(mutated(UDP))
def test_mutated_serf_packets(data: bytes) -> None:
    decode_packet_strictly(data)


@FUZZ
@given(st.binary(max_size=300))
def test_random_encrypted_packets(data: bytes) -> None:
    codec = PacketCodec(Keyring([KEY]), compression=True)
    with pytest.raises(DecodeError):
        codec.decode(data)
    PacketCodec(Keyring([KEY]), True, verify_incoming=False).decode_parts(data)


@FUZZ
@given(st.binary(max_size=1500), st.integers(1, 64))
def test_random_streams(data: bytes, chunk: int) -> None:
    feed_stream(data, chunk)
    feed_stream(data, chunk, Keyring([KEY]))


@FUZZ
@given(mutated(TCP), st.sampled_from([1, 5, 64, 100_000]))
def test_mutated_serf_streams(data: bytes, chunk: int) -> None:
    feed_stream(data, chunk)


@FUZZ
@given(mutated(TCP))
def test_mutated_streams_inside_a_valid_encryption(data: bytes) -> None:
    ring = Keyring([KEY])
    feed_stream(ring.encrypt_stream(data), 1000, ring)


# -- hostile sizes ----------------------------------------------------------------------------


@contextmanager
def peak_allocation() -> Iterator[Callable[[], int]]:
    tracemalloc.start()
    try:
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def body(**fields: Any) -> bytes:
    packed: bytes = msgpack.packb({k.encode(): v for k, v in fields.items()}, use_bin_type=False)
    return packed


@pytest.mark.parametrize(
    "claim",
    [
        b"\x06" + body(Join=False, Nodes=0, UserStateLen=2**31 - 1),
        b"\x06" + body(Join=False, Nodes=2**31 - 1, UserStateLen=0),
        b"\x08" + body(UserMsgLen=2**62),
        b"\x0a\xff\xff\xff\xff",
    ],
)
def test_huge_claims_are_refused_from_the_header_alone(claim: bytes) -> None:
    decoder = StreamDecoder(Keyring([KEY]), verify_incoming=False)
    with peak_allocation() as peak, pytest.raises(DecodeError) as err:
        decoder.feed(claim)
    assert err.value.reason == "too_large"
    assert peak() < 256 * 1024


def test_a_raw_field_claiming_gigabytes_is_cut_off_at_the_object_cap() -> None:
    limits = Limits(max_stream_object_bytes=64 * 1024)
    header = b"\x06" + body(Join=False, Nodes=1, UserStateLen=0)
    node = b"\x87\xa4Name\xdb\x7f\xff\xff\xff"  # a name claiming 2 GiB
    decoder = StreamDecoder(limits=limits)
    filler = bytes(16 * 1024)
    with peak_allocation() as peak, pytest.raises(DecodeError) as err:
        decoder.feed(header + node)
        for _ in range(64):  # 1 MiB of "name"
            decoder.feed(filler)
    assert err.value.reason in {"too_large", "msgpack"}
    assert peak() < 1024 * 1024


def test_container_headers_claiming_billions_of_entries_allocate_nothing() -> None:
    for data in (b"\x00\xdd\xff\xff\xff\xff", b"\x00\xdf\xff\xff\xff\xff"):
        with peak_allocation() as peak, pytest.raises(DecodeError):
            decode_message(data)
        assert peak() < 64 * 1024
        with peak_allocation() as peak, pytest.raises(DecodeError):
            StreamDecoder().feed(data)
        assert peak() < 256 * 1024


def test_a_stream_compression_bomb_stops_at_the_decompression_cap() -> None:
    limits = Limits(max_decompressed_bytes=1024 * 1024)
    bomb = encode_compressed(b"\x08" + body(UserMsgLen=4 * 1024 * 1024) + bytes(4 * 1024 * 1024))
    assert len(bomb) < 20_000
    with peak_allocation() as peak, pytest.raises(DecodeError) as err:
        StreamDecoder(limits=limits).feed(bomb)
    assert err.value.reason == "lzw"
    assert peak() < 6 * 1024 * 1024  # the capped output, LZW's table, and copies of both


def test_a_packet_compression_bomb_stops_at_the_packet_cap() -> None:
    bomb = encode_compressed(b"\x08" + bytes(4 * 1024 * 1024))
    assert len(bomb) < DEFAULT_LIMITS.udp_receive_size
    with peak_allocation() as peak, pytest.raises(DecodeError):
        decode_message(bomb)
    assert peak() < 8 * DEFAULT_LIMITS.max_packet_decompressed_bytes


def test_nested_compression_shares_one_budget() -> None:
    inner = encode_compressed(b"\x08" + bytes(700 * 1024))
    outer = encode_compressed(inner)
    twice = encode_compressed(b"\x07\x02" + struct.pack(">HH", len(inner), len(inner)) + inner * 2)
    assert decode_message(outer)  # 700 KiB fits the 1 MiB packet budget
    with pytest.raises(DecodeError) as err:
        decode_message(twice)  # 2 x 700 KiB does not
    assert err.value.reason == "lzw"
