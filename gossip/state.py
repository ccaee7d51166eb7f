"""The membership table and its state machine: who is alive, suspect, dead or gone.

Theory of operation
===================

Every node keeps one row per member it has heard of (itself included): address, metadata,
protocol versions (Vsn), *incarnation* and *state*. Only the member itself ever raises its own
incarnation; everybody else just carries the highest one they have seen. Rumours about a member
(`alive`, `suspect`, `dead`) arrive by gossip or inside a push/pull, and each is judged by the
member's incarnation and current state, with one table (`RULES`) saying which rumour may move a
row from which states:

    rumour    needs incarnation        moves a row in            to
    alive     > current (new row: any) ALIVE SUSPECT DEAD LEFT   ALIVE
    suspect   >= current               ALIVE                     SUSPECT
    dead      >= current               ALIVE SUSPECT             DEAD, or LEFT if From == Node

Special cases, all from memberlist's `state.go`:

* A rumour that changes a row is re-broadcast as is, so it spreads epidemically; the broadcast
  queue keeps only the newest rumour per member.
* A `suspect` about a row that is already SUSPECT is a *confirmation*: it shortens that row's
  suspicion timer if the accuser is new (Lifeguard), and is then re-broadcast.
* When the suspicion timer runs out and the row is still in the same SUSPECT episode, we
  declare the member dead ourselves (`dead` with From == us).
* A rumour that says *we* are suspect or dead, or an `alive` about us that is not exactly what
  we advertise, is refuted: we take an incarnation above the accusation and broadcast `alive`.
  Refuting is evidence of our own slowness, so it costs one point of health (awareness).
  While we are leaving we do not refute: our own `dead` (From == us) is the leave.
* An `alive` with a different address for a known name is a conflict and is ignored, unless the
  row LEFT, or died longer than `dead_node_reclaim_time` ago (when that is set).
* An `alive` whose protocol range is nonsense (0, or min > max) is ignored; so is one whose
  address is not 4 or 16 bytes or whose metadata exceeds 512 bytes (serf's own checks).
* Push/pull entries are replayed as rumours, except that a remote DEAD is only a `suspect`:
  we want to see for ourselves. Before any of it is merged, every alive member's protocol and
  delegate versions (theirs and ours) must fit the range all of them understand (`verify_protocol`).
* DEAD and LEFT rows stay for `gossip_to_the_dead_time` (we still gossip to them, so a wrongly
  killed node hears about it and refutes) and are reaped when the probe order wraps around.

Members are probed in a shuffled round-robin order; new members are inserted at a random
offset so none waits a full round, and the order is reshuffled at each wrap.

Nothing here does I/O or reads a clock: rumours come in with `now`, and what must go out is put
in the broadcast queue (encoded bytes) and in `events`. Suspicion timers live in a heap whose
earliest deadline the node reads with `next_deadline()` and runs with `expire(now)`.
"""

from __future__ import annotations

import enum
import heapq
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from gossip import wire
from gossip.awareness import Awareness
from gossip.broadcast import Finished, TransmitLimitedQueue
from gossip.config import META_MAX_SIZE, GossipConfig
from gossip.events import Member, MemberEvent, MemberEventKind, MemberState, Stats
from gossip.messages import Alive, Dead, PushNodeState, Suspect
from gossip.suspicion import Suspicion, suspicion_timeout

logger = logging.getLogger(__name__)

ALIVE, SUSPECT = MemberState.ALIVE, MemberState.SUSPECT
DEAD, LEFT = MemberState.DEAD, MemberState.LEFT
VALID_ADDRESS_LENGTHS = (4, 16)


