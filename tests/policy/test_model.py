"""Parsing NetworkPolicy, Pod and Namespace from their Kubernetes form: the spec's defaults,
label selectors, and one readable error per invalid object."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
import yaml

from weavepy.policy.model import (
    NAME_LABEL,
    ClusterState,
    ContainerPort,
    IPBlock,
    Labels,
    LabelSelector,
    Namespace,
    Peer,
    Pod,
    PolicyInputError,
    PolicyPort,
    Requirement,
    parse_namespace,
    parse_network_policy,
    parse_object,
    parse_pod,
)

FULL = yaml.safe_load("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: test-network-policy, namespace: default}
spec:
  podSelector: {matchLabels: {role: db}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - ipBlock: {cidr: 172.17.0.0/16, except: [172.17.1.0/24]}
    - namespaceSelector: {matchLabels: {project: myproject}}
    - podSelector: {matchLabels: {role: frontend}}
    - namespaceSelector: {matchExpressions: [{key: team, operator: In, values: [a, b]}]}
      podSelector: {matchExpressions: [{key: tier, operator: DoesNotExist}]}
    ports:
    - {protocol: TCP, port: 6379}
    - {protocol: UDP, port: 32000, endPort: 32768}
    - {port: serve-80-tcp}
    - {protocol: SCTP}
  egress:
  - to: [{ipBlock: {cidr: 10.0.0.0/24}}]
    ports: [{protocol: TCP, port: 5978}]
""")


def policy(spec: Any, name: str = "p", namespace: str = "x") -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def test_the_documentation_example_parses_whole() -> None:
    parsed = parse_network_policy(FULL)
    assert parsed.key == "default/test-network-policy"
    assert parsed.pod_selector == LabelSelector(Labels({"role": "db"}))
    assert parsed.policy_types == {"ingress", "egress"}
    rule = parsed.ingress[0]
    assert rule.peers[0] == Peer(ip_block=IPBlock(IPv4Network("172.17.0.0/16"),
                                                  (IPv4Network("172.17.1.0/24"),)))
    assert rule.peers[1] == Peer(namespace_selector=LabelSelector(
        Labels({"project": "myproject"})))
    assert rule.peers[2] == Peer(pod_selector=LabelSelector(Labels({"role": "frontend"})))
    both = rule.peers[3]
    assert both.namespace_selector == LabelSelector(
        match_expressions=(Requirement("team", "In", ("a", "b")),))
    assert both.pod_selector == LabelSelector(
        match_expressions=(Requirement("tier", "DoesNotExist"),))
    assert rule.ports == (PolicyPort("TCP", 6379), PolicyPort("UDP", 32000, 32768),
                          PolicyPort("TCP", "serve-80-tcp"), PolicyPort("SCTP"))
    assert parsed.egress[0].ports == (PolicyPort("TCP", 5978),)


@pytest.mark.parametrize(("spec", "types"), [
    ({"podSelector": {}}, {"ingress"}),
    ({"podSelector": {}, "ingress": [{}]}, {"ingress"}),
    ({"podSelector": {}, "egress": [{}]}, {"ingress", "egress"}),
    ({"podSelector": {}, "egress": []}, {"ingress"}),
    ({"podSelector": {}, "policyTypes": ["Egress"]}, {"egress"}),
    ({"podSelector": {}, "ingress": [{}], "policyTypes": ["Egress"]}, {"egress"}),
])
def test_policy_types_default_as_the_api_server_sets_them(spec: Any, types: set[str]) -> None:
    assert parse_network_policy(policy(spec)).policy_types == types


def test_a_missing_namespace_is_default_and_a_missing_pod_selector_selects_all() -> None:
    parsed = parse_network_policy({"metadata": {"name": "p"}, "spec": {}})
    assert parsed.namespace == "default" and parsed.pod_selector.is_empty


@pytest.mark.parametrize(("labels", "expected"), [
    ({"a": "1", "b": "x"}, True),
    ({"a": "1", "b": "y"}, False),   # NotIn
    ({"a": "1"}, True),               # NotIn holds when the key is absent
    ({"a": "2"}, False),              # matchLabels
    ({"a": "1", "c": "z"}, False),    # DoesNotExist
])
def test_selectors_and_every_operator(labels: dict[str, str], expected: bool) -> None:
    selector = LabelSelector(Labels({"a": "1"}), (
        Requirement("a", "In", ("1", "3")), Requirement("a", "Exists"),
        Requirement("b", "NotIn", ("y",)), Requirement("c", "DoesNotExist")))
    assert selector.matches(labels) is expected
    assert LabelSelector().matches(labels)  # the empty selector selects everything


def test_a_namespace_always_carries_its_name_label() -> None:
    assert parse_namespace({"metadata": {"name": "x", "labels": {"ns": "x"}}}).labels == {
        "ns": "x", NAME_LABEL: "x"}
    assert Namespace("y").labels == {NAME_LABEL: "y"}
    # a namespace nobody described is one with only that label
    assert ClusterState().namespace_labels("z") == {NAME_LABEL: "z"}


