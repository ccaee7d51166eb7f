"""The compiler's table: its layout, what is enforced on which node, audit mode, the
incremental path's precondition, and sizes that grow linearly with pods and policies."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from tests.policy.strategies import enforced, node_tables
from weavepy.devtools.policy_workload import synthetic_cluster
from weavepy.policy.compiler import CompileOptions, compile_policy
from weavepy.policy.evaluator import Host, allowed
from weavepy.policy.model import (
    ClusterState,
    ContainerPort,
    IPBlock,
    Labels,
    LabelSelector,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyPort,
    Rule,
)
from weavepy.policy.nftsim import Packet
from weavepy.policy.ruleset import incremental


def pod(namespace: str, name: str, address: int, node: str = "n1", **labels: str) -> Pod:
    return Pod(namespace, name, Labels(labels), IPv4Address(f"198.19.0.{address}"), node,
               (ContainerPort(80, "TCP", "http"), ContainerPort(53, "UDP", "dns")))


A, B, C = pod("x", "a", 2, pod="a"), pod("x", "b", 3, pod="b"), pod("y", "c", 4, "n2", pod="c")
DENY_ALL = NetworkPolicy("x", "deny-all", LabelSelector(), policy_types=frozenset(
    {"ingress", "egress"}))
ALLOW_B = NetworkPolicy("x", "allow-b", LabelSelector(Labels({"pod": "a"})), ingress=(
    Rule((Peer(pod_selector=LabelSelector(Labels({"pod": "b"}))),), (PolicyPort("TCP", 80),)),))


def test_layout_dispatches_only_this_nodes_isolated_pods() -> None:
    state = ClusterState((ALLOW_B,), (A, B, C))
    compiled = compile_policy(state, "n1")
    rs = compiled.ruleset
    assert rs.table == "weavepy-policy" and rs.family == "inet"
    assert [(c.name, c.hook) for c in rs.base_chains()] == [("egress", "forward"),
                                                            ("ingress", "forward")]
    chain = compiled.isolated["x/a"]["ingress"]
    assert rs.elements["ingress-pods"] == {("198.19.0.2", chain)}
    assert rs.elements["egress-pods"] == frozenset()
    assert compiled.signatures == {chain: ("x/allow-b",)}
    assert compiled.drop_counters["in.x.a"] == ("x/a", "ingress")
    # the peer set holds x/b; node n2 has nothing isolated and compiles no policy chain
    assert frozenset({"198.19.0.3"}) in rs.elements.values()
    other = compile_policy(state, "n2").ruleset
    assert len(other.chains) == 2 and other.elements["ingress-pods"] == frozenset()


def test_pods_with_the_same_policies_share_one_chain() -> None:
    state = ClusterState((DENY_ALL,), (A, B, pod("x", "d", 5)))
    compiled = compile_policy(state, "n1")
    assert len(compiled.signatures) == 2  # one per direction, whatever the pod count
    assert len(compiled.ruleset.elements["ingress-pods"]) == 3


def test_node_traffic_and_replies_pass_and_the_other_node_enforces_nothing_local() -> None:
    state = ClusterState((DENY_ALL,), (A, B, C))
    tables = node_tables(state)
    assert not enforced(tables, C, A, 80, "TCP")
    assert not enforced(tables, A, C, 80, "TCP")  # egress denied on x/a's node
    assert enforced(tables, Host("n1", IPv4Address("198.18.0.11")), A, 80, "TCP")
    assert enforced(tables, A, Host("n1", IPv4Address("198.18.0.11")), 80, "TCP")
    assert not enforced(tables, Host("n2", IPv4Address("198.18.0.12")), A, 80, "TCP")
    assert enforced(tables, C, A, 80, "TCP", "established")


def test_named_ports_resolve_per_destination_and_a_wrong_protocol_denies() -> None:
    web = NetworkPolicy("x", "named", LabelSelector(), ingress=(
        Rule((), (PolicyPort("TCP", "http"), PolicyPort("TCP", "dns"))),))
    b8080 = Pod("x", "b", Labels(), IPv4Address("198.19.0.3"), "n1",
                (ContainerPort(8080, "TCP", "http"),))
    state = ClusterState((web,), (A, b8080, C))
    tables = node_tables(state)
    for dst, port, protocol, expected in ((A, 80, "TCP", True), (A, 8080, "TCP", False),
                                          (b8080, 8080, "TCP", True), (b8080, 80, "TCP", False),
                                          (A, 53, "UDP", False), (A, 53, "TCP", False)):
        assert enforced(tables, C, dst, port, protocol) is expected, (dst.name, port, protocol)
        assert allowed(state, C, dst, port, protocol).allowed is expected


def test_ip_block_except_and_end_port() -> None:
    policy = NetworkPolicy("x", "cidr", LabelSelector(), ingress=(Rule(
        (Peer(ip_block=IPBlock(IPv4Network("198.19.0.0/24"),
                               (IPv4Network("198.19.0.4/32"),))),),
        (PolicyPort("TCP", 80, 82),)),))
    outside = pod("z", "o", 9, "n2")
    state = ClusterState((policy,), (A, C, outside))
    tables = node_tables(state)
    assert enforced(tables, outside, A, 81, "TCP")
    assert not enforced(tables, outside, A, 83, "TCP")
    assert not enforced(tables, C, A, 81, "TCP")  # 198.19.0.4 is excepted


def test_audit_mode_logs_and_counts_what_it_would_drop_and_passes_it() -> None:
    state = ClusterState((DENY_ALL,), (A, C))
    table = node_tables(state, CompileOptions(audit=True))["n1"]
    result = table.run(Packet(C.ip, A.ip, "tcp", 80))  # type: ignore[arg-type]
    assert result.verdict == "accept"
    assert any(line.startswith("weavepy-policy audit ingress-") for line in result.logs)
    assert "in.x.a" in result.counters
    enforcing = node_tables(state)["n1"].run(Packet(C.ip, A.ip, "tcp", 80))  # type: ignore
    assert enforcing.verdict == "drop" and enforcing.logs[0].startswith("weavepy-policy drop")


def test_sctp_compiles_to_rules() -> None:
    policy = NetworkPolicy("x", "sctp", LabelSelector(), ingress=(
        Rule((), (PolicyPort("SCTP", 80),)),))
    tables = node_tables(ClusterState((policy,), (A, C)))
    assert enforced(tables, C, A, 80, "SCTP")
    assert not enforced(tables, C, A, 80, "TCP")


def test_only_elements_differ_when_a_pod_joins_an_existing_set_of_policies() -> None:
    before = compile_policy(ClusterState((DENY_ALL, ALLOW_B), (A, B, C)), "n1").ruleset
    joined = pod("x", "a2", 7, pod="a")
    after = compile_policy(ClusterState((DENY_ALL, ALLOW_B), (A, B, C, joined)), "n1").ruleset
    commands = incremental(before, after)
    assert commands is not None
    assert {next(iter(c)) for c in commands} == {"add"}
    assert {next(iter(next(iter(c.values())))) for c in commands} == {"element", "counter"}
    back = incremental(after, before)  # and the way back deletes them
    assert back is not None and {next(iter(c)) for c in back} == {"delete"}
    # a pod relabelled into a peer set (x/b2 gets pod=b): one element more
    b2, b2_relabelled = pod("x", "b2", 8, pod="z"), pod("x", "b2", 8, pod="b")
    commands = incremental(
        compile_policy(ClusterState((ALLOW_B,), (A, B, C, b2)), "n1").ruleset,
        compile_policy(ClusterState((ALLOW_B,), (A, B, C, b2_relabelled)), "n1").ruleset)
    assert commands is not None and len(commands) == 1
    assert commands[0]["add"]["element"]["elem"] == ["198.19.0.8"]
    # a new policy adds chains: still a diff, with no set or table re-created
    new_policy = NetworkPolicy("x", "new", LabelSelector(Labels({"pod": "b"})))
    commands = incremental(before, compile_policy(
        ClusterState((DENY_ALL, ALLOW_B, new_policy), (A, B, C)), "n1").ruleset)
    assert commands is not None
    assert {"chain", "rule"} <= {next(iter(next(iter(c.values())))) for c in commands}


@pytest.mark.parametrize("nodes", [1, 3])
def test_ruleset_size_grows_linearly_in_pods_and_policies(nodes: int) -> None:
    """Counts, not time: 10x the pods (and policies) is at most 10x the rules, chains, set
    elements and counters, on the node holding the most pods. Per-pair rules would be 100x."""
    sizes = {}
    for pods in (100, 1000):
        state = synthetic_cluster(pods, nodes=nodes)
        sizes[pods] = compile_policy(state, "n1").ruleset.size()
        size = sizes[pods]
        assert size.elements <= 6 * pods and size.rules <= 2 * pods + 8
    small, large = sizes[100], sizes[1000]
    for field in ("rules", "chains", "elements", "counters", "sets"):
        ratio = getattr(large, field) / getattr(small, field)
        assert ratio <= 10.0, (field, getattr(small, field), getattr(large, field))
    assert large.elements >= 9 * small.elements  # and it does grow: the test can fail


def test_the_interpreter_refuses_what_it_does_not_know() -> None:
    from weavepy.policy.nftsim import SimError, SimTable

    table = SimTable.from_commands([
        {"add": {"table": {"family": "inet", "name": "t"}}},
        {"add": {"chain": {"family": "inet", "table": "t", "name": "c", "type": "filter",
                           "hook": "forward", "prio": 0, "policy": "accept"}}},
        {"add": {"rule": {"family": "inet", "table": "t", "chain": "c", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 1}},
            {"drop": None}]}}}])
    with pytest.raises(SimError, match="unknown expression 'meta'"):
        table.run(Packet(IPv4Address("198.19.0.2"), IPv4Address("198.19.0.3"), "tcp", 80))
