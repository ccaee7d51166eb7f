"""weavepy.metrics: the registry renders, parses back with prometheus_client's own parser, and
values move when the agent's state moves (a member dies, a CNI request is answered).

The status documents below have the shape of the agent's `/status` answer (weavepy.control
`NodeControl.status`); no agent runs here, the metrics module is pure."""

from __future__ import annotations

import copy
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from weavepy.metrics import IPAM_STATES, AgentMetrics, StatusSnapshot

EXPECTED_FAMILIES = {
    "weavepy_build_info", "weavepy_ready", "weavepy_members", "weavepy_connections",
    "weavepy_gossip_packets", "weavepy_gossip_bytes", "weavepy_dropped",
    "weavepy_gossip_probe_failures", "weavepy_gossip_suspicions", "weavepy_ipam_state",
    "weavepy_ipam_blocks", "weavepy_pod_ips", "weavepy_reconcile_duration_seconds",
    "weavepy_reconcile_errors", "weavepy_cni_request_duration_seconds", "weavepy_cni_requests",
    "weavepy_tunnel_bytes", "weavepy_tunnel_packets", "weavepy_host_rules_present",
    "weavepy_host_rules_restorations", "weavepy_masqueraded_packets", "weavepy_masqueraded_bytes",
}


def status_doc() -> dict[str, Any]:
    """A three-node cluster seen from n1: two live peers, one programmed, one pending."""
    return {
        "version": "0.1.0", "name": "n1", "ready": True,
        "gossip": {"members": {"alive": 3}, "drops": {"bad_crc": 2, "decrypt": 1},
                   "packets_in": 120, "packets_out": 130, "bytes_in": 9000, "bytes_out": 9900,
                   "probe_failures": 1, "suspicions": 0},
        "peers": [
            {"name": "n2", "state": "alive", "path": "vxlan", "programmed": True,
             "excluded": None},
            {"name": "n3", "state": "alive", "path": "vxlan", "programmed": False,
             "excluded": None},
        ],
        "ipam": {"state": "ready", "owned_blocks": ["198.19.0.0/24"], "free_blocks": 253,
                 "unreachable_owners": [],
                 "members": [{"name": "n1", "blocks": ["198.19.0.0/24"]},
                             {"name": "n2", "blocks": ["198.19.1.0/24"]},
                             {"name": "n3", "blocks": ["198.19.2.0/24"]}],
                 "pods": {"198.19.0.0/24": {"used": 5, "capacity": 253}},
                 "dropped": {"stale_era": 4}},
        "dataplane": {"path": "vxlan",
                      "traffic": {"vxlan": {"rx_bytes": 1000, "tx_bytes": 2000,
                                            "rx_packets": 10, "tx_packets": 20}}},
    }


