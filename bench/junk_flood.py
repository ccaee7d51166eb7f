"""A flood of junk at a weavepy agent's gossip port: memory stays bounded, the cluster healthy.

`python -m bench junk_flood [--nodes 3] [--secs 60] [--rate 20000] [--seed 8]`

A sandbox of `--nodes` nodes runs one weavepy agent each (gossip encrypted with a shared key,
as deployed). Once the mesh is complete, a flooder forked inside the last node's network
namespace sends junk UDP datagrams at the first node's gossip port (6783) for `--secs` seconds,
at most `--rate` per second: random bytes of random length (0-1400), datagrams that look like
encrypted gossip (version byte 1, random nonce and tag), plaintext gossip message types, and
oversized ones (up to 65 000 bytes). The target agent's RSS is sampled before, every second
during, and after the flood; its `/status` gives the drops it counted (by reason), the
node's UDP counters (`/proc/net/snmp` in its namespace) the datagrams the kernel dropped for a
full socket buffer. After the flood every agent must still see every member alive, with no
suspicion or probe failure raised during the run (false failures). The flooder never leaves
the sandbox: its traffic stays on the sandbox's underlay bridge (198.18.0.0/24).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import no_anchor, summary, table
from weavepy.devtools.agentbox import AgentBox
from weavepy.devtools.sandbox import Sandbox

GOSSIP_PORT = 6783
MIB = 1024 * 1024


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / MIB
    return float("nan")


def udp_counters() -> dict[str, int]:
    """This namespace's UDP counters (InDatagrams, RcvbufErrors, ...)."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()
             if line.startswith("Udp:")]
    return {key: int(value) for key, value in zip(lines[0][1:], lines[1][1:], strict=True)}


def junk(rng: random.Random) -> bytes:
    kind = rng.randrange(10)
    if kind < 5:
        return rng.randbytes(rng.randint(0, 1400))
    if kind < 8:  # looks like an encrypted packet (version 1 + nonce + ciphertext + tag)
        return b"\x01" + rng.randbytes(rng.randint(12, 1400))
    if kind < 9:  # a plaintext message type byte and garbage
        return bytes([rng.randrange(0, 16)]) + rng.randbytes(rng.randint(0, 200))
    return rng.randbytes(rng.randint(9000, 65000))


def flood(target: str, port: int, secs: float, rate: int, seed: int) -> tuple[int, int]:
    """Inside a node: junk at target:port for `secs` seconds, at most `rate` per second.
    Returns (datagrams sent, send errors)."""
    rng = random.Random(seed)
    sent = errors = 0
    started = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        while (elapsed := time.monotonic() - started) < secs:
            if sent >= rate * elapsed:
                time.sleep(0.002)
                continue
            for _ in range(50):
                try:
                    sock.sendto(junk(rng), (target, port))
                    sent += 1
                except OSError:
                    errors += 1
    return sent, errors


def status_summary(rig: AgentBox, box: Sandbox) -> dict[str, Any]:
    """Per node: members seen alive, suspicions, probe failures, drops by reason."""
    found: dict[str, Any] = {}
    for node in box.nodes:
        doc = rig.status(node)
        if doc is None:
            found[node.name] = None
            continue
        gossip = doc["gossip"]
        found[node.name] = {
            "alive": sorted(p["name"] for p in doc["peers"] if p["state"] == "alive"),
            "suspicions": gossip["suspicions"], "probe_failures": gossip["probe_failures"],
            "drops": dict(gossip["drops"]), "packets_in": gossip["packets_in"]}
    return found


