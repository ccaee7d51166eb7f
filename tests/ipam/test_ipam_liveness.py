"""The liveness policy's tables and rules (its effect on whole clusters is in test_ipam_core.py
and the property tests)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from weavepy.ipam import wire
from weavepy.ipam.blocks import BlockSpace
from weavepy.ipam.core import PHASES, Phase
from weavepy.ipam.liveness import (
    ATTESTED_KINDS,
    BUILDERS,
    Intent,
    IntentKind,
    Proposal,
    Timings,
    Wishes,
    build_value,
    retry_pause,
    with_questions,
)
from weavepy.ipam.state import (
    FORCED_REMOVAL,
    MAX_OPS_PER_VALUE,
    Claim,
    ClusterState,
    Demote,
    Free,
    Join,
    Member,
    Remove,
    Renew,
)


def test_every_intent_kind_has_a_builder_and_every_phase_a_rule() -> None:
    assert set(BUILDERS) == set(IntentKind)
    assert set(PHASES) == set(Phase)


def test_questions_are_asked_once_and_only_as_many_as_a_prepare_carries() -> None:
    wanted = [Intent(IntentKind.CLAIM), Intent(IntentKind.RMPEER, "x", 1, force=True)]
    wanted += [Intent(IntentKind.RECLAIM, f"d{i}", i) for i in range(wire.MAX_ASKS + 2)]
    wanted += [Intent(IntentKind.FREE, "d0", 0), Intent(IntentKind.RENEW)]
    kept, asks = with_questions(wanted)
    assert asks == tuple((f"d{i}", i) for i in range(wire.MAX_ASKS))
    # the intents whose question did not fit wait; the others (and a repeated question) stay
    assert [i.target for i in kept if i.kind is IntentKind.RECLAIM] == [
        f"d{i}" for i in range(wire.MAX_ASKS)]
    assert Intent(IntentKind.FREE, "d0", 0) in kept
    assert kept[:2] == wanted[:2] and kept[-1] == Intent(IntentKind.RENEW)
    assert {i.kind for i in kept if i.question is not None} <= ATTESTED_KINDS


def test_back_off_is_random_and_bounded_by_its_ceiling() -> None:
    timings = Timings()
    rng = random.Random(5)
    lost = [retry_pause(timings, attempts, False, rng) for attempts in range(1, 40)]
    timed_out = [retry_pause(timings, attempts, True, rng) for attempts in range(1, 40)]
    assert all(0 < pause <= timings.backoff_max for pause in lost)
    assert all(0 < pause <= timings.retry_max for pause in timed_out)
    assert max(timed_out) > timings.backoff_max  # timeouts back off further
    assert len(set(lost)) == len(lost)  # competing proposers do not wait in step
    first = retry_pause(timings, 1, False, rng)
    assert first <= timings.resend_interval * 2  # the first retry is quick


@dataclass
class View:
    """A member's view for the builders: only what `liveness.CoreView` reads."""

    cluster: ClusterState
    name: str = "n1"
    generation: int | None = 1
    left: bool = False
    lease: float = 60.0
    lease_until: float = 100.0
    reclaim_after: float | None = 300.0
    timings: Timings = field(default_factory=lambda: Timings(voter_replace_after=40.0))
    wishes: Wishes = field(default_factory=Wishes)

    def is_member(self) -> bool:
        return self.generation is not None

    def is_voter(self) -> bool:
        return self.name in self.cluster.voters

    def alive_gen(self, name: str, generation: int) -> bool:
        return name == self.name

    def silent_members(self) -> list[tuple[str, Member]]:
        return [(n, m) for n, m in self.cluster.members.items() if n != self.name]

    def evidence_age(self, name: str, generation: int, now: float) -> float:
        return 0.0 if self.alive_gen(name, generation) else now

    def last_evidence(self, name: str, generation: int) -> float:
        return 0.0


def build(view: View, wanted: list[Intent], silent_for: float,
          alive: frozenset[str] = frozenset()) -> Proposal:
    """Build a value as if every promiser attested each target silent for `silent_for`."""
    nonces = iter(range(1, 100))

    def attested(target: str, generation: int, *, min_age: float) -> bool:
        return target not in alive and silent_for >= min_age

    return build_value(wanted, view, attested, lambda: next(nonces))


def a_view() -> View:
    state = ClusterState.found("c0ffee", BlockSpace.parse("198.19.0.0/16", 24), "n1", 5)
    state.apply_value((Join("n2", 1), Join("n3", 2)))
    return View(state)


def test_each_intent_needs_its_own_length_of_attested_silence() -> None:
    view = a_view()
    wanted = [Intent(IntentKind.RECLAIM, "n2", 2), Intent(IntentKind.FREE, "n3", 2),
              Intent(IntentKind.DEMOTE, "n3", 2)]
    # silent for more than voter_replace_after (40 s) and a lease (60 s), less than 300 s
    assert build(view, wanted, 100.0).value == (Free("n1", 1, "n3", 2), Demote("n1", 2, "n3"))
    assert build(view, wanted, 50.0).value == (Demote("n1", 1, "n3"),)
    assert build(view, wanted, 300.0).value == (
        Remove("n1", 1, "n2", 2, "reclaim", True), Free("n1", 2, "n3", 2),
        Demote("n1", 3, "n3"))


def test_rmpeer_frees_after_a_lease_quarantines_before_and_is_refused_if_alive() -> None:
    view = a_view()
    rmpeer = [Intent(IntentKind.RMPEER, "n2", 2)]
    assert build(view, rmpeer, 61.0).value == (Remove("n1", 1, "n2", 2, "rmpeer", True),)
    assert build(view, rmpeer, 5.0).value == (Remove("n1", 1, "n2", 2, "rmpeer", False),)
    refused = build(view, rmpeer, 500.0, alive=frozenset({"n2"}))
    assert refused.value == () and "still sees it alive" in refused.refused["n2"]
    forced = build(view, [Intent(IntentKind.RMPEER, "n2", 2, force=True)], 0.0,
                   alive=frozenset({"n2"}))
    assert forced.value == (Remove("n1", 1, "n2", 2, FORCED_REMOVAL, True),)


def test_a_renewal_only_rides_alone_and_a_value_stays_small() -> None:
    view = a_view()
    view.wishes.blocks = 2
    assert build(view, [Intent(IntentKind.RENEW)], 0.0).value == (Renew("n1", 1, 1),)
    claimed = build(view, [Intent(IntentKind.CLAIM), Intent(IntentKind.RENEW)], 0.0).value
    assert claimed == (Claim("n1", 1, 1, (0, 1)),)  # the claim renews the lease too
    many = [Intent(IntentKind.PROMOTE, f"n{i}") for i in range(20)]
    assert len(build(view, many, 0.0).value) == MAX_OPS_PER_VALUE
