"""gossip.lzw against Go's compress/lzw (LSB, literal width 8).

The vectors in golden/lzw_vectors.json are Go's own output: `lzw_golden.py` (beside this file)
runs the small Go program `lzw_golden/main.go` over its recipes and stores the results.
`test_go_regenerates_the_golden_vectors` runs it again with Debian's golang-go and compares, so
the file can always be regenerated (`.venv/bin/python tests/gossip/lzw_golden.py`) and never
drifts from Go.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.lzw import CLEAR_CODE, EOF_CODE, compress, decompress
from gossip.messages import DecodeError
from tests.conftest import require_binary
from tests.gossip import lzw_golden
from tests.gossip.lzw_golden import make_input

VECTORS = json.loads(lzw_golden.GOLDEN.read_text())


def pack_codes(codes: list[tuple[int, int]]) -> bytes:
    """Pack (code, width) pairs LSB-first, as Go's writer does."""
    bits = n_bits = 0
    for code, width in codes:
        bits |= code << n_bits
        n_bits += width
    return bits.to_bytes((n_bits + 7) // 8, "little")


@pytest.mark.parametrize(
    "vector", VECTORS["vectors"], ids=lambda v: json.dumps(v["input"], sort_keys=True)[:60]
)
def test_compress_matches_go_byte_for_byte(vector: dict[str, Any]) -> None:
    data = make_input(vector["input"])
    assert len(data) == vector["input_len"]
    out = compress(data)
    assert len(out) == vector["output_len"]
    assert hashlib.sha256(out).hexdigest() == vector["output_sha256"]
    if "output_hex" in vector:
        assert out.hex() == vector["output_hex"]


@pytest.mark.parametrize(
    "vector", VECTORS["vectors"], ids=lambda v: json.dumps(v["input"], sort_keys=True)[:60]
)
def test_decompress_reads_go_output(vector: dict[str, Any]) -> None:
    data = make_input(vector["input"])
    go_bytes = compress(data)  # proven equal to Go's output above
    assert decompress(go_bytes, len(data)) == data


@pytest.mark.peer
@pytest.mark.timeout(300)
def test_go_regenerates_the_golden_vectors() -> None:
    go = require_binary("go", "golang-go")
    assert lzw_golden.vectors(go) == VECTORS["vectors"]


def test_vectors_cover_the_interesting_writer_states() -> None:
    whys = {v["input"].get("why") for v in VECTORS["vectors"]}
    assert {"close hits grow", "close hits clear"} <= whys
    sizes = [v["input_len"] for v in VECTORS["vectors"] if v["input"]["kind"] == "random"]
    assert max(sizes) > 20000  # several table resets


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_round_trip(data: bytes) -> None:
    assert decompress(compress(data), len(data)) == data


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"ab", b"abc", b"\x00", b"\xff\xfe"]), max_size=4000))
def test_round_trip_repetitive(chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    assert decompress(compress(data), len(data)) == data


def test_reader_accepts_clear_anywhere_and_a_stream_without_leading_clear() -> None:
    # literal 'a', clear, clear, 'b', 'c', (258 = "bc"), eof  -- all 9 bits wide
    codes = [(ord("a"), 9), (CLEAR_CODE, 9), (CLEAR_CODE, 9), (ord("b"), 9), (ord("c"), 9)]
    codes += [(258, 9), (EOF_CODE, 9)]
    assert decompress(pack_codes(codes), 100) == b"abcbc"


def test_kwkwk_code_expands_to_previous_plus_its_first_byte() -> None:
    codes = [(CLEAR_CODE, 9), (ord("x"), 9), (258, 9), (EOF_CODE, 9)]
    assert decompress(pack_codes(codes), 100) == b"xxx"


def test_reader_keeps_a_full_table_when_the_writer_never_clears() -> None:
    # A foreign writer may fill all 4096 codes without a clear: Go's reader freezes the table.
    codes: list[tuple[int, int]] = [(CLEAR_CODE, 9)]
    expected = bytearray()
    next_code, width = EOF_CODE, 9
    rng = random.Random(5)
    for _ in range(5000):
        literal = rng.randrange(256)
        codes.append((literal, width))
        expected.append(literal)
        next_code = min(next_code + 1, 4095)
        if next_code >= 1 << width and width < 12:
            width += 1
    codes.append((EOF_CODE, width))
    assert decompress(pack_codes(codes), 10**6) == bytes(expected)


def test_output_cap_is_enforced_before_growing_past_it() -> None:
    bomb = compress(bytes(2_000_000))
    assert len(bomb) < 10_000
    assert decompress(bomb, 2_000_000) == bytes(2_000_000)
    with pytest.raises(DecodeError) as err:
        decompress(bomb, 1_999_999)
    assert err.value.reason == "lzw"


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty input has no eof"),
        (compress(b"hello world")[:-2], "truncated"),
        (pack_codes([(CLEAR_CODE, 9), (300, 9), (EOF_CODE, 9)]), "code beyond the table"),
        (pack_codes([(CLEAR_CODE, 9), (258, 9)]), "kwkwk with no previous code"),
    ],
)
def test_malformed_input_raises_decode_error(data: bytes, why: str) -> None:
    with pytest.raises(DecodeError) as err:
        decompress(data, 10**6)
    assert err.value.reason == "lzw", why


def test_bytes_after_eof_are_ignored_like_go() -> None:
    assert decompress(compress(b"payload") + b"\x00garbage", 100) == b"payload"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000))
def test_garbage_never_raises_anything_but_decode_error(data: bytes) -> None:
    try:
        out = decompress(data, 50_000)
    except DecodeError as err:
        assert err.reason == "lzw"
    else:
        assert len(out) <= 50_000
