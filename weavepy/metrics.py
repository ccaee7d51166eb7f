"""The agent's Prometheus metrics: every `weavepy_*` series and, beside them, the Weave Net
series that alerts written for Weave use, in one registry an agent owns.

This module owns the names, help texts, labels and buckets of every metric weavepy exports, and
how a status snapshot maps onto them. It serves nothing: the agent exposes `render()` on its
metrics address (Weave used :6782).

The rules it keeps:

* **No global state.** Each `AgentMetrics` owns its own `CollectorRegistry`; nothing registers
  in prometheus_client's default registry, so two agents (or two tests) in one process never
  share a series.
* **Counters the agent already keeps are read, not re-counted.** Gossip packets, drops, probe
  failures, suspicions and tunnel traffic are monotonic counters inside the agent's parts;
  `update()` stores the latest snapshot and a collector reports those totals at scrape time,
  so no delta arithmetic can drift or double-count.
* **Events the agent times are observed directly**: `observe_reconcile()` and
  `observe_cni_request()` (the latter has the `CniServer(on_request=...)` signature).
* **Label values are bounded.** States, paths, directions and CNI commands come from fixed sets
  (anything else is reported as `other`), so bad input cannot grow the series without limit.
  Gauges of a fixed set of states always export every state, with 0 for the absent ones, so a
  state that empties shows as 0 rather than as a stale last value.

Metric                                          Type       Labels
weavepy_build_info                              gauge      version
weavepy_ready                                   gauge
weavepy_members                                 gauge      state (alive suspect failed left)
weavepy_connections                             gauge      state, path, encryption
weavepy_gossip_packets_total                    counter    direction (in out)
weavepy_gossip_bytes_total                      counter    direction
weavepy_dropped_total                           counter    component, reason
weavepy_gossip_probe_failures_total             counter
weavepy_gossip_suspicions_total                 counter
weavepy_ipam_state                              gauge      state (1 for the current one)
weavepy_ipam_blocks                             gauge      state (owned free unreachable)
weavepy_pod_ips                                 gauge      state (in_use capacity)
weavepy_reconcile_duration_seconds              histogram
weavepy_reconcile_errors_total                  counter
weavepy_cni_request_duration_seconds            histogram  command
weavepy_cni_requests_total                      counter    command, result (ok error)
weavepy_tunnel_bytes_total                      counter    path, direction (rx tx)
weavepy_tunnel_packets_total                    counter    path, direction
weavepy_host_rules_present                      gauge
weavepy_host_rules_restorations_total           counter
weavepy_masqueraded_packets_total               counter
weavepy_masqueraded_bytes_total                 counter

Weave Net's names, with Weave's meaning (prog/weaver/metrics.go; docs/migrating-from-weave.md):

weave_connections                               gauge      state (established pending retrying
                                                           failed connecting, all five always)
weave_ips                                       gauge      state (local-used: pod addresses in
                                                           use on this node)
weave_max_ips                                   gauge      (addresses in the cluster range)
weave_ipam_unreachable_count                    gauge      (unreachable members owning blocks)
weave_ipam_unreachable_percentage               gauge      (% of the range they own)

`weave_connections` counts Weave's way: weavepy's data-path connections by their state
(established, pending, failed), plus the join targets not answered by a live member, as
Weave's connection maker lists them: `connecting` (first attempt running, or due), `retrying`
(an attempt running after a failure), `failed` (waiting to retry after a failure).
`weavenpc_blocked_connections_total` (weave-npc's counter of connections NetworkPolicy blocked)
belongs to the policy drop log (weavepy.policy's NFLOG reader); it is not faked here.

NetworkPolicy (with enforcement on; docs/policy.md):

weavepy_policies                                gauge      (policies known to the source)
weavepy_policy_isolated_pods                    gauge      direction (pods of this node)
weavepy_policy_drops_total                      counter    policy, direction
weavepy_policy_pod_drops_total                  counter    namespace, pod, direction
weavepy_policy_applies_total                    counter    kind (full incremental error)
weavepy_policy_apply_duration_seconds           histogram

Drops are packets (in audit mode: packets that would have been dropped) read from the policy
table's named counters at scrape time. A packet dropped for a pod that several policies
isolate counts for each of them (none allowed it). Labels are bounded by the policies and the
pods of this node.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric

from weavepy import __version__

__all__ = [
    "CNI_COMMANDS",
    "CONNECTION_STATES",
    "CONTENT_TYPE_LATEST",
    "IPAM_STATES",
    "MEMBER_STATES",
    "WEAVE_CONNECTION_STATES",
    "AgentMetrics",
    "StatusSnapshot",
]

log = logging.getLogger(__name__)

MEMBER_STATES = ("alive", "suspect", "failed", "left")
CONNECTION_STATES = ("established", "pending", "failed")
# Weave's connection states, in Weave's order (prog/weaver/http.go, allConnectionStates).
WEAVE_CONNECTION_STATES = ("established", "pending", "retrying", "failed", "connecting")
# The values of weavepy.ipam.status.IpamState (a test keeps them equal).
IPAM_STATES = ("waiting_for_cluster", "joining", "waiting_for_quorum", "minority_partition",
               "ready", "out_of_space", "owned_by_unreachable_peers", "waiting_for_pod_cidr",
               "pod_cidr_refused")
CNI_COMMANDS = ("add", "del", "check", "gc", "status", "version")
DATA_PATHS = ("vxlan", "wireguard", "none")
POLICY_DIRECTIONS = ("ingress", "egress")
DIRECTIONS = ("rx", "tx")
OTHER = "other"

RECONCILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0)
CNI_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

ConnectionKey = tuple[str, str, bool]  # (state, path, encrypted)


def _bounded(value: object, allowed: Iterable[str]) -> str:
    text = str(value).lower() if value is not None else ""
    return text if text in allowed else OTHER


def _count(value: object) -> int:
    """A non-negative int from a status field; anything else counts as 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return max(0, int(value))