def run(args: Sequence[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench junk_flood")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--secs", type=float, default=60.0)
    parser.add_argument("--rate", type=int, default=20000, help="datagrams/s at most")
    parser.add_argument("--seed", type=int, default=8)
    options = parser.parse_args(list(args))
    if os.geteuid() != 0:
        raise SystemExit("junk_flood needs root (it builds a sandbox of network namespaces)")
    box = Sandbox.create(nodes=options.nodes)
    try:
        rig = AgentBox(box, pod_range=str(box.pod_range))
        rig.launch_all()
        rig.wait_mesh(timeout=90)
        time.sleep(5)  # settle
        target, flooder = box.nodes[0], box.nodes[-1]
        pid = rig.agents[target.name].pid
        before_status = status_summary(rig, box)
        udp_before = target.call(udp_counters)
        rss_before = rss_mib(pid)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(flooder.call, flood, target.underlay_ip, GOSSIP_PORT,
                              options.secs, options.rate, options.seed,
                              timeout=options.secs + 60)
            during: list[float] = []
            while not job.done():
                during.append(rss_mib(pid))
                time.sleep(1.0)
            sent, errors = job.result()
        time.sleep(3)  # the target's queue drains
        udp_after = target.call(udp_counters)
        rss_right_after = rss_mib(pid)
        time.sleep(12)  # a few probe rounds and push/pulls after the flood
        rss_after = rss_mib(pid)
        after_status = status_summary(rig, box)
        names = sorted(n.name for n in box.nodes)
    finally:
        box.destroy()

    drops_before = before_status[target.name]["drops"] if before_status[target.name] else {}
    drops_after = after_status[target.name]["drops"] if after_status[target.name] else {}
    new_drops = {k: v - drops_before.get(k, 0) for k, v in drops_after.items()
                 if v - drops_before.get(k, 0)}
    kernel_in = udp_after["InDatagrams"] - udp_before["InDatagrams"]
    kernel_full = udp_after.get("RcvbufErrors", 0) - udp_before.get("RcvbufErrors", 0)
    healthy = all(doc is not None and doc["alive"] == [n for n in names if n != name]
                  for name, doc in after_status.items())  # peers lists the others
    false_failures = {
        name: (doc["suspicions"] - before_status[name]["suspicions"],
               doc["probe_failures"] - before_status[name]["probe_failures"])
        for name, doc in after_status.items() if doc is not None and before_status[name]}
    stats = summary(during)
    rows = [
        ["junk datagrams sent (send errors)", f"{sent} ({errors}) in {options.secs:g} s, "
         f"{sent / options.secs:.0f}/s"],
        ["delivered to the target's namespace (UDP InDatagrams, all ports)", str(kernel_in)],
        ["dropped by the kernel, socket buffer full (RcvbufErrors)", str(kernel_full)],
        ["counted as drops by the agent", f"{sum(new_drops.values())} ("
         + ", ".join(f"{k} {v}" for k, v in sorted(new_drops.items())) + ")"],
        ["target RSS MiB before", f"{rss_before:.1f}"],
        ["target RSS MiB during (median / max)", f"{stats['median']:.1f} / {stats['max']:.1f}"],
        ["target RSS MiB right after / 15 s after", f"{rss_right_after:.1f} / {rss_after:.1f}"],
        ["cluster after: every node sees every member alive", "yes" if healthy else
         f"NO: {after_status}"],
        ["suspicions / probe failures raised during the run, per node",
         ", ".join(f"{n} {s}/{p}" for n, (s, p) in sorted(false_failures.items()))],
    ]
    return (no_anchor("The figures are bounds on weavepy alone (memory stays bounded, no "
                      "false failure); serf is not flooded beside it.") + "\n\n"
            f"{options.nodes} weavepy agents in a sandbox (encrypted gossip); junk from "
            f"{flooder.name} at {target.name}:{GOSSIP_PORT}/udp, seed {options.seed}.\n\n"
            + table(["", "value"], rows)
            + "\n\nEvery junk datagram that reaches the agent's socket is either counted as a "
            "drop by reason or (for datagrams that decrypt, impossible without the key) "
            "processed; the remainder of `sent` was lost in the kernel (socket buffer full, "
            "counted above) or on the veth/bridge path. Suspicions and probe failures are the "
            "agents' cumulative gossip counters, after minus before the flood.\n")
