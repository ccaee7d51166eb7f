"""Failure detection time: weavepy's gossip agent against serf, same profile, same machine.

`python -m bench gossip_detect [--trials 5] [--nodes 5] [--profile lan] [--settle 5]`

Each trial starts a fresh cluster of `--nodes` agents on 127.0.0.1 (node 0 first, the others
join it), waits until every agent has seen every join, lets it settle, SIGKILLs one random
member other than node 0 by its PID, and times how long until the first survivor, and then every
survivor, declares it failed. weavepy agents (`python -m gossip agent`) report that as a `failed`
JSON line on stdout (read by one thread per agent); serf agents as `serf: EventMemberFailed` in
their log files, all polled together every 10 ms. Both clocks start at the kill. The first local
suspicion is the earliest `suspect` event (weavepy) or `Suspect X has failed` line (serf).
Every process is stopped by its PID at the end of a trial.

The research baseline on this machine kind (serf, 5 agents, LAN): first detection 5.42 / 5.94 /
8.85 s (min / median / max). Goal: weavepy's median no worse than serf's, measured here.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import anchor_version, ratio_interval, summary, table

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.gossip.agentproc import AgentProcess  # noqa: E402
from tests.gossip.serf import SerfAgent, serf_binary  # noqa: E402

CONVERGE_TIMEOUT = 60.0
DETECT_TIMEOUT = 60.0
# Earlier recorded ratios of medians weavepy / serf (first detection), to judge against this
# run's spread: bench/RESULTS.md of 2026-11-21 (7 trials) and issue 16 (2026-12-07, 5 trials).
EARLIER_RATIOS = {"2026-11-21": 0.91, "2026-12-07": 1.04}


@dataclass(frozen=True, slots=True)
class Trial:
    system: str
    victim: str
    suspected: float  # seconds from SIGKILL to the first survivor's local probe failure
    first: float  # seconds from SIGKILL to the first survivor's verdict
    all_agree: float  # ... to the last survivor's verdict


def parse(args: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench gossip_detect")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--profile", choices=["lan", "wan", "local"], default="lan")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds between convergence "
                        "and the kill")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--systems", default="weavepy,serf")
    return parser.parse_args(list(args))


def weavepy_trial(opts: argparse.Namespace, log_dir: Path, rng: random.Random) -> Trial:
    agents: list[AgentProcess] = []
    try:
        seed = AgentProcess("w0", log_dir, profile=opts.profile, log_level="warning")
        agents.append(seed)
        seed.wait_started()
        for i in range(1, opts.nodes):
            agents.append(
                AgentProcess(f"w{i}", log_dir, join=[seed.address], profile=opts.profile,
                             log_level="warning")
            )
        for agent in agents[1:]:
            agent.wait_started(CONVERGE_TIMEOUT)
        names = [agent.name for agent in agents]
        for agent in agents:
            for name in names:
                agent.wait_event(["join"], name, CONVERGE_TIMEOUT)
        time.sleep(opts.settle)
        victim = agents[rng.randrange(1, len(agents))]
        killed_at = time.monotonic()
        victim.kill()
        survivors = [agent for agent in agents if agent is not victim]
        verdicts = [
            agent.wait_event(["failed"], victim.name, DETECT_TIMEOUT, after=killed_at).received
            - killed_at
            for agent in survivors
        ]
        # The earliest `suspect` anywhere can only come from a probe that failed locally.
        suspected = min(
            event.received
            for agent in survivors
            for event in agent.events
            if event.event == "suspect" and event.name == victim.name
            and event.received >= killed_at
        ) - killed_at
        return Trial("weavepy", victim.name, suspected, min(verdicts), max(verdicts))
    finally:
        for agent in agents:
            agent.kill()
            agent.stop()


def serf_trial(opts: argparse.Namespace, log_dir: Path, rng: random.Random) -> Trial:
    agents: list[SerfAgent] = []
    try:
        seed = SerfAgent("s0", log_dir, profile=opts.profile, log_level="info")
        agents.append(seed)
        seed.wait_ready()
        for i in range(1, opts.nodes):
            agents.append(
                SerfAgent(f"s{i}", log_dir, join=[seed.address], profile=opts.profile,
                          log_level="info")
            )
        for agent in agents[1:]:
            agent.wait_ready(CONVERGE_TIMEOUT)
        names = [agent.name for agent in agents]
        for agent in agents:
            for name in names:
                agent.wait_log(rf"EventMemberJoin: {name} ", CONVERGE_TIMEOUT)
        time.sleep(opts.settle)
        victim = agents[rng.randrange(1, len(agents))]
        survivors = [agent for agent in agents if agent is not victim]
        for agent in survivors:
            agent.poll_log()  # everything before the kill is old news
        killed_at = time.monotonic()
        victim.kill()
        verdicts = watch_logs(survivors, rf"EventMemberFailed: {victim.name} ", killed_at)
        suspected = min(
            seen
            for agent in survivors
            for seen, line in agent.log_lines
            if seen >= killed_at and f"Suspect {victim.name} has failed" in line
        ) - killed_at
        return Trial("serf", victim.name, suspected, min(verdicts), max(verdicts))
    finally:
        for agent in agents:
            agent.kill()
            agent.stop()


def watch_logs(agents: Sequence[SerfAgent], pattern: str, since: float) -> list[float]:
    """Poll every agent's log together (so no line is stamped late because we were busy with
    another agent) until each has a line matching `pattern`; return the seconds since `since`."""
    regex = re.compile(pattern)
    found: dict[str, float] = {}
    deadline = time.monotonic() + DETECT_TIMEOUT
    while len(found) < len(agents):
        if time.monotonic() > deadline:
            missing = sorted({a.name for a in agents} - set(found))
            raise TimeoutError(f"no line matching {pattern!r} from {missing}")
        for agent in agents:
            for seen, line in agent.poll_log():
                if agent.name not in found and regex.search(line):
                    found[agent.name] = seen - since
        time.sleep(0.01)
    return [found[agent.name] for agent in agents]


def run(args: Sequence[str]) -> str:
    opts = parse(args)
    systems = [s for s in opts.systems.split(",") if s]
    if "serf" in systems and serf_binary() is None:
        raise SystemExit("serf is not installed (apt-get install serf)")
    rng = random.Random(opts.seed)
    trials: list[Trial] = []
    with tempfile.TemporaryDirectory(prefix="gossip-detect-") as tmp:
        log_dir = Path(tmp)
        # Alternate the systems so that a noisy minute on the machine hurts both alike.
        for _ in range(opts.trials):
            for system in systems:
                run_trial = weavepy_trial if system == "weavepy" else serf_trial
                trials.append(run_trial(opts, log_dir, rng))
    return report(opts, systems, trials)


def report(opts: argparse.Namespace, systems: Sequence[str], trials: Sequence[Trial]) -> str:
    def fmt(values: Sequence[float]) -> str:
        s = summary(values)
        return f"{s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f}"

    rows = []
    medians: dict[str, tuple[float, float]] = {}
    for system in systems:
        mine = [t for t in trials if t.system == system]
        firsts = [t.first for t in mine]
        alls = [t.all_agree for t in mine]
        medians[system] = (statistics.median(firsts), statistics.median(alls))
        rows.append([system, len(mine), fmt([t.suspected for t in mine]), fmt(firsts),
                     fmt(alls)])
    lines = [
        f"Failure detection after SIGKILL, {opts.nodes} agents on 127.0.0.1, "
        f"profile `{opts.profile}`, {opts.settle:g} s settle; seconds, min / median / max. "
        "weavepy is the gossip library's agent (`python -m gossip agent`): detection is its "
        "job alone in the full agent too.",
        anchor_version("Anchor serf", ["serf", "version"], "serf") + ".",
        "",
        table(["system", "trials", "first local suspicion", "first survivor declares failed",
               "all survivors agree"], rows),
    ]
    if "weavepy" in medians and "serf" in medians:
        w, s = medians["weavepy"], medians["serf"]
        ours = [t for t in trials if t.system == "weavepy"]
        theirs = [t for t in trials if t.system == "serf"]
        first = ratio_interval([t.first for t in ours], [t.first for t in theirs])
        agree = ratio_interval([t.all_agree for t in ours], [t.all_agree for t in theirs])
        paired = [a.first / b.first for a, b in zip(ours, theirs, strict=False) if b.first > 0]
        verdict = "met" if w[0] <= s[0] else "NOT met"
        inside = [f"{day} {ratio:.2f}" for day, ratio in EARLIER_RATIOS.items()
                  if first[0] <= ratio <= first[1]]
        outside = [f"{day} {ratio:.2f}" for day, ratio in EARLIER_RATIOS.items()
                   if not first[0] <= ratio <= first[1]]
        if not outside:
            judgement = (f"the earlier ratios ({', '.join(inside)}) both lie inside it: their "
                         "difference is within noise")
        else:
            judgement = (f"earlier ratios outside it ({', '.join(outside)}) are not explained "
                         "by this run's noise alone" + (f"; inside it: {', '.join(inside)}"
                                                        if inside else ""))
        lines += [
            "",
            f"Ratio of medians weavepy / serf: first detection **{w[0] / s[0]:.2f}** (90 % "
            f"bootstrap interval {first[0]:.2f}-{first[1]:.2f}; per-trial pairs "
            f"{min(paired):.2f}-{max(paired):.2f}), all agree **{w[1] / s[1]:.2f}** "
            f"({agree[0]:.2f}-{agree[1]:.2f}). Goal (weavepy median no worse than serf's): "
            f"{verdict}. Spread: with {len(ours)} trials a side, {judgement}.",
        ]
    lines += [
        "",
        table(
            ["trial", "system", "victim", "suspected (s)", "first (s)", "all agree (s)"],
            [
                [i // len(systems) + 1, t.system, t.victim, f"{t.suspected:.2f}",
                 f"{t.first:.2f}", f"{t.all_agree:.2f}"]
                for i, t in enumerate(trials)
            ],
        ),
    ]
    return "\n".join(lines)
