"""`weavepy reset`: remove what this node's agent put on the host, so it can join as new.

This module owns the list of what a reset removes; `weavepy reset` (weavepy/cli.py) stops a
running agent first and then calls `reset_node`. The agent must be stopped: nothing here takes
a lock against a running one.

What it removes, in the node's network namespace and directories:

* the links weavepy creates: the VXLAN device, the pod bridge and the WireGuard TUN device
  (by their configured names);
* every host-side pod veth (by weavepy's veth prefix; the pod's end goes with it);
* the host rules (weavepy.hostrules, `HostRules.remove()`): nftables table `ip weavepy`
  (egress masquerade, the API guard) and every forward accept tagged `weavepy` in the host's
  own nftables chains and in the filter FORWARD chain of both iptables backends, so each
  ruleset reads as it did before the agent started (without nftables support, which the agent
  needs to place any of them, there is nothing to remove);
* the NetworkPolicy table `inet weavepy-policy` (weavepy.policy), which the agent leaves in
  place when it stops so that isolated pods stay isolated across a restart;
* weavepy's own files in the state directory: the identity (name, VTEP MAC, WireGuard key,
  cluster ID), the IPAM state and pod allocations, the known peers, the external peers
  declared through the API and the API token, together with their moved-aside copies
  (`NAME.corrupt-*`) and leftover temporaries (`.NAME.*`); and in the run directory the list
  of programmed peers.

What it keeps: everything else. Other files in the state and run directories, the gossip
keyring and configuration files, the installed CNI plugin and its conflist, other links and
routes of the host, every rule and table that is not weavepy's, and the sysctls the agent
turned on (IP forwarding) all stay. Routes, neighbour and FDB entries that weavepy programmed
go with their device.

The rule it keeps: it touches only objects it can name from the configuration, by weavepy's
own veth prefix or by weavepy's rule tag, and returns what it removed, one item each, for the
user. A failure raises one `ResetError` (one line, naming what was already removed); what was
removed stays removed, and a second reset finishes the job.

Before it wipes the state, `space_left` reads what this node still holds in its IPAM cluster
(when its agent could not give the space back: not running, no quorum, or `--force`), so the
user learns the exact `weavepy rmpeer NAME` to run on a live node.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from weavepy.config import AgentConfig

__all__ = ["ResetError", "reset_node", "space_left"]


class ResetError(Exception):
    """A reset step failed; the message is one line and says what was already removed."""


def reset_node(config: AgentConfig) -> list[str]:
    """Remove this node's kernel objects and state (the agent must be stopped). Returns what
    was removed, for the user."""
    from tunnel.netlink import NetlinkError
    from weavepy.cni.podnet import PodNetError
    from weavepy.hostrules import HostRulesError

    removed: list[str] = []
    try:
        _reset_steps(config, removed)
    except (OSError, NetlinkError, PodNetError, HostRulesError) as exc:
        done = f" (removed before it: {', '.join(removed)})" if removed else ""
        raise ResetError(f"{' '.join(str(exc).split())}{done}") from exc
    return removed


def _reset_steps(config: AgentConfig, removed: list[str]) -> None:
    from tunnel.netlink import open_iproute
    from weavepy.cni.podnet import PodNetwork

    ipr = open_iproute()
    try:
        for name in (config.vxlan_device, config.bridge, config.wg_device):
            if _remove_link(ipr, name):
                removed.append(f"link {name}")
    finally:
        ipr.close()
    podnet = PodNetwork()
    try:
        for veth in podnet.host_veths():
            if podnet.delete_link(veth):
                removed.append(f"pod veth {veth}")
    finally:
        podnet.close()
    removed.extend(_remove_host_rules())
    removed.extend(_remove_policy_table())
    for path in _state_files(config):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(str(path))


def _remove_host_rules() -> tuple[str, ...]:
    """weavepy's table and tagged accepts, what was removed one line each (HostRulesError if
    any part could not be read or removed)."""
    from weavepy.hostrules import HostRules, HostRulesError

    try:
        rules = HostRules()
    except HostRulesError:  # no nftables support: the agent could not have placed any rule
        return ()
    return tuple(f"host rules: {change}" for change in rules.remove())


def _remove_policy_table() -> tuple[str, ...]:
    """The NetworkPolicy table (weavepy.policy), which outlives agent restarts on purpose."""
    from weavepy.nft import Nft, NftError
    from weavepy.policy.compiler import DEFAULT_TABLE

    try:
        nft = Nft()
        if nft.list_table("inet", DEFAULT_TABLE) is None:
            return ()
        ref = {"family": "inet", "name": DEFAULT_TABLE}
        nft.run([{"delete": {"table": ref}}])
    except NftError as exc:
        if "python3-nftables" in str(exc):  # no binding: the agent could not have placed it
            return ()
        raise ResetError(f"cannot remove the NetworkPolicy table inet {DEFAULT_TABLE}: "
                         f"{exc}") from None
    return (f"NetworkPolicy table inet {DEFAULT_TABLE}",)


def _remove_link(ipr: Any, name: str) -> bool:
    from tunnel.netlink import NetlinkError

    try:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        ipr.link("del", index=found[0])
        return True
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return False
        raise


def _state_files(config: AgentConfig) -> Iterator[Path]:
    """weavepy's own files in the state and run directories (nothing else is touched)."""
    from weavepy.apitoken import TOKEN_FILE
    from weavepy.identity import IDENTITY_FILE
    from weavepy.ipam_link import CORE_FILE, PODS_FILE
    from weavepy.kube_ipam import POD_CIDRS_FILE
    from weavepy.peerstore import EXTERNAL_PEERS_FILE, KNOWN_PEERS_FILE
    from weavepy.policy.enforcer import ATTACHMENTS_FILE
    from weavepy.reconcile import PROGRAMMED_FILE

    for name in (IDENTITY_FILE, CORE_FILE, PODS_FILE, KNOWN_PEERS_FILE, EXTERNAL_PEERS_FILE,
                 TOKEN_FILE, POD_CIDRS_FILE):
        yield config.state_dir / name
        if config.state_dir.is_dir():
            yield from sorted(config.state_dir.glob(f"{name}.corrupt-*"))
            yield from sorted(config.state_dir.glob(f".{name}.*"))
    yield config.run_dir / PROGRAMMED_FILE
    yield config.run_dir / ATTACHMENTS_FILE


