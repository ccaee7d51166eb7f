"""A virtual-time simulator for IPAM cores: lossy network, gossip, disks, crashes, and checks.

This module owns the test harness the property tests (and later the chaos work) drive: N
`IpamCore` + `PodAllocator` pairs on a virtual network that drops, duplicates, delays and
reorders messages; partitions (symmetric and one-way); a gossip emulation that tells each
node, after a random detection delay, who is reachable; a "disk" per node that holds exactly
what the core asked to persist, when it asked; kills, restarts, and wipes; and operator
actions. After every event it checks invariants 1 and 2 and Paxos agreement, and it records
the ground truth (who could talk to whom, when) that the checks of invariants 3 and 4 need.

The rule it keeps: the simulator only moves bytes and time. It never reaches into a core
except through the public API an agent would use.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from weavepy.ipam.allocator import Allocation, PodAllocator
from weavepy.ipam.blocks import IPAddress, IPNetwork
from weavepy.ipam.core import Bootstrap, IpamCore
from weavepy.ipam.errors import RmpeerError
from weavepy.ipam.invariants import InvariantChecker, InvariantViolation
from weavepy.ipam.liveness import Timings
from weavepy.ipam.report import describe
from weavepy.ipam.state import ClusterState, Remove
from weavepy.ipam.status import (
    BlockLost,
    ClusterJoined,
    Event,
    IpamState,
    IpamStatus,
    MemberRemoved,
    RemovedFromCluster,
    SlotDecided,
)
from weavepy.ipam.wire import Kind, kind_of


def sim_timings() -> Timings:
    return Timings(
        voter_replace_after=40.0,
        round_timeout=1.0,
        resend_interval=0.25,
        backoff_max=0.5,
        retry_max=6.0,
        idle_retry=2.0,
        hello_interval=1.0,
        elect_after=3.0,
        state_reply_interval=0.5,
    )


@dataclass(frozen=True, slots=True)
class SimConfig:
    cluster_range: str = "198.19.0.0/16"
    block_prefix: int = 24
    reclaim_after: float = 300.0
    lease: float = 60.0
    max_voters: int = 5
    timings: Timings = field(default_factory=sim_timings)
    drop: float = 0.05
    duplicate: float = 0.03
    delay: tuple[float, float] = (0.001, 0.03)
    slow_fraction: float = 0.05  # this share of messages is delayed much more (reordering)
    slow_delay: tuple[float, float] = (0.2, 1.5)
    gossip_delay: tuple[float, float] = (0.2, 1.5)
    pushpull_interval: float = 10.0
    max_events_per_run: int = 2_000_000
    # True: record who could talk to whom, per pair, for the timing checks of invariants 3 and
    # 4 (O(n^2) per decision), check invariant 1 over every node after every input, and write
    # each node's snapshot to its disk whenever its core asks. Scale runs (no partitions) turn
    # it off: no contact history (partitions refuse), invariant 1 is checked after the inputs
    # that grow a node's blocks (the only way to make an overlap), and a disk is written when
    # it is next read (see `_persist`: O(members) per decision per node is each agent's own
    # cost, but the simulator would pay it for every node).
    full_checks: bool = True


@dataclass(slots=True)
class SimNode:
    name: str
    bootstrap: Bootstrap
    found_alone_after: float | None = None
    founding: dict[str, Any] = field(default_factory=dict)  # found_quorum / founders
    core: IpamCore | None = None
    allocator: PodAllocator | None = None
    disk_core: dict[str, Any] | None = None
    unwritten_seq: int | None = None  # persisted, not yet written to disk_core (scale runs)
    disk_alloc: dict[str, Any] | None = None
    incarnation: int = 0
    destroyed: bool = False
    timer_at: float | None = None
    views: dict[str, tuple[bool, str | None]] = field(default_factory=dict)  # gossip told
    tag: str | None = None  # the ipam tag gossip last published for this node
    foreign_contacts: set[str] = field(default_factory=set)

    @property
    def running(self) -> bool:
        return self.core is not None


# (at, seq, kind, args): a plain tuple, so the heap compares in C (seq is unique: kind and args
# are never compared)
_Scheduled = tuple[float, int, str, tuple[Any, ...]]


class IpamSim:
    """Nodes, network, time, and the invariant checker."""

    def __init__(self, seed: int, config: SimConfig | None = None) -> None:
        self.seed = seed
        self.config = config or SimConfig()
        self.rng = random.Random(f"ipam-sim/{seed}")
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self.blocked: set[tuple[str, str]] = set()  # directed links that drop everything
        self.checker = InvariantChecker()
        self.events_processed = 0
        self.messages_sent = 0
        self.messages_by_kind: Counter[Kind] = Counter()  # each broadcast once per receiver
        self.messages_dropped = 0
        self.log: list[str] = []
        self._queue: list[_Scheduled] = []
        self._seq = itertools.count()
        self._pairs: dict[tuple[str, str], _PairHistory] = {}  # gossip contact, by truth
        self._owned: dict[str, tuple[str | None, frozenset[int]]] = {}  # cache, see _check_...
        self._generation_started: dict[tuple[str, str, int], float] = {}
        self._generation_ended: dict[tuple[str, str, int], float] = {}
        self._reclaims_checked: set[tuple[str, Any, int]] = set()
        self._direct: dict[tuple[str, str], float] = {}  # last time both links were up
        self._topology_changed_at = 0.0
        self._running: frozenset[str] | None = None  # cache of running names, see connected_to
        self._pod_counter = itertools.count(1)
        self.pods: dict[str, dict[tuple[str, str], IPAddress]] = {}

    # ================================================================== topology actions

    def add_node(
        self, name: str, bootstrap: Bootstrap = "join", found_alone_after: float | None = None,
        **founding: Any,
    ) -> None:
        self._add(name, bootstrap, found_alone_after, founding)
        self._topology_changed()

    def add_nodes(self, names: Iterable[str]) -> None:
        """Start joining nodes at the same moment: one topology change, so gossip tells
        everyone about all of them in one wave (a cluster booting together)."""
        for name in names:
            self._add(name, "join", None, {})
        self._topology_changed()

    def _add(self, name: str, bootstrap: Bootstrap, found_alone_after: float | None,
             founding: Mapping[str, Any]) -> None:
        if name in self.nodes:
            raise ValueError(f"node {name} exists")
        self.nodes[name] = SimNode(name, bootstrap, found_alone_after, dict(founding))
        self.pods[name] = {}
        self._start(self.nodes[name])

    def kill(self, name: str) -> None:
        node = self.nodes[name]
        if not node.running:
            return
        self._refresh_contacts()
        self._running = None
        self._write_disk(node)
        node.core = None
        node.allocator = None
        node.timer_at = None
        self._owned.pop(name, None)
        node.views.clear()
        self._note(f"kill {name}")
        self._topology_changed()

    def restart(self, name: str) -> None:
        node = self.nodes[name]
        if node.running:
            return
        self._start(node)
        core, allocator = node.core, node.allocator
        assert core is not None and allocator is not None
        # invariant 2: exactly what was persisted is back, pods included
        held_persisted = _held_from_snapshot(node.disk_core, core)
        alloc_before = dict(self.pods[name])
        alloc_after = {(a.container_id, a.ifname): a.address for a in allocator.allocations()}
        self.checker.restart_kept(
            name, held_persisted, core.status(self.now), alloc_before, alloc_after
        )
        self._topology_changed()

    def destroy(self, name: str) -> None:
        """Kill and wipe the disk: the node is gone for good (it may come back as new)."""
        self.kill(name)
        node = self.nodes[name]
        disk = node.disk_core or {}
        if disk.get("cluster") and disk.get("generation"):
            key = (disk["cluster"]["cluster_id"], name, disk["generation"])
            self._generation_ended[key] = self.now  # that generation can never speak again
        node.disk_core = None
        node.disk_alloc = None
        node.destroyed = True
        self.pods[name] = {}
        self.checker.cluster_ids.reset(name)
        self._note(f"destroy {name}")

    def rejoin(self, name: str) -> None:
        """A destroyed node comes back with an empty disk (after `weavepy reset`)."""
        node = self.nodes[name]
        if node.running or not node.destroyed:
            return
        node.destroyed = False
        node.bootstrap = "join"
        node.found_alone_after = None
        self._start(node)
        self._topology_changed()

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Cut every link between different groups (nodes in no group are isolated)."""
        self._require_full_checks("partition")
        group_of: dict[str, str] = {}
        listed = [sorted(group) for group in groups]
        for number, group in enumerate(listed):
            for name in group:
                group_of[name] = str(number)
        self._refresh_contacts()
        self.blocked = {
            (a, b)
            for a in self.nodes
            for b in self.nodes
            if a != b and group_of.get(a, "solo:" + a) != group_of.get(b, "solo:" + b)
        }
        self._note(f"partition {listed}")
        self._topology_changed()

    def block_link(self, a: str, b: str) -> None:
        """One-way cut: messages from a to b are lost."""
        self._require_full_checks("block_link")
        self._refresh_contacts()
        self.blocked.add((a, b))
        self._note(f"block {a}->{b}")
        self._topology_changed()

    def _require_full_checks(self, action: str) -> None:
        if not self.config.full_checks:
            raise ValueError(f"{action} needs SimConfig(full_checks=True): the invariant "
                             "checks need who could talk to whom")

    def heal(self) -> None:
        self._refresh_contacts()
        self.blocked.clear()
        self._note("heal")
        self._topology_changed()

    # ================================================================== operator actions

    def request_block(self, name: str, count: int = 1) -> IpamState | None:
        node = self.nodes[name]
        if node.core is None:
            return None
        state = node.core.request_block(self.now, count)
        self._after_input(node)
        return state

    def add_pod(self, name: str) -> Allocation | None:
        node = self.nodes[name]
        if node.core is None or node.allocator is None:
            return None
        key = (f"pod{next(self._pod_counter)}", "eth0")
        result = node.allocator.add(key[0], key[1], self.now)
        self._after_input(node)
        if isinstance(result, Allocation):
            self.pods[name][key] = result.address
            return result
        return None

    def del_pod(self, name: str) -> None:
        node = self.nodes[name]
        if node.allocator is None or not self.pods[name]:
            return
        key = self.rng.choice(sorted(self.pods[name]))
        node.allocator.release(*key)
        del self.pods[name][key]
        self._after_input(node)

    def rmpeer(self, at: str, target: str, force: bool = False) -> str:
        node = self.nodes[at]
        if node.core is None:
            return "not running"
        try:
            message = node.core.rmpeer(target, self.now, force)
        except RmpeerError as exc:
            message = f"refused: {exc}"
        self._note(f"rmpeer {target} at {at} force={force}: {message}")
        self._after_input(node)
        return message

    def node_deleted(self, target: str, seen_by: Iterable[str] | None = None) -> None:
        """The orchestrator deletes `target`'s node; the running nodes in `seen_by` (default:
        every running node) hear it from their API watch."""
        names = sorted(self.nodes) if seen_by is None else list(seen_by)
        for name in names:
            node = self.nodes[name]
            if node.core is not None:
                message = node.core.node_deleted(target, self.now)
                self._note(f"node {target} deleted, seen by {name}: {message}")
                self._after_input(node)

    def node_restored(self, target: str) -> None:
        """The orchestrator lists `target`'s node again (every running node hears it)."""
        for node in self.running():
            assert node.core is not None
            node.core.node_restored(target, self.now)
            self._after_input(node)

    def force_allowed(self, at: str, target: str) -> bool:
        """The documented operator rule for `rmpeer --force`, in ground-truth terms.

        The target must be down. If this node's own view lacks a quorum (so the core starts a
        new era), every member this side cannot reach must be down for good (destroyed), and
        the side must in truth hold no majority of the voters.
        """
        node = self.nodes.get(at)
        if node is None or node.core is None or target not in self.nodes:
            return False
        status = node.core.status(self.now)
        if status.cluster_id is None or status.generation is None:
            return False
        listed = {member.name: member.generation for member in status.members}
        target_status = self.status(target)
        if (
            target_status is not None
            and target_status.cluster_id == status.cluster_id
            and target_status.generation == listed.get(target)
        ):
            return False  # that generation of the target still runs (generations are slots:
            # the same number in another cluster is another node)
        if status.voters_reachable >= status.quorum:
            return True
        side = self.connected_to(at)
        members = [n for n in self.nodes.values() if _cluster_of(n) == status.cluster_id]
        if any(n.name not in side and not n.destroyed for n in members):
            return False
        return self._usable_voters(status, side) < status.quorum

    def _usable_voters(self, status: IpamStatus, among: AbstractSet[str]) -> int:
        """Voters of `status` that run (in `among`) as the generation the state lists."""
        generations = {member.name: member.generation for member in status.members}
        count = 0
        for voter in status.voters:
            core = self.nodes[voter].core if voter in self.nodes else None
            if voter in among and core is not None:  # (its status says the same, in O(members))
                count += (core.cluster_id, core.generation) == (
                    status.cluster_id, generations.get(voter))
        return count

    # ================================================================== time

    def run(self, duration: float) -> None:
        """Process every event up to now + duration (checks run after each)."""
        end = self.now + duration
        budget = self.config.max_events_per_run
        queue = self._queue
        while queue and queue[0][0] <= end:
            item = heapq.heappop(queue)
            self.now = max(self.now, item[0])
            self._handle(item)
            budget -= 1
            if budget <= 0:
                raise RuntimeError(
                    f"simulation did not settle: {self.config.max_events_per_run} "
                    f"events before t={end}"
                )
        self.now = end

    def settled_view(self) -> bool:
        """True once gossip has had time to notice the last topology change."""
        return self.now - self._topology_changed_at > self.config.gossip_delay[1] + 0.1

    # ================================================================== queries

    def running(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.running]

    def status(self, name: str) -> IpamStatus | None:
        core = self.nodes[name].core
        return core.status(self.now) if core else None

    def state(self, name: str) -> IpamState | None:
        """The node's state word alone: what `status(name).state` says, without rendering
        every member (O(voters), not O(members); a scale run polls it for every node)."""
        core = self.nodes[name].core
        return describe(core, self.now)[0] if core else None

    def usable_blocks(self, name: str) -> list[int]:
        """Indices of the blocks the node may hand addresses out of now (`owned_blocks`)."""
        core = self.nodes[name].core
        return core.usable_blocks(self.now) if core else []

    def statuses(self) -> list[IpamStatus]:
        return [n.core.status(self.now) for n in self.running() if n.core is not None]

    def connected_to(self, name: str) -> frozenset[str]:
        """Running nodes gossip can reach from `name` (itself included), by ground truth."""
        if not self.nodes[name].running:
            return frozenset()
        if not self.blocked:  # one component: every running node
            if self._running is None:
                self._running = frozenset(n for n, node in self.nodes.items() if node.running)
            return self._running
        seen = {name}
        frontier = [name]
        while frontier:
            a = frontier.pop()
            for b, other in self.nodes.items():
                if b not in seen and other.running and self._both_ways(a, b):
                    seen.add(b)
                    frontier.append(b)
        return frozenset(seen)

    def check_status_invariants(self) -> None:
        """Invariant 1 over full statuses, 3 (what nodes say) once gossip settled, and 6."""
        statuses = self.statuses()
        self.checker.no_overlap(statuses)
        for status in statuses:
            self.checker.cluster_id(status.node, status.cluster_id)
        if not self.settled_view():
            return
        for status in statuses:
            side = self.connected_to(status.node)
            self.checker.minority_reported(status, self._usable_voters(status, side))

    # ================================================================== internals: nodes

    def _start(self, node: SimNode) -> None:
        self._running = None
        node.incarnation += 1
        rng = random.Random(f"{self.seed}/{node.name}/{node.incarnation}")
        cfg = self.config
        node.core = IpamCore(
            node.name,
            cfg.cluster_range,
            cfg.block_prefix,
            rng=rng,
            reclaim_after=cfg.reclaim_after,
            lease=cfg.lease,
            max_voters=cfg.max_voters,
            bootstrap=node.bootstrap,
            found_alone_after=node.found_alone_after,
            **node.founding,
            timings=cfg.timings,
            snapshot=node.disk_core,
        )
        node.allocator = PodAllocator(node.core, snapshot=node.disk_alloc)
        node.timer_at = None
        node.views = {}
        node.tag = None
        node.foreign_contacts = set()  # mismatch reports live in memory, per incarnation
        self._note(f"start {node.name} #{node.incarnation}")
        self._after_input(node)
        self._schedule(
            self.now + self.rng.uniform(0, self.config.pushpull_interval),
            "pushpull",
            node.name,
            node.incarnation,
        )

    def _after_input(self, node: SimNode) -> None:
        """What an agent does after feeding its core: persist, then send and react."""
        core, allocator = node.core, node.allocator
        if core is None or allocator is None:
            return
        if core.persist_needed:
            self._persist(node, core)
        for to, payload in core.messages_to_send():
            self._transmit(node.name, to, payload)
        for event in core.events():
            self._on_event(node, event)
        if allocator.persist_needed:
            snapshot = allocator.snapshot()
            node.disk_alloc = snapshot
            allocator.mark_persisted(snapshot["seq"])
        if core.meta_tag != node.tag:  # like an agent updating its gossip meta
            node.tag = core.meta_tag
            self._gossip_about(node.name)
        deadline = core.next_deadline()
        if deadline is not None:
            deadline = max(deadline, self.now)
            if node.timer_at is None or deadline != node.timer_at:
                node.timer_at = deadline
                self._schedule(deadline, "timer", node.name, node.incarnation)
        self._check_ownership(node)

    def _persist(self, node: SimNode, core: IpamCore) -> None:
        """Make the core's state durable, then tell it so.

        With full checks the snapshot is written at once. In scale runs it is written when the
        disk is next read (`_write_disk`, at a kill): every input is persisted before the next
        one, so until then the core's snapshot is this one, and its seq proves it.
        """
        if self.config.full_checks:
            snapshot = core.snapshot()
            node.disk_core = snapshot
            core.mark_persisted(snapshot["seq"])
        else:
            node.unwritten_seq = core.seq
            core.mark_persisted(core.seq)

    def _write_disk(self, node: SimNode) -> None:
        """Write out what `_persist` left unwritten (the core still runs)."""
        if node.unwritten_seq is None or node.core is None:
            return
        snapshot = node.core.snapshot()
        if snapshot["seq"] != node.unwritten_seq:
            raise InvariantViolation(
                f"{node.name}: state changed since it was persisted (seq "
                f"{node.unwritten_seq}, now {snapshot['seq']}) without an input"
            )
        node.disk_core = snapshot
        node.unwritten_seq = None

    def _on_event(self, node: SimNode, event: Event) -> None:
        core = node.core
        assert core is not None and node.allocator is not None
        cluster_id = core.cluster_id or ""
        if isinstance(event, SlotDecided):
            reachable = (self._reachable_during_round(node.name)
                         if event.proposed_here and self.config.full_checks else None)
            self.checker.decided(node.name, cluster_id, event, reachable)
            self._check_reclaim_timing(cluster_id, event)
        elif isinstance(event, ClusterJoined):
            self._generation_started.setdefault(
                (event.cluster_id, node.name, event.generation), self.now
            )
        elif isinstance(event, MemberRemoved):
            self.checker.removed(cluster_id, event)
            self._note(
                f"{node.name} saw removal of {event.name}/{event.generation} "
                f"({event.reason}) at slot {event.slot}"
            )
        elif isinstance(event, BlockLost):
            for lost in node.allocator.drop_lost_blocks():
                self.pods[node.name].pop((lost.container_id, lost.ifname), None)
        elif isinstance(event, RemovedFromCluster):
            self._note(f"{node.name} learned it was removed ({event.reason})")

    def _check_ownership(self, changed: SimNode) -> None:
        """Invariant 1 after an input to `changed`: only its own input can grow its blocks.

        Other nodes' owned sets are cached; time can only shrink them (a lease runs out), so
        a stale cache can only raise a false alarm, which is re-checked with fresh sets.
        """
        core = changed.core
        if core is None:
            self._owned.pop(changed.name, None)
            return
        mine = (core.cluster_id, frozenset(core.usable_blocks(self.now)))
        previous = self._owned.get(changed.name)
        self._owned[changed.name] = mine
        if (not self.config.full_checks and previous is not None and previous[0] == mine[0]
                and mine[1] <= previous[1]):
            return  # nothing grew, so this input cannot have made an overlap
        for name, (cluster_id, blocks) in list(self._owned.items()):
            if name == changed.name or cluster_id != mine[0] or not blocks & mine[1]:
                continue
            other = self.nodes[name].core
            if other is None:
                del self._owned[name]
                continue
            self._owned[name] = (other.cluster_id, frozenset(other.usable_blocks(self.now)))
        self.checker.no_block_overlap(
            (name, cluster_id, blocks) for name, (cluster_id, blocks) in self._owned.items()
        )

    # ================================================================== internals: network

    def _transmit(self, sender: str, to: str | None, payload: bytes) -> None:
        targets = [to] if to is not None else sorted(self.connected_to(sender) - {sender})
        cfg = self.config
        self.messages_by_kind[kind_of(payload)] += len(targets)
        for target in targets:
            self.messages_sent += 1
            if self.rng.random() < cfg.drop:
                self.messages_dropped += 1
                continue
            copies = 2 if self.rng.random() < cfg.duplicate else 1
            for _ in range(copies):
                low, high = cfg.slow_delay if self.rng.random() < cfg.slow_fraction else cfg.delay
                self._schedule(
                    self.now + self.rng.uniform(low, high), "deliver", sender, target, payload
                )

    def _handle(self, item: _Scheduled) -> None:
        self.events_processed += 1
        at, _, kind, args = item
        if kind == "deliver":
            sender, target, payload = args
            node = self.nodes.get(target)
            if node is None or node.core is None or (sender, target) in self.blocked:
                self.messages_dropped += 1
                return
            node.core.on_message(sender, payload, self.now)
            self._after_input(node)
        elif kind == "timer":
            name, incarnation = args
            node = self.nodes[name]
            if node.core is None or node.incarnation != incarnation or node.timer_at != at:
                return
            node.timer_at = None
            node.core.handle_timer(self.now)
            self._after_input(node)
        elif kind == "gossip":
            observer, subject, incarnation = args
            node = self.nodes[observer]
            if node.core is None or node.incarnation != incarnation:
                return
            alive = subject in self.connected_to(observer)
            subject_core = self.nodes[subject].core
            tag = subject_core.meta_tag if alive and subject_core is not None else None
            if node.views.get(subject) == (alive, tag):
                return
            node.views[subject] = (alive, tag)
            if alive:
                node.core.on_member_alive(subject, self.now, tag)
            else:
                node.core.on_member_dead(subject, self.now)
            self._after_input(node)
        elif kind == "pushpull":
            name, incarnation = args
            node = self.nodes[name]
            if node.core is None or node.incarnation != incarnation:
                return
            self._schedule(
                self.now + self.config.pushpull_interval * self.rng.uniform(0.7, 1.3),
                "pushpull",
                name,
                incarnation,
            )
            partners = [
                n for n in self.running() if n.name != name and self._both_ways(name, n.name)
            ]
            if partners:
                self.pushpull(name, self.rng.choice(partners).name)

    def pushpull(self, a: str, b: str) -> None:
        """One push/pull exchange between two running nodes (like memberlist's TCP sync)."""
        node_a, node_b = self.nodes[a], self.nodes[b]
        if node_a.core is None or node_b.core is None:
            return
        state_a, state_b = node_a.core.local_state(), node_b.core.local_state()
        node_b.core.merge_remote_state(state_a, self.now)
        self._after_input(node_b)
        if node_a.core is not None:
            node_a.core.merge_remote_state(state_b, self.now)
            self._after_input(node_a)
        if (
            node_a.core
            and node_b.core
            and node_a.core.cluster_id
            and node_b.core.cluster_id
            and node_a.core.cluster_id != node_b.core.cluster_id
        ):
            node_a.foreign_contacts.add(b)
            node_b.foreign_contacts.add(a)

    def _schedule(self, at: float, kind: str, *args: Any) -> None:
        heapq.heappush(self._queue, (at, next(self._seq), kind, args))

    def _both_ways(self, a: str, b: str) -> bool:
        return (a, b) not in self.blocked and (b, a) not in self.blocked

    # ================================================================== internals: ground truth

    def _topology_changed(self) -> None:
        """Refresh ground truth and let gossip notice the change after a random delay."""
        self._refresh_contacts()
        self._topology_changed_at = self.now
        low, high = self.config.gossip_delay
        for observer in self.running():
            for subject in self.nodes:
                if subject != observer.name:
                    self._schedule(
                        self.now + self.rng.uniform(low, high),
                        "gossip",
                        observer.name,
                        subject,
                        observer.incarnation,
                    )

    def _gossip_about(self, subject: str) -> None:
        low, high = self.config.gossip_delay
        for observer in self.running():
            if observer.name != subject:
                self._schedule(
                    self.now + self.rng.uniform(low, high),
                    "gossip",
                    observer.name,
                    subject,
                    observer.incarnation,
                )

    def _refresh_contacts(self) -> None:
        """Record, per ordered pair, when gossip contact started and stopped (ground truth)."""
        if not self.config.full_checks:
            return
        for a in self.nodes:
            side = self.connected_to(a)
            for b in self.nodes:
                if a == b:
                    continue
                key = (a, b)
                connected = b in side
                history = self._pairs.get(key)
                if history is None:
                    self._pairs[key] = _PairHistory(connected, self.now)
                elif history.connected != connected:
                    if connected:
                        history.gaps.append((history.since, self.now))
                    history.connected = connected
                    history.since = self.now
                if connected and self._both_ways(a, b):
                    self._direct[key] = self.now

    def _reachable_during_round(self, name: str) -> set[str]:
        """Nodes `name` could have exchanged messages with during its last round."""
        self._refresh_contacts()
        window = self._round_window()
        return {name} | {
            b for (a, b), at in self._direct.items() if a == name and self.now - at <= window
        }

    def _check_reclaim_timing(self, cluster_id: str, event: SlotDecided) -> None:
        """Invariant 4 timing, once per decision: who created a reclaim had waited for it."""
        key = (cluster_id, event.era, event.slot)
        if not self.config.full_checks or key in self._reclaims_checked:
            return
        self._reclaims_checked.add(key)
        for op in event.value:
            if isinstance(op, Remove) and op.reason == "reclaim":
                silent = self._longest_silence(
                    cluster_id, op.origin, op.target, op.target_generation
                )
                removal = MemberRemoved(
                    op.target, op.target_generation, op.reason, event.era, event.slot, (), ()
                )
                slack = self.config.gossip_delay[1] + 1.0
                self.checker.reclaim_waited(removal, silent, self.config.reclaim_after, slack)

    def _longest_silence(
        self, cluster_id: str, creator: str, target: str, generation: int
    ) -> float:
        """Longest gossip gap, by ground truth, between `creator` and a target generation.

        A voter creates an automatic reclaim only when its own evidence of the target is at
        least reclaim_after old, and evidence can outlast the real gap only by gossip's
        detection delay. Gaps count from the moment the target generation joined.
        """
        self._refresh_contacts()
        born = self._generation_started.get((cluster_id, target, generation), 0.0)
        ended = self._generation_ended.get((cluster_id, target, generation))
        history = self._pairs.get((creator, target))
        spans = list(history.gaps) if history is not None else [(born, self.now)]
        if history is not None and not history.connected:
            spans.append((history.since, self.now))
        # A contact shorter than gossip's detection delay may go unnoticed: join its gaps.
        unnoticed = self.config.gossip_delay[1] + 0.1
        merged: list[tuple[float, float]] = []
        for start, end in spans:
            if merged and start - merged[-1][1] < unnoticed:
                merged[-1] = (merged[-1][0], end)
            else:
                merged.append((start, end))
        if ended is not None:  # that generation died then; later contact with the name is not it
            silent_since = ended
            for start, end in merged:
                if start <= ended <= end:
                    silent_since = start
            return self.now - max(silent_since, born)
        return max((end - max(start, born) for start, end in merged), default=0.0)

    def _round_window(self) -> float:
        timings = self.config.timings
        return 2 * timings.round_timeout + 2 * self.config.slow_delay[1] + 1.0

    def _note(self, text: str) -> None:
        self.log.append(f"t={self.now:9.3f} {text}")
        if len(self.log) > 400:
            del self.log[:100]

    # ================================================================== end-of-run checks

    def clusters(self) -> dict[str, list[SimNode]]:
        by_cluster: dict[str, list[SimNode]] = {}
        for node in self.running():
            assert node.core is not None
            if node.core.cluster_id is not None:
                by_cluster.setdefault(node.core.cluster_id, []).append(node)
        return by_cluster

    def settle_and_check_liveness(self) -> dict[str, Any]:
        """Heal, bring back killed nodes, wait, and check that every cluster converged.

        Converged means: one decided state per cluster; every running node a member with a
        lease and the blocks it asked for; nodes destroyed for good removed exactly once
        (forcing their removal as an operator would when no quorum is left); nothing left in
        quarantine. Also checks that nodes which met a foreign cluster report it.
        """
        cfg = self.config
        self.heal()
        for node in list(self.nodes.values()):
            if not node.running and not node.destroyed:
                self.restart(node.name)
        self.run(cfg.timings.elect_after + 10.0)
        orphans = 0
        for members in self.clusters().values():
            if all(
                n.core is not None and n.core.status(self.now).generation is None for n in members
            ):
                for node in members:  # a cluster with no member left: the operator resets
                    self.destroy(node.name)
                    self.rejoin(node.name)
                    orphans += 1
        self.run(cfg.timings.elect_after + 10.0)
        forced = 0
        for _ in range(4):
            stuck = self._clusters_without_quorum()
            if not stuck:
                break
            for cluster_id, (forcer, dead_voter) in stuck.items():
                if self.force_allowed(forcer, dead_voter):
                    self.rmpeer(forcer, dead_voter, force=True)
                    forced += 1
                else:  # pragma: no cover - the rule holds after heal with only destroyed dead
                    raise InvariantViolation(f"cluster {cluster_id} stuck, force not allowed")
            self.run(20.0)
        for node in self.running():
            self.request_block(node.name)
        wait = cfg.reclaim_after + cfg.lease + cfg.timings.voter_replace_after + 60.0
        self.run(wait)
        self.check_status_invariants()
        for members in self.clusters().values():  # one anti-entropy round, no time passing
            for a, b in itertools.combinations([n.name for n in members], 2):
                self.pushpull(a, b)
        report = {"clusters": 0, "forced": forced, "reset_orphans": orphans, "reclaimed_dead": 0}
        for cluster_id, members in self.clusters().items():
            report["clusters"] += 1
            statuses = [n.core.status(self.now) for n in members if n.core is not None]
            keys = {(s.era, s.slot) for s in statuses}
            if len(keys) != 1:
                raise InvariantViolation(
                    f"liveness: cluster {cluster_id} did not converge: {sorted(map(str, keys))}"
                )
            for status in statuses:
                if status.state is not IpamState.READY or not status.owned_blocks:
                    raise InvariantViolation(
                        f"liveness: {status.node} is {status.state.value} ({status.detail}) "
                        f"with blocks {status.owned_blocks} after settling"
                    )
                if status.quarantined_blocks:
                    raise InvariantViolation(
                        f"liveness: {status.quarantined_blocks} blocks still quarantined"
                    )
            final = statuses[0]
            running_names = {s.node for s in statuses}
            for member in final.members:
                if member.name not in running_names:
                    raise InvariantViolation(
                        f"liveness/invariant 4: {member.name} is gone but still a member of "
                        f"{cluster_id} after {wait:.0f}s"
                    )
            report["reclaimed_dead"] += self.checker.reclaims.count()
        for node in self.running():
            assert node.core is not None
            status = node.core.status(self.now)
            foreign = {p for p in node.foreign_contacts if self.nodes[p].running}
            self.checker.mismatch_reported(status, foreign)
        return report

    def _clusters_without_quorum(self) -> dict[str, tuple[str, str]]:
        """Clusters whose latest voters are mostly gone: (member to force from, a dead voter)."""
        stuck: dict[str, tuple[str, str]] = {}
        for cluster_id, members in self.clusters().items():
            statuses = [n.core.status(self.now) for n in members if n.core is not None]
            latest = max(statuses, key=lambda s: (s.era or (0, "", 0), s.slot))
            running = {s.node for s in statuses}
            if self._usable_voters(latest, running) >= latest.quorum:
                continue
            current = sorted(
                s.node
                for s in statuses
                if s.generation is not None and (s.era, s.slot) == (latest.era, latest.slot)
            )
            generations = {m.name: m.generation for m in latest.members}
            dead = sorted(  # voters gone for good first, then ones back without their disk
                (v in running, v)
                for v in latest.voters
                if v not in running
                or getattr(self.status(v), "generation", None) != generations.get(v)
            )
            if current and dead:
                stuck[cluster_id] = (current[0], dead[0][1])
        return stuck


