"""gossip.keyring: memberlist's AES-GCM envelopes and keyring operations, and real serf bytes."""

from __future__ import annotations

import base64
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.keyring import PACKET_OVERHEAD, Keyring, encrypt_packet_v0
from gossip.messages import DecodeError, MessageType

GOLDEN = json.loads((Path(__file__).parent / "golden" / "serf_captures.json").read_text())


def serf_encrypted(transport: str) -> list[tuple[bytes, bytes]]:
    return [
        (base64.b64decode(c["key_b64"]), bytes.fromhex(c["hex"]))
        for c in GOLDEN["captures"]
        if c["key_b64"] and c["transport"] == transport
    ]


@pytest.mark.parametrize("size", [16, 24, 32])
def test_packet_round_trip_with_each_key_size(size: int) -> None:
    ring = Keyring([os.urandom(size)])
    sealed = ring.encrypt_packet(b"hello gossip")
    assert sealed[0] == 1  # version 1: no padding
    assert len(sealed) == len(b"hello gossip") + PACKET_OVERHEAD
    assert ring.decrypt_packet(sealed) == b"hello gossip"


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=2000), st.binary(max_size=20))
def test_round_trips_with_any_payload_and_label(plain: bytes, label: bytes) -> None:
    ring = Keyring([os.urandom(32)])
    assert ring.decrypt_packet(ring.encrypt_packet(plain, label), label) == plain
    frame = ring.encrypt_stream(plain, label)
    assert frame[0] == MessageType.ENCRYPT
    assert struct.unpack(">I", frame[1:5])[0] == len(frame) - 5
    assert ring.decrypt_stream_payload(frame[:5], frame[5:], label) == plain


def test_wrong_key_wrong_label_and_tampering_are_decrypt_errors() -> None:
    ring, other = Keyring([os.urandom(32)]), Keyring([os.urandom(32)])
    sealed = ring.encrypt_packet(b"secret", b"label")
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    attempts: list[Callable[[], bytes]] = [
        lambda: other.decrypt_packet(sealed, b"label"),
        lambda: ring.decrypt_packet(sealed, b"other-label"),
        lambda: ring.decrypt_packet(tampered, b"label"),
        lambda: ring.decrypt_packet(b""),
        lambda: ring.decrypt_packet(b"\x02" + bytes(40)),  # unknown version
        lambda: ring.decrypt_packet(b"\x01" + bytes(20)),  # too short
    ]
    for attempt in attempts:
        with pytest.raises(DecodeError) as err:
            attempt()
        assert err.value.reason == "decrypt"


def test_stream_header_is_authenticated() -> None:
    ring = Keyring([os.urandom(16)])
    frame = ring.encrypt_stream(b"push pull state")
    with pytest.raises(DecodeError):
        ring.decrypt_stream_payload(b"\x0a\x00\x00\x00\x01", frame[5:])


def test_version_0_padded_payloads_are_accepted() -> None:
    key = os.urandom(24)
    for plain in (b"", b"x", bytes(15), bytes(16), bytes(17), b"memberlist protocol 1"):
        sealed = encrypt_packet_v0(key, plain)
        assert sealed[0] == 0
        assert Keyring([key]).decrypt_packet(sealed) == plain


def test_every_installed_key_is_tried_and_the_primary_encrypts() -> None:
    old, new = os.urandom(32), os.urandom(32)
    sender = Keyring([old])
    receiver = Keyring([new, old])  # primary first
    assert receiver.primary == new
    assert receiver.decrypt_packet(sender.encrypt_packet(b"rolling")) == b"rolling"
    assert Keyring([new]).decrypt_packet(receiver.encrypt_packet(b"x")) == b"x"


def test_install_use_remove_follow_memberlist() -> None:
    a, b, c = (os.urandom(32) for _ in range(3))
    ring = Keyring([a])
    ring.install(b)
    ring.install(b)  # installing twice is a no-op
    assert list(ring.keys) == [a, b]
    ring.use(b)
    assert ring.primary == b and list(ring.keys) == [b, a]
    with pytest.raises(ValueError, match="primary"):
        ring.remove(b)
    with pytest.raises(ValueError, match="not in the keyring"):
        ring.use(c)
    ring.remove(a)
    assert list(ring.keys) == [b]
    ring.remove(c)  # removing an absent key is a no-op, as in memberlist
    assert Keyring([a, b], primary=c).keys == (c, a, b)


def test_replace_makes_the_ring_the_new_list_in_one_step() -> None:
    old, new = os.urandom(32), os.urandom(32)
    ring = Keyring([old])
    sealed_with_old = ring.encrypt_packet(b"before")
    ring.replace([old, new])  # install
    assert ring.keys == (old, new)
    ring.replace([new, old])  # use
    assert ring.primary == new and ring.decrypt_packet(sealed_with_old) == b"before"
    ring.replace([new])  # remove
    assert ring.keys == (new,)
    with pytest.raises(DecodeError):
        ring.decrypt_packet(sealed_with_old)
    with pytest.raises(ValueError):
        ring.replace([])
    with pytest.raises(ValueError, match="16, 24 or 32"):
        ring.replace([new, bytes(5)])
    assert ring.keys == (new,)  # a refused list changes nothing


@pytest.mark.parametrize("size", [0, 8, 15, 17, 31, 33, 64])
def test_bad_key_sizes_are_refused(size: int) -> None:
    with pytest.raises(ValueError, match="16, 24 or 32"):
        Keyring([bytes(size)])
    ring = Keyring([bytes(16)])
    with pytest.raises(ValueError):
        ring.install(bytes(size))


def test_from_file_reads_serfs_json_keyring_and_plain_lines(tmp_path: Path) -> None:
    keys = [os.urandom(32), os.urandom(16)]
    encoded = [base64.b64encode(k).decode() for k in keys]
    serf_file = tmp_path / "keyring.json"
    serf_file.write_text(json.dumps(encoded))
    ring = Keyring.from_file(serf_file)
    assert ring.keys == tuple(keys) and ring.primary == keys[0]
    lines = tmp_path / "keys.txt"
    lines.write_text("# our keys\n" + "\n\n".join(reversed(encoded)) + "\n")
    assert Keyring.from_file(lines).keys == tuple(reversed(keys))


@pytest.mark.parametrize(
    ("content", "message"),
    [("[]", "no keys"), ("", "no keys"), ('["not base64!"]', "base64"), ("[1, 2]", "JSON list")],
)
def test_from_file_errors_say_what_is_wrong(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        Keyring.from_file(path)


def test_real_serf_encrypted_packets_decrypt() -> None:
    captures = serf_encrypted("udp")
    assert captures, "the golden file has encrypted serf packets"
    for key, data in captures:
        plain = Keyring([os.urandom(32), key]).decrypt_packet(data)  # found as a secondary key
        assert plain[0] in {m.value for m in MessageType}
        with pytest.raises(DecodeError):
            Keyring([os.urandom(32)]).decrypt_packet(data)


def test_real_serf_encrypted_streams_decrypt() -> None:
    captures = serf_encrypted("tcp")
    assert captures
    for key, data in captures:
        assert data[0] == MessageType.ENCRYPT
        (length,) = struct.unpack(">I", data[1:5])
        plain = Keyring([key]).decrypt_stream_payload(data[:5], data[5 : 5 + length])
        assert plain[0] == MessageType.COMPRESS  # serf always compresses streams
