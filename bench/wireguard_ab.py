"""bench.wireguard_ab: an interleaved A/B of the encrypted path through real agents.

Each agent variant is a 2-node sandbox with two real agents (`weavepy launch`), one pod per
node made by CNI ADD through the installed weavepy-cni plugin, so MTU, gso_max_size, routes and
the tunnel are the agent's own choice:

- `vxlan`: agents without flags (kernel VXLAN; the throughput goal's denominator);
- `encrypt`: agents with `--encrypt` (the super-packet extension between weavepy nodes), run
  from this checkout;
- `encrypt@REV` (`--baseline REV`): the same, run from `git archive REV` (the code before a
  change, as users ran it);
- `LABEL` (`--variant LABEL=module.NAME=VALUE[,...]`): `--encrypt` agents from this checkout
  with module constants set before the agent starts (a launcher sets them, or calls a
  function of that name with the value, then runs `weavepy.cli`); only for comparing options
  of the data plane that are not settings.

And two variants without agents, between pods behind bridges (bench.wireguard.PodNetwork):
`device`, our standalone device (`python -m tunnel.wireguard.device`, extension, data plane in
its own process as in the agent), `vxlan-hand`, kernel VXLAN set up by hand (these two answer
"what does the agent's placement cost?"), and `wireguard-go`, the anchor,
Debian's wireguard-go. Its version is printed: Debian's predates wireguard-go's 2023 TUN
offloads (GSO/GRO), so a current one would be faster.

Per repetition: pings from pod 1 to pod 2 every 5 ms, one variant at a time in rounds over
all variants (or, with --staggered, through all variants at once, started staggered so that
their packets never meet: every variant then sees the same moments of the machine's other
load, but each also loads the machine for the others, which penalises the CPU-hungry ones);
then per variant, in an order rotated between repetitions, an iperf3 TCP run capped at
`--rate` (the tunnel's CPU per Gbit at a fixed packet rate, which the machine's other load
disturbs far less than peak throughput), and iperf3 TCP pod 1 -> pod 2 with 1 and 4 streams.
After the repetitions, idle pings (1 s apart) through all variants at once, staggered. RTTs
are reported per packet (median, 10th-90th percentile, min, lost), throughput per repetition
(median and range), with the load average before each repetition, because the machine is
shared.

`python -m bench wireguard_ab` prints the report; use `WEAVEPY_BENCH_NO_RECORD=1` to keep it
out of bench/RESULTS.md while comparing options.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import table
from bench.wireguard import PodNetwork, _cpu_seconds, _run_in, pod_ip
from weavepy.cni.install import install_cni
from weavepy.devtools.agentbox import AgentBox
from weavepy.devtools.sandbox import Sandbox, SandboxNode

REPO = Path(__file__).resolve().parents[1]
ANCHOR = "wireguard-go"
_RTT = re.compile(r"time=([0-9.]+) ms")
# Run by a variant's agents: set module constants (or call module functions with the value,
# e.g. sys.setswitchinterval), then run the CLI as `weavepy` would.
_LAUNCHER = (
    "import ast, importlib, sys\n"
    "for spec in sys.argv[1].split(';'):\n"
    "    if spec:\n"
    "        where, value = spec.split('=', 1)\n"
    "        module, name = where.rsplit('.', 1)\n"
    "        target, value = importlib.import_module(module), ast.literal_eval(value)\n"
    "        if callable(getattr(target, name, None)):\n"
    "            getattr(target, name)(value)\n"
    "        else:\n"
    "            setattr(target, name, value)\n"
    "from weavepy.cli import main\n"
    "sys.argv = ['weavepy', *sys.argv[2:]]\n"
    "main()\n"
)


@dataclass(frozen=True)
class Variant:
    label: str
    flags: tuple[str, ...] = ()
    source: Path = REPO  # the tree the agents run from
    settings: tuple[tuple[str, str], ...] = ()  # (module.NAME, python literal)


class _Agents(AgentBox):
    """AgentBox whose agents run from `source` with `settings` applied (see _LAUNCHER)."""

    source: Path = REPO
    settings: tuple[tuple[str, str], ...] = ()

    def argv(self, node: SandboxNode, peers: Any = (), extra: Sequence[str] = (),
             key_file: Path | None = None) -> list[str]:
        argv = super().argv(node, peers, extra, key_file)
        assert argv[1:3] == ["-m", "weavepy.cli"]
        spec = ";".join(f"{where}={value}" for where, value in self.settings)
        return [sys.executable, "-c", _LAUNCHER, spec, *argv[3:]]

    def launch(self, node: SandboxNode, peers: Any = (), extra: Sequence[str] = (),
               key_file: Path | None = None) -> Any:
        proc = node.start("agent", self.argv(node, peers, extra, key_file), cwd=str(self.source))
        self.agents[node.name] = proc
        return proc


@dataclass
class _Pair:
    """A variant's running pods: namespaces, the server pod's address, and the CPU to count."""

    variant: Variant
    box: Sandbox
    pods: tuple[str, str]
    server_ip: str
    pids: list[int]
    close: Any
    rtts: list[float] = field(default_factory=list)
    idle_rtts: list[float] = field(default_factory=list)
    pings_sent: int = 0
    idle_sent: int = 0
    runs: dict[int, list[dict[str, float]]] = field(default_factory=lambda: {1: [], 4: []})
    paced: list[dict[str, float]] = field(default_factory=list)


def _start_agents(variant: Variant, plugin: Path) -> _Pair:
    box = Sandbox.create(nodes=2)
    try:
        rig = _Agents(box, pod_range=str(box.pod_range), extra_args=variant.flags)
        rig.source, rig.settings = variant.source, variant.settings
        rig.launch_all()
        rig.wait_mesh(timeout=120)
        pods, ips = [], []
        for index, node in enumerate(box.nodes, start=1):
            pod = box.add_netns(f"pod{index}").netns
            ips.append(rig.cni_add(node, plugin, pod))
            pods.append(pod)

        def close() -> None:
            for node in box.nodes:
                if node.name in rig.agents:
                    rig.stop(node)
            box.destroy()

        pair = _Pair(variant, box, (pods[0], pods[1]), ips[1],
                     [p.pid for p in rig.agents.values()], close)
        _wait_reachable(pair, rig.logs_tail)
        return pair
    except BaseException:
        box.destroy()
        raise


def _start_wireguard_go(workdir: Path) -> _Pair:
    box = Sandbox.create(nodes=2)
    try:
        network = PodNetwork(box, workdir)
        network.add_wireguard_go()
        network.use("wireguard-go")

        def close() -> None:
            network.close()
            box.destroy()

        pair = _Pair(Variant(ANCHOR), box, (network.pods[0], network.pods[1]), pod_ip(2),
                     network.tunnel_pids("wireguard-go"), close)
        _wait_reachable(pair, lambda: "")
        return pair
    except BaseException:
        box.destroy()
        raise


def _start_device(workdir: Path, label: str) -> _Pair:
    """Pods behind bridges (bench.wireguard.PodNetwork) over one path without agents: our
    standalone device (`device`: python -m tunnel.wireguard.device, extension, data plane in
    its own process) or kernel VXLAN set up by hand (`vxlan-hand`)."""
    box = Sandbox.create(nodes=2)
    try:
        network = PodNetwork(box, workdir)
        if label == "vxlan-hand":
            network.add_vxlan()
            network.use("vxlan")
            network.tunnels[label] = network.tunnels["vxlan"]
        else:
            network.add_weavepy(label, extension=True, port=51822, workers=False)
            _use(network, label)

        def close() -> None:
            network.close()
            box.destroy()

        pair = _Pair(Variant(label), box, (network.pods[0], network.pods[1]), pod_ip(2),
                     network.tunnel_pids(label), close)
        _wait_reachable(pair, lambda: "")
        return pair
    except BaseException:
        box.destroy()
        raise


def _use(network: PodNetwork, label: str) -> None:
    """Route the pods over our device: PodNetwork.use knows its own path names only."""
    from bench import wireguard

    wireguard.PATH_MTU.setdefault(label, 1420)
    network.use(label, pod_gso_max_size=wireguard.TUN_GSO_MAX_SIZE)


def _wait_reachable(pair: _Pair, logs: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not _pings(pair, 1, 0.2):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{pair.variant.label}: pod 1 cannot reach {pair.server_ip}\n"
                               f"{logs()}")
        time.sleep(0.5)


def _renice(pairs: list[_Pair], niceness: int) -> None:
    """Set the niceness of every thread of the pairs' tunnel processes (nice is per thread)."""
    for pair in pairs:
        for pid in pair.pids:
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                continue
            for tid in tids:
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, tid, niceness)


