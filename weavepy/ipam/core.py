"""The IPAM core: who owns which pod block, decided slot by slot, as a sans-IO state machine.

Theory of operation
-------------------
The cluster state (`state.ClusterState`) moves through slots s1, s2, ... Slot n+1 is decided
by single-decree Paxos among the voters V of s(n); any node may propose (it must know s(n)).
Because the acceptor set of every slot is fixed by the decided state before it, changing V
needs no joint consensus: each slot is an independent Paxos instance with a known, fixed set
of acceptors. A node owns a block when its decided state records it and its lease is valid.

This module keeps the safety rules, and nothing else decides whether they hold:

1. Agreement. A voter takes part in slot n+1 only while its own decided state is exactly
   s(n); it never promises below its promise, and its promise and accepted value are on disk
   before any reply leaves (rule 7). Ballots are (round, name, boot id), unique per process.
   A proposer whose promises carry an accepted value re-proposes the highest one (`PHASES`
   below is the round as data). So each slot has one value, and an era is one chain of states.
2. States merge by order. A stateless node adopts a state of its own range and block size; a
   node with a state adopts another only from its own cluster (ID, range and block size), and
   only if its (era, slot) is later.
3. Evidence never overstates silence. Every operation names its origin; a voter that applies
   a decided operation of X (or adopts a state in which X acted since its last one) records
   evidence of X then, and gossip's "alive" is evidence while the name speaks as that
   generation. On (re)start, or on adopting a new era, everybody's evidence is "now".
4. Leases run from creation. When X's own operation, created at time t0, is decided, X may
   hand out addresses from its blocks until t0 + lease * LEASE_SAFETY. A lease never survives
   a restart (monotonic clocks do not), adopting a new era, a removal, or `leave` (dropped
   before the Leave is proposed).
5. The freeing rule (`frees_safely`). A value that frees X's blocks for others is proposed only
   if every promiser (a majority of V) attests "X not alive, silent for >= lease", each being a
   voter of s(n), which includes X's last operation. So the value is created at least a lease
   after t0, when X's lease has run out (automatic reclaim waits reclaim_after >= lease). A
   forced rmpeer carries the operator's word instead; without a quorum it starts a new era
   that fences every free block for a lease (docs/ipam.md 2.6).
6. Clusters never mix. A message or state of another cluster ID, range or block size is
   dropped, counted and reported; it changes nothing.
7. Disk before words. Whatever an input produced (messages, events) is released only after
   the snapshot carrying every state change of that input is durable.

What to propose and when (intents, the value built from them, voter housekeeping, back-off,
`Timings`) is the liveness policy in `liveness.py`; rendering the status is `report.py`. Both
read the core through its read-only view and can break none of the rules above. Bootstrap
(when a stateless node founds a cluster) is policy too; it stays here, beside the stateless
node's hellos and adoption.

The contract with the I/O layer (the agent):

* inputs: `on_member_alive/dead` (gossip), `on_message` (an IPAM gossip user message),
  `merge_remote_state` (push/pull), `request_block`, `rmpeer`, `leave`, `handle_timer`.
* after any input: if `persist_needed`, store `snapshot()` durably and call
  `mark_persisted(seq)`; only then do `messages_to_send()` and `events()` release what was
  produced after the change (a voter's promise must be on disk before anyone hears of it).
* `next_deadline()` is an absolute time at which to call `handle_timer`.
* `now` is a monotonic clock in seconds; durations are compared across nodes, instants never.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
import random
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from weavepy.ipam import liveness, report, wire
from weavepy.ipam.blocks import BlockSpace, IPNetwork
from weavepy.ipam.errors import ConfigError, IpamDecodeError, RmpeerError
from weavepy.ipam.liveness import Intent, Removal, Timings, Wishes
from weavepy.ipam.state import (
    FORCED_REMOVAL,
    Claim,
    ClusterState,
    Free,
    Join,
    Leave,
    Member,
    Op,
    Remove,
    Value,
    check_name,
    value_from_plain,
    value_to_plain,
)
from weavepy.ipam.status import (
    BlockAcquired,
    BlockLost,
    ClusterFounded,
    ClusterJoined,
    ClusterMismatch,
    ClusterMismatchReport,
    Event,
    IpamState,
    IpamStatus,
    LeaseChanged,
    MemberRemoved,
    RemovedFromCluster,
    SlotDecided,
)
from weavepy.ipam.wire import (
    Accept,
    Accepted,
    Attestation,
    Ballot,
    Behind,
    Body,
    Decided,
    Envelope,
    Hello,
    Nack,
    Outgoing,
    Prepare,
    Promise,
    StateMsg,
    StateRequest,
)

log = logging.getLogger(__name__)

DEFAULT_RECLAIM_AFTER = 24 * 3600.0
DEFAULT_LEASE = 3600.0
DEFAULT_MAX_VOTERS = 5
LEASE_SAFETY = 0.98  # a holder trusts its lease for 98% of its length: room for clock-rate drift
SNAPSHOT_FORMAT = 1
RECENT_VALUES = 64  # decided values kept in memory to catch laggards up without a full state
# a laggard up to this many slots behind gets the values, not the whole state (O(members)):
# 16 covers a message 1.5 s late at ~10 decisions a second
MAX_CATCH_UP_VALUES = 16
MAX_NONCES = 128
TAG_KEY = "ipam"  # the gossip meta tag carrying `IpamCore.meta_tag`
# A stateless node's broadcast hello carries its attempt number (Hello.slot; old agents send 0).
# Attempt a is answered by about HELLO_ANSWERERS * 2**a members (`answers_hello`), attempt
# ASK_EVERYONE and later by every node holding a state, as is a hello sent to one peer.
HELLO_ANSWERERS = 3
ASK_EVERYONE = 4
_CURRENT = 2**62  # slot of a standing learned from gossip tags: as current as it gets

Bootstrap = Literal["found", "join"]


class Phase(enum.Enum):
    """Where this node's Paxos round for the next slot stands (see `PHASES`)."""

    PREPARE = "prepare"
    ACCEPT = "accept"


@dataclass(slots=True)
class _Round:
    slot: int
    ballot: Ballot
    acceptors: tuple[str, ...]
    majority: int
    intents: list[Intent]
    asks: tuple[tuple[str, int], ...]
    deadline: float
    resend_at: float
    phase: Phase = Phase.PREPARE
    promises: dict[str, Promise] = field(default_factory=dict)
    accepted_by: set[str] = field(default_factory=set)
    value: Value = ()


@dataclass(frozen=True, slots=True)
class PhaseRule:
    request: Callable[[_Round], Prepare | Accept]  # sent to each acceptor that has not answered
    answered: Callable[[_Round], Collection[str]]  # the acceptors whose reply this phase counted


