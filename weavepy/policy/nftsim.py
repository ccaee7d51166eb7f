"""A pure interpreter of the nftables JSON that the policy compiler emits, and of the kernel's
listing of it: which verdict would this packet get at the forward hook?

This module owns nothing the kernel needs; it answers questions about a table without a
kernel. The property tests run the compiler's output through it to compare with the reference
evaluator, and `weavepy policy explain` can run it over the live table (`Nft.list_table`) to
say what the loaded rules do, rule by rule.

The rule it keeps: **anything outside the subset it knows is an error, never a guess.** The
subset: tables, sets and maps (plain, concatenated, verdict and counter maps), chains (base
and regular), named counters and limits; rules of `match` (==, !=, in) over `ip saddr/daddr`,
`meta l4proto`, `th|tcp|udp|sctp dport`, `ct state` and their concatenations, against values,
prefixes, ranges, anonymous sets and named sets; `vmap`; statements `counter`, `limit`, `log`;
verdicts `accept`, `drop`, `return`, `jump`, `goto`. Commands: add, `flush chain`, and delete
(of a table, element, chain, set, map or counter), refused as the kernel refuses them: a chain
that still holds rules, or anything a rule or a map element still names. A `tcp dport` match
implies `meta l4proto tcp` (the dependency nft folds when it lists a rule). Limits always
pass.

Semantics, as netfilter has them: base chains at a hook run in priority order; `accept` ends
the current base chain and the packet goes on to the next; `drop` ends everything; falling off
a base chain applies its policy; a failed map lookup ends the rule (a verdict map's miss
continues with the next rule).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_address
from typing import Any

__all__ = ["Packet", "SimError", "SimResult", "SimTable", "Step"]

PROTOCOL_NUMBERS = {"icmp": 1, "tcp": 6, "udp": 17, "sctp": 132}
PORT_PROTOCOLS = ("tcp", "udp", "sctp")
CT_STATES = ("new", "established", "related", "invalid", "untracked")
MAX_DEPTH = 16  # netfilter's jump stack


class SimError(ValueError):
    """The table uses something outside the subset this interpreter knows."""


@dataclass(frozen=True)
class Packet:
    """A forwarded IPv4 packet: its addresses, protocol (tcp, udp, sctp, icmp, ...), its
    destination port (None without one) and its conntrack state."""

    saddr: IPv4Address
    daddr: IPv4Address
    protocol: str
    dport: int | None = None
    ct_state: str = "new"


@dataclass(frozen=True)
class Step:
    """A rule the packet reached the end of, or whose verdict it took."""

    chain: str
    comment: str
    verdict: str | None


@dataclass
class SimResult:
    verdict: str  # accept or drop
    steps: list[Step] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    counters: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"{self.verdict}"]
        lines += [f"  {s.chain}: {s.comment or '(no comment)'} -> {s.verdict or 'continue'}"
                  for s in self.steps]
        return "\n".join(lines)


@dataclass
class _Chain:
    name: str
    hook: str | None = None
    priority: int = 0
    policy: str = "accept"
    rules: list[tuple[list[Mapping[str, Any]], str]] = field(default_factory=list)


@dataclass
class _Set:
    name: str
    map_type: str | None
    elements: dict[Any, Any] = field(default_factory=dict)  # key -> value (None for sets)


@dataclass(frozen=True)
class _Verdict:
    kind: str
    target: str | None = None

    def text(self) -> str:
        return self.kind if self.target is None else f"{self.kind} {self.target}"


def _number(value: Any) -> Any:
    """A comparable form of a value: addresses, protocol numbers, ports."""
    if isinstance(value, bool):
        raise SimError(f"unexpected value {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        if value in PROTOCOL_NUMBERS:
            return PROTOCOL_NUMBERS[value]
        try:
            return ip_address(value)
        except ValueError:
            return value
    if isinstance(value, Mapping) and "concat" in value:
        return tuple(_number(v) for v in value["concat"])
    raise SimError(f"unexpected value {value!r}")


class SimTable:
    """One table, built from commands (`from_commands`) or a listing (`from_listing`)."""

    def __init__(self) -> None:
        self.chains: dict[str, _Chain] = {}
        self.sets: dict[str, _Set] = {}
        self.counters: dict[str, int] = {}
        self.limits: set[str] = set()
        self.exists = False

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def from_commands(cls, commands: Iterable[Mapping[str, Any]]) -> SimTable:
        table = cls()
        for command in commands:
            verb, body = next(iter(command.items()))
            kind, obj = next(iter(body.items()))
            if verb == "add":
                table._add(kind, obj)
            elif verb == "delete":
                table._delete(kind, obj)
            elif verb == "flush" and kind == "chain":
                table.chains[obj["name"]].rules.clear()
            else:
                raise SimError(f"unknown command {verb!r}")
        return table

    @classmethod
    def from_listing(cls, objects: Iterable[Mapping[str, Any]]) -> SimTable:
        table = cls()
        table.exists = True
        for obj in objects:
            kind, body = next(iter(obj.items()))
            table._add(kind, body)
        return table

    def _add(self, kind: str, obj: Mapping[str, Any]) -> None:
        if kind == "table":
            self.exists = True
        elif kind == "chain":
            chain = self.chains.setdefault(obj["name"], _Chain(obj["name"]))
            if "hook" in obj:
                chain.hook, chain.priority = obj["hook"], int(obj.get("prio", 0))
                chain.policy = obj.get("policy", "accept")
        elif kind in ("set", "map"):
            found = self.sets.setdefault(obj["name"], _Set(obj["name"], obj.get("map")))
            self._add_elements(found, obj.get("elem", ()))
        elif kind == "element":
            self._add_elements(self.sets[obj["name"]], obj["elem"])
        elif kind == "rule":
            comment = str(obj.get("comment", ""))
            self.chains[obj["chain"]].rules.append((list(obj["expr"]), comment))
        elif kind == "counter":
            self.counters[obj["name"]] = int(obj.get("packets", 0))
        elif kind == "limit":
            self.limits.add(obj["name"])
        else:
            raise SimError(f"unknown object {kind!r}")

    def _add_elements(self, target: _Set, elements: Iterable[Any]) -> None:
        for element in elements:
            if target.map_type is None:
                target.elements[self._key(element)] = None
            else:
                key, value = element
                target.elements[self._key(key)] = value

    @staticmethod
    def _key(value: Any) -> Any:
        if isinstance(value, Mapping) and "elem" in value:
            return SimTable._key(value["elem"]["val"])
        return _number(value)

    def _delete(self, kind: str, obj: Mapping[str, Any]) -> None:
        if kind == "table":
            self.chains, self.sets, self.counters, self.limits = {}, {}, {}, set()
            self.exists = False
        elif kind == "element":
            for element in obj["elem"]:
                del self.sets[obj["name"]].elements[self._key(element)]
        elif kind in ("chain", "set", "map", "counter"):
            holders: dict[str, dict[str, Any]] = {
                "chain": self.chains, "set": self.sets, "map": self.sets,
                "counter": self.counters}
            holder = holders[kind]
            name = obj["name"]
            if name not in holder:
                raise SimError(f"no {kind} {name!r} to delete")
            if kind == "chain" and self.chains[name].rules:
                raise SimError(f"chain {name!r} still holds rules")
            if self._referenced(name):
                raise SimError(f"{kind} {name!r} is still referenced")
            del holder[name]
        else:
            raise SimError(f"cannot delete a {kind!r}")

    def _referenced(self, name: str) -> bool:
        """Does a rule or a verdict map name `name` (as the kernel refuses to delete it)?"""
        def names(value: Any) -> bool:
            if isinstance(value, str):
                return value == "@" + name
            if isinstance(value, Mapping):
                for key, inner in value.items():
                    if key in ("jump", "goto") and inner.get("target") == name:
                        return True
                    if key == "counter" and inner == name:
                        return True
                    if names(inner):
                        return True
                return False
            if isinstance(value, list | tuple):
                return any(names(inner) for inner in value)
            return False
        return (any(names(expr) for chain in self.chains.values() for expr, _ in chain.rules)
                or any(value == name if found.map_type == "counter" else names(value)
                       for found in self.sets.values() for value in found.elements.values()))

    # -- running -----------------------------------------------------------------------------

    def run(self, packet: Packet, hook: str = "forward") -> SimResult:
        """The packet's verdict after every base chain of `hook`, in priority order."""
        result = SimResult("accept")
        bases = sorted((c for c in self.chains.values() if c.hook == hook),
                       key=lambda c: c.priority)
        for base in bases:
            verdict = self._run_base(base, packet, result)
            if verdict == "drop":
                result.verdict = "drop"
                return result
        return result

    def _run_base(self, base: _Chain, packet: Packet, result: SimResult) -> str:
        stack: list[tuple[_Chain, int]] = []
        chain, index = base, 0
        while True:
            if index >= len(chain.rules):
                if not stack:
                    return base.policy
                chain, index = stack.pop()
                continue
            expr, comment = chain.rules[index]
            index += 1
            outcome = self._rule(expr, packet, result)
            if outcome is False:
                continue
            if outcome is True:
                result.steps.append(Step(chain.name, comment, None))
                continue
            verdict = outcome
            result.steps.append(Step(chain.name, comment, verdict.text()))
            if verdict.kind in ("accept", "drop"):
                return verdict.kind
            if verdict.kind == "return":
                if not stack:
                    return base.policy
                chain, index = stack.pop()
                continue
            target = self.chains.get(verdict.target or "")
            if target is None:
                raise SimError(f"{verdict.kind} to a missing chain {verdict.target!r}")
            if verdict.kind == "jump":
                if len(stack) >= MAX_DEPTH:
                    raise SimError("jump stack overflow")
                stack.append((chain, index))
            chain, index = target, 0

    def _rule(self, expr: Sequence[Mapping[str, Any]], packet: Packet,
              result: SimResult) -> bool | _Verdict:
        """Run a rule's expressions: True when it reached its end without a verdict, False
        when a match failed, else its verdict."""
        for item in expr:
            kind, body = next(iter(item.items()))
            if kind == "match":
                if not self._match(body, packet):
                    return False
            elif kind == "vmap":
                key = self._value(body["key"], packet)
                verdict = self._lookup(body["data"], key)
                if verdict is _MISS:
                    return False
                name, arg = next(iter(verdict.items()))
                return _Verdict(name, arg.get("target") if isinstance(arg, Mapping) else None)
            elif kind == "counter":
                if isinstance(body, Mapping) and "map" in body:
                    key = self._value(body["map"]["key"], packet)
                    counter = self._lookup(body["map"]["data"], key)
                    if counter is _MISS:
                        return False
                    result.counters.append(str(counter))
                elif isinstance(body, str):
                    result.counters.append(body)
            elif kind == "limit":
                if isinstance(body, str) and body not in self.limits:
                    raise SimError(f"limit {body!r} does not exist")
            elif kind == "log":
                result.logs.append(str(body.get("prefix", "")) if body else "")
            elif kind in ("accept", "drop", "return"):
                return _Verdict(kind)
            elif kind in ("jump", "goto"):
                return _Verdict(kind, body["target"])
            else:
                raise SimError(f"unknown statement {kind!r}")
        return True

    def _lookup(self, reference: Any, key: Any) -> Any:
        if not isinstance(reference, str) or not reference.startswith("@"):
            raise SimError(f"only named maps are known, not {reference!r}")
        found = self.sets.get(reference[1:])
        if found is None:
            raise SimError(f"map {reference} does not exist")
        return found.elements.get(key, _MISS)

    def _value(self, left: Mapping[str, Any], packet: Packet) -> Any:
        """The packet's value for an expression; `_MISS` when the packet has none (a port of
        a packet without ports, or of another protocol than the expression's)."""
        kind, body = next(iter(left.items()))
        if kind == "payload":
            protocol, name = body["protocol"], body["field"]
            if protocol == "ip" and name in ("saddr", "daddr"):
                return packet.saddr if name == "saddr" else packet.daddr
            if name == "dport" and protocol in ("th", *PORT_PROTOCOLS):
                if protocol != "th" and packet.protocol != protocol:
                    return _MISS
                return packet.dport if packet.dport is not None else _MISS
            raise SimError(f"unknown payload {protocol} {name}")
        if kind == "meta" and body.get("key") == "l4proto":
            return PROTOCOL_NUMBERS.get(packet.protocol, packet.protocol)
        if kind == "ct" and body.get("key") == "state":
            return packet.ct_state
        if kind == "concat":
            parts = tuple(self._value(part, packet) for part in body)
            return _MISS if _MISS in parts else parts
        raise SimError(f"unknown expression {kind!r}")

    def _match(self, body: Mapping[str, Any], packet: Packet) -> bool:
        op, left, right = body["op"], body["left"], body["right"]
        value = self._value(left, packet)
        if value is _MISS:
            return False
        if next(iter(left)) == "ct":
            states = right if isinstance(right, list) else [right]
            unknown = [s for s in states if s not in CT_STATES]
            if unknown:
                raise SimError(f"unknown ct state {unknown[0]!r}")
            found = value in states
        else:
            found = self._contains(right, value)
        if op in ("==", "in"):
            return found
        if op == "!=":
            return not found
        raise SimError(f"unknown operator {op!r}")

    def _contains(self, right: Any, value: Any) -> bool:
        if isinstance(right, str) and right.startswith("@"):
            named = self.sets.get(right[1:])
            if named is None:
                raise SimError(f"set {right} does not exist")
            return value in named.elements
        if isinstance(right, Mapping) and "set" in right:
            return any(self._contains(member, value) for member in right["set"])
        if isinstance(right, Mapping) and "prefix" in right:
            prefix = right["prefix"]
            network = IPv4Network(f"{prefix['addr']}/{prefix['len']}")
            return isinstance(value, IPv4Address) and value in network
        if isinstance(right, Mapping) and "range" in right:
            low, high = (_number(v) for v in right["range"])
            return type(value) is type(low) and low <= value <= high
        return bool(value == _number(right))


class _Missing:
    def __repr__(self) -> str:
        return "<miss>"


_MISS: Any = _Missing()
