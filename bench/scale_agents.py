"""Scale: 100 real agents in one sandbox for 10 minutes - CPU and RSS per agent, datagrams per
member, false positives.

One kernel holds every node here, and its IPv4 neighbour table is shared by all namespaces and
capped by the root namespace's gc_thresh3 (1024 by default) for entries the kernel resolves
itself. Every agent talks to every other over the underlay, so N agents would resolve N*(N-1)
underlay addresses by ARP (9,900 for 100): an earlier run stalled at 41 agents with ENOBUFS.
The sandbox therefore pins each node's underlay neighbours as permanent entries (as a cloud's
virtual network answers ARP without asking), which do not count against the cap; the agents'
own VTEP entries are permanent already.

One disk holds every node's state here, too. Each agent saves its IPAM state durably (write,
fsync, rename, fsync of the directory) after every decided slot, as it must before it answers,
so a join wave of N agents makes at least 2N^2 fsyncs on the one disk that N hosts would
spread over N disks. The agents' state and run directories are therefore on tmpfs
(`/dev/shm`), where fsync costs nothing: the CPU of every save is still paid, the disk's
latency is not.

`python -m bench scale_agents [--agents 100] [--duration 600] [--settle 30] [--sample 60]
[--batch 4] [--profile lan]`

`--agents` full agents (`weavepy launch`, encrypted gossip, profile lan) run in the nodes of one
sandbox (one network namespace per node on the sandbox's underlay bridge). The first founds the
cluster; the others join it a few at a time (their start-up is CPU-bound), each batch once the
last one's agents hold a block (all at once, 100 agents' claims contend on 2 cores) and the
machine's CPU was at most 60 % busy over 5 s (waiting at most 2 min). Once every
agent holds a block and a route to every other agent's block, and after `--settle` seconds, the
cluster is watched for `--duration` seconds: CPU per agent (utime + stime from /proc) over the
whole window and per `--sample` window, RSS at the start and the end, UDP datagrams in and out
of every node's namespace, and each agent's cumulative gossip counters (suspicions raised,
probe failures) from its API. Nobody is killed or impaired, so every suspicion and every peer
not alive at the end is a false positive.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import no_anchor, table
from bench.gossip_idle import rss_mib, watch_cpu
from weavepy.devtools.agentbox import AgentBox
from weavepy.devtools.sandbox import Sandbox, SandboxNode

CPU_BUSY_CEILING, CPU_SAMPLE, CPU_WAIT_MAX = 0.6, 5.0, 120.0  # before a batch: busy share
#                                                             over a sample (s); bound (s)
TMPFS = "/dev/shm"  # the agents' state directories (see the module docstring)
MESH_POLL = 5.0  # seconds between checks of the full mesh (two calls into every node each)


def udp_counters(pid: int) -> tuple[int, int]:
    """(InDatagrams, OutDatagrams) of the network namespace `pid` lives in."""
    lines = [line.split() for line in Path(f"/proc/{pid}/net/snmp").read_text().splitlines()
             if line.startswith("Udp:")]
    header, values = lines[0], lines[1]
    return int(values[header.index("InDatagrams")]), int(values[header.index("OutDatagrams")])


def _gossip_view(rig: AgentBox, nodes: Sequence[SandboxNode]) -> dict[str, dict[str, int]]:
    """Per node: suspicions, probe failures (cumulative) and peers it sees alive."""
    found: dict[str, dict[str, int]] = {}
    for node in nodes:
        doc: dict[str, Any] | None = rig.status(node)
        if doc is None:
            continue
        found[node.name] = {
            "suspicions": int(doc["gossip"]["suspicions"]),
            "probe_failures": int(doc["gossip"]["probe_failures"]),
            "alive": sum(1 for peer in doc["peers"] if peer["state"] == "alive"),
        }
    return found


def _busy_fraction(seconds: float) -> float:
    """The machine's CPU busy fraction over the next `seconds` (/proc/stat, all cores)."""
    def times() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    total_a, idle_a = times()
    time.sleep(seconds)
    total_b, idle_b = times()
    return 1 - (idle_b - idle_a) / max(1, total_b - total_a)


def _wait_for_cpu() -> None:
    """Let the machine catch up before the next batch: every join costs every running agent
    work (IPAM decisions, routes), and on a machine where all agents share a few cores an
    unthrottled join phase starves them (an earlier run stalled at 69 agents). The CPU's busy
    share is what counts here: this VM's load average read 25 while its cores were 85 % idle."""
    deadline = time.monotonic() + CPU_WAIT_MAX
    while (busy := _busy_fraction(CPU_SAMPLE)) > CPU_BUSY_CEILING:
        if time.monotonic() > deadline:
            print(f"CPU still {busy:.0%} busy after {CPU_WAIT_MAX:.0f} s; launching",
                  file=sys.stderr, flush=True)
            return


def _spread(values: Sequence[float], digits: int) -> str:
    if not values:
        return "n/a"
    return (f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f} / "
            f"{max(values):.{digits}f}")


