"""bench.cni: CNI ADD and DEL latency of weavepy-cni against the reference bridge + host-local.

One sandbox node runs the weavepy CNI server (`python -m weavepy.cni.server`, block
198.19.1.0/24, bridge wpbr0). Inside that node, a forked child execs the plugins directly, as a
runtime would, alternating weavepy and reference and ADD/DEL within every round, each into its
own pod namespace:

- weavepy: the installed `weavepy-cni` file (`#!<python> -IS`, forwarding to the server);
- reference: Debian's `bridge` plugin with `host-local` IPAM (198.19.2.0/24, bridge refbr0,
  isGateway), the Go plugins every CNI comparison starts from.

The report gives medians (and min, p99) of at least 20 rounds, the ratio weavepy/reference
(goal: at most 1.5x), and where weavepy's time goes: the plugin's interpreter start-up
(`python -IS -c pass`, the floor for any Python plugin), a VERSION answered without the agent,
and the agent's own handling time (from its debug log). Everything is created under the
sandbox prefix and removed at the end, even on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import summary, table
from weavepy.cni.install import install_cni, resolve_interpreter
from weavepy.devtools.sandbox import Sandbox

REFERENCE_DIR = "/usr/lib/cni"
WEAVEPY_BLOCK = "198.19.1.0/24"
REFERENCE_SUBNET = "198.19.2.0/24"
CNI_ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=pod;K8S_POD_UID=u"


def _exec_ms(argv: Sequence[str], env: dict[str, str], stdin: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run(list(argv), input=stdin, env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    elapsed = (time.perf_counter() - start) * 1e3
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stdout} {proc.stderr}")
    return elapsed


def _measure(plugins: dict[str, tuple[str, str, str]], rounds: int, warmup: int,
             python: str) -> dict[str, list[float]]:
    """Runs inside the node: {"<name> ADD": [ms...], "<name> DEL": [...], ...}.

    `plugins` maps a name to (plugin path, config JSON, pod netns path).
    """
    samples: dict[str, list[float]] = {}
    base = dict(os.environ, CNI_IFNAME="eth0", CNI_ARGS=CNI_ARGS)
    names = list(plugins)
    for round_index in range(warmup + rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for command in ("ADD", "DEL"):
            for name in order:
                path, conf, netns = plugins[name]
                env = dict(base, CNI_COMMAND=command, CNI_CONTAINERID=f"bench{name}",
                           CNI_NETNS=netns, CNI_PATH=f"{Path(path).parent}:{REFERENCE_DIR}")
                ms = _exec_ms([path], env, conf)
                if round_index >= warmup:
                    samples.setdefault(f"{name} {command}", []).append(ms)
        if round_index >= warmup:
            weavepy_path = plugins["weavepy"][0]
            env = dict(base, CNI_COMMAND="VERSION")
            samples.setdefault("weavepy VERSION (no agent)", []).append(
                _exec_ms([weavepy_path], env, json.dumps({"cniVersion": "1.0.0"})))
            samples.setdefault("python -IS -c pass", []).append(
                _exec_ms([python, "-IS", "-c", "pass"], env, ""))
    return samples


def _agent_times(log_text: str, command: str) -> list[float]:
    pattern = re.compile(rf"CNI {command} -> code 0 in ([0-9.]+) ms")
    return [float(m.group(1)) for m in pattern.finditer(log_text)]


def _fmt(values: Sequence[float]) -> str:
    s = summary(values)
    return f"{s['median']:.1f} (min {s['min']:.1f}, p99 {s['p99']:.1f})"


def run(args: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench cni")
    parser.add_argument("--rounds", type=int, default=60, help="measured rounds (>= 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--interpreter", default=None,
                        help="Python for the installed plugin (default: the one running this)")
    opts = parser.parse_args(args)
    if opts.rounds < 20:
        parser.error("--rounds must be at least 20")
    python = resolve_interpreter(opts.interpreter)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="weavepy-bench-cni-") as tmp, \
            Sandbox.create(nodes=1) as box:
        work = Path(tmp)
        node = box.nodes[0]
        sock = work / "cni.sock"
        installed = install_cni(work / "bin", work / "net.d", socket_path=str(sock),
                                interpreter=python)
        server = node.start("cni", [
            sys.executable, "-m", "weavepy.cni.server", "--socket", str(sock),
            "--bridge", "wpbr0", "--block", WEAVEPY_BLOCK, "--state-dir", str(work / "state"),
            "--log-level", "DEBUG"])
        deadline = time.monotonic() + 30
        while "listening" not in server.log_text():
            if time.monotonic() > deadline or not server.alive():
                raise RuntimeError(f"CNI server did not start: {server.log_text()[-2000:]}")
            time.sleep(0.05)
        pods = {}
        for name in ("weavepy", "reference"):
            subprocess.run(["ip", "netns", "add", f"{box.prefix}-{name}"], check=True,
                           timeout=30)
            pods[name] = f"/run/netns/{box.prefix}-{name}"
        weavepy_conf = json.dumps({"cniVersion": "1.0.0", "name": "weavepy",
                                   "type": "weavepy-cni", "socketPath": str(sock)})
        reference_conf = json.dumps({
            "cniVersion": "1.0.0", "name": "reference", "type": "bridge", "bridge": "refbr0",
            "isGateway": True, "ipam": {"type": "host-local", "subnet": REFERENCE_SUBNET,
                                        "dataDir": str(work / "host-local")}})
        plugins = {
            "weavepy": (str(installed.plugin), weavepy_conf, pods["weavepy"]),
            "reference": (f"{REFERENCE_DIR}/bridge", reference_conf, pods["reference"]),
        }
        samples: dict[str, list[float]] = node.call(_measure, plugins, opts.rounds,
                                                    opts.warmup, python, timeout=600)
        server.stop()
        log_text = server.log_text()

    rows: list[list[Any]] = []
    ratios = {}
    for command in ("ADD", "DEL"):
        ours = samples[f"weavepy {command}"]
        ref = samples[f"reference {command}"]
        ratio = statistics.median(ours) / statistics.median(ref)
        ratios[command] = ratio
        rows.append([command, _fmt(ours), _fmt(ref), f"{ratio:.2f}x",
                     "yes" if ratio <= 1.5 else "no"])
    breakdown = [
        ["`python -IS -c pass` (interpreter start-up, the floor)",
         _fmt(samples["python -IS -c pass"])],
        ["weavepy-cni VERSION (answered by the plugin, no agent)",
         _fmt(samples["weavepy VERSION (no agent)"])],
        ["agent handling ADD (socket accept to reply sent)", _fmt(_agent_times(log_text, "ADD"))],
        ["agent handling DEL", _fmt(_agent_times(log_text, "DEL"))],
    ]
    return "\n\n".join([
        f"CNI latency, ms, {opts.rounds} rounds after {opts.warmup} warm-up, plugins exec'd "
        "directly inside one sandbox node, weavepy and reference alternating within each "
        "round. Reference: Debian containernetworking-plugins `bridge` + `host-local`.",
        table(["command", "weavepy-cni median", "reference median", "ratio",
               "goal <= 1.5x met"], rows),
        "Where weavepy's time goes (ms, median):",
        table(["part", "ms"], breakdown),
        f"ADD ratio {ratios['ADD']:.2f}x, DEL ratio {ratios['DEL']:.2f}x. Plugin interpreter: "
        f"`{python} -IS`. 1-minute load average {load_before:.1f} before and "
        f"{os.getloadavg()[0]:.1f} after the run ({os.cpu_count()} cores; other work shares "
        "them, which inflates medians on both sides).",
    ])
