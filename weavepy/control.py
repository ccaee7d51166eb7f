"""The node's answers to its operator: status, readiness, and the requests that change peers.

This module owns what the local API (weavepy.api) and the metrics endpoint ask of a running
agent: the status document (docs/report.schema.json), readiness and its reasons, how peers are
discovered, the pods on this node (`weavepy ps`), the wg-quick file of an external peer,
declaring and removing external peers, adding and forgetting join targets (`connect`,
`forget`), `rmpeer`, this node's own `leave` (its space back to the cluster, for `weavepy
reset`), and `stop`. `NodeControl`
answers them from the agent's parts (weavepy.agent builds one per agent); it implements
`weavepy.api.AgentControl`.

The rules it keeps:

* **No HTTP here.** A request the node refuses raises a `ControlError` subclass, named for
  what went wrong in the node's own terms: `Invalid` (the request is malformed: a bad address,
  key or range), `NotFound` (it names something the node does not know), `Conflict` (it
  contradicts the node's state, or IPAM refuses it) and `Unavailable` (no answer now, maybe
  later). weavepy.api maps each to its status code, in one place.
* Every message is one readable sentence that says what to do instead.
* Answers read the agent's state and never block the trio loop; requests that change state
  (join targets, external peers) wake the task that acts on it, and what must survive a
  restart is saved through weavepy.peerstore. What takes time (an rmpeer or leave decision)
  is bounded here.
"""

from __future__ import annotations

import hashlib
import logging
import time
from ipaddress import IPv4Address
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from weavepy import __version__
from weavepy.ipam_link import IpamLinkError
from weavepy.metrics import PolicySnapshot
from weavepy.nft import NftError
from weavepy.peerstore import save_external_peers
from weavepy.podlist import PodListError, pod_list, read_pod_macs
from weavepy.policy.enforcer import ExplainError, explain, status_document
from weavepy.policy.sources import DirectorySource
from weavepy.reconcile import DesiredDataPlane
from weavepy.statusview import REPORT_VERSION, connection_entries, ipam_advice
from weavepy.targets import normalise_addresses
from weavepy.wgpath import (
    CAP_WIREGUARD,
    ConfigNode,
    encrypt_tag,
    parse_external_peer,
    render_wg_quick,
)

if TYPE_CHECKING:
    from weavepy.agent import Agent

__all__ = ["Conflict", "ControlError", "Invalid", "NodeControl", "NotFound", "Unavailable"]

log = logging.getLogger(__name__)

RMPEER_TIMEOUT = 15.0  # seconds an rmpeer, or this node's leave, waits for the decision


class ControlError(Exception):
    """A request the node refuses; the message is one readable sentence. Raise a subclass:
    the API answers each kind with its own status code."""


class Invalid(ControlError):
    """The request is malformed (a bad address, key or range)."""


class NotFound(ControlError):
    """The request names something this node does not know."""


class Conflict(ControlError):
    """The request contradicts the node's state (a member's name, rmpeer of a live node or of
    the node itself), or IPAM refuses it."""


class Unavailable(ControlError):
    """The node cannot answer now (no IPAM decision in time); the same request may succeed
    later."""


