"""The operator's views rendered from stored status documents (no agent needed): snapshot
tests of every `status` view, the stored report against the JSON schema, the IPAM advice for
every state, and the connection states."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.ops.snapshot import SNAPSHOTS, assert_snapshot
from weavepy.ipam.status import IpamState
from weavepy.statusview import (
    Table,
    connection_entries,
    ipam_advice,
    render_connections,
    render_ipam,
    render_peers,
    render_policy,
    render_report,
    render_summary,
    render_targets,
)

REPO = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((REPO / "docs" / "report.schema.json").read_text())


def stored_report() -> dict[str, Any]:
    """A report captured from a live 3-node sandbox run (tests/ops/test_ops_netns.py)."""
    doc: dict[str, Any] = json.loads((SNAPSHOTS / "report-3-nodes.json").read_text())
    return doc


def plain(items: list[str | Table]) -> str:
    return "\n".join(item.plain() if isinstance(item, Table) else item for item in items) + "\n"


def test_stored_report_matches_the_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.validate(stored_report(), SCHEMA)


def test_schema_rejects_a_wrong_shape() -> None:
    doc = stored_report()
    doc["connections"][0]["state"] = "sort of"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, SCHEMA)
    del doc["ipam"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, SCHEMA)
    doc = stored_report()
    doc["host_rules"]["restorations"] = -1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, SCHEMA)
    del doc["host_rules"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, SCHEMA)


def test_the_host_rules_line() -> None:
    doc = stored_report()
    rules = doc["host_rules"]
    rules.update(no_masq_cidrs=["10.0.0.0/8", "192.0.2.7/32"], restorations=2,
                 accepts_in=["iptables-legacy filter FORWARD", "nft inet filter forward"],
                 masqueraded_packets=12, masqueraded_bytes=3400)
    jsonschema.validate(doc, SCHEMA)
    assert render_summary(doc)[-1] == (
        "  host rules:   in place, masquerade on (except 10.0.0.0/8, 192.0.2.7/32), forward "
        "accepts: iptables-legacy filter FORWARD, nft inet filter forward; 12 packets (3400 "
        "bytes) masqueraded, 2 restorations")
    rules["masquerade"] = False
    assert "masquerade OFF, forward accepts" in render_summary(doc)[-1]
    rules.update(last_check=None, present=False)
    assert render_summary(doc)[-1] == (
        "  host rules:   pending (the first reconcile pass has not finished)")
    del doc["host_rules"]  # an agent from before host rules
    assert not any("host rules" in line for line in render_summary(doc))


@pytest.mark.parametrize("name, render", [
    ("summary", render_summary), ("peers", render_peers),
    ("connections", render_connections), ("targets", render_targets), ("ipam", render_ipam),
    ("report", render_report)])
def test_views_of_a_healthy_node(name: str, render: Any) -> None:
    assert_snapshot(f"stored-{name}.txt", plain(render(stored_report())))


def test_views_of_a_node_in_trouble() -> None:
    doc = stored_report()
    doc["ready"] = False
    doc["not_ready_reasons"] = ["no usable block yet (IPAM owned_by_unreachable_peers)"]
    ipam = doc["ipam"]
    ipam["state"] = "owned_by_unreachable_peers"
    ipam["unreachable_owners"] = ["n3"]
    ipam["fix"] = ipam_advice(ipam, doc["name"])
    for member in ipam["members"]:
        member["alive"] = member["name"] != "n3"
    doc["connections"][1].update(state="failed", reason="belongs to cluster x, we are y")
    doc["host_rules"].update(present=False, errors=[
        "iptables-legacy-save did not finish within 15 s"])
    jsonschema.validate(doc, SCHEMA)
    assert_snapshot("stored-trouble.txt", plain(render_summary(doc) + render_ipam(doc)
                                                + render_connections(doc)))


def test_a_member_whose_node_was_deleted_says_so() -> None:
    doc = stored_report()
    member = next(m for m in doc["ipam"]["members"] if m["name"] == "n3")
    member.update(alive=False, node_deleted=True)
    jsonschema.validate(doc, SCHEMA)
    table = next(item for item in render_ipam(doc) if isinstance(item, Table))
    assert [row[4] for row in table.rows if row[0] == "n3"] == ["NO, Node deleted"]


def test_every_ipam_state_but_ready_has_a_fix() -> None:
    for state in IpamState:
        advice = ipam_advice({"state": state.value, "unreachable_owners": ["n7"],
                              "voters": ["n1", "n2", "n3"]}, "n1")
        assert (advice is None) == (state is IpamState.READY), state
    assert ipam_advice({"state": "owned_by_unreachable_peers", "unreachable_owners": ["n7"]},
                       "n1") == "reclaim their blocks: `weavepy rmpeer n7`"
    minority = ipam_advice({"state": "minority_partition", "voters": ["n1", "n2", "n3"]}, "n1")
    assert minority is not None and "(n2 n3)" in minority and "--force" in minority


def test_connection_states() -> None:
    peers: list[dict[str, Any]] = [
        {"name": "a", "state": "alive", "path": "vxlan", "programmed": True, "blocks": ["b"]},
        {"name": "b", "state": "alive", "path": "vxlan", "programmed": False, "blocks": []},
        {"name": "c", "state": "suspect", "path": None, "programmed": False,
         "excluded": "VXLAN vni 2 port 8472 differs from ours (1:8472)"},
        {"name": "d", "state": "failed", "path": "vxlan", "programmed": False},
    ]
    got = connection_entries(peers, {"a": "the peer has no WireGuard data path"}, 1450)
    assert [(c["peer"], c["state"], c["reason"]) for c in got] == [
        ("a", "established", "the peer has no WireGuard data path"),
        ("b", "pending", "no block yet"),
        ("c", "failed", "VXLAN vni 2 port 8472 differs from ours (1:8472)"),
    ]
    assert all(c["mtu"] == 1450 and c["encrypted"] is False for c in got)
    assert got[2]["path"] == "none"


def test_wireguard_connection_states_come_from_the_encrypted_path() -> None:
    peers: list[dict[str, Any]] = [
        {"name": "a", "state": "alive", "path": "wireguard", "programmed": True,
         "blocks": ["b"]},
        {"name": "b", "state": "alive", "path": "wireguard", "programmed": False,
         "blocks": ["c"]},
        {"name": "c", "state": "alive", "path": "wireguard", "programmed": True,
         "blocks": ["d"]},
        {"name": "laptop", "state": "alive", "path": "wireguard", "programmed": True,
         "external": True},
        {"name": "d", "state": "alive", "path": "vxlan", "programmed": True, "blocks": ["e"]},
    ]
    states = {"a": ("established", None), "b": ("established", None),
              "c": ("failed", "no handshake answer from 198.18.0.13:51820; retrying every 10 s"),
              "laptop": ("pending", "waiting for the peer's first handshake")}
    got = connection_entries(peers, {}, 1450, states, 1420)
    assert [(c["peer"], c["path"], c["encrypted"], c["mtu"], c["state"]) for c in got] == [
        ("a", "wireguard", True, 1420, "established"),
        ("b", "wireguard", True, 1420, "pending"),  # routes not in yet
        ("c", "wireguard", True, 1420, "failed"),
        ("laptop", "wireguard", True, 1420, "pending"),
        ("d", "vxlan", False, 1450, "established"),
    ]
    assert got[3]["external"] is True and "external" not in got[0]
    assert "retrying every 10 s" in plain(render_connections({"connections": got}))


def test_a_connection_mtu_is_the_smaller_of_this_path_and_the_peers_pods() -> None:
    peers: list[dict[str, Any]] = [
        {"name": "small", "state": "alive", "path": "vxlan", "programmed": True,
         "blocks": ["b"], "mtu": 1370},
        {"name": "large", "state": "alive", "path": "vxlan", "programmed": True,
         "blocks": ["c"], "mtu": 8950},
        {"name": "old", "state": "alive", "path": "wireguard", "programmed": True,
         "blocks": ["d"], "mtu": None},
    ]
    got = connection_entries(peers, {}, 1400, {"old": ("established", None)}, 1370)
    assert {c["peer"]: c["mtu"] for c in got} == {"small": 1370, "large": 1400, "old": 1370}
    # pods smaller than the TUN (--mtu): the pods' MTU is what they can send
    got = connection_entries(peers, {}, 1300, {"old": ("established", None)}, 1370)
    assert {c["peer"]: c["mtu"] for c in got} == {"small": 1300, "large": 1300, "old": 1300}


def test_malformed_documents_render_without_tracebacks() -> None:
    for doc in ({}, {"ipam": [], "peers": "x", "connections": [1, None]},
                {"gossip": {"members": {"alive": 2}}, "dataplane": None}):
        text = plain(render_report(doc))
        assert "weavepy - on node -" in text


@pytest.mark.parametrize("state, fix", [("absent", "modprobe br_netfilter"),
                                        ("off", "sysctl -w net.bridge.bridge-nf-call-iptables=1")])
def test_status_warns_in_one_line_when_bridged_pod_traffic_skips_netfilter(
        state: str, fix: str) -> None:
    doc = stored_report()
    assert not [line for line in plain(render_summary(doc)).splitlines() if "warning" in line]
    doc["dataplane"]["bridge_netfilter"] = state
    jsonschema.validate(doc, SCHEMA)
    warnings = [line for line in plain(render_summary(doc)).splitlines() if "warning" in line]
    assert len(warnings) == 1 and fix in warnings[0], warnings


def kubernetes_ipam(state: str, detail: str, pod_cidr: str | None, source: str) -> dict[str, Any]:
    """The `ipam` section of an agent launched with --ipam kubernetes (weavepy.kube_ipam)."""
    owned = [pod_cidr] if pod_cidr else []
    members = [{"name": "n1", "generation": 0, "voter": False, "alive": True,
                "blocks": owned, "reclaim_in_s": None},
               {"name": "n2", "generation": 0, "voter": False, "alive": True,
                "blocks": ["198.19.2.0/24"], "reclaim_in_s": None}]
    return {"mode": "kubernetes", "state": state, "detail": detail, "cluster_id": "kubernetes",
            "era": None, "slot": 0, "generation": None, "voters": [], "voters_reachable": 0,
            "quorum": 0, "lease_remaining_s": None, "owned_blocks": owned, "held_blocks": owned,
            "total_blocks": 2, "free_blocks": 0, "quarantined_blocks": 0,
            "unreachable_owners": [], "pending_block_requests": 0,
            "members": [m for m in members if m["blocks"]], "cluster_mismatches": [],
            "pods": {pod_cidr: {"used": 2, "capacity": 253}} if pod_cidr else {},
            "dropped": {}, "pod_cidr": pod_cidr, "pod_cidr_source": source,
            "refused_pod_cidrs": {"n3": "podCIDR 192.0.3.0/24 of node n3 is outside "
                                        "--ipalloc-range 198.19.0.0/16"}}


def test_views_of_kubernetes_ipam() -> None:
    doc = stored_report()
    doc["ipam"] = kubernetes_ipam("ready", "podCIDR 198.19.1.0/24 of node n1",
                                  "198.19.1.0/24", "api")
    doc["ipam"]["fix"] = ipam_advice(doc["ipam"], doc["name"])
    jsonschema.validate(doc, SCHEMA)
    waiting = stored_report()
    waiting["ipam"] = kubernetes_ipam("waiting_for_pod_cidr", "node n1 has no podCIDR yet",
                                      None, "api")
    waiting["ipam"]["fix"] = ipam_advice(waiting["ipam"], waiting["name"])
    waiting["ready"] = False
    waiting["not_ready_reasons"] = ["no usable block yet (IPAM waiting_for_pod_cidr: node n1 "
                                    "has no podCIDR yet)"]
    jsonschema.validate(waiting, SCHEMA)
    assert waiting["ipam"]["fix"] == ("the control plane allocates podCIDRs with "
                                      "kube-controller-manager --allocate-node-cidrs (kubeadm "
                                      "--pod-network-cidr)")
    assert_snapshot("stored-kubernetes.txt", plain(
        render_summary(doc) + render_ipam(doc) + render_summary(waiting)
        + render_ipam(waiting)))


def test_policy_status_shows_recent_drops_newest_first() -> None:
    drop = {"at": 0, "verdict": "drop", "protocol": "TCP", "src": "198.19.2.3", "sport": 40112,
            "dst": "198.19.1.4", "dport": 80, "src_pod": "x/other", "dst_pod": "x/server",
            "direction": "ingress", "policies": ["x/server-ingress"]}
    older = drop | {"src_pod": None, "src": "198.18.9.2", "sport": 5}
    doc = {"mode": "directory", "source": "d", "policies": [], "pods": [],
           "drop_log": {"recent": [older, drop, "junk"]}}
    text = plain(render_policy(doc))
    assert text.index("x/other (198.19.2.3:40112)") < text.index("198.18.9.2:5")
    assert "x/server (198.19.1.4:80)" in text and "x/server-ingress" in text
    no_reader = plain(render_policy({"mode": "directory", "source": "d"}))
    assert "recent drops: not available" in no_reader
