"""Checks of the IPAM invariants over per-node observations; shared by the simulator and chaos.

This module owns the *statement* of invariants 1-4 and 6 of ARCHITECTURE.md as executable
checks over what a test can observe from outside a node: status snapshots (`IpamStatus`, or
the same fields from the agent's JSON report) and the events nodes emit. It never looks inside
a core. Every check raises `InvariantViolation` with a sentence naming the nodes, blocks and
numbers involved. `InvariantChecker` bundles them and counts how often each ran, so a test
can report its coverage.

1. `check_no_overlap`: two live nodes of one cluster never own overlapping blocks.
2. `check_restart_kept`: a restarted node holds exactly the blocks (and pod addresses) it
   persisted before it went down.
3. `check_minority_reported` and `check_decided_with_quorum`: a node without a reachable
   majority of voters says `minority_partition`, and every decision was made by a node that
   could reach a majority of the voters that decided it.
4. `ReclaimLedger`: a member generation is removed by at most one decision (per cluster),
   automatic reclaims only after `reclaim_after` without contact, and (at the end of a run)
   every node gone for good was removed.
6. `ClusterIdTracker` / `check_mismatch_reported`: a node's cluster id never changes except by
   an explicit reset, and a node that exchanged state with a foreign cluster reports it.
Plus `DecisionLedger`: all nodes that decided slot n of one cluster and era decided the same
value (Paxos agreement; the other invariants rest on it).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from weavepy.ipam.blocks import IPAddress, IPNetwork
from weavepy.ipam.state import Era, Value
from weavepy.ipam.status import IpamState, IpamStatus, MemberRemoved, SlotDecided


class InvariantViolation(AssertionError):
    """An IPAM invariant does not hold; the message says which and where."""


@dataclass(frozen=True, slots=True)
class Ownership:
    """The part of a status invariant 1 needs: which blocks a live node may hand out now."""

    node: str
    cluster_id: str | None
    owned: frozenset[IPNetwork]

    @classmethod
    def from_status(cls, status: IpamStatus) -> Ownership:
        return cls(status.node, status.cluster_id, frozenset(status.owned_blocks))


# --------------------------------------------------------------------------- invariant 1


def check_no_overlap(views: Iterable[Ownership | IpamStatus]) -> None:
    """Invariant 1 over the live nodes: within a cluster, owned address space is disjoint."""
    by_cluster: dict[str | None, list[tuple[int, int, int, str, IPNetwork]]] = defaultdict(list)
    for view in views:
        ownership = Ownership.from_status(view) if isinstance(view, IpamStatus) else view
        for network in ownership.owned:
            first = int(network.network_address)
            last = int(network.broadcast_address)
            by_cluster[ownership.cluster_id].append(
                (network.version, first, last, ownership.node, network)
            )
    for cluster_id, spans in by_cluster.items():
        spans.sort()
        reach: tuple[int, int, str, IPNetwork] | None = None  # (version, last, node, network)
        for version, first, last, node, network in spans:
            overlaps = reach is not None and reach[0] == version and first <= reach[1]
            if overlaps and reach is not None and reach[2] != node:
                raise InvariantViolation(
                    f"invariant 1: in cluster {cluster_id}, {node} owns {network} and "
                    f"{reach[2]} owns {reach[3]}: they overlap"
                )
            if reach is None or reach[0] != version or last > reach[1]:
                reach = (version, last, node, network)


def check_no_block_overlap(owners: Iterable[tuple[str, str | None, Iterable[int]]]) -> None:
    """Invariant 1, fast form: (node, cluster id, owned block indices) of one block space.

    Within a cluster every node uses the cluster's block space (a node with another range
    refuses to join), so two blocks overlap exactly when their indices are equal.
    """
    seen: dict[tuple[str | None, int], str] = {}
    for node, cluster_id, blocks in owners:
        for index in blocks:
            other = seen.setdefault((cluster_id, index), node)
            if other != node:
                raise InvariantViolation(
                    f"invariant 1: in cluster {cluster_id}, block #{index} is owned by both "
                    f"{other} and {node}"
                )


# --------------------------------------------------------------------------- invariant 2


def check_restart_kept(
    node: str,
    held_before: Iterable[IPNetwork],
    status_after: IpamStatus,
    allocations_before: Mapping[tuple[str, str], IPAddress] | None = None,
    allocations_after: Mapping[tuple[str, str], IPAddress] | None = None,
) -> None:
    """Invariant 2: right after a restart the node holds what it persisted, pods included."""
    before = set(held_before)
    after = set(status_after.held_blocks)
    if before != after:
        raise InvariantViolation(
            f"invariant 2: {node} held {sorted(map(str, before))} before restarting and "
            f"{sorted(map(str, after))} after"
        )
    if (
        allocations_before is not None
        and allocations_after is not None
        and dict(allocations_before) != dict(allocations_after)
    ):
        changed = {
            key: (allocations_before.get(key), allocations_after.get(key))
            for key in set(allocations_before) | set(allocations_after)
            if allocations_before.get(key) != allocations_after.get(key)
        }
        raise InvariantViolation(
            f"invariant 2: {node}'s pod addresses changed across a restart: {changed}"
        )


# --------------------------------------------------------------------------- invariant 3


def check_minority_reported(status: IpamStatus, reachable_voters: int) -> None:
    """Invariant 3 (what the node says): without a reachable majority it says so.

    `reachable_voters` counts the voters of `status.voters` (itself included) that the test
    knows to be up, reachable, and running as the generation the state lists (a voter that
    lost its disk cannot vote), measured once gossip has had time to notice.
    """
    if status.cluster_id is None or status.generation is None or not status.voters:
        return
    in_minority = reachable_voters < len(status.voters) // 2 + 1
    says_minority = status.state is IpamState.MINORITY_PARTITION
    if in_minority != says_minority:
        raise InvariantViolation(
            f"invariant 3: {status.node} reaches {reachable_voters} of voters "
            f"{list(status.voters)} but reports {status.state.value} ({status.detail})"
        )


def check_decided_with_quorum(
    proposer: str, event: SlotDecided, reachable: Iterable[str], cluster_id: str
) -> None:
    """Invariant 3/4 (what the node does): a decision needs a reachable majority of its voters.

    `reachable` names the nodes the proposer could exchange messages with during the round
    (itself included), by the test's ground truth.
    """
    voters = set(event.voters)
    reached = voters & set(reachable)
    if len(reached) < len(voters) // 2 + 1:
        raise InvariantViolation(
            f"invariant 3: {proposer} decided slot {event.slot} of cluster {cluster_id} "
            f"(era {event.era}) reaching only {sorted(reached)} of voters {sorted(voters)}"
        )


# --------------------------------------------------------------------------- agreement


@dataclass(slots=True)
class DecisionLedger:
    """Every node that applies slot n of (cluster, era) applies the same value."""

    decided: dict[tuple[str, Era, int], tuple[Value, str]] = field(default_factory=dict)

    def record(self, node: str, cluster_id: str, event: SlotDecided) -> None:
        key = (cluster_id, event.era, event.slot)
        known = self.decided.get(key)
        if known is None:
            self.decided[key] = (event.value, node)
        elif known[0] != event.value:
            raise InvariantViolation(
                f"agreement: slot {event.slot} of cluster {cluster_id} era {event.era} was "
                f"decided as {known[0]} by {known[1]} and as {event.value} by {node}"
            )


# --------------------------------------------------------------------------- invariant 4


@dataclass(slots=True)
class ReclaimLedger:
    """Invariant 4: each member generation is removed by at most one decision."""

    removals: dict[tuple[str, str, int], set[tuple[Era, int, str]]] = field(
        default_factory=lambda: defaultdict(set)
    )

    def record(self, cluster_id: str, event: MemberRemoved) -> None:
        key = (cluster_id, event.name, event.generation)
        decisions = self.removals[key]
        decisions.add((event.era, event.slot, event.reason))
        if len({(era, slot) for era, slot, _ in decisions}) > 1:
            raise InvariantViolation(
                f"invariant 4: {event.name} generation {event.generation} of cluster "
                f"{cluster_id} was removed more than once: {sorted(decisions)}"
            )

    def removed(self, cluster_id: str, name: str, generation: int) -> bool:
        return bool(self.removals.get((cluster_id, name, generation)))

    def count(self) -> int:
        return sum(1 for decisions in self.removals.values() if decisions)


def check_reclaim_waited(
    event: MemberRemoved, silent_for: float, reclaim_after: float, slack: float
) -> None:
    """Invariant 4: an automatic reclaim only after `reclaim_after` of silence (minus slack).

    `silent_for` is how long, by the test's ground truth, the removed node had been down or
    cut off from the node that decided the removal; `slack` covers gossip's detection delay.
    """
    if event.reason == "reclaim" and silent_for + slack < reclaim_after:
        raise InvariantViolation(
            f"invariant 4: {event.name} generation {event.generation} was reclaimed after only "
            f"{silent_for:.1f}s of silence (reclaim_after {reclaim_after}s)"
        )


# --------------------------------------------------------------------------- invariant 6


@dataclass(slots=True)
class ClusterIdTracker:
    """Invariant 6: a node never silently changes cluster."""

    ids: dict[str, str] = field(default_factory=dict)

    def observe(self, node: str, cluster_id: str | None) -> None:
        if cluster_id is None:
            return
        known = self.ids.setdefault(node, cluster_id)
        if known != cluster_id:
            raise InvariantViolation(
                f"invariant 6: {node} moved from cluster {known} to {cluster_id} without a reset"
            )

    def reset(self, node: str) -> None:
        """The node's state was wiped on purpose (`weavepy reset`): it may join any cluster."""
        self.ids.pop(node, None)


