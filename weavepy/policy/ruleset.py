"""A desired nftables table as a value, and the transactions that make the kernel hold it.

This module owns the shape between the compiler and the kernel: `Ruleset` (declarations,
rules and set elements of one table), and the pure functions that turn it into libnftables
JSON commands (`weavepy/nft.py` runs them):

* `full_replace(ruleset, marker)`: add, delete and re-create the table, in ONE transaction,
  so there is never a moment without the table (nftables commits a batch atomically);
* `incremental(old, new)`: the diff from one table to the next (elements, counters, sets,
  chains and their rules added, deleted or rewritten), in ONE transaction, with every
  reference valid at every step; None when only a replace will do (a base chain, a limit, the
  table's name or a declaration's type changed);
* `parse_listing(objects)`: what `nft -j list table` printed, in the same terms, so that the
  applier can compare the kernel with what it wrote.

The rule it keeps: rendering is deterministic (sorted elements, declaration order kept) and a
table is always declared before what refers to it: limits, counters and chains, then sets and
maps (a verdict map's elements name chains, a counter map's elements name counters), then
rules.

Elements are plain values: an address `"198.19.0.2"`, a port `80`, a concatenation as a tuple
(`("198.19.0.2", 80)`), and a map element as `(key, value)` where the value is a chain name
(verdict maps: `jump`) or a counter name (counter maps).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ChainDecl",
    "Element",
    "Expr",
    "LimitDecl",
    "RuleDecl",
    "Ruleset",
    "RulesetSize",
    "SetDecl",
    "full_replace",
    "incremental",
    "parse_listing",
    "render_element",
]

Expr = dict[str, Any]
Scalar = str | int
Key = Scalar | tuple[Scalar, ...]
Element = Key | tuple[Key, str]
MapType = Literal["verdict", "counter"]


@dataclass(frozen=True)
class SetDecl:
    """A named set (map_type None) or map, keyed by `key_type` (several types: concatenated).
    Elements live in `Ruleset.elements`."""

    name: str
    key_type: tuple[str, ...]
    map_type: MapType | None = None

    def object_kind(self) -> str:
        return "set" if self.map_type is None else "map"


@dataclass(frozen=True)
class RuleDecl:
    """A rule: its expressions and statements, and a comment that names it (unique within
    its chain: the applier compares rules by comment)."""

    expr: tuple[Expr, ...]
    comment: str


@dataclass(frozen=True)
class ChainDecl:
    """A chain; a base chain when `hook` is set (type filter, policy accept)."""

    name: str
    rules: tuple[RuleDecl, ...] = ()
    hook: str | None = None
    priority: int = 0


@dataclass(frozen=True)
class LimitDecl:
    name: str
    rate: int
    burst: int
    per: str = "second"


@dataclass(frozen=True)
class RulesetSize:
    chains: int
    rules: int
    sets: int
    elements: int
    counters: int


@dataclass(frozen=True)
class Ruleset:
    """One whole nftables table."""

    table: str
    family: str = "inet"
    limits: tuple[LimitDecl, ...] = ()
    counters: frozenset[str] = frozenset()
    sets: tuple[SetDecl, ...] = ()
    chains: tuple[ChainDecl, ...] = ()
    elements: Mapping[str, frozenset[Element]] = field(default_factory=dict)

    def size(self) -> RulesetSize:
        return RulesetSize(chains=len(self.chains),
                           rules=sum(len(c.rules) for c in self.chains),
                           sets=len(self.sets),
                           elements=sum(len(v) for v in self.elements.values()),
                           counters=len(self.counters))

    def base_chains(self) -> list[ChainDecl]:
        return [c for c in self.chains if c.hook is not None]

    def _ref(self) -> dict[str, str]:
        return {"family": self.family, "table": self.table}

    def _set_ref(self, decl: SetDecl) -> dict[str, Any]:
        return {**self._ref(), "name": decl.name}

    def render_elements(self, decl: SetDecl, elements: Iterable[Element]) -> list[Any]:
        return [render_element(decl, e) for e in sorted(elements, key=_sort_key)]


def _sort_key(element: Element) -> tuple[str, ...]:
    return tuple(_scalar_key(part) for part in _flatten(element))


def _flatten(element: Element) -> list[Scalar]:
    if isinstance(element, tuple):
        found: list[Scalar] = []
        for part in element:
            found += _flatten(part)
        return found
    return [element]


def _scalar_key(value: Scalar) -> str:
    if isinstance(value, int):
        return f"{value:08d}"
    parts = value.split(".")
    if len(parts) == 4 and all(p.isdigit() for p in parts):
        return ".".join(f"{int(p):03d}" for p in parts)
    return value


def _render_key(key: Key) -> Any:
    return {"concat": list(key)} if isinstance(key, tuple) else key


def render_element(decl: SetDecl, element: Element) -> Any:
    """An element as libnftables JSON takes it."""
    if decl.map_type is None:
        return _render_key(element)  # type: ignore[arg-type]
    assert isinstance(element, tuple) and len(element) == 2
    key, value = element
    data: Any = {"jump": {"target": value}} if decl.map_type == "verdict" else value
    return [_render_key(key), data]


def _element_key(decl: SetDecl, element: Element) -> Any:
    """What `delete element` takes: the key alone for a map."""
    if decl.map_type is None:
        return _render_key(element)  # type: ignore[arg-type]
    assert isinstance(element, tuple)
    return _render_key(element[0])


def _rule_command(ruleset: Ruleset, chain: ChainDecl, rule: RuleDecl,
                  comment: str) -> dict[str, Any]:
    return {"add": {"rule": {**ruleset._ref(), "chain": chain.name, "expr": list(rule.expr),
                             "comment": comment}}}


def _counter_command(ruleset: Ruleset, name: str, value: tuple[int, int]) -> dict[str, Any]:
    packets, octets = value
    return {"add": {"counter": {**ruleset._ref(), "name": name, "packets": packets,
                                "bytes": octets}}}


def _chain_command(ruleset: Ruleset, chain: ChainDecl) -> dict[str, Any]:
    spec: dict[str, Any] = {**ruleset._ref(), "name": chain.name}
    if chain.hook is not None:
        spec.update(type="filter", hook=chain.hook, prio=chain.priority, policy="accept")
    return {"add": {"chain": spec}}


def _set_command(ruleset: Ruleset, decl: SetDecl) -> dict[str, Any]:
    spec = {**ruleset._set_ref(decl),
            "type": decl.key_type[0] if len(decl.key_type) == 1 else list(decl.key_type)}
    if decl.map_type is not None:
        spec["map"] = decl.map_type
    elements = ruleset.elements.get(decl.name, frozenset())
    if elements:
        spec["elem"] = ruleset.render_elements(decl, elements)
    return {"add": {decl.object_kind(): spec}}


def full_replace(ruleset: Ruleset, marker: str,
                 counter_values: Mapping[str, tuple[int, int]] | None = None,
                 ) -> list[dict[str, Any]]:
    """The commands that replace the table whole, in one transaction. `marker` is appended
    to the comment of each base chain's first rule (the applier's generation); named
    counters start at `counter_values` (packets, bytes) so that a replace keeps them."""
    table = {"family": ruleset.family, "name": ruleset.table}
    commands: list[dict[str, Any]] = [{"add": {"table": table}}, {"delete": {"table": table}},
                                      {"add": {"table": table}}]
    for limit in ruleset.limits:
        commands.append({"add": {"limit": {**ruleset._ref(), "name": limit.name,
                                           "rate": limit.rate, "per": limit.per,
                                           "burst": limit.burst}}})
    values = counter_values or {}
    commands += [_counter_command(ruleset, name, values.get(name, (0, 0)))
                 for name in sorted(ruleset.counters)]
    commands += [_chain_command(ruleset, chain) for chain in ruleset.chains]
    commands += [_set_command(ruleset, decl) for decl in ruleset.sets]
    for chain in ruleset.chains:
        for index, rule in enumerate(chain.rules):
            comment = rule.comment
            if chain.hook is not None and index == 0:
                comment = f"{comment} {marker}"
            commands.append(_rule_command(ruleset, chain, rule, comment))
    return commands


def incremental(old: Ruleset, new: Ruleset) -> list[dict[str, Any]] | None:
    """The commands of one transaction that turn the table `old` into `new` in place, or None
    when only a full replace will do: another table or family, other limits, a base chain
    changed (it carries the applier's marker), or a set or chain redeclared under its name
    with another type or hook.

    Everything else is a diff. The order keeps every reference valid at every command of the
    batch: elements that are gone (or whose map value changed) are deleted first, so no
    verdict map names a chain about to go; then changed chains are flushed and removed ones
    flushed and deleted (their jumps and set references go with their rules); then removed
    sets and counters are deleted; then new counters, sets (with their elements) and chains
    are declared; then the rules of new and changed chains are added; then the new elements
    of sets that stay. Named counters that stay are never touched, so they keep counting."""
    if (old.table, old.family, old.limits) != (new.table, new.family, new.limits):
        return None
    old_chains = {c.name: c for c in old.chains}
    new_chains = {c.name: c for c in new.chains}
    for name in old_chains.keys() & new_chains.keys():
        if ((old_chains[name].hook, old_chains[name].priority)
                != (new_chains[name].hook, new_chains[name].priority)):
            return None
    if [c for c in old.chains if c.hook is not None] != new.base_chains():
        return None
    old_sets = {d.name: d for d in old.sets}
    new_sets = {d.name: d for d in new.sets}
    if any(old_sets[name] != new_sets[name] for name in old_sets.keys() & new_sets.keys()):
        return None
    delete_elements: list[dict[str, Any]] = []
    add_elements: list[dict[str, Any]] = []
    for decl in new.sets:
        if decl.name not in old_sets:
            continue
        before = old.elements.get(decl.name, frozenset())
        after = new.elements.get(decl.name, frozenset())
        gone, came = before - after, after - before
        if gone:
            delete_elements.append({"delete": {"element": {
                **new._set_ref(decl),
                "elem": [_element_key(decl, e) for e in sorted(gone, key=_sort_key)]}}})
        if came:
            add_elements.append({"add": {"element": {**new._set_ref(decl),
                                                     "elem": new.render_elements(decl, came)}}})
    removed_chains = [c for c in old.chains if c.name not in new_chains]
    changed_chains = [c for c in new.chains
                      if c.name in old_chains and old_chains[c.name].rules != c.rules]
    added_chains = [c for c in new.chains if c.name not in old_chains]
    commands = delete_elements
    for chain in [*changed_chains, *removed_chains]:
        commands.append({"flush": {"chain": {**new._ref(), "name": chain.name}}})
    commands += [{"delete": {"chain": {**new._ref(), "name": c.name}}} for c in removed_chains]
    commands += [{"delete": {d.object_kind(): new._set_ref(d)}}
                 for d in old.sets if d.name not in new_sets]
    commands += [{"delete": {"counter": {**new._ref(), "name": name}}}
                 for name in sorted(old.counters - new.counters)]
    commands += [_counter_command(new, name, (0, 0))
                 for name in sorted(new.counters - old.counters)]
    commands += [_set_command(new, d) for d in new.sets if d.name not in old_sets]
    commands += [_chain_command(new, c) for c in added_chains]
    for chain in [*changed_chains, *added_chains]:
        commands += [_rule_command(new, chain, rule, rule.comment) for rule in chain.rules]
    return commands + add_elements


# -- reading the kernel's listing back ------------------------------------------------------


@dataclass(frozen=True)
class Listing:
    """What the kernel holds of a table, in `Ruleset` terms: chains with their rules'
    comments (in order), set elements, counter values, and each base chain's hook."""

    chains: Mapping[str, tuple[str, ...]]
    hooks: Mapping[str, str | None]
    elements: Mapping[str, frozenset[Element]]
    counters: Mapping[str, tuple[int, int]]

    def differences(self, ruleset: Ruleset, marker: str) -> list[str]:
        """What differs from `ruleset` as `full_replace(ruleset, marker)` wrote it."""
        found: list[str] = []
        for chain in ruleset.chains:
            if chain.name not in self.chains:
                found.append(f"chain {chain.name} is missing")
                continue
            if self.hooks.get(chain.name) != chain.hook:
                found.append(f"chain {chain.name} has hook {self.hooks.get(chain.name)}, "
                             f"not {chain.hook}")
            expected = [r.comment for r in chain.rules]
            if chain.hook is not None and expected:
                expected[0] = f"{expected[0]} {marker}"
            if list(self.chains[chain.name]) != expected:
                found.append(f"chain {chain.name} holds {len(self.chains[chain.name])} rules "
                             f"that differ from the {len(expected)} written")
        found += [f"chain {name} was added" for name in self.chains
                  if name not in {c.name for c in ruleset.chains}]
        for decl in ruleset.sets:
            if decl.name not in self.elements:
                found.append(f"{decl.object_kind()} {decl.name} is missing")
                continue
            have, want = self.elements[decl.name], ruleset.elements.get(decl.name, frozenset())
            if have != want:
                found.append(f"{decl.object_kind()} {decl.name}: {len(want - have)} elements "
                             f"missing, {len(have - want)} unexpected")
        found += [f"counter {name} is missing" for name in sorted(ruleset.counters)
                  if name not in self.counters]
        return found


def _scalar(value: Any) -> Scalar:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"unexpected element part {value!r}")
    return value


