"""bench.cni: CNI ADD and DEL through a real weavepy agent, against the reference plugins.

One sandbox node runs a real agent (`weavepy launch`, founding its own one-node cluster, so
every address comes from the block its IPAM claimed through Paxos and is persisted before the
answer). Inside that node a forked child execs the plugins directly, as a runtime would:

- weavepy: the installed `weavepy-cni` file (`#!<python> -IS`), talking to the agent's socket;
- reference: Debian's containernetworking-plugins `bridge` with `host-local` IPAM (its own
  bridge and subnet, isGateway), the Go plugins every CNI comparison starts from;
- reference again: the same reference on a second bridge and subnet: the A/A control. Its
  ratio to the first shows how far two identical setups drift on this machine.

Two shapes, each with the systems alternating (order rotated) within every round:

- **one at a time**: ADD then DEL of one pod per system and round;
- **10 at once** (a ReplicaSet starting): 10 ADDs exec'd together per system, then the 10
  DELs; per-pod latency and the time until all 10 are done.

The agent's own share comes from its debug log (`weavepy.cni.server` times each request from
accept to reply, and the work on its CNI thread inside that), read per phase. The interpreter's
start-up (`python -IS -c pass`) and a VERSION the plugin answers alone bound what any Python
plugin can reach. Everything is created under the sandbox prefix and removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import anchor_version, median_spread, ratio_interval, table
from weavepy.cni.install import install_cni, resolve_interpreter
from weavepy.devtools.agentbox import AgentBox
from weavepy.devtools.sandbox import Sandbox

REFERENCE_DIR = "/usr/lib/cni"
AGENT_RANGE = "198.19.0.0/17"
REFERENCE_SUBNETS = {"reference": "198.19.200.0/24", "reference-again": "198.19.201.0/24"}
SYSTEMS = ("weavepy", "reference", "reference-again")
BURST = 10
GOAL = 1.5
CNI_ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=pod;K8S_POD_UID=u"
AGENT_LINE = re.compile(r"CNI (ADD|DEL) -> code 0 in ([0-9.]+) ms \(work ([0-9.]+) ms\)")


@dataclass(frozen=True)
class Plugin:
    """How to exec one system's plugin: path, network config, and its pods' netns paths."""

    path: str
    conf: str
    netns: tuple[str, ...]


def _exec_ms(argv: Sequence[str], env: dict[str, str], stdin: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run(list(argv), input=stdin, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    elapsed = (time.perf_counter() - start) * 1e3
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stdout} {proc.stderr}")
    return elapsed


def _env(plugin: Plugin, command: str, pod: int) -> dict[str, str]:
    return dict(os.environ, CNI_IFNAME="eth0", CNI_ARGS=CNI_ARGS, CNI_COMMAND=command,
                CNI_CONTAINERID=f"bench{pod}", CNI_NETNS=plugin.netns[pod],
                CNI_PATH=f"{Path(plugin.path).parent}:{REFERENCE_DIR}")


def _order(round_index: int) -> list[str]:
    shift = round_index % len(SYSTEMS)
    return list(SYSTEMS[shift:] + SYSTEMS[:shift])


def one_at_a_time(plugins: dict[str, Plugin], rounds: int, python: str
                  ) -> dict[str, list[float]]:
    """Inside the node: {"<system> ADD": [ms...], "<system> DEL": [...], "floor": [...]}."""
    samples: dict[str, list[float]] = {}
    for round_index in range(rounds):
        for command in ("ADD", "DEL"):
            for name in _order(round_index):
                plugin = plugins[name]
                samples.setdefault(f"{name} {command}", []).append(
                    _exec_ms([plugin.path], _env(plugin, command, 0), plugin.conf))
        version_env = dict(os.environ, CNI_COMMAND="VERSION")
        samples.setdefault("weavepy VERSION", []).append(_exec_ms(
            [plugins["weavepy"].path], version_env, json.dumps({"cniVersion": "1.0.0"})))
        samples.setdefault("python -IS -c pass", []).append(
            _exec_ms([python, "-IS", "-c", "pass"], version_env, ""))
    return samples


def _burst(plugin: Plugin, command: str) -> tuple[list[float], float]:
    """`BURST` execs of `command` at once: each one's ms, and ms until the last is done."""
    times: list[float] = [0.0] * BURST
    errors: list[BaseException] = []

    def one(pod: int) -> None:
        try:
            times[pod] = _exec_ms([plugin.path], _env(plugin, command, pod), plugin.conf)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(pod,)) for pod in range(BURST)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = (time.perf_counter() - started) * 1e3
    if errors:
        raise errors[0]
    return times, wall


