"""What the IPAM core reports: its state enum, its status snapshot, and its events.

This module owns the vocabulary the agent shows to operators (API, CLI, metrics) and the
invariant checker reads. The rule it keeps: everything here is plain, immutable data with
no behaviour, and each state name says what the node can do and what it waits for.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from weavepy.ipam.blocks import IPNetwork
from weavepy.ipam.state import Era, Value


class IpamState(enum.StrEnum):
    """The one-word answer to "can this node give pods addresses, and if not, why?"."""

    WAITING_FOR_CLUSTER = "waiting_for_cluster"
    """No state yet: waiting to hear from a cluster (or to found one, per the bootstrap rule)."""
    JOINING = "joining"
    """Knows the cluster, is not (or no longer) a member: its join is being decided."""
    WAITING_FOR_QUORUM = "waiting_for_quorum"
    """A majority of voters seems up, but this node has no valid lease yet (just started)."""
    MINORITY_PARTITION = "minority_partition"
    """Fewer than a majority of voters reachable: no new blocks; own blocks until the lease ends."""
    READY = "ready"
    """Member with a valid lease: can hand out addresses and get more blocks."""
    OUT_OF_SPACE = "out_of_space"
    """Needs a block and every block of the range is owned by a reachable member."""
    OWNED_BY_UNREACHABLE_PEERS = "owned_by_unreachable_peers"
    """Needs a block; the only candidates belong to unreachable members (or are quarantined)."""
    WAITING_FOR_POD_CIDR = "waiting_for_pod_cidr"
    """`--ipam kubernetes`: this node's Node has no IPv4 podCIDR yet (or no Node has its name)."""
    POD_CIDR_REFUSED = "pod_cidr_refused"
    """`--ipam kubernetes`: this node's podCIDR cannot be used (outside the cluster range, ...)."""


@dataclass(frozen=True, slots=True)
class MemberView:
    name: str
    generation: int
    voter: bool
    alive: bool
    blocks: tuple[str, ...]
    reclaim_in: float | None  # seconds until automatic reclaim may start (None: alive or never)
    node_deleted: bool = False  # the orchestrator deleted its node: removed once a quorum agrees


@dataclass(frozen=True, slots=True)
class ClusterMismatchReport:
    peer: str
    local_cluster: str
    remote_cluster: str
    message: str


@dataclass(frozen=True, slots=True)
class IpamStatus:
    node: str
    state: IpamState
    detail: str
    cluster_id: str | None
    era: Era | None
    slot: int
    generation: int | None
    voters: tuple[str, ...]
    voters_reachable: int
    quorum: int
    lease_remaining: float | None  # None: no valid lease
    owned_blocks: tuple[IPNetwork, ...]  # usable now (held and leased)
    held_blocks: tuple[IPNetwork, ...]  # recorded as ours, leased or not
    members: tuple[MemberView, ...]
    total_blocks: int
    free_blocks: int
    quarantined_blocks: int
    unreachable_owners: tuple[str, ...]
    pending_block_requests: int
    cluster_mismatches: tuple[ClusterMismatchReport, ...]
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def can_allocate(self) -> bool:
        return bool(self.owned_blocks)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class ClusterFounded:
    cluster_id: str


@dataclass(frozen=True, slots=True)
class ClusterJoined:
    cluster_id: str
    generation: int


@dataclass(frozen=True, slots=True)
class BlockAcquired:
    block: IPNetwork


@dataclass(frozen=True, slots=True)
class BlockLost:
    block: IPNetwork
    reason: str


@dataclass(frozen=True, slots=True)
class LeaseChanged:
    """The node may (valid) or may not (not valid) hand out addresses from its blocks."""

    valid: bool


@dataclass(frozen=True, slots=True)
class MemberRemoved:
    """A member generation was removed by a decision (or by this node's forced new era)."""

    name: str
    generation: int
    reason: str
    era: Era
    slot: int
    freed: tuple[IPNetwork, ...]
    quarantined: tuple[IPNetwork, ...]


@dataclass(frozen=True, slots=True)
class RemovedFromCluster:
    """This node learned that it was removed; it dropped its blocks and rejoins as new."""

    generation: int
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class ClusterMismatch:
    peer: str
    local_cluster: str
    remote_cluster: str
    message: str


@dataclass(frozen=True, slots=True)
class SlotDecided:
    """A value was applied; `proposed_here` marks the node that drove the decision."""

    era: Era
    slot: int
    value: Value
    proposed_here: bool
    voters: tuple[str, ...]  # V of the previous state: who decided it


Event = (
    ClusterFounded
    | ClusterJoined
    | BlockAcquired
    | BlockLost
    | LeaseChanged
    | MemberRemoved
    | RemovedFromCluster
    | ClusterMismatch
    | SlotDecided
)
