"""The live invariant checker of a chaos run: sans-IO, fed observations and times, never a clock.

It owns the judgement of a run. The runner tells it the ground truth (which agents run, which
links are cut, who is partitioned from whom, who is impaired) each time a fault changes it,
and feeds it what it observed (every node's `/status` JSON and kernel state) and every probe
result. The checker answers with violations (each with its evidence), a timeline, and the
distribution of convergence times. Theory of operation:

* **Live nodes** are the nodes whose agent runs, is not stopped, and answered `/status` in
  this observation. Only they are judged.
* **Invariant 1, no overlap**: the owned blocks of the live nodes are disjoint (checked on
  every observation with `weavepy.ipam.invariants.check_no_overlap`).
* **Invariant 2, kernel state follows membership**: a live node's expected peers are the
  other nodes it can reach by ground truth (agent running and not stopped, cables in, no drop
  either way). Its VXLAN routes must be exactly the blocks of those peers, each gateway must
  have a permanent neighbour whose MAC has an FDB entry pointing at the owner's underlay
  address, and there must be no neighbour or FDB entry for anyone else. Routes follow block
  ownership (`--route-grace`, weavepy.reconcile): a peer a node cannot reach keeps its
  entries there while it owns its blocks, for the grace after its failure. So with
  `route_grace` set, the last known blocks of a peer unreachable from a node for less than
  `route_grace` plus the bound (detection is within the bound) are *kept*: their routes may
  be present (then pointing at that peer, like the expected ones) or absent, and only after
  that are they extra. The checker sees no reclaim, so a block reclaimed meanwhile is still
  tolerated, unless a reachable node owns it now (then its route must point at the new
  owner). After each ground-truth change the checker measures how long until every live
  node matches (a convergence time); no match within the bound is a violation with each
  node's difference as evidence. A change
  whose outcome is not defined (an asymmetric partition, a stall in progress: gossip may or
  may not declare the node dead) starts no measurement; the next defined change does. A
  mismatch that appears in a settled cluster is measured the same way (a "drift"), so it is a
  violation only if it outlasts the bound. One exception, legitimate SWIM behaviour: a node
  on the minority side of a symmetric partition may keep *extra* entries (routes, neighbours,
  FDB entries for peers it can no longer reach) for a longer `isolated_bound`. Cut off, its
  probes all fail, so Lifeguard's local health awareness stretches its probe interval and
  timeout up to `awareness_max_multiplier` times (it assumes it is the one at fault), it
  reaches each of the n-1 peers one probe round at a time, and nobody can confirm its
  suspicions, so each runs to the maximum suspicion timeout. The 5-node soak with seed
  20261121 showed exactly this: every isolated node still routed to 1-3 of its 4 peers 30 s
  into its partition while the majority had converged. Missing entries, wrong FDB entries
  and anything on the majority side keep the normal bound.
* **Invariant 3, restarts keep state**: a restarted agent's first status holds exactly the
  blocks it held before it went down, and its pods keep their addresses (the runner reports
  the addresses it sees before and after).
* **Invariant 4, a minority never claims**: while a symmetric partition holds, a node on a
  side without a majority of the nodes never holds a block it did not hold when the partition
  began.
* **Invariant 5, probes**: a probe from a pod on A to a pod on B counts toward the success
  rate only if the pair was *healthy* from its send time to its deadline: both agents running
  and not stopped, both cables in, no drop between A and B either way, neither node impaired,
  and neither node inside a convergence window (from a ground-truth change that touched it
  until the checker saw the cluster converge again plus a grace, or the bound; after an
  undefined phase ends, the full bound, because a suspicion raised during it may still
  mature into a death after the heal). Other probes
  are reported but not judged. The rate must be at least 99.9 %.
"""

from __future__ import annotations

import ipaddress
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from weavepy.ipam.invariants import InvariantViolation, Ownership, check_no_overlap

__all__ = [
    "ChaosReport",
    "KernelView",
    "LiveChecker",
    "NodeSnapshot",
    "ProbeResult",
    "Truth",
    "Violation",
]

PROBE_SUCCESS_GOAL = 0.999
DEFAULT_GRACE = 2.0