@dataclass(slots=True)
class _PairHistory:
    connected: bool
    since: float
    gaps: list[tuple[float, float]] = field(default_factory=list)


def _cluster_of(node: SimNode) -> str | None:
    if node.core is not None:
        return node.core.cluster_id
    cluster = (node.disk_core or {}).get("cluster")
    return str(cluster["cluster_id"]) if cluster else None


def _held_from_snapshot(snapshot: dict[str, Any] | None, core: IpamCore) -> list[IPNetwork]:
    if not snapshot or not snapshot.get("cluster") or snapshot.get("generation") is None:
        return []
    state = ClusterState.from_plain(snapshot["cluster"])
    if state.generation_of(core.name) != snapshot["generation"]:
        return []
    return [core.space.block(i) for i in state.blocks_of(core.name)]


# ====================================================================== random scenarios


@dataclass(slots=True)
class ScenarioReport:
    seed: int
    steps: int
    actions: dict[str, int]
    events: int
    messages: int
    dropped: int
    checks: dict[str, int]
    liveness: dict[str, Any]
    virtual_seconds: float


def random_scenario(
    seed: int, steps: int, *, max_nodes: int = 9, config: SimConfig | None = None
) -> ScenarioReport:
    """Drive one simulation through `steps` random actions, then settle and check liveness.

    Actions: time passing (short, long, past reclaim_after), block requests, pods, kills,
    restarts, wipes and rejoins, new nodes, partitions (random groups, one-way cuts) and heals,
    rmpeer (plain, and forced when the operator rule allows), the orchestrator deleting a
    node (seen by some of the running nodes), a second cluster founded apart, and extra
    push/pulls. Invariants are checked after every event and every action.
    """
    sim = IpamSim(seed, config)
    rng = random.Random(f"scenario/{seed}")
    counts: dict[str, int] = {}
    size = rng.randint(2, max(2, max_nodes - 2))
    sim.add_node("n01", bootstrap="found")
    for number in range(2, size + 1):
        sim.add_node(f"n{number:02d}")
    second_cluster_done = False
    cfg = sim.config

    def names(running: bool | None = None) -> list[str]:
        return sorted(n.name for n in sim.nodes.values() if running is None or n.running == running)

    for _ in range(steps):
        choice = rng.choices(
            [
                "tick",
                "wait",
                "reclaim_wait",
                "request",
                "pod",
                "unpod",
                "kill",
                "restart",
                "destroy",
                "rejoin",
                "add",
                "partition",
                "oneway",
                "heal",
                "rmpeer",
                "force",
                "node_deleted",
                "second_cluster",
                "pushpull",
            ],
            weights=[30, 10, 2, 8, 8, 3, 4, 6, 1, 1, 3, 4, 2, 5, 2, 1, 1, 1, 2],
        )[0]
        up = names(running=True)
        down = names(running=False)
        did = True
        if choice == "tick":
            sim.run(rng.uniform(0.05, 2.0))
        elif choice == "wait":
            sim.run(rng.uniform(2.0, 40.0))
        elif choice == "reclaim_wait":
            sim.run(cfg.reclaim_after + rng.uniform(0.0, cfg.lease))
        elif choice == "request" and up:
            sim.request_block(rng.choice(up), rng.randint(1, 2))
        elif choice == "pod" and up:
            sim.add_pod(rng.choice(up))
        elif choice == "unpod" and up:
            sim.del_pod(rng.choice(up))
        elif choice == "kill" and len(up) > 1:
            sim.kill(rng.choice(up))
        elif choice == "restart" and any(not sim.nodes[n].destroyed for n in down):
            sim.restart(rng.choice([n for n in down if not sim.nodes[n].destroyed]))
        elif choice == "destroy" and len(up) > 1:
            sim.destroy(rng.choice(up))
        elif choice == "rejoin" and any(sim.nodes[n].destroyed for n in down):
            sim.rejoin(rng.choice([n for n in down if sim.nodes[n].destroyed]))
        elif choice == "add" and len(sim.nodes) < max_nodes:
            sim.add_node(f"n{len(sim.nodes) + 1:02d}")
        elif choice == "partition" and len(up) > 1:
            shuffled = list(names())
            rng.shuffle(shuffled)
            cuts = sorted(
                rng.sample(range(1, len(shuffled)), k=min(len(shuffled) - 1, rng.randint(1, 2)))
            )
            groups = [
                shuffled[i:j] for i, j in zip([0, *cuts], [*cuts, len(shuffled)], strict=True)
            ]
            sim.partition(groups)
        elif choice == "oneway" and len(up) > 1:
            a, b = rng.sample(up, 2)
            sim.block_link(a, b)
        elif choice == "heal":
            sim.heal()
        elif choice == "rmpeer" and up and len(names()) > 1:
            at = rng.choice(up)
            sim.rmpeer(at, rng.choice([n for n in names() if n != at]))
        elif choice == "force" and up:
            candidates = [(a, t) for a in up for t in down if sim.force_allowed(a, t)]
            if candidates:
                sim.rmpeer(*rng.choice(candidates), force=True)
            else:
                did = False
        elif choice == "node_deleted" and up:
            sim.node_deleted(rng.choice(names()), rng.sample(up, rng.randint(1, len(up))))
        elif (
            choice == "second_cluster"
            and not second_cluster_done
            and len(sim.nodes) + 2 <= (max_nodes)
        ):
            second_cluster_done = True
            first = f"z{len(sim.nodes) + 1:02d}"
            second = f"z{len(sim.nodes) + 2:02d}"
            sim.partition([[n for n in names() if not n.startswith("z")], [first, second]])
            sim.add_node(first, bootstrap="found")
            sim.add_node(second)
            sim.partition([[n for n in names() if not n.startswith("z")], [first, second]])
            sim.run(cfg.timings.elect_after + 5.0)
        elif choice == "pushpull" and len(up) > 1:
            a, b = rng.sample(up, 2)
            if sim._both_ways(a, b):
                sim.pushpull(a, b)
        else:
            did = False
        if did:
            counts[choice] = counts.get(choice, 0) + 1
        sim.check_status_invariants()
    liveness = sim.settle_and_check_liveness()
    return ScenarioReport(
        seed=seed,
        steps=steps,
        actions=counts,
        events=sim.events_processed,
        messages=sim.messages_sent,
        dropped=sim.messages_dropped,
        checks=dict(sim.checker.counts),
        liveness=liveness,
        virtual_seconds=sim.now,
    )
