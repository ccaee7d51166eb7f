"""The IPAM core's liveness policy: what this node proposes, and when.

This module owns every choice that keeps the cluster moving: which operations a node wants
decided (its *intents*), how they become the operations of one value once the voters have
promised and answered its questions, when a voter's view calls for a reclaim, a demotion, a
promotion or the end of a quarantine, and how long a proposer backs off. The core
(`core.py`) asks for intents when it may start a round and for a value when a majority has
promised; it holds the safety rules and decides with Paxos.

The rule it keeps: nothing here can break a safety rule. The policy only chooses among
operations; the core refuses a value that frees space without a quorum's attested silence,
and `state.py` ignores an operation that does not fit the state it meets. A wrong choice
here costs progress (a claim that waits, a reclaim that comes late), never two owners of a
block. It reads the core through `CoreView` and never writes to it: its choices go back as
intents and a `Proposal` (the operations, each with a nonce the core hands out and records),
and the core acts on them.

The intents, in the order a node lists them, and what each becomes (`BUILDERS`):

    intent   who wants it, and when                         operation, if the promisers allow
    -------  ---------------------------------------------  -------------------------------------
    join     a node that knows the cluster, not a member    Join
    leave    a member asked to leave (`weavepy reset`)      Leave
    claim    a member that wants blocks while one is free   Claim of the lowest free blocks
    rmpeer   the operator, until decided or refused         Remove: blocks free at once if all
                                                            attest silence for a lease, else
                                                            quarantined; refused if any sees it
                                                            alive; forced: Remove, free at once
    deleted  a voter: a member whose node the orchestrator  Remove: free at once if all attest
             deleted (`node_deleted`), while this node      silence for a lease, else
             sees it dead                                   quarantined; waits while any sees it
                                                            alive
    reclaim  a voter: a member silent for reclaim_after     Remove (free) if all attest as much
    demote   a voter: a voter silent voter_replace_after    Demote if all attest as much
    free     a voter: a quarantine's owner silent a lease   Free if all attest as much
    promote  a voter: the lowest-named live non-voter,      Promote
             while V has room
    renew    a member past half its lease (listed last)     Renew, unless another operation of
                                                            this node is in the value (any renews)
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

import msgpack

from weavepy.ipam import wire
from weavepy.ipam.state import (
    FORCED_REMOVAL,
    MAX_BLOCKS_PER_CLAIM,
    MAX_OPS_PER_VALUE,
    NODE_DELETED,
    Claim,
    ClusterState,
    Demote,
    Free,
    Join,
    Leave,
    Member,
    Op,
    Promote,
    Remove,
    Renew,
    Value,
    value_to_plain,
)

log = logging.getLogger(__name__)

VALUE_BUDGET = 1100  # bytes of msgpack for one value, so PROMISE/ACCEPT stay under 2 KiB


@dataclass(frozen=True, slots=True)
class Timings:
    """Protocol pacing. Defaults suit production; tests scale them down.

    None of these is a safety setting (those are the lease and `reclaim_after`): they decide
    how soon things happen, never whether two nodes may own one block.
    """

    voter_replace_after: float = 600.0  # a voter dead this long is demoted (keeps its blocks)
    round_timeout: float = 3.0  # give up a Paxos round after this long
    resend_interval: float = 0.5  # re-send PREPARE/ACCEPT to silent voters this often
    backoff_max: float = 2.0  # random back-off ceiling after losing a round to another proposer
    retry_max: float = 30.0  # back-off ceiling after rounds that time out (no quorum answers)
    idle_retry: float = 5.0  # retry a round that produced nothing (attestations said no)
    hello_interval: float = 2.0  # a stateless node announces itself this often
    elect_after: float = 5.0  # stateless nodes that only see each other wait this long
    state_reply_interval: float = 1.0  # at most one full state per peer per interval


class IntentKind(enum.Enum):
    JOIN = "join"
    LEAVE = "leave"
    CLAIM = "claim"
    RMPEER = "rmpeer"
    DELETED = "deleted"
    RECLAIM = "reclaim"
    DEMOTE = "demote"
    FREE = "free"
    PROMOTE = "promote"
    RENEW = "renew"


# Intents whose operation needs the voters' word on the target (asked in PREPARE).
ATTESTED_KINDS = frozenset(
    {IntentKind.RMPEER, IntentKind.DELETED, IntentKind.RECLAIM, IntentKind.FREE,
     IntentKind.DEMOTE}
)
# Intents that take their target out of V (they make room for a promotion).
LEAVES_VOTERS = frozenset({IntentKind.DEMOTE, IntentKind.DELETED, IntentKind.RECLAIM})


@dataclass(frozen=True, slots=True)
class Intent:
    kind: IntentKind
    target: str = ""
    generation: int = 0
    force: bool = False

    @property
    def question(self) -> tuple[str, int] | None:
        """The (name, generation) the voters must attest about, if any."""
        if self.kind in ATTESTED_KINDS and not self.force:
            return (self.target, self.generation)
        return None


@dataclass(frozen=True, slots=True)
class Removal:
    """An operator's rmpeer of one member generation, waiting to be decided."""

    generation: int
    force: bool


