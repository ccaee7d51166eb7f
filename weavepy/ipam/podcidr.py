"""Pod blocks from Kubernetes Node objects (`--ipam kubernetes`): the whole decision, pure.

With `--ipam kubernetes` the cluster's own consensus decides who owns which addresses: the
control plane writes each Node's `spec.podCIDRs` (kube-controller-manager
`--allocate-node-cidrs`, which kubeadm's `--pod-network-cidr` turns on), as flannel's
kube-subnet-mgr and Calico's host-local mode use them. This module turns those podCIDRs into
weavepy's block table; `weavepy.kube_ipam` feeds it and acts on the answer.

The rules it keeps:

* Pure: `pod_cidr_table(nodes, node, cluster_range)` is a function of the nodes' podCIDRs
  (as the API spells them), this node's name and `--ipalloc-range`. No clock, no I/O.
* A node's block is its IPv4 podCIDR, whole: one block per node (the API allows at most one
  podCIDR per address family). The pod allocator's block size is that podCIDR's prefix.
* IPv6 podCIDRs are left out (weavepy is IPv4 only) and listed in `ipv6_ignored`.
* A podCIDR weavepy cannot use is refused for its node, with one sentence in `refused`: not a
  CIDR, outside the cluster range (the host rules masquerade and route by that range), too
  small for pods, or overlapping another node's podCIDR (then both are refused: two nodes
  never serve the same addresses, whatever the API says).
* This node's state: `ready` (its podCIDR is usable), `waiting_for_pod_cidr` (no Node has its
  name, or its Node has no IPv4 podCIDR yet), or `pod_cidr_refused`; the detail says which.
* Members are Nodes by name (the agent's `--name` is its Node's name, as the manifest sets it):
  `blocks` maps node names to their block, this node's included when usable.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network

from weavepy.ipam.blocks import BlockError, BlockSpace
from weavepy.ipam.status import IpamState

__all__ = ["PodCidrTable", "pod_cidr_table"]


@dataclass(frozen=True)
class PodCidrTable:
    """The block table the nodes' podCIDRs make, seen from node `node`."""

    node: str
    state: IpamState  # READY, WAITING_FOR_POD_CIDR or POD_CIDR_REFUSED
    detail: str
    pod_cidr: IPv4Network | None  # this node's block, when usable
    blocks: Mapping[str, tuple[IPv4Network, ...]] = field(default_factory=dict)
    refused: Mapping[str, str] = field(default_factory=dict)  # node -> why its podCIDR is not used
    ipv6_ignored: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def _first_ipv4(name: str, cidrs: Sequence[str], cluster_range: IPv4Network,
                ipv6: dict[str, tuple[str, ...]]) -> IPv4Network | str | None:
    """The node's usable IPv4 podCIDR, the sentence refusing it, or None if it has none."""
    found_v6: list[str] = []
    chosen: IPv4Network | str | None = None
    for text in cidrs:
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError:
            chosen = chosen or f"podCIDR {text!r} of node {name} is not a CIDR network"
            continue
        if isinstance(network, ipaddress.IPv6Network):
            found_v6.append(str(network))
            continue
        if isinstance(chosen, IPv4Network):
            continue  # the API allows one podCIDR per family; a second one is never used
        if not network.subnet_of(cluster_range):
            chosen = (f"podCIDR {network} of node {name} is outside --ipalloc-range "
                      f"{cluster_range}")
            continue
        try:
            BlockSpace.parse(cluster_range, network.prefixlen)
        except BlockError as exc:
            chosen = f"podCIDR {network} of node {name} cannot be a pod block: {exc}"
            continue
        chosen = network
    if found_v6:
        ipv6[name] = tuple(found_v6)
    return chosen


def _overlaps(usable: Mapping[str, IPv4Network]) -> dict[str, str]:
    """Nodes whose podCIDRs overlap another's, with the sentence (sorted sweep: a CIDR that
    overlaps any earlier one overlaps the earlier one reaching furthest)."""
    clashes: dict[str, str] = {}
    reach: tuple[str, IPv4Network] | None = None
    for name, network in sorted(usable.items(),
                                key=lambda item: (item[1].network_address, item[1].prefixlen,
                                                  item[0])):
        if reach is not None and network.overlaps(reach[1]):
            other, wider = reach
            clashes[name] = f"podCIDR {network} of node {name} overlaps node {other}'s {wider}"
            clashes.setdefault(other, f"podCIDR {wider} of node {other} overlaps node "
                                      f"{name}'s {network}")
        if reach is None or network.broadcast_address > reach[1].broadcast_address:
            reach = (name, network)
    return clashes


def pod_cidr_table(nodes: Mapping[str, Sequence[str]], node: str,
                   cluster_range: IPv4Network) -> PodCidrTable:
    """The block table from `nodes` (node name -> its `spec.podCIDRs`), for node `node`."""
    ipv6: dict[str, tuple[str, ...]] = {}
    refused: dict[str, str] = {}
    usable: dict[str, IPv4Network] = {}
    for name, cidrs in sorted(nodes.items()):
        chosen = _first_ipv4(name, cidrs, cluster_range, ipv6)
        if isinstance(chosen, IPv4Network):
            usable[name] = chosen
        elif chosen is not None:
            refused[name] = chosen
    for name, why in _overlaps(usable).items():
        del usable[name]
        refused[name] = why
    blocks = {name: (network,) for name, network in usable.items()}
    own = usable.get(node)
    if own is not None:
        return PodCidrTable(node, IpamState.READY, f"podCIDR {own} of node {node}", own,
                            blocks, refused, ipv6)
    if node in refused:
        return PodCidrTable(node, IpamState.POD_CIDR_REFUSED, refused[node], None, blocks,
                            refused, ipv6)
    if node not in nodes:
        detail = (f"no Node named {node} in the Kubernetes API (the agent's --name must be "
                  f"its Node's name)")
    elif node in ipv6:
        detail = (f"node {node} has only IPv6 podCIDRs ({', '.join(ipv6[node])}); weavepy "
                  f"needs an IPv4 one")
    else:
        detail = f"node {node} has no podCIDR yet"
    return PodCidrTable(node, IpamState.WAITING_FOR_POD_CIDR, detail, None, blocks, refused,
                        ipv6)