def run(args: Sequence[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench scale_agents")
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds watched")
    parser.add_argument("--settle", type=float, default=30.0)
    parser.add_argument("--sample", type=float, default=60.0, help="CPU sample window, s")
    parser.add_argument("--profile", choices=["lan", "wan", "local"], default="lan")
    parser.add_argument("--batch", type=int, default=4, help="agents launched at once")
    opts = parser.parse_args(list(args))
    if not 2 <= opts.agents <= 200:
        parser.error("--agents must be within 2..200 (one sandbox)")
    if opts.batch < 1:
        parser.error("--batch must be at least 1")
    if os.geteuid() != 0:
        raise SystemExit("scale_agents needs root (it builds a sandbox of network namespaces)")
    n = opts.agents
    box = Sandbox.create(nodes=n, static_neighbours=True)
    state_root = Path(tempfile.mkdtemp(prefix=f"weavepy-{box.prefix}-", dir=TMPFS))
    try:
        rig = AgentBox(box, pod_range=str(box.pod_range), profile=opts.profile,
                       log_level="warning", state_root=state_root)
        launched = time.monotonic()
        founder, others = box.nodes[0], box.nodes[1:]
        rig.launch(founder)
        rig.wait_api(founder, timeout=60)
        for batch in range(0, len(others), opts.batch):
            _wait_for_cpu()
            for node in others[batch:batch + opts.batch]:
                rig.launch(node, [founder])
            for node in others[batch:batch + opts.batch]:
                rig.wait_api(node, timeout=120)
            for node in others[batch:batch + opts.batch]:  # as operators join: a few at a time
                rig.wait(f"{node.name} to hold a block", partial(rig.blocks_of, [node]), 300)
        all_started = time.monotonic() - launched
        rig.wait(f"a block and routes everywhere in {n} nodes",
                 lambda: rig.mesh_complete(box.nodes), timeout=120 + 10 * n,
                 interval=MESH_POLL)
        meshed = time.monotonic() - launched
        time.sleep(opts.settle)

        pids = [rig.agents[node.name].pid for node in box.nodes]
        before = _gossip_view(rig, box.nodes)
        rss_start = [rss_mib(pid) for pid in pids]
        udp_start = [udp_counters(pid) for pid in pids]
        watched = watch_cpu(pids, opts.duration, opts.sample,
                            lambda: all(process.alive() for process in rig.agents.values()))
        cpu, windows, elapsed = watched.cpu, watched.windows, watched.elapsed
        running = [process.alive() for process in rig.agents.values()]
        live = [pid for pid, alive in zip(pids, running, strict=True) if alive]
        rss_end = [rss_mib(pid) for pid in live]
        udp_end = [udp_counters(pid) if alive else start
                   for pid, start, alive in zip(pids, udp_start, running, strict=True)]
        after = _gossip_view(rig, box.nodes)
    finally:
        box.destroy()
        shutil.rmtree(state_root, ignore_errors=True)

    udp_in = sum(e[0] - s[0] for s, e in zip(udp_start, udp_end, strict=True))
    udp_out = sum(e[1] - s[1] for s, e in zip(udp_start, udp_end, strict=True))
    suspicions = {name: after[name]["suspicions"] - before[name]["suspicions"]
                  for name in after if name in before}
    failures = {name: after[name]["probe_failures"] - before[name]["probe_failures"]
                for name in after if name in before}
    alive_seen = [view["alive"] for view in after.values()]
    rows = [
        ["agents", f"{n} (`weavepy launch`, profile {opts.profile}, encrypted gossip), one "
         f"sandbox node each, launched {opts.batch} at a time"],
        ["all started (API up) / a block and routes everywhere",
         f"{all_started:.0f} s / {meshed:.0f} s after the first launch"],
        ["window", f"{elapsed / 60:.1f} min after {opts.settle:g} s of settling"],
        ["CPU % of one core per agent (min / median / max)", _spread(cpu, 2)],
        ["total CPU % (all agents)", f"{sum(cpu):.1f}"],
        ["median CPU % per agent, per sample window (min / max)",
         f"{min(windows):.2f} / {max(windows):.2f}" if windows else "n/a"],
        ["RSS MiB per agent at start (min / median / max)", _spread(rss_start, 1)],
        ["RSS MiB per agent at end (min / median / max)", _spread(rss_end, 1)],
        ["UDP datagrams per member per s, in / out",
         f"{udp_in / n / elapsed:.2f} / {udp_out / n / elapsed:.2f}"],
        ["false positives: suspicions raised (sum / worst node)",
         f"{sum(suspicions.values())} / {max(suspicions.values(), default=0)}"],
        ["false positives: probe failures (sum / worst node)",
         f"{sum(failures.values())} / {max(failures.values(), default=0)}"],
        ["peers seen alive at the end, per node (min / max; all others = "
         f"{n - 1})", f"{min(alive_seen, default=0)} / {max(alive_seen, default=0)}"],
        ["agents running at the end", f"{sum(running)} of {n}"],
    ]
    return (no_anchor("serf's idle cost per member is measured beside the agent's in "
                      f"bench/gossip_idle.py; this run asks whether {n} full agents hold up on "
                      "one machine, with nothing to compare but 0 false positives.")
            + "\n\n" + table(["", "value"], rows)
            + "\n\nUDP counters are each node's own namespace (gossip, and IPAM over gossip; "
            "no pod traffic runs). Suspicions and probe failures are the agents' cumulative "
            "gossip counters, end minus start of the window. Underlay neighbours are pinned "
            "(permanent entries, no ARP): one kernel's neighbour table, shared by every "
            "namespace, cannot resolve a full mesh of this size. The agents' state directories "
            "are on tmpfs: one disk's journal cannot stand for the fsyncs of N hosts' disks. All "
            f"agents share the machine's {os.cpu_count()} cores.\n")