def scrape(metrics: AgentMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Render, parse with prometheus_client's parser, and index samples by name and labels."""
    text = metrics.render().decode()
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_renders_every_family_named_weavepy() -> None:
    metrics = AgentMetrics()
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert set(families) >= EXPECTED_FAMILIES
    assert all(name.startswith("weavepy_") for name in families)
    assert all(f.documentation for f in families.values())
    assert families["weavepy_cni_request_duration_seconds"].type == "histogram"
    assert families["weavepy_gossip_packets"].type == "counter"
    samples = scrape(metrics)
    assert value(samples, "weavepy_members", state="failed") == 0  # every state, even at 0
    assert value(samples, "weavepy_ipam_state", state="ready") == 0


def test_values_move_when_a_member_dies() -> None:
    metrics = AgentMetrics()
    doc = status_doc()
    metrics.update_from_status(doc)
    before = scrape(metrics)
    assert value(before, "weavepy_members", state="alive") == 3
    assert value(before, "weavepy_members", state="failed") == 0
    assert value(before, "weavepy_ready") == 1
    assert value(before, "weavepy_connections", state="established", path="vxlan",
                 encryption="off") == 1
    assert value(before, "weavepy_connections", state="pending", path="vxlan",
                 encryption="off") == 1
    assert value(before, "weavepy_gossip_packets_total", direction="in") == 120
    assert value(before, "weavepy_dropped_total", component="gossip", reason="bad_crc") == 2
    assert value(before, "weavepy_dropped_total", component="ipam", reason="stale_era") == 4
    assert value(before, "weavepy_ipam_state", state="ready") == 1
    assert value(before, "weavepy_ipam_blocks", state="owned") == 1
    assert value(before, "weavepy_ipam_blocks", state="free") == 253
    assert value(before, "weavepy_pod_ips", state="in_use") == 5
    assert value(before, "weavepy_tunnel_bytes_total", path="vxlan", direction="tx") == 2000

    # n3 is killed: it turns failed, its connection goes, its block is owned by an unreachable
    # node, and the probes that noticed show in the counters.
    after_doc = copy.deepcopy(doc)
    after_doc["gossip"].update(members={"alive": 2, "failed": 1}, packets_in=150,
                               probe_failures=4, suspicions=1)
    after_doc["peers"][1].update(state="failed")
    after_doc["ipam"].update(state="owned_by_unreachable_peers", unreachable_owners=["n3"])
    metrics.update_from_status(after_doc)
    after = scrape(metrics)
    assert value(after, "weavepy_members", state="alive") == 2
    assert value(after, "weavepy_members", state="failed") == 1
    assert ("weavepy_connections", frozenset({("state", "pending"), ("path", "vxlan"),
                                              ("encryption", "off")})) not in after
    assert value(after, "weavepy_gossip_packets_total", direction="in") == 150
    assert value(after, "weavepy_gossip_probe_failures_total") == 4
    assert value(after, "weavepy_gossip_suspicions_total") == 1
    assert value(after, "weavepy_ipam_blocks", state="unreachable") == 1
    assert value(after, "weavepy_ipam_state", state="ready") == 0
    assert value(after, "weavepy_ipam_state", state="owned_by_unreachable_peers") == 1


def test_observed_events_move_histograms_and_counters() -> None:
    metrics = AgentMetrics()
    metrics.observe_cni_request("ADD", 0, 0.004)
    metrics.observe_cni_request("ADD", 11, 0.3)
    metrics.observe_cni_request("DEL", 0, 0.002)
    metrics.observe_cni_request("NOT-A-COMMAND\n" * 50, 4, 0.001)  # bounded label: "other"
    metrics.observe_reconcile(0.02, ok=True)
    metrics.observe_reconcile(0.5, ok=False)
    samples = scrape(metrics)
    assert value(samples, "weavepy_cni_request_duration_seconds_count", command="add") == 2
    assert value(samples, "weavepy_cni_request_duration_seconds_bucket", command="add",
                 le="0.005") == 1
    assert value(samples, "weavepy_cni_requests_total", command="add", result="error") == 1
    assert value(samples, "weavepy_cni_requests_total", command="del", result="ok") == 1
    assert value(samples, "weavepy_cni_requests_total", command="other", result="error") == 1
    assert value(samples, "weavepy_reconcile_duration_seconds_count") == 2
    assert value(samples, "weavepy_reconcile_errors_total") == 1


def test_registries_are_independent() -> None:
    one, two = AgentMetrics(), AgentMetrics()
    one.observe_reconcile(0.1, ok=False)
    one.update_from_status(status_doc())
    samples = scrape(two)
    assert value(samples, "weavepy_reconcile_errors_total") == 0
    assert value(samples, "weavepy_members", state="alive") == 0


def test_malformed_status_never_breaks_a_scrape() -> None:
    metrics = AgentMetrics()
    for doc in ({}, {"gossip": "nope", "ipam": [], "peers": "x"},
                {"gossip": {"members": {"alive": "three"}, "packets_in": -5, "drops": None},
                 "ipam": {"state": 7, "pods": {"b": "x"}, "members": [1, {"blocks": None}]},
                 "peers": [None, {"state": "alive", "path": 3}],
                 "dataplane": {"traffic": {"vxlan": None, "tun": {"rx_bytes": True}}}}):
        metrics.update_from_status(doc)
        samples = scrape(metrics)
        assert value(samples, "weavepy_members", state="alive") == 0
    assert value(samples, "weavepy_ipam_state", state="other") == 1
    assert value(samples, "weavepy_gossip_packets_total", direction="in") == 0


def test_snapshot_built_directly() -> None:
    metrics = AgentMetrics()
    metrics.update(StatusSnapshot(ready=True, members={"alive": 1},
                                  connections={("established", "wireguard", True): 2},
                                  tunnel_packets={("wireguard", "rx"): 7}))
    samples = scrape(metrics)
    assert value(samples, "weavepy_connections", state="established", path="wireguard",
                 encryption="on") == 2
    assert value(samples, "weavepy_tunnel_packets_total", path="wireguard", direction="rx") == 7


def test_ipam_states_match_the_ipam_enum() -> None:
    from weavepy.ipam.status import IpamState

    assert set(IPAM_STATES) == {s.value for s in IpamState}


def test_host_rules_show_presence_restorations_and_what_was_masqueraded() -> None:
    metrics = AgentMetrics()
    doc = status_doc()
    metrics.update_from_status(doc)
    assert value(scrape(metrics), "weavepy_host_rules_present") == 0  # none reported yet
    doc["host_rules"] = {"present": True, "restorations": 2, "masqueraded_packets": 12,
                         "masqueraded_bytes": 3400}
    metrics.update_from_status(doc)
    samples = scrape(metrics)
    assert value(samples, "weavepy_host_rules_present") == 1
    assert value(samples, "weavepy_host_rules_restorations_total") == 2
    assert value(samples, "weavepy_masqueraded_packets_total") == 12
    assert value(samples, "weavepy_masqueraded_bytes_total") == 3400
    doc["host_rules"].update(present=False, errors=["nftables: Operation not permitted"])
    metrics.update_from_status(doc)
    assert value(scrape(metrics), "weavepy_host_rules_present") == 0