def space_left(config: AgentConfig) -> str | None:
    """What this node's saved IPAM state says it still holds in its cluster (its blocks, or
    its membership alone), with the rmpeer that reclaims it; None if it holds nothing."""
    from weavepy.ipam.errors import IpamError
    from weavepy.ipam.state import ClusterState
    from weavepy.ipam.store import StateFile
    from weavepy.ipam_link import CORE_FILE

    path = config.state_dir / CORE_FILE
    try:
        snapshot = StateFile(path, "ipam-core").load()
        if snapshot is None or snapshot.get("cluster") is None:
            return None
        name = str(snapshot["node"])
        generation = snapshot.get("generation")
        cluster = ClusterState.from_plain(snapshot["cluster"])
    except (IpamError, OSError, KeyError, TypeError, ValueError) as exc:
        return (f"this node's IPAM state cannot be read ({' '.join(str(exc).split())}); if "
                f"it was a member, run on a live node of its cluster: "
                f"weavepy rmpeer {config.name}")
    if generation is None or cluster.generation_of(name) != generation:
        return None  # it left, or was never admitted: nothing is held in its name
    blocks = [str(cluster.space.block(i)) for i in cluster.blocks_of(name)]
    holds = f"blocks {', '.join(blocks)}" if blocks else "no blocks, only its membership"
    return (f"{name} (generation {generation}) still holds {holds} in IPAM cluster "
            f"{cluster.cluster_id}, as its last saved state says; to give them back, run on a "
            f"live node of that cluster: weavepy rmpeer {name}")
