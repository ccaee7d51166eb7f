"""weavepy.metrics: the registry renders, parses back with prometheus_client's own parser, and
values move when the agent's state moves (a member dies, a CNI request is answered); Weave
Net's series keep Weave's names, labels and meaning (prog/weaver/metrics.go).

The status documents below have the shape of the agent's `/status` answer (weavepy.control
`NodeControl.status`); no agent runs here, the metrics module is pure."""

from __future__ import annotations

import copy
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from weavepy.metrics import (
    IPAM_STATES,
    WEAVE_CONNECTION_STATES,
    AgentMetrics,
    PolicySnapshot,
    StatusSnapshot,
)

EXPECTED_FAMILIES = {
    "weavepy_build_info", "weavepy_ready", "weavepy_members", "weavepy_connections",
    "weavepy_gossip_packets", "weavepy_gossip_bytes", "weavepy_dropped",
    "weavepy_gossip_probe_failures", "weavepy_gossip_suspicions", "weavepy_ipam_state",
    "weavepy_ipam_blocks", "weavepy_pod_ips", "weavepy_reconcile_duration_seconds",
    "weavepy_reconcile_errors", "weavepy_cni_request_duration_seconds", "weavepy_cni_requests",
    "weavepy_tunnel_bytes", "weavepy_tunnel_packets", "weavepy_host_rules_present",
    "weavepy_host_rules_restorations", "weavepy_masqueraded_packets", "weavepy_masqueraded_bytes",
}
# Weave Net's series, as alerts written for Weave name them; the IPAM ones need a range.
WEAVE_FAMILIES = {"weave_connections", "weave_ips", "weave_max_ips",
                  "weave_ipam_unreachable_count", "weave_ipam_unreachable_percentage"}


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
        "config": {"ipalloc_range": "198.19.0.0/16"},
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
    assert {name for name in families if not name.startswith("weavepy_")} == {
        "weave_connections"}, "no range yet: Weave's IPAM series are left out, as Weave did"
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


def test_weave_names_keep_weaves_meaning() -> None:
    metrics = AgentMetrics()
    doc = status_doc()
    doc["connections"] = [
        {"peer": "n2", "path": "vxlan", "encrypted": False, "state": "established"},
        {"peer": "n3", "path": "wireguard", "encrypted": True, "state": "pending"},
        {"peer": "n4", "path": "none", "encrypted": False, "state": "failed"}]
    doc["targets"] = [
        {"peer": "198.18.0.12:6783", "state": "connected", "last_error": None},  # counted above
        {"peer": "198.18.0.13:6783", "state": "waiting", "last_error": None},  # joined once
        {"peer": "198.18.0.20:6783", "state": "connecting", "last_error": None},
        {"peer": "198.18.0.21:6783", "state": "retrying", "last_error": None},  # due now
        {"peer": "198.18.0.22:6783", "state": "connecting", "last_error": "timed out"},
        {"peer": "198.18.0.23:6783", "state": "retrying", "last_error": "refused"},
        {"peer": "198.18.0.24:6783", "state": "retrying", "last_error": "refused"}]
    doc["ipam"]["unreachable_owners"] = ["n3"]
    doc["ipam"]["members"][2]["blocks"] = ["198.19.2.0/24", "198.19.3.0/25"]
    metrics.update_from_status(doc)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert set(families) >= WEAVE_FAMILIES
    assert all(families[name].type == "gauge" for name in WEAVE_FAMILIES)
    samples = scrape(metrics)
    assert {state: value(samples, "weave_connections", state=state)
            for state in WEAVE_CONNECTION_STATES} == {
        "established": 1, "pending": 1, "retrying": 1, "failed": 3, "connecting": 2}
    assert value(samples, "weave_ips", state="local-used") == 5  # pods on this node
    assert value(samples, "weave_max_ips") == 65536  # the whole range, as Weave's universe
    assert value(samples, "weave_ipam_unreachable_count") == 1
    assert value(samples, "weave_ipam_unreachable_percentage") == (256 + 128) * 100 / 65536
    assert ("weavenpc_blocked_connections_total", frozenset()) not in samples  # not faked


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
                 "dataplane": {"traffic": {"vxlan": None, "tun": {"rx_bytes": True}}},
                 "config": {"ipalloc_range": "not a range"}, "targets": [3, {"state": []}]},
                {"ipam": {"members": [{"name": "x", "blocks": ["junk"]}],
                          "unreachable_owners": ["x"]}, "config": {"ipalloc_range": 7}}):
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


def test_policy_drop_log_counts_keep_weave_npcs_name_and_labels() -> None:
    metrics = AgentMetrics()
    doc = {"policies": [{"policy": "y/deny", "drops": {"ingress": 7, "egress": 0}}],
           "pods": [], "isolated_pods": {"ingress": 1, "egress": 0},
           "drop_log": {"blocked": [{"protocol": "tcp", "dport": "80", "count": 3},
                                    {"protocol": "udp", "dport": "53", "count": 2}],
                        "logged": [{"direction": "ingress", "verdict": "drop", "count": 6}]}}
    metrics.update_policy(PolicySnapshot.from_status(doc))
    samples = scrape(metrics)
    assert value(samples, "weavenpc_blocked_connections_total", protocol="tcp",
                 dport="80") == 3
    assert value(samples, "weavenpc_blocked_connections_total", protocol="udp",
                 dport="53") == 2
    assert value(samples, "weavepy_policy_logged_drops_total", direction="ingress",
                 verdict="drop") == 6
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert families["weavenpc_blocked_connections"].type == "counter"
    assert families["weavenpc_blocked_connections"].documentation == (
        "Connection attempts blocked by policy controller.")