def check_mismatch_reported(status: IpamStatus, foreign_peers: Iterable[str]) -> None:
    """Invariant 6: a node that exchanged state with these foreign-cluster peers reports them."""
    reported = {report.peer for report in status.cluster_mismatches}
    missing = set(foreign_peers) - reported
    if missing:
        raise InvariantViolation(
            f"invariant 6: {status.node} (cluster {status.cluster_id}) talked to foreign "
            f"peers {sorted(missing)} but does not report a cluster mismatch"
        )
    for report in status.cluster_mismatches:
        if "weavepy reset" not in report.message:
            raise InvariantViolation(
                f"invariant 6: the mismatch report on {status.node} does not say how to recover"
            )


@dataclass(slots=True)
class InvariantChecker:
    """All checks with their ledgers, counting how often each ran (for test reports)."""

    decisions: DecisionLedger = field(default_factory=DecisionLedger)
    reclaims: ReclaimLedger = field(default_factory=ReclaimLedger)
    cluster_ids: ClusterIdTracker = field(default_factory=ClusterIdTracker)
    counts: Counter[str] = field(default_factory=Counter)

    def no_overlap(self, views: Iterable[Ownership | IpamStatus]) -> None:
        self.counts["1:no_overlap"] += 1
        check_no_overlap(views)

    def no_block_overlap(self, owners: Iterable[tuple[str, str | None, Iterable[int]]]) -> None:
        self.counts["1:no_overlap"] += 1
        check_no_block_overlap(owners)

    def restart_kept(
        self,
        node: str,
        held_before: Iterable[IPNetwork],
        status_after: IpamStatus,
        allocations_before: Mapping[tuple[str, str], IPAddress] | None = None,
        allocations_after: Mapping[tuple[str, str], IPAddress] | None = None,
    ) -> None:
        self.counts["2:restart_kept"] += 1
        check_restart_kept(node, held_before, status_after, allocations_before, allocations_after)

    def minority_reported(self, status: IpamStatus, reachable_voters: int) -> None:
        self.counts["3:minority_reported"] += 1
        check_minority_reported(status, reachable_voters)

    def decided(
        self, node: str, cluster_id: str, event: SlotDecided, reachable: Iterable[str] | None
    ) -> None:
        """Record a SlotDecided event; `reachable` (ground truth) only for the proposer."""
        self.counts["agreement"] += 1
        self.decisions.record(node, cluster_id, event)
        if event.proposed_here and reachable is not None:
            self.counts["3:decided_with_quorum"] += 1
            check_decided_with_quorum(node, event, reachable, cluster_id)

    def removed(self, cluster_id: str, event: MemberRemoved) -> None:
        self.counts["4:reclaimed_once"] += 1
        self.reclaims.record(cluster_id, event)

    def reclaim_waited(
        self, event: MemberRemoved, silent_for: float, reclaim_after: float, slack: float
    ) -> None:
        self.counts["4:reclaim_waited"] += 1
        check_reclaim_waited(event, silent_for, reclaim_after, slack)

    def cluster_id(self, node: str, cluster_id: str | None) -> None:
        self.counts["6:cluster_id_stable"] += 1
        self.cluster_ids.observe(node, cluster_id)

    def mismatch_reported(self, status: IpamStatus, foreign_peers: Iterable[str]) -> None:
        self.counts["6:mismatch_reported"] += 1
        check_mismatch_reported(status, foreign_peers)
