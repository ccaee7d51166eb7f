"""The replicated IPAM state and the operations that change it: a deterministic state machine.

Theory of operation
-------------------
The whole cluster agrees on one sequence of *decided states* s1, s2, s3, ... Each state
records who the members are (name and generation), which of them vote (the voter set V),
which block belongs to which member, which blocks are quarantined after an rmpeer, and the
tombstones of removed members. `s(n+1)` is `s(n)` with one decided *value* applied: a short
batch of operations (join, renew, claim, remove, free, promote, demote, leave). Which value
is decided for slot n+1 is settled by single-decree Paxos among the voters of `s(n)`
(see `core.py`); this module only says what a value *does*.

The rules this module keeps:

* `apply_value` is a pure function of (state, value): every node that applies the same
  decided value to the same state gets the same next state. Nothing here reads a clock,
  a random source, or local opinion.
* An operation that is not valid in the state it is applied to does nothing (and says why).
  Values are built against the state they will be applied to, so in practice this only
  happens for duplicates, but determinism never depends on it.
* A member is (name, generation); the generation is the slot at which it joined. A block has
  at most one owner; a quarantined block has none and cannot be claimed until freed.
* States are totally ordered by (era, slot). Within an era the slot sequence is a chain (Paxos
  decides each slot once), so merging two states of one era is "take the later one": a join
  semi-lattice, which is what push/pull anti-entropy needs. A new era only starts when an
  operator forces an rmpeer without quorum; the later era wins when states meet.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from weavepy.ipam.blocks import BlockError, BlockSpace
from weavepy.ipam.errors import IpamDecodeError

MAX_NAME_LENGTH = 253  # a DNS name, which is what Kubernetes node names are
MAX_TOMBSTONES = 256
MAX_OPS_PER_VALUE = 8
MAX_BLOCKS_PER_CLAIM = 4

Era = tuple[int, str, int]  # (number, node that forced it, nonce); (0, "", 0) from founding
# Pseudo-owner of the blocks a forced era fences for a lease; not a valid Kubernetes node name.
FENCE_OWNER = "(forced-era fence)"
FOUNDING_ERA: Era = (0, "", 0)


# --------------------------------------------------------------------------- operations


@dataclass(frozen=True, slots=True)
class Join:
    """`origin` becomes a member; its generation is the slot this value is decided at.

    If `origin` is already a member under an older generation (it lost its disk and came
    back), that old generation is retired: its blocks are quarantined and it stops voting.
    """

    origin: str
    nonce: int
    KIND: ClassVar[str] = "join"


@dataclass(frozen=True, slots=True)
class Renew:
    """`origin` is alive and a member: evidence for every voter, and a lease for `origin`."""

    origin: str
    generation: int
    nonce: int
    KIND: ClassVar[str] = "renew"


@dataclass(frozen=True, slots=True)
class Claim:
    """`origin` takes free blocks."""

    origin: str
    generation: int
    nonce: int
    blocks: tuple[int, ...]
    KIND: ClassVar[str] = "claim"


@dataclass(frozen=True, slots=True)
class Remove:
    """Member `target` (at `target_generation`) is removed: reclaimed, or rmpeer'd.

    Its blocks become free at once if `free_now` (the voters attested that its lease has
    surely run out), else they are quarantined until a later `Free`.
    """

    origin: str
    nonce: int
    target: str
    target_generation: int
    reason: str
    free_now: bool
    KIND: ClassVar[str] = "remove"


@dataclass(frozen=True, slots=True)
class Free:
    """Quarantined blocks of (`target`, `target_generation`) become free."""

    origin: str
    nonce: int
    target: str
    target_generation: int
    KIND: ClassVar[str] = "free"


@dataclass(frozen=True, slots=True)
class Promote:
    """Member `target` becomes a voter (if V is below its size cap)."""

    origin: str
    nonce: int
    target: str
    KIND: ClassVar[str] = "promote"


@dataclass(frozen=True, slots=True)
class Demote:
    """Voter `target` stops voting (it stays a member and keeps its blocks)."""

    origin: str
    nonce: int
    target: str
    KIND: ClassVar[str] = "demote"


@dataclass(frozen=True, slots=True)
class Leave:
    """`origin` leaves on its own: it has stopped using its blocks, which become free."""

    origin: str
    generation: int
    nonce: int
    KIND: ClassVar[str] = "leave"


Op = Join | Renew | Claim | Remove | Free | Promote | Demote | Leave
Value = tuple[Op, ...]

FORCED_REMOVAL = "rmpeer-force"  # the operator vouches the target is gone for good
NODE_DELETED = "node-deleted"  # the orchestrator (Kubernetes) deleted the target's node
REMOVE_REASONS = frozenset(
    {"reclaim", "rmpeer", FORCED_REMOVAL, NODE_DELETED, "replaced", "left"}
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What applying one operation did; `applied` False means it was a no-op and why."""

    op: Op
    applied: bool
    reason: str = ""
    freed: tuple[int, ...] = ()
    quarantined: tuple[int, ...] = ()


