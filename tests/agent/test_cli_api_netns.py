"""The operator's surface on a live 3-node cluster: `weavepy status|connect|forget|rmpeer|stop`
run inside the nodes (the real CLI over the real API), the API's error shapes, readiness, the
API token that changes need (and reads do not), the metrics listener serving nothing else, and
the reconciler reacting at once when someone deletes the VXLAN device."""

from __future__ import annotations

import json
import stat
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from weavepy.devtools.agentbox import AgentBox, http_json

METRICS_PORT = 6782

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

    _changes_need_the_token(rig, n1, rig.root / "elsewhere")

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


def _changes_need_the_token(rig: AgentBox, node: Any, elsewhere: Path) -> None:
    """Requests that change the node need the API token in its state directory; reads, the
    metrics listener and probes need none, and the token shows up nowhere."""
    token_file = rig.state_dir(node) / "api-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()

    elsewhere.mkdir()
    missing = rig.cli(node, "connect", "198.18.0.99", "--state-dir", str(elsewhere))
    assert missing.returncode != 0 and missing.stdout == ""
    assert missing.stderr.strip() == (
        f"Error: the agent refused: no API token ({elsewhere}/api-token does not exist); run "
        f"as root on the node, or pass --state-dir")
    (elsewhere / "api-token").write_text("x" * 43 + "\n")
    wrong = rig.cli(node, "stop", "--state-dir", str(elsewhere))
    assert wrong.returncode != 0
    assert wrong.stderr.strip() == (f"Error: the agent refused the API token in "
                                    f"{elsewhere}/api-token; pass the agent's --state-dir")
    for method, path in (("POST", "/stop"), ("POST", "/connect"), ("DELETE", "/peer/n3")):
        answer = node.call(http_json, method, path, 6784, {"peers": ["198.18.0.99"]})
        assert answer is not None and answer[0] == 401, (method, path, answer)
        assert "no API token" in answer[1]["error"]
    assert rig.agents[node.name].alive()
    assert (rig.status(node) or {})["targets"] == [], "no refused request changed anything"

    # the metrics listener serves /metrics and nothing else
    for method, path in (("GET", "/status"), ("GET", "/report"), ("POST", "/stop"),
                         ("POST", "/metrics")):
        answer = node.call(http_json, method, path, METRICS_PORT, None, 5.0, token)
        assert answer is not None and answer[0] in (404, 405), (method, path, answer)
        assert answer[1]["error"] == "only GET /metrics is served here"

    report = rig.cli(node, "report", "--json")
    assert report.returncode == 0, report.stderr
    assert token not in report.stdout
    assert token not in rig.log(node)
