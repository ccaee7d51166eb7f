"""The chaos soak: `weavepy chaos --profile soak` for 30 minutes (or `--duration`), as a benchmark.

It runs random faults (kills, node loss, partitions, impairments, stalls) against a sandboxed
cluster with pods and probes, and reports the verdict of the live invariant checker, the
convergence-time distribution and the probe success rate. The seed is printed so any run can
be replayed with `weavepy chaos --profile soak --seed N`.
"""

from __future__ import annotations

import argparse
import json
import secrets
from collections import Counter
from collections.abc import Sequence

from bench.common import no_anchor, summary, table, tail_label
from weavepy.devtools.chaos.runner import RunOptions, run_chaos
from weavepy.devtools.chaos.schedule import SOAK_DURATION, generate


def run(args: Sequence[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench chaos_soak")
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--duration", type=float, default=SOAK_DURATION,
                        help="seconds of faults to schedule (default 1800)")
    parser.add_argument("--convergence-bound", type=float, default=30.0)
    options = parser.parse_args(list(args))
    seed = options.seed if options.seed is not None else secrets.randbelow(10**9)
    schedule = generate(seed, options.nodes, "soak", options.duration,
                        options.convergence_bound)
    report = run_chaos(schedule, RunOptions(echo=lambda line: print(line, flush=True)))
    doc = report.to_json()
    kinds = Counter(f.kind for f in schedule.faults)
    stats = summary([seconds for _, seconds in report.convergence])
    span = report.timeline[-1][0] - report.origin if report.timeline else 0.0
    rows = [
        ["verdict", "PASS (zero violations)" if report.ok
         else f"FAIL ({len(report.violations)} violations)"],
        ["seed", str(seed)],
        ["nodes", str(options.nodes)],
        ["faults", f"{len(schedule.faults)} ("
         + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + ")"],
        ["run length", f"{span / 60:.1f} min of faults and checks"
         + ("" if options.duration >= SOAK_DURATION else
            f" (SHORTER than the 30-minute soak: --duration {options.duration:g})")],
        [f"convergence s (n / min / median / {tail_label(int(stats['n']))} / max)"
         if stats["n"] >= 100 else "convergence s (n / min / median / max)",
         f"{stats['n']} / {stats['min']:.2f} / {stats['median']:.2f} / "
         + (f"{stats['p99']:.2f} / " if stats["n"] >= 100 else "") + f"{stats['max']:.2f}"],
        ["superseded before converging", str(len(report.unconverged))],
        ["probes between healthy pods", f"{report.probes_judged} judged, "
         f"{report.probes_failed_judged} failed"
         + (f" ({report.probe_success * 100:.3f} %)" if report.probe_success is not None
            else "")],
        ["probes not judged (fault windows)", f"{report.probes_unjudged} "
         f"({report.probes_failed_unjudged} failed)"],
        ["checks run", ", ".join(f"{k} x{v}" for k, v in sorted(doc["checks"].items()))],
    ]
    out = no_anchor("The soak checks weavepy's invariants under faults; no other system runs "
                    "the same schedule.") + "\n\n" + table(["", "value"], rows)
    if report.violations:
        shown = report.violations[:20]
        out += "\n\nViolations (time since start, invariant, message, evidence):\n\n" + "\n".join(
            f"- t={v.at - report.origin:.1f}s [{v.invariant}] {v.message}\n  evidence: "
            f"`{json.dumps(v.evidence, default=str)[:1500]}`" for v in shown)
        if len(report.violations) > len(shown):
            out += f"\n- ... and {len(report.violations) - len(shown)} more"
        out += "\n\nFaults (replay with the seed above):\n\n" + "\n".join(
            f"- t={t - report.origin:.1f}s {event}" for t, event in report.timeline
            if event.startswith(("start:", "end:")))
    out += ("\n\nConvergence: a ground-truth change (fault applied or undone) until every live "
            "node's routes, neighbours and FDB match the live membership (polled every 0.5 s, "
            "so times are +-0.5 s). Changes superseded by the next fault before converging "
            "(e.g. a partition shorter than the minority's suspicion timeout) are counted "
            "separately. Healthy probes: see weavepy/devtools/chaos/checker.py.\n")
    return out
