"""weavepy.hostrules.plan: what weavepy's host rules should be, and the commands that make them so.

Theory of operation
===================

Pods have addresses from the cluster range, which nothing outside the cluster routes. Three
things make them reach the world, and this module decides all three without touching the host:

1. **Egress masquerade**, in weavepy's own nftables table `ip weavepy`. A packet from the cluster
   range, leaving through an interface that is not one of weavepy's devices (bridge, VXLAN,
   WireGuard TUN), to a destination outside the cluster range, is masqueraded to the address of
   the interface it leaves by. Never masqueraded: pod-to-pod traffic (the destination is in the
   cluster range: source addresses survive for NetworkPolicy), multicast 224.0.0.0/4 and the
   limited broadcast, anything leaving through weavepy's own devices (the overlay carries pod
   addresses both ways), and the operator's exclusions (`no_masq_cidrs`: a VPC range, the
   service range). Masquerade can be switched off (`masquerade=False`).
2. **Peer nodes under strict reverse-path filtering.** A pod that talks to another node's
   underlay address is always masqueraded, whatever the switch and the exclusions say. The
   other node routes the cluster range through the overlay, so an answer to a pod address would
   leave it through the overlay with the underlay address as source, and a node with
   `rp_filter=1` drops it (the route back to that source is the underlay interface). With the
   node's own address as source, the answer comes straight back over the underlay. The agent
   feeds the live peers' underlay addresses (`peer_node_addresses`); they live in a named set
   that changes without replacing the table.
3. **Forward accepts where a host's drop lives.** An accept in weavepy's table cannot override a
   drop in another base chain, so on hosts that filter forwarded traffic, two rules tagged with
   the comment `weavepy` (source in the cluster range: accept; destination in the cluster range:
   accept; flannel's `--iptables-forward-rules`) go at the top of each such chain: the filter
   FORWARD chain of each iptables backend (legacy, nft) whose policy is DROP or that holds rules,
   and every other nftables base chain on the forward hook with policy drop. The iptables-nft
   chain (`ip filter FORWARD`) is left to `iptables-nft`, which owns it.

An optional guard (`api_guard_port`) drops packets to 127.0.0.0/8 on the API port whose source
is not a local address (a loopback-only API stays loopback-only when `route_localnet=1`).

Counting: masquerade rules only see the first packet of a connection, so a filter chain right
after source NAT counts every original-direction packet of the connections masqueraded from the
cluster range, in the named counter `masqueraded` (packets and bytes).

How the plan compares: `read_ruleset` and `read_iptables_save` turn what the shell read into a
`HostView`; `plan(spec, host)` returns one nftables transaction (replace weavepy's table when
anything in it differs from the desired content, refresh the peer set alone when only it differs,
and add or drop the tagged accepts in foreign chains) and one `iptables-restore --noflush` input
per backend, each with the `Change`s that explain it. `plan_removal(host)` removes the table and
every tagged accept. Rules are compared as nftables lists them, so an unchanged host gives an
empty plan, and each tagged rule is removed by the handle or the exact text it was found with.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, collapse_addresses
from typing import Any

Command = dict[str, Any]  # one nftables JSON command; weavepy.nft runs lists of them

__all__ = [
    "BACKENDS",
    "FAMILY",
    "MASQ_COUNTER",
    "PEER_SET",
    "TABLE",
    "TAG",
    "Chain",
    "Change",
    "ForeignChain",
    "HostRulesSpec",
    "HostView",
    "IptablesForward",
    "NftView",
    "Plan",
    "Restore",
    "Rule",
    "TableContent",
    "desired_table",
    "plan",
    "plan_removal",
    "read_iptables_save",
    "read_ruleset",
]

FAMILY = "ip"
TABLE = "weavepy"
TAG = "weavepy"  # the comment on every rule weavepy places outside its own table
MASQ_COUNTER = "masqueraded"
GUARD_COUNTER = "api_guard_drops"
PEER_SET = "peer_nodes"
BACKENDS = ("iptables-legacy", "iptables-nft")
IPTABLES_NFT_CHAIN = ("ip", "filter", "FORWARD")  # iptables-nft's own chain, not a native one
MULTICAST = IPv4Network("224.0.0.0/4")
LIMITED_BROADCAST = IPv4Network("255.255.255.255/32")
LOOPBACK = IPv4Network("127.0.0.0/8")
SRCNAT = 100  # nftables' srcnat priority


@dataclass(frozen=True)
class HostRulesSpec:
    """What the agent wants of the host. Invalid values raise ValueError at construction.

    cluster_range: the pod range (`--ipalloc-range`); overlay_devices: weavepy's bridge, VXLAN
    device and WireGuard TUN; no_masq_cidrs: destinations never masqueraded (collapsed here);
    peer_node_addresses: the other live nodes' underlay addresses; api_guard_port: the local API
    port to guard, or None.
    """

    cluster_range: IPv4Network
    overlay_devices: tuple[str, ...]
    masquerade: bool = True
    no_masq_cidrs: tuple[IPv4Network, ...] = ()
    peer_node_addresses: frozenset[IPv4Address] = frozenset()
    api_guard_port: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.cluster_range, IPv4Network):
            raise ValueError(f"cluster range must be an IPv4 network, got {self.cluster_range!r}")
        if not self.overlay_devices:
            raise ValueError("name weavepy's devices (bridge, VXLAN, TUN): none given")
        for cidr in self.no_masq_cidrs:
            if cidr.prefixlen == 0:
                raise ValueError("a no-masquerade range of 0.0.0.0/0 excludes everything: "
                                 "switch masquerading off instead")
        object.__setattr__(self, "no_masq_cidrs", tuple(collapse_addresses(self.no_masq_cidrs)))
        object.__setattr__(self, "peer_node_addresses", frozenset(self.peer_node_addresses))
        if self.api_guard_port is not None and not 1 <= self.api_guard_port <= 65535:
            raise ValueError(f"API port must be in 1..65535, got {self.api_guard_port}")


# ---------------------------------------------------------------------------------------------
# nftables JSON, written the way nftables lists it (so what we wrote compares equal to what we
# read back)


def _address(net: IPv4Network) -> Any:
    if net.prefixlen == 32:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _match(left: Any, right: Any, op: str = "==") -> Command:
    return {"match": {"op": op, "left": left, "right": right}}


def _ip(field_name: str) -> Command:
    return {"payload": {"protocol": "ip", "field": field_name}}


def _canonical(expr: Sequence[Any]) -> str:
    return json.dumps(list(expr), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Rule:
    """One rule: its comment and its expression (canonical JSON, as nftables lists it)."""

    comment: str | None
    expr_json: str

    @classmethod
    def of(cls, comment: str | None, *expr: Any) -> Rule:
        return cls(comment, _canonical(expr))

    @property
    def expr(self) -> list[Any]:
        loaded: list[Any] = json.loads(self.expr_json)
        return loaded


@dataclass(frozen=True)
class Chain:
    """A base chain of weavepy's table."""

    type: str
    hook: str
    prio: int
    rules: tuple[Rule, ...]
    policy: str = "accept"