@dataclass(slots=True)
class Wishes:
    """What this node was asked to get decided: the policy's own inputs, kept by the core."""

    blocks: int = 0  # blocks wanted beyond those held (the allocator's request)
    leaving: bool = False  # `leave()` was called
    removals: dict[str, Removal] = field(default_factory=dict)  # rmpeer by member name
    refusals: dict[str, str] = field(default_factory=dict)  # rmpeer the voters refused, why
    # member generations whose node the orchestrator deleted (`node_deleted`), by name
    deleted: dict[str, int] = field(default_factory=dict)


class CoreView(Protocol):
    """What the policy reads from the core (`IpamCore` implements it)."""

    @property
    def name(self) -> str: ...
    @property
    def cluster(self) -> ClusterState | None: ...
    @property
    def generation(self) -> int | None: ...
    @property
    def left(self) -> bool: ...
    @property
    def lease(self) -> float: ...
    @property
    def lease_until(self) -> float: ...
    @property
    def reclaim_after(self) -> float | None: ...
    @property
    def timings(self) -> Timings: ...
    @property
    def wishes(self) -> Wishes: ...
    def is_member(self) -> bool: ...
    def is_voter(self) -> bool: ...
    def alive_gen(self, name: str, generation: int) -> bool: ...
    def silent_members(self) -> list[tuple[str, Member]]: ...
    def evidence_age(self, name: str, generation: int, now: float) -> float: ...
    def last_evidence(self, name: str, generation: int) -> float: ...


class Attested(Protocol):
    """Did every promiser attest (target, generation) not alive and silent >= `min_age`?"""

    def __call__(self, target: str, generation: int, *, min_age: float) -> bool: ...


@dataclass(frozen=True, slots=True)
class Proposal:
    """The operations for one value, and the rmpeer requests the voters' answers refused."""

    value: Value
    refused: Mapping[str, str]


# ====================================================================== what to propose


def intents(view: CoreView, now: float) -> list[Intent]:
    """What this node would like decided next, from its own (possibly stale) view."""
    cluster = view.cluster
    assert cluster is not None
    wishes = view.wishes
    if view.left:
        return []
    if not view.is_member():
        return [] if wishes.leaving else [Intent(IntentKind.JOIN)]
    if wishes.leaving:
        return [Intent(IntentKind.LEAVE)]
    wanted: list[Intent] = []
    if wishes.blocks > 0 and cluster.has_free_block():
        wanted.append(Intent(IntentKind.CLAIM))
    for name, removal in wishes.removals.items():
        wanted.append(Intent(IntentKind.RMPEER, name, removal.generation, removal.force))
    if view.is_voter():
        wanted.extend(voter_intents(view, cluster, now))
    if now >= view.lease_until - view.lease / 2:
        wanted.append(Intent(IntentKind.RENEW))  # last: any other op of ours renews the lease too
    return wanted


