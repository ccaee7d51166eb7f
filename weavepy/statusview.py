"""What an operator reads: the status document's derived fields, and its text rendering.

This module owns turning the agent's status document (docs/api.md, schema in
docs/report.schema.json) into advice and into the text of `weavepy status ...` and
`weavepy report`, and the pod list (`GET /pods`) into the text of `weavepy ps`. It is pure:
documents in, strings and `Table`s out; no I/O, no clock, so the CLI's output is checked by
snapshot tests from stored documents.

The rules it keeps: every IPAM state that is not `ready` comes with the command that fixes
it; a missing or malformed field renders as `-`, never as a traceback.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "REPORT_VERSION",
    "Table",
    "connection_entries",
    "ipam_advice",
    "render_connections",
    "render_ipam",
    "render_peers",
    "render_pods",
    "render_report",
    "render_summary",
]

REPORT_VERSION = 1  # bump on an incompatible change of the report's shape
_BRIDGED = ("traffic between pods of this node bypasses iptables and nftables (Services with "
            "endpoints here, NetworkPolicy)")
# The one line `weavepy status` adds when bridged pod traffic skips the netfilter IP hooks.
_BRIDGE_NETFILTER_WARNINGS = {
    "absent": f"br_netfilter is not loaded: {_BRIDGED}; run `modprobe br_netfilter` and "
              f"restart the agent",
    "off": f"net.bridge.bridge-nf-call-iptables is 0 and the agent cannot set it: {_BRIDGED}; "
           f"run `sysctl -w net.bridge.bridge-nf-call-iptables=1`",
}
Doc = Mapping[str, Any]
Output = list["str | Table"]


@dataclass(frozen=True)
class Table:
    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def plain(self) -> str:
        """Aligned columns, for pipes and snapshots."""
        if not self.rows:
            return f"{self.title}:\n  (none)"
        cells = [self.header, *self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                 for row in cells]
        return f"{self.title}:\n" + "\n".join(lines)


def _map(doc: Doc, key: str) -> Mapping[str, Any]:
    value = doc.get(key)
    return value if isinstance(value, Mapping) else {}


def _list(doc: Doc, key: str) -> list[Mapping[str, Any]]:
    value = doc.get(key)
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _text(value: object) -> str:
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    return str(value)


# ---------------------------------------------------------------------------------------------
# Derived fields (the agent puts these into its status document)


def ipam_advice(ipam: Doc, node: str) -> str | None:
    """The command (or action) that fixes this node's IPAM state; None when ready."""
    state = ipam.get("state")
    unreachable = [str(n) for n in ipam.get("unreachable_owners") or ()]
    voters = [str(v) for v in ipam.get("voters") or () if v != node]
    if state == "ready":
        return None
    if state == "waiting_for_cluster":
        return ("join a cluster: `weavepy connect HOST` (or launch with peers); a node "
                "without peers founds one by itself")
    if state == "joining":
        return "wait for the join to be decided; `weavepy status peers` shows who is reachable"
    if state == "waiting_for_quorum":
        return ("wait a few seconds for a majority of voters to answer; if voters are gone "
                "for good: `weavepy rmpeer NAME` for each (`weavepy status ipam` lists them)")
    if state == "minority_partition":
        names = " ".join(voters) or "NAME"
        return (f"restore the network to the other voters ({names}); if they are gone for "
                f"good: `weavepy rmpeer NAME --force` for each")
    if state == "out_of_space":
        return ("free space with `weavepy rmpeer NAME` for nodes that are gone, or relaunch "
                "every node with a larger --ipalloc-range")
    if state == "owned_by_unreachable_peers":
        if unreachable:
            return "reclaim their blocks: " + "; ".join(
                f"`weavepy rmpeer {name}`" for name in unreachable)
        return "wait for the quarantine of released blocks to end, or `weavepy rmpeer NAME`"
    if state == "waiting_for_pod_cidr":
        return ("the control plane allocates podCIDRs with kube-controller-manager "
                "--allocate-node-cidrs (kubeadm --pod-network-cidr)")
    if state == "pod_cidr_refused":
        return ("make --ipalloc-range contain the cluster's pod network (kube-controller-manager "
                "--cluster-cidr, kubeadm --pod-network-cidr) on every node")
    return None