@dataclass(frozen=True)
class TableContent:
    """weavepy's table: chains by name, named counters, and the peer set's elements.

    `shape()` is everything but the set's elements: when only those differ, the set is
    refreshed in place and the counters keep counting."""

    chains: Mapping[str, Chain]
    counters: frozenset[str]
    peer_nodes: frozenset[str] | None  # None: the set is not there

    def shape(self) -> tuple[Any, ...]:
        return (sorted(self.chains.items()), sorted(self.counters), self.peer_nodes is not None)


def desired_table(spec: HostRulesSpec) -> TableContent:
    """The content of table `ip weavepy` for `spec`."""
    cluster = _address(spec.cluster_range)
    nat: list[Rule] = [
        Rule.of("only traffic from pods", _match(_ip("saddr"), cluster, "!="), {"return": None}),
        Rule.of("pod to pod keeps its source", _match(_ip("daddr"), cluster), {"return": None}),
    ]
    nat += [Rule.of(f"stays on weavepy's device {dev}",
                    _match({"meta": {"key": "oifname"}}, dev), {"return": None})
            for dev in spec.overlay_devices]
    nat += [
        Rule.of("multicast", _match(_ip("daddr"), _address(MULTICAST)), {"return": None}),
        Rule.of("limited broadcast", _match(_ip("daddr"), _address(LIMITED_BROADCAST)),
                {"return": None}),
        Rule.of("to a peer node: its answer must come back over the underlay (rp_filter)",
                _match(_ip("daddr"), f"@{PEER_SET}"), {"masquerade": {"flags": "fully-random"}}),
    ]
    if spec.masquerade:
        nat += [Rule.of(f"operator exclusion {net}", _match(_ip("daddr"), _address(net)),
                        {"return": None}) for net in spec.no_masq_cidrs]
        nat.append(Rule.of("egress: leaves with the node's address",
                           {"masquerade": {"flags": "fully-random"}}))
    chains = {
        "egress": Chain("nat", "postrouting", SRCNAT, tuple(nat)),
        "count": Chain("filter", "postrouting", SRCNAT + 1, (Rule.of(
            "count what was masqueraded from pods",
            _match({"ct": {"key": "direction"}}, "original"),
            _match({"ct": {"key": "status"}}, "snat", "in"),
            _match({"ct": {"key": "ip saddr", "dir": "original"}}, cluster),
            {"counter": MASQ_COUNTER}),)),
    }
    counters = {MASQ_COUNTER}
    if spec.api_guard_port is not None:
        chains["api_guard"] = Chain("filter", "input", 0, (Rule.of(
            f"API port {spec.api_guard_port} answers only local sources",
            _match(_ip("daddr"), _address(LOOPBACK)),
            _match({"payload": {"protocol": "tcp", "field": "dport"}}, spec.api_guard_port),
            _match({"fib": {"result": "type", "flags": ["saddr"]}}, "local", "!="),
            {"counter": GUARD_COUNTER}, {"drop": None}),))
        counters.add(GUARD_COUNTER)
    return TableContent(chains, frozenset(counters),
                        frozenset(str(a) for a in spec.peer_node_addresses))