def voter_intents(view: CoreView, cluster: ClusterState, now: float) -> list[Intent]:
    """A voter's housekeeping: remove members whose node the orchestrator deleted, reclaim the
    long silent, demote silent voters, free quarantines whose owner is silent for a lease,
    promote a live member while V has room."""
    wanted: list[Intent] = []
    for name, member in view.silent_members():
        if name in view.wishes.removals:
            continue
        if view.wishes.deleted.get(name) == member.generation:
            wanted.append(Intent(IntentKind.DELETED, name, member.generation))
            continue
        age = view.evidence_age(name, member.generation, now)
        if view.reclaim_after is not None and age >= view.reclaim_after:
            wanted.append(Intent(IntentKind.RECLAIM, name, member.generation))
        elif name in cluster.voters and age >= view.timings.voter_replace_after:
            wanted.append(Intent(IntentKind.DEMOTE, name, member.generation))
    for owner, generation in {(q.owner, q.generation) for q in cluster.quarantine.values()}:
        if view.evidence_age(owner, generation, now) >= view.lease:
            wanted.append(Intent(IntentKind.FREE, owner, generation))
    leaving = sum(1 for intent in wanted if intent.kind in LEAVES_VOTERS)
    if len(cluster.voters) - leaving < cluster.max_voters:
        candidates = sorted(  # alive *as that generation*: it can keep its promises
            name
            for name, member in cluster.members.items()
            if name not in cluster.voters and view.alive_gen(name, member.generation)
        )
        if candidates:
            wanted.append(Intent(IntentKind.PROMOTE, candidates[0]))
    return wanted


def voter_deadlines(view: CoreView, cluster: ClusterState) -> list[float]:
    """When `voter_intents` could next want something new (the silences it waits for)."""
    times: list[float] = []
    for name, member in view.silent_members():
        last = view.last_evidence(name, member.generation)
        if view.reclaim_after is not None:
            times.append(last + view.reclaim_after)
        if name in cluster.voters:
            times.append(last + view.timings.voter_replace_after)
    for q in cluster.quarantine.values():
        times.append(view.last_evidence(q.owner, q.generation) + view.lease)
    return times


def with_questions(wanted: list[Intent]) -> tuple[list[Intent], tuple[tuple[str, int], ...]]:
    """The intents one round carries, and the questions its PREPARE asks the voters.

    An intent whose question does not fit (`wire.MAX_ASKS`) waits for a later round.
    """
    asks: list[tuple[str, int]] = []
    kept: list[Intent] = []
    for intent in wanted:
        question = intent.question
        if question is not None and question not in asks:
            if len(asks) == wire.MAX_ASKS:
                continue
            asks.append(question)
        kept.append(intent)
    return kept, tuple(asks)


def retry_pause(timings: Timings, attempts: int, timed_out: bool, rng: random.Random) -> float:
    """How long a proposer waits after its `attempts`-th failed round in a row.

    Random, so competing proposers stop colliding; longer after timeouts (no quorum answers).
    """
    limit = timings.retry_max if timed_out else timings.backoff_max
    ceiling: float = min(limit, timings.resend_interval * 2 ** min(attempts, 16))
    return rng.uniform(0.1, 1.0) * ceiling


# ====================================================================== intents become a value


@dataclass(slots=True)
class _Building:
    view: CoreView
    attested: Attested
    nonce: Callable[[], int]
    ops: list[Op] = field(default_factory=list)  # taken into the value so far
    refused: dict[str, str] = field(default_factory=dict)

    @property
    def generation(self) -> int:
        return self.view.generation or 0


def _join(intent: Intent, b: _Building) -> Op | None:
    return Join(b.view.name, b.nonce())


def _leave(intent: Intent, b: _Building) -> Op | None:
    return Leave(b.view.name, b.generation, b.nonce())


def _renew(intent: Intent, b: _Building) -> Op | None:
    return None if b.ops else Renew(b.view.name, b.generation, b.nonce())