# One Paxos round, as data. A reply counts only in the phase that asked for it (`COUNTED_IN`),
# for this round's slot and ballot, from an acceptor of this slot:
#
#     phase    sends (and re-sends to the silent)   counts    a majority of them leads to
#     PREPARE  PREPARE(slot, ballot, asks)          PROMISE   ACCEPT, with the highest accepted
#                                                             value among the promises, else a
#                                                             new one (none: the round ends idle)
#     ACCEPT   ACCEPT(slot, ballot, value)          ACCEPTED  chosen: learn it, broadcast DECIDED
#
# A NACK for the round's ballot, or its deadline, ends it in either phase (random back-off).
PHASES: Mapping[Phase, PhaseRule] = MappingProxyType({
    Phase.PREPARE: PhaseRule(
        request=lambda r: Prepare(r.slot, r.ballot, r.asks), answered=lambda r: r.promises.keys()
    ),
    Phase.ACCEPT: PhaseRule(
        request=lambda r: Accept(r.slot, r.ballot, r.value), answered=lambda r: r.accepted_by
    ),
})
COUNTED_IN: Mapping[type[Promise] | type[Accepted], Phase] = MappingProxyType({
    Promise: Phase.PREPARE,
    Accepted: Phase.ACCEPT,
})


def attested_silent(
    promises: Collection[Promise], target: str, generation: int, min_age: float
) -> bool:
    """Did every promiser answer that (target, generation) is not alive in its view and has
    given it no evidence for at least `min_age` seconds?"""
    answers = [
        a for p in promises for a in p.answers if a.name == target and a.generation == generation
    ]
    return len(answers) == len(promises) and all(
        a.evidence_age >= min_age and not a.alive for a in answers
    )


def frees_safely(op: Op, promises: Collection[Promise], lease: float) -> bool:
    """The freeing rule: an operation that frees a member generation's blocks for others may
    be proposed only if every promiser (a majority of V) attests that generation silent for
    at least a lease. A forced removal carries the operator's word instead (docs/ipam.md 2.6).
    """
    if isinstance(op, Free) or (
        isinstance(op, Remove) and op.free_now and op.reason != FORCED_REMOVAL
    ):
        return attested_silent(promises, op.target, op.target_generation, lease)
    return True


def answers_hello(joiner: str, member: str, members: int, attempt: int) -> bool:
    """Does `member` (of a state listing `members` members) answer `joiner`'s broadcast hello
    number `attempt` with its state? One joiner needs one state, not one from every member.

    A stable hash of (joiner, member) places each member in [0, 1); those below
    HELLO_ANSWERERS * 2**attempt / members answer: about that many members, the same ones
    for every node holding that state, and each attempt keeps the last one's answerers and
    adds as many again (so dead answerers cost a joiner a hello interval or two). A threshold,
    not a ranking of every member, so a member decides in O(1). From ASK_EVERYONE on, all do.
    Who answers never matters to safety: any state a joiner adopts is a decided one.
    """
    if attempt >= ASK_EVERYONE:
        return True
    digest = hashlib.blake2b(f"{joiner}\0{member}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") * members < HELLO_ANSWERERS << (64 + attempt)


@dataclass(frozen=True, slots=True)
class _Standing:
    """What a peer's latest process last told us it is."""

    boot: int
    cluster_id: str  # "" when it has no cluster state
    generation: int  # 0 when it is not a member
    slot: int  # its decided slot then