class KernelView(Protocol):
    """A node's VXLAN kernel state (`weavepy.devtools.agentbox.DataPlaneView` has this shape)."""

    @property
    def routes(self) -> Mapping[str, str]: ...  # block -> gateway

    @property
    def neighbours(self) -> Mapping[str, str]: ...  # gateway -> VTEP MAC

    @property
    def fdb(self) -> Mapping[str, str]: ...  # VTEP MAC -> underlay IP


@dataclass(frozen=True)
class NodeSnapshot:
    """What one poll saw of one node: its status JSON and its kernel state (None: no answer)."""

    node: str
    status: Mapping[str, Any] | None
    kernel: KernelView | None


@dataclass(frozen=True)
class Truth:
    """Ground truth, as the runner made it. `defined` is False while the expected membership
    is not defined (an asymmetric partition or a stall is in progress)."""

    down: frozenset[str] = frozenset()  # agent not running
    stalled: frozenset[str] = frozenset()  # agent SIGSTOPped
    cut: frozenset[str] = frozenset()  # underlay cable pulled
    blocked: frozenset[tuple[str, str]] = frozenset()  # (from, to) packets dropped
    impaired: frozenset[str] = frozenset()  # loss, delay, duplication or reordering
    minority: frozenset[str] = frozenset()  # side of a symmetric partition without majority
    defined: bool = True

    def running(self, node: str) -> bool:
        return node not in self.down and node not in self.stalled

    def reachable(self, a: str, b: str) -> bool:
        return (self.running(a) and self.running(b) and a not in self.cut and b not in self.cut
                and (a, b) not in self.blocked and (b, a) not in self.blocked)


@dataclass(frozen=True)
class ProbeResult:
    src: str  # node of the sending pod
    dst: str  # node of the answering pod
    sent: float
    deadline: float
    ok: bool
    rtt_ms: float | None = None


@dataclass(frozen=True)
class Violation:
    invariant: str
    at: float
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_json(self, origin: float) -> dict[str, Any]:
        return {"invariant": self.invariant, "t": round(self.at - origin, 3),
                "message": self.message, "evidence": self.evidence}


@dataclass
class _Measurement:
    label: str
    started: float
    deadline: float
    affected: frozenset[str]
    last_diff: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class _Window:
    """Nodes not judged by probes from `start` to `end` (None: still open)."""

    nodes: frozenset[str]
    start: float
    end: float | None


