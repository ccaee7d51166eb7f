"""The applier: makes the kernel hold the compiled policy table, one transaction per change.

This module is the policy package's only I/O on nftables (through `weavepy/nft.py`; it runs
in the caller's network namespace and blocks briefly: call it from a worker thread under trio).

The rules it keeps:

* **One atomic transaction per change.** A change is a diff (`ruleset.incremental`): the
  elements, counters, sets and chains that came or went, and the chains whose rules changed
  (flushed and written again), in one batch, so a pod that brings a new set of policies to
  the node costs what it adds, not the whole table. Only when the diff cannot be made (the
  base chains or limits changed) or failed is the whole table replaced,
  `add table; delete table; add table ...` in ONE batch, so the kernel goes from the old
  table to the new with no moment in between: never a delete and an add in two
  transactions. Named counters keep their values across both: a diff leaves the counters
  that stay alone, a replace writes them back with their values.
* **A full resync at start and whenever someone else changed or flushed the table.** Each
  replace writes a marker (`weavepy-policy <token>/<generation>`; the token is random per
  applier) into the comment of each base chain's first rule. Before every incremental change,
  `check()` reads nftables' generation (a kernel counter of committed transactions): the one
  seen after our last write means nobody changed anything. Otherwise it lists the base
  chains and the verdict maps (small: one rule per chain and one element per local isolated
  pod) and compares them with what was written (the generation is read right after our own
  commit: a change that slips in between is left to `verify()`); `verify()` compares
  the whole table, for a slower period. Any difference: the next `apply` replaces the table.
* A failed transaction changes nothing in the kernel (nftables' batches are atomic); a failed
  incremental change is followed by a full replace, and a failed replace raises `NftError`
  with the applier still knowing nothing was applied.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from weavepy.nft import NftError
from weavepy.policy.ruleset import Ruleset, full_replace, incremental, parse_listing

__all__ = ["ApplyResult", "NftRunner", "PolicyApplier"]

log = logging.getLogger(__name__)


class NftRunner(Protocol):
    """What the applier needs of `weavepy.nft.Nft`."""

    def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]: ...

    def list_table(self, family: str, name: str) -> list[dict[str, Any]] | None: ...

    def generation(self) -> int: ...


@dataclass(frozen=True)
class ApplyResult:
    kind: Literal["full", "incremental", "unchanged"]
    commands: int
    reason: str


class PolicyApplier:
    """Applies `Ruleset`s to the kernel; see the module docstring."""

    def __init__(self, nft: NftRunner, *, token: str | None = None) -> None:
        self.nft = nft
        self.token = token or secrets.token_hex(3)
        self.generation = 0
        self.applied: Ruleset | None = None
        self.full_replaces = 0
        self.incremental_changes = 0
        self.repairs = 0  # replaces because the kernel's table was not what we wrote
        self.last_repair: str | None = None
        self.seen_generation: int | None = None  # nftables' generation when last known good

    @property
    def marker(self) -> str:
        return f"weavepy-policy {self.token}/{self.generation}"

    def apply(self, desired: Ruleset) -> ApplyResult:
        """Make the kernel hold `desired`: nothing, an incremental change or a replace."""
        reason = "start" if self.applied is None else ""
        if self.applied is not None:
            problem = self.check()
            if problem is not None:
                reason = f"the table was changed by someone else: {problem}"
                self._repaired(problem)
        if self.applied is not None:
            if self.applied == desired:
                return ApplyResult("unchanged", 0, "")
            commands = incremental(self.applied, desired)
            if commands is None:
                reason = "the base chains, limits or a declaration's type changed"
            else:
                try:
                    self.nft.run(commands)
                except NftError as exc:
                    reason = f"an incremental change failed ({exc})"
                    log.warning("policy table: %s; replacing the table", reason)
                else:
                    self.applied = desired
                    self.seen_generation = self.nft.generation()
                    self.incremental_changes += 1
                    return ApplyResult("incremental", len(commands), "a diff")
        return self._replace(desired, reason)

    def _replace(self, desired: Ruleset, reason: str) -> ApplyResult:
        values = self.counter_values(desired.table, desired.family)
        previous = self.applied
        self.applied = None
        self.generation += 1
        commands = full_replace(desired, self.marker, values)
        if previous is not None and (previous.table, previous.family) != (desired.table,
                                                                            desired.family):
            old = {"family": previous.family, "name": previous.table}
            commands = [{"add": {"table": old}}, {"delete": {"table": old}}, *commands]
        self.nft.run(commands)
        self.applied = desired
        self.seen_generation = self.nft.generation()
        self.full_replaces += 1
        return ApplyResult("full", len(commands), reason)

    def _repaired(self, problem: str) -> None:
        log.warning("policy table %s: %s; replacing it whole",
                    self.applied.table if self.applied else "?", problem)
        self.repairs += 1
        self.last_repair = problem
        self.applied = None
        self.seen_generation = None

    # -- reading the kernel -----------------------------------------------------------------

    def _list(self, kind: str, ruleset: Ruleset, name: str) -> list[dict[str, Any]] | None:
        try:
            return self.nft.run([{"list": {kind: {"family": ruleset.family,
                                                  "table": ruleset.table, "name": name}}}])
        except NftError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise

    def check(self) -> str | None:
        """A cheap look: are the base chains and verdict maps as written? None if so, else
        what differs. Nothing is listed when nftables' generation is the one seen after the
        last write or good check: no transaction (of anyone) committed since."""
        ruleset = self.applied
        if ruleset is None:
            return "nothing applied yet"
        generation = self.nft.generation()
        if generation == self.seen_generation:
            return None
        objects: list[dict[str, Any]] = []
        for chain in ruleset.base_chains():
            found = self._list("chain", ruleset, chain.name)
            if found is None:
                return f"chain {chain.name} is gone"
            objects += found
        for decl in ruleset.sets:
            if decl.map_type == "verdict":
                found = self._list("map", ruleset, decl.name)
                if found is None:
                    return f"map {decl.name} is gone"
                objects += found
        listing = parse_listing(objects)
        for chain in ruleset.base_chains():
            expected = [r.comment for r in chain.rules]
            if expected:
                expected[0] = f"{expected[0]} {self.marker}"
            if list(listing.chains.get(chain.name, ())) != expected:
                return f"chain {chain.name} does not hold the rules written"
        for decl in ruleset.sets:
            if decl.map_type == "verdict" and (listing.elements.get(decl.name)
                                               != ruleset.elements.get(decl.name, frozenset())):
                return f"map {decl.name} does not hold the elements written"
        self.seen_generation = generation
        return None

    def verify(self) -> list[str]:
        """A whole comparison of the kernel's table with what was applied; a difference
        makes the next `apply` replace the table."""
        ruleset = self.applied
        if ruleset is None:
            return ["nothing applied yet"]
        objects = self.nft.list_table(ruleset.family, ruleset.table)
        if objects is None:
            differences = [f"table {ruleset.table} is gone"]
        else:
            differences = parse_listing(objects).differences(ruleset, self.marker)
        if differences:
            self._repaired("; ".join(differences[:3]))
        return differences

    def counter_values(self, table: str, family: str = "inet") -> dict[str, tuple[int, int]]:
        """Every named counter of the table: name -> (packets, bytes); {} if there is none."""
        try:
            objects = self.nft.run([{"list": {"counters": {"family": family, "table": table}}}])
        except NftError as exc:
            if "No such file or directory" in str(exc):
                return {}
            raise
        return dict(parse_listing(objects).counters)

    def remove(self, table: str | None = None, family: str = "inet") -> None:
        """Delete the table (weavepy reset); nothing if it is not there."""
        name = table or (self.applied.table if self.applied else None)
        if name is None:
            return
        ref = {"family": family, "name": name}
        self.nft.run([{"add": {"table": ref}}, {"delete": {"table": ref}}])
        self.applied = None
        self.seen_generation = None