def _section(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key)
    return value if isinstance(value, Mapping) else {}


def _items(doc: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = doc.get(key)
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, Mapping)]


@dataclass(frozen=True)
class StatusSnapshot:
    """What the metrics need to know about the agent at one moment. Counts are totals since
    the agent started (for counters) or current values (for gauges).

    Build it directly, or from the agent's `/status` document with `from_status`."""

    ready: bool = False
    members: Mapping[str, int] = field(default_factory=dict)
    connections: Mapping[ConnectionKey, int] = field(default_factory=dict)
    gossip_packets: Mapping[str, int] = field(default_factory=dict)  # "in" / "out"
    gossip_bytes: Mapping[str, int] = field(default_factory=dict)
    drops: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (component, reason)
    probe_failures: int = 0
    suspicions: int = 0
    ipam_state: str | None = None
    blocks_owned: int = 0
    blocks_free: int = 0
    blocks_unreachable: int = 0
    pod_ips_in_use: int = 0
    pod_ips_capacity: int = 0
    tunnel_bytes: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (path, dir)
    tunnel_packets: Mapping[tuple[str, str], int] = field(default_factory=dict)
    weave_connections: Mapping[str, int] = field(default_factory=dict)  # Weave's state names
    range_addresses: int = 0  # addresses in the cluster range (0: no IPAM)
    unreachable_owners: int = 0
    unreachable_addresses: int = 0  # in the blocks of unreachable owners
    host_rules_present: bool = False
    host_rules_restorations: int = 0
    masqueraded_packets: int = 0
    masqueraded_bytes: int = 0

    @classmethod
    def from_status(cls, doc: Mapping[str, Any]) -> StatusSnapshot:
        """Read the agent's status document (docs/api.md). Missing or malformed sections
        count as empty: a metric never stops the scrape."""
        gossip = _section(doc, "gossip")
        ipam = _section(doc, "ipam")
        dataplane = _section(doc, "dataplane")

        members = {str(k): _count(v) for k, v in _section(gossip, "members").items()}

        drops: dict[tuple[str, str], int] = {}
        for component, source in (("gossip", _section(gossip, "drops")),
                                  ("ipam", _section(ipam, "dropped")),
                                  ("tunnel", _section(dataplane, "drops"))):
            for reason, value in source.items():
                drops[(component, str(reason))] = _count(value)

        unreachable = {str(n) for n in ipam.get("unreachable_owners") or () if isinstance(n, str)}
        unreachable_blocks = [b for m in _items(ipam, "members") if m.get("name") in unreachable
                              for b in m.get("blocks") or ()]
        pods = _section(ipam, "pods")
        in_use = sum(_count(_section(pods, b).get("used")) for b in pods)
        capacity = sum(_count(_section(pods, b).get("capacity")) for b in pods)

        tunnel_bytes: dict[tuple[str, str], int] = {}
        tunnel_packets: dict[tuple[str, str], int] = {}
        for path, counters in _section(dataplane, "traffic").items():
            if not isinstance(counters, Mapping):
                continue
            for direction in DIRECTIONS:
                tunnel_bytes[(str(path), direction)] = _count(counters.get(f"{direction}_bytes"))
                tunnel_packets[(str(path), direction)] = _count(
                    counters.get(f"{direction}_packets"))

        ipam_state = ipam.get("state")
        host_rules = _section(doc, "host_rules")
        return cls(
            ready=bool(doc.get("ready")),
            members=members,
            connections=_connections(doc),
            gossip_packets={"in": _count(gossip.get("packets_in")),
                            "out": _count(gossip.get("packets_out"))},
            gossip_bytes={"in": _count(gossip.get("bytes_in")),
                          "out": _count(gossip.get("bytes_out"))},
            drops=drops,
            probe_failures=_count(gossip.get("probe_failures")),
            suspicions=_count(gossip.get("suspicions")),
            ipam_state=ipam_state if isinstance(ipam_state, str) else None,
            blocks_owned=len(ipam.get("owned_blocks") or ()),
            blocks_free=_count(ipam.get("free_blocks")),
            blocks_unreachable=len(unreachable_blocks),
            pod_ips_in_use=in_use,
            pod_ips_capacity=capacity,
            tunnel_bytes=tunnel_bytes,
            tunnel_packets=tunnel_packets,
            weave_connections=_weave_connections(doc),
            range_addresses=_addresses(_section(doc, "config").get("ipalloc_range"))
            if ipam else 0,
            unreachable_owners=len(unreachable),
            unreachable_addresses=sum(_addresses(b) for b in unreachable_blocks),
            host_rules_present=host_rules.get("present") is True,
            host_rules_restorations=_count(host_rules.get("restorations")),
            masqueraded_packets=_count(host_rules.get("masqueraded_packets")),
            masqueraded_bytes=_count(host_rules.get("masqueraded_bytes")),
        )


