"""The operator's surface on a live 3-node cluster: `weavepy status|connect|forget|rmpeer|stop`
run inside the nodes (the real CLI over the real API), the API's error shapes, readiness, and
the reconciler reacting at once when someone deletes the VXLAN device."""

from __future__ import annotations

import json
import time
from functools import partial
from typing import Any

import pytest

from weavepy.devtools.agentbox import AgentBox

pytestmark = [pytest.mark.netns, pytest.mark.slow]


@pytest.mark.timeout(150)
def test_operator_commands(agent_box: Any) -> None:
    rig: AgentBox = agent_box(3)
    n1, n2, n3 = rig.box.nodes
    rig.launch_all()
    blocks = rig.wait_mesh(timeout=60)

    human = rig.cli(n1, "status")
    assert human.returncode == 0, human.stderr
    assert "node n1" in human.stdout and "encryption:   on" in human.stdout
    assert "connections:  2 established" in human.stdout
    peers = rig.cli(n1, "status", "peers")
    assert peers.returncode == 0, peers.stderr
    for name in ("n2", "n3"):
        assert name in peers.stdout
    for block in blocks["n2"] + blocks["n3"]:
        assert block in peers.stdout
    doc = json.loads(rig.cli(n1, "status", "--json").stdout)
    assert doc["ready"] and doc["ipam"]["state"] == "ready"
    assert {p["name"]: p["programmed"] for p in doc["peers"]} == {"n2": True, "n3": True}
    assert rig.api(n1, "GET", "/readyz") == (200, {"ready": True, "reasons": []})
    assert rig.api(n1, "GET", "/healthz") == (200, {"ok": True})
    missing = rig.api(n1, "GET", "/nope")
    assert missing is not None and missing[0] == 404 and "error" in missing[1]
    part = rig.api(n1, "GET", "/status/ipam")
    assert part is not None and part[1]["state"] == "ready"

    connected = rig.cli(n1, "connect", "198.18.0.99")
    assert connected.returncode == 0 and "198.18.0.99:6783" in connected.stdout
    targets = (rig.status(n1) or {})["targets"]
    assert [t["peer"] for t in targets] == ["198.18.0.99:6783"]
    forgotten = rig.cli(n1, "forget", "198.18.0.99", "198.18.0.98")
    assert forgotten.returncode == 0 and "not targets: 198.18.0.98:6783" in forgotten.stderr
    assert (rig.status(n1) or {})["targets"] == []
    bad = rig.cli(n1, "connect", "198.18.0.1:notaport")
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0

    refused = rig.cli(n1, "rmpeer", "n2")
    assert refused.returncode != 0
    assert refused.stderr.strip().startswith("Error: n2 is alive"), refused.stderr

    started = time.monotonic()
    n1.run(["ip", "link", "del", "weavepy.1"])
    rig.wait("n1 to recreate its VXLAN device and routes", lambda: len(
        rig.dataplane(n1).routes) == 2, timeout=10, interval=0.05)
    print(f"device recreated with routes in {time.monotonic() - started:.2f} s")

    rig.kill(n3)
    rig.wait("n1 to see n3 failed", lambda: any(
        p["name"] == "n3" and p["state"] == "failed"
        for p in (rig.status(n1) or {}).get("peers", [])), timeout=45)
    removed = rig.cli(n1, "rmpeer", "n3")
    assert removed.returncode == 0, removed.stderr
    assert "n3" in removed.stdout
    for node in (n1, n2):
        def forgot(n: Any) -> bool:
            return blocks["n3"][0] not in [
                b["block"] for b in (rig.status(n) or {}).get("blocks", [])]

        rig.wait(f"{node.name} to forget n3's block", partial(forgot, node), timeout=20)
    again = rig.cli(n1, "rmpeer", "n3")
    assert again.returncode != 0 and "already removed" in again.stderr

    stopped = rig.cli(n1, "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert rig.agents["n1"].wait(timeout=10) == 0
    assert rig.dataplane(n1).routes, "a graceful stop keeps the kernel state"
    down = rig.cli(n1, "status")
    assert down.returncode != 0
    assert down.stderr.strip() == ("Error: the weavepy agent is not running (nothing listens "
                                   "on 127.0.0.1:6784); start it with `weavepy launch`")
    rig.wait("n2 to see n1 leave", lambda: any(
        p["name"] == "n1" and p["state"] == "left"
        for p in (rig.status(n2) or {}).get("peers", [])), timeout=20)
    rig.wait("n2 to drop its route to n1", lambda: blocks["n1"][0] not in rig.dataplane(n2)
             .routes, timeout=10)
    assert rig.stop(n2) == 0, "SIGTERM is a graceful stop: exit 0"
    assert "stopping without leaving the cluster" in rig.log(n2), "SIGTERM means a restart"
    assert rig.dataplane(n2).bridge_addresses, "and the kernel state stays"
