"""Synthetic clusters for policy tests and benchmarks: N pods, policies in proportion.

The shape (so that sizes measured at 100, 1,000 and 10,000 pods compare): namespaces of
`pods_per_namespace` pods, labelled `team=t<i % 5>`; pods labelled `app=a<j % 5>` serving
named ports `http` (TCP 8080) and `dns` (UDP 53); per namespace, three policies as operators
write them: a default deny of ingress, `app=a1` admitting `app=a0` of its namespace on TCP 80
and pods of `team=t1` namespaces on the named port `http`, and `app=a3` allowed egress to
DNS (UDP/TCP 53) and to 198.18.0.0/16 except 198.18.1.0/24. That is 3 policies per
`pods_per_namespace` pods (30 pods: 9 policies; 300: 90). Pod addresses come from
198.19.0.0/16; pods are spread over `nodes` nodes, `n1` ... `nN`, round robin.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

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
    Rule,
)

__all__ = ["synthetic_cluster"]

POD_BASE = int(IPv4Address("198.19.0.0"))


def _selector(**labels: str) -> LabelSelector:
    return LabelSelector(Labels(labels))


def _policies(namespace: str) -> list[NetworkPolicy]:
    return [
        NetworkPolicy(namespace, "default-deny", LabelSelector()),
        NetworkPolicy(namespace, "web", _selector(app="a1"), ingress=(
            Rule((Peer(pod_selector=_selector(app="a0")),), (PolicyPort("TCP", 80),)),
            Rule((Peer(namespace_selector=_selector(team="t1")),), (PolicyPort("TCP", "http"),)),
        )),
        NetworkPolicy(namespace, "egress", _selector(app="a3"), egress=(
            Rule((), (PolicyPort("UDP", 53), PolicyPort("TCP", 53))),
            Rule((Peer(ip_block=IPBlock(IPv4Network("198.18.0.0/16"),
                                        (IPv4Network("198.18.1.0/24"),))),)),
        ), policy_types=frozenset({"egress"})),
    ]


def synthetic_cluster(pods: int, *, pods_per_namespace: int = 10,
                      nodes: int = 1) -> ClusterState:
    """A cluster of `pods` pods (at most 65,000) with the policies described above."""
    if not 0 < pods <= 65000:
        raise ValueError(f"1 to 65000 pods, not {pods}")
    found: list[Pod] = []
    namespaces: list[Namespace] = []
    policies: list[NetworkPolicy] = []
    ports = (ContainerPort(8080, "TCP", "http"), ContainerPort(53, "UDP", "dns"))
    for index in range(pods):
        ns_index, pod_index = divmod(index, pods_per_namespace)
        namespace = f"ns{ns_index}"
        if pod_index == 0:
            namespaces.append(Namespace(namespace, Labels({"team": f"t{ns_index % 5}"})))
            policies += _policies(namespace)
        found.append(Pod(namespace, f"pod{pod_index}", Labels({"app": f"a{pod_index % 5}"}),
                         IPv4Address(POD_BASE + 2 + index), f"n{index % nodes + 1}", ports))
    return ClusterState(tuple(policies), tuple(found), tuple(namespaces))