def _addresses(cidr: object) -> int:
    """The number of addresses in a CIDR from the status (0 if it is not one)."""
    try:
        return ipaddress.ip_network(str(cidr)).num_addresses if cidr is not None else 0
    except ValueError:
        return 0


def _weave_connections(doc: Mapping[str, Any]) -> dict[str, int]:
    """Connections as Weave counts them (see the module docstring): the data-path connections
    by state, and the join targets no live member answers, by where their attempts stand."""
    counts = dict.fromkeys(WEAVE_CONNECTION_STATES, 0)
    for (state, _, _), count in _connections(doc).items():
        if state in counts:
            counts[state] += count
    for target in _items(doc, "targets"):
        attempt, failed_before = target.get("state"), bool(target.get("last_error"))
        if attempt == "connecting":
            counts["retrying" if failed_before else "connecting"] += 1
        elif attempt == "retrying":
            counts["failed" if failed_before else "connecting"] += 1
    return counts


def _connections(doc: Mapping[str, Any]) -> dict[ConnectionKey, int]:
    """Connections by (state, path, encrypted): from `connections` when the status has it,
    else derived from `peers` (a live peer whose routes are programmed is established, one
    the data plane excluded is failed, any other live peer is pending)."""
    counts: dict[ConnectionKey, int] = {}
    listed = _items(doc, "connections")
    if listed:
        for conn in listed:
            encrypted = conn.get("encrypted", conn.get("encryption"))
            key = (str(conn.get("state") or OTHER), str(conn.get("path") or "none"),
                   bool(encrypted) and encrypted not in ("none", "off"))
            counts[key] = counts.get(key, 0) + 1
        return counts
    for peer in _items(doc, "peers"):
        if peer.get("state") not in ("alive", "suspect"):
            continue
        if peer.get("programmed"):
            state = "established"
        elif peer.get("excluded") or peer.get("problem"):
            state = "failed"
        else:
            state = "pending"
        path = str(peer.get("path") or "none")
        encrypted = bool(peer.get("encrypted", path == "wireguard"))
        key = (state, path, encrypted)
        counts[key] = counts.get(key, 0) + 1
    return counts