def _pings(pair: _Pair, count: int, interval: float, niceness: int = 0) -> list[float]:
    """`count` pings pod 1 -> pod 2, `interval` s apart: each reply's RTT in ms."""
    proc = subprocess.run(
        ["nice", "-n", str(niceness), "ip", "netns", "exec", pair.pods[0], "ping", "-n", "-c",
         str(count), "-i", str(interval), "-W", "1", pair.server_ip],
        capture_output=True, text=True, timeout=count * (interval + 1) + 30, check=False)
    return [float(m) for m in _RTT.findall(proc.stdout)]


def _staggered(pairs: list[_Pair], count: int, interval: float, niceness: int
               ) -> list[list[float]]:
    """`count` pings `interval` apart through every pair at once, each pair's started
    interval/len(pairs) after the previous one's: every variant sees the same moments of the
    machine's other load, and their packets never meet."""
    found: list[list[float]] = [[] for _ in pairs]
    threads = []
    for index, pair in enumerate(pairs):
        def ping(index: int = index, pair: _Pair = pair) -> None:
            time.sleep(index * interval / len(pairs))
            found[index] = _pings(pair, count, interval, niceness)

        threads.append(threading.Thread(target=ping))
        threads[-1].start()
    for thread in threads:
        thread.join()
    return found


