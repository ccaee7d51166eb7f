"""The whole NetworkPolicy conformance matrix on real packets: every case of
weavepy/devtools/policy_conformance.py (21 families) on the VXLAN path and on the encrypted
path, through real agents enforcing a policy directory, pods attached by the CNI plugin.

`python -m bench policy_conformance [--path vxlan|encrypted|both] [--cases NAME,...]
[--control]`

For each path: three sandbox nodes (`weavepy launch --policy-dir`, plus `--encrypt` on the
encrypted path), nine pods, then every case in turn (weavepy/devtools/policy_cluster.py:
reset, apply each step through the files, settle, probe the whole matrix). The report gives
each case's verdict and time per path, the failures' diffs, the outcomes the spec leaves open
(connections held across a tightening), and how long the matrix took. `--control` runs the
same matrix against agents launched without `--policy-dir`: every case that expects a denial
must fail there, which shows the matrix can fail.
"""

from __future__ import annotations

import argparse
import time

from bench.common import median_spread, no_anchor, table
from weavepy.devtools.policy_cluster import PATHS, CaseResult, policy_cluster
from weavepy.devtools.policy_conformance import CASES, FAMILIES, Case

DIFF_LINES = 40


def run_path(path: str, cases: list[Case], enforce: bool) -> tuple[list[CaseResult], float,
                                                                   float]:
    """Every case on one path: the results, the set-up time and the cases' time."""
    started = time.monotonic()
    results = []
    with policy_cluster(path, enforce=enforce) as cluster:
        ready = time.monotonic()
        for case in cases:
            results.append(cluster.run_case(case))
    return results, ready - started, time.monotonic() - ready


def denies(case: Case) -> bool:
    return any(p.expected is not None and p.on_kernel and not all(
        p.expected.table(["x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c"]
                         ).values()) for s in case.steps for p in s.probes)


def run(args: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench policy_conformance")
    parser.add_argument("--path", choices=[*PATHS, "both"], default="both")
    parser.add_argument("--cases", default="", help="comma-separated case names (all)")
    parser.add_argument("--control", action="store_true",
                        help="agents without --policy-dir: cases with a denial must fail")
    opts = parser.parse_args(args)
    wanted = {n for n in opts.cases.split(",") if n}
    unknown = wanted - {c.name for c in CASES}
    if unknown:
        parser.error(f"no such case: {', '.join(sorted(unknown))}")
    cases = [c for c in CASES if not wanted or c.name in wanted]
    paths = list(PATHS) if opts.path == "both" else [opts.path]
    by_path: dict[str, list[CaseResult]] = {}
    timing: dict[str, tuple[float, float]] = {}
    for path in paths:
        results, setup, spent = run_path(path, cases, not opts.control)
        by_path[path] = results
        timing[path] = (setup, spent)

    lines = [no_anchor("No other NetworkPolicy implementation runs on these sandbox nodes "
                       "without Kubernetes; the reference is each case's truth table, "
                       "written by hand from the spec and checked against weavepy's "
                       "reference evaluator and compiled tables (tests/policy/"
                       "test_conformance_cases.py). A conformance matrix has no ratio to "
                       "an anchor: the figure is cases passed of cases run."), ""]
    if opts.control:
        lines += ["**Control run**: agents without `--policy-dir` (nothing enforced); every "
                  "case expecting a denial should FAIL.", ""]
    rows = []
    for index, case in enumerate(cases):
        row: list[object] = [case.family, case.name]
        for path in paths:
            result = by_path[path][index]
            row.append(f"{'ok' if result.ok else 'FAIL'} ({result.seconds:.1f} s)")
        rows.append(row)
    lines += [table(["family", "case", *paths], rows), ""]
    summary_rows = []
    for path in paths:
        results = by_path[path]
        passed = sum(r.ok for r in results)
        families_ok = {r.case.family for r in results if r.ok}
        families_run = {r.case.family for r in results}
        expected_failures = sum(1 for r in results if denies(r.case))
        summary_rows.append([
            path, f"{passed}/{len(results)}",
            f"{len(families_ok & families_run)}/{len(families_run)}",
            f"{sum(not r.ok for r in results if denies(r.case))}/{expected_failures}"
            if opts.control else "-",
            median_spread([r.seconds for r in results]),
            f"{timing[path][0]:.0f}", f"{timing[path][1]:.0f}"])
    lines += [table(["path", "cases passed", "families all passed",
                     "control: denying cases that failed", "s per case", "set-up s",
                     "matrix s"], summary_rows), ""]
    lines.append(f"Families ({len(FAMILIES)}): " + "; ".join(
        f"{n}. {text}" for n, text in sorted(FAMILIES.items())) + ".")
    lines.append("")
    lines.append("SCTP probes are checked as rules only (this kernel has no SCTP).")
    for path in paths:
        for result in by_path[path]:
            for probe in result.probes:
                if probe.probe.over_established:
                    seen = sorted(set(probe.seen.values()))
                    cut = sum(1 for v in probe.seen.values() if v != "ok")
                    lines.append(f"- {path} {result.case.name}, {probe.label}: "
                                 f"{len(probe.seen) - cut} of {len(probe.seen)} established "
                                 f"connections still answered after the tightening "
                                 f"(outcomes {seen}; the spec leaves this open).")
    failures = [r for path in paths for r in by_path[path] if not r.ok]
    if failures and not opts.control:
        lines += ["", "Failures:", "```"]
        for result in failures:
            lines += result.report().splitlines()[:DIFF_LINES]
        lines.append("```")
    return "\n".join(lines)
