"""The live checker, fed fabricated status snapshots and kernel views (no sandbox needed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from weavepy.devtools.chaos.checker import LiveChecker, NodeSnapshot, ProbeResult, Truth

UNDERLAY = {"n1": "198.18.0.11", "n2": "198.18.0.12", "n3": "198.18.0.13"}
BLOCKS = {"n1": "198.19.0.0/24", "n2": "198.19.1.0/24", "n3": "198.19.2.0/24"}
MACS = {"n1": "02:00:00:00:00:01", "n2": "02:00:00:00:00:02", "n3": "02:00:00:00:00:03"}


@dataclass(frozen=True)
class Kernel:
    routes: dict[str, str] = field(default_factory=dict)
    neighbours: dict[str, str] = field(default_factory=dict)
    fdb: dict[str, str] = field(default_factory=dict)


def status(node: str, owned: list[str] | None = None, held: list[str] | None = None
           ) -> dict[str, Any]:
    owned = owned if owned is not None else [BLOCKS[node]]
    return {"name": node, "cluster_id": "c1",
            "ipam": {"owned_blocks": owned, "held_blocks": held if held is not None else owned,
                     "state": "ready"},
            "dataplane": {"local_blocks": owned}}


def kernel_to(peers: list[str]) -> Kernel:
    k = Kernel()
    for peer in peers:
        gateway = BLOCKS[peer].split("/")[0]
        k.routes[BLOCKS[peer]] = gateway
        k.neighbours[gateway] = MACS[peer]
        k.fdb[MACS[peer]] = UNDERLAY[peer]
    return k


def mesh(nodes: list[str], **overrides: Any) -> list[NodeSnapshot]:
    snaps = []
    for node in nodes:
        st, kern = overrides.get(node, (status(node), kernel_to([p for p in nodes if p != node])))
        snaps.append(NodeSnapshot(node, st, kern))
    return snaps


def test_overlapping_ownership_is_a_violation_with_evidence() -> None:
    checker = LiveChecker(UNDERLAY, 10, 0.0, seed=5)
    checker.set_truth(0.0, Truth(), "up", UNDERLAY)
    snaps = mesh(["n1", "n2", "n3"], n3=(status("n3", ["198.19.1.0/25"]),
                                         kernel_to(["n1", "n2"])))
    checker.observe(1.0, snaps)
    checker.observe(1.5, snaps)  # the same overlap is reported once
    report = checker.finish(2.0)
    assert not report.ok
    overlaps = [v for v in report.violations if v.invariant == "1:no_overlap"]
    assert len(overlaps) == 1
    assert "n2" in overlaps[0].message and "n3" in overlaps[0].message
    assert overlaps[0].evidence["n3"] == ["198.19.1.0/25"]
    assert "VIOLATIONS" in report.to_text() and "seed 5" in report.to_text()


def test_a_converging_cluster_passes_and_reports_the_time() -> None:
    checker = LiveChecker(UNDERLAY, 10, 0.0)
    checker.set_truth(0.0, Truth(), "up", UNDERLAY)
    checker.observe(0.5, mesh(["n1", "n2", "n3"], n1=(status("n1"), kernel_to(["n2"]))))
    checker.observe(1.0, mesh(["n1", "n2", "n3"]))
    report = checker.finish(2.0)
    assert report.ok, report.to_text()
    assert report.convergence == [("up", 1.0)]


def test_kernel_state_that_never_follows_a_death_is_a_violation() -> None:
    checker = LiveChecker(UNDERLAY, 5, 0.0)
    checker.set_truth(0.0, Truth(), "up", UNDERLAY)
    checker.observe(0.5, mesh(["n1", "n2", "n3"]))
    checker.set_truth(1.0, Truth(down=frozenset({"n3"})), "kill n3", ["n3"])
    stale = mesh(["n1", "n2"], n1=(status("n1"), kernel_to(["n2", "n3"])))
    for t in (2.0, 4.0, 6.5):
        checker.observe(t, stale)
    report = checker.finish(7.0)
    violation = next(v for v in report.violations if v.invariant == "2:kernel_matches_membership")
    assert "kill n3" in violation.message
    assert violation.evidence["n1"] == ["extra route 198.19.2.0/24 via 198.19.2.0",
                                        "extra neighbour 198.19.2.0 -> 02:00:00:00:00:03",
                                        "extra FDB entry 02:00:00:00:00:03 -> 198.18.0.13"]


def test_a_wrong_fdb_destination_is_named() -> None:
    checker = LiveChecker(UNDERLAY, 5, 0.0)
    checker.set_truth(0.0, Truth(), "up", UNDERLAY)
    checker.observe(0.1, mesh(["n1", "n2", "n3"]))
    bad = kernel_to(["n2", "n3"])
    bad.fdb[MACS["n3"]] = UNDERLAY["n2"]
    problems = checker.kernel_difference("n1", bad)
    assert problems == [f"route 198.19.2.0/24: FDB for {MACS['n3']} points at 198.18.0.12, "
                        f"not n3's 198.18.0.13"]


def test_an_undefined_truth_is_not_judged_until_the_next_change() -> None:
    checker = LiveChecker(UNDERLAY, 2, 0.0)
    checker.set_truth(0.0, Truth(), "up", UNDERLAY)
    checker.observe(0.1, mesh(["n1", "n2", "n3"]))
    checker.set_truth(1.0, Truth(stalled=frozenset({"n2"}), defined=False), "stall n2", ["n2"])
    odd = mesh(["n1", "n3"], n1=(status("n1"), kernel_to(["n2"])))
    for t in (2.0, 5.0, 9.0):
        checker.observe(t, odd)
    checker.set_truth(10.0, Truth(), "resume n2", ["n2"])
    checker.observe(10.5, mesh(["n1", "n2", "n3"]))
    report = checker.finish(11.0)
    assert report.ok, report.to_text()


def test_restart_must_keep_blocks() -> None:
    checker = LiveChecker(UNDERLAY, 10, 0.0)
    checker.set_truth(0.0, Truth(), "up", UNDERLAY)
    checker.observe(0.1, mesh(["n1", "n2", "n3"]))
    checker.set_truth(1.0, Truth(down=frozenset({"n2"})), "kill n2", ["n2"])
    checker.set_truth(2.0, Truth(), "restart n2", ["n2"])
    checker.observe(2.5, mesh(["n1", "n2", "n3"], n2=(status("n2", ["198.19.7.0/24"]),
                                                      kernel_to(["n1", "n3"]))))
    checker.pod_address(0.2, "pod2", "198.19.1.2", "before")
    checker.pod_address(3.0, "pod2", "198.19.1.3", "after")
    report = checker.finish(4.0)
    kept = [v for v in report.violations if v.invariant == "3:restart_kept"]
    assert len(kept) == 2
    assert kept[0].evidence == {"before": ["198.19.1.0/24"], "after": ["198.19.7.0/24"]}
    assert "198.19.1.2" in kept[1].message


def test_a_minority_that_claims_is_a_violation() -> None:
    checker = LiveChecker(UNDERLAY, 30, 0.0)
    checker.set_truth(0.0, Truth(), "up", UNDERLAY)
    checker.observe(0.1, mesh(["n1", "n2", "n3"]))
    cut = frozenset({("n3", "n1"), ("n3", "n2"), ("n1", "n3"), ("n2", "n3")})
    checker.set_truth(1.0, Truth(blocked=cut, minority=frozenset({"n3"})), "partition n3", ["n3"])
    grabbed = status("n3", ["198.19.2.0/24", "198.19.9.0/24"])
    checker.observe(2.0, mesh(["n1", "n2", "n3"], n3=(grabbed, kernel_to([]))))
    report = checker.finish(3.0)
    assert [v.invariant for v in report.violations] == ["4:minority_never_claims"]
    assert "198.19.9.0/24" in report.violations[0].message


def test_probes_are_judged_only_between_healthy_pods() -> None:
    checker = LiveChecker(UNDERLAY, 10, 0.0, grace=1.0)
    checker.set_truth(0.0, Truth(), "up", UNDERLAY)
    checker.observe(1.0, mesh(["n1", "n2", "n3"]))  # converged at 1.0, window ends at 2.0
    checker.set_truth(5.0, Truth(down=frozenset({"n3"})), "kill n3", ["n3"])
    checker.observe(6.0, mesh(["n1", "n2"]))  # converged at 6.0: n3's window ends at 7.0
    for t in range(2, 10):
        checker.probe(ProbeResult("n1", "n2", t + 0.1, t + 1.1, True))  # n1-n2: always judged
        checker.probe(ProbeResult("n1", "n3", t + 0.1, t + 1.1, t < 4))  # n3 dies at 5
    checker.probe(ProbeResult("n1", "n2", 0.5, 1.5, False))  # inside the start-up window
    report = checker.finish(10.0)
    assert report.ok, report.to_text()
    assert report.probes_judged == 8 + 2  # n1-n2 from 2 s on; n1-n3 at 2.1 and 3.1
    assert report.probes_unjudged == 7
    checker.probe(ProbeResult("n1", "n2", 8.1, 9.1, False))
    assert not checker.finish(10.0).ok  # 1 of 11 failed: far below 99.9 %


def test_an_isolated_minority_may_keep_extra_routes_until_the_isolated_bound() -> None:
    """Lifeguard slows a cut-off node's own probing: its stale routes to the majority get the
    isolated bound; the majority's stale route to it, and anything missing, get the bound."""
    cut = frozenset({("n3", "n1"), ("n3", "n2"), ("n1", "n3"), ("n2", "n3")})
    partitioned = Truth(blocked=cut, minority=frozenset({"n3"}))
    lagging = mesh(["n1", "n2", "n3"], n1=(status("n1"), kernel_to(["n2"])),
                   n2=(status("n2"), kernel_to(["n1"])), n3=(status("n3"), kernel_to(["n1"])))

    checker = LiveChecker(UNDERLAY, 5, 0.0, isolated_bound=20)
    checker.set_truth(0.0, Truth(), "up", UNDERLAY)
    checker.observe(0.1, mesh(["n1", "n2", "n3"]))
    checker.set_truth(1.0, partitioned, "partition n3", ["n3"])
    for t in (2.0, 7.0, 15.0):  # past the bound, within the isolated bound: still measuring
        checker.observe(t, lagging)
    assert not checker.violations and checker.settling
    checker.observe(22.0, lagging)  # past the isolated bound: a violation after all
    violation = checker.finish(23.0).violations[0]
    assert violation.invariant == "2:kernel_matches_membership"
    assert violation.evidence["n3"][0] == "extra route 198.19.0.0/24 via 198.19.0.0"

    checker = LiveChecker(UNDERLAY, 5, 0.0, isolated_bound=20)
    checker.set_truth(0.0, Truth(), "up", UNDERLAY)
    checker.observe(0.1, mesh(["n1", "n2", "n3"]))
    checker.set_truth(1.0, partitioned, "partition n3", ["n3"])
    majority_stale = mesh(["n1", "n2", "n3"], n2=(status("n2"), kernel_to(["n1"])),
                          n3=(status("n3"), kernel_to([])))  # n1 still routes to n3
    for t in (2.0, 7.0):
        checker.observe(t, majority_stale)
    assert [v.evidence for v in checker.violations] == [
        {"n1": ["extra route 198.19.2.0/24 via 198.19.2.0",
                "extra neighbour 198.19.2.0 -> 02:00:00:00:00:03",
                "extra FDB entry 02:00:00:00:00:03 -> 198.18.0.13"]}]


