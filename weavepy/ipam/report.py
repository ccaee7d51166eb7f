"""How the IPAM core reports itself: its state in one word, the sentence that explains it, the
status snapshot, and the JSON document the agent serves.

This module owns the rendering of what the core knows into what operators, the CNI path and
the invariant checker read (`status.py` holds the vocabulary). The rules it keeps:

* Rendering changes nothing: it reads the core through `CoreView` and returns new data.
* The state comes from the same facts the core acts on, checked in this order, the first
  that holds wins:

      facts                                              state
      -------------------------------------------------  ----------------------------
      no cluster state                                   waiting_for_cluster
      not a member (left, removed, or join pending)      joining
      fewer than a majority of the voters reachable      minority_partition
      no valid lease                                     waiting_for_quorum
      wants a block, none free, some held by the          owned_by_unreachable_peers
      unreachable, quarantined or fenced
      wants a block, none free                           out_of_space
      otherwise                                          ready

  so `ready` always means this node may hand out addresses now, and every other state's
  detail says what it waits for and what an operator can do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from weavepy.ipam.blocks import BlockSpace, IPNetwork
from weavepy.ipam.liveness import Wishes
from weavepy.ipam.state import FENCE_OWNER, ClusterState
from weavepy.ipam.status import ClusterMismatchReport, IpamState, IpamStatus, MemberView


class CoreView(Protocol):
    """What the report reads from the core (`IpamCore` implements it)."""

    @property
    def name(self) -> str: ...
    @property
    def space(self) -> BlockSpace: ...
    @property
    def cluster(self) -> ClusterState | None: ...
    @property
    def generation(self) -> int | None: ...
    @property
    def left(self) -> bool: ...
    @property
    def bootstrap(self) -> str: ...
    @property
    def foreign_range_seen(self) -> bool: ...
    @property
    def lease_until(self) -> float: ...
    @property
    def reclaim_after(self) -> float | None: ...
    @property
    def wishes(self) -> Wishes: ...
    @property
    def mismatches(self) -> tuple[ClusterMismatchReport, ...]: ...
    @property
    def dropped(self) -> dict[str, int]: ...
    def is_member(self) -> bool: ...
    def lease_valid(self, now: float) -> bool: ...
    def gossip_alive(self, name: str) -> bool: ...
    def evidence_age(self, name: str, generation: int, now: float) -> float: ...
    def voters_reachable(self) -> int: ...
    def held_blocks(self) -> list[int]: ...
    @property
    def founding_rule(self) -> str | None: ...


_WAITING = {
    "found": "founding a new cluster",
    "join": "waiting to hear from a cluster member (launched with peers)",
}


def describe(view: CoreView, now: float) -> tuple[IpamState, str]:
    """The node's state and the sentence that explains it (see the table above)."""
    cluster = view.cluster
    if cluster is None:
        if view.foreign_range_seen:
            return IpamState.WAITING_FOR_CLUSTER, (
                "only heard from clusters with a different range; see cluster_mismatches"
            )
        rule = view.founding_rule
        return IpamState.WAITING_FOR_CLUSTER, (
            _WAITING[view.bootstrap] + (f" ({rule})" if rule else ""))
    if not view.is_member():
        if view.left:
            return IpamState.JOINING, "left the cluster; run `weavepy reset` to rejoin"
        tomb = cluster.tombstones.get(view.name)
        why = f" (was removed: {tomb.reason})" if tomb and view.generation is None else ""
        reachable = view.voters_reachable()
        if reachable < cluster.majority():
            return IpamState.JOINING, (
                f"cannot join{why}: {reachable} of voters {', '.join(cluster.voters)} "
                "reachable; if they are gone for good, run `weavepy reset` on this node and "
                "point it at a live cluster"
            )
        return IpamState.JOINING, f"asking the voters to admit this node{why}"
    lease_ok = view.lease_valid(now)
    if view.voters_reachable() < cluster.majority():
        reach = f"{view.voters_reachable()} of {len(cluster.voters)} voters reachable"
        deleted = _deleted_members(view, cluster)
        waiting = (
            f"; the removal of {', '.join(deleted)} (node deleted) waits for a majority"
            if deleted else ""
        )
        if lease_ok:
            return IpamState.MINORITY_PARTITION, (
                f"{reach}: no new blocks; own blocks usable for "
                f"{view.lease_until - now:.0f}s more (lease){waiting}"
            )
        return IpamState.MINORITY_PARTITION, (
            f"{reach}: lease ended, no new addresses until a majority is back{waiting}"
        )
    if not lease_ok:
        return IpamState.WAITING_FOR_QUORUM, "renewing this node's lease with the voters"
    if view.wishes.blocks > 0 and not cluster.has_free_block():
        unreachable = sorted(
            n
            for n in cluster.members
            if n != view.name and not view.gossip_alive(n) and cluster.blocks_of(n)
        )
        fenced = sum(1 for q in cluster.quarantine.values() if q.owner == FENCE_OWNER)
        if fenced:
            return IpamState.OWNED_BY_UNREACHABLE_PEERS, (
                f"no free block: {fenced} block(s) are fenced for a lease after a forced "
                f"rmpeer started era {cluster.era[0]}; they free up automatically"
            )
        if unreachable or cluster.quarantine:
            return IpamState.OWNED_BY_UNREACHABLE_PEERS, (
                f"no free block; blocks held by unreachable {unreachable} or quarantined "
                f"({len(cluster.quarantine)}): they are reclaimed automatically after "
                f"{view.reclaim_after}s, or use `weavepy rmpeer NAME` if they are dead"
            )
        space = view.space
        return IpamState.OUT_OF_SPACE, (
            f"all {space.count} blocks of {space.cluster_range} are in use"
        )
    refusals = "; ".join(view.wishes.refusals.values())
    return IpamState.READY, refusals or "ok"