class _SnapshotCounters:
    """A registry collector that reports the counters of the latest snapshot at scrape time."""

    def __init__(self) -> None:
        self.snapshot = StatusSnapshot()

    def describe(self) -> Iterator[Metric]:
        return self._families(StatusSnapshot())

    def collect(self) -> Iterator[Metric]:
        return self._families(self.snapshot)

    @staticmethod
    def _families(snap: StatusSnapshot) -> Iterator[Metric]:
        packets = CounterMetricFamily("weavepy_gossip_packets", "Gossip packets (UDP) by "
                                      "direction", labels=["direction"])
        octets = CounterMetricFamily("weavepy_gossip_bytes", "Gossip bytes (UDP) by direction",
                                     labels=["direction"])
        for direction in ("in", "out"):
            packets.add_metric([direction], snap.gossip_packets.get(direction, 0))
            octets.add_metric([direction], snap.gossip_bytes.get(direction, 0))
        yield packets
        yield octets

        drops = CounterMetricFamily("weavepy_dropped", "Input dropped as malformed or refused, "
                                    "by component and reason", labels=["component", "reason"])
        for (component, reason), value in sorted(snap.drops.items()):
            drops.add_metric([component, reason], value)
        yield drops

        yield CounterMetricFamily("weavepy_gossip_probe_failures", "Failure-detector probes "
                                  "that got no ack", value=snap.probe_failures)
        yield CounterMetricFamily("weavepy_gossip_suspicions", "Members this node started "
                                  "suspecting", value=snap.suspicions)

        tunnel_bytes = CounterMetricFamily("weavepy_tunnel_bytes", "Bytes through the "
                                           "node-to-node tunnels, by data path and direction",
                                           labels=["path", "direction"])
        for (path, direction), value in sorted(snap.tunnel_bytes.items()):
            tunnel_bytes.add_metric([_bounded(path, DATA_PATHS), direction], value)
        yield tunnel_bytes
        tunnel_packets = CounterMetricFamily("weavepy_tunnel_packets", "Packets through the "
                                             "node-to-node tunnels, by data path and "
                                             "direction", labels=["path", "direction"])
        for (path, direction), value in sorted(snap.tunnel_packets.items()):
            tunnel_packets.add_metric([_bounded(path, DATA_PATHS), direction], value)
        yield tunnel_packets

        yield CounterMetricFamily("weavepy_host_rules_restorations", "Host rules (masquerade, "
                                  "forward accepts, API guard) put back after someone removed "
                                  "or flushed them", value=snap.host_rules_restorations)
        yield CounterMetricFamily("weavepy_masqueraded_packets", "Packets of connections "
                                  "masqueraded from the pod range to outside the cluster",
                                  value=snap.masqueraded_packets)
        yield CounterMetricFamily("weavepy_masqueraded_bytes", "Bytes of connections "
                                  "masqueraded from the pod range to outside the cluster",
                                  value=snap.masqueraded_bytes)