def all_at_once(plugins: dict[str, Plugin], rounds: int) -> dict[str, list[float]]:
    """Inside the node: per-pod ms ("<system> ADD") and all-done ms ("<system> ADD wall")."""
    samples: dict[str, list[float]] = {}
    for round_index in range(rounds):
        for command in ("ADD", "DEL"):
            for name in _order(round_index):
                times, wall = _burst(plugins[name], command)
                samples.setdefault(f"{name} {command}", []).extend(times)
                samples.setdefault(f"{name} {command} wall", []).append(wall)
    return samples


def agent_times(log_text: str) -> dict[str, list[float]]:
    """{"ADD": [ms...], "ADD work": [...], "DEL": ..., "DEL work": ...} from the agent's log."""
    found: dict[str, list[float]] = {}
    for match in AGENT_LINE.finditer(log_text):
        command, total, work = match.group(1), float(match.group(2)), float(match.group(3))
        found.setdefault(command, []).append(total)
        found.setdefault(f"{command} work", []).append(work)
    return found


def _setup(box: Sandbox, work: Path, python: str) -> tuple[AgentBox, dict[str, Plugin]]:
    node = box.nodes[0]
    rig = AgentBox(box, pod_range=AGENT_RANGE, log_level="debug")
    rig.launch(node)
    rig.wait("the agent's CNI socket and a block", lambda: (
        (doc := rig.status(node)) is not None and doc["cni"]["listening"]
        and doc["dataplane"]["local_blocks"]), timeout=60)
    socket_path = rig.run_dir(node) / "cni.sock"
    installed = install_cni(work / "bin", work / "net.d", socket_path=str(socket_path),
                            interpreter=python)
    plugins: dict[str, Plugin] = {}
    for name in SYSTEMS:
        netns = []
        for pod in range(BURST):
            label = f"{name[:3]}{'a' if name.endswith('again') else ''}{pod}"
            box.add_netns(label)
            netns.append(f"/run/netns/{box.prefix}-{label}")
        conf: dict[str, object]
        if name == "weavepy":
            conf = {"cniVersion": "1.0.0", "name": "weavepy", "type": "weavepy-cni",
                    "socketPath": str(socket_path)}
            path = str(installed.plugin)
        else:
            bridge = "refbr0" if name == "reference" else "refbr1"
            conf = {"cniVersion": "1.0.0", "name": name, "type": "bridge", "bridge": bridge,
                    "isGateway": True,
                    "ipam": {"type": "host-local", "subnet": REFERENCE_SUBNETS[name],
                             "dataDir": str(work / f"host-local-{name}")}}
            path = f"{REFERENCE_DIR}/bridge"
        plugins[name] = Plugin(path, json.dumps(conf), tuple(netns))
    return rig, plugins


def run(args: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench cni")
    parser.add_argument("--rounds", type=int, default=60,
                        help="measured rounds one at a time (>= 20)")
    parser.add_argument("--burst-rounds", type=int, default=10,
                        help=f"measured rounds of {BURST} at once (>= 2)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--interpreter", default=None,
                        help="Python for the installed plugin (default: the one running this)")
    opts = parser.parse_args(args)
    if opts.rounds < 20 or opts.burst_rounds < 2:
        parser.error("--rounds must be at least 20 and --burst-rounds at least 2")
    python = resolve_interpreter(opts.interpreter)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="weavepy-bench-cni-") as tmp, \
            Sandbox.create(nodes=1) as box:
        node = box.nodes[0]
        rig, plugins = _setup(box, Path(tmp), python)
        node.call(one_at_a_time, plugins, opts.warmup, python, timeout=600)
        log_start = len(rig.log(node))
        single = node.call(one_at_a_time, plugins, opts.rounds, python, timeout=1800)
        log_middle = len(rig.log(node))
        burst = node.call(all_at_once, plugins, opts.burst_rounds, timeout=1800)
        log_text = rig.log(node)
        rig.stop(node)
    agent_single = agent_times(log_text[log_start:log_middle])
    agent_burst = agent_times(log_text[log_middle:])
    return report(opts, python, load_before, single, burst, agent_single, agent_burst)


def _ratio(samples: dict[str, list[float]], ours: str, theirs: str) -> str:
    a, b = samples[ours], samples[theirs]
    low, high = ratio_interval(a, b)
    return f"{statistics.median(a) / statistics.median(b):.2f}x ({low:.2f}-{high:.2f})"


