"""weavepy.hostrules.apply: the shell that reads the host's rulesets, applies the plan, keeps it.

`HostRules.ensure(spec)` reads what the host has (weavepy's nftables table and the foreign
forward chains, and `iptables-legacy-save` / `iptables-nft-save` for the backends that are
installed), asks the pure
plan what to change, and applies it: every nftables change of a pass (weavepy's table, the peer
set, the accepts in foreign nftables chains) in one transaction through `weavepy.nft`, and one
`<backend>-restore -w --noflush` per iptables backend that needs a change. Called on every
reconcile pass, it finds rules that were deleted or flushed and puts them back, and says so (a
warning and `restorations`). `remove()` takes away the table and every accept it placed, so
each ruleset (nftables and both iptables backends) reads as it did before.

Rules it keeps: it acts in the network namespace of the calling process; `ensure` never raises
for a host problem (the state lists the errors and the next pass tries again) and reports each
new error once; `remove` tries every part and then raises one line if any failed. The masquerade
counters it reports never go backwards: when the table is replaced (or was found flushed) it
carries the last values it read.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from weavepy.hostrules.plan import (
    BACKENDS,
    FAMILY,
    MASQ_COUNTER,
    TABLE,
    Change,
    HostRulesSpec,
    HostView,
    IptablesForward,
    Plan,
    desired_table,
    plan,
    plan_removal,
    read_iptables_save,
    read_ruleset,
)
from weavepy.nft import Command, Nft, NftError

__all__ = ["BRIDGE_NF_CALL_IPTABLES", "HostRules", "HostRulesError", "HostRulesState",
           "enable_bridge_netfilter"]

log = logging.getLogger(__name__)

TOOL_TIMEOUT = 15.0  # seconds for one iptables-save or -restore (they wait for the xtables lock)
BRIDGE_NF_CALL_IPTABLES = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
TABLE_WHERE = f"table {FAMILY} {TABLE}"


class HostRulesError(Exception):
    """A host rule could not be read, applied or removed; the message is one line."""


@dataclass(frozen=True)
class HostRulesState:
    """What one `ensure` pass found and did.

    present: every wanted rule is in place after the pass; changes: what the pass changed;
    restored: the changes that repaired rules which had been in place (deleted or flushed by
    someone); restorations: repairs since this `HostRules` was made; masqueraded_*: totals
    since then; accepts_in: the chains that hold weavepy's forward accepts; errors: one line
    each."""

    present: bool
    changes: tuple[str, ...]
    restored: tuple[str, ...]
    restorations: int
    masqueraded_packets: int
    masqueraded_bytes: int
    accepts_in: tuple[str, ...]
    errors: tuple[str, ...]


@dataclass(frozen=True)
class _Backend:
    name: str
    save: str
    restore: str


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _run_tool(argv: Sequence[str], input_text: str | None = None) -> str:
    """Run one iptables tool; its stdout, or HostRulesError with its complaint in one line."""
    try:
        proc = subprocess.run(list(argv), input=input_text, capture_output=True, text=True,
                              timeout=TOOL_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise HostRulesError(f"{Path(argv[0]).name} did not finish within "
                             f"{TOOL_TIMEOUT:g} s") from None
    except OSError as exc:
        raise HostRulesError(f"{Path(argv[0]).name}: {exc.strerror}") from None
    if proc.returncode != 0:
        raise HostRulesError(f"{Path(argv[0]).name} failed ({proc.returncode}): "
                             f"{_one_line(proc.stderr or proc.stdout)}")
    return proc.stdout


class HostRules:
    """weavepy's host rules in this network namespace: `ensure(spec)` each pass, `remove()`.

    One object per agent, used from one thread at a time (it keeps the libnftables context and
    what the last pass placed). Raises HostRulesError when nftables support is missing."""

    def __init__(self) -> None:
        try:
            self._nft = Nft()
        except NftError as exc:
            raise HostRulesError(str(exc)) from None
        self._backends: list[_Backend] = []
        for name in BACKENDS:
            save, restore = shutil.which(f"{name}-save"), shutil.which(f"{name}-restore")
            if save and restore:
                self._backends.append(_Backend(name, save, restore))
        self._placed: set[str] = set()  # where rules were in place after the last clean pass
        self._placed_for: tuple[object, ...] = ()  # the table shape that pass wanted
        self._restorations = 0
        self._carried = (0, 0)  # masquerade counts of tables that are gone
        self._last_seen = (0, 0)
        self._last_errors: tuple[str, ...] = ()

    # -- reading ---------------------------------------------------------------------------------

    def observe(self) -> tuple[HostView, list[str]]:
        """What the host has now, and the parts that could not be read (one line each)."""
        errors: list[str] = []
        try:
            nft_view = read_ruleset(self._nft_objects())
        except NftError as exc:
            raise HostRulesError(f"nftables: {exc}") from None
        backends: list[IptablesForward] = []
        for backend in self._backends:
            try:
                backends.append(read_iptables_save(backend.name, _run_tool([backend.save])))
            except HostRulesError as exc:
                errors.append(str(exc))
        return HostView(nft_view, tuple(backends)), errors

    def _nft_objects(self) -> list[Command]:
        """weavepy's table and the foreign forward chains with their rules, read narrowly (a
        host's other tables, kube-proxy's maps among them, can be large): the table, the list
        of chains, then each forward chain. A chain that goes away meanwhile is skipped."""
        objects = self._nft.list_table(FAMILY, TABLE) or []
        for chain in read_ruleset(self._nft.run([{"list": {"chains": None}}])).forward_chains:
            ref = {"family": chain.family, "table": chain.table, "name": chain.name}
            try:
                objects += self._nft.run([{"list": {"chain": ref}}])
            except NftError as exc:
                if "No such file or directory" not in str(exc):
                    raise
        return objects

    # -- applying --------------------------------------------------------------------------------

    def _apply(self, todo: Plan) -> tuple[list[Change], list[str]]:
        """Apply `todo`; the changes that took effect and the errors of those that did not."""
        done: list[Change] = []
        errors: list[str] = []
        if todo.nft:
            try:
                self._nft.run(list(todo.nft))
                done += todo.nft_changes
            except NftError as exc:
                errors.append(f"nftables: {exc}")
        restores = {b.name: b.restore for b in self._backends}
        for restore in todo.restores:
            try:
                _run_tool([restores[restore.backend], "-w", "--noflush"], restore.script)
                done.append(restore.change)
            except HostRulesError as exc:
                errors.append(str(exc))
        return done, errors

    def _count(self, host: HostView) -> None:
        """Fold this pass's reading of the masquerade counter into the running totals."""
        seen = host.nft.counter_values.get(MASQ_COUNTER, (0, 0)) if host.nft.table else (0, 0)
        if seen[0] < self._last_seen[0] or seen[1] < self._last_seen[1]:  # a reset or flush
            self._carried = (self._carried[0] + self._last_seen[0],
                             self._carried[1] + self._last_seen[1])
        self._last_seen = seen

    def ensure(self, spec: HostRulesSpec) -> HostRulesState:
        """Make the host carry the rules `spec` wants; repair whatever went missing."""
        try:
            host, errors = self.observe()
        except HostRulesError as exc:
            return self._state(False, [], [], [str(exc)], ())
        self._count(host)
        todo = plan(spec, host)
        done, apply_errors = self._apply(todo)
        errors += apply_errors
        if any(c.where == TABLE_WHERE for c in done):  # a new table counts from zero
            self._carried = (self._carried[0] + self._last_seen[0],
                             self._carried[1] + self._last_seen[1])
            self._last_seen = (0, 0)
        wanted = desired_table(spec).shape()
        same_wish = wanted == self._placed_for  # otherwise the changes follow a new spec
        restored = [c for c in done if same_wish and not c.routine and c.where in self._placed]
        if not errors:
            self._placed, self._placed_for = {TABLE_WHERE, *todo.accepts_in}, wanted
        return self._state(not errors, done, restored, errors, todo.accepts_in)

    def _state(self, present: bool, done: Sequence[Change],
               restored: Sequence[Change], errors: Sequence[str],
               accepts_in: Sequence[str]) -> HostRulesState:
        self._restorations += len(restored)
        for change in restored:
            log.warning("host rules restored: %s (they had been removed or changed)", change)
        for change in done:
            if change not in restored:
                log.log(logging.DEBUG if change.routine else logging.INFO,
                        "host rules: %s", change)
        if tuple(errors) != self._last_errors:
            for error in errors:
                log.warning("host rules: %s", error)
        self._last_errors = tuple(errors)
        return HostRulesState(
            present=present, changes=tuple(str(c) for c in done),
            restored=tuple(str(c) for c in restored), restorations=self._restorations,
            masqueraded_packets=self._carried[0] + self._last_seen[0],
            masqueraded_bytes=self._carried[1] + self._last_seen[1],
            accepts_in=tuple(accepts_in), errors=tuple(errors))

    def remove(self) -> tuple[str, ...]:
        """Remove weavepy's table and every accept it placed; what was removed, one line each.
        Raises HostRulesError (one line) if any part could not be read or removed."""
        host, errors = self.observe()
        done, apply_errors = self._apply(plan_removal(host))
        errors += apply_errors
        if errors:
            raise HostRulesError("; ".join(errors))
        self._placed, self._placed_for = set(), ()
        for change in done:
            log.info("host rules: %s", change)
        return tuple(str(c) for c in done)


def enable_bridge_netfilter(path: Path = BRIDGE_NF_CALL_IPTABLES) -> str:
    """Let bridged IPv4 traffic pass the netfilter IP hooks in this namespace
    (`net.bridge.bridge-nf-call-iptables=1`), so that rules on the forward hook also see pod
    traffic within a node (Services, NetworkPolicy). Returns "enabled" (switched on now), "on"
    (it already was) or "absent" (no br_netfilter here: status should warn)."""
    try:
        current = path.read_text().strip()
    except FileNotFoundError:
        return "absent"
    except OSError as exc:
        raise HostRulesError(f"cannot read {path}: {exc.strerror}") from None
    if current == "1":
        return "on"
    try:
        path.write_text("1\n")
    except OSError as exc:
        raise HostRulesError(f"cannot set {path} to 1: {exc.strerror}") from None
    return "enabled"