class _WeaveNames:
    """A registry collector for Weave Net's series (module docstring), from the latest
    snapshot at scrape time. The IPAM series are left out while there is no IPAM range, as
    Weave left them out without an allocator."""

    def __init__(self) -> None:
        self.snapshot = StatusSnapshot()

    def describe(self) -> Iterator[Metric]:
        return self._families(StatusSnapshot(range_addresses=1))

    def collect(self) -> Iterator[Metric]:
        return self._families(self.snapshot)

    @staticmethod
    def _families(snap: StatusSnapshot) -> Iterator[Metric]:
        connections = GaugeMetricFamily("weave_connections", "Number of peer-to-peer "
                                        "connections (Weave Net's name).", labels=["state"])
        for state in WEAVE_CONNECTION_STATES:
            connections.add_metric([state], snap.weave_connections.get(state, 0))
        yield connections
        if snap.range_addresses <= 0:
            return
        ips = GaugeMetricFamily("weave_ips", "Number of IP addresses (Weave Net's name; "
                                "local-used: pod addresses in use on this node).",
                                labels=["state"])
        ips.add_metric(["local-used"], snap.pod_ips_in_use)
        yield ips
        yield GaugeMetricFamily("weave_max_ips", "Size of IP address space used by allocator "
                                "(Weave Net's name: addresses in the cluster range).",
                                value=snap.range_addresses)
        yield GaugeMetricFamily("weave_ipam_unreachable_count", "Number of unreachable peers "
                                "(Weave Net's name: unreachable members that own blocks).",
                                value=snap.unreachable_owners)
        yield GaugeMetricFamily("weave_ipam_unreachable_percentage", "Percentage of IP "
                                "addresses owned by unreachable peers (Weave Net's name).",
                                value=snap.unreachable_addresses * 100.0 / snap.range_addresses)


@dataclass(frozen=True)
class PolicySnapshot:
    """What the policy series report, from `weavepy.policy.enforcer.status_document`."""

    enabled: bool = False
    policies: int = 0
    isolated: Mapping[str, int] = field(default_factory=dict)
    policy_drops: Mapping[tuple[str, str], int] = field(default_factory=dict)
    pod_drops: Mapping[tuple[str, str, str], int] = field(default_factory=dict)

    @classmethod
    def from_status(cls, doc: Mapping[str, Any]) -> PolicySnapshot:
        policy_drops: dict[tuple[str, str], int] = {}
        for entry in _items(doc, "policies"):
            for direction, packets in _section(entry, "drops").items():
                policy_drops[(str(entry.get("policy")), str(direction))] = _count(packets)
        pod_drops: dict[tuple[str, str, str], int] = {}
        for entry in _items(doc, "pods"):
            namespace, _, name = str(entry.get("pod")).partition("/")
            for direction, packets in _section(entry, "drops").items():
                pod_drops[(namespace, name, str(direction))] = _count(packets)
        isolated = _section(doc, "isolated_pods")
        return cls(True, len(_items(doc, "policies")),
                   {d: _count(isolated.get(d)) for d in POLICY_DIRECTIONS},
                   policy_drops, pod_drops)


