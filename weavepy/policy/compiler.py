"""The compiler: (policies, pods, namespaces, this node) -> the node's policy table. Pure.

This module owns how NetworkPolicy becomes nftables rules on one node. It does no I/O; the
applier (applier.py) makes the kernel hold what it returns. docs/policy.md draws the layout;
in short, table `inet weavepy-policy` holds:

* two base chains on the forward hook, `egress` (priority P) then `ingress` (P + 1), each:
  `ct state established,related accept` (replies, and connections allowed when they began),
  `ip saddr . ip daddr @self accept` (a pod cannot block itself), then one verdict-map lookup:
  `ip saddr vmap @egress-pods` / `ip daddr vmap @ingress-pods`. The maps hold only this node's
  pods that some policy isolates in that direction: ingress is enforced on the destination's
  node, egress on the source's node. Everything else falls off the chain: accept.
* per distinct set of policies isolating a pod (its "signature"), one chain
  (`ingress-<hash>`/`egress-<hash>`): a jump to each of those policies' chains, then a
  rate-limited NFLOG (`log group G`), a per-pod counter (`counter name ip daddr map
  @ingress-drops`, in its own rule: a map miss ends a rule, and must not skip the drop) and
  the signature's counter with `drop` (in audit mode: no drop, the packet passes).
* per policy and direction, one chain (`pol-in-<ns>.<name>`): one rule per (peer, port) of
  each of its rules, ending in `accept`. Accept ends only the current base chain, so an
  egress accept still meets the destination's ingress check (weave-npc needed a mark for
  this, weave#3313).
* sets: pod addresses per distinct selector (`sel-<hash>`, cluster-wide), and per named port
  (`port-<name>-<proto>`: every pod's `address . port` for that name and protocol, so a name
  resolves per destination pod; a name served over another protocol is simply absent).

Sizes: elements grow with pods (each pod is in the sets its labels select, once per distinct
selector) and rules with policies (rules per policy depend only on the policy); no rule or
element exists per pair of pods. Only policies that isolate a pod on this node are compiled.

Traffic from the node to its pods leaves through the output hook and traffic from pods to
their node arrives through input: neither passes forward, so both are always allowed, as the
spec requires. Same-node pod traffic is bridged and reaches the forward hook through
br_netfilter (net.bridge.bridge-nf-call-iptables=1, the kernel's default once loaded).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import Any

from weavepy.policy.model import (
    ClusterState,
    Direction,
    LabelSelector,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyPort,
    Protocol,
)
from weavepy.policy.ruleset import (
    ChainDecl,
    Element,
    Expr,
    LimitDecl,
    RuleDecl,
    Ruleset,
    SetDecl,
)

__all__ = ["DEFAULT_LOG_GROUP", "DEFAULT_TABLE", "CompileOptions", "CompiledPolicy",
           "compile_policy", "drop_log_prefix", "parse_drop_log_prefix"]

DEFAULT_TABLE = "weavepy-policy"
DEFAULT_LOG_GROUP = 6784
LOG_LIMIT = "drop-log"
LOG_PREFIX = "weavepy-policy"
SELF_SET = "self"
COMMENT_MAX = 120  # nftables allows 128 bytes
NAME_MAX = 200  # nftables allows 256 for chain, set and object names
DIRECTIONS: tuple[Direction, ...] = ("egress", "ingress")
SHORT = {"ingress": "in", "egress": "eg"}
ADDRESS_FIELD = {"ingress": "daddr", "egress": "saddr"}  # the isolated pod's end
PEER_FIELD = {"ingress": "saddr", "egress": "daddr"}


@dataclass(frozen=True)
class CompileOptions:
    """How to compile: the table's name, audit mode (log what would be dropped, pass it), the
    NFLOG group and rate of drop logs, and the base chains' priority."""

    table: str = DEFAULT_TABLE
    audit: bool = False
    log_group: int = DEFAULT_LOG_GROUP
    log_rate: int = 10
    log_burst: int = 20
    priority: int = 0