class IpamCore:
    """One node's view of the cluster's block table, its Paxos roles, and its lease."""

    def __init__(
        self,
        node_name: str,
        cluster_range: str | IPNetwork,
        block_prefix: int,
        *,
        rng: random.Random,
        reclaim_after: float | None = DEFAULT_RECLAIM_AFTER,
        lease: float = DEFAULT_LEASE,
        max_voters: int = DEFAULT_MAX_VOTERS,
        bootstrap: Bootstrap = "join",
        found_alone_after: float | None = None,
        found_quorum: int = 1,
        founders: frozenset[str] | None = None,
        timings: Timings | None = None,
        snapshot: Mapping[str, Any] | None = None,
    ) -> None:
        try:
            self._name = check_name(node_name)
            self._space = BlockSpace.parse(cluster_range, block_prefix)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if not lease > 0:
            raise ConfigError(f"lease must be positive, got {lease}")
        if reclaim_after is not None and reclaim_after < lease:
            raise ConfigError(
                f"reclaim_after ({reclaim_after}s) must be at least the lease ({lease}s): a "
                "node's space may only be reclaimed after its lease has surely run out"
            )
        if not 1 <= max_voters <= 15:
            raise ConfigError(f"max_voters must be 1..15, got {max_voters}")
        if bootstrap not in ("found", "join"):
            raise ConfigError(f"bootstrap must be 'found' or 'join', got {bootstrap!r}")
        if found_quorum < 1:
            raise ConfigError(f"found_quorum must be at least 1, got {found_quorum}")
        self._rng = rng
        self._boot = rng.getrandbits(62)
        self._reclaim_after = reclaim_after
        self._lease = lease
        self._max_voters = max_voters
        self._bootstrap: Bootstrap = bootstrap
        self._found_alone_after = found_alone_after
        # Who may found, and with how many stateless nodes in sight (Weave's IPALLOC_INIT):
        # `found_quorum` counts this node; `founders` None means any node, a set only those.
        self._found_quorum = found_quorum
        self._founders = founders
        self._t = timings or Timings()

        # replicated and persisted
        self._cluster: ClusterState | None = None
        self._my_gen: int | None = None
        self._left = False
        self._promised: Ballot | None = None
        self._accepted: tuple[Ballot, Value] | None = None

        # volatile
        self._started: float | None = None
        self._floor = 0.0  # evidence of everyone is at least this recent
        self._alive: set[str] = set()
        self._gossip_seen: dict[str, float] = {}
        # per peer: what its latest process last said it is; see _note_standing
        self._standing: dict[str, _Standing] = {}
        self._gen_evidence: dict[tuple[str, int], float] = {}
        # cache of `silent_members`: the names, for the decided state `_silent_of` at (era,
        # slot) `_silent_at`; a gossip or standing change of one name updates that name only
        self._silent: set[str] = set()
        self._silent_of: ClusterState | None = None
        self._silent_at: tuple[Any, ...] = ()
        self._lease_until = -math.inf
        self._lease_was_valid = False
        self._nonces: OrderedDict[int, float] = OrderedDict()
        self._recent: OrderedDict[int, Value] = OrderedDict()
        # decided values of this era that came before the one they follow (reordered on the
        # way): learned in order once the gap fills, like a message that arrived later
        self._early: dict[int, Value] = {}
        self._round: _Round | None = None
        self._max_round = 0
        self._attempts = 0
        self._backoff_until = -math.inf
        self._wishes = Wishes()
        self._stateless_peers: dict[str, float] = {}
        self._first_stateless_seen: float | None = None
        self._last_contact = -math.inf
        self._foreign_seen = False
        self._hello_due = -math.inf
        self._hellos_sent = 0  # broadcast hellos so far (capped): the next one's attempt number
        self._state_sent: dict[str, float] = {}
        self._state_asked: dict[str, float] = {}
        self._mismatches: dict[str, ClusterMismatchReport] = {}
        self._drops: Counter[str] = Counter()
        self._wake_at: float | None = None

        # output, gated by persistence
        self._seq = 0
        self._persisted_seq = 0
        self._out: deque[tuple[int, Outgoing]] = deque()
        self._events: deque[tuple[int, Event]] = deque()
        # produced during the current input; stamped with its final seq when it ends
        self._staged_out: list[Outgoing] = []
        self._staged_events: list[Event] = []
        self._local: deque[Body] = deque()

        if snapshot is not None:
            self._restore(snapshot)
        self._wake_at = -math.inf  # first timer at once: found, say hello, or renew the lease

    # ================================================================== public: inputs

    def on_member_alive(self, name: str, now: float, ipam_tag: str | None = None) -> None:
        """Gossip says `name` is alive (joined, refuted, came back, or its tags changed).

        `ipam_tag` is the peer's `TAG_KEY` tag from its gossip meta (what its `meta_tag`
        returned), if it has one: it tells which cluster and generation that process speaks
        as, so a voter that came back without its disk is not counted before it says a word.
        """
        self._begin(now)
        if name != self._name:
            if ipam_tag is not None:
                self._note_tag(name, ipam_tag, now)
            self._alive.add(name)
            self._gossip_seen[name] = now
            self._last_contact = now
            self._recheck_silent(name)
        self._after_input(now)

    def on_member_dead(self, name: str, now: float) -> None:
        """Gossip declared `name` failed or left."""
        self._begin(now)
        if name != self._name:
            self._alive.discard(name)
            self._gossip_seen[name] = now
            self._recheck_silent(name)
        self._after_input(now)

    def on_message(self, from_node: str | None, data: bytes, now: float) -> None:
        """An IPAM message from the gossip layer. Garbage raises IpamDecodeError (counted)."""
        self._begin(now)
        try:
            envelope = wire.decode(data)
        except IpamDecodeError as exc:
            self._drops[exc.reason] += 1
            raise
        if from_node and from_node != envelope.sender:
            self._drops["sender_mismatch"] += 1
            raise IpamDecodeError(
                "sender_mismatch", f"gossip says {from_node}, message says {envelope.sender}"
            )
        self._receive(envelope, now)
        self._after_input(now)

    def merge_remote_state(self, data: bytes, now: float) -> None:
        """Push/pull: a peer's `local_state()`. Garbage raises IpamDecodeError (counted)."""
        self.on_message(None, data, now)

    def local_state(self) -> bytes:
        """Our side of a push/pull: the decided state, or a stateless hello."""
        if self._cluster is None:
            hello = Hello(ASK_EVERYONE)  # to one peer: it answers whatever its rank
            return wire.encode(Envelope("", (0, "", 0), self._name, self._boot, 0, 0, hello))
        return wire.encode(self._envelope(StateMsg(self._cluster)))

    def request_block(self, now: float, count: int = 1) -> IpamState:
        """The allocator wants `count` blocks more than it holds now (0 withdraws the wish).

        Returns the state right now; the claim is decided in the background and announced
        by a BlockAcquired event.
        """
        self._begin(now)
        if count < 0:
            raise ValueError(f"cannot want {count} blocks")
        self._wishes.blocks = count
        self._after_input(now)
        return report.describe(self, now)[0]

    def rmpeer(self, name: str, now: float, force: bool = False) -> str:
        """Operator: remove member `name` at once. Returns what will happen; RmpeerError if not.

        Without `force` the voters decide: refused if `name` is alive anywhere in their view;
        its blocks are free at once if it has been silent for a lease, else quarantined until
        then. With `force` (the operator vouches it is gone for good): with a reachable
        quorum, removed and freed at once by the voters; without one, this node starts a new
        era in which it is the only voter, and every free block is fenced for a lease. See
        docs/ipam.md for what that risks.
        """
        self._begin(now)
        cluster = self._cluster
        if cluster is None or not self.is_member():
            raise RmpeerError("this node is not a member of a cluster yet; run rmpeer on a member")
        if name == self._name:
            raise RmpeerError("a node cannot rmpeer itself; run `weavepy reset` on it instead")
        generation = cluster.generation_of(name)
        if generation is None:
            tomb = cluster.tombstones.get(name)
            if tomb is not None:
                raise RmpeerError(f"{name} was already removed ({tomb.reason}, slot {tomb.slot})")
            known = ", ".join(sorted(cluster.members)) or "none"
            raise RmpeerError(f"{name} is not a member; members are: {known}")
        if not force and name in self._alive:
            raise RmpeerError(
                f"{name} is alive in this node's view; stop it first, or use --force if you "
                "know it is gone for good"
            )
        if force and not self._quorum_reachable():
            message = self._force_new_era(name, generation, now)
        else:
            self._wishes.removals[name] = Removal(generation, force)
            self._wishes.refusals.pop(name, None)
            message = (
                f"removal of {name} (generation {generation}) proposed to the voters "
                f"{', '.join(cluster.voters)}; its blocks are freed "
                + (
                    "at once"
                    if force
                    else "at once if it has been silent for a lease, else quarantined until then"
                )
            )
        self._after_input(now)
        return message

    def node_deleted(self, name: str, now: float) -> str:
        """The orchestrator (Kubernetes) deleted member `name`'s node: remove it now, by quorum.

        Voters then propose `Remove(name, reason "node-deleted")` as soon as `name` is dead in
        their own view, instead of waiting `reclaim_after`: its blocks are free at once if every
        promiser attests it silent for a lease, else quarantined until then (the freeing rule
        is the same as rmpeer's), and nothing happens while any voter still sees it alive. A
        minority decides nothing; the removal waits for a majority. Returns what will happen.
        """
        self._begin(now)
        cluster = self._cluster
        generation = cluster.generation_of(name) if cluster is not None else None
        if cluster is None or generation is None or name == self._name:
            return f"node {name} was deleted; it is not another IPAM member: nothing to reclaim"
        self._wishes.deleted[name] = generation
        blocks = ", ".join(str(self._space.block(i)) for i in cluster.blocks_of(name)) or "none"
        message = (
            f"node {name} was deleted: the voters remove member {name} (generation "
            f"{generation}; blocks {blocks}) as soon as a majority of them sees it gone"
        )
        if not self._quorum_reachable():
            message += (
                f"; only {self.voters_reachable()} of {len(cluster.voters)} voters are "
                "reachable from here, so the removal waits until a majority is"
            )
        self._after_input(now)
        return message

    def node_restored(self, name: str, now: float) -> None:
        """The orchestrator lists `name`'s node again: forget an earlier `node_deleted`."""
        self._begin(now)
        self._wishes.deleted.pop(name, None)
        self._after_input(now)

    def leave(self, now: float) -> None:
        """Give our blocks back and leave the cluster (for `weavepy reset` on a live cluster)."""
        self._begin(now)
        self._wishes.leaving = True
        self._lease_until = -math.inf  # stop handing out addresses before anyone may reuse them
        self._after_input(now)

    def handle_timer(self, now: float) -> None:
        self._begin(now)
        round_ = self._round
        if round_ is not None:
            if now >= round_.deadline:
                self._fail_round(now, timed_out=True)
            elif now >= round_.resend_at:
                self._resend(round_, now)
        if self._cluster is None:
            self._bootstrap_step(now)
        self._after_input(now)

    # ================================================================== public: outputs

    def next_deadline(self) -> float | None:
        """When to call handle_timer next (absolute, same clock as `now`); None: no timer."""
        return self._wake_at

    @property
    def persist_needed(self) -> bool:
        return self._seq > self._persisted_seq

    @property
    def seq(self) -> int:
        """The number of the latest state change: what `snapshot()` would carry as "seq"."""
        return self._seq

    def mark_persisted(self, seq: int) -> None:
        """The snapshot carrying `seq` is durable: release what was produced up to it."""
        self._persisted_seq = max(self._persisted_seq, seq)

    def messages_to_send(self) -> list[Outgoing]:
        """Outgoing payloads whose state changes are persisted (to=None: broadcast)."""
        released: list[Outgoing] = []
        while self._out and self._out[0][0] <= self._persisted_seq:
            released.append(self._out.popleft()[1])
        return released

    def events(self) -> list[Event]:
        released: list[Event] = []
        while self._events and self._events[0][0] <= self._persisted_seq:
            released.append(self._events.popleft()[1])
        return released

    def snapshot(self) -> dict[str, Any]:
        """Everything that must survive a restart, as JSON-friendly data."""
        accepted = None
        if self._accepted is not None:
            accepted = [list(self._accepted[0]), value_to_plain(self._accepted[1])]
        return {
            "format": SNAPSHOT_FORMAT,
            "node": self._name,
            "seq": self._seq,
            "cluster": self._cluster.to_plain() if self._cluster else None,
            "generation": self._my_gen,
            "left": self._left,
            "acceptor": {
                "promised": list(self._promised) if self._promised else None,
                "accepted": accepted,
            },
        }

    @property
    def meta_tag(self) -> str:
        """Publish this as tag `TAG_KEY` in the node's gossip meta (re-publish on change)."""
        if self._cluster is None:
            return ""
        return f"{self._cluster.cluster_id}/{self._my_gen or 0}"

    @property
    def name(self) -> str:
        return self._name

    @property
    def space(self) -> BlockSpace:
        return self._space

    @property
    def cluster_id(self) -> str | None:
        return self._cluster.cluster_id if self._cluster else None

    def held_blocks(self) -> list[int]:
        """Indices of blocks the decided state gives us (lease or not)."""
        if self._cluster is None or not self.is_member():
            return []
        return self._cluster.blocks_of(self._name)

    def usable_blocks(self, now: float) -> list[int]:
        """Indices of blocks we may hand addresses out of right now (held and leased)."""
        return self.held_blocks() if self.lease_valid(now) else []

    def status(self, now: float) -> IpamStatus:
        """The status snapshot (rendered by `report.py`)."""
        self._begin(now)
        return report.render_status(self, now)

    # ================================================================== read-only view
    # What liveness.py and report.py read (their `CoreView`); nothing here changes the core.

    @property
    def cluster(self) -> ClusterState | None:
        """The decided state this node holds (to read, never to change)."""
        return self._cluster

    @property
    def generation(self) -> int | None:
        """This node's member generation; None while it is not a member."""
        return self._my_gen

    @property
    def left(self) -> bool:
        """This node gave its blocks back and left (until `weavepy reset`)."""
        return self._left

    @property
    def lease(self) -> float:
        return self._lease

    @property
    def lease_until(self) -> float:
        """Until when this node may hand out addresses from its blocks (if it is a member)."""
        return self._lease_until

    @property
    def reclaim_after(self) -> float | None:
        return self._reclaim_after

    @property
    def timings(self) -> Timings:
        return self._t

    @property
    def wishes(self) -> Wishes:
        """What this node was asked to get decided (blocks, rmpeer, leave)."""
        return self._wishes

    @property
    def bootstrap(self) -> Bootstrap:
        return self._bootstrap

    @property
    def founding_rule(self) -> str | None:
        """Why this stateless node waits beyond weavepy's own rule (Weave's IPALLOC_INIT)."""
        if self._founders is not None and not self._founders:
            return "an observer: it never founds a cluster and never owns space"
        if self._founders is not None:
            first = min(self._founders)
            return ("the first seed: founds at once" if first == self._name
                    else f"seeds {', '.join(sorted(self._founders))}: {first} founds")
        if self._found_quorum > 1:
            return f"founds once {self._found_quorum} stateless nodes hear each other"
        return None

    @property
    def foreign_range_seen(self) -> bool:
        """A stateless node heard a cluster over another range or block size."""
        return self._foreign_seen

    @property
    def mismatches(self) -> tuple[ClusterMismatchReport, ...]:
        return tuple(self._mismatches.values())

    @property
    def dropped(self) -> dict[str, int]:
        """Dropped inputs by reason."""
        return dict(self._drops)

    def gossip_alive(self, name: str) -> bool:
        """Does gossip say `name` is alive (whichever generation it speaks as)?"""
        return name in self._alive

    # ================================================================== receive and dispatch

    def _receive(self, envelope: Envelope, now: float) -> None:
        body = envelope.body
        sender = envelope.sender
        if sender == self._name:
            return  # our own broadcast, echoed back
        self._last_contact = now
        cluster = self._cluster
        self._note_standing(sender, envelope, now)
        if not envelope.cluster_id:  # a stateless node announcing itself
            if isinstance(body, Hello):
                self._on_stateless_hello(sender, body.slot, now)
            else:
                self._drops["stateless_non_hello"] += 1
            return
        if cluster is None:
            if isinstance(body, StateMsg):
                self._adopt(body.state, now, sender)
            else:
                self._ask_state(sender, now)
            return
        if envelope.cluster_id != cluster.cluster_id:
            self._note_mismatch(sender, envelope.cluster_id, now)
            return
        if envelope.era != cluster.era:
            if isinstance(body, StateMsg):
                self._adopt(body.state, now, sender)
            elif envelope.era > cluster.era:
                self._ask_state(sender, now)
            else:
                self._send_state(sender, now)
            return
        self._dispatch(sender, body, now)

    def _note_tag(self, name: str, tag: str, now: float) -> None:
        cluster_id, _, generation = tag.partition("/")
        if not generation.isdigit() or len(cluster_id) > 64 or len(generation) > 19:
            self._drops["bad_ipam_tag"] += 1
            return
        known = self._standing.get(name)
        if known is not None and (known.cluster_id, known.generation) == (
                cluster_id, int(generation)):
            return  # it confirms what that process said: keep its boot and slot, so a late
            # message of the same process (a hello from before it joined) stays late
        # gossip delivers a member's latest meta, so a tag speaks for its current process
        self._set_standing(name, _Standing(-1, cluster_id, int(generation), _CURRENT), now)

    def _note_standing(self, sender: str, envelope: Envelope, now: float) -> None:
        """Record which cluster and generation `sender` now speaks as.

        Within one sender process (boot id) only a message from an equal or later decided
        slot updates the record, so a late message from before its join changes nothing; a
        new boot id is a new process (perhaps one that lost its disk). If the change moves
        which member generation its name stands for, gossip's "last seen" so far is first
        folded into the old generation's own evidence, so the old generation is not judged
        silent since its last operation only.
        """
        known = self._standing.get(sender)
        if known is not None and known.boot == envelope.boot and envelope.slot < known.slot:
            return
        standing = _Standing(envelope.boot, envelope.cluster_id, envelope.generation, envelope.slot)
        self._set_standing(sender, standing, now)

    def _set_standing(self, sender: str, standing: _Standing, now: float) -> None:
        cluster = self._cluster
        member_gen = cluster.generation_of(sender) if cluster else None
        before = member_gen is not None and self._gossip_applies(sender, member_gen)
        self._standing[sender] = standing
        self._recheck_silent(sender)
        if member_gen is not None and before and not self._gossip_applies(sender, member_gen):
            seen = now if sender in self._alive else self._gossip_seen.get(sender, -math.inf)
            key = (sender, member_gen)
            self._gen_evidence[key] = max(self._gen_evidence.get(key, -math.inf), seen)

    def _dispatch(self, sender: str, body: Body, now: float) -> None:
        if isinstance(body, Prepare):
            self._on_prepare(sender, body, now)
        elif isinstance(body, Accept):
            self._on_accept(sender, body, now)
        elif isinstance(body, Promise):
            self._on_promise(sender, body, now)
        elif isinstance(body, Accepted):
            self._on_accepted(sender, body, now)
        elif isinstance(body, Nack):
            self._on_nack(body, now)
        elif isinstance(body, Decided):
            self._on_decided(sender, body, now)
        elif isinstance(body, Behind):
            self._catch_up(sender, body.slot, now)
        elif isinstance(body, StateMsg):
            self._adopt(body.state, now, sender)
        elif isinstance(body, StateRequest):  # same era: the values it lacks, if we have them
            self._catch_up(sender, body.slot, now)
        # Hello from a member carries nothing we need beyond the cluster and era checks.

    # ================================================================== acceptor

    def _acceptor_ready(self, sender: str, slot: int, now: float) -> bool:
        cluster = self._cluster
        assert cluster is not None
        if slot <= cluster.slot:
            self._catch_up(sender, slot - 1, now)
            return False
        if slot > cluster.slot + 1:
            self._send(sender, Behind(cluster.slot))
            return False
        if not self.is_voter():
            self._drops["not_a_voter"] += 1
            return False
        return True

    def _on_prepare(self, sender: str, body: Prepare, now: float) -> None:
        if not self._acceptor_ready(sender, body.slot, now):
            return
        self._max_round = max(self._max_round, body.ballot[0])
        if self._promised is not None and body.ballot < self._promised:
            self._send(sender, Nack(body.slot, body.ballot, self._promised))
            return
        if self._promised != body.ballot:
            self._promised = body.ballot
            self._dirty()
        answers = tuple(
            Attestation(name, gen, self.alive_gen(name, gen), self.evidence_age(name, gen, now))
            for name, gen in body.ask
        )
        self._send(sender, Promise(body.slot, body.ballot, self._accepted, answers))

    def _on_accept(self, sender: str, body: Accept, now: float) -> None:
        if not self._acceptor_ready(sender, body.slot, now):
            return
        self._max_round = max(self._max_round, body.ballot[0])
        if self._promised is not None and body.ballot < self._promised:
            self._send(sender, Nack(body.slot, body.ballot, self._promised))
            return
        if self._accepted != (body.ballot, body.value) or self._promised != body.ballot:
            self._promised = body.ballot
            self._accepted = (body.ballot, body.value)
            self._dirty()
        self._send(sender, Accepted(body.slot, body.ballot))

    # ================================================================== proposer

    def _maybe_start_round(self, now: float) -> None:
        cluster = self._cluster
        if cluster is None or self._round is not None or now < self._backoff_until:
            return
        wanted = liveness.intents(self, now)
        if not wanted:
            return
        kept, asks = liveness.with_questions(wanted)
        self._max_round += 1
        round_ = _Round(
            slot=cluster.slot + 1,
            ballot=(self._max_round, self._name, self._boot),
            acceptors=cluster.voters,
            majority=cluster.majority(),
            intents=kept,
            asks=asks,
            deadline=now + self._t.round_timeout,
            resend_at=now + self._t.resend_interval,
        )
        self._round = round_
        self._ask_acceptors(round_)

    def _ask_acceptors(self, round_: _Round) -> None:
        """Send the phase's request to every acceptor whose reply it has not counted yet."""
        rule = PHASES[round_.phase]
        answered = rule.answered(round_)
        for voter in round_.acceptors:
            if voter not in answered:
                self._send(voter, rule.request(round_))

    def _resend(self, round_: _Round, now: float) -> None:
        round_.resend_at = now + self._t.resend_interval
        self._ask_acceptors(round_)

    def _fail_round(
        self, now: float, pause: float | None = None, *, timed_out: bool = False
    ) -> None:
        self._round = None
        self._attempts += 1
        if pause is None:
            pause = liveness.retry_pause(self._t, self._attempts, timed_out, self._rng)
        self._backoff_until = now + pause

    def _counting(self, reply: Promise | Accepted, sender: str) -> _Round | None:
        """The current round, if `reply` counts in it (see `PHASES`)."""
        round_ = self._round
        if (
            round_ is None
            or round_.phase is not COUNTED_IN[type(reply)]
            or reply.slot != round_.slot
            or reply.ballot != round_.ballot
            or sender not in round_.acceptors
        ):
            return None
        return round_

    def _on_promise(self, sender: str, body: Promise, now: float) -> None:
        round_ = self._counting(body, sender)
        if round_ is None:
            return
        round_.promises[sender] = body
        if len(round_.promises) < round_.majority:
            return
        accepted = [p.accepted for p in round_.promises.values() if p.accepted is not None]
        if accepted:
            value = max(accepted, key=lambda item: item[0])[1]  # Paxos: finish what may be chosen
        else:
            value = self._new_value(round_, now)
        if not value:
            self._fail_round(now, pause=self._t.idle_retry)
            return
        round_.value = value
        round_.phase = Phase.ACCEPT
        round_.deadline = now + self._t.round_timeout
        round_.resend_at = now + self._t.resend_interval
        self._ask_acceptors(round_)

    def _on_accepted(self, sender: str, body: Accepted, now: float) -> None:
        round_ = self._counting(body, sender)
        if round_ is None:
            return
        round_.accepted_by.add(sender)
        if len(round_.accepted_by) < round_.majority:
            return
        self._round = None
        self._attempts = 0
        self._backoff_until = -math.inf
        self._learn(round_.slot, round_.value, now, proposed_here=True)
        self._broadcast(Decided(round_.slot, round_.value))

    def _on_nack(self, body: Nack, now: float) -> None:
        round_ = self._round
        self._max_round = max(self._max_round, body.promised[0])
        if round_ is not None and body.slot == round_.slot and body.ballot == round_.ballot:
            self._fail_round(now)

    def _new_value(self, round_: _Round, now: float) -> Value:
        """The policy's value for this round, less any operation that breaks the freeing rule."""
        promises = tuple(round_.promises.values())

        def attested(target: str, generation: int, *, min_age: float) -> bool:
            return attested_silent(promises, target, generation, min_age)

        proposal = liveness.build_value(
            round_.intents, self, attested, lambda: self._new_nonce(now)
        )
        for target, why in proposal.refused.items():
            self._wishes.removals.pop(target, None)
            self._wishes.refusals[target] = why
        unsafe = [op for op in proposal.value if not frees_safely(op, promises, self._lease)]
        if unsafe:
            log.error("not proposing %s: the voters did not attest a lease of silence", unsafe)
        return tuple(op for op in proposal.value if op not in unsafe)

    def _new_nonce(self, now: float) -> int:
        """A nonce for an operation created now; when it is decided, our lease runs from now."""
        value = self._rng.getrandbits(62)
        self._nonces[value] = now
        while len(self._nonces) > MAX_NONCES:
            self._nonces.popitem(last=False)
        return value

    # ================================================================== learner

    def _on_decided(self, sender: str, body: Decided, now: float) -> None:
        cluster = self._cluster
        assert cluster is not None
        if body.slot == cluster.slot + 1:
            self._learn(body.slot, body.value, now, proposed_here=False)
        elif body.slot > cluster.slot + 1:
            if body.slot <= cluster.slot + 1 + MAX_CATCH_UP_VALUES:
                self._early[body.slot] = body.value
            self._ask_state(sender, now)

    def _learn(self, slot: int, value: Value, now: float, *, proposed_here: bool) -> None:
        """Apply the value decided for `slot` (= our slot + 1)."""
        cluster = self._cluster
        assert cluster is not None and slot == cluster.slot + 1
        held_before = set(self.held_blocks())
        voters_before = cluster.voters
        outcomes = cluster.apply_value(value)
        self._recent[slot] = value
        while len(self._recent) > RECENT_VALUES:
            self._recent.popitem(last=False)
        self._promised = None
        self._accepted = None
        mine_decided: list[float] = []
        for outcome in outcomes:
            op = outcome.op
            origin_gen = cluster.generation_of(op.origin)
            if origin_gen is not None:
                self._gen_evidence[(op.origin, origin_gen)] = now
            if op.origin == self._name and op.nonce in self._nonces:
                mine_decided.append(self._nonces[op.nonce])
                if isinstance(op, Join):
                    self._my_gen = slot
                    self._emit(ClusterJoined(cluster.cluster_id, slot))
                    log.info("joined IPAM cluster %s as generation %d", cluster.cluster_id, slot)
                elif isinstance(op, Claim) and outcome.applied:
                    self._wishes.blocks = max(0, self._wishes.blocks - len(op.blocks))
                elif isinstance(op, Leave) and outcome.applied:
                    self._my_gen = None
                    self._left = True
            if isinstance(op, Remove | Leave) and outcome.applied:
                target = op.target if isinstance(op, Remove) else op.origin
                generation = op.target_generation if isinstance(op, Remove) else op.generation
                reason = op.reason if isinstance(op, Remove) else "left"
                self._wishes.removals.pop(target, None)
                self._emit(
                    MemberRemoved(
                        target,
                        generation,
                        reason,
                        cluster.era,
                        slot,
                        tuple(self._space.block(i) for i in outcome.freed),
                        tuple(self._space.block(i) for i in outcome.quarantined),
                    )
                )
        if mine_decided and self.is_member():
            self._lease_until = max(
                self._lease_until, max(mine_decided) + self._lease * LEASE_SAFETY
            )
        self._emit(SlotDecided(cluster.era, slot, value, proposed_here, voters_before))
        self._prune_evidence()
        if self._round is not None and self._round.slot <= cluster.slot:
            self._round = None
            self._backoff_until = -math.inf
        self._after_state_change(now, held_before, "decided")
        following = self._early.pop(cluster.slot + 1, None)
        if following is not None:
            self._learn(cluster.slot + 1, following, now, proposed_here=False)

    def _adopt(self, state: ClusterState, now: float, source: str) -> None:
        """A whole decided state from a peer: take it if it is later than ours."""
        if state.space != self._space:
            self._note_mismatch(source, state.cluster_id, now, state=state)
            return
        cluster = self._cluster
        if cluster is None:
            self._cluster = state
            self._floor = now
            self._gen_evidence.clear()
            self._recent.clear()
            self._early.clear()
            self._my_gen = None
            self._promised = None
            self._accepted = None
            log.info(
                "adopted IPAM cluster %s (slot %d) from %s", state.cluster_id, state.slot, source
            )
            self._dirty()
            return
        if state.cluster_id != cluster.cluster_id:
            self._note_mismatch(source, state.cluster_id, now)
            return
        if state.order_key <= cluster.order_key:
            return
        held_before = set(self.held_blocks())
        if state.era != cluster.era:
            log.warning(
                "adopting IPAM era %s from %s (was %s): an operator forced a removal",
                state.era,
                source,
                cluster.era,
            )
            self._floor = now
            self._gen_evidence.clear()
            self._lease_until = -math.inf
        else:
            for name, member in state.members.items():
                if member.last_op_slot > cluster.slot:
                    self._gen_evidence[(name, member.generation)] = now
            for q in state.quarantine.values():
                if q.last_op_slot > cluster.slot:
                    self._gen_evidence[(q.owner, q.generation)] = now
        self._recent.clear()
        self._early.clear()
        self._cluster = state
        self._promised = None
        self._accepted = None
        if self._round is not None and self._round.slot <= state.slot:
            self._round = None
            self._backoff_until = -math.inf
        removals = self._wishes.removals
        for name in list(removals):
            if state.generation_of(name) != removals[name].generation:
                del removals[name]
        self._after_state_change(now, held_before, "adopted")

    def _prune_evidence(self) -> None:
        """Forget evidence of generations that are neither members nor quarantined."""
        cluster = self._cluster
        if cluster is None or len(self._gen_evidence) <= 2 * len(cluster.members) + 64:
            return
        keep = {(name, m.generation) for name, m in cluster.members.items()}
        keep |= {(q.owner, q.generation) for q in cluster.quarantine.values()}
        for key in [key for key in self._gen_evidence if key not in keep]:
            del self._gen_evidence[key]

    def _after_state_change(self, now: float, held_before: set[int], how: str) -> None:
        cluster = self._cluster
        assert cluster is not None
        if self._my_gen is not None and cluster.generation_of(self._name) != self._my_gen:
            tomb = cluster.tombstones.get(self._name)
            reason = tomb.reason if tomb else "unknown"
            message = (
                f"this node (generation {self._my_gen}) was removed from IPAM cluster "
                f"{cluster.cluster_id} ({reason}) while it could not take part; it drops its "
                f"{len(held_before)} block(s) and rejoins as a new member: pods on those blocks "
                "lose their addresses"
            )
            log.error("%s", message)
            self._emit(RemovedFromCluster(self._my_gen, reason, message))
            self._my_gen = None
            self._lease_until = -math.inf
        held_after = set(self.held_blocks())
        for index in sorted(held_after - held_before):
            self._emit(BlockAcquired(self._space.block(index)))
        for index in sorted(held_before - held_after):
            self._emit(BlockLost(self._space.block(index), how))
        if how == "adopted" and held_after - held_before:
            self._wishes.blocks = max(0, self._wishes.blocks - len(held_after - held_before))
        deleted = self._wishes.deleted
        for name in [n for n, gen in deleted.items() if cluster.generation_of(n) != gen]:
            del deleted[name]  # removed (or rejoined as a new generation) since
        self._dirty()

    # ================================================================== catch-up and state

    def _catch_up(self, peer: str, peer_slot: int, now: float) -> None:
        """`peer` is at `peer_slot`, behind us: send the decided values it lacks, or our state."""
        cluster = self._cluster
        assert cluster is not None
        wanted = range(peer_slot + 1, cluster.slot + 1)
        if 0 < len(wanted) <= MAX_CATCH_UP_VALUES and all(s in self._recent for s in wanted):
            for slot in wanted:
                self._send(peer, Decided(slot, self._recent[slot]))
        elif len(wanted) > 0:
            self._send_state(peer, now)

    def _send_state(self, peer: str, now: float) -> None:
        if self._cluster is None:
            return
        if now - self._state_sent.get(peer, -math.inf) < self._t.state_reply_interval:
            return
        self._state_sent[peer] = now
        self._send(peer, StateMsg(self._cluster))

    def _ask_state(self, peer: str, now: float) -> None:
        if now - self._state_asked.get(peer, -math.inf) < self._t.state_reply_interval:
            return
        self._state_asked[peer] = now
        if self._cluster is None:
            self._send_stateless(peer, Hello(ASK_EVERYONE))  # to this peer alone: it answers
        else:
            self._send(peer, StateRequest(self._cluster.slot))

    def _note_mismatch(
        self, peer: str, remote: str, now: float, state: ClusterState | None = None
    ) -> None:
        self._drops["cluster_mismatch"] += 1
        local = self._cluster.cluster_id if self._cluster else "(none yet)"
        if state is not None and state.space != self._space:
            self._foreign_seen = True
            message = (
                f"peer {peer} runs IPAM cluster {remote} over {state.space.cluster_range} in "
                f"/{state.space.block_prefix} blocks, but this node is configured with "
                f"{self._space.cluster_range} in /{self._space.block_prefix} blocks; they will "
                "not merge. Fix the range on one side; to move this node into the peer's "
                "cluster, stop it, run `weavepy reset`, and relaunch it with the peer's range."
            )
        else:
            message = (
                f"this node belongs to IPAM cluster {local}, peer {peer} to cluster {remote}; "
                "they will not merge. To move this node into the peer's cluster, stop it, run "
                "`weavepy reset`, and relaunch it with the peer in its peer list (its pods lose "
                "their addresses). To keep them apart, drop the peer from the peer lists."
            )
        mismatch = ClusterMismatchReport(peer, local, remote, message)
        if self._mismatches.get(peer) != mismatch:
            self._mismatches[peer] = mismatch
            log.error("%s", message)
            self._emit(ClusterMismatch(peer, local, remote, message))

    # ================================================================== bootstrap

    def _on_stateless_hello(self, sender: str, attempt: int, now: float) -> None:
        cluster = self._cluster
        if cluster is not None:
            if attempt >= ASK_EVERYONE or (
                self.is_member() and answers_hello(sender, self._name, len(cluster.members),
                                                   attempt)
            ):
                self._send_state(sender, now)
            return
        self._stateless_peers[sender] = now
        if self._first_stateless_seen is None:
            self._first_stateless_seen = now

    def _bootstrap_step(self, now: float) -> None:
        assert self._started is not None
        if self._founds_at_once():
            self._found(now, "launched with no peers" if self._founders is None
                        else "the first of the seeds")
            return
        if (
            self._found_alone_after is not None
            and self._found_quorum == 1
            and self._may_found()
            and not self._alive
            and now - max(self._started, self._last_contact) >= self._found_alone_after
        ):
            self._found(now, f"heard from no peer for {self._found_alone_after:g}s")
            return
        recent = [
            p for p, t in self._stateless_peers.items() if now - t <= 3 * self._t.hello_interval
        ]
        if (
            recent
            and self._may_found()
            and 1 + len(recent) >= self._found_quorum
            and self._first_stateless_seen is not None
            and not self._foreign_seen
            and now - self._first_stateless_seen >= self._t.elect_after
            and self._name < min(recent)
        ):
            self._found(now, f"lowest name among stateless peers {sorted(recent)}")
            return
        if now >= self._hello_due:
            self._hello_due = now + self._t.hello_interval
            self._send_stateless(None, Hello(self._hellos_sent))
            self._hellos_sent = min(self._hellos_sent + 1, ASK_EVERYONE)

    def _may_found(self) -> bool:
        """Any node by default; with seeds only the lowest-named one (so one cluster at most)."""
        return self._founders is None or self._name == min(self._founders, default=None)

    def _founds_at_once(self) -> bool:
        """Launched without peers (and no quorum asked for), or the first-named seed."""
        if self._founders is not None:
            return self._name == min(self._founders, default=None)
        return self._bootstrap == "found" and self._found_quorum == 1

    def _found(self, now: float, why: str) -> None:
        cluster_id = f"{self._rng.getrandbits(128):032x}"
        self._cluster = ClusterState.found(cluster_id, self._space, self._name, self._max_voters)
        self._my_gen = 1
        self._floor = now
        self._lease_until = now + self._lease * LEASE_SAFETY
        log.warning(
            "founded IPAM cluster %s over %s (%s)", cluster_id, self._space.cluster_range, why
        )
        self._emit(ClusterFounded(cluster_id))
        self._emit(ClusterJoined(cluster_id, 1))
        self._dirty()
        self._broadcast(StateMsg(self._cluster))

    def _force_new_era(self, target: str, generation: int, now: float) -> str:
        cluster = self._cluster
        assert cluster is not None
        held_before = set(self.held_blocks())
        outcome = cluster.start_forced_era(self._name, self._rng.getrandbits(62), target)
        self._floor = now
        self._gen_evidence.clear()
        self._recent.clear()
        self._early.clear()
        self._promised = None
        self._accepted = None
        self._round = None
        self._wishes.removals.clear()
        self._lease_until = now + self._lease * LEASE_SAFETY
        message = (
            f"FORCED: no quorum of voters is reachable, so this node started era "
            f"{cluster.era[0]} as the only voter and removed {target} (generation {generation}). "
            f"The {len(outcome.quarantined)} free block(s), its own included, are fenced for "
            f"{self._lease:g}s (a lease this node may not have heard of could still cover them). "
            "Nodes that hold the old era adopt this one when they hear it. This is safe only if "
            "every node this side cannot reach is down for good."
        )
        log.warning("%s", message)
        self._emit(
            MemberRemoved(
                target,
                generation,
                FORCED_REMOVAL,
                cluster.era,
                cluster.slot,
                (),
                tuple(self._space.block(i) for i in outcome.quarantined),
            )
        )
        self._after_state_change(now, held_before, "forced")
        self._broadcast(StateMsg(cluster))
        return message

    # ================================================================== helpers

    def _begin(self, now: float) -> None:
        if self._started is None:
            self._started = now
            self._floor = now
            self._hello_due = now

    def _after_input(self, now: float) -> None:
        for _ in range(10_000):
            while self._local:
                self._dispatch(self._name, self._local.popleft(), now)
            self._maybe_start_round(now)
            if not self._local:
                break
        valid = self.lease_valid(now)
        if valid != self._lease_was_valid:
            self._lease_was_valid = valid
            self._emit(LeaseChanged(valid))
        self._wake_at = self._compute_wake(now)
        # Whatever this input produced waits for every state change it made to be durable.
        self._out.extend((self._seq, item) for item in self._staged_out)
        self._events.extend((self._seq, item) for item in self._staged_events)
        self._staged_out.clear()
        self._staged_events.clear()

    def _compute_wake(self, now: float) -> float | None:
        """The next moment a timer could change anything (always in the future)."""
        cluster = self._cluster
        times: list[float] = []
        if cluster is None:
            if self._founds_at_once():
                return now
            times.append(self._hello_due)
            if self._found_alone_after is not None:
                last = max(self._started if self._started is not None else now, self._last_contact)
                times.append(last + self._found_alone_after)
            if self._first_stateless_seen is not None:
                times.append(self._first_stateless_seen + self._t.elect_after)
        else:
            if self._round is not None:
                times += [self._round.resend_at, self._round.deadline]
            elif self._backoff_until > now and liveness.intents(self, now):
                times.append(self._backoff_until)
            if self.is_member():
                if math.isfinite(self._lease_until):
                    times += [self._lease_until - self._lease / 2, self._lease_until]
                if self.is_voter():
                    times += liveness.voter_deadlines(self, cluster)
        future = [t for t in times if t > now]
        return min(future) if future else None

    def _dirty(self) -> None:
        self._seq += 1

    def _emit(self, event: Event) -> None:
        self._staged_events.append(event)

    def _envelope(self, body: Body) -> Envelope:
        cluster = self._cluster
        assert cluster is not None
        return Envelope(
            cluster.cluster_id,
            cluster.era,
            self._name,
            self._boot,
            self._my_gen or 0,
            cluster.slot,
            body,
        )

    def _send(self, to: str, body: Body) -> None:
        if to == self._name:
            self._local.append(body)
            return
        self._staged_out.append(Outgoing(to, wire.encode(self._envelope(body))))

    def _send_stateless(self, to: str | None, body: Body) -> None:
        envelope = Envelope("", (0, "", 0), self._name, self._boot, 0, 0, body)
        self._staged_out.append(Outgoing(to, wire.encode(envelope)))

    def _broadcast(self, body: Body) -> None:
        self._staged_out.append(Outgoing(None, wire.encode(self._envelope(body))))

    # ================================================================== membership and evidence
    # The facts rules 3-5 rest on; public because liveness.py and report.py read them too.

    def is_member(self) -> bool:
        """The decided state lists this node as the generation it is."""
        cluster = self._cluster
        return (
            cluster is not None
            and self._my_gen is not None
            and cluster.generation_of(self._name) == self._my_gen
        )

    def is_voter(self) -> bool:
        """A member that votes (an acceptor of the next slot)."""
        cluster = self._cluster
        return cluster is not None and self.is_member() and self._name in cluster.voters

    def lease_valid(self, now: float) -> bool:
        """This node may hand out addresses from its blocks now (rule 4)."""
        return self.is_member() and now < self._lease_until

    def alive_gen(self, name: str, generation: int) -> bool:
        """Is (name, generation) alive as far as gossip can tell?"""
        if name == self._name:
            return self._my_gen == generation
        return name in self._alive and self._gossip_applies(name, generation)

    def _gossip_applies(self, name: str, generation: int) -> bool:
        """Does gossip news about `name` speak for this generation of it?

        Gossip knows names, not generations: a name stands for what its latest process last
        told us (unless it joined since), else for its current member generation (or for any,
        if it is not a member).
        """
        current = self._cluster.generation_of(name) if self._cluster else None
        standing = self._standing.get(name)
        if standing is not None and self._cluster is not None:
            if standing.cluster_id != self._cluster.cluster_id:
                return False  # it speaks for another cluster (or none): not our member now
            # it (re)joined after the state it spoke from: what it said then is stale
            stale = current is not None and current > (standing.generation or standing.slot)
            if not stale:
                return standing.generation == generation
        return current is None or current == generation

    def silent_members(self) -> list[tuple[str, Member]]:
        """The members, this node aside, that gossip does not show alive as their member
        generation (`alive_gen` is false), in the decided state's order: what a voter's
        housekeeping looks at. Cached: rebuilt when the decided state moves, and kept up to
        date one name at a time as gossip and standings change, so that a voter's every input
        does not cost a pass over every member."""
        cluster = self._cluster
        if cluster is None:
            return []
        if self._silent_of is not cluster or self._silent_at != cluster.order_key:
            self._silent_of = cluster
            self._silent_at = cluster.order_key
            self._silent = {
                name for name, member in cluster.members.items()
                if name != self._name and not self.alive_gen(name, member.generation)
            }
        if not self._silent:
            return []
        return [(name, member) for name, member in cluster.members.items()
                if name in self._silent]

    def _recheck_silent(self, name: str) -> None:
        """`name`'s gossip or standing changed: update its place in the silent cache."""
        cluster = self._cluster
        if cluster is None or self._silent_of is not cluster:
            return  # no cache for this state yet: `silent_members` builds it
        member = cluster.members.get(name)
        if name != self._name and member is not None and not self.alive_gen(
                name, member.generation):
            self._silent.add(name)
        else:
            self._silent.discard(name)

    def last_evidence(self, name: str, generation: int) -> float:
        """When this node last had evidence that (name, generation) was alive (rule 3)."""
        last = max(self._floor, self._gen_evidence.get((name, generation), -math.inf))
        if self._gossip_applies(name, generation):
            last = max(last, self._gossip_seen.get(name, -math.inf))
        return last

    def evidence_age(self, name: str, generation: int, now: float) -> float:
        """Seconds since that evidence (0 while alive): what this node attests."""
        if self.alive_gen(name, generation):
            return 0.0
        return max(0.0, now - self.last_evidence(name, generation))

    def voters_reachable(self) -> int:
        """Voters that gossip sees alive and that still speak as the voting generation."""
        cluster = self._cluster
        if cluster is None:
            return 0
        count = 0
        for voter in cluster.voters:
            if voter == self._name:
                count += self.is_voter()
            else:
                generation = cluster.generation_of(voter)
                count += generation is not None and self.alive_gen(voter, generation)
        return count

    def _quorum_reachable(self) -> bool:
        cluster = self._cluster
        return cluster is not None and self.voters_reachable() >= cluster.majority()

    def _restore(self, snapshot: Mapping[str, Any]) -> None:
        try:
            if snapshot.get("format") != SNAPSHOT_FORMAT:
                raise ValueError(f"unknown snapshot format {snapshot.get('format')!r}")
            if snapshot.get("node") != self._name:
                raise ConfigError(
                    f"the IPAM state belongs to node {snapshot.get('node')!r}, not {self._name!r}; "
                    "node names must be stable (or run `weavepy reset`)"
                )
            plain_cluster = snapshot.get("cluster")
            cluster = ClusterState.from_plain(plain_cluster) if plain_cluster is not None else None
            generation = snapshot.get("generation")
            acceptor = snapshot["acceptor"]
            promised = acceptor.get("promised")
            accepted = acceptor.get("accepted")
            self._seq = int(snapshot["seq"])
            self._persisted_seq = self._seq
            self._left = bool(snapshot.get("left", False))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IpamDecodeError("bad_snapshot", f"{type(exc).__name__}: {exc}") from exc
        if cluster is not None and cluster.space != self._space:
            raise ConfigError(
                f"this node's persisted IPAM cluster {cluster.cluster_id} uses "
                f"{cluster.space.cluster_range} in /{cluster.space.block_prefix} blocks, but it is "
                f"configured with {self._space.cluster_range} in /{self._space.block_prefix} "
                "blocks; restore the old setting, or stop it, run `weavepy reset`, and relaunch"
            )
        self._cluster = cluster
        self._my_gen = generation if isinstance(generation, int) else None
        if promised is not None:
            self._promised = wire.parse_ballot(promised)
            self._max_round = self._promised[0]
        if accepted is not None:
            ballot, value = accepted
            self._accepted = (wire.parse_ballot(ballot), value_from_plain(value))

