"""Idle cost per member: the full weavepy agent beside serf, at 5 and 50 members.

`python -m bench gossip_idle [--sizes 5,50] [--secs 60] [--profile lan] [--settle 5]
[--systems agent,serf,gossip]`

For each system and size, a fresh cluster is started (node 0 first, the others join it), left
to converge and settle, and then watched for `--secs` seconds: CPU per process from
`/proc/PID/stat` (utime + stime), resident memory from `/proc/PID/status` (VmRSS, at the end),
UDP datagrams received from `/proc/PID/net/snmp`, and suspicions or failures during the window
(an idle cluster should have none). Every system encrypts its gossip (AES-GCM, one key per run):

- **agent**: the product, `weavepy launch` in the nodes of a sandbox (one network namespace
  per node, on the sandbox's underlay bridge), with its IPAM, reconciler, CNI server, API and
  metrics listener; every agent has claimed its block and routes to every other before the
  window opens. Its datagrams are counted in each node's namespace.
- **serf**: the anchor, Debian's serf agents on the loopback of a namespace of their own.
- **gossip**: `python -m gossip agent`, weavepy's gossip library alone on the loopback of its
  own namespace: a component figure, not what a user runs.

(Without root the serf and gossip clusters run on the host's loopback and their counters are
the machine's; the agent needs root.) Goals (issue 16): the full agent at most 0.3 % of a core
and 45 MiB; a datagram rate per member that does not grow with n.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.common import anchor_version, table
from weavepy.devtools.agentbox import AgentBox
from weavepy.devtools.sandbox import Sandbox

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
AGENT_CPU_GOAL, AGENT_RSS_GOAL = 0.3, 45.0  # % of a core, MiB (issue 16)
LAUNCH_BATCH = 4  # agents launched together: their start-up is CPU-bound on 2 cores
LABELS = {"agent": "weavepy agent", "serf": "serf", "gossip": "gossip library (component)"}


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
    parser.add_argument("--systems", default="agent,serf,gossip")
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


@dataclass(frozen=True)
class CpuWatch:
    """What `watch_cpu` saw: each process's CPU % over the whole window (empty when one
    exited), the median CPU % per process in each sample window, and the seconds watched."""

    cpu: list[float]
    windows: list[float]
    elapsed: float


def watch_cpu(pids: Sequence[int], seconds: float, sample: float,
              running: Callable[[], bool]) -> CpuWatch:
    """Watch `pids` for `seconds`, sampling every `sample` seconds (progress on stderr); stop
    early once `running()` says a process has gone."""
    started = time.monotonic()
    cpu_start = [cpu_seconds(pid) for pid in pids]
    windows: list[float] = []
    previous, previous_t = cpu_start, started
    while (now := time.monotonic()) - started < seconds:
        time.sleep(min(sample, seconds - (now - started)))
        if not running():
            break
        sample_t = time.monotonic()
        current = [cpu_seconds(pid) for pid in pids]
        windows.append(statistics.median(
            100 * (b - a) / (sample_t - previous_t)
            for a, b in zip(previous, current, strict=True)))
        previous, previous_t = current, sample_t
        print(f"{sample_t - started:6.0f} s: median CPU {windows[-1]:.2f} % per process",
              file=sys.stderr, flush=True)
    elapsed = time.monotonic() - started
    cpu = ([100 * (cpu_seconds(pid) - a) / elapsed for pid, a in zip(pids, cpu_start, strict=True)]
           if running() else [])
    return CpuWatch(cpu, windows, elapsed)


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
    """`python -m gossip agent` processes (the gossip library alone) on one loopback."""

    def __init__(self, n: int, profile: str, log_dir: Path, prefix: list[str],
                 keyring_file: Path | None = None) -> None:
        self.n, self.profile, self.log_dir, self.prefix = n, profile, log_dir, prefix
        self.keyring_file = keyring_file
        self.agents: list[AgentProcess] = []
        self._since = 0.0

    def _agent(self, i: int, join: list[str]) -> AgentProcess:
        return AgentProcess(f"w{i}", self.log_dir, join=join, profile=self.profile,
                            log_level="warning", command_prefix=self.prefix,
                            keyring_file=self.keyring_file)

    def start(self) -> None:
        seed = self._agent(0, [])
        self.agents.append(seed)
        seed.wait_started(CONVERGE_TIMEOUT)
        for i in range(1, self.n):
            self.agents.append(self._agent(i, [seed.address]))
        for agent in self.agents[1:]:
            agent.wait_started(CONVERGE_TIMEOUT)
        names = [agent.name for agent in self.agents]
        for agent in self.agents:
            for name in names:
                agent.wait_event(["join"], name, CONVERGE_TIMEOUT)

    @property
    def pids(self) -> list[int]:
        return [agent.pid for agent in self.agents]

    def udp_in(self) -> int:
        return udp_in_datagrams(self.pids[0])

    def begin_window(self) -> None:
        self._since = time.monotonic()

    def verdicts(self) -> int:
        return sum(1 for agent in self.agents for event in list(agent.events)
                   if event.event in ("suspect", "failed") and event.received >= self._since)

    def all_running(self) -> bool:
        return all(agent.process.poll() is None for agent in self.agents)

    def close(self) -> None:
        for agent in self.agents:
            agent.kill()
            agent.stop()


class SerfCluster:
    """Debian's serf agents (the anchor) on one loopback."""

    def __init__(self, n: int, profile: str, log_dir: Path, prefix: list[str],
                 key: str | None = None) -> None:
        self.n, self.profile, self.log_dir, self.prefix = n, profile, log_dir, prefix
        self.key = key
        self.agents: list[SerfAgent] = []
        self._since = 0.0

    def _agent(self, i: int, join: list[str]) -> SerfAgent:
        # In a private namespace every port is ours, and free_port() cannot look there.
        private = bool(self.prefix)
        return SerfAgent(f"s{i}", self.log_dir, join=join, profile=self.profile,
                         log_level="info", command_prefix=self.prefix, encrypt=self.key,
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

    def udp_in(self) -> int:
        return udp_in_datagrams(self.pids[0])

    def begin_window(self) -> None:
        for agent in self.agents:
            agent.poll_log()
        self._since = time.monotonic()

    def verdicts(self) -> int:
        count = 0
        for agent in self.agents:
            agent.poll_log()
            count += sum(1 for seen, line in agent.log_lines if seen >= self._since
                         and ("Suspect " in line or "EventMemberFailed" in line))
        return count

    def all_running(self) -> bool:
        return all(agent.process.poll() is None for agent in self.agents)

    def close(self) -> None:
        for agent in self.agents:
            agent.kill()
            agent.stop()


class AgentCluster:
    """Full agents (`weavepy launch`) in the nodes of a sandbox, one per node."""

    def __init__(self, n: int, profile: str, key: str) -> None:
        self.n, self.profile, self.key = n, profile, key
        self.box: Sandbox | None = None
        self.rig: AgentBox | None = None
        self._baseline = 0

    def start(self) -> None:
        self.box = Sandbox.create(nodes=self.n)
        rig = self.rig = AgentBox(self.box, pod_range=str(self.box.pod_range),
                                  profile=self.profile, log_level="warning")
        rig.key_file.write_text(self.key + "\n")
        founder, others = self.box.nodes[0], self.box.nodes[1:]
        rig.launch(founder)
        rig.wait_api(founder, timeout=CONVERGE_TIMEOUT)
        for batch in range(0, len(others), LAUNCH_BATCH):
            for node in others[batch:batch + LAUNCH_BATCH]:
                rig.launch(node, [founder])
            for node in others[batch:batch + LAUNCH_BATCH]:
                rig.wait_api(node, timeout=CONVERGE_TIMEOUT)
        rig.wait_mesh(timeout=CONVERGE_TIMEOUT + 3 * self.n)

    @property
    def pids(self) -> list[int]:
        assert self.rig is not None
        return [process.pid for process in self.rig.agents.values()]

    def udp_in(self) -> int:
        return sum(udp_in_datagrams(pid) for pid in self.pids)  # one namespace per agent

    def _verdict_counters(self) -> int:
        assert self.rig is not None and self.box is not None
        total = 0
        for node in self.box.nodes:
            doc = self.rig.status(node)
            if doc is not None:
                total += doc["gossip"]["suspicions"] + doc["gossip"]["probe_failures"]
        return total

    def begin_window(self) -> None:
        self._baseline = self._verdict_counters()

    def verdicts(self) -> int:
        return self._verdict_counters() - self._baseline

    def all_running(self) -> bool:
        assert self.rig is not None
        return all(process.alive() for process in self.rig.agents.values())

    def close(self) -> None:
        if self.box is not None:
            self.box.destroy()


Cluster = WeavepyCluster | SerfCluster | AgentCluster


def measure(system: str, n: int, opts: argparse.Namespace, log_dir: Path, key: str,
            keyring_file: Path) -> IdleResult:
    with namespace(f"{system[0]}{n}") as prefix:
        cluster: Cluster
        if system == "agent":
            cluster = AgentCluster(n, opts.profile, key)
        elif system == "gossip":
            cluster = WeavepyCluster(n, opts.profile, log_dir, prefix, keyring_file)
        else:
            cluster = SerfCluster(n, opts.profile, log_dir, prefix, key)
        try:
            cluster.start()
            time.sleep(opts.settle)
            pids = cluster.pids
            cluster.begin_window()
            started = time.monotonic()
            cpu_before = [cpu_seconds(pid) for pid in pids]
            udp_before = cluster.udp_in()
            time.sleep(opts.secs)
            elapsed = time.monotonic() - started
            cpu_after = [cpu_seconds(pid) for pid in pids]
            udp_after = cluster.udp_in()
            rss = [rss_mib(pid) for pid in pids]
            return IdleResult(
                system=system,
                nodes=n,
                cpu_percent=[100 * (b - a) / elapsed for a, b in zip(cpu_before, cpu_after,
                                                                    strict=True)],
                rss_mib=rss,
                datagrams_per_s=(udp_after - udp_before) / elapsed,
                isolated=bool(prefix) or system == "agent",
                suspicions=cluster.verdicts(),
                alive_at_end=cluster.all_running(),
            )
        finally:
            cluster.close()


def run(args: Sequence[str]) -> str:
    opts = parse(args)
    systems = [s for s in opts.systems.split(",") if s]
    unknown = sorted(set(systems) - set(LABELS))
    if unknown:
        raise SystemExit(f"unknown systems: {', '.join(unknown)} (have {', '.join(LABELS)})")
    sizes = [int(s) for s in opts.sizes.split(",") if s]
    if "serf" in systems and serf_binary() is None:
        raise SystemExit("serf is not installed (apt-get install serf)")
    if "agent" in systems and os.geteuid() != 0:
        raise SystemExit("the agent system needs root (it runs in a sandbox of namespaces)")
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    results = []
    with tempfile.TemporaryDirectory(prefix="gossip-idle-") as tmp:
        keyring_file = Path(tmp) / "keyring"
        keyring_file.write_text(key + "\n")
        keyring_file.chmod(0o600)
        for n in sizes:
            for system in systems:
                log_dir = Path(tmp) / f"{system}-{n}"
                log_dir.mkdir()
                results.append(measure(system, n, opts, log_dir, key, keyring_file))
    return report(opts, results)


def report(opts: argparse.Namespace, results: Sequence[IdleResult]) -> str:
    def spread(values: Sequence[float], digits: int) -> str:
        return (f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f} / "
                f"{max(values):.{digits}f}")

    rows = []
    for r in results:
        rows.append([
            LABELS[r.system],
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
        f"Idle clusters, profile `{opts.profile}`, gossip encrypted, watched for {opts.secs:g} s "
        f"after {opts.settle:g} s of settling. Per member: min / median / max (every member is "
        f"a repetition of the same measurement: that is the spread). The weavepy agent is the "
        f"product (`weavepy launch` in sandbox nodes, blocks claimed and routes programmed); "
        f"the gossip library row is a component figure (`python -m gossip agent`), not what a "
        f"user runs.",
        anchor_version("Anchor serf", ["serf", "version"], "serf") + ".",
        "UDP counters: " + ("each cluster's own network namespaces (exact)." if isolated
                            else "the whole machine's for serf and gossip (not root)."),
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
        for system in ("agent", "gossip"):
            w, s = by_key.get((system, n)), by_key.get(("serf", n))
            if w is None or s is None:
                continue
            cpu_ratio = statistics.median(w.cpu_percent) / max(
                statistics.median(s.cpu_percent), 1e-9)
            rss_ratio = statistics.median(w.rss_mib) / statistics.median(s.rss_mib)
            rate_ratio = (w.datagrams_per_s / w.nodes) / max(s.datagrams_per_s / s.nodes, 1e-9)
            notes.append(f"- n={n}: {LABELS[system]} / serf medians: CPU **{cpu_ratio:.2f}x**, "
                         f"RSS **{rss_ratio:.2f}x**, datagrams per member "
                         f"**{rate_ratio:.2f}x**.")
    agents = [r for r in results if r.system == "agent"]
    if agents:
        worst_cpu = max(statistics.median(r.cpu_percent) for r in agents)
        worst_rss = max(statistics.median(r.rss_mib) for r in agents)
        rates = [r.datagrams_per_s / r.nodes for r in agents]
        notes.append(
            f"- Goals for the agent: CPU <= {AGENT_CPU_GOAL} % "
            f"({'met' if worst_cpu <= AGENT_CPU_GOAL else 'NOT met'}: worst median "
            f"{worst_cpu:.2f} %), RSS <= {AGENT_RSS_GOAL:.0f} MiB "
            f"({'met' if worst_rss <= AGENT_RSS_GOAL else 'NOT met'}: worst median "
            f"{worst_rss:.1f} MiB), datagram rate per member flat in n (from "
            f"{min(rates):.2f} to {max(rates):.2f}/s)."
        )
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)
