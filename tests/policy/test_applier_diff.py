"""The applier's diff (`ruleset.incremental`): the table after the old table and the diff is
the table a full replace writes, through the interpreter (which refuses, as the kernel does,
to delete a chain that holds rules or anything still named) and through a real kernel in a
network namespace of the worker's own (`unshare -n`). Named counters that stay keep their
values across a diff."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.policy.conftest import NftWorker
from tests.policy.strategies import NODES, clusters
from weavepy.devtools.policy_workload import synthetic_cluster
from weavepy.policy.compiler import CompileOptions, compile_policy
from weavepy.policy.model import ClusterState
from weavepy.policy.nftsim import SimTable
from weavepy.policy.ruleset import Ruleset, full_replace, incremental, parse_listing

MARKER = "gen 1"


def _compiled(state: ClusterState, node: str, audit: bool = False) -> Ruleset:
    return compile_policy(state, node, CompileOptions(audit=audit)).ruleset


def _same(left: SimTable, right: SimTable) -> None:
    assert left.chains == right.chains
    assert left.sets == right.sets
    assert left.counters.keys() == right.counters.keys()
    assert left.limits == right.limits


def _diff(old: Ruleset, new: Ruleset) -> list[dict[str, Any]]:
    commands = incremental(old, new)
    assert commands is not None, "the compiler's tables always differ by a diff"
    return commands


@settings(max_examples=100, deadline=None)
@given(clusters(), clusters(), st.sampled_from(NODES), st.booleans())
def test_a_diff_makes_the_table_a_replace_makes(before: ClusterState, after: ClusterState,
                                                node: str, audit: bool) -> None:
    old, new = _compiled(before, node), _compiled(after, node, audit)
    applied = SimTable.from_commands([*full_replace(old, MARKER), *_diff(old, new)])
    _same(applied, SimTable.from_commands(full_replace(new, MARKER)))


def test_a_pod_with_a_new_set_of_policies_adds_its_chains_and_touches_nothing_else() -> None:
    state = synthetic_cluster(100, nodes=3)
    local = [p for p in state.pods if p.node == "n1"]
    # a web pod (app=a1) moves to n1 in a namespace whose web pods n1 does not hold yet:
    # the node has no chain for its set of policies
    webs = [p for p in state.pods if p.labels.get("app") == "a1"]
    web = next(p for p in webs if not any(o.node == "n1" and o.namespace == p.namespace
                                          for o in webs))
    newcomer = type(web)(web.namespace, "newcomer", web.labels, web.ip, "n1", web.ports)
    others = tuple(p for p in state.pods if p.key != web.key)
    old = _compiled(state, "n1")
    new = _compiled(ClusterState(state.policies, (*others, newcomer), state.namespaces), "n1")
    commands = _diff(old, new)
    verbs = {(next(iter(c)), next(iter(next(iter(c.values()))))) for c in commands}
    assert ("add", "chain") in verbs and ("add", "rule") in verbs
    assert not {v for v in verbs if v[0] != "add" or v[1] == "table"}  # nothing else moved
    assert len(commands) < 40 < len(full_replace(new, MARKER))
    assert len(local) > 1  # the node held other pods, whose chains and sets stayed
    _same(SimTable.from_commands([*full_replace(old, MARKER), *commands]),
          SimTable.from_commands(full_replace(new, MARKER)))
    back = _diff(new, old)  # the pod goes: its chains go with it
    assert ("delete", "chain") in {(next(iter(c)), next(iter(next(iter(c.values())))))
                                   for c in back}


def test_only_a_replace_changes_the_base_chains_or_the_table() -> None:
    state = synthetic_cluster(30)
    old = _compiled(state, "n1")
    moved = compile_policy(state, "n1", CompileOptions(priority=5)).ruleset
    renamed = compile_policy(state, "n1", CompileOptions(table="other")).ruleset
    assert incremental(old, moved) is None and incremental(old, renamed) is None


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(900)
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(clusters(), min_size=2, max_size=4), st.sampled_from(NODES), st.booleans())
def test_the_kernel_holds_after_a_diff_what_it_holds_after_a_replace(
        nft_worker: NftWorker, states: list[ClusterState], node: str, audit: bool) -> None:
    tables = [_compiled(s, node, audit and i == len(states) - 1) for i, s in enumerate(states)]
    first = tables[0]
    values = {name: (7, 700) for name in first.counters}
    answer = nft_worker.run(full_replace(first, MARKER, values), first.table)
    assert answer["ok"], answer["error"]
    for old, new in itertools.pairwise(tables):
        answer = nft_worker.run(_diff(old, new), new.table)
        assert answer["ok"], answer["error"]
        by_diff = answer["listing"]
        assert parse_listing(by_diff).differences(new, MARKER) == []
    last = tables[-1]
    kept = parse_listing(by_diff).counters
    replaced = nft_worker.run(full_replace(last, MARKER), last.table)
    assert replaced["ok"], replaced["error"]
    _same(SimTable.from_listing(by_diff), SimTable.from_listing(replaced["listing"]))
    # counters the diffs never removed kept their values; new ones start at zero
    for name in last.counters:
        stayed = all(name in t.counters for t in tables)
        assert kept[name] == ((7, 700) if stayed else (0, 0))
