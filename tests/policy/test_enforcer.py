"""The enforcer's pure parts: `explain` (the reference evaluator on the live state, with one
readable error per bad request) and the status document (drops attributed from the
compiler's named counters). The kernel side runs with real agents in
tests/agent/test_policy_netns.py."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from weavepy.policy.compiler import compile_policy
from weavepy.policy.enforcer import ExplainError, explain, parse_port, status_document
from weavepy.policy.model import (
    Attachment,
    ClusterState,
    Labels,
    Pod,
    attach,
    parse_network_policy,
)

NODE = "n1"
POLICY = parse_network_policy({
    "metadata": {"name": "server-ingress", "namespace": "x"},
    "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
             "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                          "ports": [{"port": 80}]}]}})


def live_state() -> ClusterState:
    source = ClusterState(policies=(POLICY,), pods=(
        Pod("x", "server", Labels({"app": "server"})),
        Pod("x", "client", Labels({"role": "client"})),
        Pod("x", "other", Labels({"role": "other"}))))
    return attach(source, [
        Attachment("c-server", IPv4Address("198.19.1.2"), NODE, "x", "server"),
        Attachment("c-client", IPv4Address("198.19.1.3"), NODE, "x", "client"),
        Attachment("c-other", IPv4Address("198.19.2.3"), "n2", "x", "other")])


def test_explain_names_the_deciding_policy_by_pod_or_address() -> None:
    state = live_state()
    denied = explain(state, "x/other", "x/server", "80/TCP")
    assert denied["allowed"] is False and denied["policies"] == ["x/server-ingress"]
    assert denied["text"].startswith("denied: ingress of x/server is isolated")
    allowed = explain(state, "198.19.1.3", "198.19.1.2", "80")
    assert allowed["allowed"] is True and allowed["policies"] == ["x/server-ingress"]
    assert allowed["source"]["pod"] == "x/client" and allowed["protocol"] == "TCP"
    assert explain(state, "x/client", "x/server", "81/tcp")["allowed"] is False
    assert explain(state, "x/client", "x/server", "ICMP")["allowed"] is False
    # an address that is no pod: an outside peer; a node's address: the node itself
    assert explain(state, "198.18.0.9", "x/server", "80/TCP")["allowed"] is False
    host = explain(state, "198.19.1.1", "x/server", "80/TCP", {IPv4Address("198.19.1.1"): NODE})
    assert host["allowed"] is True and "its node" in host["reason"]
    # not isolated for egress: other may send anywhere
    assert explain(state, "x/server", "x/other", "80/TCP")["allowed"] is True


@pytest.mark.parametrize(("src", "dst", "port", "message"), [
    ("x/nobody", "x/server", "80/TCP", "no pod x/nobody is known"),
    ("x/client", "server", "80/TCP", "'server': give a pod as NAMESPACE/NAME or an IPv4"),
    ("x/client", "x/server", "http", "or a protocol without ports: ICMP"),
    ("x/client", "x/server", "70000/TCP", "must be between 1 and 65535"),
    ("x/client", "x/server", "80/ICMP", "the protocol must be one of"),
    ("x/client", "x/server", "eighty/TCP", "expected PORT/PROTOCOL"),
])
def test_explain_refuses_bad_requests_in_one_line(src: str, dst: str, port: str,
                                                  message: str) -> None:
    with pytest.raises(ExplainError, match=message) as caught:
        explain(live_state(), src, dst, port)
    assert "\n" not in str(caught.value)


def test_parse_port() -> None:
    assert parse_port("53/udp") == (53, "UDP")
    assert parse_port(" 80 ") == (80, "TCP")
    assert parse_port("icmp") == (None, "ICMP")


def test_status_attributes_drops_to_pods_and_policies() -> None:
    state = live_state()
    compiled = compile_policy(state, NODE)
    [(signature, _)] = [(c, s) for c, s in compiled.drop_counters.items()
                        if c in compiled.signatures]
    [pod_counter] = [c for c, (subject, _) in compiled.drop_counters.items()
                     if subject == "x/server"]
    doc = status_document(state, compiled, NODE, {signature: (7, 700), pod_counter: (5, 500)})
    [policy] = doc["policies"]
    assert policy == {"policy": "x/server-ingress", "types": ["ingress"], "pods": ["x/server"],
                      "drops": {"ingress": 7, "egress": 0}}
    assert doc["pods"] == [{"pod": "x/server", "ip": "198.19.1.2",
                            "isolated": {"ingress": ["x/server-ingress"]},
                            "drops": {"ingress": 5}}]
    assert doc["isolated_pods"] == {"ingress": 1, "egress": 0} and doc["local_pods"] == 2
    # before anything is compiled: the policies, nothing isolated
    empty = status_document(state, None, NODE, {})
    assert empty["pods"] == [] and empty["policies"][0]["pods"] == []
