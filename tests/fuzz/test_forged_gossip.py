"""Forged and junk gossip at a running, encrypted `GossipService` on loopback: rejected, counted
by reason in the service's drop counters (the ones `/status` shows under gossip.drops), and the
cluster stays healthy.

Kinds: no key (plaintext datagrams and streams), a wrong key, replayed stale messages sealed
with the right key (memberlist has no replay window: a replay is harmless because incarnation
numbers make stale news lose, which is what this checks), oversized datagrams, and a short
bounded flood of random junk (the 60 s flood with RSS is bench/junk_flood.py).
"""

from __future__ import annotations

import dataclasses
import os
import random
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from gossip.config import GossipConfig
from gossip.events import MemberState
from gossip.keyring import Keyring
from gossip.messages import Dead, Ping, Suspect
from gossip.transport import GossipService
from gossip.wire import encode_message
from tests.conftest import wait_until

LOOPBACK = "127.0.0.1"
KEY = bytes(range(32))
FAST = dataclasses.replace(GossipConfig.local(), probe_interval=0.5, probe_timeout=0.1,
                           gossip_interval=0.05, retransmit_mult=4)


def all_alive(svc: GossipService, names: set[str]) -> bool:
    return {m.name for m in svc.members() if m.state is MemberState.ALIVE} == names


@asynccontextmanager
async def encrypted_pair() -> AsyncIterator[tuple[GossipService, GossipService]]:
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(
            GossipService(FAST, "a", (LOOPBACK, 0), keyring=Keyring([KEY])))
        b = await stack.enter_async_context(
            GossipService(FAST, "b", (LOOPBACK, 0), keyring=Keyring([KEY])))
        assert await b.join([a.address]) == 1
        await wait_until(lambda: all_alive(a, {"a", "b"}), 5, "a sees b")
        yield a, b


async def send_datagrams(target: tuple[str, int], datagrams: list[bytes]) -> None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
        for datagram in datagrams:
            await raw.sendto(datagram, target)


@pytest.mark.timeout(30)
async def test_forged_packets_are_rejected_and_counted() -> None:
    async with encrypted_pair() as (a, b):
        before = a.stats.drops().copy()
        ping = encode_message(Ping(seq_no=1, node="a", source_addr=b"\x7f\x00\x00\x01",
                                   source_port=1, source_node="mallory"))
        no_key = [ping, b"\x08hello"]
        wrong_key = [Keyring([bytes(range(1, 33))]).encrypt_packet(ping) for _ in range(3)]
        oversized = [Keyring([KEY]).encrypt_packet(os.urandom(60000))[:65000],
                     os.urandom(65000)]
        await send_datagrams(a.address, no_key + wrong_key + oversized)
        await wait_until(lambda: sum((a.stats.drops() - before).values()) >= 7, 3,
                         "every forged datagram is counted")
        new = a.stats.drops() - before
        assert new["decrypt"] >= len(wrong_key) + 1, new
        assert all_alive(a, {"a", "b"}) and all_alive(b, {"a", "b"})


@pytest.mark.timeout(30)
async def test_plaintext_streams_are_refused_by_an_encrypted_node() -> None:
    async with encrypted_pair() as (a, _b):
        before = a.stats.drops().copy()
        with trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM) as raw:
            await raw.connect(a.address)
            await raw.send(encode_message(Ping(seq_no=1, node="a", source_addr=b"",
                                               source_port=0, source_node="x")))
            with trio.move_on_after(3):
                while await raw.recv(4096):
                    pass
        await wait_until(lambda: bool(a.stats.drops() - before), 3, "the stream is counted")
        assert any(k.startswith("stream_") for k in a.stats.drops() - before)


@pytest.mark.timeout(30)
async def test_replayed_stale_news_loses_to_the_incarnation() -> None:
    async with encrypted_pair() as (a, b):
        incarnation = {m.name: m.incarnation for m in a.members()}["b"]
        stale: list[Suspect | Dead] = [
            Suspect(incarnation=incarnation - 1, node="b", from_node="a"),
            Dead(incarnation=incarnation - 1, node="b", from_node="a")]
        sealed = [Keyring([KEY]).encrypt_packet(encode_message(m)) for m in stale]
        await send_datagrams(a.address, sealed * 5)
        await trio.sleep(1.0)  # several probe rounds
        assert all_alive(a, {"a", "b"}) and all_alive(b, {"a", "b"})


@pytest.mark.timeout(30)
async def test_a_short_junk_flood_leaves_the_cluster_healthy() -> None:
    rng = random.Random(8)
    async with encrypted_pair() as (a, b):
        before = sum(a.stats.drops().values())
        sent = 0
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            with trio.move_on_after(3.0):  # bounded: 3 s at most 2000 datagrams/s
                while True:
                    for _ in range(20):
                        await raw.sendto(rng.randbytes(rng.randint(0, 1400)), a.address)
                        sent += 1
                    await trio.sleep(0.01)
        await trio.sleep(0.5)
        dropped = sum(a.stats.drops().values()) - before
        assert dropped >= sent * 0.5, (sent, a.stats.drops())  # UDP may lose some on the way
        assert all_alive(a, {"a", "b"}) and all_alive(b, {"a", "b"})
        b.send_user_message(b"after the flood", to="a")
