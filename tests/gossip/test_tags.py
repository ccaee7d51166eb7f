"""gossip.tags: serf's node-meta tag encoding, checked against serf's own Meta bytes."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gossip.keyring import Keyring
from gossip.messages import Alive, PushPull
from gossip.tags import decode_tags, encode_tags
from gossip.wire import PacketCodec, StreamDecoder

GOLDEN = json.loads((Path(__file__).parent / "golden" / "serf_captures.json").read_text())


def serf_join_reply() -> PushPull:
    for capture in GOLDEN["captures"]:
        if capture["origin"] == "join reply from A":
            msg = StreamDecoder().feed(bytes.fromhex(capture["hex"]))
            assert isinstance(msg, PushPull)
            return msg
    raise AssertionError("no join reply in the golden file")


def gossiped_alives() -> dict[str, Alive]:
    alives: dict[str, Alive] = {}
    for capture in GOLDEN["captures"]:
        if capture["transport"] != "udp":
            continue
        key = capture["key_b64"]
        codec = PacketCodec(Keyring([base64.b64decode(key)]) if key else None, compression=True)
        for msg in codec.decode(bytes.fromhex(capture["hex"])):
            if isinstance(msg, Alive):
                alives[msg.node] = msg
    return alives


def test_serf_meta_decodes_to_its_tags() -> None:
    nodes = {n.name: n for n in serf_join_reply().nodes}
    assert decode_tags(nodes["serf-a"].meta) == {"role": "anchor", "desc": "weave-" * 40}
    alives = gossiped_alives()
    assert decode_tags(alives["serf-b"].meta) == {"role": "second", "desc": "weave-" * 40}
    # Our own Meta, gossiped back by serf, is byte-identical to what we encoded...
    assert alives["pycap"].meta == encode_tags({"role": "capture", "impl": "weavepy"})
    # ...and a member with empty Meta reads as the legacy empty role, as `serf members` shows.
    assert decode_tags(alives["ghost-x"].meta) == {"role": ""}


def test_encoding_is_serfs_format_with_sorted_keys() -> None:
    meta = encode_tags({"zone": "b", "role": "weavepy"})
    assert meta == b"\xff\x82\xa4role\xa7weavepy\xa4zone\xa1b"
    assert encode_tags({}) == b"\xff\x80"


def test_long_values_use_old_spec_raw16_never_str8() -> None:
    meta = encode_tags({"k": "v" * 40})
    assert meta[4] == 0xDA  # raw16, as go-msgpack writes a 40-byte string


def test_legacy_role_meta() -> None:
    assert decode_tags(b"") == {"role": ""}
    assert decode_tags(b"web") == {"role": "web"}


def test_too_large_tags_are_refused() -> None:
    encode_tags({"k": "x" * 500})
    with pytest.raises(ValueError, match="512"):
        encode_tags({"k": "x" * 510})


@pytest.mark.parametrize(
    "meta",
    [b"\xff", b"\xff\xc1", b"\xff\x92\x01\x02", b"\xff\x81\x01\xa1x", b"\xff\xdf\xff\xff\xff\xff"],
)
def test_malformed_tags_decode_tolerantly(meta: bytes) -> None:
    assert decode_tags(meta) == {}


def test_non_string_entries_are_skipped_and_the_rest_kept() -> None:
    meta = b"\xff" + msgpack.packb({b"ok": b"yes", b"n": 5}, use_bin_type=False)
    assert decode_tags(meta) == {"ok": "yes"}


# Four entries of at most 10 + 20 characters (4 bytes each in UTF-8, plus a 3-byte raw16
# header per string) encode to at most 1 + 1 + 4 * (43 + 83) = 506 bytes: always under 512.
FITTING_TAGS = st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=4)


@given(FITTING_TAGS)
def test_round_trip_of_tags_that_fit(tags: dict[str, str]) -> None:
    meta = encode_tags(tags)
    assert len(meta) <= 512
    assert decode_tags(meta) == tags


@given(
    st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=8),
    st.integers(min_value=2, max_value=600),
)
def test_encoding_is_refused_only_for_size_and_accepted_tags_round_trip(
    tags: dict[str, str], limit: int
) -> None:
    try:
        meta = encode_tags(tags, max_size=limit)
    except ValueError as refusal:
        # The only refusal is the size one, and it names a size that really is too large:
        # the same tags encode to exactly that many bytes when the limit allows it.
        found = re.fullmatch(
            r"encoded tags are (\d+) bytes, more than the (\d+) allowed", str(refusal)
        )
        assert found is not None, refusal
        size, allowed = int(found[1]), int(found[2])
        assert allowed == limit < size
        assert len(encode_tags(tags, max_size=size)) == size
        return
    assert len(meta) <= limit
    assert decode_tags(meta) == tags


def test_non_utf8_bytes_from_go_survive_a_round_trip() -> None:
    meta = b"\xff\x81\xa2k\xff\xa2v\xfe"
    assert encode_tags(decode_tags(meta)) == meta
