"""The wire format: every message kind round-trips; garbage only ever raises IpamDecodeError."""

from __future__ import annotations

import contextlib
import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weavepy.ipam import wire
from weavepy.ipam.blocks import BlockSpace
from weavepy.ipam.core import IpamCore
from weavepy.ipam.errors import IpamDecodeError
from weavepy.ipam.state import (
    Claim,
    ClusterState,
    Demote,
    Free,
    Join,
    Leave,
    Promote,
    Remove,
    Renew,
)
from weavepy.ipam.wire import (
    Accept,
    Accepted,
    Attestation,
    Behind,
    Decided,
    Envelope,
    Hello,
    Nack,
    Prepare,
    Promise,
    StateMsg,
    StateRequest,
)

SPACE = BlockSpace.parse("198.19.0.0/16", 24)
BALLOT = (3, "n2", 12345)
VALUE = (
    Join("n9", 1),
    Renew("n1", 1, 2),
    Claim("n1", 1, 3, (4, 5)),
    Remove("n2", 4, "n3", 7, "reclaim", True),
    Free("n2", 5, "n3", 7),
    Promote("n2", 6, "n4"),
    Demote("n2", 7, "n5"),
    Leave("n6", 9, 8),
)


def a_state() -> ClusterState:
    state = ClusterState.found("c0ffee", SPACE, "n1", 5)
    state.apply_value((Join("n2", 1), Claim("n1", 1, 2, (0, 1))))
    return state


BODIES = [
    Hello(0),
    Hello(3),
    Prepare(7, BALLOT, (("n3", 2), ("n4", 5))),
    Promise(7, BALLOT, None, ()),
    Promise(7, BALLOT, (BALLOT, VALUE), (Attestation("n3", 2, False, 301.5),)),
    Accept(7, BALLOT, VALUE),
    Accepted(7, BALLOT),
    Nack(7, BALLOT, (4, "n1", 1)),
    Decided(7, VALUE),
    Behind(6),
    StateMsg(a_state()),
    StateRequest(6),
]


@pytest.mark.parametrize("body", BODIES, ids=lambda b: type(b).__name__)
def test_every_kind_round_trips(body: wire.Body) -> None:
    envelope = Envelope("c0ffee", (1, "n1", 99), "n2", 42, 3, 7, body)
    data = wire.encode(envelope)
    assert wire.is_ipam(data) and data[:2] == bytes([0xC1, 1])
    assert wire.kind_of(data) is envelope.kind
    decoded = wire.decode(data)
    if isinstance(body, StateMsg):
        assert isinstance(decoded.body, StateMsg)
        assert decoded.body.state.to_plain() == body.state.to_plain()
    else:
        assert decoded == envelope
    assert len(data) <= wire.MAX_MESSAGE_BYTES


def test_serf_user_messages_are_not_ours() -> None:
    # serf: [type byte 0..~15][msgpack...]; memberlist user state for serf starts with 2
    for serf_type in range(16):
        assert not wire.is_ipam(bytes([serf_type]) + msgpack.packb({"LTime": 1}))
    assert not wire.is_ipam(b"") and not wire.is_ipam(b"\xc1")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x02\x81\xa1a\x01", "not_ipam"),
        (b"\xc1\x02" + msgpack.packb([1]), "bad_version"),
        (b"\xc1\x01\xc1", "bad_msgpack"),
        (b"\xc1\x01" + msgpack.packb([1, 2]), "bad_shape"),
        (b"\xc1\x01" + msgpack.packb([99, "c", [0, "", 0], "n", 5, 0, 0, [0]]), "unknown_kind"),
        (b"\xc1\x01" + msgpack.packb([1, "c", [0, "", 0], "", 5, 0, 0, [0]]), "bad_shape"),
        (b"\xc1\x01" + msgpack.packb([1, "c", [0, "", 0], "n", 5, -1, 0, [0]]), "bad_shape"),
        (b"\xc1\x01" + msgpack.packb([7, "c", [0, "", 0], "n", 5, 0, 0, [1, [["x"]]]]), "bad_op"),
        (b"\xc1\x01" + msgpack.packb([7, "c", [0, "", 0], "n", 5, 0, 0, [1, []]]), "bad_op"),
        (b"\xc1\x01" + msgpack.packb([9, "c", [0, "", 0], "n", 5, 0, 0, {"x": 1}]), "bad_state"),
        (
            b"\xc1\x01" + msgpack.packb([8, "c", [0, "", 0], "n", 5, 0, 0, ["x" * 3000]]),
            "too_large",
        ),
    ],
)
def test_garbage_is_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(IpamDecodeError) as caught:
        wire.decode(data)
    assert caught.value.reason == reason


