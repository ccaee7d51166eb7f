"""The IPAM core: who owns which pod block, decided slot by slot, as a sans-IO state machine.

Theory of operation
-------------------
The cluster state (`state.ClusterState`) moves through slots s1, s2, ... Slot n+1 is decided
by single-decree Paxos among the voters V of s(n); any node may propose (it must know s(n)),
a voter takes part only while its own decided state is exactly s(n). Because the acceptor set
of every slot is fixed by the decided state before it, changing V needs no joint consensus:
each slot is an independent Paxos instance with a known, fixed set of acceptors.

Ownership is safe while a node is alive but cut off thanks to *leases proven through the log*:

* Every operation names its origin. A voter that applies a decided operation of origin X
  (or adopts a state in which X acted since its last state) records "evidence" of X at that
  moment; gossip's "alive" is evidence too. On (re)start, or on adopting a new era, evidence
  of everybody is "now": a voter's evidence age never overstates how long X has been silent.
* When X's own operation, created at time t0, is decided, X holds a lease until
  t0 + lease * LEASE_SAFETY and may hand out addresses from its blocks until then.
* X's blocks become free for others only through a value created after a majority of V
  attested "X silent for >= lease" (auto reclaim needs >= reclaim_after >= lease), each from a
  voter whose decided state includes X's last operation. So the freeing value was created at
  least `lease` after t0, when X's lease had already run out. A lease is never carried across
  a restart (monotonic clocks do not survive one); a restarted node renews first.

Everything else is policy for liveness: who proposes reclaims (voters, once their own view
allows it), demotion of voters that stay dead, promotion of live members, bootstrap, and
randomised back-off between competing proposers. None of it can break the rules above.

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

import logging
import math
import random
from collections import Counter, OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack

from weavepy.ipam import wire
from weavepy.ipam.blocks import BlockSpace, IPNetwork
from weavepy.ipam.errors import ConfigError, IpamDecodeError, RmpeerError
from weavepy.ipam.state import (
    FENCE_OWNER,
    MAX_BLOCKS_PER_CLAIM,
    MAX_OPS_PER_VALUE,
    Claim,
    ClusterState,
    Demote,
    Free,
    Join,
    Leave,
    Op,
    Promote,
    Remove,
    Renew,
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
    MemberView,
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
VALUE_BUDGET = 1100  # bytes of msgpack for one value, so PROMISE/ACCEPT stay under 2 KiB
RECENT_VALUES = 64  # decided values kept in memory to catch laggards up without a full state
MAX_CATCH_UP_VALUES = 8
MAX_NONCES = 128

Bootstrap = Literal["found", "join"]


@dataclass(frozen=True, slots=True)
class Timings:
    """Protocol pacing. Defaults suit production; tests scale them down."""

    voter_replace_after: float = 600.0  # a voter dead this long is demoted (keeps its blocks)
    round_timeout: float = 3.0  # give up a Paxos round after this long
    resend_interval: float = 0.5  # re-send PREPARE/ACCEPT to silent voters this often
    backoff_max: float = 2.0  # random back-off ceiling after losing a round to another proposer
    retry_max: float = 30.0  # back-off ceiling after rounds that time out (no quorum answers)
    idle_retry: float = 5.0  # retry a round that produced nothing (attestations said no)
    hello_interval: float = 2.0  # a stateless node announces itself this often
    elect_after: float = 5.0  # stateless nodes that only see each other wait this long
    state_reply_interval: float = 1.0  # at most one full state per peer per interval


@dataclass(slots=True)
class _Intent:
    kind: str  # join renew claim rmpeer reclaim free demote promote leave
    target: str = ""
    generation: int = 0
    force: bool = False


@dataclass(slots=True)
class _Round:
    slot: int
    ballot: Ballot
    acceptors: tuple[str, ...]
    majority: int
    intents: list[_Intent]
    asks: tuple[tuple[str, int], ...]
    deadline: float
    resend_at: float
    phase: str = "prepare"
    promises: dict[str, Promise] = field(default_factory=dict)
    accepted_by: set[str] = field(default_factory=set)
    value: Value = ()


TAG_KEY = "ipam"  # the gossip meta tag carrying `IpamCore.meta_tag`
_CURRENT = 2**62  # slot of a standing learned from gossip tags: as current as it gets


@dataclass(frozen=True, slots=True)
class _Standing:
    """What a peer's latest process last told us it is."""

    boot: int
    cluster_id: str  # "" when it has no cluster state
    generation: int  # 0 when it is not a member
    slot: int  # its decided slot then


