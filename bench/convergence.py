"""bench.convergence: how fast the kernel follows membership, at 5 and 20 nodes.

Two latencies, each over several trials in one sandbox per cluster size:

- **join -> routes everywhere**: from the moment a new node's agent has joined the gossip
  cluster (its log line "joined the cluster through ...") until every node holds a route to
  the new node's block *and* the new node holds a route to every other block. The new node
  claims its block through the IPAM quorum in between, so this is gossip + IPAM + reconcile.
  Launch (process start) to routes everywhere is reported too.
- **death declared -> routes removed**: from the first survivor's "member X: failed" (gossip
  declared the SIGKILLed node dead) until the last survivor's kernel deleted the route to its
  block. The agents run with `--route-grace 0` for this: with the default grace a failed
  node keeps its routes while it owns its block (docs/architecture.md), and the same removal
  path runs when the grace ends or the block is reclaimed.

Timestamps come from the agents' logs and from `ip -ts monitor route` running in every node
(kernel notifications, microsecond stamps), both wall-clock on this one machine; polling
plays no part in the numbers. After each trial the dead node is removed with `rmpeer`, and its
state is wiped so that the next trial is a fresh join. Goals (issue 4): 2 s and 1 s medians.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shutil
import time
from collections.abc import Sequence
from typing import Any

from bench.common import no_anchor, summary, table, tail, tail_label
from weavepy.devtools.agentbox import AgentBox
from weavepy.devtools.sandbox import ManagedProcess, Sandbox, SandboxNode

LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
MONITOR_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)\]\s*(Deleted )?(\S+)")
JOIN_GOAL, DEATH_GOAL = 2.0, 1.0


def _log_time(line: str) -> float | None:
    match = LOG_TIME.match(line)
    if not match:
        return None
    return datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _first_log(text: str, needle: str, after: float) -> float | None:
    for line in text.splitlines():
        if needle in line:
            stamp = _log_time(line)
            if stamp is not None and stamp >= after:
                return stamp
    return None


def _route_events(monitor: ManagedProcess, block: str, deleted: bool, after: float
                  ) -> list[float]:
    found = []
    for line in monitor.log_text().splitlines():
        match = MONITOR_TIME.match(line)
        if not match or match.group(3) != block or bool(match.group(2)) != deleted:
            continue
        stamp = datetime.datetime.fromisoformat(match.group(1)).timestamp()
        if stamp >= after:
            found.append(stamp)
    return found


def _wait(what: str, probe: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"gave up waiting for {what}")


def _measure(size: int, trials: int) -> dict[str, list[float]]:
    box = Sandbox.create(nodes=size)
    results: dict[str, list[float]] = {"join": [], "launch": [], "death": []}
    try:
        rig = AgentBox(box, pod_range=str(box.pod_range), extra_args=("--route-grace", "0"))
        members, newcomer = box.nodes[:-1], box.nodes[-1]
        rig.launch(members[0])
        rig.wait_api(members[0])
        for batch in range(1, len(members), 4):  # a few at a time: 2 cores
            for node in members[batch:batch + 4]:
                rig.launch(node, [members[0]])
            for node in members[batch:batch + 4]:
                rig.wait_api(node, timeout=60)
        rig.wait_mesh(members, timeout=120)
        monitors = {n.name: n.start("monitor", ["ip", "-ts", "monitor", "route"])
                    for n in box.nodes}
        time.sleep(0.5)
        for trial in range(trials):
            peer = members[trial % len(members)]
            launched = time.time()
            rig.launch(newcomer, [peer])
            blocks = rig.wait_mesh(box.nodes, timeout=60)
            mine = blocks[newcomer.name][0]
            others = [b for name, owned in blocks.items() if name != newcomer.name
                      for b in owned]
            joined = _first_log(rig.log(newcomer), "joined the cluster through", launched)
            adds = [max(_route_events(monitors[n.name], mine, False, launched) or [0])
                    for n in members]
            adds += [max(_route_events(monitors[newcomer.name], b, False, launched) or [0])
                     for b in others]
            done = max(adds)
            if joined is not None and all(adds):
                results["join"].append(done - joined)
                results["launch"].append(done - launched)
            time.sleep(1.0)  # let gossip settle before the kill

            killed = time.time()
            rig.kill(newcomer)
            _wait("routes to the dead node to go", lambda m=mine: all(
                m not in rig.dataplane(n).routes for n in members), 60)
            time.sleep(0.3)
            declared = [t for n in members if (t := _first_log(
                rig.log(n), f"member {newcomer.name}: failed", killed)) is not None]
            removed = [max(_route_events(monitors[n.name], mine, True, killed) or [0])
                       for n in members]
            if declared and all(removed):
                results["death"].append(max(removed) - min(declared))
            answer = rig.api(members[0], "DELETE", f"/peer/{newcomer.name}")
            if answer is None or answer[0] != 200:
                raise RuntimeError(f"rmpeer {newcomer.name} failed: {answer}")
            shutil.rmtree(rig.state_dir(newcomer), ignore_errors=True)
            shutil.rmtree(rig.run_dir(newcomer), ignore_errors=True)
            _reset_kernel(newcomer)
    finally:
        box.destroy()
    return results


def _reset_kernel(node: SandboxNode) -> None:
    for link in ("weavepy.1", "weavepy0"):
        node.run(["ip", "link", "del", link], check=False)


def run(args: Sequence[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench convergence")
    parser.add_argument("--sizes", default="5,20", help="cluster sizes (after the join)")
    parser.add_argument("--trials", type=int, default=5)
    options = parser.parse_args(list(args))
    rows: list[list[object]] = []
    for size in (int(s) for s in options.sizes.split(",")):
        results = _measure(size, options.trials)
        for key, label, goal in (("join", "join -> routes everywhere", JOIN_GOAL),
                                 ("launch", "launch -> routes everywhere", None),
                                 ("death", "death declared -> routes removed", DEATH_GOAL)):
            stats = summary(results[key])
            verdict = "" if goal is None else (
                f"{goal:.0f} s ({'met' if stats['median'] <= goal else 'MISSED'}, "
                f"{stats['median'] / goal:.2f}x)")
            tail_text = (f"{tail(results[key]):.3f}" if tail_label(int(stats["n"])) == "p99"
                         else "n/a (n < 100: see max)")
            rows.append([size, label, stats["n"], f"{stats['median']:.3f}", tail_text,
                         f"{stats['min']:.3f}", f"{stats['max']:.3f}", verdict or "-"])
    header = ["nodes", "latency", "trials", "median s", "p99 s", "min s", "max s", "goal"]
    notes = ("Gossip profile LAN (probe 1 s). Death is *declared* by SWIM (suspicion "
             "timeout, about 5 s at these sizes) before this clock starts; join includes the "
             "IPAM quorum decisions (join, claim). Timestamps: agent logs (ms) and "
             "`ip -ts monitor route` (kernel notifications) in every node.")
    anchor = no_anchor("No other network runs beside weavepy here: flannel or Weave Net would "
                       "need their own control planes (etcd or the Kubernetes API) to converge, "
                       "and none runs on this machine; the goals (issue 4) are absolute.")
    return f"{anchor}\n\n{table(header, rows)}\n\n{notes}\n"