@dataclass
class ChaosReport:
    seed: int | None
    origin: float
    timeline: list[tuple[float, str]]
    violations: list[Violation]
    convergence: list[tuple[str, float]]
    unconverged: list[str]
    probes_judged: int
    probes_failed_judged: int
    probes_unjudged: int
    probes_failed_unjudged: int
    check_counts: Counter[str]
    failed_probe_samples: list[ProbeResult]

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def probe_success(self) -> float | None:
        if not self.probes_judged:
            return None
        return 1 - self.probes_failed_judged / self.probes_judged

    def convergence_summary(self) -> dict[str, float]:
        times = sorted(t for _, t in self.convergence)
        if not times:
            return {}
        p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
        return {"count": len(times), "min": times[0], "median": statistics.median(times),
                "p99": p99, "max": times[-1]}

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seed": self.seed,
            "violations": [v.to_json(self.origin) for v in self.violations],
            "timeline": [{"t": round(t - self.origin, 3), "event": e} for t, e in self.timeline],
            "convergence_s": [{"after": label, "seconds": round(t, 3)}
                              for label, t in self.convergence],
            "convergence_summary": {k: round(v, 3) for k, v in
                                    self.convergence_summary().items()},
            "unconverged": self.unconverged,
            "probes": {"judged": self.probes_judged, "failed": self.probes_failed_judged,
                       "success": self.probe_success, "goal": PROBE_SUCCESS_GOAL,
                       "unjudged": self.probes_unjudged,
                       "unjudged_failed": self.probes_failed_unjudged},
            "checks": dict(self.check_counts),
        }

    def to_text(self) -> str:
        lines = [f"chaos run, seed {self.seed}: "
                 f"{'PASS' if self.ok else f'FAIL ({len(self.violations)} violations)'}", "",
                 "timeline:"]
        lines += [f"  {t - self.origin:8.2f}s  {event}" for t, event in self.timeline]
        summary = self.convergence_summary()
        lines += ["", "convergence (ground-truth change -> every live node's kernel state "
                      "matches the live membership):"]
        if summary:
            lines.append(f"  {int(summary['count'])} changes: min {summary['min']:.2f}s, "
                         f"median {summary['median']:.2f}s, p99 {summary['p99']:.2f}s, "
                         f"max {summary['max']:.2f}s")
            lines += [f"  {seconds:7.2f}s after {label}" for label, seconds in self.convergence]
        else:
            lines.append("  (no measurement finished)")
        if self.unconverged:
            lines.append(f"  superseded before converging: {', '.join(self.unconverged)}")
        rate = self.probe_success
        lines += ["", f"probes between healthy pods: {self.probes_judged} judged, "
                      f"{self.probes_failed_judged} failed"
                      + (f" ({rate * 100:.3f} % success, goal {PROBE_SUCCESS_GOAL * 100:g} %)"
                         if rate is not None else ""),
                  f"probes outside healthy windows (not judged): {self.probes_unjudged}, "
                  f"{self.probes_failed_unjudged} failed"]
        lines += ["", "checks run: " + ", ".join(f"{k} x{v}" for k, v in
                                                  sorted(self.check_counts.items()))]
        if self.violations:
            lines += ["", "VIOLATIONS:"]
            for v in self.violations:
                lines.append(f"  [{v.invariant}] at {v.at - self.origin:.2f}s: {v.message}")
                for key, value in v.evidence.items():
                    lines.append(f"      {key}: {value}")
        lines += ["", f"replay with: weavepy chaos --seed {self.seed} (same --nodes and "
                      f"--profile)" if self.seed is not None else ""]
        return "\n".join(lines).rstrip() + "\n"


def _blocks_of(status: Mapping[str, Any]) -> tuple[str, ...]:
    dataplane = status.get("dataplane") or {}
    return tuple(dataplane.get("local_blocks") or ())


def _ipam_list(status: Mapping[str, Any], key: str) -> frozenset[str]:
    ipam = status.get("ipam") or {}
    return frozenset(ipam.get(key) or ())