@dataclass(slots=True)
class _RmpeerRequest:
    generation: int
    force: bool


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
        self._rng = rng
        self._boot = rng.getrandbits(62)
        self._reclaim_after = reclaim_after
        self._lease = lease
        self._max_voters = max_voters
        self._bootstrap: Bootstrap = bootstrap
        self._found_alone_after = found_alone_after
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
        self._lease_until = -math.inf
        self._lease_was_valid = False
        self._nonces: OrderedDict[int, float] = OrderedDict()
        self._recent: OrderedDict[int, Value] = OrderedDict()
        self._round: _Round | None = None
        self._max_round = 0
        self._attempts = 0
        self._backoff_until = -math.inf
        self._want_blocks = 0
        self._leaving = False
        self._rmpeer: dict[str, _RmpeerRequest] = {}
        self._rmpeer_refusals: dict[str, str] = {}
        self._stateless_peers: dict[str, float] = {}
        self._first_stateless_seen: float | None = None
        self._last_contact = -math.inf
        self._foreign_seen = False
        self._hello_due = -math.inf
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
        self._after_input(now)

    def on_member_dead(self, name: str, now: float) -> None:
        """Gossip declared `name` failed or left."""
        self._begin(now)
        if name != self._name:
            self._alive.discard(name)
            self._gossip_seen[name] = now
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
            return wire.encode(Envelope("", (0, "", 0), self._name, self._boot, 0, 0, Hello(0)))
        return wire.encode(self._envelope(StateMsg(self._cluster)))

    def request_block(self, now: float, count: int = 1) -> IpamState:
        """The allocator wants `count` blocks more than it holds now (0 withdraws the wish).

        Returns the state right now; the claim is decided in the background and announced
        by a BlockAcquired event.
        """
        self._begin(now)
        if count < 0:
            raise ValueError(f"cannot want {count} blocks")
        self._want_blocks = count
        self._after_input(now)
        return self._state_and_detail(now)[0]

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
        if cluster is None or not self._is_member():
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
            self._rmpeer[name] = _RmpeerRequest(generation, force)
            self._rmpeer_refusals.pop(name, None)
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

    def leave(self, now: float) -> None:
        """Give our blocks back and leave the cluster (for `weavepy reset` on a live cluster)."""
        self._begin(now)
        self._leaving = True
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
        if self._cluster is None or not self._is_member():
            return []
        return self._cluster.blocks_of(self._name)

    def usable_blocks(self, now: float) -> list[int]:
        """Indices of blocks we may hand addresses out of right now (held and leased)."""
        return self.held_blocks() if self._lease_valid(now) else []

    def status(self, now: float) -> IpamStatus:
        self._begin(now)
        state, detail = self._state_and_detail(now)
        cluster = self._cluster
        block = self._space.block
        if cluster is None:
            return IpamStatus(
                node=self._name,
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
                total_blocks=self._space.count,
                free_blocks=self._space.count,
                quarantined_blocks=0,
                unreachable_owners=(),
                pending_block_requests=self._want_blocks,
                cluster_mismatches=tuple(self._mismatches.values()),
                dropped=dict(self._drops),
            )
        members = []
        unreachable = []
        for member_name, member in sorted(cluster.members.items()):
            alive = member_name == self._name or member_name in self._alive
            owned = cluster.blocks_of(member_name)
            reclaim_in = None
            if not alive and self._reclaim_after is not None:
                age = self._evidence_age(member_name, member.generation, now)
                reclaim_in = max(0.0, self._reclaim_after - age)
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
                )
            )
        held = tuple(block(i) for i in self.held_blocks())
        lease_ok = self._lease_valid(now)
        return IpamStatus(
            node=self._name,
            state=state,
            detail=detail,
            cluster_id=cluster.cluster_id,
            era=cluster.era,
            slot=cluster.slot,
            generation=self._my_gen,
            voters=cluster.voters,
            voters_reachable=self._voters_reachable(),
            quorum=cluster.majority(),
            lease_remaining=(self._lease_until - now) if lease_ok else None,
            owned_blocks=held if lease_ok else (),
            held_blocks=held,
            members=tuple(members),
            total_blocks=self._space.count,
            free_blocks=len(cluster.free_blocks()),
            quarantined_blocks=len(cluster.quarantine),
            unreachable_owners=tuple(unreachable),
            pending_block_requests=self._want_blocks,
            cluster_mismatches=tuple(self._mismatches.values()),
            dropped=dict(self._drops),
        )

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
                self._on_stateless_hello(sender, now)
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
        elif isinstance(body, StateRequest):
            self._send_state(sender, now)
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
        if not self._is_voter():
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
            Attestation(name, gen, self._alive_gen(name, gen), self._evidence_age(name, gen, now))
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
        intents = self._intents(now)
        if not intents:
            return
        asks: list[tuple[str, int]] = []
        kept: list[_Intent] = []
        for intent in intents:
            if intent.kind in ("rmpeer", "reclaim", "free", "demote") and not intent.force:
                key = (intent.target, intent.generation)
                if key not in asks:
                    if len(asks) == wire.MAX_ASKS:
                        continue
                    asks.append(key)
            kept.append(intent)
        self._max_round += 1
        round_ = _Round(
            slot=cluster.slot + 1,
            ballot=(self._max_round, self._name, self._boot),
            acceptors=cluster.voters,
            majority=cluster.majority(),
            intents=kept,
            asks=tuple(asks),
            deadline=now + self._t.round_timeout,
            resend_at=now + self._t.resend_interval,
        )
        self._round = round_
        for voter in round_.acceptors:
            self._send(voter, Prepare(round_.slot, round_.ballot, round_.asks))

    def _resend(self, round_: _Round, now: float) -> None:
        round_.resend_at = now + self._t.resend_interval
        for voter in round_.acceptors:
            if round_.phase == "prepare" and voter not in round_.promises:
                self._send(voter, Prepare(round_.slot, round_.ballot, round_.asks))
            elif round_.phase == "accept" and voter not in round_.accepted_by:
                self._send(voter, Accept(round_.slot, round_.ballot, round_.value))

    def _fail_round(
        self, now: float, pause: float | None = None, *, timed_out: bool = False
    ) -> None:
        self._round = None
        self._attempts += 1
        if pause is None:
            limit = self._t.retry_max if timed_out else self._t.backoff_max
            ceiling = min(limit, self._t.resend_interval * 2 ** min(self._attempts, 16))
            pause = self._rng.uniform(0.1, 1.0) * ceiling
        self._backoff_until = now + pause

    def _on_promise(self, sender: str, body: Promise, now: float) -> None:
        round_ = self._round
        if (
            round_ is None
            or round_.phase != "prepare"
            or body.slot != round_.slot
            or body.ballot != round_.ballot
            or sender not in round_.acceptors
        ):
            return
        round_.promises[sender] = body
        if len(round_.promises) < round_.majority:
            return
        accepted = [p.accepted for p in round_.promises.values() if p.accepted is not None]
        if accepted:
            value = max(accepted, key=lambda item: item[0])[1]  # Paxos: finish what may be chosen
        else:
            value = self._build_value(round_, now)
        if not value:
            self._fail_round(now, pause=self._t.idle_retry)
            return
        round_.value = value
        round_.phase = "accept"
        round_.deadline = now + self._t.round_timeout
        round_.resend_at = now + self._t.resend_interval
        for voter in round_.acceptors:
            self._send(voter, Accept(round_.slot, round_.ballot, value))

    def _on_accepted(self, sender: str, body: Accepted, now: float) -> None:
        round_ = self._round
        if (
            round_ is None
            or round_.phase != "accept"
            or body.slot != round_.slot
            or body.ballot != round_.ballot
            or sender not in round_.acceptors
        ):
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

    def _intents(self, now: float) -> list[_Intent]:
        """What this node would like decided next, from its own (possibly stale) view."""
        cluster = self._cluster
        assert cluster is not None
        if self._left:
            return []
        if not self._is_member():
            return [] if self._leaving else [_Intent("join")]
        if self._leaving:
            return [_Intent("leave")]
        intents: list[_Intent] = []
        if self._want_blocks > 0 and cluster.first_free_blocks(1):
            intents.append(_Intent("claim"))
        for name, request in self._rmpeer.items():
            intents.append(_Intent("rmpeer", name, request.generation, request.force))
        if self._is_voter():
            intents.extend(self._voter_intents(cluster, now))
        if now >= self._lease_until - self._lease / 2:
            intents.append(_Intent("renew"))  # last: any other op of ours renews the lease too
        return intents

    def _voter_intents(self, cluster: ClusterState, now: float) -> list[_Intent]:
        intents: list[_Intent] = []
        for name, member in cluster.members.items():
            if (
                name == self._name
                or name in self._rmpeer
                or self._alive_gen(name, member.generation)
            ):
                continue
            age = self._evidence_age(name, member.generation, now)
            if self._reclaim_after is not None and age >= self._reclaim_after:
                intents.append(_Intent("reclaim", name, member.generation))
            elif name in cluster.voters and age >= self._t.voter_replace_after:
                intents.append(_Intent("demote", name, member.generation))
        for owner, generation in {(q.owner, q.generation) for q in cluster.quarantine.values()}:
            if self._evidence_age(owner, generation, now) >= self._lease:
                intents.append(_Intent("free", owner, generation))
        demoting = sum(1 for intent in intents if intent.kind in ("demote", "reclaim"))
        if len(cluster.voters) - demoting < cluster.max_voters:
            candidates = sorted(  # alive *as that generation*: it can keep its promises
                name
                for name, member in cluster.members.items()
                if name not in cluster.voters and self._alive_gen(name, member.generation)
            )
            if candidates:
                intents.append(_Intent("promote", candidates[0]))
        return intents

    def _build_value(self, round_: _Round, now: float) -> Value:
        """Turn intents into operations, keeping only what the promisers' attestations allow."""
        cluster = self._cluster
        assert cluster is not None
        promises = list(round_.promises.values())

        def attested(target: str, generation: int, *, min_age: float, dead: bool = True) -> bool:
            answers = [
                a
                for p in promises
                for a in p.answers
                if a.name == target and a.generation == generation
            ]
            return len(answers) == len(promises) and all(
                a.evidence_age >= min_age and (not dead or not a.alive) for a in answers
            )

        def nonce() -> int:
            value = self._rng.getrandbits(62)
            self._nonces[value] = now
            while len(self._nonces) > MAX_NONCES:
                self._nonces.popitem(last=False)
            return value

        ops: list[Op] = []
        generation = self._my_gen or 0
        for intent in round_.intents:
            op: Op | None = None
            if intent.kind == "join":
                op = Join(self._name, nonce())
            elif intent.kind == "leave":
                op = Leave(self._name, generation, nonce())
            elif intent.kind == "renew":
                if not ops:
                    op = Renew(self._name, generation, nonce())
            elif intent.kind == "claim":
                wanted = min(self._want_blocks, MAX_BLOCKS_PER_CLAIM)
                blocks = cluster.first_free_blocks(wanted) if wanted > 0 else []
                if blocks:
                    op = Claim(self._name, generation, nonce(), tuple(blocks))
            elif intent.kind == "rmpeer":
                if intent.force:
                    op = Remove(
                        self._name, nonce(), intent.target, intent.generation, "rmpeer-force", True
                    )
                elif attested(intent.target, intent.generation, min_age=0.0):
                    free_now = attested(intent.target, intent.generation, min_age=self._lease)
                    op = Remove(
                        self._name, nonce(), intent.target, intent.generation, "rmpeer", free_now
                    )
                else:
                    self._rmpeer.pop(intent.target, None)
                    self._rmpeer_refusals[intent.target] = (
                        f"rmpeer {intent.target} refused: a voter still sees it alive; stop it "
                        "first, or use --force if you know it is gone for good"
                    )
                    log.warning("%s", self._rmpeer_refusals[intent.target])
            elif intent.kind == "reclaim":
                assert self._reclaim_after is not None
                if attested(intent.target, intent.generation, min_age=self._reclaim_after):
                    op = Remove(
                        self._name, nonce(), intent.target, intent.generation, "reclaim", True
                    )
            elif intent.kind == "free":
                if attested(intent.target, intent.generation, min_age=self._lease):
                    op = Free(self._name, nonce(), intent.target, intent.generation)
            elif intent.kind == "demote":
                if attested(intent.target, intent.generation, min_age=self._t.voter_replace_after):
                    op = Demote(self._name, nonce(), intent.target)
            elif intent.kind == "promote":
                op = Promote(self._name, nonce(), intent.target)
            if op is None:
                continue
            candidate = (*ops, op)
            if len(candidate) > MAX_OPS_PER_VALUE or _value_size(candidate) > VALUE_BUDGET:
                break
            ops.append(op)
        return tuple(ops)

    # ================================================================== learner

    def _on_decided(self, sender: str, body: Decided, now: float) -> None:
        cluster = self._cluster
        assert cluster is not None
        if body.slot == cluster.slot + 1:
            self._learn(body.slot, body.value, now, proposed_here=False)
        elif body.slot > cluster.slot + 1:
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
                    self._want_blocks = max(0, self._want_blocks - len(op.blocks))
                elif isinstance(op, Leave) and outcome.applied:
                    self._my_gen = None
                    self._left = True
            if isinstance(op, Remove | Leave) and outcome.applied:
                target = op.target if isinstance(op, Remove) else op.origin
                generation = op.target_generation if isinstance(op, Remove) else op.generation
                reason = op.reason if isinstance(op, Remove) else "left"
                self._rmpeer.pop(target, None)
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
        if mine_decided and self._is_member():
            self._lease_until = max(
                self._lease_until, max(mine_decided) + self._lease * LEASE_SAFETY
            )
        self._emit(SlotDecided(cluster.era, slot, value, proposed_here, voters_before))
        self._prune_evidence()
        if self._round is not None and self._round.slot <= cluster.slot:
            self._round = None
            self._backoff_until = -math.inf
        self._after_state_change(now, held_before, "decided")

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
        self._cluster = state
        self._promised = None
        self._accepted = None
        if self._round is not None and self._round.slot <= state.slot:
            self._round = None
            self._backoff_until = -math.inf
        for name in list(self._rmpeer):
            if state.generation_of(name) != self._rmpeer[name].generation:
                del self._rmpeer[name]
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
            self._want_blocks = max(0, self._want_blocks - len(held_after - held_before))
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
            self._send_stateless(peer, Hello(0))
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
        report = ClusterMismatchReport(peer, local, remote, message)
        if self._mismatches.get(peer) != report:
            self._mismatches[peer] = report
            log.error("%s", message)
            self._emit(ClusterMismatch(peer, local, remote, message))

    # ================================================================== bootstrap

    def _on_stateless_hello(self, sender: str, now: float) -> None:
        if self._cluster is not None:
            self._send_state(sender, now)
            return
        self._stateless_peers[sender] = now
        if self._first_stateless_seen is None:
            self._first_stateless_seen = now

    def _bootstrap_step(self, now: float) -> None:
        assert self._started is not None
        if self._bootstrap == "found":
            self._found(now, "launched with no peers")
            return
        if (
            self._found_alone_after is not None
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
            and self._first_stateless_seen is not None
            and not self._foreign_seen
            and now - self._first_stateless_seen >= self._t.elect_after
            and self._name < min(recent)
        ):
            self._found(now, f"lowest name among stateless peers {sorted(recent)}")
            return
        if now >= self._hello_due:
            self._hello_due = now + self._t.hello_interval
            self._send_stateless(None, Hello(0))

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
        self._promised = None
        self._accepted = None
        self._round = None
        self._rmpeer.clear()
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
                "rmpeer-force",
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
        valid = self._lease_valid(now)
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
            if self._bootstrap == "found":
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
            elif self._backoff_until > now and self._intents(now):
                times.append(self._backoff_until)
            if self._is_member():
                if math.isfinite(self._lease_until):
                    times += [self._lease_until - self._lease / 2, self._lease_until]
                if self._is_voter():
                    times += self._voter_thresholds(cluster)
        future = [t for t in times if t > now]
        return min(future) if future else None

    def _voter_thresholds(self, cluster: ClusterState) -> list[float]:
        times: list[float] = []
        for name, member in cluster.members.items():
            if name == self._name or self._alive_gen(name, member.generation):
                continue
            last = self._last_evidence(name, member.generation)
            if self._reclaim_after is not None:
                times.append(last + self._reclaim_after)
            if name in cluster.voters:
                times.append(last + self._t.voter_replace_after)
        for q in cluster.quarantine.values():
            times.append(self._last_evidence(q.owner, q.generation) + self._lease)
        return times

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

    def _is_member(self) -> bool:
        cluster = self._cluster
        return (
            cluster is not None
            and self._my_gen is not None
            and cluster.generation_of(self._name) == self._my_gen
        )

    def _is_voter(self) -> bool:
        cluster = self._cluster
        return cluster is not None and self._is_member() and self._name in cluster.voters

    def _lease_valid(self, now: float) -> bool:
        return self._is_member() and now < self._lease_until

    def _alive_gen(self, name: str, generation: int) -> bool:
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

    def _last_evidence(self, name: str, generation: int) -> float:
        last = max(self._floor, self._gen_evidence.get((name, generation), -math.inf))
        if self._gossip_applies(name, generation):
            last = max(last, self._gossip_seen.get(name, -math.inf))
        return last

    def _evidence_age(self, name: str, generation: int, now: float) -> float:
        if self._alive_gen(name, generation):
            return 0.0
        return max(0.0, now - self._last_evidence(name, generation))

    def _voters_reachable(self) -> int:
        """Voters that gossip sees alive and that still speak as the voting generation."""
        cluster = self._cluster
        if cluster is None:
            return 0
        count = 0
        for voter in cluster.voters:
            if voter == self._name:
                count += self._is_voter()
            else:
                generation = cluster.generation_of(voter)
                count += generation is not None and self._alive_gen(voter, generation)
        return count

    def _quorum_reachable(self) -> bool:
        cluster = self._cluster
        return cluster is not None and self._voters_reachable() >= cluster.majority()

    def _state_and_detail(self, now: float) -> tuple[IpamState, str]:
        cluster = self._cluster
        if cluster is None:
            how = {
                "found": "founding a new cluster",
                "join": "waiting to hear from a cluster member (launched with peers)",
            }[self._bootstrap]
            if self._foreign_seen:
                how = "only heard from clusters with a different range; see cluster_mismatches"
            return IpamState.WAITING_FOR_CLUSTER, how
        if not self._is_member():
            if self._left:
                return IpamState.JOINING, "left the cluster; run `weavepy reset` to rejoin"
            tomb = cluster.tombstones.get(self._name)
            why = f" (was removed: {tomb.reason})" if tomb and self._my_gen is None else ""
            reachable = self._voters_reachable()
            if reachable < cluster.majority():
                return IpamState.JOINING, (
                    f"cannot join{why}: {reachable} of voters {', '.join(cluster.voters)} "
                    "reachable; if they are gone for good, run `weavepy reset` on this node and "
                    "point it at a live cluster"
                )
            return IpamState.JOINING, f"asking the voters to admit this node{why}"
        lease_ok = self._lease_valid(now)
        if not self._quorum_reachable():
            reach = f"{self._voters_reachable()} of {len(cluster.voters)} voters reachable"
            if lease_ok:
                return IpamState.MINORITY_PARTITION, (
                    f"{reach}: no new blocks; own blocks usable for "
                    f"{self._lease_until - now:.0f}s more (lease)"
                )
            return IpamState.MINORITY_PARTITION, (
                f"{reach}: lease ended, no new addresses until a majority is back"
            )
        if not lease_ok:
            return IpamState.WAITING_FOR_QUORUM, "renewing this node's lease with the voters"
        if self._want_blocks > 0 and not cluster.first_free_blocks(1):
            unreachable = sorted(
                n
                for n in cluster.members
                if n != self._name and n not in self._alive and cluster.blocks_of(n)
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
                    f"{self._reclaim_after}s, or use `weavepy rmpeer NAME` if they are dead"
                )
            return IpamState.OUT_OF_SPACE, (
                f"all {self._space.count} blocks of {self._space.cluster_range} are in use"
            )
        refusals = "; ".join(self._rmpeer_refusals.values())
        return IpamState.READY, refusals or "ok"

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


def _value_size(value: Value) -> int:
    packed: bytes = msgpack.packb(value_to_plain(value), use_bin_type=True)
    return len(packed)
