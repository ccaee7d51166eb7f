"""The reference evaluator: verdicts and the policies that decided them (what `weavepy
policy explain` prints), for pods, the node itself and addresses outside the cluster."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from weavepy.policy.evaluator import Host, allowed, selecting_policies
from weavepy.policy.model import (
    ClusterState,
    IPBlock,
    Labels,
    LabelSelector,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyPort,
    Rule,
)

A = Pod("x", "a", Labels({"pod": "a"}), IPv4Address("198.19.0.2"), "n1")
B = Pod("y", "b", Labels({"pod": "b"}), IPv4Address("198.19.0.3"), "n2")
OUTSIDE = IPv4Address("198.18.5.5")
DENY_A = NetworkPolicy("x", "deny", LabelSelector(Labels({"pod": "a"})),
                       policy_types=frozenset({"ingress", "egress"}))
FROM_OUTSIDE = NetworkPolicy("x", "outside", LabelSelector(), ingress=(
    Rule((Peer(ip_block=IPBlock(IPv4Network("198.18.0.0/16"))),), (PolicyPort("TCP", 80),)),))


def test_no_policy_allows_and_says_so() -> None:
    verdict = allowed(ClusterState(pods=(A, B)), A, B, 80, "TCP")
    assert verdict.allowed and verdict.reason == "no policy selects either end"


def test_a_denial_names_the_isolating_policies_and_the_end() -> None:
    state = ClusterState((DENY_A, FROM_OUTSIDE), (A, B))
    verdict = allowed(state, B, A, 80, "TCP")
    assert not verdict.allowed
    assert verdict.deciding_policies == ("x/deny", "x/outside")
    assert verdict.text() == (
        "denied: ingress of x/a is isolated and no rule matches\n"
        "  egress of y/b: allowed (no policy selects it)\n"
        "  ingress of x/a: denied (isolated by x/deny, x/outside; no rule matches)")


def test_an_allow_names_the_allowing_policy() -> None:
    state = ClusterState((DENY_A, FROM_OUTSIDE), (A, B))
    verdict = allowed(state, OUTSIDE, A, 80, "TCP")
    assert verdict.allowed and verdict.deciding_policies == ("x/outside",)
    assert verdict.reason == "allowed by x/outside"
    assert not allowed(state, OUTSIDE, A, 81, "TCP").allowed
    assert not allowed(state, OUTSIDE, A, None, "ICMP").allowed
    # egress of x/a to the outside is denied by x/deny; nothing else is consulted
    out = allowed(state, A, OUTSIDE, 80, "TCP")
    assert not out.allowed and [d.direction for d in out.decisions] == ["egress"]


def test_the_node_and_the_pod_itself_always_pass() -> None:
    state = ClusterState((DENY_A,), (A, B))
    assert allowed(state, Host("n1", IPv4Address("198.18.0.11")), A, 80, "TCP").allowed
    assert allowed(state, A, Host("n1", IPv4Address("198.18.0.11")), 80, "TCP").allowed
    assert not allowed(state, Host("n2", IPv4Address("198.18.0.12")), A, 80, "TCP").allowed
    assert allowed(state, A, A, 80, "TCP").allowed


def test_pods_are_looked_up_in_the_state() -> None:
    relabelled = Pod("x", "a", Labels({"pod": "z"}), A.ip, "n1")
    state = ClusterState((DENY_A,), (relabelled, B))
    assert allowed(state, B, A, 80, "TCP").allowed  # the state's x/a no longer matches
    assert selecting_policies(state, relabelled, "ingress") == []


def test_a_port_protocol_needs_a_port() -> None:
    with pytest.raises(ValueError, match="a TCP connection needs a port"):
        allowed(ClusterState(), A, B, None, "TCP")