class _PolicyCounters:
    """A registry collector for the policy drop counters of the latest snapshot."""

    def __init__(self) -> None:
        self.snapshot = PolicySnapshot()

    def describe(self) -> Iterator[Metric]:
        return self._families(PolicySnapshot())

    def collect(self) -> Iterator[Metric]:
        return self._families(self.snapshot)

    @staticmethod
    def _families(snap: PolicySnapshot) -> Iterator[Metric]:
        by_policy = CounterMetricFamily("weavepy_policy_drops", "Packets NetworkPolicy "
                                        "dropped (audit: would have dropped), by policy and "
                                        "direction", labels=["policy", "direction"])
        for (policy, direction), value in sorted(snap.policy_drops.items()):
            by_policy.add_metric([policy, _bounded(direction, POLICY_DIRECTIONS)], value)
        yield by_policy
        by_pod = CounterMetricFamily("weavepy_policy_pod_drops", "Packets NetworkPolicy "
                                     "dropped (audit: would have dropped), by pod of this node "
                                     "and direction", labels=["namespace", "pod", "direction"])
        for (namespace, pod, direction), value in sorted(snap.pod_drops.items()):
            by_pod.add_metric([namespace, pod, _bounded(direction, POLICY_DIRECTIONS)], value)
        yield by_pod