@dataclass(frozen=True)
class CompiledPolicy:
    """The desired table, and what its names mean (for logs, counters and status).

    `signatures`: signature chain -> the policies it jumps to; `drop_counters`: counter ->
    (pod or signature chain, direction); `isolated`: pod -> direction -> signature chain;
    `notes`: what was left out and why (an IPv6 ipBlock, a pod whose address another pod has).
    """

    ruleset: Ruleset
    signatures: dict[str, tuple[str, ...]] = field(default_factory=dict)
    drop_counters: dict[str, tuple[str, Direction]] = field(default_factory=dict)
    isolated: dict[str, dict[Direction, str]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def drop_log_prefix(audit: bool, chain: str) -> str:
    """The NFLOG prefix of a signature chain's log rule: `weavepy-policy drop ingress-<hash> `
    (`audit` instead of `drop` in audit mode). The chain names the direction and, through
    `CompiledPolicy.signatures`, the policies; the drop log reads it back."""
    return f"{LOG_PREFIX} {'audit' if audit else 'drop'} {chain} "


def parse_drop_log_prefix(prefix: str) -> tuple[bool, Direction, str] | None:
    """(audit, direction, signature chain) of a prefix `drop_log_prefix` made, else None."""
    words = prefix.split()
    if len(words) != 3 or words[0] != LOG_PREFIX or words[1] not in ("drop", "audit"):
        return None
    chain = words[2]
    for direction in DIRECTIONS:
        if chain.startswith(f"{direction}-"):
            return words[1] == "audit", direction, chain
    return None


def _digest(text: str, length: int = 10) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _object_name(prefix: str, text: str) -> str:
    name = f"{prefix}{text}"
    return name if len(name) <= NAME_MAX else f"{name[:NAME_MAX - 11]}~{_digest(text)}"


def _comment(text: str) -> str:
    return text if len(text) <= COMMENT_MAX else text[:COMMENT_MAX - 3] + "..."


def _payload(protocol: str, name: str) -> Expr:
    return {"payload": {"protocol": protocol, "field": name}}


def _match(left: Expr, right: Any, op: str = "==") -> Expr:
    return {"match": {"op": op, "left": left, "right": right}}


def _prefix(network: IPv4Network) -> Any:
    if network.prefixlen == 32:
        return str(network.network_address)
    return {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}


L4PROTO: Expr = {"meta": {"key": "l4proto"}}
DPORT = _payload("th", "dport")


class _Compilation:
    """The state of one compile: sets by meaning, chains, and notes."""

    def __init__(self, state: ClusterState, node: str, options: CompileOptions) -> None:
        self.state = state
        self.node = node
        self.options = options
        self.sets: dict[str, SetDecl] = {}
        self.elements: dict[str, set[Element]] = defaultdict(set)
        self.selector_sets: dict[str, str] = {}
        self.notes: list[str] = []
        self.pods = state.addressed_pods
        self.pods_by_namespace: dict[str, list[Pod]] = defaultdict(list)
        for pod in self.pods:
            self.pods_by_namespace[pod.namespace].append(pod)

    # -- sets -----------------------------------------------------------------------------

    def _declare(self, decl: SetDecl) -> None:
        self.sets.setdefault(decl.name, decl)
        self.elements.setdefault(decl.name, set())

    def selector_set(self, policy: NetworkPolicy, peer: Peer) -> str:
        """The set of addresses of the pods `peer` (a selector peer of `policy`) selects."""
        pods = peer.pod_selector or LabelSelector()
        if peer.namespace_selector is None:
            meaning = f"pods {pods.text()} in namespace {policy.namespace}"
        else:
            meaning = f"pods {pods.text()} in namespaces {peer.namespace_selector.text()}"
        name = self.selector_sets.get(meaning)
        if name is not None:
            return name
        name = f"sel-{_digest(meaning)}"
        self.selector_sets[meaning] = name
        self._declare(SetDecl(name, ("ipv4_addr",)))
        if peer.namespace_selector is None:
            namespaces = [policy.namespace]
        else:
            selector = peer.namespace_selector
            namespaces = [ns for ns in self.pods_by_namespace
                          if selector.matches(self.state.namespace_labels(ns))]
        for namespace in namespaces:
            for pod in self.pods_by_namespace.get(namespace, ()):
                if pods.matches(pod.labels):
                    self.elements[name].add(str(pod.ip))
        return name

    def named_port_set(self, port_name: str, protocol: Protocol) -> str:
        name = f"port-{port_name}-{protocol.lower()}"
        if name not in self.sets:
            self._declare(SetDecl(name, ("ipv4_addr", "inet_service")))
            for pod in self.pods:
                number = pod.named_port(port_name, protocol)
                if number is not None:
                    self.elements[name].add((str(pod.ip), number))
        return name

    # -- rules ----------------------------------------------------------------------------

    def peer_matches(self, policy: NetworkPolicy, peer: Peer, direction: Direction,
                     ) -> list[Expr] | None:
        """The matches for one peer, or None when it can match nothing here."""
        address = _payload("ip", PEER_FIELD[direction])
        if peer.ip_block is None:
            return [_match(address, "@" + self.selector_set(policy, peer))]
        if not isinstance(peer.ip_block.cidr, IPv4Network):
            self.notes.append(f"{policy.key}: ipBlock {peer.ip_block.cidr} is IPv6; pods "
                              f"here are IPv4, so it matches nothing")
            return None
        matches = [_match(address, _prefix(peer.ip_block.cidr))]
        excepts = [b for b in peer.ip_block.excepts if isinstance(b, IPv4Network)]
        if excepts:
            matches.append(_match(address, {"set": [_prefix(b) for b in excepts]}, "!="))
        return matches

    def port_matches(self, port: PolicyPort) -> list[Expr]:
        matches = [_match(L4PROTO, port.protocol.lower())]
        if isinstance(port.port, str):
            concat = {"concat": [_payload("ip", "daddr"), DPORT]}
            matches.append(_match(concat, "@" + self.named_port_set(port.port, port.protocol)))
        elif port.port is not None:
            last = port.end_port if port.end_port is not None else port.port
            matches.append(_match(DPORT, port.port if last == port.port
                                  else {"range": [port.port, last]}))
        return matches

    def policy_chain(self, policy: NetworkPolicy, direction: Direction) -> ChainDecl:
        rules = []
        word = "from" if direction == "ingress" else "to"
        for r, rule in enumerate(policy.rules(direction)):
            peers: list[tuple[str, list[Expr]]] = [("", [])]
            if rule.peers:
                peers = []
                for p, peer in enumerate(rule.peers):
                    matches = self.peer_matches(policy, peer, direction)
                    if matches is not None:
                        peers.append((f" {word}[{p}]", matches))
            ports: list[tuple[str, list[Expr]]] = [("", [])]
            if rule.ports:
                ports = [(f" ports[{i}]", self.port_matches(port))
                         for i, port in enumerate(rule.ports)]
            for peer_label, peer_expr in peers:
                for port_label, port_expr in ports:
                    comment = _comment(f"{policy.key} {direction}[{r}]{peer_label}{port_label}")
                    rules.append(RuleDecl(tuple(peer_expr + port_expr + [{"accept": None}]),
                                          comment))
        return ChainDecl(self.policy_chain_name(policy, direction), tuple(rules))

    @staticmethod
    def policy_chain_name(policy: NetworkPolicy, direction: Direction) -> str:
        return _object_name(f"pol-{SHORT[direction]}-", f"{policy.namespace}.{policy.name}")

    def signature_chain(self, name: str, direction: Direction,
                        policies: tuple[NetworkPolicy, ...]) -> ChainDecl:
        options = self.options
        rules = [RuleDecl(({"jump": {"target": self.policy_chain_name(p, direction)}},),
                          _comment(f"policy {p.key}")) for p in policies]
        word = "audit" if options.audit else "drop"
        rules.append(RuleDecl(({"limit": LOG_LIMIT},
                               {"log": {"prefix": drop_log_prefix(options.audit, name),
                                        "group": options.log_group}}), "log"))
        pod_address = _payload("ip", ADDRESS_FIELD[direction])
        rules.append(RuleDecl(({"counter": {"map": {"key": pod_address,
                                                    "data": f"@{direction}-drops"}}},),
                              "count per pod"))
        final: list[Expr] = [{"counter": name}]
        if not options.audit:
            final.append({"drop": None})
        rules.append(RuleDecl(tuple(final), word))
        return ChainDecl(name, tuple(rules))


def _base_chain(direction: Direction, priority: int) -> ChainDecl:
    pair = {"concat": [_payload("ip", "saddr"), _payload("ip", "daddr")]}
    return ChainDecl(direction, (
        RuleDecl((_match({"ct": {"key": "state"}}, ["established", "related"], "in"),
                  {"accept": None}), "replies"),
        RuleDecl((_match(pair, "@" + SELF_SET), {"accept": None}), "self"),
        RuleDecl(({"vmap": {"key": _payload("ip", ADDRESS_FIELD[direction]),
                            "data": f"@{direction}-pods"}},), "dispatch"),
    ), hook="forward", priority=priority)


def _local_pods(state: ClusterState, node: str) -> list[Pod]:
    return [p for p in state.addressed_pods if p.node == node]


def compile_policy(state: ClusterState, node: str,
                   options: CompileOptions | None = None) -> CompiledPolicy:
    """The policy table node `node` must hold for `state`."""
    options = options or CompileOptions()
    work = _Compilation(state, node, options)
    for pod in state.address_conflicts:
        owner = state.pod_at(pod.ip) if pod.ip is not None else None
        work.notes.append(f"pod {pod.key} has address {pod.ip}, which "
                          f"{owner.key if owner else 'another pod'} has too; ignored")
    policies_by_namespace: dict[str, list[NetworkPolicy]] = defaultdict(list)
    for policy in sorted(state.policies, key=lambda p: p.key):
        policies_by_namespace[policy.namespace].append(policy)
    chains: list[ChainDecl] = []
    signature_chains: list[ChainDecl] = []
    policy_chains: dict[str, ChainDecl] = {}
    signatures: dict[str, tuple[str, ...]] = {}
    drop_counters: dict[str, tuple[str, Direction]] = {}
    isolated: dict[str, dict[Direction, str]] = {}
    counters: set[str] = set()
    for direction in DIRECTIONS:
        work._declare(SetDecl(f"{direction}-pods", ("ipv4_addr",), "verdict"))
        work._declare(SetDecl(f"{direction}-drops", ("ipv4_addr",), "counter"))
    work._declare(SetDecl(SELF_SET, ("ipv4_addr", "ipv4_addr")))
    for pod in _local_pods(state, node):
        for direction in DIRECTIONS:
            selecting = tuple(p for p in policies_by_namespace.get(pod.namespace, ())
                              if p.affects(direction) and p.pod_selector.matches(pod.labels))
            if not selecting:
                continue
            keys = tuple(p.key for p in selecting)
            chain_name = f"{direction}-{_digest(chr(10).join(keys))}"
            if chain_name not in signatures:
                signatures[chain_name] = keys
                signature_chains.append(work.signature_chain(chain_name, direction, selecting))
                counters.add(chain_name)
                drop_counters[chain_name] = (", ".join(keys), direction)
                for policy in selecting:
                    chain = work.policy_chain(policy, direction)
                    policy_chains.setdefault(chain.name, chain)
            address = str(pod.ip)
            counter = _object_name(f"{SHORT[direction]}.", f"{pod.namespace}.{pod.name}")
            counters.add(counter)
            drop_counters[counter] = (pod.key, direction)
            work.elements[f"{direction}-pods"].add((address, chain_name))
            work.elements[f"{direction}-drops"].add((address, counter))
            work.elements[SELF_SET].add((address, address))
            isolated.setdefault(pod.key, {})[direction] = chain_name
    chains = [_base_chain("egress", options.priority),
              _base_chain("ingress", options.priority + 1)]
    chains += sorted(signature_chains, key=lambda c: c.name)
    chains += [policy_chains[name] for name in sorted(policy_chains)]
    ruleset = Ruleset(
        table=options.table,
        limits=(LimitDecl(LOG_LIMIT, options.log_rate, options.log_burst),),
        counters=frozenset(counters),
        sets=tuple(work.sets[name] for name in sorted(work.sets)),
        chains=tuple(chains),
        elements={name: frozenset(found) for name, found in work.elements.items()},
    )
    return CompiledPolicy(ruleset, signatures, drop_counters, isolated,
                          tuple(dict.fromkeys(work.notes)))