def test_a_state_whose_cluster_differs_from_its_envelope_is_refused() -> None:
    data = wire.encode(Envelope("other", (0, "", 0), "n1", 42, 1, 1, StateMsg(a_state())))
    with pytest.raises(IpamDecodeError, match="bad_state"):
        wire.decode(data)


def test_inconsistent_states_are_refused() -> None:
    plain = a_state().to_plain()
    plain["blocks"].append([9, 7])
    with pytest.raises(IpamDecodeError, match="names member #7 of 2"):
        ClusterState.from_plain(plain)
    plain = a_state().to_plain()
    plain["voters"] = ["n2", "n1"]
    with pytest.raises(IpamDecodeError, match="sorted"):
        ClusterState.from_plain(plain)


def test_oversized_values_are_not_encoded() -> None:
    huge = tuple(Claim("n" * 250, 1, i, (i,)) for i in range(8))
    with pytest.raises(ValueError, match="exceeds"):
        wire.encode(Envelope("c", (0, "", 0), "n1", 42, 1, 1, Accept(1, BALLOT, huge)))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_decode_errors(data: bytes) -> None:
    for candidate in (data, b"\xc1\x01" + data):
        with contextlib.suppress(IpamDecodeError):
            wire.decode(candidate)


plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 12), plain_values, st.integers(0, 7))
def test_well_formed_msgpack_of_the_wrong_shape_only_raises_decode_errors(
    kind: int, body: object, mutate: int
) -> None:
    top: list[object] = [kind, "c0ffee", [0, "", 0], "n1", 42, 1, 1, body]
    if mutate:
        top[mutate] = body
    data = b"\xc1\x01" + msgpack.packb(top, use_bin_type=True)
    with contextlib.suppress(IpamDecodeError):
        wire.decode(data)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(BODIES), st.integers(0, 400), st.binary(min_size=1, max_size=3))
def test_corrupted_real_messages_only_raise_decode_errors(
    body: wire.Body, position: int, noise: bytes
) -> None:
    data = bytearray(wire.encode(Envelope("c0ffee", (0, "", 0), "n2", 42, 1, 1, body)))
    position %= len(data)
    data[position : position + len(noise)] = noise
    with contextlib.suppress(IpamDecodeError):
        wire.decode(bytes(data))


def test_the_core_counts_garbage_and_refuses_it_loudly() -> None:
    core = IpamCore("n1", "198.19.0.0/16", 24, rng=random.Random(1), bootstrap="found")
    core.handle_timer(0.0)
    for data, reason in ((b"\xc1\x01\xc1", "bad_msgpack"), (b"\xc1\x07xx", "bad_version")):
        with pytest.raises(IpamDecodeError, match=reason):
            core.on_message("n2", data, 1.0)
    spoofed = wire.encode(Envelope(core.cluster_id or "", (0, "", 0), "n3", 42, 0, 0, Hello(0)))
    with pytest.raises(IpamDecodeError, match="sender_mismatch"):
        core.on_message("n2", spoofed, 1.0)
    assert core.status(1.0).dropped == {"bad_msgpack": 1, "bad_version": 1, "sender_mismatch": 1}
    assert core.status(1.0).state.value == "ready"


def test_a_message_from_another_cluster_is_refused_counted_and_reported() -> None:
    core = IpamCore("n1", "198.19.0.0/16", 24, rng=random.Random(1), bootstrap="found")
    core.handle_timer(0.0)
    mine = core.cluster_id
    foreign = wire.encode(Envelope("0ther", (0, "", 0), "z1", 42, 1, 9, Decided(10, VALUE)))
    core.on_message("z1", foreign, 1.0)  # well-formed: refused, not raised
    core.on_message("z1", foreign, 2.0)
    status = core.status(2.0)
    assert status.cluster_id == mine and status.slot == 1  # nothing of it was applied
    assert status.dropped == {"cluster_mismatch": 2}
    (report,) = status.cluster_mismatches
    assert report.peer == "z1" and report.remote_cluster == "0ther"
    assert f"belongs to IPAM cluster {mine}, peer z1 to cluster 0ther" in report.message
    assert "weavepy reset" in report.message
    core.mark_persisted(core.snapshot()["seq"])
    mismatches = [e for e in core.events() if type(e).__name__ == "ClusterMismatch"]
    assert len(mismatches) == 1  # reported once per peer, not per message
