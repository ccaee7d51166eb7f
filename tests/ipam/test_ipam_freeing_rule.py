"""The freeing rule (core.py rule 5): space is freed only on a majority's attested silence of a
lease, whatever the liveness policy proposes."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import pytest

from weavepy.ipam import liveness
from weavepy.ipam.core import IpamCore, attested_silent, frees_safely
from weavepy.ipam.liveness import Attested, CoreView, Intent, Proposal
from weavepy.ipam.state import FORCED_REMOVAL, Claim, Free, Op, Promote, Remove
from weavepy.ipam.status import SlotDecided
from weavepy.ipam.wire import Attestation, Promise

LEASE = 60.0
BALLOT = (1, "n1", 7)


def promise(*answers: Attestation) -> Promise:
    return Promise(2, BALLOT, None, answers)


def silent(age: float, *, alive: bool = False) -> Attestation:
    return Attestation("gone", 3, alive, age)


def test_attested_silent_needs_every_promiser_to_say_so() -> None:
    assert attested_silent([promise(silent(61)), promise(silent(600))], "gone", 3, LEASE)
    assert not attested_silent([promise(silent(61)), promise(silent(59))], "gone", 3, LEASE)
    assert not attested_silent([promise(silent(61)), promise(silent(61, alive=True))],
                               "gone", 3, LEASE)
    assert not attested_silent([promise(silent(61)), promise()], "gone", 3, LEASE)  # no answer
    assert not attested_silent([promise(silent(61))], "gone", 4, LEASE)  # another generation


@pytest.mark.parametrize(
    ("op", "needs_silence"),
    [
        (Free("n1", 1, "gone", 3), True),
        (Remove("n1", 1, "gone", 3, "reclaim", True), True),
        (Remove("n1", 1, "gone", 3, "rmpeer", True), True),
        (Remove("n1", 1, "gone", 3, "rmpeer", False), False),  # quarantined, not freed
        (Remove("n1", 1, "gone", 3, FORCED_REMOVAL, True), False),  # the operator's word
        (Promote("n1", 1, "gone"), False),
    ],
)
def test_frees_safely_applies_to_operations_that_free_space(op: Op, needs_silence: bool) -> None:
    attested = [promise(silent(LEASE)), promise(silent(LEASE))]
    not_long_enough = [promise(silent(LEASE)), promise(silent(LEASE - 1))]
    assert frees_safely(op, attested, LEASE)
    assert frees_safely(op, not_long_enough, LEASE) is not needs_silence


def test_the_core_drops_what_the_policy_proposes_against_the_rule(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A policy that wrongly proposes to free a generation nobody attested about: the core
    proposes the rest of the value and never the freeing operations."""
    honest = liveness.build_value

    def careless(wanted: list[Intent], view: CoreView, attested: Attested,
                 nonce: Callable[[], int]) -> Proposal:
        proposal = honest(wanted, view, attested, nonce)
        wrong = (Free(view.name, 11, "ghost", 5),
                 Remove(view.name, 12, "ghost", 5, "reclaim", True))
        return Proposal((*proposal.value, *wrong), proposal.refused)

    monkeypatch.setattr(liveness, "build_value", careless)
    caplog.set_level(logging.ERROR, logger="weavepy.ipam.core")
    core = IpamCore("n1", "198.19.0.0/16", 24, rng=random.Random(1), bootstrap="found")
    core.handle_timer(0.0)
    core.request_block(0.0, count=1)
    core.mark_persisted(core.snapshot()["seq"])
    decided = [e.value for e in core.events() if isinstance(e, SlotDecided)]
    assert decided, "the claim was decided"
    ops = [op for value in decided for op in value]
    assert any(isinstance(op, Claim) for op in ops)
    assert not any(isinstance(op, Free | Remove) for op in ops)
    assert "did not attest a lease of silence" in caplog.text
    assert [str(core.space.block(i)) for i in core.held_blocks()] == ["198.19.0.0/24"]