def connection_entries(peers: Sequence[Doc], fallbacks: Mapping[str, str], mtu: int,
                       encrypted: Mapping[str, tuple[str, str | None]] | None = None,
                       encrypted_mtu: int | None = None) -> list[dict[str, Any]]:
    """One connection per live peer: {peer, path, encrypted, mtu, state, reason}.

    `mtu` is the largest packet pods can send over the connection: the smallest of this node's
    pod MTU (`mtu`, also its VXLAN device's), the WireGuard TUN's (`encrypted_mtu`, on that
    path) and the peer's pod MTU (its `mtu`).
    `state` is established (routes programmed; on the WireGuard path also a fresh
    handshake), failed (the data plane left it out, or the handshake went unanswered; the
    reason says why) or pending (not programmed yet, e.g. no block yet, or handshaking).
    `encrypted` gives (state, reason) of each WireGuard connection; `encrypted_mtu` its MTU."""
    encrypted = encrypted or {}
    out: list[dict[str, Any]] = []
    for peer in peers:
        if peer.get("state") not in ("alive", "suspect"):
            continue
        name = str(peer.get("name"))
        path = peer.get("path")
        reason: str | None
        if peer.get("excluded") or (path is None and peer.get("problem")):
            state, reason = "failed", str(peer.get("excluded") or peer.get("problem"))
        elif path == "wireguard":
            state, reason = encrypted.get(name, ("pending", "waiting for the WireGuard path"))
            if state == "established" and not peer.get("programmed"):
                state, reason = "pending", "waiting for the next reconcile pass"
        elif peer.get("programmed"):
            state, reason = "established", fallbacks.get(name)
        else:
            state = "pending"
            reason = ("no block yet" if not peer.get("blocks") else "waiting for the next "
                      "reconcile pass") if path else "waiting for its data-plane tags"
        path_mtu = min(mtu, encrypted_mtu) if path == "wireguard" and encrypted_mtu else mtu
        peer_mtu = peer.get("mtu")
        if isinstance(peer_mtu, int) and 0 < peer_mtu < path_mtu:
            path_mtu = peer_mtu
        entry = {"peer": name, "path": str(path) if path else "none",
                 "encrypted": path == "wireguard", "mtu": path_mtu,
                 "state": state, "reason": reason}
        if peer.get("external"):
            entry["external"] = True
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------
# Rendering


def _counts(counts: Mapping[str, Any], order: Sequence[str]) -> str:
    known = [f"{int(counts.get(s, 0))} {s}" for s in order]
    extra = [f"{int(v)} {k}" for k, v in sorted(counts.items()) if k not in order]
    return ", ".join(known + extra)


def _discovery(doc: Doc) -> str:
    disc = _map(doc, "discovery")
    if disc.get("source") == "kubernetes":
        text = f"Kubernetes API ({_text(disc.get('peers'))} peers"
        if disc.get("last_error"):
            text += f", last error: {disc['last_error']}"
        return text + ")"
    targets = _list(doc, "targets")
    failing = [t for t in targets if t.get("last_error")]
    text = f"peer list ({len(targets)} targets"
    if failing:
        text += f", {len(failing)} failing"
    return text + ")"


def _host_rules(doc: Doc) -> str:
    """One line on the host rules (docs/egress.md): in place or not, and what they did."""
    rules = _map(doc, "host_rules")
    if rules.get("last_check") is None:
        return "pending (the first reconcile pass has not finished)"
    if not rules.get("present"):
        return "NOT in place: " + "; ".join(str(e) for e in rules.get("errors") or ("?",))
    masquerade = "on" if rules.get("masquerade") else "OFF"
    exceptions = rules.get("no_masq_cidrs") or ()
    if rules.get("masquerade") and exceptions:
        masquerade += f" (except {', '.join(str(n) for n in exceptions)})"
    accepts = ", ".join(str(a) for a in rules.get("accepts_in") or ()) or "none needed"
    return (f"in place, masquerade {masquerade}, forward accepts: {accepts}; "
            f"{_text(rules.get('masqueraded_packets'))} packets "
            f"({_text(rules.get('masqueraded_bytes'))} bytes) masqueraded, "
            f"{_text(rules.get('restorations'))} restorations")


