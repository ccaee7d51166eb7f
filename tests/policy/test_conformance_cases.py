"""The conformance cases' hand-written truth tables agree with the reference evaluator and
with the compiled tables of the three nodes (run by the interpreter), step by step; every
family of the research file is covered. A runner on real packets uses the same data
(weavepy/devtools/policy_conformance.py)."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from tests.policy.strategies import enforced, node_tables
from weavepy.devtools.policy_conformance import (
    CASES,
    FAMILIES,
    NODES,
    PLACEMENT,
    Case,
    Reach,
    World,
)
from weavepy.policy.evaluator import allowed


def addresses_for(world: World) -> None:
    """Made-up addresses in the pod range, never reused (a runner takes IPAM's)."""
    used = set(world.addresses.values())
    candidate = IPv4Address("198.19.0.10")
    for key in sorted(world.pods):
        if key not in world.addresses:
            while candidate in used:
                candidate += 7
            world.set_address(key, candidate)
            used.add(candidate)


def test_every_family_is_covered() -> None:
    assert {case.family for case in CASES} == set(FAMILIES) == set(range(1, 22))
    assert len({(c.family, c.name) for c in CASES}) == len(CASES)
    assert set(PLACEMENT.values()) == set(NODES)
    # every node pair is exercised by the default pods: same node and cross node
    same = {(a, b) for a in PLACEMENT for b in PLACEMENT
            if a != b and PLACEMENT[a] == PLACEMENT[b]}
    assert same and len(same) < 72


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.family:02d}-{c.name}")
def test_truth_tables_agree_with_the_evaluator_and_the_compiler(case: Case) -> None:
    world = World.initial()
    for number, step in enumerate(case.steps):
        for action in step.actions:
            addresses_for(world)
            world.apply(action)
        addresses_for(world)
        state = world.state()
        tables = node_tables(state, nodes=NODES)
        pods = {p.key: p for p in state.pods}
        for probe in step.probes:
            if probe.expected is None:
                assert probe.over_established
                continue
            wrong_spec, wrong_rules = [], []
            for (src, dst), expected in probe.expected.table(pods).items():
                verdict = allowed(state, pods[src], pods[dst], probe.port, probe.protocol)
                if verdict.allowed != expected:
                    wrong_spec.append(f"{src} -> {dst}: {verdict.text()}")
                if enforced(tables, pods[src], pods[dst], probe.port,
                            probe.protocol) != expected:
                    wrong_rules.append(f"{src} -> {dst}")
            where = f"step {number} probe {probe.port}/{probe.protocol}"
            assert not wrong_spec, f"{where}: the evaluator disagrees:\n" + "\n".join(
                wrong_spec) + "\nexpected:\n" + probe.expected.text(pods)
            assert not wrong_rules, f"{where}: the compiled rules disagree: {wrong_rules}"


def test_reach_edits_apply_in_order_and_skip_loopback() -> None:
    reach = Reach().deny_ingress("x/*").allow("y/*", "x/a").deny("y/b", "x/a")
    table = reach.table(["x/a", "x/b", "y/a", "y/b"])
    assert ("x/a", "x/a") not in table
    assert table[("y/a", "x/a")] and not table[("y/b", "x/a")]
    assert not table[("x/b", "x/a")] and table[("x/a", "y/b")]
