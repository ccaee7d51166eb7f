"""The compiler agrees with the reference evaluator, over random policies, pods and
connections: each node's compiled table is rendered to libnftables JSON and run by the
interpreter (weavepy.policy.nftsim) on the nodes whose forward hook the packet passes."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.policy.strategies import clusters, connections, enforced, node_tables
from weavepy.policy.compiler import CompileOptions
from weavepy.policy.evaluator import allowed


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_compiled_tables_agree_with_the_evaluator(data: Any) -> None:
    state = data.draw(clusters())
    tables = node_tables(state)
    for _ in range(20):
        src, dst, port, protocol = data.draw(connections(state))
        verdict = allowed(state, src, dst, port, protocol)
        assert enforced(tables, src, dst, port, protocol) == verdict.allowed, verdict.text()
        # replies (and the rest of a connection allowed when it began) always pass
        assert enforced(tables, src, dst, port, protocol, "established")


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_audit_mode_passes_everything_the_evaluator_denies(data: Any) -> None:
    state = data.draw(clusters())
    tables = node_tables(state, CompileOptions(audit=True))
    for _ in range(8):
        src, dst, port, protocol = data.draw(connections(state))
        assert enforced(tables, src, dst, port, protocol)