class AgentMetrics:
    """Every weavepy metric, in a registry this object owns.

    The agent calls `update()` (or `update_from_status()`) before each scrape, and the
    `observe_*` methods as events happen; `render()` gives the text exposition."""

    def __init__(self, version: str = __version__) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self._snapshot_counters = _SnapshotCounters()
        self._weave_names = _WeaveNames()

        self.build_info = Gauge("weavepy_build_info", "weavepy version (always 1)",
                                ["version"], registry=reg)
        self.build_info.labels(version=version).set(1)
        self.ready = Gauge("weavepy_ready", "1 when the node is ready for pods (blocks owned, "
                           "routes programmed, CNI listening)", registry=reg)
        self.members = Gauge("weavepy_members", "Cluster members by state, this node included",
                             ["state"], registry=reg)
        self.connections = Gauge("weavepy_connections", "Data-path connections to peers by "
                                 "state, path and encryption",
                                 ["state", "path", "encryption"], registry=reg)
        self.ipam_state = Gauge("weavepy_ipam_state", "1 for this node's current IPAM state, "
                                "0 for the others", ["state"], registry=reg)
        self.ipam_blocks = Gauge("weavepy_ipam_blocks", "Address blocks: owned by this node, "
                                 "free in the cluster range, owned by unreachable nodes",
                                 ["state"], registry=reg)
        self.pod_ips = Gauge("weavepy_pod_ips", "Pod addresses on this node: in use, and the "
                             "capacity of its blocks", ["state"], registry=reg)
        self.host_rules_present = Gauge("weavepy_host_rules_present", "1 when every host rule "
                                        "(masquerade, forward accepts, API guard) was in place "
                                        "at the last check", registry=reg)
        self.reconcile_duration = Histogram("weavepy_reconcile_duration_seconds", "Time of one "
                                            "data-plane reconcile pass",
                                            buckets=RECONCILE_BUCKETS, registry=reg)
        self.reconcile_errors = Counter("weavepy_reconcile_errors", "Reconcile passes that "
                                        "ended with an error", registry=reg)
        self.cni_duration = Histogram("weavepy_cni_request_duration_seconds", "Time the agent "
                                      "took to answer a CNI request, by command", ["command"],
                                      buckets=CNI_BUCKETS, registry=reg)
        self.cni_requests = Counter("weavepy_cni_requests", "CNI requests by command and result",
                                    ["command", "result"], registry=reg)
        self.policies = Gauge("weavepy_policies", "NetworkPolicies known to the policy "
                              "source", registry=reg)
        self.policy_isolated = Gauge("weavepy_policy_isolated_pods", "Pods of this node that "
                                     "NetworkPolicy isolates, by direction", ["direction"],
                                     registry=reg)
        self.policy_applies = Counter("weavepy_policy_applies", "Writes of the policy table to "
                                      "the kernel, by kind (full, incremental, error)",
                                      ["kind"], registry=reg)
        self.policy_apply_duration = Histogram("weavepy_policy_apply_duration_seconds",
                                               "Time from a policy change (source, pod added "
                                               "or removed) to the kernel holding it",
                                               buckets=CNI_BUCKETS, registry=reg)
        self._policy_counters = _PolicyCounters()
        reg.register(self._snapshot_counters)
        reg.register(self._weave_names)
        reg.register(self._policy_counters)

        for state in MEMBER_STATES:
            self.members.labels(state=state).set(0)
        for state in IPAM_STATES:
            self.ipam_state.labels(state=state).set(0)
        for state in ("owned", "free", "unreachable"):
            self.ipam_blocks.labels(state=state).set(0)
        for state in ("in_use", "capacity"):
            self.pod_ips.labels(state=state).set(0)

    # -- updates -------------------------------------------------------------------------------

    def update(self, snapshot: StatusSnapshot) -> None:
        """Set every gauge from `snapshot` and keep it for the counters' next scrape."""
        self._snapshot_counters.snapshot = snapshot
        self._weave_names.snapshot = snapshot
        self.ready.set(1 if snapshot.ready else 0)
        for state in MEMBER_STATES:
            self.members.labels(state=state).set(snapshot.members.get(state, 0))
        self.connections.clear()
        for (state, path, encrypted), count in sorted(snapshot.connections.items()):
            self.connections.labels(
                state=_bounded(state, CONNECTION_STATES), path=_bounded(path, DATA_PATHS),
                encryption="on" if encrypted else "off").inc(count)
        current = _bounded(snapshot.ipam_state, IPAM_STATES)
        self.ipam_state.clear()
        for state in (*IPAM_STATES, *((OTHER,) if current == OTHER else ())):
            self.ipam_state.labels(state=state).set(1 if state == current else 0)
        self.ipam_blocks.labels(state="owned").set(snapshot.blocks_owned)
        self.ipam_blocks.labels(state="free").set(snapshot.blocks_free)
        self.ipam_blocks.labels(state="unreachable").set(snapshot.blocks_unreachable)
        self.pod_ips.labels(state="in_use").set(snapshot.pod_ips_in_use)
        self.pod_ips.labels(state="capacity").set(snapshot.pod_ips_capacity)
        self.host_rules_present.set(1 if snapshot.host_rules_present else 0)

    def update_from_status(self, doc: Mapping[str, Any]) -> None:
        """`update()` from the agent's status document."""
        self.update(StatusSnapshot.from_status(doc))

    def observe_reconcile(self, seconds: float, ok: bool) -> None:
        """One reconcile pass took `seconds`; `ok` is False if it ended with an error."""
        self.reconcile_duration.observe(max(0.0, seconds))
        if not ok:
            self.reconcile_errors.inc()

    def update_policy(self, snapshot: PolicySnapshot) -> None:
        """The policy gauges and drop counters (from the enforcer's status, at scrape)."""
        self._policy_counters.snapshot = snapshot
        self.policies.set(snapshot.policies)
        for direction in POLICY_DIRECTIONS:
            self.policy_isolated.labels(direction=direction).set(
                snapshot.isolated.get(direction, 0))

    def observe_policy_apply(self, kind: str, seconds: float) -> None:
        """One write of the policy table: `kind` full, incremental or error (an apply that
        found nothing to write is not observed)."""
        if kind not in ("full", "incremental", "error"):
            return
        self.policy_applies.labels(kind=kind).inc()
        self.policy_apply_duration.observe(max(0.0, seconds))

    def observe_cni_request(self, command: str, code: int, seconds: float) -> None:
        """One CNI request answered with CNI error `code` (0 = success) after `seconds`;
        the signature of `CniServer(on_request=...)`."""
        name = _bounded(command, CNI_COMMANDS)
        self.cni_duration.labels(command=name).observe(max(0.0, seconds))
        self.cni_requests.labels(command=name, result="ok" if code == 0 else "error").inc()

    # -- exposition ----------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (content type `CONTENT_TYPE_LATEST`)."""
        return generate_latest(self.registry)