def _forward_accepts(cluster_range: IPv4Network) -> tuple[Rule, ...]:
    cluster = _address(cluster_range)
    return (Rule.of(TAG, _match(_ip("saddr"), cluster), {"accept": None}),
            Rule.of(TAG, _match(_ip("daddr"), cluster), {"accept": None}))


def _iptables_accepts(cluster_range: IPv4Network) -> tuple[str, ...]:
    """The accepts as `iptables-save` prints them."""
    return tuple(f"-A FORWARD -{flag} {cluster_range} -m comment --comment {TAG} -j ACCEPT"
                 for flag in ("s", "d"))


# ---------------------------------------------------------------------------------------------
# What the host has


@dataclass(frozen=True)
class ForeignChain:
    """A base chain on the forward hook that is not weavepy's, with weavepy's rules in it."""

    family: str
    table: str
    name: str
    policy: str
    tagged: tuple[tuple[int, Rule], ...]  # (handle, rule) of each rule commented `weavepy`

    @property
    def where(self) -> str:
        return f"nft {self.family} {self.table} {self.name}"


@dataclass(frozen=True)
class NftView:
    """What `list ruleset` showed: weavepy's table (None if absent), its counters' values, and
    the foreign forward chains."""

    table: TableContent | None = None
    counter_values: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    forward_chains: tuple[ForeignChain, ...] = ()


@dataclass(frozen=True)
class IptablesForward:
    """One iptables backend's filter FORWARD chain, from `iptables-save`."""

    backend: str
    policy: str | None  # None: the backend has no filter table
    foreign_rules: int = 0
    ours: tuple[str, ...] = ()  # weavepy's rules, exactly as printed

    @property
    def where(self) -> str:
        return f"{self.backend} filter FORWARD"

    @property
    def filters(self) -> bool:
        """Does this backend filter forwarded traffic (so that pods need accepts there)?"""
        return self.policy is not None and (self.policy != "ACCEPT" or self.foreign_rules > 0)


@dataclass(frozen=True)
class HostView:
    nft: NftView
    iptables: tuple[IptablesForward, ...] = ()