class Rumour(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Rule:
    strictly_newer: bool  # True: incarnation must exceed the row's; False: at least equal
    moves_from: frozenset[MemberState]


RULES: Mapping[Rumour, Rule] = MappingProxyType({
    Rumour.ALIVE: Rule(strictly_newer=True, moves_from=frozenset(MemberState)),
    Rumour.SUSPECT: Rule(strictly_newer=False, moves_from=frozenset({ALIVE})),
    Rumour.DEAD: Rule(strictly_newer=False, moves_from=frozenset({ALIVE, SUSPECT})),
})

# Which event a state change produces (an unlisted pair produces none).
EVENT_FOR_CHANGE: Mapping[tuple[MemberState, MemberState], MemberEventKind] = MappingProxyType({
    (DEAD, ALIVE): MemberEventKind.JOIN,
    (LEFT, ALIVE): MemberEventKind.JOIN,
    (SUSPECT, ALIVE): MemberEventKind.ALIVE,
    (ALIVE, SUSPECT): MemberEventKind.SUSPECT,
    (ALIVE, DEAD): MemberEventKind.FAILED,
    (SUSPECT, DEAD): MemberEventKind.FAILED,
    (ALIVE, LEFT): MemberEventKind.LEAVE,
    (SUSPECT, LEFT): MemberEventKind.LEAVE,
})


class MemberRecord:
    """One mutable row of the table."""

    __slots__ = (
        "addr",
        "incarnation",
        "meta",
        "name",
        "port",
        "protocol_max",
        "state",
        "state_change",
        "vsn",
    )

    def __init__(
        self, name: str, addr: bytes, port: int, meta: bytes, vsn: bytes, now: float
    ) -> None:
        self.name = name
        self.addr = addr
        self.port = port
        self.meta = meta
        self.vsn = vsn
        self.protocol_max = vsn[1] if len(vsn) > 1 else 0
        self.incarnation = 0
        # A row is born DEAD so that its first alive reads as a join (as memberlist does).
        self.state = DEAD
        self.state_change = now

    @property
    def address(self) -> tuple[bytes, int]:
        return (self.addr, self.port)

    def dead_or_left(self) -> bool:
        return self.state is DEAD or self.state is LEFT

    def set_vsn(self, vsn: bytes) -> None:
        self.vsn = vsn
        self.protocol_max = vsn[1] if len(vsn) > 1 else 0

    def view(self) -> Member:
        return Member(
            name=self.name,
            addr=self.addr,
            port=self.port,
            meta=self.meta,
            state=self.state,
            incarnation=self.incarnation,
            vsn=self.vsn,
        )

    def push_state(self) -> PushNodeState:
        return PushNodeState(
            name=self.name,
            addr=self.addr,
            port=self.port,
            meta=self.meta,
            incarnation=self.incarnation,
            state=self.state,
            vsn=self.vsn,
        )


def vsn_is_sane(vsn: bytes) -> bool:
    """memberlist's aliveNode check: a Vsn of 3+ bytes needs 0 < pmin <= pmax."""
    if len(vsn) < 3:
        return True
    return vsn[0] != 0 and vsn[1] != 0 and vsn[0] <= vsn[1]


class Membership:
    """The table of members plus the rules in the module docstring."""

    def __init__(
        self,
        config: GossipConfig,
        name: str,
        *,
        rng: random.Random,
        broadcasts: TransmitLimitedQueue,
        awareness: Awareness,
        stats: Stats,
    ) -> None:
        self.config = config
        self.name = name
        self.rng = rng
        self.broadcasts = broadcasts
        self.awareness = awareness
        self.stats = stats
        self.members: dict[str, MemberRecord] = {}
        self.probe_order: list[MemberRecord] = []
        self.probe_index = 0
        self.incarnation = 0
        self.leaving = False
        self.events: list[MemberEvent] = []
        self._suspicions: dict[str, Suspicion] = {}
        # (deadline, tiebreak, name, suspicion, state_change at start)
        self._suspicion_heap: list[tuple[float, int, str, Suspicion, float]] = []
        self._heap_counter = 0

    # -- reading -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self) -> Iterator[MemberRecord]:
        return iter(self.members.values())

    def get(self, name: str) -> MemberRecord | None:
        return self.members.get(name)

    @property
    def local(self) -> MemberRecord:
        return self.members[self.name]

    def any_other_alive(self) -> bool:
        return any(r.name != self.name and not r.dead_or_left() for r in self.members.values())

    def next_incarnation(self) -> int:
        self.incarnation += 1
        return self.incarnation

    # -- rumours -----------------------------------------------------------------------------

    def apply_alive(
        self,
        msg: Alive,
        now: float,
        *,
        bootstrap: bool = False,
        on_finished: Finished | None = None,
    ) -> None:
        """An `alive` rumour (memberlist aliveNode); `bootstrap` marks our own announcements."""
        is_local = msg.node == self.name
        if is_local and self.leaving:
            return  # an alive about us queued before we left must not re-join us
        if not vsn_is_sane(msg.vsn):
            self.stats.drops["alive_bad_version"] += 1
            logger.warning("ignoring alive for %r: bad protocol versions %s", msg.node, msg.vsn)
            return
        if len(msg.addr) not in VALID_ADDRESS_LENGTHS or len(msg.meta) > META_MAX_SIZE:
            self.stats.drops["alive_invalid"] += 1
            return
        record = self.members.get(msg.node)
        is_new = record is None
        updates_address = False
        if record is None:
            record = MemberRecord(msg.node, msg.addr, msg.port, msg.meta, msg.vsn, now)
            self._insert(record)
        elif record.addr != msg.addr or record.port != msg.port:
            reclaim = self.config.dead_node_reclaim_time
            can_reclaim = reclaim > 0 and now - record.state_change > reclaim
            if record.state is LEFT or (record.state is DEAD and can_reclaim):
                logger.info("updating address of gone node %r", record.name)
                updates_address = True
            else:
                self.stats.drops["alive_conflict"] += 1
                logger.error(
                    "conflicting address for %r: ours %s:%d, theirs %s:%d (state %s)",
                    record.name, record.addr.hex(), record.port, msg.addr.hex(), msg.port,
                    record.state.name,
                )
                return
        if not is_new:
            rule = RULES[Rumour.ALIVE]
            if is_local:
                if msg.incarnation < record.incarnation:
                    return
            elif not updates_address and not _passes(rule, msg.incarnation, record.incarnation):
                return
        self._cancel_suspicion(msg.node)
        old_state, old_meta = record.state, record.meta
        if is_local and not bootstrap:
            if (
                msg.incarnation == record.incarnation
                and msg.meta == record.meta
                and msg.vsn == record.vsn
            ):
                return
            logger.warning("refuting an alive message about us (incarnation %d)", msg.incarnation)
            self._refute(record, msg.incarnation)
            return
        self.broadcasts.queue(wire.encode_message(msg), name=msg.node, on_finished=on_finished)
        if len(msg.vsn) >= 6:
            record.set_vsn(msg.vsn)
        record.incarnation = msg.incarnation
        record.meta = msg.meta
        record.addr = msg.addr
        record.port = msg.port
        if record.state is not ALIVE:
            record.state = ALIVE
            record.state_change = now
        self._emit_change(record, old_state, now)
        if old_state in (ALIVE, SUSPECT) and old_meta != record.meta:
            self._emit(MemberEventKind.UPDATE, record, now)

    def apply_suspect(self, msg: Suspect, now: float) -> None:
        """A `suspect` rumour (memberlist suspectNode)."""
        record = self.members.get(msg.node)
        rule = RULES[Rumour.SUSPECT]
        if record is None or not _passes(rule, msg.incarnation, record.incarnation):
            return
        suspicion = self._suspicions.get(msg.node)
        if suspicion is not None:
            if suspicion.confirm(msg.from_node, now):
                self._push_suspicion(msg.node, suspicion, record.state_change)
                self.broadcasts.queue(wire.encode_message(msg), name=msg.node)
            return
        if record.state not in rule.moves_from:
            return
        if record.name == self.name:
            logger.warning("refuting a suspect message (from %r)", msg.from_node)
            self._refute(record, msg.incarnation)
            return
        self.broadcasts.queue(wire.encode_message(msg), name=msg.node)
        old_state = record.state
        record.incarnation = msg.incarnation
        record.state = SUSPECT
        record.state_change = now
        self.stats.suspicions += 1
        self._emit_change(record, old_state, now)
        self._start_suspicion(record, msg.from_node, now)

    def apply_dead(self, msg: Dead, now: float, *, on_finished: Finished | None = None) -> None:
        """A `dead` rumour (memberlist deadNode); From == Node means the member left."""
        record = self.members.get(msg.node)
        rule = RULES[Rumour.DEAD]
        if record is None or not _passes(rule, msg.incarnation, record.incarnation):
            return
        self._cancel_suspicion(msg.node)
        if record.state not in rule.moves_from:
            return
        if record.name == self.name:
            if not self.leaving:
                logger.warning("refuting a dead message (from %r)", msg.from_node)
                self._refute(record, msg.incarnation)
                return
            self.broadcasts.queue(wire.encode_message(msg), name=msg.node, on_finished=on_finished)
        else:
            self.broadcasts.queue(wire.encode_message(msg), name=msg.node)
        old_state = record.state
        record.incarnation = msg.incarnation
        record.state = LEFT if msg.node == msg.from_node else DEAD
        record.state_change = now
        self._emit_change(record, old_state, now)

    def merge_remote(
        self, remote: Iterable[PushNodeState], now: float, *, default_port: int
    ) -> None:
        """Replay a push/pull's entries as rumours (memberlist mergeState); an entry without a
        port (protocol 1) gets `default_port`, as memberlist gives it its own bind port."""
        for entry in remote:
            if entry.state == ALIVE:
                alive = Alive(
                    incarnation=entry.incarnation,
                    node=entry.name,
                    addr=entry.addr,
                    port=entry.port or default_port,
                    meta=entry.meta,
                    vsn=entry.vsn,
                )
                self.apply_alive(alive, now)
            elif entry.state == LEFT:
                self.apply_dead(Dead(entry.incarnation, entry.name, entry.name), now)
            else:
                # A remote DEAD is only a suspicion here: we want to see for ourselves.
                self.apply_suspect(Suspect(entry.incarnation, entry.name, self.name), now)

    def verify_protocol(self, remote: Iterable[PushNodeState]) -> str | None:
        """memberlist verifyProtocol: None if every alive member can talk to every other."""
        remote = list(remote)
        live_remote = [e.vsn for e in remote if e.state == ALIVE and len(e.vsn) >= 5]
        live_local = [r.vsn for r in self.members.values() if r.state is ALIVE and len(r.vsn) >= 6]
        ranges = live_remote + live_local
        max_pmin = max((v[0] for v in ranges), default=0)
        min_pmax = min((v[1] for v in ranges), default=255)
        max_dmin = max((v[3] for v in ranges), default=0)
        min_dmax = min((v[4] for v in ranges), default=255)
        speakers = [(e.name, e.vsn) for e in remote]
        speakers += [(r.name, r.vsn) for r in self.members.values() if r.state is ALIVE]
        for name, vsn in speakers:
            pcur, dcur = (vsn[2], vsn[5]) if len(vsn) >= 6 else (0, 0)
            if not max_pmin <= pcur <= min_pmax:
                return (
                    f"node {name!r} protocol version ({pcur}) is incompatible: "
                    f"[{max_pmin}, {min_pmax}]"
                )
            if not max_dmin <= dcur <= min_dmax:
                return (
                    f"node {name!r} delegate protocol version ({dcur}) is incompatible: "
                    f"[{max_dmin}, {min_dmax}]"
                )
        return None

    def seed(self, entries: Iterable[PushNodeState], now: float) -> None:
        """Adopt alive entries without gossiping them or emitting events.

        Not a protocol path: it lets the simulator start from an already converged cluster.
        """
        members = self.members
        added: list[MemberRecord] = []
        alive_code = int(ALIVE)
        for entry in entries:
            if entry.state != alive_code or entry.name in members:
                continue
            record = MemberRecord(entry.name, entry.addr, entry.port, entry.meta, entry.vsn, now)
            record.incarnation = entry.incarnation
            record.state = ALIVE
            members[entry.name] = record
            added.append(record)
        # One shuffle instead of a random insertion each: the same uniform probe order.
        self.probe_order.extend(added)
        self.rng.shuffle(self.probe_order)

    # -- the probe order ---------------------------------------------------------------------

    def next_probe_target(self, now: float) -> MemberRecord | None:
        """The next member to probe, round-robin over a shuffled order (memberlist probe)."""
        checked = 0
        while checked < len(self.probe_order):
            if self.probe_index >= len(self.probe_order):
                self._reset_probe_order(now)
                self.probe_index = 0
                checked += 1
                continue
            record = self.probe_order[self.probe_index]
            self.probe_index += 1
            if record.name == self.name or record.dead_or_left():
                checked += 1
                continue
            return record
        return None

    def random_members(
        self, k: int, exclude: Callable[[MemberRecord], bool]
    ) -> list[MemberRecord]:
        """Up to `k` distinct random members not excluded (memberlist kRandomNodes)."""
        nodes = self.probe_order
        n = len(nodes)
        chosen: list[MemberRecord] = []
        if n < 3 * k:
            shuffled = list(nodes)
            self.rng.shuffle(shuffled)
            for record in shuffled:
                if len(chosen) >= k:
                    break
                if not exclude(record):
                    chosen.append(record)
            return chosen
        randrange = self.rng.randrange
        for _ in range(3 * n):
            if len(chosen) >= k:
                break
            record = nodes[randrange(n)]
            if exclude(record) or record in chosen:
                continue
            chosen.append(record)
        return chosen

    def _insert(self, record: MemberRecord) -> None:
        self.members[record.name] = record
        n = len(self.probe_order)
        offset = self.rng.randrange(n) if n else 0
        order = self.probe_order
        order.append(record)
        order[offset], order[n] = order[n], order[offset]

    def _reset_probe_order(self, now: float) -> None:
        """Reap long-dead members and reshuffle (memberlist resetNodes)."""
        grace = self.config.gossip_to_the_dead_time
        kept: list[MemberRecord] = []
        for record in self.probe_order:
            if record.dead_or_left() and now - record.state_change > grace:
                del self.members[record.name]
            else:
                kept.append(record)
        self.rng.shuffle(kept)
        self.probe_order = kept

    # -- suspicion timers --------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        heap = self._suspicion_heap
        while heap:
            deadline, _, name, suspicion, _ = heap[0]
            if self._suspicions.get(name) is suspicion and suspicion.deadline == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    def expire(self, now: float) -> None:
        """Declare dead every suspect whose timer ran out by `now`."""
        while True:
            deadline = self.next_deadline()
            if deadline is None or deadline > now:
                return
            _, _, name, suspicion, started = heapq.heappop(self._suspicion_heap)
            del self._suspicions[name]
            record = self.members.get(name)
            if record is None or record.state is not SUSPECT or record.state_change != started:
                continue
            self.stats.suspicion_timeouts += 1
            logger.info(
                "marking %s as failed, suspect timeout reached (%d peer confirmations)",
                name, suspicion.confirmations,
            )
            self.apply_dead(Dead(record.incarnation, name, self.name), now)

    def _start_suspicion(self, record: MemberRecord, accuser: str, now: float) -> None:
        config = self.config
        n = len(self.members)
        k = config.suspicion_mult - 2 if config.lifeguard else 0
        if n - 2 < k:
            k = 0  # too few members to expect confirmations (minus us and the suspect)
        min_timeout = suspicion_timeout(config.suspicion_mult, n, config.probe_interval)
        max_timeout = config.suspicion_max_timeout_mult * min_timeout
        suspicion = Suspicion(accuser, k, min_timeout, max_timeout, now)
        self._suspicions[record.name] = suspicion
        self._push_suspicion(record.name, suspicion, record.state_change)

    def _push_suspicion(self, name: str, suspicion: Suspicion, started: float) -> None:
        self._heap_counter += 1
        entry = (suspicion.deadline, self._heap_counter, name, suspicion, started)
        heapq.heappush(self._suspicion_heap, entry)

    def _cancel_suspicion(self, name: str) -> None:
        self._suspicions.pop(name, None)  # its heap entry is skipped lazily

    # -- refutation and events ---------------------------------------------------------------

    def _refute(self, record: MemberRecord, accused_incarnation: int) -> None:
        """Beat the accusation with a higher incarnation and broadcast alive (memberlist refute)."""
        incarnation = self.next_incarnation()
        if accused_incarnation >= incarnation:
            incarnation = self.incarnation = accused_incarnation + 1
        record.incarnation = incarnation
        self.stats.refutations += 1
        if self.config.lifeguard:
            self.awareness.apply_delta(1)
        alive = Alive(
            incarnation=incarnation,
            node=record.name,
            addr=record.addr,
            port=record.port,
            meta=record.meta,
            vsn=record.vsn,
        )
        self.broadcasts.queue(wire.encode_message(alive), name=record.name)

    def _emit_change(self, record: MemberRecord, old_state: MemberState, now: float) -> None:
        kind = EVENT_FOR_CHANGE.get((old_state, record.state))
        if kind is not None:
            self._emit(kind, record, now)

    def _emit(self, kind: MemberEventKind, record: MemberRecord, now: float) -> None:
        self.events.append(
            MemberEvent(
                kind=kind,
                name=record.name,
                addr=record.addr,
                port=record.port,
                meta=record.meta,
                incarnation=record.incarnation,
                time=now,
            )
        )


def _passes(rule: Rule, incoming: int, current: int) -> bool:
    return incoming > current if rule.strictly_newer else incoming >= current