# --------------------------------------------------------------------------- state


@dataclass(slots=True)
class Member:
    generation: int
    last_op_slot: int


@dataclass(frozen=True, slots=True)
class Quarantined:
    owner: str
    generation: int
    last_op_slot: int


@dataclass(frozen=True, slots=True)
class Tombstone:
    generation: int
    slot: int
    reason: str


@dataclass(slots=True)
class ClusterState:
    """One decided state. Mutated only by `apply_value` (and by a forced new era)."""

    cluster_id: str
    space: BlockSpace
    max_voters: int
    era: Era
    slot: int
    voters: tuple[str, ...]
    members: dict[str, Member]
    blocks: dict[int, str] = field(default_factory=dict)
    quarantine: dict[int, Quarantined] = field(default_factory=dict)
    tombstones: dict[str, Tombstone] = field(default_factory=dict)
    _by_owner: dict[str, list[int]] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def found(
        cls, cluster_id: str, space: BlockSpace, founder: str, max_voters: int
    ) -> ClusterState:
        """The first state of a new cluster: slot 1, the founder is the only member and voter."""
        check_name(founder)
        return cls(
            cluster_id=cluster_id,
            space=space,
            max_voters=max_voters,
            era=FOUNDING_ERA,
            slot=1,
            voters=(founder,),
            members={founder: Member(generation=1, last_op_slot=1)},
        )

    # -- queries

    @property
    def order_key(self) -> tuple[Era, int]:
        return (self.era, self.slot)

    def generation_of(self, name: str) -> int | None:
        member = self.members.get(name)
        return member.generation if member else None

    def blocks_of(self, name: str) -> list[int]:
        if self._by_owner is None:  # built lazily; then each change to `blocks` updates it
            by_owner: dict[str, list[int]] = {}
            for index, owner in sorted(self.blocks.items()):
                by_owner.setdefault(owner, []).append(index)
            self._by_owner = by_owner
        return list(self._by_owner.get(name, ()))

    def free_blocks(self) -> list[int]:
        taken = self.blocks.keys() | self.quarantine.keys()
        return [index for index in range(self.space.count) if index not in taken]

    def has_free_block(self) -> bool:
        """Is any block neither owned nor quarantined? O(1): both tables hold distinct blocks
        of the range (`validate`), so they cover it only when their sizes add up to it."""
        return len(self.blocks) + len(self.quarantine) < self.space.count

    def first_free_blocks(self, count: int) -> list[int]:
        taken = self.blocks.keys() | self.quarantine.keys()
        found: list[int] = []
        for index in range(self.space.count):
            if index not in taken:
                found.append(index)
                if len(found) == count:
                    break
        return found

    def majority(self) -> int:
        return len(self.voters) // 2 + 1

    def copy(self) -> ClusterState:
        return ClusterState(
            cluster_id=self.cluster_id,
            space=self.space,
            max_voters=self.max_voters,
            era=self.era,
            slot=self.slot,
            voters=self.voters,
            members={
                name: Member(m.generation, m.last_op_slot) for name, m in self.members.items()
            },
            blocks=dict(self.blocks),
            quarantine=dict(self.quarantine),
            tombstones=dict(self.tombstones),
        )

    # -- transitions

    def apply_value(self, value: Value) -> list[Outcome]:
        """Advance to the next slot by applying a decided value. Deterministic."""
        self.slot += 1
        outcomes = []
        for op in value:
            outcomes.append(self._apply_op(op))  # keeps `_by_owner` in step with `blocks`
        return outcomes

    def _touch(self, name: str) -> None:
        member = self.members.get(name)
        if member is not None:
            member.last_op_slot = self.slot

    def _is(self, name: str, generation: int) -> bool:
        member = self.members.get(name)
        return member is not None and member.generation == generation

    def _apply_op(self, op: Op) -> Outcome:
        if isinstance(op, Join):
            quarantined: tuple[int, ...] = ()
            old = self.members.get(op.origin)
            if old is not None:
                quarantined = self._retire(op.origin, old, "replaced", free_now=False)[1]
            self.members[op.origin] = Member(generation=self.slot, last_op_slot=self.slot)
            if len(self.voters) < self.max_voters:
                self.voters = tuple(sorted((*self.voters, op.origin)))
            return Outcome(op, True, quarantined=quarantined)
        if isinstance(op, Renew):
            if not self._is(op.origin, op.generation):
                return Outcome(op, False, "not a member at that generation")
            self._touch(op.origin)
            return Outcome(op, True)
        if isinstance(op, Claim):
            if not self._is(op.origin, op.generation):
                return Outcome(op, False, "not a member at that generation")
            taken = [b for b in op.blocks if b in self.blocks or b in self.quarantine
                     or not 0 <= b < self.space.count]  # outside the range: never free
            if taken or not op.blocks:
                return Outcome(op, False, f"blocks not free: {taken}")
            for index in op.blocks:
                self.blocks[index] = op.origin
            if self._by_owner is not None:  # one owner's list, not a rebuild of every owner's
                self._by_owner[op.origin] = sorted(
                    (*self._by_owner.get(op.origin, ()), *op.blocks))
            self._touch(op.origin)
            return Outcome(op, True)
        if isinstance(op, Remove):
            self._touch(op.origin)
            target = self.members.get(op.target)
            if target is None or target.generation != op.target_generation:
                return Outcome(op, False, "target is not a member at that generation")
            freed, quarantined = self._retire(op.target, target, op.reason, op.free_now)
            return Outcome(op, True, freed=freed, quarantined=quarantined)
        if isinstance(op, Free):
            self._touch(op.origin)
            freed = tuple(
                sorted(
                    index
                    for index, q in self.quarantine.items()
                    if q.owner == op.target and q.generation == op.target_generation
                )
            )
            for index in freed:
                del self.quarantine[index]
            return Outcome(op, bool(freed), "" if freed else "nothing quarantined", freed=freed)
        if isinstance(op, Promote):
            self._touch(op.origin)
            if op.target not in self.members or op.target in self.voters:
                return Outcome(op, False, "not a member, or already a voter")
            if len(self.voters) >= self.max_voters:
                return Outcome(op, False, "voter set is full")
            self.voters = tuple(sorted((*self.voters, op.target)))
            return Outcome(op, True)
        if isinstance(op, Demote):
            self._touch(op.origin)
            if op.target not in self.voters or len(self.voters) <= 1:
                return Outcome(op, False, "not a voter, or the last voter")
            self.voters = tuple(v for v in self.voters if v != op.target)
            return Outcome(op, True)
        if isinstance(op, Leave):
            member = self.members.get(op.origin)
            if member is None or member.generation != op.generation:
                return Outcome(op, False, "not a member at that generation")
            freed, _ = self._retire(op.origin, member, "left", free_now=True)
            return Outcome(op, True, freed=freed)
        raise AssertionError(f"unknown op {op!r}")  # pragma: no cover - Op is a closed union

    def _retire(
        self, name: str, member: Member, reason: str, free_now: bool
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Drop a member generation: out of V, blocks freed or quarantined, tombstone kept."""
        owned = tuple(self.blocks_of(name))
        for index in owned:
            del self.blocks[index]
            if not free_now:
                self.quarantine[index] = Quarantined(name, member.generation, member.last_op_slot)
        if self._by_owner is not None:
            self._by_owner.pop(name, None)
        del self.members[name]
        self.voters = tuple(v for v in self.voters if v != name)
        self.tombstones[name] = Tombstone(member.generation, self.slot, reason)
        if len(self.tombstones) > MAX_TOMBSTONES:
            oldest = min(self.tombstones, key=lambda n: self.tombstones[n].slot)
            del self.tombstones[oldest]
        return (owned, ()) if free_now else ((), owned)

    def start_forced_era(self, forcer: str, nonce: int, target: str) -> Outcome:
        """Operator override without quorum: new era, `forcer` sole voter, `target` removed.

        This is the one transition not decided by Paxos; see docs/ipam.md for what it risks.
        The forcer may have missed decisions of the old era (it was cut off), so a block that
        looks free here may be in use under a lease it never heard of: every free block, the
        target's included, is fenced (quarantined under FENCE_OWNER) until a lease has passed.
        """
        self.era = (self.era[0] + 1, forcer, nonce)
        self.slot += 1
        op = Remove(forcer, nonce, target, self.members[target].generation, FORCED_REMOVAL, False)
        member = self.members[target]
        self._retire(target, member, FORCED_REMOVAL, free_now=True)
        self._by_owner = None
        fenced = tuple(self.free_blocks())
        for index in fenced:
            self.quarantine[index] = Quarantined(FENCE_OWNER, self.era[0], self.slot)
        self.voters = (forcer,)
        self._touch(forcer)
        return Outcome(op, True, quarantined=fenced)

    # -- plain data (msgpack and JSON friendly: lists, str-keyed dicts, ints, strs, bools)

    def to_plain(self) -> dict[str, Any]:
        """Blocks name their owner by position in the (sorted) member list: 4096 blocks cost
        about 20 KB instead of 4096 repeated names."""
        position = {name: i for i, name in enumerate(sorted(self.members))}
        return {
            "cluster_id": self.cluster_id,
            "range": str(self.space.cluster_range),
            "block_prefix": self.space.block_prefix,
            "max_voters": self.max_voters,
            "era": list(self.era),
            "slot": self.slot,
            "voters": list(self.voters),
            "members": [[n, m.generation, m.last_op_slot] for n, m in sorted(self.members.items())],
            "blocks": [[i, position[o]] for i, o in sorted(self.blocks.items())],
            "quarantine": [
                [i, q.owner, q.generation, q.last_op_slot]
                for i, q in sorted(self.quarantine.items())
            ],
            "tombstones": [
                [n, t.generation, t.slot, t.reason] for n, t in sorted(self.tombstones.items())
            ],
        }

    @classmethod
    def from_plain(cls, data: object) -> ClusterState:
        """Parse and validate; raises IpamDecodeError('bad_state', why) on anything off."""
        try:
            return cls._from_plain(data)
        except IpamDecodeError:
            raise
        except (KeyError, TypeError, ValueError, BlockError) as exc:
            raise IpamDecodeError("bad_state", f"{type(exc).__name__}: {exc}") from exc

    @classmethod
    def _from_plain(cls, data: object) -> ClusterState:
        d = _mapping(data, "state")
        space = BlockSpace.parse(ipaddress.ip_network(_str(d["range"])), _int(d["block_prefix"]))
        state = cls(
            cluster_id=_str(d["cluster_id"]),
            space=space,
            max_voters=_int(d["max_voters"]),
            era=parse_era(d["era"]),
            slot=_int(d["slot"]),
            voters=tuple(check_name(_str(v)) for v in _list(d["voters"])),
            members={},
        )
        for entry in _list(d["members"]):
            name, generation, last = _list(entry, 3)
            state.members[check_name(_str(name))] = Member(_int(generation), _int(last))
        owners = sorted(state.members)
        for entry in _list(d["blocks"]):
            index, owner = _list(entry, 2)
            if not 0 <= _int(owner) < len(owners):
                raise ValueError(f"block {index} names member #{owner} of {len(owners)}")
            state.blocks[_int(index)] = owners[owner]
        for entry in _list(d["quarantine"]):
            index, owner, generation, last = _list(entry, 4)
            state.quarantine[_int(index)] = Quarantined(_str(owner), _int(generation), _int(last))
        for entry in _list(d["tombstones"]):
            name, generation, slot, reason = _list(entry, 4)
            state.tombstones[_str(name)] = Tombstone(_int(generation), _int(slot), _str(reason))
        state.validate()
        return state

    def validate(self) -> None:
        """Internal consistency; raises IpamDecodeError('bad_state', why)."""
        problems: list[str] = []
        if not self.cluster_id or len(self.cluster_id) > 64:
            problems.append("cluster id missing or too long")
        if not 1 <= self.max_voters <= 15:
            problems.append(f"max_voters {self.max_voters} outside 1..15")
        if self.slot < 1:
            problems.append("slot < 1")
        if not self.voters or len(self.voters) > self.max_voters:
            problems.append(f"{len(self.voters)} voters for a cap of {self.max_voters}")
        if tuple(sorted(set(self.voters))) != self.voters:
            problems.append("voters not sorted and unique")
        if any(v not in self.members for v in self.voters):
            problems.append("a voter is not a member")
        for name, member in self.members.items():
            if not 1 <= member.generation <= member.last_op_slot <= self.slot:
                problems.append(f"member {name} has impossible slots")
        for index, owner in self.blocks.items():
            if not 0 <= index < self.space.count:
                problems.append(f"block {index} outside the range")
            if owner not in self.members:
                problems.append(f"block {index} owned by non-member {owner}")
        for index in self.quarantine:
            if not 0 <= index < self.space.count or index in self.blocks:
                problems.append(f"quarantined block {index} invalid or owned")
        if problems:
            raise IpamDecodeError("bad_state", "; ".join(problems[:5]))


# --------------------------------------------------------------------------- ops as plain data


def op_to_plain(op: Op) -> list[Any]:
    if isinstance(op, Join):
        return [op.KIND, op.origin, op.nonce]
    if isinstance(op, Renew | Leave):
        return [op.KIND, op.origin, op.generation, op.nonce]
    if isinstance(op, Claim):
        return [op.KIND, op.origin, op.generation, op.nonce, list(op.blocks)]
    if isinstance(op, Remove):
        return [
            op.KIND,
            op.origin,
            op.nonce,
            op.target,
            op.target_generation,
            op.reason,
            op.free_now,
        ]
    if isinstance(op, Free):
        return [op.KIND, op.origin, op.nonce, op.target, op.target_generation]
    return [op.KIND, op.origin, op.nonce, op.target]  # Promote | Demote


def op_from_plain(data: object) -> Op:
    """Parse one operation; raises IpamDecodeError('bad_op', why)."""
    try:
        items = _list(data)
        kind = _str(items[0]) if items else ""
        fields = items[1:]
        op: Op
        if kind == Join.KIND:
            origin, nonce = _exact(fields, 2)
            op = Join(check_name(_str(origin)), _int(nonce))
        elif kind in (Renew.KIND, Leave.KIND):
            origin, generation, nonce = _exact(fields, 3)
            cls = Renew if kind == Renew.KIND else Leave
            op = cls(check_name(_str(origin)), _int(generation), _int(nonce))
        elif kind == Claim.KIND:
            origin, generation, nonce, blocks = _exact(fields, 4)
            indices = tuple(_int(b) for b in _list(blocks))
            if not 1 <= len(indices) <= MAX_BLOCKS_PER_CLAIM or len(set(indices)) != len(indices):
                raise ValueError(f"claim of {len(indices)} blocks")
            op = Claim(check_name(_str(origin)), _int(generation), _int(nonce), indices)
        elif kind == Remove.KIND:
            origin, nonce, target, tgen, reason, free_now = _exact(fields, 6)
            if _str(reason) not in REMOVE_REASONS:
                raise ValueError(f"unknown remove reason {reason!r}")
            op = Remove(
                check_name(_str(origin)),
                _int(nonce),
                check_name(_str(target)),
                _int(tgen),
                _str(reason),
                _bool(free_now),
            )
        elif kind == Free.KIND:
            origin, nonce, target, tgen = _exact(fields, 4)
            op = Free(check_name(_str(origin)), _int(nonce), check_name(_str(target)), _int(tgen))
        elif kind in (Promote.KIND, Demote.KIND):
            origin, nonce, target = _exact(fields, 3)
            pcls = Promote if kind == Promote.KIND else Demote
            op = pcls(check_name(_str(origin)), _int(nonce), check_name(_str(target)))
        else:
            raise ValueError(f"unknown op kind {kind!r}")
        return op
    except IpamDecodeError:
        raise
    except (TypeError, ValueError, IndexError) as exc:
        raise IpamDecodeError("bad_op", str(exc)) from exc


def value_to_plain(value: Value) -> list[Any]:
    return [op_to_plain(op) for op in value]


def value_from_plain(data: object) -> Value:
    items = _list(data) if isinstance(data, list) else None
    if items is None or not 1 <= len(items) <= MAX_OPS_PER_VALUE:
        raise IpamDecodeError("bad_op", f"a value holds 1..{MAX_OPS_PER_VALUE} ops")
    return tuple(op_from_plain(item) for item in items)


def parse_era(data: object) -> Era:
    number, forcer, nonce = _list(data, 3)
    return (_int(number), _str(forcer), _int(nonce))


# --------------------------------------------------------------------------- strict helpers


def check_name(name: str) -> str:
    if not name or len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"node name must be 1..{MAX_NAME_LENGTH} characters, got {len(name)}")
    return name


def _mapping(data: object, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise TypeError(f"{what} must be a map, got {type(data).__name__}")
    return data


def _list(data: object, length: int | None = None) -> list[Any]:
    if not isinstance(data, list | tuple):
        raise TypeError(f"expected a list, got {type(data).__name__}")
    if length is not None and len(data) != length:
        raise ValueError(f"expected {length} items, got {len(data)}")
    return list(data)


def _exact(items: list[Any], length: int) -> list[Any]:
    if len(items) != length:
        raise ValueError(f"expected {length} fields, got {len(items)}")
    return items


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    if not -(2**63) <= value < 2**64:
        raise ValueError("integer out of range")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {type(value).__name__}")
    return value


def _float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    result = float(value)
    if math.isnan(result):
        raise ValueError("NaN")
    return result


def names(items: Iterable[object]) -> list[str]:
    return [check_name(_str(item)) for item in items]


# Re-exported strict readers for the wire codec (same rules everywhere).
read_int = _int
read_str = _str
read_bool = _bool
read_float = _float
read_list = _list
read_mapping = _mapping