def render_summary(doc: Doc) -> Output:
    """`weavepy status`: one line per concern."""
    ipam = _map(doc, "ipam")
    dataplane = _map(doc, "dataplane")
    conns = _list(doc, "connections")
    conn_counts: dict[str, int] = {}
    for conn in conns:
        conn_counts[str(conn.get("state"))] = conn_counts.get(str(conn.get("state")), 0) + 1
    paths = sorted({f"{c.get('path')} {'encrypted' if c.get('encrypted') else 'unencrypted'}"
                    for c in conns})
    ready = "yes" if doc.get("ready") else "NO: " + "; ".join(
        str(r) for r in doc.get("not_ready_reasons") or ())
    owned = len(ipam.get("owned_blocks") or ())
    last = _map(dataplane, "last_pass")
    encryption = "on (gossip keyring)" if doc.get("encryption") else "OFF (no gossip key)"
    members = _counts(_map(_map(doc, "gossip"), "members"), ("alive", "suspect", "failed", "left"))
    lines: Output = [
        f"weavepy {_text(doc.get('version'))} on node {_text(doc.get('name'))} "
        f"(cluster {_text(doc.get('cluster_id'))})",
        f"  ready:        {ready}",
        f"  encryption:   {encryption}",
        f"  discovery:    {_discovery(doc)}",
        f"  members:      {members}",
        f"  connections:  {_counts(conn_counts, ('established', 'pending', 'failed'))}"
        + (f" ({', '.join(paths)})" if paths else ""),
        f"  IPAM:         {_ipam_line(ipam, owned)}",
    ]
    if ipam.get("fix"):
        lines.append(f"    fix:        {ipam['fix']}")
    lines.append(f"  data path:    {_text(dataplane.get('path'))} device "
                 f"{_text(dataplane.get('device'))} mtu {_text(dataplane.get('mtu'))}, last pass "
                 + ("pending" if not last else "ok" if last.get("ok") else "with errors"))
    if "host_rules" in doc:
        lines.append(f"  host rules:   {_host_rules(doc)}")
    warning = _BRIDGE_NETFILTER_WARNINGS.get(str(dataplane.get("bridge_netfilter")))
    if warning is not None:
        lines.append(f"  warning:      {warning}")
    return lines


def _ipam_line(ipam: Doc, owned: int) -> str:
    if ipam.get("mode") == "kubernetes":
        line = (f"{_text(ipam.get('state'))}: --ipam kubernetes, podCIDR "
                f"{_text(ipam.get('pod_cidr'))}")
        quiet = ipam.get("state") == "ready" and ipam.get("pod_cidr_source") == "api"
    else:
        line = (f"{_text(ipam.get('state'))}: owns {owned} of {_text(ipam.get('total_blocks'))}"
                f" blocks, {_text(ipam.get('free_blocks'))} free")
        quiet = False
    return line + (f" ({ipam['detail']})" if ipam.get("detail") and not quiet else "")


def render_peers(doc: Doc) -> Output:
    rows = tuple((_text(p.get("name")), _text(p.get("state")), _text(p.get("underlay_ip")),
                  _text(p.get("gossip_addr")), _text(p.get("blocks")),
                  _text(p.get("programmed")))
                 for p in _list(doc, "peers"))
    return [Table("peers", ("NAME", "STATE", "UNDERLAY", "GOSSIP", "BLOCKS", "ROUTES"), rows)]


def render_connections(doc: Doc) -> Output:
    rows = tuple((_text(c.get("peer")), _text(c.get("path")), _text(c.get("encrypted")),
                  _text(c.get("mtu")), _text(c.get("state")), _text(c.get("reason")))
                 for c in _list(doc, "connections"))
    return [Table("connections", ("PEER", "PATH", "ENCRYPTED", "MTU", "STATE", "REASON"),
                  rows)]


