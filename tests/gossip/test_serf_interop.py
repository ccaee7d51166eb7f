"""Interop with real serf agents (Debian serf 0.9.4, memberlist 0.2.2) on 127.0.0.1.

Our side is the real standalone agent (`python -m gossip agent`), so a crash is a real SIGKILL.
Each scenario runs in plaintext and with `-encrypt` (the same key in our keyring file), with
serf's default compression, on the LAN profile on both sides. What must hold:

* our node joins a serf cluster and every serf agent lists it `alive` with its tags;
* a serf agent joins the cluster *through* our node;
* we declare a SIGKILLed serf agent failed, and serf declares a SIGKILLed agent of ours failed
  (both crashes at once, to keep the test short);
* our graceful leave (SIGTERM) shows as `left` on serf;
* serf's logs hold no `[ERR]`/`[WARN]` line except ones about serf's own user layer, and, once
  the crashes happened, ones about reaching the crashed members;
* with a different key, serf never lists us, and we count what we could not decrypt.

Every process is stopped by its PID in a `finally`.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from gossip.config import GossipConfig
from gossip.keyring import Keyring
from gossip.transport import GossipService, JoinError
from tests.conftest import require_binary
from tests.gossip.agentproc import AgentProcess
from tests.gossip.serf import SerfAgent, new_key, problem_lines, serf_fleet

pytestmark = pytest.mark.peer

TAGS = {"role": "weavepy", "impl": "python"}
# LAN profile, 5 members: serf measured 5.4-8.9 s from SIGKILL to `failed` here.
DETECT_TIMEOUT = 20.0


@pytest.fixture(params=["plaintext", "encrypted"])
def key(request: pytest.FixtureRequest) -> str | None:
    require_binary("serf")
    return new_key() if request.param == "encrypted" else None


def keyring_file(tmp_path: Path, key: str | None) -> Path | None:
    if key is None:
        return None
    path = tmp_path / "keyring.json"
    path.write_text(json.dumps([key]))  # serf's keyring file format
    return path


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    try:
        yield started
    finally:
        for agent in started:
            agent.stop()


def unreachable(*endpoints: str) -> list[str]:
    """Log patterns that are expected once these members (names or ip:port) crashed."""
    return [re.escape(e) for e in endpoints]


@pytest.mark.timeout(60)
def test_serf_cluster_and_our_agents(
    tmp_path: Path, key: str | None, agents: list[AgentProcess]
) -> None:
    keyring = keyring_file(tmp_path, key)
    with serf_fleet(tmp_path) as fleet:
        s0 = SerfAgent("s0", tmp_path, encrypt=key)
        fleet.append(s0)
        s0.wait_ready()
        s1 = SerfAgent("s1", tmp_path, encrypt=key, join=[s0.address])
        fleet.append(s1)
        s1.wait_ready()

        # Our node joins the serf cluster; every agent lists it alive with its tags.
        py0 = AgentProcess("py0", tmp_path, join=[s0.address], tags=TAGS, keyring_file=keyring)
        agents.append(py0)
        py0.wait_started()
        for serf in (s0, s1):
            serf.wait_status("py0", ["alive"], 10)
            member = serf.members()["py0"]
            assert member.tags == TAGS
            assert (member.addr, member.port) == ("127.0.0.1", py0.port)
        py0.wait_event(["join"], "s1", 10)

        # A serf agent joins through our node and learns everyone from it.
        s2 = SerfAgent("s2", tmp_path, encrypt=key, join=[py0.address])
        fleet.append(s2)
        s2.wait_ready()
        for name in ("s0", "s1", "py0"):
            s2.wait_status(name, ["alive"], 10)
        py0.wait_event(["join"], "s2", 10)

        # A second node of ours, to be crashed.
        py1 = AgentProcess("py1", tmp_path, join=[s2.address], keyring_file=keyring)
        agents.append(py1)
        py1.wait_started()
        s0.wait_status("py1", ["alive"], 10)
        for name in ("s1", "py1"):
            py0.wait_event(["join"], name, 10)
        time.sleep(1.0)  # let the push/pull and probes settle before the crashes
        clean_before_crash = {serf.name: problem_lines(serf.log_text()) for serf in (s0, s1, s2)}

        # Crash one serf agent and one of ours at the same moment.
        crashed_at = time.monotonic()
        s1.kill()
        py1.kill()
        py0.wait_event(["failed"], "s1", DETECT_TIMEOUT, after=crashed_at)
        for serf in (s0, s2):
            serf.wait_status("py1", ["failed"], DETECT_TIMEOUT)
            serf.wait_status("s1", ["failed"], DETECT_TIMEOUT)

        # Our graceful leave shows as `left`, and the agent exits 0.
        assert py0.terminate() == 0
        for serf in (s0, s2):
            serf.wait_status("py0", ["left"], 10)

        assert clean_before_crash == {"s0": [], "s1": [], "s2": []}
        crashed = unreachable("s1", "py1", s1.address, f"127.0.0.1:{py1.port}")
        for serf in (s0, s2):
            assert problem_lines(serf.log_text(), crashed) == [], serf.name


@pytest.mark.timeout(40)
async def test_key_mismatch_is_rejected_and_counted(tmp_path: Path) -> None:
    require_binary("serf")
    ours = Keyring([base64.b64decode(new_key())])
    with serf_fleet(tmp_path) as fleet:
        s0 = SerfAgent("s0", tmp_path, encrypt=new_key())
        fleet.append(s0)
        await trio.to_thread.run_sync(s0.wait_ready)
        async with GossipService(GossipConfig.lan(), "py0", ("127.0.0.1", 0), keyring=ours) as svc:
            # We cannot join: serf cannot read our push/pull, and we could not read its answer.
            with pytest.raises(JoinError):
                await svc.join([s0.address])
            # Serf cannot join us either: its push/pull does not decrypt here, and is counted.
            result = await trio.to_thread.run_sync(s0.join, f"127.0.0.1:{svc.address[1]}")
            assert result.returncode != 0
            assert svc.stats.drops()["stream_decrypt"] >= 1
            assert "py0" not in await trio.to_thread.run_sync(s0.members)
            assert {m.name for m in svc.members()} == {"py0"}
        assert re.search(r"\[ERR\] memberlist: .*ecrypt", s0.log_text())