def _claim(intent: Intent, b: _Building) -> Op | None:
    cluster = b.view.cluster
    assert cluster is not None
    wanted = min(b.view.wishes.blocks, MAX_BLOCKS_PER_CLAIM)
    blocks = cluster.first_free_blocks(wanted) if wanted > 0 else []
    return Claim(b.view.name, b.generation, b.nonce(), tuple(blocks)) if blocks else None


def _rmpeer(intent: Intent, b: _Building) -> Op | None:
    target, generation = intent.target, intent.generation
    if intent.force:
        return Remove(b.view.name, b.nonce(), target, generation, FORCED_REMOVAL, True)
    if b.attested(target, generation, min_age=0.0):
        free_now = b.attested(target, generation, min_age=b.view.lease)
        return Remove(b.view.name, b.nonce(), target, generation, "rmpeer", free_now)
    b.refused[target] = (
        f"rmpeer {target} refused: a voter still sees it alive; stop it first, or use --force "
        "if you know it is gone for good"
    )
    log.warning("%s", b.refused[target])
    return None


def _deleted(intent: Intent, b: _Building) -> Op | None:
    target, generation = intent.target, intent.generation
    if b.attested(target, generation, min_age=0.0):
        free_now = b.attested(target, generation, min_age=b.view.lease)
        return Remove(b.view.name, b.nonce(), target, generation, NODE_DELETED, free_now)
    return None  # a voter still sees it alive: asked again while this node sees it dead


def _reclaim(intent: Intent, b: _Building) -> Op | None:
    reclaim_after = b.view.reclaim_after
    assert reclaim_after is not None
    if b.attested(intent.target, intent.generation, min_age=reclaim_after):
        return Remove(b.view.name, b.nonce(), intent.target, intent.generation, "reclaim", True)
    return None


def _free(intent: Intent, b: _Building) -> Op | None:
    if b.attested(intent.target, intent.generation, min_age=b.view.lease):
        return Free(b.view.name, b.nonce(), intent.target, intent.generation)
    return None


def _demote(intent: Intent, b: _Building) -> Op | None:
    if b.attested(intent.target, intent.generation,
                  min_age=b.view.timings.voter_replace_after):
        return Demote(b.view.name, b.nonce(), intent.target)
    return None


def _promote(intent: Intent, b: _Building) -> Op | None:
    return Promote(b.view.name, b.nonce(), intent.target)


BUILDERS: Mapping[IntentKind, Callable[[Intent, _Building], Op | None]] = MappingProxyType({
    IntentKind.JOIN: _join,
    IntentKind.LEAVE: _leave,
    IntentKind.CLAIM: _claim,
    IntentKind.RMPEER: _rmpeer,
    IntentKind.DELETED: _deleted,
    IntentKind.RECLAIM: _reclaim,
    IntentKind.DEMOTE: _demote,
    IntentKind.FREE: _free,
    IntentKind.PROMOTE: _promote,
    IntentKind.RENEW: _renew,
})


def build_value(
    wanted: list[Intent], view: CoreView, attested: Attested, nonce: Callable[[], int]
) -> Proposal:
    """Turn a round's intents into operations, keeping only what the attestations allow.

    `nonce()` gives each operation its nonce (the core notes when it was created: a lease
    runs from then). The value stops at `MAX_OPS_PER_VALUE` operations or `VALUE_BUDGET` bytes.
    """
    building = _Building(view, attested, nonce)
    for intent in wanted:
        op = BUILDERS[intent.kind](intent, building)
        if op is None:
            continue
        candidate = (*building.ops, op)
        if len(candidate) > MAX_OPS_PER_VALUE or value_size(candidate) > VALUE_BUDGET:
            break
        building.ops.append(op)
    return Proposal(tuple(building.ops), MappingProxyType(building.refused))


def value_size(value: Value) -> int:
    packed: bytes = msgpack.packb(value_to_plain(value), use_bin_type=True)
    return len(packed)
