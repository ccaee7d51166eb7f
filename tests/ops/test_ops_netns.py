"""Operability through real agents in sandbox nodes: /readyz waits for the CNI config, the
metrics endpoint moves as members fail (weavepy's series and Weave Net's names beside them),
the report matches its JSON schema, the CLI's output matches its snapshots, logs are JSON
lines, and a down agent is a one-line error."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require_binary
from tests.ops.snapshot import assert_snapshot
from weavepy.devtools.agentbox import AgentBox, gateway_of

pytestmark = [pytest.mark.netns, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
METRICS_PORT = 6782
CONFLIST_REASON = "the CNI config"


def scrape(port: int = METRICS_PORT) -> str:
    """GET /metrics on 127.0.0.1 in this namespace (run with node.call)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        return response.read().decode()
    finally:
        conn.close()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


@pytest.mark.timeout(170)
def test_readiness_metrics_report_cli_logs(agent_box: Any, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    monkeypatch.setenv("WEAVEPY_LOG_FORMAT", "json")  # the agents inherit it
    require_binary("ping", "iputils-ping")
    rig: AgentBox = agent_box(3)
    n1, n2, n3 = rig.box.nodes
    conf_dir = rig.root / "n1-cni-conf"
    bin_dir = rig.root / "n1-cni-bin"
    conf_dir.mkdir()
    bin_dir.mkdir()

    # /readyz: everything but the CNI config is in place -> 503 naming the conflist
    rig.launch(n1, extra=["--cni-conf-dir", str(conf_dir)])
    rig.wait_api(n1)

    def only_conflist_missing() -> Any:
        answer = rig.api(n1, "GET", "/readyz")
        if answer is None:
            return None
        code, doc = answer
        return code == 503 and len(doc["reasons"]) == 1 and \
            CONFLIST_REASON in doc["reasons"][0]

    rig.wait("n1 ready but for its CNI config", only_conflist_missing, timeout=30)
    installed = rig.cli(n1, "install-cni", "--bin-dir", str(bin_dir), "--conf-dir",
                        str(conf_dir), "--socket", str(rig.run_dir(n1) / "cni.sock"))
    assert installed.returncode == 0, installed.stderr
    assert (conf_dir / "10-weavepy.conflist").exists() and (bin_dir / "weavepy-cni").exists()
    rig.wait("n1 ready", lambda: rig.api(n1, "GET", "/readyz") == (
        200, {"ready": True, "reasons": []}), timeout=10)

    rig.launch(n2, [n1])
    rig.launch(n3, [n1])
    rig.wait_mesh(timeout=60)

    # metrics: members, connections, IPAM, reconcile, gossip
    def mesh_metrics() -> Any:
        found = samples(n1.call(scrape))
        ok = value(found, "weavepy_members", state="alive") == 3 and value(
            found, "weavepy_connections", state="established", path="vxlan",
            encryption="off") == 2
        return found if ok else None

    before = rig.wait("metrics showing 3 members and 2 connections", mesh_metrics, timeout=20)
    assert value(before, "weavepy_members", state="failed") == 0
    assert value(before, "weavepy_ready") == 1
    assert value(before, "weavepy_ipam_state", state="ready") == 1
    assert value(before, "weavepy_ipam_blocks", state="owned") == 1
    assert (value(before, "weavepy_reconcile_duration_seconds_count") or 0) >= 1
    assert (value(before, "weavepy_gossip_packets_total", direction="in") or 0) > 0
    assert (value(before, "weavepy_gossip_bytes_total", direction="out") or 0) > 0
    assert value(before, "weavepy_tunnel_bytes_total", path="vxlan", direction="tx") is not None
    assert value(before, "weavepy_host_rules_present") == 1
    # Weave Net's names, for alerts written for Weave (n1 founded alone: no join targets)
    assert {state: value(before, "weave_connections", state=state) for state in (
        "established", "pending", "retrying", "failed", "connecting")} == {
        "established": 2, "pending": 0, "retrying": 0, "failed": 0, "connecting": 0}
    assert value(before, "weave_ips", state="local-used") == 0  # no pods yet
    assert value(before, "weave_max_ips") == 65536  # 198.19.0.0/16
    assert value(before, "weave_ipam_unreachable_count") == 0
    assert value(before, "weave_ipam_unreachable_percentage") == 0

    # pod-network traffic from n1's bridge to the others' (ping: bounded count): the VXLAN
    # counters must count it, both ways
    blocks = rig.wait_mesh(timeout=30)
    source = gateway_of(blocks["n1"][0])
    for other in ("n2", "n3"):
        pinged = n1.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", "-I", source,
                         gateway_of(blocks[other][0])], check=False, timeout=20)
        assert pinged.returncode == 0, pinged.stdout + pinged.stderr

    def tunnel_counted() -> Any:
        found = samples(n1.call(scrape))
        counted = [value(found, name, path="vxlan", direction=direction) or 0
                   for name in ("weavepy_tunnel_bytes_total", "weavepy_tunnel_packets_total")
                   for direction in ("tx", "rx")]
        return found if all(c > 0 for c in counted) else None

    rig.wait("the VXLAN byte and packet counters to count the pings", tunnel_counted,
             timeout=20)

    # the report and its schema; the JSON of every view
    schema = json.loads((REPO / "docs" / "report.schema.json").read_text())
    report = rig.cli(n1, "report", "--json")
    assert report.returncode == 0, report.stderr
    doc = json.loads(report.stdout)
    jsonschema.validate(doc, schema)
    assert [c["state"] for c in doc["connections"]] == ["established", "established"]
    assert doc["cni"]["conflist_installed"] is True
    assert doc["ipam"]["fix"] is None
    assert doc["host_rules"]["present"] is True and doc["host_rules"]["errors"] == []
    conns = json.loads(rig.cli(n1, "status", "connections", "--json").stdout)
    assert {c["peer"] for c in conns} == {"n2", "n3"}
    assert all(c["path"] == "vxlan" and c["encrypted"] is False and c["mtu"] == 1450
               for c in conns)

    # the human views, against their snapshots
    for args in (("status",), ("status", "peers"), ("status", "connections"),
                 ("status", "targets"), ("status", "ipam")):
        shown = rig.cli(n1, *args)
        assert shown.returncode == 0, shown.stderr
        assert_snapshot("live-" + "-".join(args) + ".txt", shown.stdout)

    # kill a node: the member gauges and the connections move
    rig.kill(n3)

    def n3_failed() -> Any:
        found = samples(n1.call(scrape))
        return found if value(found, "weavepy_members", state="failed") == 1 and value(
            found, "weave_ipam_unreachable_count") == 1 else None

    after = rig.wait("metrics showing n3 failed and its block unreachable", n3_failed,
                     timeout=45)
    assert value(after, "weave_connections", state="established") == 1
    assert value(after, "weave_ipam_unreachable_percentage") == 256 * 100 / 65536
    assert value(after, "weavepy_members", state="alive") == 2
    assert (value(after, "weavepy_gossip_suspicions_total") or 0) >= 1
    assert value(after, "weavepy_connections", state="established", path="vxlan",
                 encryption="off") == 1

    # logs: every line the agent wrote is one JSON object
    lines = [line for line in rig.log(n1).splitlines() if line.strip()]
    assert lines
    for line in lines:
        record = json.loads(line)
        assert {"time", "level", "logger", "message"} <= set(record), record

    # the agent down: one readable line and a non-zero exit, for every view
    assert rig.stop(n1) == 0
    for args in (("status",), ("status", "ipam"), ("report", "--json")):
        down = rig.cli(n1, *args)
        assert down.returncode != 0
        assert down.stdout == ""
        assert down.stderr.strip() == ("Error: the weavepy agent is not running (nothing "
                                       "listens on 127.0.0.1:6784); start it with "
                                       "`weavepy launch`")

    # --kube-peers outside a pod (no service account): one readable line, non-zero exit
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    proc = rig.launch(n1, extra=["--kube-peers"])
    assert proc.wait(timeout=30) not in (0, None)
    last = rig.log(n1).strip().splitlines()[-1]
    assert last.startswith("Error: --kube-peers needs the in-cluster service account"), last