def render_targets(doc: Doc) -> Output:
    """`weavepy status targets`: the join targets (launch peers, `connect`) and their state."""
    rows = tuple((_text(t.get("peer")), _text(t.get("state")), _text(t.get("attempts")),
                  _text(t.get("last_error")))
                 for t in _list(doc, "targets"))
    return [f"discovery: {_discovery(doc)}",
            Table("targets", ("PEER", "STATE", "ATTEMPTS", "LAST ERROR"), rows)]


def render_ipam(doc: Doc) -> Output:
    ipam = _map(doc, "ipam")
    pods = _map(ipam, "pods")
    if ipam.get("mode") == "kubernetes":
        return _render_kube_ipam(ipam, pods)
    out: Output = [
        f"IPAM {_text(ipam.get('state'))}" + (f": {ipam['detail']}" if ipam.get("detail")
                                             else ""),
        f"  voters {ipam.get('voters_reachable', '-')}/{len(ipam.get('voters') or ())} "
        f"reachable (quorum {_text(ipam.get('quorum'))}); blocks: "
        f"{_text(ipam.get('total_blocks'))} in the range, {_text(ipam.get('free_blocks'))} free,"
        f" {_text(ipam.get('quarantined_blocks'))} quarantined",
        f"  unreachable owners: {_text(ipam.get('unreachable_owners'))}",
    ]
    if ipam.get("fix"):
        out.append(f"  fix: {ipam['fix']}")
    rows = []
    for member in _list(ipam, "members"):
        blocks = [str(b) for b in member.get("blocks") or ()]
        usage = [_map(pods, b) for b in blocks if b in pods]
        used = sum(int(u.get("used", 0)) for u in usage)
        capacity = sum(int(u.get("capacity", 0)) for u in usage)
        rows.append((_text(member.get("name")), _text(blocks),
                     str(used) if usage else "-",
                     str(capacity - used) if usage else "-",
                     "yes" if member.get("alive") else
                     "NO, Node deleted" if member.get("node_deleted") else "NO",
                     _text(member.get("voter"))))
    out.append(Table("blocks per node", ("NODE", "BLOCKS", "USED", "FREE", "REACHABLE",
                                         "VOTER"), tuple(rows)))
    return out


def _render_kube_ipam(ipam: Doc, pods: Doc) -> Output:
    """`weavepy status ipam` with `--ipam kubernetes`: the nodes' podCIDRs."""
    source = {"api": "the Kubernetes API", "saved": "the state directory (the API has not "
              "answered since the start)"}.get(str(ipam.get("pod_cidr_source")), "-")
    out: Output = [
        f"IPAM {_text(ipam.get('state'))}" + (f": {ipam['detail']}" if ipam.get("detail")
                                             else ""),
        f"  --ipam kubernetes: blocks are the nodes' podCIDRs, from {source}",
        f"  this node's podCIDR: {_text(ipam.get('pod_cidr'))}",
    ]
    if ipam.get("fix"):
        out.append(f"  fix: {ipam['fix']}")
    refused = _map(ipam, "refused_pod_cidrs")
    out.extend(f"  refused: {why}" for _, why in sorted(refused.items()))
    rows = []
    for member in _list(ipam, "members"):
        blocks = [str(b) for b in member.get("blocks") or ()]
        usage = [_map(pods, b) for b in blocks if b in pods]
        used = sum(int(u.get("used", 0)) for u in usage)
        capacity = sum(int(u.get("capacity", 0)) for u in usage)
        rows.append((_text(member.get("name")), _text(blocks),
                     str(used) if usage else "-", str(capacity - used) if usage else "-",
                     "yes" if member.get("alive") else "NO"))
    out.append(Table("podCIDRs per node", ("NODE", "POD CIDR", "USED", "FREE", "REACHABLE"),
                     tuple(rows)))
    return out


_FULL_CONTAINER_ID = re.compile(r"^[0-9a-f]{64}$")


