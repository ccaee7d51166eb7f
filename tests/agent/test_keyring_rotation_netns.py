"""Gossip key rotation across running agents, in its three steps, with no partition at any step.

Three agents, each with its own keyring file (as on separate hosts), start with the old key.
Each step rewrites one host's file and runs `weavepy reload-keyring` there, one host at a time
(docs/security.md): install (old, new), use (new, old), remove (new). After every single
host's reload, every member still sees all the others alive, and no gossip packet or stream
anywhere has failed to decrypt. A broken keyring file is refused with one line and changes
nothing. After the last step, a fourth agent that has only the old key is refused (its join
cannot be read), and the same agent with the new key joins.
"""

from __future__ import annotations

import base64
import secrets
from pathlib import Path
from typing import Any

import pytest

from weavepy.devtools.agentbox import AgentBox

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def _key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def _write(path: Path, *keys: str) -> None:
    path.write_text("".join(key + "\n" for key in keys))
    path.chmod(0o600)


def _decrypt_failures(rig: AgentBox, nodes: list[Any]) -> dict[str, int]:
    """Per node: gossip packets and streams that no installed key could open."""
    found = {}
    for node in nodes:
        doc = rig.status(node)
        assert doc is not None, rig.logs_tail()
        found[node.name] = sum(count for reason, count in doc["gossip"]["drops"].items()
                               if "decrypt" in reason)
    return found


def _all_alive(rig: AgentBox, nodes: list[Any]) -> bool:
    names = {node.name for node in nodes}
    for node in nodes:
        doc = rig.status(node)
        if doc is None:
            return False
        alive = {p["name"] for p in doc["peers"] if p["state"] == "alive"}
        if alive != names - {node.name}:
            return False
    return True


def _packets_in(rig: AgentBox, nodes: list[Any]) -> dict[str, int]:
    found = {}
    for node in nodes:
        doc = rig.status(node)
        assert doc is not None, rig.logs_tail()
        found[node.name] = doc["gossip"]["packets_in"]
    return found


def _gossip_flowed(rig: AgentBox, nodes: list[Any], since: dict[str, int]) -> bool:
    """Every node has received some packets since `since`: whatever the change broke would
    show in those."""
    now = _packets_in(rig, nodes)
    return all(now[name] >= since[name] + 5 for name in since)


def _reload(rig: AgentBox, node: Any) -> str:
    done = rig.cli(node, "reload-keyring")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.timeout(240)
def test_install_use_remove_across_running_agents_never_partitions(agent_box: Any) -> None:
    rig: AgentBox = agent_box(nodes=4)
    nodes, late = rig.box.nodes[:3], rig.box.nodes[3]
    old, new = _key(), _key()
    files = {node.name: rig.root / f"{node.name}.keyring" for node in rig.box.nodes}
    for node in nodes:
        _write(files[node.name], old)
    rig.launch(nodes[0], key_file=files["n1"])
    rig.wait_api(nodes[0])
    for node in nodes[1:]:
        rig.launch(node, [nodes[0]], key_file=files[node.name])
    rig.wait_mesh(nodes, timeout=60)
    rig.wait("every member to see the others alive", lambda: _all_alive(rig, nodes))
    assert _decrypt_failures(rig, nodes) == {n.name: 0 for n in nodes}

    steps = {"install": (old, new), "use": (new, old), "remove": (new,)}
    for step, keys in steps.items():
        for node in nodes:
            _write(files[node.name], *keys)
            said = _reload(rig, node)
            assert f"{len(keys)} key(s)" in said, said
            since = _packets_in(rig, nodes)
            rig.wait(f"gossip to flow after {step} on {node.name}",
                     lambda since=since: _gossip_flowed(rig, nodes, since), timeout=30)
            # this host has changed, the others may not have yet: still one cluster, and not
            # one packet since the start that a member could not read
            failures = _decrypt_failures(rig, nodes)
            assert failures == {n.name: 0 for n in nodes}, (
                f"packets failed to decrypt after {step} on {node.name}: {failures}")
            rig.wait(f"every member alive for all after {step} on {node.name}",
                     lambda: _all_alive(rig, nodes), timeout=30)
        rig.wait_mesh(nodes, timeout=30)

    # a broken file is one readable line, and the keyring in use stays
    files["n1"].write_text("not a key\n")
    refused_reload = rig.cli(nodes[0], "reload-keyring")
    assert refused_reload.returncode != 0 and refused_reload.stdout == ""
    assert refused_reload.stderr.startswith("Error: --keyring-file "), refused_reload.stderr
    assert refused_reload.stderr.strip().endswith("the keyring in use is unchanged")
    assert len(refused_reload.stderr.strip().splitlines()) == 1
    since = _packets_in(rig, nodes)
    rig.wait("gossip to flow after the refused reload",
             lambda: _gossip_flowed(rig, nodes, since), timeout=30)
    assert _decrypt_failures(rig, nodes) == {n.name: 0 for n in nodes}

    # the old key alone no longer gets in...
    _write(files[late.name], old)
    refused = rig.launch(late, [nodes[0]], key_file=files[late.name])
    rig.wait("the old-key agent to be refused", lambda: "cannot join" in rig.log(late),
             timeout=60)
    assert rig.wait("its join to fail to decrypt at n1",
                    lambda: _decrypt_failures(rig, nodes)["n1"] > 0, timeout=30)
    assert _all_alive(rig, nodes), "the refused agent must not count as a member"
    for node in nodes:
        doc = rig.status(node)
        assert doc is not None and late.name not in {p["name"] for p in doc["peers"]}
    assert refused.alive()  # it keeps trying, loudly; it does not crash
    # ...and the same agent with the new key does
    rig.stop(late)
    _write(files[late.name], new)
    rig.launch(late, [nodes[0]], key_file=files[late.name])
    rig.wait_mesh([*nodes, late], timeout=60)