def test_pods_parse_with_named_ports_and_skip_host_network_and_finished_pods() -> None:
    pod = {"kind": "Pod", "metadata": {"name": "a", "namespace": "x", "labels": {"pod": "a"},
                                       "annotations": {"weavepy.io/container-id": "c0ffee"}},
           "spec": {"nodeName": "n1", "containers": [
               {"name": "s", "ports": [{"containerPort": 80, "name": "serve-80-tcp"},
                                       {"containerPort": 80, "protocol": "UDP",
                                        "name": "serve-80-udp"}]}]},
           "status": {"phase": "Running", "podIP": "198.19.0.2",
                      "podIPs": [{"ip": "198.19.0.2"}, {"ip": "fd00::2"}]}}
    parsed = parse_object(pod)
    assert parsed == Pod("x", "a", Labels({"pod": "a"}), IPv4Address("198.19.0.2"), "n1",
                         (ContainerPort(80, "TCP", "serve-80-tcp"),
                          ContainerPort(80, "UDP", "serve-80-udp")), "c0ffee")
    assert isinstance(parsed, Pod)
    assert parsed.named_port("serve-80-udp", "UDP") == 80
    assert parsed.named_port("serve-80-udp", "TCP") is None
    assert parse_pod({**pod, "spec": {"hostNetwork": True}}) is None
    assert parse_pod({**pod, "status": {"phase": "Succeeded", "podIP": "198.19.0.2"}}) is None
    assert parse_pod({"metadata": {"name": "b"}}) == Pod("default", "b")


def test_pods_sharing_an_address_keep_the_first_and_name_the_others() -> None:
    a = Pod("x", "a", ip=IPv4Address("198.19.0.2"))
    b = Pod("y", "b", ip=IPv4Address("198.19.0.2"))
    state = ClusterState(pods=(b, a))
    assert state.pod_at(IPv4Address("198.19.0.2")) == a
    assert state.address_conflicts == [b]


@pytest.mark.parametrize(("spec", "message"), [
    ({"podselector": {}},
     "NetworkPolicy x/p: spec: unknown field 'podselector'"),
    ({"ingress": [{"from": [{}]}]},
     "NetworkPolicy x/p: spec.ingress[0].from[0]: a peer needs podSelector"),
    ({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]},
     "spec.ingress[0].from[0]: ipBlock cannot be combined"),
    ({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/8"]}}]}]},
     "spec.egress[0].to[0].ipBlock.except[0]: 11.0.0.0/8 must be a strict subset of"),
    ({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]},
     "spec.egress[0].to[0].ipBlock.cidr: '10.0.0.0/33' is not a CIDR"),
    ({"ingress": [{"ports": [{"port": 80, "endPort": 79}]}]},
     "spec.ingress[0].ports[0].endPort: must be >= port (80), not 79"),
    ({"ingress": [{"ports": [{"port": "http", "endPort": 90}]}]},
     "spec.ingress[0].ports[0].endPort: needs a numeric port"),
    ({"ingress": [{"ports": [{"port": 0}]}]},
     "spec.ingress[0].ports[0].port: must be a port number 1-65535, not 0"),
    ({"ingress": [{"ports": [{"port": "80"}]}]},
     "spec.ingress[0].ports[0].port: '80' is neither a number nor a port name"),
    ({"ingress": [{"ports": [{"protocol": "ICMP"}]}]},
     "spec.ingress[0].ports[0].protocol: must be TCP, UDP or SCTP, not 'ICMP'"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
     "spec.podSelector.matchExpressions[0].values: must not be empty for operator In"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists",
                                            "values": ["b"]}]}},
     "spec.podSelector.matchExpressions[0].values: must be empty for operator Exists"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Is"}]}},
     "spec.podSelector.matchExpressions[0].operator: must be one of In, NotIn"),
    ({"policyTypes": ["ingress"]},
     "spec.policyTypes[0]: must be Ingress or Egress, not 'ingress'"),
    ({"ingress": {"from": []}}, "spec.ingress: must be a list, not a dict"),
    ({"podSelector": {"matchLabels": {"a": ["b"]}}},
     "spec.podSelector.matchLabels.a: a label value must be a string, not a list"),
])
def test_every_invalid_policy_is_one_line_naming_object_and_field(spec: Any,
                                                                   message: str) -> None:
    with pytest.raises(PolicyInputError) as caught:
        parse_network_policy(policy(spec))
    text = str(caught.value)
    assert message in text and "\n" not in text


@pytest.mark.parametrize(("obj", "message"), [
    ([], "expected a Kubernetes object, not a list"),
    ({"kind": "Service"}, "kind 'Service' is not NetworkPolicy, Pod or Namespace"),
    ({"kind": "Pod", "metadata": {}}, "Pod without metadata.name"),
    ({"kind": "NetworkPolicy", "apiVersion": "extensions/v1beta1",
      "metadata": {"name": "p"}}, "apiVersion: must be networking.k8s.io/v1"),
    ({"kind": "Pod", "metadata": {"name": "a"}, "status": {"podIP": "banana"}},
     "Pod default/a: status.podIP: 'banana' is not an IP address"),
    ({"kind": "Pod", "metadata": {"name": "a"},
      "spec": {"containers": [{"ports": [{"containerPort": "x"}]}]}},
     "Pod default/a: spec.containers[0].ports[0].containerPort: must be a port number"),
])
def test_every_invalid_object_is_one_line(obj: Any, message: str) -> None:
    with pytest.raises(PolicyInputError) as caught:
        parse_object(obj)
    assert message in str(caught.value)
