"""Hypothesis strategies for random clusters, policies and connections, and `enforced()`:
what the compiled tables of every node do to a connection (through weavepy.policy.nftsim).

Addresses: pods in 198.19.0.0/24, nodes 198.18.0.11-12, outside hosts 198.18.5.0/24."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Network
from typing import Any

from hypothesis import strategies as st

from weavepy.policy.compiler import CompileOptions, compile_policy
from weavepy.policy.evaluator import Endpoint, Host
from weavepy.policy.model import (
    ClusterState,
    ContainerPort,
    IPBlock,
    Labels,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyPort,
    Requirement,
    Rule,
)
from weavepy.policy.nftsim import Packet, SimTable
from weavepy.policy.ruleset import full_replace

NODES = ("n1", "n2")
NODE_ADDRESSES = {"n1": IPv4Address("198.18.0.11"), "n2": IPv4Address("198.18.0.12")}
OUTSIDE = (IPv4Address("198.18.5.5"), IPv4Address("198.19.1.9"))
NAMESPACES = ("x", "y", "z")
LABEL_KEYS = ("pod", "app")
LABEL_VALUES = ("a", "b", "c")
NAMED_PORTS = (
    ContainerPort(80, "TCP", "serve-80-tcp"), ContainerPort(80, "UDP", "serve-80-udp"),
    ContainerPort(81, "TCP", "serve-81-tcp"), ContainerPort(81, "SCTP", "serve-81-sctp"),
    ContainerPort(80, "TCP", "web"), ContainerPort(81, "TCP", "web"),
    ContainerPort(81, "UDP", "dns"),
)
PORT_NAMES = ("serve-80-tcp", "serve-80-udp", "serve-81-tcp", "serve-81-sctp", "web", "dns",
              "absent")
PROBE_PORTS = (53, 80, 81, 82)
PROBE_PROTOCOLS = ("TCP", "UDP", "SCTP", "ICMP")

labels = st.dictionaries(st.sampled_from(LABEL_KEYS), st.sampled_from(LABEL_VALUES),
                         max_size=2).map(Labels)

requirements = st.builds(
    lambda key, op, values: Requirement(key, op, tuple(sorted(set(values)))
                                        if op in ("In", "NotIn") else ()),
    st.sampled_from((*LABEL_KEYS, "ns", "kubernetes.io/metadata.name")),
    st.sampled_from(("In", "NotIn", "Exists", "DoesNotExist")),
    st.lists(st.sampled_from((*LABEL_VALUES, *NAMESPACES)), min_size=1, max_size=2))

selectors = st.one_of(
    st.just(LabelSelector()),
    st.builds(lambda k, v: LabelSelector(Labels({k: v})), st.sampled_from(LABEL_KEYS),
              st.sampled_from(LABEL_VALUES)),
    st.builds(LabelSelector, labels, st.lists(requirements, max_size=2).map(tuple)))
namespace_selectors = st.builds(
    LabelSelector,
    st.dictionaries(st.sampled_from(("ns", "kubernetes.io/metadata.name")),
                    st.sampled_from(NAMESPACES), max_size=1).map(Labels),
    st.lists(requirements, max_size=1).map(tuple))


@st.composite
def ip_blocks(draw: Any) -> IPBlock:
    cidr = draw(st.sampled_from(("198.19.0.0/24", "198.19.0.0/28", "198.19.0.8/29",
                                 "198.18.0.0/16", "0.0.0.0/0", "198.19.0.12/32",
                                 "2001:db8::/64")))
    if ":" in cidr:
        return IPBlock(IPv6Network(cidr))
    network = IPv4Network(cidr)
    # excepts around the addresses probes use: pods (198.19.0.10-15), nodes and outsiders
    addresses = [f"198.19.0.{i}" for i in range(10, 16)]
    addresses += [str(a) for a in (*OUTSIDE, *NODE_ADDRESSES.values())]
    excepts: set[IPv4Network] = set()
    for _ in range(draw(st.sampled_from((0, 1, 1, 2)))):
        length = draw(st.integers(min(network.prefixlen + 1, 32), 32))
        block = IPv4Network(f"{draw(st.sampled_from(addresses))}/{length}", strict=False)
        if block.subnet_of(network) and block != network:
            excepts.add(block)
    return IPBlock(network, tuple(sorted(excepts)))


peers = st.one_of(
    st.builds(Peer, pod_selector=selectors),
    st.builds(Peer, namespace_selector=namespace_selectors),
    st.builds(Peer, pod_selector=selectors, namespace_selector=namespace_selectors),
    st.builds(Peer, ip_block=ip_blocks()),
    st.builds(Peer, ip_block=ip_blocks()),
)


@st.composite
def policy_ports(draw: Any) -> PolicyPort:
    protocol = draw(st.sampled_from(("TCP", "UDP", "SCTP")))
    kind = draw(st.sampled_from(("all", "number", "range", "name", "name")))
    if kind == "all":
        return PolicyPort(protocol)
    if kind == "number":
        return PolicyPort(protocol, draw(st.sampled_from(PROBE_PORTS)))
    if kind == "range":
        low = draw(st.sampled_from((53, 79, 80, 81)))
        return PolicyPort(protocol, low, draw(st.integers(low, 82)))
    if draw(st.booleans()):  # a name some pod serves, over its protocol
        served = draw(st.sampled_from(NAMED_PORTS))
        return PolicyPort(served.protocol, served.name)
    return PolicyPort(protocol, draw(st.sampled_from(PORT_NAMES)))


rules = st.builds(Rule, st.one_of(st.just(()), st.lists(peers, min_size=1, max_size=2)
                                 .map(tuple)),
                  st.one_of(st.just(()), st.lists(policy_ports(), min_size=1, max_size=2)
                            .map(tuple)))


@st.composite
def policies(draw: Any, index: int) -> NetworkPolicy:
    ingress = tuple(draw(st.lists(rules, max_size=2)))
    egress = tuple(draw(st.lists(rules, max_size=2)))
    types = draw(st.sets(st.sampled_from(("ingress", "egress")), min_size=1))
    return NetworkPolicy(draw(st.sampled_from(NAMESPACES[:2])), f"p{index}", draw(selectors),
                         ingress, egress, frozenset(types))


@st.composite
def clusters(draw: Any) -> ClusterState:
    namespaces = tuple(
        Namespace(name, Labels({"ns": name}) if draw(st.booleans()) else Labels())
        for name in NAMESPACES if draw(st.booleans()) or name == "x")
    pod_count = draw(st.integers(1, 6))
    pods = tuple(
        Pod(draw(st.sampled_from(NAMESPACES[:2])), f"pod{i}", draw(labels),
            IPv4Address(f"198.19.0.{10 + i}"), draw(st.sampled_from(NODES)),
            tuple(draw(st.lists(st.sampled_from(NAMED_PORTS), max_size=3, unique=True))))
        for i in range(pod_count))
    policy_count = draw(st.integers(0, 4) if draw(st.booleans()) else st.integers(1, 4))
    found = tuple(draw(policies(i)) for i in range(policy_count))
    return ClusterState(found, pods, namespaces)


@st.composite
def connections(draw: Any, state: ClusterState,
                ) -> tuple[Endpoint, Endpoint, int | None, str]:
    ends: list[Endpoint] = [*state.pods, *OUTSIDE,
                            *(Host(n, a) for n, a in NODE_ADDRESSES.items())]
    pods = list(state.pods)
    src = draw(st.sampled_from(pods) if draw(st.integers(0, 3)) else st.sampled_from(ends))
    dst = draw(st.sampled_from(pods) if draw(st.integers(0, 3)) else st.sampled_from(ends))
    protocol = draw(st.sampled_from(("TCP", "TCP", "TCP", "UDP", *PROBE_PROTOCOLS)))
    port = None if protocol == "ICMP" else draw(st.sampled_from((80, 80, 81, *PROBE_PORTS)))
    return src, dst, port, protocol


# -- what the compiled tables do --------------------------------------------------------------


def node_tables(state: ClusterState, options: CompileOptions | None = None,
                nodes: tuple[str, ...] = NODES) -> dict[str, SimTable]:
    """Each node's compiled table, rendered to commands and read back by the interpreter."""
    return {node: SimTable.from_commands(
                full_replace(compile_policy(state, node, options).ruleset, "gen 1"))
            for node in nodes}


def _address(end: Endpoint) -> IPv4Address:
    if isinstance(end, Pod):
        assert end.ip is not None
        return end.ip
    return end.address if isinstance(end, Host) else end


def forward_nodes(src: Endpoint, dst: Endpoint) -> list[str]:
    """The nodes whose forward hook the connection's first packet passes.

    A node's own traffic to its pods leaves through output and pods' traffic to their node
    arrives through input; pod-to-pod traffic on one node is bridged and passes forward once
    (br_netfilter); across nodes it is forwarded on both."""
    nodes = []
    if isinstance(src, Pod) and not (isinstance(dst, Host) and dst.node == src.node):
        nodes.append(src.node)
    if isinstance(dst, Pod) and not (isinstance(src, Host) and src.node == dst.node):
        nodes.append(dst.node)
    return [n for n in dict.fromkeys(nodes) if n is not None]


def enforced(tables: dict[str, SimTable], src: Endpoint, dst: Endpoint, port: int | None,
             protocol: str, ct_state: str = "new") -> bool:
    packet = Packet(_address(src), _address(dst), protocol.lower(), port, ct_state)
    return all(tables[node].run(packet).verdict == "accept"
               for node in forward_nodes(src, dst))