def _parse_key(value: Any) -> Key:
    if isinstance(value, Mapping) and "concat" in value:
        return tuple(_scalar(v) for v in value["concat"])
    if isinstance(value, Mapping) and "elem" in value:  # an element with options
        return _parse_key(value["elem"].get("val"))
    return _scalar(value)


def _parse_element(kind: str, map_type: str | None, value: Any) -> Element:
    if map_type is None:
        return _parse_key(value)
    key, data = value
    if map_type == "verdict":
        verdict = next(iter(data))
        target = data[verdict].get("target") if isinstance(data[verdict], Mapping) else None
        return (_parse_key(key), str(target) if target else verdict)
    return (_parse_key(key), str(data))


def parse_listing(objects: Sequence[Mapping[str, Any]]) -> Listing:
    """Read `Nft.list_table(...)`'s objects."""
    chains: dict[str, list[str]] = {}
    hooks: dict[str, str | None] = {}
    elements: dict[str, frozenset[Element]] = {}
    counters: dict[str, tuple[int, int]] = {}
    for obj in objects:
        kind, body = next(iter(obj.items()))
        if kind == "chain":
            chains.setdefault(body["name"], [])
            hooks[body["name"]] = body.get("hook")
        elif kind == "rule":
            chains.setdefault(body["chain"], []).append(str(body.get("comment", "")))
        elif kind in ("set", "map"):
            map_type = body.get("map") if kind == "map" else None
            elements[body["name"]] = frozenset(
                _parse_element(kind, map_type, e) for e in body.get("elem", ()))
        elif kind == "counter":
            counters[body["name"]] = (int(body.get("packets", 0)), int(body.get("bytes", 0)))
    return Listing({k: tuple(v) for k, v in chains.items()}, hooks, elements, counters)
