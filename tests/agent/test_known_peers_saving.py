"""The live members' addresses (`known-peers.json`) are saved when they change, but a join wave
does not rewrite the file once per member: the first change is saved at once, the rest at most
every `KNOWN_PEERS_SAVE_GAP` seconds, and what changed since the last save is saved at stop.

Real gossip services on loopback; the joiner is the agent's own.
"""

from __future__ import annotations

import dataclasses
import random
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from gossip.config import GossipConfig
from gossip.events import MemberState
from gossip.transport import GossipService
from tests.conftest import wait_until
from weavepy import joiner as joiner_module
from weavepy.joiner import Joiner
from weavepy.peerstore import load_known_peers, save_known_peers

LOOPBACK = "127.0.0.1"
FAST = dataclasses.replace(GossipConfig.local(), probe_interval=0.5, probe_timeout=0.1,
                           gossip_interval=0.05)


def alive(svc: GossipService) -> int:
    return sum(1 for m in svc.members() if m.state is MemberState.ALIVE)


@pytest.mark.timeout(30)
async def test_a_join_wave_is_saved_once_at_first_and_whole_at_stop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saves: list[list[str]] = []

    def counting_save(state_dir: Path, peers: list[str]) -> bool:
        saves.append(list(peers))
        return save_known_peers(state_dir, peers)

    monkeypatch.setattr(joiner_module, "save_known_peers", counting_save)
    monkeypatch.setattr(joiner_module, "KNOWN_PEERS_SAVE_GAP", 60.0)  # longer than the wave
    async with AsyncExitStack() as stack:
        first, *others = [await stack.enter_async_context(
            GossipService(FAST, f"n{i}", (LOOPBACK, 0))) for i in range(6)]
        joiner = Joiner("n0", first.address[1], [], tmp_path, random.Random(1))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(joiner.keep_known, first)
            for i, svc in enumerate(others, start=1):  # the wave: each change announced
                assert await svc.join([first.address]) == 1
                await wait_until(lambda n=i: alive(first) == n + 1, 10, f"n0 sees n{i}")
                joiner.members_changed()
                if i == 1:  # the first change after a quiet spell is saved at once
                    await wait_until(lambda: len(saves) == 1, 10, "the first save")
            await trio.sleep(0.2)
            assert len(saves) == 1, f"a member event rewrote the file: {saves}"
            assert load_known_peers(tmp_path) == [f"{LOOPBACK}:{others[0].address[1]}"]
            nursery.cancel_scope.cancel()  # the agent stops
    expected = sorted(f"{LOOPBACK}:{svc.address[1]}" for svc in others)
    assert len(saves) == 2
    assert load_known_peers(tmp_path) == expected