def test_with_a_route_grace_a_dead_nodes_routes_may_stay_until_the_grace_ends() -> None:
    """Routes follow block ownership (--route-grace): a killed node's entries may stay at its
    peers (or go) for the grace plus the bound; past that they are extra, and a violation."""
    checker = LiveChecker(UNDERLAY, 5, 0.0, route_grace=30)
    checker.set_truth(0.0, Truth(), "up", UNDERLAY)
    checker.observe(0.5, mesh(["n1", "n2", "n3"]))
    checker.set_truth(1.0, Truth(down=frozenset({"n3"})), "kill n3", ["n3"])
    kept = mesh(["n1", "n2"], n1=(status("n1"), kernel_to(["n2", "n3"])),
                n2=(status("n2"), kernel_to(["n1", "n3"])))
    checker.observe(2.0, kept)
    assert checker.kernel_difference("n1", kernel_to(["n2"]), 2.0) == []  # gone is fine too
    wrong = kernel_to(["n2", "n3"])
    wrong.fdb[MACS["n3"]] = UNDERLAY["n2"]
    assert checker.kernel_difference("n1", wrong, 2.0) == [
        f"route 198.19.2.0/24: FDB for {MACS['n3']} points at 198.18.0.12, not n3's "
        f"198.18.0.13"]
    for t in (10.0, 30.0, 35.5):
        checker.observe(t, kept)
    assert checker.finish(35.9).ok
    for t in (36.5, 38.0, 42.0):  # the grace (30 s) and the bound (5 s) are over
        checker.observe(t, kept)
    report = checker.finish(42.5)
    violation = next(v for v in report.violations if v.invariant == "2:kernel_matches_membership")
    assert "extra route 198.19.2.0/24 via 198.19.2.0" in violation.evidence["n1"]