def read_ruleset(objects: Iterable[Command]) -> NftView:
    """Parse the JSON objects of `list ruleset` (metainfo already dropped)."""
    ours_seen = False
    chains: dict[str, dict[str, Any]] = {}
    rules: dict[str, list[Rule]] = {}
    counters: dict[str, tuple[int, int]] = {}
    peer_nodes: frozenset[str] | None = None
    foreign: dict[tuple[str, str, str], dict[str, Any]] = {}
    tagged: dict[tuple[str, str, str], list[tuple[int, Rule]]] = {}
    for obj in objects:
        kind, body = next(iter(obj.items()))
        if not isinstance(body, dict):
            continue
        ours = body.get("family") == FAMILY and body.get("table", body.get("name")) == TABLE
        if kind == "table" and ours:
            ours_seen = True
        elif kind == "chain" and ours:
            chains[body["name"]] = body
        elif kind == "chain" and body.get("hook") == "forward" and body.get("family") in (
                "ip", "inet"):
            key = (body["family"], body["table"], body["name"])
            if key != IPTABLES_NFT_CHAIN:
                foreign[key] = body
        elif kind == "rule" and ours:
            rules.setdefault(body["chain"], []).append(
                Rule(body.get("comment"), _canonical(body.get("expr", []))))
        elif kind == "rule" and body.get("comment") == TAG:
            key = (body["family"], body["table"], body["chain"])
            tagged.setdefault(key, []).append(
                (int(body["handle"]), Rule(TAG, _canonical(body.get("expr", [])))))
        elif kind == "counter" and ours:
            counters[body["name"]] = (int(body.get("packets", 0)), int(body.get("bytes", 0)))
        elif kind == "set" and ours and body.get("name") == PEER_SET:
            peer_nodes = frozenset(str(e) for e in body.get("elem", []))
    table = None
    if ours_seen:
        table = TableContent(
            {name: Chain(str(c.get("type")), str(c.get("hook")), int(c.get("prio", 0)),
                         tuple(rules.get(name, [])), str(c.get("policy", "accept")))
             for name, c in chains.items()},
            frozenset(counters), peer_nodes)
    forward = tuple(ForeignChain(f, t, n, str(body.get("policy", "accept")),
                                 tuple(tagged.get((f, t, n), [])))
                    for (f, t, n), body in sorted(foreign.items()))
    return NftView(table, counters, forward)


def read_iptables_save(backend: str, text: str) -> IptablesForward:
    """The filter FORWARD chain in `iptables-save` output of `backend`."""
    in_filter = False
    policy: str | None = None
    foreign = 0
    ours: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("*"):
            in_filter = line == "*filter"
        elif not in_filter:
            continue
        elif line.startswith(":FORWARD "):
            policy = line.split()[1]
        elif line.startswith("-A FORWARD "):
            if f" --comment {TAG} " in f"{line} ":
                ours.append(line)
            else:
                foreign += 1
    return IptablesForward(backend, policy, foreign, tuple(ours))


# ---------------------------------------------------------------------------------------------
# Plans


@dataclass(frozen=True)
class Change:
    """One thing a plan changes: where, and why. `routine` changes (the peer set following the
    membership) are not repairs."""

    where: str
    why: str
    routine: bool = False

    def __str__(self) -> str:
        return f"{self.where}: {self.why}"


@dataclass(frozen=True)
class Restore:
    """One `iptables-restore --noflush` input for one backend, and the change it makes."""

    backend: str
    script: str
    change: Change


@dataclass(frozen=True)
class Plan:
    """One nftables transaction (with the changes it makes) and one restore per backend."""

    nft: tuple[Command, ...] = ()
    nft_changes: tuple[Change, ...] = ()
    restores: tuple[Restore, ...] = ()
    accepts_in: tuple[str, ...] = ()  # where weavepy's accepts are once the plan is applied

    @property
    def changes(self) -> tuple[Change, ...]:
        return self.nft_changes + tuple(r.change for r in self.restores)

    @property
    def empty(self) -> bool:
        return not self.nft and not self.restores


def _ref(kind: str, **body: Any) -> Command:
    return {kind: {"family": FAMILY, "table": TABLE, **body}}


def _table_commands(content: TableContent) -> list[Command]:
    """Replace weavepy's table with `content`, whether or not it exists (one transaction)."""
    table = {"table": {"family": FAMILY, "name": TABLE}}
    commands: list[Command] = [{"add": table}, {"delete": table}, {"add": table}]
    commands += [{"add": _ref("counter", name=name)} for name in sorted(content.counters)]
    peer_set: dict[str, Any] = {"name": PEER_SET, "type": "ipv4_addr"}
    if content.peer_nodes:
        peer_set["elem"] = sorted(content.peer_nodes)
    commands.append({"add": _ref("set", **peer_set)})
    for name, chain in content.chains.items():
        commands.append({"add": _ref("chain", name=name, type=chain.type, hook=chain.hook,
                                     prio=chain.prio, policy=chain.policy)})
        for rule in chain.rules:
            commands.append({"add": _ref("rule", chain=name, expr=rule.expr,
                                         **({"comment": rule.comment} if rule.comment else {}))})
    return commands


