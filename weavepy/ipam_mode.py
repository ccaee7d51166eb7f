"""The agent's one door to IPAM, whoever owns the addresses (`--ipam`).

Two owners of pod address space exist: weavepy's own IPAM (`--ipam weavepy`, the default and
the only one that works without Kubernetes: `weavepy.ipam_link.IpamLink`, Paxos over gossip)
and the Kubernetes control plane (`--ipam kubernetes`: `weavepy.kube_ipam.KubeIpam`, each
Node's podCIDR). This module owns what the rest of the agent may ask of either:

* `NodeIpam`, the protocol both implement: the gossip delegate, the driver task, member
  liveness, the block table by node (the reconciler), the status and its document (weavepy.control,
  the metrics), rmpeer, and the pod addresses of the CNI server (`ipam_link.CniAllocator`);
* `open_ipam`, which builds the one the configuration names, and refuses a state directory
  the other one wrote (switching a node's mode needs `weavepy reset`: its pods' addresses
  belong to the other owner's space);
* `node_observers`, what the Kubernetes Node watch (weavepy.kube) must tell about nodes.

The rule it keeps: the agent chooses its IPAM here, once; nothing else asks which mode runs.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from ipaddress import IPv4Network
from typing import TYPE_CHECKING, Any, Protocol

import trio

from weavepy.config import AgentConfig
from weavepy.identity import Identity
from weavepy.ipam.allocator import Allocation, PodAllocator
from weavepy.ipam.status import IpamStatus
from weavepy.ipam_link import CORE_FILE, IpamLink, IpamLinkError
from weavepy.kube_ipam import CLUSTER_ID, POD_CIDRS_FILE, KubeIpam

if TYPE_CHECKING:
    from gossip.node import Delegate
    from gossip.transport import GossipService
    from weavepy.kube import NodeObserver

__all__ = ["NodeIpam", "node_observers", "open_ipam"]


class NodeIpam(Protocol):
    """What the agent, its API answers, the CNI allocator and the metrics ask of IPAM."""

    @property
    def delegate(self) -> Delegate:
        """The gossip delegate: IPAM payloads in (and, with weavepy's IPAM, out)."""

    @property
    def allocator(self) -> PodAllocator:
        """This node's pod addresses (read on the trio loop)."""

    @property
    def trio_token(self) -> trio.lowlevel.TrioToken | None:
        """The loop `run` runs on (None before it started); the CNI worker thread hops onto it."""

    @property
    def cluster_id(self) -> str | None: ...

    def attach(self, svc: GossipService) -> None: ...

    def member_alive(self, name: str, tags: Mapping[str, str]) -> None: ...

    def member_dead(self, name: str) -> None: ...

    def tags(self) -> dict[str, str]:
        """What this node publishes about its IPAM in its gossip meta."""

    def blocks_by_node(self) -> dict[str, list[IPv4Network]]:
        """Every node's blocks (the reconciler's routes; this node's own are its bridge's)."""

    def status(self) -> IpamStatus: ...

    def state_name(self) -> str: ...

    def status_json(self) -> dict[str, Any]:
        """The `ipam` section of the status document (docs/report.schema.json)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None: ...

    async def flush(self) -> None:
        """Persist whatever is pending (on the way out)."""

    async def rmpeer(self, name: str, force: bool) -> dict[str, Any]: ...

    async def leave(self) -> dict[str, Any]:
        """Give this node's space back (for `weavepy reset`)."""
        ...

    def member_names(self) -> list[str]: ...

    def node_deleted(self, member: str, node: str) -> None:
        """Kubernetes deleted Node `node`, which was member `member`."""
        ...

    def nodes_listed(self, members: Collection[str]) -> None: ...

    async def allocate(self, container_id: str, ifname: str) -> Any:
        """The attachment's `Allocation`, or a wait to await before asking again; raises
        `ipam_link.NoAddress` when there is none."""

    async def lookup(self, container_id: str, ifname: str) -> Allocation | None: ...

    async def release(self, container_id: str, ifname: str) -> Allocation | None: ...


def open_ipam(config: AgentConfig, identity: Identity, *,
              on_table_change: Callable[[], None], on_cluster_id: Callable[[str], None],
              on_tag_change: Callable[[], None]) -> NodeIpam:
    """The IPAM `config.ipam` names; IpamLinkError (one line) if the state directory holds
    the other mode's state."""
    state_dir = config.state_dir
    if config.ipam == "kubernetes":
        theirs = identity.cluster_id not in (None, CLUSTER_ID)
        if theirs or (state_dir / CORE_FILE).exists():
            cluster = f" (cluster {identity.cluster_id})" if theirs else ""
            raise IpamLinkError(
                f"{state_dir} holds weavepy IPAM state{cluster}: this node's pods have "
                f"addresses outside its podCIDR; drain it and run `weavepy reset` before "
                f"--ipam kubernetes")
        return KubeIpam(config, on_table_change=on_table_change)
    if (state_dir / POD_CIDRS_FILE).exists() or identity.cluster_id == CLUSTER_ID:
        raise IpamLinkError(
            f"{state_dir} holds --ipam kubernetes state: this node's pods have addresses from "
            f"its podCIDR; drain it and run `weavepy reset` before --ipam weavepy")
    return IpamLink(config, identity, on_table_change=on_table_change,
                    on_cluster_id=on_cluster_id, on_tag_change=on_tag_change)


def node_observers(ipam: NodeIpam) -> tuple[NodeObserver, ...]:
    """Who the Kubernetes Node watch must tell about nodes: the IPAM, when the podCIDRs are
    its blocks."""
    return (ipam,) if isinstance(ipam, KubeIpam) else ()