def _iperf(pair: _Pair, streams: int, seconds: float, rate: str | None = None
           ) -> dict[str, float]:
    """TCP pod 1 -> pod 2 (capped at `rate`, iperf3's -b, if given): Gbit/s, and CPU
    seconds per Gbit of the tunnel processes and of iperf3 itself."""
    import json

    server = pair.box.namespace(pair.pods[1]).start(
        "iperf-server", ["iperf3", "-s", "-1", "-B", pair.server_ip])
    try:
        time.sleep(0.3)
        cpu_before = sum(_cpu_seconds(pid) for pid in pair.pids)
        argv = ["iperf3", "-c", pair.server_ip, "-t", str(seconds), "-P", str(streams), "-J"]
        out = _run_in(pair.pods[0], argv + (["-b", rate] if rate else []), timeout=seconds + 30)
        cpu = sum(_cpu_seconds(pid) for pid in pair.pids) - cpu_before
    finally:
        server.stop(timeout=2)
    end = json.loads(out)["end"]
    gbps = end["sum_received"]["bits_per_second"] / 1e9
    load = end.get("cpu_utilization_percent", {})
    iperf_cpu = (load.get("host_total", 0.0) + load.get("remote_total", 0.0)) / 100 * seconds
    gbits = max(gbps * seconds, 1e-9)
    return {"gbps": gbps, "cpu_per_gbit": cpu / gbits, "iperf_cpu_per_gbit": iperf_cpu / gbits,
            "retransmits": float(end["sum_sent"].get("retransmits", 0))}


def _archive(rev: str, workdir: Path) -> Path:
    """The tree of `rev` (a commit of this repository) unpacked under `workdir`."""
    target = workdir / f"src-{re.sub(r'[^A-Za-z0-9]+', '-', rev)}"
    target.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True,
                             check=True, timeout=60).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True, timeout=60)
    return target


def _variants(options: argparse.Namespace, workdir: Path) -> list[Variant]:
    chosen: list[Variant] = []
    for name in [n for n in options.variants.split(",") if n]:
        if name == "vxlan":
            chosen.append(Variant("vxlan"))
        elif name == "encrypt":
            chosen.append(Variant("encrypt", ("--encrypt",)))
        elif name in (ANCHOR, "device", "vxlan-hand"):
            chosen.append(Variant(name))
        else:
            raise SystemExit(f"Error: unknown variant {name!r} "
                             f"(vxlan, vxlan-hand, encrypt, device, {ANCHOR})")
    for rev in options.baseline:
        chosen.append(Variant(f"encrypt@{rev}", ("--encrypt",), _archive(rev, workdir)))
    for text in options.variant:
        label, _, specs = text.partition("=")
        settings = []
        for spec in specs.split(","):
            where, _, value = spec.partition("=")
            if "." not in where or not value:
                raise SystemExit(f"Error: --variant wants LABEL=module.NAME=VALUE, got {text!r}")
            ast.literal_eval(value)  # a plain literal, nothing else
            settings.append((where, value))
        chosen.append(Variant(label, ("--encrypt",), settings=tuple(settings)))
    return chosen


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    return (out.stdout or out.stderr).strip().splitlines()[0]