def _table_difference(have: TableContent, want: TableContent) -> str:
    """Why `have` is not `want`, in a few words (their shapes differ)."""
    for name in want.chains:
        if name not in have.chains:
            return f"chain {name} is missing"
        if not have.chains[name].rules and want.chains[name].rules:
            return f"chain {name} was flushed"
        if have.chains[name] != want.chains[name]:
            return f"chain {name} differs"
    if set(have.chains) - set(want.chains):
        return f"chains {sorted(set(have.chains) - set(want.chains))} are no longer wanted"
    if have.counters != want.counters:
        return "counters differ"
    return f"set {PEER_SET} is missing"


def _plan_table(spec: HostRulesSpec, view: NftView) -> tuple[list[Command], list[Change]]:
    want = desired_table(spec)
    have = view.table
    where = f"table {FAMILY} {TABLE}"
    if have is None:
        return _table_commands(want), [Change(where, "missing")]
    if have.shape() != want.shape():
        return _table_commands(want), [Change(where, _table_difference(have, want))]
    if have.peer_nodes != want.peer_nodes:
        commands: list[Command] = [{"flush": _ref("set", name=PEER_SET)}]
        if want.peer_nodes:
            commands.append({"add": _ref("element", name=PEER_SET,
                                         elem=sorted(want.peer_nodes))})
        return commands, [Change(f"set {PEER_SET}", "peer nodes changed", routine=True)]
    return [], []


def _plan_foreign_chain(chain: ForeignChain, wanted: Sequence[Rule]
                        ) -> tuple[list[Command], list[Change]]:
    ref = {"family": chain.family, "table": chain.table, "chain": chain.name}
    commands: list[Command] = []
    kept: set[Rule] = set()
    for handle, rule in chain.tagged:
        if rule in wanted and rule not in kept:
            kept.add(rule)
        else:
            commands.append({"delete": {"rule": {**ref, "handle": handle}}})
    missing = [rule for rule in wanted if rule not in kept]
    for rule in reversed(missing):  # inserted at the top, in the wanted order
        commands.append({"insert": {"rule": {**ref, "expr": rule.expr, "comment": TAG}}})
    if not commands:
        return [], []
    why = "accepts missing" if missing else "stale accepts removed"
    return commands, [Change(chain.where, why)]


def _restore_input(deletes: Iterable[str], inserts: Iterable[str]) -> str:
    lines = ["*filter"]
    lines += ["-D" + line[2:] for line in deletes]
    lines += [line.replace("-A FORWARD ", "-I FORWARD 1 ", 1) for line in inserts]
    return "\n".join([*lines, "COMMIT", ""])


def plan(spec: HostRulesSpec, host: HostView) -> Plan:
    """The changes that make `host` carry the rules `spec` wants (an empty plan if it does)."""
    commands, changes = _plan_table(spec, host.nft)
    accepts_in: list[str] = []
    wanted = _forward_accepts(spec.cluster_range)
    for chain in host.nft.forward_chains:
        chain_commands, chain_changes = _plan_foreign_chain(
            chain, wanted if chain.policy == "drop" else ())
        commands += chain_commands
        changes += chain_changes
        if chain.policy == "drop":
            accepts_in.append(chain.where)
    restores: list[Restore] = []
    lines = _iptables_accepts(spec.cluster_range)
    for backend in host.iptables:
        want = lines if backend.filters else ()
        stale = [line for line in backend.ours if line not in want]
        stale += [line for i, line in enumerate(backend.ours)
                  if line in want and line in backend.ours[:i]]  # duplicates
        missing = [line for line in want if line not in backend.ours]
        if stale or missing:
            restores.append(Restore(backend.backend, _restore_input(stale, reversed(missing)),
                                    Change(backend.where, "accepts missing" if missing
                                           else "stale accepts removed")))
        if want:
            accepts_in.append(backend.where)
    return Plan(tuple(commands), tuple(changes), tuple(restores), tuple(accepts_in))


def plan_removal(host: HostView) -> Plan:
    """Remove weavepy's table and every accept it placed, leaving the rest as it is."""
    commands: list[Command] = []
    changes: list[Change] = []
    if host.nft.table is not None:
        commands.append({"delete": {"table": {"family": FAMILY, "name": TABLE}}})
        changes.append(Change(f"table {FAMILY} {TABLE}", "removed"))
    for chain in host.nft.forward_chains:
        chain_commands, _ = _plan_foreign_chain(chain, ())
        commands += chain_commands
        if chain_commands:
            changes.append(Change(chain.where, "accepts removed"))
    restores = tuple(Restore(b.backend, _restore_input(b.ours, ()),
                             Change(b.where, "accepts removed")) for b in host.iptables if b.ours)
    return Plan(tuple(commands), tuple(changes), restores)
