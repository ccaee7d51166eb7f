"""Idle cost per member: weavepy's gossip agent against serf, at 5 and 50 members.

`python -m bench gossip_idle [--sizes 5,50] [--secs 60] [--profile lan] [--settle 5]`

For each system and size, a fresh cluster is started (node 0 first, the others join it), left
to converge and settle, and then watched for `--secs` seconds: CPU per process from
`/proc/PID/stat` (utime + stime), resident memory from `/proc/PID/status` (VmRSS, at the end),
and UDP datagrams from `/proc/PID/net/snmp`. When we are root, each cluster runs in a network
namespace of its own (`ip netns exec`, which execs in place, so the PIDs are the agents'), with
only its loopback up, so the UDP counters are the cluster's alone; otherwise the cluster runs on
the host's loopback and the counters are the machine's (the report says which). Suspicions or
failures during the window are counted too: an idle cluster should have none.

Goals (issue 3): at most 0.5 % of one core and 40 MiB per member, and a datagram rate per
member that does not grow with n. Research baseline (serf here): 0.2 %, 15 MiB, 2 datagrams/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.common import table

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.gossip.agentproc import AgentProcess  # noqa: E402
from tests.gossip.serf import SerfAgent, serf_binary  # noqa: E402

CONVERGE_TIMEOUT = 120.0
NAMESPACE_PORT_BASE = 20000
NAMESPACE_RPC_PORT_BASE = 21000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class IdleResult:
    system: str
    nodes: int
    cpu_percent: list[float]  # per process, % of one core
    rss_mib: list[float]  # per process
    datagrams_per_s: float  # UDP datagrams received per second, whole cluster
    isolated: bool  # counters are the cluster's own (network namespace)
    suspicions: int  # suspect/failed verdicts during the window
    alive_at_end: bool


def parse(args: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench gossip_idle")
    parser.add_argument("--sizes", default="5,50")
    parser.add_argument("--secs", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--profile", choices=["lan", "wan", "local"], default="lan")
    parser.add_argument("--systems", default="weavepy,serf")
    return parser.parse_args(list(args))


# -- /proc --------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / MIB
    return float("nan")


def udp_in_datagrams(pid: int) -> int:
    lines = [line.split() for line in Path(f"/proc/{pid}/net/snmp").read_text().splitlines()
             if line.startswith("Udp:")]
    header, values = lines[0], lines[1]
    return int(values[header.index("InDatagrams")])


@contextmanager
def namespace(tag: str) -> Iterator[list[str]]:
    """A fresh network namespace with loopback up, as a command prefix; [] if we cannot."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        yield []
        return
    name = f"gpidle-{os.getpid()}-{tag}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield ["ip", "netns", "exec", name]
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


# -- clusters -----------------------------------------------------------------------------------


class WeavepyCluster:
    def __init__(self, n: int, profile: str, log_dir: Path, prefix: list[str]) -> None:
        self.n, self.profile, self.log_dir, self.prefix = n, profile, log_dir, prefix
        self.agents: list[AgentProcess] = []

    def start(self) -> None:
        n, profile, log_dir, prefix = self.n, self.profile, self.log_dir, self.prefix
        seed = AgentProcess("w0", log_dir, profile=profile, log_level="warning",
                            command_prefix=prefix)
        self.agents.append(seed)
        seed.wait_started(CONVERGE_TIMEOUT)
        for i in range(1, n):
            self.agents.append(AgentProcess(f"w{i}", log_dir, join=[seed.address],
                                            profile=profile, log_level="warning",
                                            command_prefix=prefix))
        for agent in self.agents[1:]:
            agent.wait_started(CONVERGE_TIMEOUT)
        names = [agent.name for agent in self.agents]
        for agent in self.agents:
            for name in names:
                agent.wait_event(["join"], name, CONVERGE_TIMEOUT)

    @property
    def pids(self) -> list[int]:
        return [agent.pid for agent in self.agents]

    def verdicts_since(self, since: float) -> int:
        return sum(1 for agent in self.agents for event in list(agent.events)
                   if event.event in ("suspect", "failed") and event.received >= since)

    def all_running(self) -> bool:
        return all(agent.process.poll() is None for agent in self.agents)

    def close(self) -> None:
        for agent in self.agents:
            agent.kill()
            agent.stop()


class SerfCluster:
    def __init__(self, n: int, profile: str, log_dir: Path, prefix: list[str]) -> None:
        self.n, self.profile, self.log_dir, self.prefix = n, profile, log_dir, prefix
        self.agents: list[SerfAgent] = []

    def _agent(self, i: int, join: list[str]) -> SerfAgent:
        # In a private namespace every port is ours, and free_port() cannot look there.
        private = bool(self.prefix)
        return SerfAgent(f"s{i}", self.log_dir, join=join, profile=self.profile,
                         log_level="info", command_prefix=self.prefix,
                         port=NAMESPACE_PORT_BASE + i if private else None,
                         rpc_port=NAMESPACE_RPC_PORT_BASE + i if private else None)

    def start(self) -> None:
        seed = self._agent(0, [])
        self.agents.append(seed)
        seed.wait_ready(CONVERGE_TIMEOUT)
        for i in range(1, self.n):
            self.agents.append(self._agent(i, [seed.address]))
        for agent in self.agents[1:]:
            agent.wait_ready(CONVERGE_TIMEOUT)
        names = [agent.name for agent in self.agents]
        for agent in self.agents:
            for name in names:
                agent.wait_log(rf"EventMemberJoin: {name} ", CONVERGE_TIMEOUT)

    @property
    def pids(self) -> list[int]:
        return [agent.pid for agent in self.agents]

    def verdicts_since(self, since: float) -> int:
        count = 0
        for agent in self.agents:
            agent.poll_log()
            count += sum(1 for seen, line in agent.log_lines
                         if seen >= since and ("Suspect " in line or "EventMemberFailed" in line))
        return count

    def all_running(self) -> bool:
        return all(agent.process.poll() is None for agent in self.agents)

    def close(self) -> None:
        for agent in self.agents:
            agent.kill()
            agent.stop()


