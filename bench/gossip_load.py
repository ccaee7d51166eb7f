"""Load: 50 gossip agents on one machine for 10 minutes - CPU, RSS, datagrams, false positives.

`python -m bench gossip_load [--nodes 50] [--secs 600] [--sample 30] [--profile lan]`

`--nodes` `python -m gossip agent` processes (weavepy's gossip library, the layer every weavepy
agent runs) form one cluster on loopback - in a network namespace of their own when we are root,
so the UDP counters are the cluster's alone - node 0 first, the others joining it. After they
converge (every agent has seen every join) and settle, they are watched for `--secs` seconds:
CPU per process (`/proc/PID/stat`, utime + stime) over the whole window and per `--sample`
window, resident memory (VmRSS) at the start and the end, UDP datagrams received
(`/proc/PID/net/snmp`), and every `suspect` and `failed` event any agent printed during the
window. Nobody is killed or impaired, so every such event is a false positive.

Serf is not run side by side here: `bench/gossip_idle.py` already compares the same cluster
against serf at 5 and 50 members; this benchmark is about holding up for ten minutes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench.common import no_anchor, table
from bench.gossip_idle import WeavepyCluster, namespace, rss_mib, udp_in_datagrams, watch_cpu


def run(args: Sequence[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench gossip_load")
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--secs", type=float, default=600.0)
    parser.add_argument("--sample", type=float, default=30.0)
    parser.add_argument("--settle", type=float, default=10.0)
    parser.add_argument("--profile", choices=["lan", "wan", "local"], default="lan")
    opts = parser.parse_args(list(args))
    with tempfile.TemporaryDirectory(prefix="gossip-load-") as tmp, \
            namespace(f"load{opts.nodes}") as prefix:
        cluster = WeavepyCluster(opts.nodes, opts.profile, Path(tmp), prefix)
        try:
            converge_started = time.monotonic()
            cluster.start()
            converged_s = time.monotonic() - converge_started
            time.sleep(opts.settle)
            pids = cluster.pids
            started = time.monotonic()
            rss_start = [rss_mib(pid) for pid in pids]
            udp_start = udp_in_datagrams(pids[0])
            watched = watch_cpu(pids, opts.secs, opts.sample, cluster.all_running)
            cpu, windows, elapsed = watched.cpu, watched.windows, watched.elapsed
            all_running = cluster.all_running()
            rss_end = [rss_mib(pid) for pid in pids] if all_running else []
            udp_end = udp_in_datagrams(pids[0]) if all_running else udp_start
            verdicts = Counter(
                event.event for agent in cluster.agents for event in list(agent.events)
                if event.event in ("suspect", "failed") and event.received >= started)
        finally:
            cluster.close()

    def spread(values: Sequence[float], digits: int) -> str:
        if not values:
            return "n/a (an agent exited)"
        return (f"{statistics.median(values):.{digits}f} / {max(values):.{digits}f}")

    n = opts.nodes
    rows = [
        ["agents", f"{n} (`python -m gossip agent`, profile {opts.profile}), "
         + ("own network namespace, loopback" if prefix else "host loopback")],
        ["convergence (all joins seen by all)", f"{converged_s:.1f} s"],
        ["window", f"{elapsed / 60:.1f} min after {opts.settle:g} s of settling"],
        ["CPU % of one core per agent (median / max)", spread(cpu, 2)],
        ["total CPU % (all agents)", f"{sum(cpu):.1f}" if cpu else "n/a"],
        ["median CPU % per sample window (min / max)",
         f"{min(windows):.2f} / {max(windows):.2f}" if windows else "n/a"],
        ["RSS MiB per agent at start (median / max)", spread(rss_start, 1)],
        ["RSS MiB per agent at end (median / max)", spread(rss_end, 1)],
        ["UDP datagrams/s per agent", f"{(udp_end - udp_start) / elapsed / n:.2f}"
         + ("" if prefix else " (machine-wide counters: not root)")],
        ["false positives (suspect / failed events)",
         f"{verdicts['suspect']} / {verdicts['failed']}"],
        ["all agents running at the end", "yes" if all_running else "NO"],
    ]
    return (no_anchor("Serf is not run side by side here: bench/gossip_idle.py compares the "
                      "same cluster sizes with serf, and bench/scale_agents.py runs full "
                      "agents.") + "\n\n"
            + table(["", "value"], rows)
            + "\n\nThis is the gossip library alone (`python -m gossip agent`), a component "
            "figure. No faults are injected: every suspect or failed event is a false "
            "positive.\n")