def run(args: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench wireguard_ab")
    parser.add_argument("--variants", default=f"vxlan,encrypt,{ANCHOR}")
    parser.add_argument("--baseline", action="append", default=[], metavar="REV",
                        help="also run --encrypt agents from `git archive REV`")
    parser.add_argument("--variant", action="append", default=[],
                        metavar="LABEL=module.NAME=VALUE[,...]",
                        help="also run --encrypt agents with these module constants set")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--pings", type=int, default=200, help="pings 5 ms apart per rep")
    parser.add_argument("--ping-rounds", type=int, default=8,
                        help="the 5 ms pings of a repetition go in this many rounds over the "
                        "variants, one variant at a time")
    parser.add_argument("--staggered", action="store_true",
                        help="ping all variants at once instead (staggered): the same moments "
                        "of outside load for all, but each also loads the machine for the others")
    parser.add_argument("--nice", type=int, default=0,
                        help="niceness of the tunnel processes' threads and of ping during the "
                        "ping phases (e.g. -10: the machine's other load delays them less; every "
                        "variant alike)")
    parser.add_argument("--idle-pings", type=int, default=30, help="pings 1 s apart, at the end")
    parser.add_argument("--no-iperf", action="store_true", help="no unpaced iperf3 runs")
    parser.add_argument("--rate", default=None, metavar="RATE",
                        help="also a 1-stream iperf3 capped at RATE (-b, e.g. 1G): the tunnel's "
                        "CPU per Gbit at a fixed packet rate, which shared-machine load "
                        "disturbs far less than peak throughput")
    options = parser.parse_args(args)
    workdir = Path(tempfile.mkdtemp(prefix="weavepy-bench-wgab-"))
    pairs: list[_Pair] = []
    loads: list[str] = []
    try:
        variants = _variants(options, workdir)
        plugin = install_cni(workdir / "bin", workdir / "net.d").plugin
        for variant in variants:
            if variant.label == ANCHOR:
                pairs.append(_start_wireguard_go(workdir))
            elif variant.label in ("device", "vxlan-hand"):
                pairs.append(_start_device(workdir, variant.label))
            else:
                pairs.append(_start_agents(variant, plugin))
        for rep in range(options.reps):
            loads.append(" ".join(Path("/proc/loadavg").read_text().split()[:3]))
            shift = rep % len(pairs)
            order = pairs[shift:] + pairs[:shift]
            for pair in order:
                _pings(pair, 3, 0.05)  # warm up
            _renice(pairs, options.nice)
            if options.staggered:
                for pair, rtts in zip(order, _staggered(order, options.pings, 0.005, options.nice),
                                      strict=True):
                    pair.rtts += rtts
                    pair.pings_sent += options.pings
            else:
                chunk = -(-options.pings // options.ping_rounds)
                for _ in range(options.ping_rounds):
                    for pair in order:
                        pair.rtts += _pings(pair, chunk, 0.005, options.nice)
                        pair.pings_sent += chunk
            _renice(pairs, 0)
            for pair in order:
                if options.rate:
                    pair.paced.append(_iperf(pair, 1, options.seconds, options.rate))
                if not options.no_iperf:
                    for streams in (1, 4):
                        pair.runs[streams].append(_iperf(pair, streams, options.seconds))
        if options.idle_pings:
            loads.append(" ".join(Path("/proc/loadavg").read_text().split()[:3]))
            _renice(pairs, options.nice)
            for pair, rtts in zip(pairs, _staggered(pairs, options.idle_pings, 1.0, options.nice),
                                  strict=True):
                pair.idle_rtts, pair.idle_sent = rtts, options.idle_pings
            _renice(pairs, 0)
    finally:
        for pair in pairs:
            pair.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return _report(pairs, loads, options)


def _rtt_text(values: list[float], sent: int) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    low = ordered[len(ordered) // 10]
    high = ordered[(9 * len(ordered)) // 10]
    return (f"{statistics.median(ordered):.3f} ({low:.3f}-{high:.3f}, min {ordered[0]:.3f}, "
            f"n {len(ordered)}, lost {sent - len(ordered)})")


def _runs_text(runs: list[dict[str, float]], key: str = "gbps", scale: float = 1.0) -> str:
    if not runs:
        return "-"
    values = [scale * r[key] for r in runs]
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def _ratio_text(mine: list[float], base: list[float]) -> str:
    if not mine or not base:
        return "-"
    return f"{statistics.median(mine) / statistics.median(base):.2f}"


def _paired_text(pair: _Pair, base: _Pair | None, streams: int) -> str:
    """pair / base Gbit/s within each repetition: median % (range)."""
    if base is None or not pair.runs[streams] or not base.runs[streams]:
        return "-"
    paired = [a["gbps"] / b["gbps"] for a, b in
              zip(pair.runs[streams], base.runs[streams], strict=True)]
    return (f"{100 * statistics.median(paired):.1f} % "
            f"({100 * min(paired):.0f}-{100 * max(paired):.0f})")


def _report(pairs: list[_Pair], loads: list[str], options: argparse.Namespace) -> str:
    by_label = {p.variant.label: p for p in pairs}
    vxlan, anchor = by_label.get("vxlan"), by_label.get(ANCHOR)
    latency = [[p.variant.label, _rtt_text(p.rtts, p.pings_sent),
                _rtt_text(p.idle_rtts, p.idle_sent),
                _ratio_text(p.rtts, anchor.rtts) if anchor else "-",
                _ratio_text(p.idle_rtts, anchor.idle_rtts) if anchor else "-"] for p in pairs]
    throughput = [[p.variant.label, _runs_text(p.runs[1]), _runs_text(p.runs[4]),
                   _paired_text(p, vxlan, 1), _paired_text(p, vxlan, 4),
                   _runs_text(p.runs[1], "cpu_per_gbit")] for p in pairs]
    paced = [[p.variant.label, _runs_text(p.paced), _runs_text(p.paced, "cpu_per_gbit", 1000),
              _runs_text(p.paced, "iperf_cpu_per_gbit", 1000)] for p in pairs]
    lines = [
        f"Anchor {ANCHOR}: {_version(['wireguard-go', '--version'])} (Debian's; it predates "
        "wireguard-go's 2023 TUN offloads, so a current one would be faster). Load generator: "
        f"{_version(['iperf3', '--version'])}.",
        "",
        f"{options.reps} repetitions, variants interleaved and rotated. Per repetition "
        f"{options.pings} pings 5 ms apart ("
        + ("all variants at once, started staggered" if options.staggered else
           f"one variant at a time, in {options.ping_rounds} rounds over the variants")
        + f"); at the end {options.idle_pings} pings 1 s apart (all variants at once, started "
        "staggered so that their packets never meet). "
        + (f"During the pings, the tunnel processes and ping ran at nice {options.nice}. "
           if options.nice else "")
        + f"iperf3 -t {options.seconds:g}. Ratios to VXLAN are paired within "
        "each repetition. Load average (1/5/15 min) before each repetition and before the "
        "idle pings: " + "; ".join(loads) + ".",
        "",
        table(["variant", "ping 5 ms apart: median (p10-p90, min, n, lost) ms", "ping 1 s apart",
               f"/ {ANCHOR} (5 ms)", f"/ {ANCHOR} (1 s)"], latency),
    ]
    if not options.no_iperf:
        lines += ["", table(["variant", "TCP 1 stream Gbit/s: median (range)", "TCP 4 streams",
                             "1 stream / VXLAN", "4 streams / VXLAN",
                             "tunnel CPU s per Gbit (1 stream)"], throughput)]
    if options.rate:
        lines += ["", f"1 TCP stream capped at {options.rate} (iperf3 -b): what the tunnel "
                  "processes of both nodes (agents, devices, wireguard-go) and iperf3 itself "
                  "spent per Gbit, median (range).", "",
                  table(["variant", "Gbit/s", "tunnel CPU ms per Gbit", "iperf3 CPU ms per Gbit"],
                        paced)]
    for pair in pairs:
        if pair.variant.settings or pair.variant.source != REPO:
            where = ("this checkout" if pair.variant.source == REPO
                     else f"git archive of {pair.variant.label.split('@', 1)[1]}")
            settings = ", ".join(f"{w} = {v}" for w, v in pair.variant.settings) or "none"
            lines.append(f"\n{pair.variant.label}: agents from {where}; constants set: "
                         f"{settings}.")
    return "\n".join(lines)