def measure(system: str, n: int, opts: argparse.Namespace, log_dir: Path) -> IdleResult:
    with namespace(f"{system[0]}{n}") as prefix:
        cluster: WeavepyCluster | SerfCluster
        if system == "weavepy":
            cluster = WeavepyCluster(n, opts.profile, log_dir, prefix)
        else:
            cluster = SerfCluster(n, opts.profile, log_dir, prefix)
        try:
            cluster.start()
            time.sleep(opts.settle)
            if isinstance(cluster, SerfCluster):
                for agent in cluster.agents:
                    agent.poll_log()
            pids = cluster.pids
            started = time.monotonic()
            cpu_before = [cpu_seconds(pid) for pid in pids]
            udp_before = udp_in_datagrams(pids[0])
            time.sleep(opts.secs)
            elapsed = time.monotonic() - started
            cpu_after = [cpu_seconds(pid) for pid in pids]
            udp_after = udp_in_datagrams(pids[0])
            rss = [rss_mib(pid) for pid in pids]
            return IdleResult(
                system=system,
                nodes=n,
                cpu_percent=[100 * (b - a) / elapsed for a, b in zip(cpu_before, cpu_after,
                                                                    strict=True)],
                rss_mib=rss,
                datagrams_per_s=(udp_after - udp_before) / elapsed,
                isolated=bool(prefix),
                suspicions=cluster.verdicts_since(started),
                alive_at_end=cluster.all_running(),
            )
        finally:
            cluster.close()


def run(args: Sequence[str]) -> str:
    opts = parse(args)
    systems = [s for s in opts.systems.split(",") if s]
    sizes = [int(s) for s in opts.sizes.split(",") if s]
    if "serf" in systems and serf_binary() is None:
        raise SystemExit("serf is not installed (apt-get install serf)")
    results = []
    with tempfile.TemporaryDirectory(prefix="gossip-idle-") as tmp:
        for n in sizes:
            for system in systems:
                log_dir = Path(tmp) / f"{system}-{n}"
                log_dir.mkdir()
                results.append(measure(system, n, opts, log_dir))
    return report(opts, results)


def report(opts: argparse.Namespace, results: Sequence[IdleResult]) -> str:
    def spread(values: Sequence[float], digits: int) -> str:
        return (f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f} / "
                f"{max(values):.{digits}f}")

    rows = []
    for r in results:
        rows.append([
            r.system,
            r.nodes,
            spread(r.cpu_percent, 2),
            f"{sum(r.cpu_percent):.1f}",
            spread(r.rss_mib, 1),
            f"{sum(r.rss_mib):.0f}",
            f"{r.datagrams_per_s / r.nodes:.2f}",
            r.suspicions,
            "yes" if r.alive_at_end else "NO",
        ])
    isolated = all(r.isolated for r in results)
    lines = [
        f"Idle cluster on loopback, profile `{opts.profile}`, watched for {opts.secs:g} s after "
        f"{opts.settle:g} s of settling. Per member: min / median / max.",
        "UDP counters: " + ("each cluster in its own network namespace (exact)." if isolated
                            else "the whole machine's (no namespace: not root)."),
        "",
        table(
            ["system", "members", "CPU % of a core", "total CPU %", "RSS MiB", "total MiB",
             "datagrams/s per member", "suspicions", "all running"],
            rows,
        ),
    ]
    by_key = {(r.system, r.nodes): r for r in results}
    notes = []
    for n in sorted({r.nodes for r in results}):
        w, s = by_key.get(("weavepy", n)), by_key.get(("serf", n))
        if w is None or s is None:
            continue
        cpu_ratio = statistics.median(w.cpu_percent) / max(statistics.median(s.cpu_percent), 1e-9)
        rss_ratio = statistics.median(w.rss_mib) / statistics.median(s.rss_mib)
        rate_ratio = (w.datagrams_per_s / w.nodes) / max(s.datagrams_per_s / s.nodes, 1e-9)
        notes.append(f"- n={n}: weavepy / serf medians: CPU **{cpu_ratio:.2f}x**, RSS "
                     f"**{rss_ratio:.2f}x**, datagrams per member **{rate_ratio:.2f}x**.")
    weavepy = [r for r in results if r.system == "weavepy"]
    if weavepy:
        worst_cpu = max(statistics.median(r.cpu_percent) for r in weavepy)
        worst_rss = max(statistics.median(r.rss_mib) for r in weavepy)
        rates = [r.datagrams_per_s / r.nodes for r in weavepy]
        notes.append(
            f"- Goals for weavepy: CPU <= 0.5 % ({'met' if worst_cpu <= 0.5 else 'NOT met'}: "
            f"worst median {worst_cpu:.2f} %), RSS <= 40 MiB "
            f"({'met' if worst_rss <= 40 else 'NOT met'}: worst median {worst_rss:.1f} MiB), "
            f"datagram rate per member flat in n (from {min(rates):.2f} to {max(rates):.2f}/s)."
        )
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)