class NodeControl:
    """The answers of one running agent (see the module docstring)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def request_stop(self, leave: bool = True) -> None:
        """Stop the agent; with `leave`, tell the cluster first."""
        self.agent.request_stop(leave)

    async def render_metrics(self) -> bytes:
        """The Prometheus exposition, gauges refreshed from the status now (and the policy
        drop counters read from the kernel, off the event loop)."""
        self.agent.metrics.update_from_status(self.status())
        if self.agent.policy is not None:
            self.agent.metrics.update_policy(PolicySnapshot.from_status(await self.policy()))
        return self.agent.metrics.render()

    def readiness(self) -> tuple[bool, list[str]]:
        """(ready, the reasons it is not): a usable block, routes programmed, the pod bridge
        serving the usable blocks, the CNI socket listening and, where checked, the CNI config
        installed."""
        agent = self.agent
        reasons = []
        ipam = agent.ipam.status()
        if ipam is None or not ipam.owned_blocks:
            reasons.append(f"no usable block yet (IPAM {ipam.state.value if ipam else 'n/a'}: "
                           f"{ipam.detail if ipam else 'starting'})")
        last = agent.reconciler.last
        if last is None:
            reasons.append("routes not programmed yet")
        elif not last.ok:
            reasons.append("the last reconcile pass had errors")
        elif ipam is not None and not set(ipam.owned_blocks) <= set(agent.reconciler.local_blocks):
            reasons.append("the pod bridge does not serve this node's blocks yet")
        if not agent.cni_listening:
            reasons.append("the CNI socket is not listening")
        conflist = self.conflist_path()
        if conflist is not None and not conflist.exists():
            reasons.append(f"the CNI config {conflist} is not installed (the init container "
                           f"or `weavepy install-cni` writes it)")
        return not reasons, reasons

    def conflist_path(self) -> Path | None:
        """The conflist /readyz waits for, or None when this node does not check it."""
        from weavepy.cni.install import CONFLIST_NAME

        conf_dir = self.agent.config.cni_conf_check_dir
        return conf_dir / CONFLIST_NAME if conf_dir is not None else None

    def discovery(self) -> dict[str, Any]:
        """How this node finds peers: the configured list, or the Kubernetes API."""
        if self.agent.kube is not None:
            return self.agent.kube.status()
        return {"source": "peers", "peers": len(self.agent.joiner.targets.addresses())}

    def status(self) -> dict[str, Any]:
        """The status document (`weavepy status`, `/report`; docs/report.schema.json)."""
        agent = self.agent
        config, prepared, reconciler = agent.config, agent.prepared, agent.reconciler
        svc = agent.svc
        desired, _ = agent.desired()
        programmed = set(reconciler.programmed) | reconciler.encrypted_programmed
        blocks = agent.ipam.blocks_by_node()
        peers = []
        for peer in agent.view.peers():
            entry = peer.to_json()
            entry["blocks"] = [str(b) for b in blocks.get(peer.name, ())]
            entry["path"] = desired.paths.get(peer.name)
            entry["programmed"] = peer.name in programmed
            entry["excluded"] = desired.excluded.get(peer.name)
            until = desired.kept.get(peer.name)  # a failed peer's routes, kept (--route-grace)
            entry["routes_kept_s"] = (None if until is None
                                      else round(until - trio.current_time(), 1))
            peers.append(entry)
        ready, reasons = self.readiness()
        last = reconciler.last
        gossip: dict[str, Any] = {}
        if svc is not None:
            stats = svc.stats
            gossip = {
                "address": "{}:{}".format(*svc.advertise_address),
                "members": dict(agent.view.counts()),
                "health_score": svc.node.health_score,
                "drops": dict(stats.drops()),
                "packets_in": stats.node.packets_in,
                "packets_out": stats.node.packets_out,
                "bytes_in": stats.node.bytes_in,
                "bytes_out": stats.node.bytes_out,
                "probe_failures": stats.node.probe_failures,
                "suspicions": stats.node.suspicions,
                "tag_problems": dict(agent.view.tag_problems),
            }
        ipam = agent.ipam.status_json()
        ipam["fix"] = ipam_advice(ipam, config.name)
        conflist = self.conflist_path()
        return {
            "report_version": REPORT_VERSION,
            "version": __version__,
            "name": config.name,
            "cluster_id": agent.ipam.cluster_id,
            "uptime_s": round(time.time() - agent.started_at, 1),
            "encryption": prepared.keyring is not None,
            "ready": ready,
            "not_ready_reasons": reasons,
            "discovery": self.discovery(),
            "gossip": gossip,
            "targets": agent.joiner.targets.to_json(),
            "peers": peers,
            "blocks": [{"block": str(b), "owner": owner} for owner, owned in sorted(blocks.items())
                       for b in owned],
            "connections": connection_entries(
                peers + self._external_entries(programmed), desired.fallbacks,
                prepared.mtu, self._encrypted_states(desired), agent.encrypted.mtu),
            "ipam": ipam,
            "dataplane": {
                "path": "vxlan",
                "device": config.vxlan_device,
                "vni": config.vxlan_vni,
                "port": config.vxlan_port,
                "mtu": prepared.mtu,
                "bridge": config.bridge,
                "bridge_netfilter": prepared.bridge_netfilter,
                "local_blocks": [str(b) for b in reconciler.local_blocks],
                "underlay": {"iface": prepared.underlay.iface,
                             "address": str(prepared.underlay.local_ip),
                             "mtu": prepared.underlay.mtu},
                "settled": reconciler.settled,
                "passes": reconciler.passes,
                "pass_errors": reconciler.errors,
                "last_pass": last.to_json() if last else None,
                "programmed_peers": sorted(programmed),
                "traffic": self._traffic(),
                "encrypt": encrypt_tag(config.encrypt_all, config.encrypt_peers),
                "wireguard": agent.encrypted.status(),
                "external_peers": self._external_json(),
            },
            "host_rules": agent.host_rules.to_json(),
            "policy": self.policy_summary(),
            "cni": {"socket": str(config.cni_socket), "listening": agent.cni_listening,
                    "requests": dict(agent.cni_requests),
                    "conflist": str(conflist) if conflist is not None else None,
                    "conflist_installed": conflist.exists() if conflist is not None else None},
            "config": config.to_public_dict(),
        }

    # -- NetworkPolicy ----------------------------------------------------------------------

    def policy_summary(self) -> dict[str, Any]:
        """The status document's `policy` section: where policy comes from, whether it is
        applied, the source's errors, and counts (no kernel reads)."""
        from weavepy.agent import policy_mode

        agent = self.agent
        mode, described = policy_mode(agent.config)
        out: dict[str, Any] = {"mode": mode, "source": described,
                               "audit": agent.config.policy_audit}
        enforcer = agent.policy
        if enforcer is None:
            return out
        state, compiled = enforcer.snapshot()
        counts = enforcer.counts
        out.update({
            "ready": enforcer.ready,
            "stale": agent.policy_stale,
            "policies": len(state.policies) if enforcer.ready else None,
            "local_pods": len(enforcer.attachments),
            "isolated_pods": ({d: sum(1 for dirs in compiled.isolated.values() if d in dirs)
                               for d in ("ingress", "egress")} if compiled else None),
            "table": compiled.ruleset.table if compiled else None,
            "applies": counts.applies,
            "apply_errors": counts.errors,
            "last_error": counts.last_error,
            "last_apply": counts.last_apply,
            "last_kind": counts.last_kind,
            "repairs": enforcer.applier.repairs,
            "last_repair": enforcer.applier.last_repair,
            "source_status": self._policy_source_status(),
        })
        return out

    def _policy_source_status(self) -> dict[str, Any]:
        source = self.agent.policy_source
        if isinstance(source, DirectorySource):
            return {"source": "directory", "directory": str(source.directory),
                    "inotify": source.notified, "reads": source.polls,
                    "invalid": source.errors, "duplicates": list(source.duplicates)}
        if source is not None:
            return source.status()
        return {}

    async def policy(self) -> dict[str, Any]:
        """`weavepy status policy` (`GET /policy`): the summary, and policies, the pods of
        this node they select, isolation per direction, drops and notes."""
        summary = self.policy_summary()
        enforcer = self.agent.policy
        if enforcer is None:
            return summary | {"policies": [], "pods": [], "notes": []}
        try:
            counters = await trio.to_thread.run_sync(enforcer.counter_values)
        except NftError as exc:
            summary["counter_error"] = str(exc)
            counters = {}
        state, compiled = enforcer.snapshot()
        reader = self.agent.drop_reader
        drops = reader.status() if reader is not None else None
        return summary | status_document(state, compiled, self.agent.config.name, counters) | {
            "drop_log": drops}

    def explain(self, src: str, dst: str, port: str) -> dict[str, Any]:
        """`weavepy policy explain` (`GET /policy/explain`): the reference evaluator's verdict
        on the live state, and the policies that decided it."""
        enforcer = self.agent.policy
        if enforcer is None:
            raise Unavailable("NetworkPolicy is not enforced on this node (see `weavepy "
                              "status policy`)")
        if not enforcer.ready:
            raise Unavailable("the policy source has not given its first state yet; try "
                              "again in a moment")
        state, compiled = enforcer.snapshot()
        try:
            answer = explain(state, src, dst, port, self._node_addresses())
        except ExplainError as exc:
            raise Invalid(str(exc)) from None
        answer["audit"] = self.agent.config.policy_audit
        answer["notes"] = list(compiled.notes) if compiled else []
        return answer

    def _node_addresses(self) -> dict[IPv4Address, str]:
        """Addresses that are nodes (for explain: a node's traffic to its pods passes): the
        peers' underlay addresses, ours, and our pod blocks' gateways."""
        agent = self.agent
        found = {peer.identity.underlay_ip: peer.name for peer in agent.view.peers()
                 if peer.identity is not None}
        found[agent.prepared.underlay.local_ip] = agent.config.name
        for block in agent.reconciler.local_blocks:
            found[block.network_address + 1] = agent.config.name
        return found

    async def pods(self) -> list[dict[str, Any]]:
        """Every pod attachment on this node (`weavepy ps`): IPAM's allocations with their
        interfaces' names and the pod side's MAC (weavepy.podlist; the kernel is read in a
        worker thread)."""
        allocations = self.agent.ipam.allocator.allocations()
        try:
            macs = await trio.to_thread.run_sync(read_pod_macs)
        except PodListError as exc:
            raise Unavailable(f"cannot read this node's pod interfaces: {exc}") from None
        return pod_list(allocations, macs)

    def _traffic(self) -> dict[str, dict[str, int]]:
        """Counters per data path (the VXLAN device's, once read)."""
        latest = self.agent.vxlan_counters.latest
        return {"vxlan": dict(latest)} if latest is not None else {}

    def _encrypted_states(self, desired: DesiredDataPlane) -> dict[str, tuple[str, str | None]]:
        return {peer.name: self.agent.encrypted.connection(peer.name) for peer in desired.wg_peers}

    def _external_entries(self, programmed: set[str]) -> list[dict[str, Any]]:
        """External hosts as peer-like entries for the connection list."""
        return [{"name": name, "state": "alive", "path": "wireguard", "external": True,
                 "programmed": name in programmed, "blocks": [str(n) for n in host.allowed_ips]}
                for name, host in sorted(self.agent.external.items())]

    def _external_json(self) -> list[dict[str, Any]]:
        return [p.to_json() for _, p in sorted(self.agent.external.items())]

    def wg_config(self, name: str) -> str:
        """The wg-quick configuration for external peer `name` (see weavepy.wgpath)."""
        agent, config = self.agent, self.agent.config
        host = agent.external.get(name)
        if host is None:
            known = ", ".join(sorted(agent.external)) or "none are declared"
            raise NotFound(f"no external peer named {name!r} ({known}); declare it with "
                           f"`weavepy external add` or in the config file")
        blocks = agent.ipam.blocks_by_node()
        nodes = [ConfigNode(config.name, agent.identity.wg_public_key,
                            (agent.prepared.advertise[0], config.wg_port),
                            tuple(blocks.get(config.name, ())))]
        for peer in agent.view.live_peers():
            ident = peer.identity
            if (ident is None or ident.wg_public_key is None or ident.wg_port is None
                    or CAP_WIREGUARD not in ident.capabilities):
                continue
            nodes.append(ConfigNode(peer.name, ident.wg_public_key,
                                    (str(ident.underlay_ip), ident.wg_port),
                                    tuple(blocks.get(peer.name, ()))))
        return render_wg_quick(host, nodes, agent.encrypted.mtu, config.name)

    def add_external(self, raw: object) -> dict[str, Any]:
        """Declare (or replace) an external peer; kept in the state directory."""
        agent = self.agent
        try:
            host = parse_external_peer(raw)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        if host.name == agent.config.name or agent.view.get(host.name) is not None:
            raise Conflict(f"{host.name} is a cluster member's name; pick another")
        pod_range = agent.config.ipalloc_range
        inside = [str(n) for n in host.allowed_ips if n.overlaps(pod_range)]
        if inside:
            raise Invalid(f"{', '.join(inside)} overlaps the cluster range {pod_range} "
                          f"(pods get those addresses); give the host an address outside it")
        agent.external[host.name] = host
        self._save_external()
        agent.reconciler.poke(f"external peer {host.name} declared")
        return {"external_peers": self._external_json()}

    def remove_external(self, name: str) -> dict[str, Any]:
        """Forget an external peer declared through the API (or the configuration, until the
        next start)."""
        agent = self.agent
        if name not in agent.external:
            raise NotFound(f"no external peer named {name!r}")
        del agent.external[name]
        self._save_external()
        agent.reconciler.poke(f"external peer {name} removed")
        return {"external_peers": self._external_json()}

    def _save_external(self) -> None:
        """Keep the peers declared through the API (not those of the configuration)."""
        declared = {p.name for p in self.agent.config.external_peers}
        save_external_peers(self.agent.config.state_dir,
                            [p for name, p in self.agent.external.items() if name not in declared])

    async def connect(self, peers: list[str], replace: bool) -> dict[str, Any]:
        """Add join targets (or, with `replace`, make them the only ones)."""
        targets = self.agent.joiner.targets
        try:
            normalised = normalise_addresses(peers, self.agent.config.gossip_port)
        except ValueError as exc:
            raise Invalid(f"bad peer address: {exc}") from None
        now = trio.current_time()
        if replace:
            targets.replace(normalised, now)
            added = normalised
        else:
            added = targets.add(normalised, now)
        self.agent.joiner.wake()
        return {"targets": targets.addresses(), "added": added}

    def forget(self, peers: list[str]) -> dict[str, Any]:
        """Drop join targets (members already joined stay)."""
        targets = self.agent.joiner.targets
        try:
            normalised = normalise_addresses(peers, self.agent.config.gossip_port)
        except ValueError as exc:
            raise Invalid(f"bad peer address: {exc}") from None
        removed = targets.remove(normalised)
        unknown = [p for p in normalised if p not in removed]
        return {"targets": targets.addresses(), "forgotten": removed, "unknown": unknown}

    async def reload_keyring(self) -> dict[str, Any]:
        """Read --keyring-file again and make the running gossip keyring exactly what it says
        (the first key encrypts, all decrypt): one step of a key rotation, no restart."""
        from gossip.keyring import Keyring

        agent = self.agent
        path, keyring = agent.config.keyring_file, agent.prepared.keyring
        if path is None or keyring is None:
            raise Conflict("this agent has no --keyring-file to reload (a key from "
                           "$WEAVEPY_ENCRYPT changes only with a restart)")
        try:
            keys = (await trio.to_thread.run_sync(Keyring.from_file, path)).keys
        except (OSError, ValueError) as exc:
            raise Invalid(f"--keyring-file {path}: {exc}; the keyring in use is unchanged"
                          ) from None
        keyring.replace(keys)
        primary = hashlib.sha256(keys[0]).hexdigest()[:16]
        log.info("gossip keyring reloaded from %s: %d key(s), primary sha256 %s...", path,
                 len(keys), primary)
        return {"keys": len(keys), "primary_sha256": primary}

    async def rmpeer(self, name: str, force: bool) -> dict[str, Any]:
        """Remove a gone node from IPAM (its blocks are freed or quarantined)."""
        agent = self.agent
        if name == agent.config.name:
            raise Conflict("a node cannot rmpeer itself; run `weavepy reset` on it instead")
        member = agent.view.get(name)
        if member is not None and member.live and not force:
            raise Conflict(f"{name} is {member.state.value}; rmpeer is for nodes that are "
                           f"gone (stop it first, or add --force if you are sure)")
        try:
            with trio.fail_after(RMPEER_TIMEOUT):
                return await agent.ipam.rmpeer(name, force)
        except IpamLinkError as exc:
            raise Conflict(str(exc)) from None
        except trio.TooSlowError:
            raise Unavailable(f"no decision on removing {name} within {RMPEER_TIMEOUT:.0f} s "
                              f"(IPAM {agent.ipam.state_name()}); a majority of voters must be "
                              f"reachable, or use --force") from None

    async def leave(self) -> dict[str, Any]:
        """Give this node's address space back to the cluster, by quorum (Weave's DELETE
        /peer; `weavepy reset` asks this before it stops the agent). Refused in a minority."""
        agent = self.agent
        try:
            with trio.fail_after(RMPEER_TIMEOUT):
                return await agent.ipam.leave()
        except IpamLinkError as exc:
            raise Conflict(str(exc)) from None
        except trio.TooSlowError:
            raise Unavailable(f"no decision on giving {agent.config.name}'s blocks back within "
                              f"{RMPEER_TIMEOUT:.0f} s (IPAM {agent.ipam.state_name()}); this "
                              f"node no longer hands out addresses, and its blocks are freed "
                              f"once the voters decide") from None