def report(opts: argparse.Namespace, python: str, load_before: float,
           single: dict[str, list[float]], burst: dict[str, list[float]],
           agent_single: dict[str, list[float]], agent_burst: dict[str, list[float]]) -> str:
    rows_single = []
    for command in ("ADD", "DEL"):
        ratio = statistics.median(single[f"weavepy {command}"]) / statistics.median(
            single[f"reference {command}"])
        rows_single.append([
            command, median_spread(single[f"weavepy {command}"]),
            median_spread(single[f"reference {command}"]),
            _ratio(single, f"weavepy {command}", f"reference {command}"),
            _ratio(single, f"reference-again {command}", f"reference {command}"),
            f"{'met' if ratio <= GOAL else 'NOT met'}" if command == "ADD" else "-"])
    rows_burst = []
    for command in ("ADD", "DEL"):
        rows_burst.append([
            command, median_spread(burst[f"weavepy {command}"]),
            median_spread(burst[f"reference {command}"]),
            _ratio(burst, f"weavepy {command}", f"reference {command}"),
            median_spread(burst[f"weavepy {command} wall"]),
            median_spread(burst[f"reference {command} wall"]),
            _ratio(burst, f"weavepy {command} wall", f"reference {command} wall"),
            _ratio(burst, f"reference-again {command} wall", f"reference {command} wall")])

    def part(samples: dict[str, list[float]], key: str) -> str:
        values = samples.get(key, [])
        return median_spread(values) if values else "n/a (no debug lines)"

    def rest(total: list[float], agent: list[float]) -> str:
        if not agent:
            return "n/a"
        return f"{statistics.median(total) - statistics.median(agent):.1f}"

    def waiting(agent: dict[str, list[float]], command: str) -> str:
        pairs = zip(agent.get(command, []), agent.get(f"{command} work", []), strict=True)
        values = [total - work for total, work in pairs]
        return median_spread(values) if values else "n/a"

    breakdown = [
        ["`python -IS -c pass` (interpreter start-up: the floor of any Python plugin)",
         median_spread(single["python -IS -c pass"]), "-"],
        ["weavepy-cni VERSION (the plugin alone, no agent)",
         median_spread(single["weavepy VERSION"]), "-"],
    ]
    for command in ("ADD", "DEL"):
        breakdown += [
            [f"{command}: the agent, accept to reply sent (its log)",
             part(agent_single, command), part(agent_burst, command)],
            [f"{command}: ... of which work on its CNI thread (IPAM, persist, netlink)",
             part(agent_single, f"{command} work"), part(agent_burst, f"{command} work")],
            [f"{command}: ... of which reading the request and waiting for the thread",
             waiting(agent_single, command), waiting(agent_burst, command)],
            [f"{command}: plugin, exec and socket (weavepy {command} median minus the agent's)",
             rest(single[f"weavepy {command}"], agent_single.get(command, [])),
             rest(burst[f"weavepy {command}"], agent_burst.get(command, []))],
        ]
    n_single, n_burst = opts.rounds, opts.burst_rounds * BURST
    return "\n\n".join([
        f"CNI latency in ms through a real agent (`weavepy launch`, a one-node cluster: "
        f"addresses from the block its IPAM claimed, persisted before each answer), against "
        f"the reference plugins; plugins exec'd directly inside one sandbox node, the systems "
        f"alternating (order rotated) within each round, after {opts.warmup} warm-up round(s). "
        f"Values: median (min, max or p99: p99 only from 100 samples). Ratios: of medians, "
        f"with a 90 % bootstrap interval.",
        anchor_version("Anchor", None, "containernetworking-plugins")
        + " (`bridge` + `host-local`; the binaries print 'version unknown'). A/A control: "
        "the same reference on a second bridge and subnet (`reference again`).",
        f"**One at a time** ({n_single} pods per system and command):",
        table(["command", "weavepy-cni through the agent", "reference", "ratio",
               "A/A: reference again / reference", f"goal <= {GOAL}x"], rows_single),
        f"**{BURST} at once** (a ReplicaSet starting; {opts.burst_rounds} rounds, "
        f"{n_burst} pods per system and command):",
        table(["command", "weavepy per pod", "reference per pod", "ratio per pod",
               f"weavepy all {BURST} done", f"reference all {BURST} done", "ratio all done",
               "A/A all done"], rows_burst),
        "Where weavepy's time goes (ms; the agent's part from its debug log):",
        table(["part", "one at a time", f"{BURST} at once"], breakdown),
        f"Plugin interpreter: `{python} -IS`. 1-minute load average {load_before:.1f} before "
        f"and {os.getloadavg()[0]:.1f} after the run ({os.cpu_count()} cores). The agent "
        f"serves CNI on one thread, so {BURST} at once queue behind each other inside it; the "
        "reference plugins are 10 separate processes serialized only by host-local's lock.",
    ])

