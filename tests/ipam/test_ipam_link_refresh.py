"""The IPAM link re-reads blocks, cluster id and tag only after the core's state changed: a
member event that changes nothing (a suspicion refuted, say: a join wave or a CPU-starved
cluster sends thousands) costs no status render, and a real change is still announced.
The link and core are the agent's own, run on trio without gossip (a founder alone)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from weavepy.config import load_config
from weavepy.identity import load_or_create
from weavepy.ipam.core import IpamCore
from weavepy.ipam.status import IpamState
from weavepy.ipam_link import IpamLink
from weavepy.ipam_mode import open_ipam


@pytest.mark.timeout(30)
async def test_member_events_that_change_nothing_render_no_status(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config({"name": "n1", "ipalloc_range": "198.19.0.0/16",
                          "state_dir": str(tmp_path)}, {})
    identity, _ = load_or_create(tmp_path, "n1")
    table_changes: list[int] = []
    ipam = open_ipam(config, identity, on_table_change=lambda: table_changes.append(1),
                     on_cluster_id=lambda _: None, on_tag_change=lambda: None)
    assert isinstance(ipam, IpamLink)
    renders: list[float] = []
    status = IpamCore.status
    monkeypatch.setattr(IpamCore, "status", lambda core, now: renders.append(now) or
                        status(core, now))
    async with trio.open_nursery() as nursery:
        await nursery.start(ipam.run)
        with trio.fail_after(15):  # founded alone (no peers), then its own block decided
            while not (ipam.blocks_by_node().get("n1") and
                       ipam.status().state is IpamState.READY):
                await trio.sleep(0.01)
        assert table_changes, "the block was not announced"
        await trio.sleep(0.2)
        renders.clear()
        rng = random.Random(1)
        for _ in range(200):  # events about a member that is not in the cluster
            if rng.random() < 0.5:
                ipam.member_alive("stranger", {})
            else:
                ipam.member_dead("stranger")
            await trio.sleep(0)
        await trio.sleep(0.2)
        assert renders == [], f"{len(renders)} status renders for events that changed nothing"
        nursery.cancel_scope.cancel()
