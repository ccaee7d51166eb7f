"""The worker plumbing against real kernel sockets on loopback (no namespace needed):
UDP GSO sends of runs and gathered singles, and UDP GRO reads of them."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterator

import pytest

from tunnel.wireguard.device import peer_from_json
from tunnel.wireguard.keys import PrivateKey
from tunnel.wireguard.plane import PlaneConfig, Send
from tunnel.wireguard.timers import TimerConfig
from tunnel.wireguard.workers import (
    _GRO_ANCILLARY,
    UDP_GRO,
    Transmitter,
    gro_segment_size,
    plane_config_from_json,
    plane_config_to_json,
)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
    receiver.settimeout(2)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    yield sender, receiver
    sender.close()
    receiver.close()


def read_all(receiver: socket.socket, expected: int) -> list[bytes]:
    """Datagrams as the application sees them, split out of GRO batches."""
    buffer = bytearray(65536)
    datagrams: list[bytes] = []
    while len(datagrams) < expected:
        size, ancillary, _, _ = receiver.recvmsg_into([buffer], _GRO_ANCILLARY)
        segment = gro_segment_size(ancillary, size)
        datagrams += [bytes(buffer[i : min(i + segment, size)]) for i in range(0, size, segment)]
    return datagrams


@pytest.mark.timeout(10)
def test_gso_runs_and_gathered_singles_arrive_as_separate_datagrams(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = pair
    endpoint = receiver.getsockname()
    counters: Counter[str] = Counter()
    transmitter = Transmitter(sender, counters)
    run = b"".join(bytes([i]) * 1000 for i in range(10)) + b"\xff" * 300
    singles = [bytes([100 + i]) * 96 for i in range(7)]
    transmitter.send([Send(memoryview(run), 1000, endpoint)])
    transmitter.send([Send(memoryview(s), 0, endpoint) for s in singles])
    transmitter.send([Send(memoryview(b"odd size"), 0, endpoint)])
    transmitter.flush()
    got = read_all(receiver, 11 + 7 + 1)
    assert got[:11] == [bytes([i]) * 1000 for i in range(10)] + [b"\xff" * 300]
    assert got[11:18] == singles
    assert got[18] == b"odd size"
    # 1 GSO run + 1 gathered run of 7 singles + 1 single
    assert transmitter.calls == 3 and not counters


def test_plane_config_survives_the_trip_to_a_worker() -> None:
    config = PlaneConfig(mtu=1380, max_datagram=1452, timers=TimerConfig(rekey_after_time=3.0))
    assert plane_config_from_json(plane_config_to_json(config)) == config


def test_the_standalone_config_takes_endpoints_already_parsed() -> None:
    """`python -m tunnel.wireguard.device` reads `[host, port]`: this package parses no
    `host:port` text, and a malformed endpoint is refused instead of half-read."""
    key = PrivateKey.generate().public_key.to_base64()
    peer = peer_from_json({"public_key": key, "endpoint": ["198.18.0.2", 51820]})
    assert peer.endpoint == ("198.18.0.2", 51820)
    assert peer_from_json({"public_key": key}).endpoint is None
    for bad in ["198.18.0.2:51820", ["198.18.0.2"], ["198.18.0.2", "51820"],
                ["198.18.0.2", 0], ["198.18.0.2", True], [None, 51820]]:
        with pytest.raises(ValueError, match=r"\[host, port\]"):
            peer_from_json({"public_key": key, "endpoint": bad})