def render_pods(doc: Doc) -> Output:
    """`weavepy ps`: one row per pod attachment, like Weave's `weave ps` (a runtime's 64-hex
    container ID shortened to 12 characters, as docker and Weave print it), then one line per
    attachment that is not whole."""
    rows = []
    problems: Output = []
    for pod in _list(doc, "pods"):
        container = str(pod.get("container_id") or "")
        if _FULL_CONTAINER_ID.match(container):
            container = container[:12]
        rows.append((_text(container), _text(pod.get("ifname")), _text(pod.get("host_ifname")),
                     _text(pod.get("mac")), _text(pod.get("addresses"))))
        if pod.get("problem"):
            problems.append(f"{_text(container)}/{_text(pod.get('ifname'))}: {pod['problem']}")
    return [Table("pods", ("CONTAINER", "IFNAME", "HOST IFNAME", "MAC", "ADDRESSES"),
                  tuple(rows)), *problems]


def render_report(doc: Doc) -> Output:
    """`weavepy report` without --json: every section."""
    return [*render_summary(doc), *render_peers(doc), *render_connections(doc),
            *render_targets(doc), *render_ipam(doc)]


def render_policy(doc: Doc) -> Output:
    """`weavepy status policy`: where policy comes from, the policies and the pods of this
    node they isolate, drops, notes and the source's errors (`GET /policy`)."""
    out: Output = [f"NetworkPolicy: {_text(doc.get('mode'))} ({_text(doc.get('source'))})"
                   + (", AUDIT mode (nothing is dropped)" if doc.get("audit") else "")]
    if doc.get("mode") == "off":
        return out
    isolated = _map(doc, "isolated_pods")
    out.append(f"  ready {_text(doc.get('ready'))}; {len(_list(doc, 'policies'))} policies; "
               f"{_text(doc.get('local_pods'))} pods on this node, isolated for ingress "
               f"{_text(isolated.get('ingress'))}, egress {_text(isolated.get('egress'))}")
    out.append(f"  table {_text(doc.get('table'))}: {_text(doc.get('applies'))} applies, "
               f"{_text(doc.get('apply_errors'))} errors, {_text(doc.get('repairs'))} repairs")
    for key in ("last_error", "last_repair", "counter_error"):
        if doc.get(key):
            out.append(f"  {key.replace('_', ' ')}: {doc[key]}")
    source = _map(doc, "source_status")
    for what, problem in sorted(_map(source, "invalid").items()):
        out.append(f"  source error (last good version kept): {what}: {problem}")
    for line in source.get("duplicates") or ():
        out.append(f"  source: {line}")
    for kind, status in sorted(_map(source, "kinds").items()):
        if isinstance(status, Mapping) and status.get("last_error"):
            out.append(f"  Kubernetes {kind}: {status['last_error']}")
    for note in doc.get("notes") or ():
        out.append(f"  note: {note}")
    rows = []
    for policy in _list(doc, "policies"):
        drops = _map(policy, "drops")
        rows.append((_text(policy.get("policy")), _text(policy.get("types")),
                     _text(policy.get("pods")),
                     f"{drops.get('ingress', 0)}/{drops.get('egress', 0)}"))
    out.append(Table("policies", ("POLICY", "TYPES", "PODS HERE", "DROPS IN/EG"), tuple(rows)))
    pod_rows = []
    for pod in _list(doc, "pods"):
        isolated_by = _map(pod, "isolated")
        drops = _map(pod, "drops")
        pod_rows.append((_text(pod.get("pod")), _text(pod.get("ip")),
                     _text(isolated_by.get("ingress")), _text(isolated_by.get("egress")),
                     f"{drops.get('ingress', 0)}/{drops.get('egress', 0)}"))
    out.append(Table("isolated pods on this node", ("POD", "IP", "INGRESS BY", "EGRESS BY",
                                                     "DROPS IN/EG"), tuple(pod_rows)))
    return out


def render_explain(doc: Doc) -> Output:
    """`weavepy policy explain`: the verdict, the reason, and each end's decision."""
    out: Output = [str(line) for line in str(doc.get("text", "")).splitlines()]
    if doc.get("audit"):
        out.append("  (audit mode: a denied connection is logged and counted, and passes)")
    for note in doc.get("notes") or ():
        out.append(f"  note: {note}")
    return out