class LiveChecker:
    """Judges a chaos run from ground truth, observations and probe results (see the module
    docstring for each invariant). All times are the caller's monotonic seconds."""

    def __init__(self, underlay: Mapping[str, str], convergence_bound: float,
                 start: float, seed: int | None = None, grace: float = DEFAULT_GRACE,
                 max_samples: int = 20, isolated_bound: float | None = None,
                 route_grace: float = 0.0) -> None:
        self.underlay = dict(underlay)
        self.route_grace = route_grace  # the agents' --route-grace
        self.nodes = sorted(self.underlay, key=lambda n: (len(n), n))
        self.bound = convergence_bound
        self.isolated_bound = max(convergence_bound, isolated_bound or 0.0)
        self.grace = grace
        self.seed = seed
        self.origin = start
        self.truth = Truth()
        self.timeline: list[tuple[float, str]] = []
        self.violations: list[Violation] = []
        self.convergence: list[tuple[str, float]] = []
        self.unconverged: list[str] = []
        self.counts: Counter[str] = Counter()
        self.blocks: dict[str, tuple[str, ...]] = {}  # last known own blocks of each node
        self.held: dict[str, frozenset[str]] = {}  # last known held blocks of each node
        self._pending: _Measurement | None = None
        self._windows: list[_Window] = []
        self._truths: list[tuple[float, Truth]] = [(start, self.truth)]
        self._restarted: dict[str, frozenset[str]] = {}  # node -> held before going down
        self._minority_held: dict[str, frozenset[str]] = {}
        self._pods_before: dict[str, str] = {}
        self._probes: list[ProbeResult] = []
        self._max_samples = max_samples
        self._overlap_reported: set[str] = set()

    @property
    def settling(self) -> bool:
        """A convergence measurement is running (or the expected state is not defined)."""
        return self._pending is not None or not self.truth.defined

    # -- inputs ------------------------------------------------------------------------------

    def note(self, now: float, event: str) -> None:
        self.timeline.append((now, event))

    def set_truth(self, now: float, truth: Truth, label: str,
                  affected: Iterable[str]) -> None:
        """The runner changed the world at `now`; `affected` names the nodes it touched."""
        affected_set = frozenset(affected)
        self.note(now, label)
        if self._pending is not None:
            self._finish_window(now)
            self.unconverged.append(self._pending.label)
            left = "; ".join(f"{n}: {', '.join(p[:2])}" for n, p in
                             sorted(self._pending.last_diff.items()))
            self.note(now, f"(superseded: {self._pending.label}"
                      + (f"; still different: {left})" if left else ")"))
            carried = self._pending.affected
            self._pending = None
        else:
            carried = frozenset()
        for node in truth.down - self.truth.down:
            if node in self.held:
                self._restarted[node] = self.held[node]
        if truth.minority != self.truth.minority:
            self._minority_held = {n: self.held.get(n, frozenset()) for n in truth.minority}
        ends_undefined = not self.truth.defined and truth.defined
        self.truth = truth
        self._truths.append((now, truth))
        window_nodes = affected_set | carried
        self._windows.append(_Window(window_nodes, now, None))
        if ends_undefined:
            # a suspicion begun while the outcome was undefined (asymmetric partition, stall)
            # may still mature after the heal: the touched nodes stay unjudged for the bound
            self._windows.append(_Window(window_nodes, now, now + self.bound))
        if truth.defined:
            self._pending = _Measurement(label, now, now + self.bound, window_nodes)

    def pod_address(self, now: float, pod: str, address: str, phase: str) -> None:
        """A pod's address as its CNI ADD reported it: `phase` "before" (first ADD) or
        "after" (the same ADD repeated after its node's agent restarted)."""
        if phase == "before":
            self._pods_before[pod] = address
            return
        self.counts["3:pod_kept_address"] += 1
        before = self._pods_before.get(pod)
        if before is not None and before != address:
            self._violate(now, "3:restart_kept", f"pod {pod} had {before} before its agent "
                          f"restarted and {address} after", {"pod": pod, "before": before,
                                                             "after": address})

    def probe(self, result: ProbeResult) -> None:
        self._probes.append(result)

    def observe(self, now: float, snapshots: Iterable[NodeSnapshot]) -> None:
        """One poll of every node. Runs invariants 1-4 on what it shows."""
        live: dict[str, NodeSnapshot] = {}
        for snap in snapshots:
            if snap.status is None or not self.truth.running(snap.node):
                continue
            live[snap.node] = snap
            blocks = _blocks_of(snap.status)
            if blocks:
                self.blocks[snap.node] = blocks
            held = _ipam_list(snap.status, "held_blocks")
            self._check_restart(now, snap.node, held)
            self.held[snap.node] = held
        self._check_overlap(now, live)
        self._check_minority(now, live)
        self._check_kernel(now, live)

    # -- invariant checks --------------------------------------------------------------------

    def _violate(self, now: float, invariant: str, message: str,
                 evidence: dict[str, Any]) -> None:
        self.violations.append(Violation(invariant, now, message, evidence))
        self.note(now, f"VIOLATION [{invariant}] {message}")

    def _check_overlap(self, now: float, live: Mapping[str, NodeSnapshot]) -> None:
        self.counts["1:no_overlap"] += 1
        views = []
        for name, snap in live.items():
            assert snap.status is not None
            owned = frozenset(ipaddress.ip_network(b) for b in
                              _ipam_list(snap.status, "owned_blocks"))
            views.append(Ownership(name, snap.status.get("cluster_id"), owned))
        try:
            check_no_overlap(views)
        except InvariantViolation as exc:
            key = str(exc)
            if key not in self._overlap_reported:  # one report per distinct overlap
                self._overlap_reported.add(key)
                self._violate(now, "1:no_overlap", key, {
                    v.node: sorted(map(str, v.owned)) for v in views})

    def _check_restart(self, now: float, node: str, held: frozenset[str]) -> None:
        before = self._restarted.pop(node, None)
        if before is None:
            return
        self.counts["3:restart_kept_blocks"] += 1
        if held != before:
            self._violate(now, "3:restart_kept", f"{node} held {sorted(before)} before it went "
                          f"down and {sorted(held)} in its first status after the restart",
                          {"before": sorted(before), "after": sorted(held)})

    def _check_minority(self, now: float, live: Mapping[str, NodeSnapshot]) -> None:
        for node, before in self._minority_held.items():
            snap = live.get(node)
            if snap is None:
                continue
            assert snap.status is not None
            self.counts["4:minority_never_claims"] += 1
            held = _ipam_list(snap.status, "held_blocks")
            new = held - before
            if new:
                self._violate(now, "4:minority_never_claims", f"{node} is in a minority "
                              f"partition and now holds {sorted(new)} that it did not hold "
                              f"when the partition began", {
                                  "held_at_partition": sorted(before), "held_now": sorted(held),
                                  "ipam_state": (snap.status.get("ipam") or {}).get("state")})
                self._minority_held[node] = held

    def expected_routes(self, node: str) -> dict[str, str]:
        """Block -> owner for every block `node` should route to under the current truth."""
        wanted: dict[str, str] = {}
        for peer in self.nodes:
            if peer != node and self.truth.reachable(node, peer):
                for block in self.blocks.get(peer, ()):
                    wanted[block] = peer
        return wanted

    def kept_routes(self, node: str, now: float) -> dict[str, str]:
        """Block -> owner for every block `node` may still route to at `now` although it cannot
        reach the owner: the route grace (module docstring, invariant 2)."""
        if self.route_grace <= 0:
            return {}
        wanted = self.expected_routes(node)
        kept: dict[str, str] = {}
        for peer in self.nodes:
            if peer == node or self.truth.reachable(node, peer):
                continue
            since = self._unreachable_since(node, peer)
            if since is not None and now < since + self.route_grace + self.bound:
                kept.update({b: peer for b in self.blocks.get(peer, ()) if b not in wanted})
        return kept

    def _unreachable_since(self, a: str, b: str) -> float | None:
        """When a and b last stopped reaching each other by ground truth (None: they can)."""
        since: float | None = None
        for t, truth in self._truths:
            if truth.reachable(a, b):
                since = None
            elif since is None:
                since = t
        return since

    def kernel_difference(self, node: str, kernel: KernelView,
                          now: float | None = None) -> list[str]:
        """What is wrong with `node`'s kernel state under the current truth ([] if nothing);
        with `now`, the routes the grace keeps are allowed (`kept_routes`)."""
        problems: list[str] = []
        wanted = self.expected_routes(node)
        kept = self.kept_routes(node, now) if now is not None else {}
        have = dict(kernel.routes)
        for block in sorted(set(wanted) - set(have)):
            problems.append(f"missing route {block} (owner {wanted[block]})")
        for block in sorted(set(have) - set(wanted) - set(kept)):
            problems.append(f"extra route {block} via {have[block]}")
        owners = {**kept, **wanted}
        present = set(owners) & set(have)
        gateways = {have[b] for b in present}
        for block in sorted(present):
            gateway = have[block]
            mac = kernel.neighbours.get(gateway)
            if mac is None:
                problems.append(f"route {block}: no neighbour for gateway {gateway}")
                continue
            dst = kernel.fdb.get(mac)
            owner_ip = self.underlay[owners[block]]
            if dst != owner_ip:
                problems.append(f"route {block}: FDB for {mac} points at {dst}, "
                                f"not {owners[block]}'s {owner_ip}")
        for gateway in sorted(set(kernel.neighbours) - gateways):
            problems.append(f"extra neighbour {gateway} -> {kernel.neighbours[gateway]}")
        expected_dsts = {self.underlay[owner] for owner in owners.values()}
        for mac, dst in sorted(kernel.fdb.items()):
            if dst not in expected_dsts:
                problems.append(f"extra FDB entry {mac} -> {dst}")
        return problems

    def _check_kernel(self, now: float, live: Mapping[str, NodeSnapshot]) -> None:
        if not self.truth.defined:
            return
        self.counts["2:kernel_matches_membership"] += 1
        diff: dict[str, list[str]] = {}
        for name, snap in live.items():
            if snap.kernel is None:
                continue
            problems = self.kernel_difference(name, snap.kernel, now)
            if problems:
                diff[name] = problems
        pending = self._pending
        if pending is None:
            if not diff:
                return
            # drift in a settled cluster: measured like a change, a violation only past the bound
            pending = self._pending = _Measurement("drift: " + "; ".join(
                f"{n}: {p[0]}" for n, p in sorted(diff.items())), now, now + self.bound,
                frozenset(diff))
            self._windows.append(_Window(frozenset(diff), now, None))
            self.note(now, pending.label)
        if not diff:
            seconds = now - pending.started
            self.convergence.append((pending.label, seconds))
            self.note(now, f"converged {seconds:.2f}s after: {pending.label}")
            self._finish_window(now + self.grace)
            self._pending = None
            return
        pending.last_diff = diff
        if now > pending.deadline and not self._isolated_lag(now, pending, diff):
            self._violate(now, "2:kernel_matches_membership",
                          f"kernel state did not match the live membership within "
                          f"{self.bound:g}s after: {pending.label}", {
                              node: problems for node, problems in sorted(diff.items())})
            self.unconverged.append(pending.label)
            self._finish_window(now)
            self._pending = None

    def _isolated_lag(self, now: float, pending: _Measurement,
                      diff: Mapping[str, list[str]]) -> bool:
        """Only minority nodes differ, only by extra entries, within the isolated bound."""
        return (now <= pending.started + self.isolated_bound
                and all(node in self.truth.minority for node in diff)
                and all(p.startswith("extra ") for problems in diff.values() for p in problems))

    def _finish_window(self, end: float) -> None:
        for window in self._windows:
            if window.end is None:
                window.end = end

    # -- invariant 5 and the report ------------------------------------------------------------

    def _truths_during(self, start: float, end: float) -> list[Truth]:
        found = [truth for t, truth in self._truths if start < t <= end]
        before = [truth for t, truth in self._truths if t <= start]
        return ([before[-1]] if before else []) + found

    def healthy(self, a: str, b: str, start: float, end: float) -> bool:
        """Whether a probe between nodes a and b from `start` to `end` is judged."""
        for truth in self._truths_during(start, end):
            if not truth.reachable(a, b) or a in truth.impaired or b in truth.impaired:
                return False
        for window in self._windows:
            if a in window.nodes or b in window.nodes:
                window_end = window.end if window.end is not None else float("inf")
                if start < window_end and end > window.start:
                    return False
        return True

    def finish(self, now: float) -> ChaosReport:
        """Close the run: pending measurements, the probe verdict, the report."""
        if self._pending is not None:
            self.unconverged.append(self._pending.label)
            self.note(now, f"(run ended before converging: {self._pending.label})")
            self._finish_window(now)
            self._pending = None
        judged = failed = unjudged = unjudged_failed = 0
        samples: list[ProbeResult] = []
        for result in self._probes:
            if self.healthy(result.src, result.dst, result.sent, result.deadline):
                judged += 1
                if not result.ok:
                    failed += 1
                    if len(samples) < self._max_samples:
                        samples.append(result)
            else:
                unjudged += 1
                unjudged_failed += not result.ok
        self.counts["5:probe_success"] += 1
        if judged and failed / judged > 1 - PROBE_SUCCESS_GOAL:
            self._violate(now, "5:probe_success", f"{failed} of {judged} probes between "
                          f"healthy pods failed ({(1 - failed / judged) * 100:.3f} % success, "
                          f"goal {PROBE_SUCCESS_GOAL * 100:g} %)", {
                              "failed_probes": [
                                  f"{p.src}->{p.dst} sent at {p.sent - self.origin:.2f}s"
                                  for p in samples]})
        return ChaosReport(self.seed, self.origin, sorted(self.timeline, key=lambda e: e[0]),
                           list(self.violations), list(self.convergence),
                           list(self.unconverged), judged, failed, unjudged, unjudged_failed,
                           Counter(self.counts), samples)
