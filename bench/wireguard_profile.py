"""bench.wireguard_profile: where the encrypted path's CPU goes, by shared object (`perf`).

The same 2-node pod network as bench.wireguard (bench.wireguard.PodNetwork), our devices run
in-process as the agent runs them. For each transport, iperf3 sends one TCP stream pod 1 ->
pod 2 for 8 s; 2 s in, `perf record -g` samples each node's device process for 2.5 s (one
after the other), and `perf report --sort dso` splits its time between the kernel, the
Python interpreter, cryptography's AEAD (`_rust.abi3.so`, linked with OpenSSL), numpy and
libc. Each node's process serves both directions of that node (data one way, ACKs the other).
No anchor runs here: bench.wireguard has the side-by-side numbers; this says where ours go.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import threading
import time
from pathlib import Path

from bench.common import no_anchor
from bench.wireguard import EXT_PORT, STD_PORT, PodNetwork
from weavepy.devtools.sandbox import Sandbox

WORKDIR = Path("/tmp/weavepy-bench-wireguard-profile")
KINDS = (("weavepy-standard", STD_PORT), ("weavepy-extension", EXT_PORT))


def _split(data: Path, limit: float) -> list[tuple[str, float]]:
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso", "--stdio", "-q",
         "-g", "none", "--percent-limit", str(limit)],
        capture_output=True, text=True, timeout=120, check=False,
    ).stdout
    rows = []
    for line in report.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith("%"):
            rows.append((parts[1], float(parts[0].rstrip("%"))))
    return rows


def _label(dso: str) -> str:
    return {
        "[kernel.kallsyms]": "kernel",
        "_rust.abi3.so": "AEAD (cryptography)",
        "libc.so.6": "libc",
    }.get(dso, "Python interpreter" if dso.startswith("libpython") or dso == "python3.11"
          else "numpy" if dso.startswith("_multiarray") else dso)


def run(args: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench wireguard_profile")
    parser.add_argument("--seconds", type=float, default=2.5, help="sampling time per process")
    options = parser.parse_args(args)
    if shutil.which("perf") is None:
        raise SystemExit("Error: needs `perf` (Debian package linux-perf)")
    WORKDIR.mkdir(parents=True, exist_ok=True)
    box = Sandbox.create(nodes=2)
    network: PodNetwork | None = None
    sections: list[str] = []
    try:
        network = PodNetwork(box, WORKDIR)
        for kind, port in KINDS:
            network.add_weavepy(kind, extension=kind.endswith("extension"), port=port,
                                workers=False)
        for kind, _ in KINDS:
            network.use(kind)
            network.ping(count=3)
            pids = [p.pid for p in network.tunnels[kind].processes]
            result: dict[str, float] = {}
            active = network

            def load(active: PodNetwork = active, result: dict[str, float] = result) -> None:
                result.update(active.iperf(1, 4 + 2 * options.seconds, []))

            loader = threading.Thread(target=load)
            loader.start()
            time.sleep(2)
            splits = {}
            for label, pid in zip(("sending node", "receiving node"), pids, strict=True):
                data = WORKDIR / f"{kind}-{label.split()[0]}.data"
                subprocess.run(
                    ["perf", "record", "-q", "-F", "999", "-g", "-p", str(pid), "-o", str(data),
                     "--", "sleep", str(options.seconds)],
                    capture_output=True, timeout=60, check=False,
                )
                splits[label] = _split(data, 1.5)
            loader.join()
            lines = [f"**{kind}** ({result.get('gbps', 0.0):.2f} Gbit/s while sampling)", "",
                     "| process | share of samples |", "|---|---|"]
            for label, rows in splits.items():
                text = ", ".join(f"{_label(dso)} {share:.0f} %" for dso, share in rows)
                lines.append(f"| {label} | {text} |")
            sections.append("\n".join(lines))
    finally:
        if network is not None:
            network.close()
        box.destroy()
    return (
        no_anchor("bench.wireguard has the side-by-side numbers; this says where ours go.")
        + "\n\nperf record -F 999 -g on each node's device process (in-process engines, as in the "
        f"agent), {options.seconds:g} s each during a 1-stream iperf3; shares of that "
        "process's samples by shared object (below 1.5 % left out).\n\n"
        + "\n\n".join(sections)
    )