def _deleted_members(view: CoreView, cluster: ClusterState) -> list[str]:
    """Members whose node the orchestrator deleted and that are not removed yet."""
    return sorted(
        name for name, generation in view.wishes.deleted.items()
        if cluster.generation_of(name) == generation
    )


def render_status(view: CoreView, now: float) -> IpamStatus:
    """The status snapshot: state, detail, cluster, voters, lease, blocks and members."""
    state, detail = describe(view, now)
    cluster = view.cluster
    space = view.space
    block = space.block
    if cluster is None:
        return IpamStatus(
            node=view.name,
            state=state,
            detail=detail,
            cluster_id=None,
            era=None,
            slot=0,
            generation=None,
            voters=(),
            voters_reachable=0,
            quorum=0,
            lease_remaining=None,
            owned_blocks=(),
            held_blocks=(),
            members=(),
            total_blocks=space.count,
            free_blocks=space.count,
            quarantined_blocks=0,
            unreachable_owners=(),
            pending_block_requests=view.wishes.blocks,
            cluster_mismatches=view.mismatches,
            dropped=view.dropped,
        )
    members = []
    unreachable = []
    deleted = set(_deleted_members(view, cluster))
    for member_name, member in sorted(cluster.members.items()):
        alive = member_name == view.name or view.gossip_alive(member_name)
        owned = cluster.blocks_of(member_name)
        reclaim_in = None
        if not alive and view.reclaim_after is not None:
            age = view.evidence_age(member_name, member.generation, now)
            reclaim_in = max(0.0, view.reclaim_after - age)
        if not alive and owned:
            unreachable.append(member_name)
        members.append(
            MemberView(
                member_name,
                member.generation,
                member_name in cluster.voters,
                alive,
                tuple(str(block(i)) for i in owned),
                reclaim_in,
                member_name in deleted,
            )
        )
    held = tuple(block(i) for i in view.held_blocks())
    lease_ok = view.lease_valid(now)
    return IpamStatus(
        node=view.name,
        state=state,
        detail=detail,
        cluster_id=cluster.cluster_id,
        era=cluster.era,
        slot=cluster.slot,
        generation=view.generation,
        voters=cluster.voters,
        voters_reachable=view.voters_reachable(),
        quorum=cluster.majority(),
        lease_remaining=(view.lease_until - now) if lease_ok else None,
        owned_blocks=held if lease_ok else (),
        held_blocks=held,
        members=tuple(members),
        total_blocks=space.count,
        free_blocks=len(cluster.free_blocks()),
        quarantined_blocks=len(cluster.quarantine),
        unreachable_owners=tuple(unreachable),
        pending_block_requests=view.wishes.blocks,
        cluster_mismatches=view.mismatches,
        dropped=view.dropped,
    )


def status_document(
    status: IpamStatus,
    pods: Mapping[IPNetwork, tuple[int, int]],
    dropped: Mapping[str, int],
    mode: str = "weavepy",
) -> dict[str, Any]:
    """The `ipam` section of the agent's status: `status` as JSON, with the pods per held
    block (used, capacity), `dropped` (the agent's own drop counters) and the IPAM `mode`
    (`--ipam`) added."""
    s = status
    return {
        "mode": mode,
        "state": s.state.value,
        "detail": s.detail,
        "cluster_id": s.cluster_id,
        "era": list(s.era) if s.era else None,
        "slot": s.slot,
        "generation": s.generation,
        "voters": list(s.voters),
        "voters_reachable": s.voters_reachable,
        "quorum": s.quorum,
        "lease_remaining_s": None if s.lease_remaining is None else round(s.lease_remaining),
        "owned_blocks": [str(b) for b in s.owned_blocks],
        "held_blocks": [str(b) for b in s.held_blocks],
        "total_blocks": s.total_blocks,
        "free_blocks": s.free_blocks,
        "quarantined_blocks": s.quarantined_blocks,
        "unreachable_owners": list(s.unreachable_owners),
        "pending_block_requests": s.pending_block_requests,
        "members": [{"name": m.name, "generation": m.generation, "voter": m.voter,
                     "alive": m.alive, "blocks": list(m.blocks),
                     "reclaim_in_s": None if m.reclaim_in is None else round(m.reclaim_in),
                     "node_deleted": m.node_deleted}
                    for m in s.members],
        "cluster_mismatches": [m.message for m in s.cluster_mismatches],
        "pods": {str(block): {"used": used, "capacity": capacity}
                 for block, (used, capacity) in pods.items()},
        "dropped": {**s.dropped, **dropped},
    }
