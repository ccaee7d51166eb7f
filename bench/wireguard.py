"""bench.wireguard: encrypted pod-to-pod throughput, CPU and latency, through real agents and
through the standalone device, against VXLAN and wireguard-go in the same run.

**Through agents (the product, first table).** Each agent path is a 2-node sandbox running two
real agents (`weavepy launch`), with one pod per node created by CNI ADD through the installed
plugin, so the MTU, gso_max_size, routes and tunnel are whatever the agent chose:

- agents-vxlan: no flag (kernel VXLAN, the default);
- agents-standard: `--encrypt --wg-standard-only` (stock WireGuard transport messages);
- agents-wgx: `--encrypt` (the super-packet extension `wgx`, weavepy to weavepy);
- agents-vxlan-again: a second VXLAN pair, the A/A control for the noise.

**Standalone devices (second table).** One more 2-node sandbox; on each node a "pod" namespace
sits behind a bridge (198.19.<i>.2 behind 198.19.<i>.1/24), so the traffic is forwarded, as pod
traffic is. Every path exists at once; a path is chosen by replacing the nodes' route to the
other pod subnet and setting the pod MTU (and, for our TUN paths, the pod veth's gso_max_size
to the TUN's, the rule from research/dataplane-forwarded.md):

- wireguard-go: Debian's wireguard-go + wg, MTU 1420 (the anchor of both tables);
- weavepy-standard: our device alone with stock WireGuard transport messages, MTU 1420;
- weavepy-to-wireguard-go: our device (standard transport) on node 1, Debian's wireguard-go on
  node 2, so pod 1 -> pod 2 is weavepy sending to a stock receiver (port 51823);
- weavepy-extension: our device alone with the super-packet extension;
- vxlan: kernel VXLAN, flannel-style by hand (VNI 1, port 8472), unencrypted, MTU 1450;
- plain: routing over the underlay, MTU 1500 (the physical limit).

Every path of both tables is interleaved within each repetition, the order rotated between
repetitions. iperf3 TCP runs from pod 1 to pod 2 with 1 and 4 streams; ping runs between the
pods on the idle link in every repetition. CPU is the user+system time of the tunnel processes
(the agents, wireguard-go, or our device and its workers, on both nodes) per Gbit transferred.
The report prints wireguard-go's version: Debian's predates its 2023 TUN offloads, and every
ratio against it says so.

`run(args)` returns the markdown report; `PodNetwork` is also used by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import anchor_version, table
from tunnel.wireguard.keys import PrivateKey
from weavepy.cni.install import install_cni
from weavepy.devtools.agentbox import AgentBox
from weavepy.devtools.sandbox import ManagedProcess, Sandbox, SandboxNode

REPO = Path(__file__).resolve().parents[1]
TUN_GSO_MAX_SIZE = 62000
WG_PORT, STD_PORT, EXT_PORT, MIXED_PORT = 51820, 51821, 51822, 51823
PATHS = (
    "wireguard-go",
    "weavepy-standard",
    "weavepy-to-wireguard-go",
    "weavepy-extension",
    "vxlan",
    "plain",
)
PATH_MTU = {
    "wireguard-go": 1420,
    "weavepy-standard": 1420,
    "weavepy-to-wireguard-go": 1420,
    "weavepy-extension": 1420,
    "vxlan": 1450,
    "plain": 1500,
}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def pod_ip(index: int) -> str:
    return f"198.19.{index}.2"


def pod_subnet(index: int) -> str:
    return f"198.19.{index}.0/24"


@dataclass
class Tunnel:
    """One tunnel daemon per node, named per run."""

    kind: str
    devices: list[str]  # per node (wireguard-go's UAPI socket names are machine-wide)
    processes: list[ManagedProcess] = field(default_factory=list)
    status_files: list[Path] = field(default_factory=list)


class PodNetwork:
    """Pods behind bridges on the first two nodes of a sandbox, plus tunnels between them."""

    def __init__(self, box: Sandbox, workdir: Path) -> None:
        self.box = box
        self.workdir = workdir
        self.nodes: list[SandboxNode] = box.nodes[:2]
        self.pods: list[str] = []
        self.veth = f"{box.prefix}vp"  # node side of the pod veth, in each node
        self.bridge = f"{box.prefix}pb"
        self.tunnels: dict[str, Tunnel] = {}
        for index, node in enumerate(self.nodes, start=1):
            pod = f"{box.prefix}-p{index}"
            self.pods.append(pod)
            _ip(["netns", "add", pod])
            _ip(["-n", pod, "link", "set", "lo", "up"])
            node.run(["ip", "link", "add", self.bridge, "type", "bridge"])
            node.run(["ip", "addr", "add", f"198.19.{index}.1/24", "dev", self.bridge])
            node.run(["ip", "link", "set", self.bridge, "up"])
            node.run(
                [
                    "ip",
                    "link",
                    "add",
                    self.veth,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    pod,
                ]
            )
            node.run(["ip", "link", "set", self.veth, "master", self.bridge, "up"])
            _ip(["-n", pod, "addr", "add", f"{pod_ip(index)}/24", "dev", "eth0"])
            _ip(["-n", pod, "link", "set", "eth0", "up"])
            _ip(["-n", pod, "route", "add", "default", "via", f"198.19.{index}.1"])

    # ------------------------------------------------------------------ tunnels

    def add_vxlan(self) -> None:
        name = f"{self.box.prefix}vx"
        macs = []
        for index, node in enumerate(self.nodes, start=1):
            node.run(
                [
                    "ip",
                    "link",
                    "add",
                    name,
                    "type",
                    "vxlan",
                    "id",
                    "1",
                    "local",
                    node.underlay_ip,
                    "dev",
                    node.iface,
                    "dstport",
                    "8472",
                    "nolearning",
                ]
            )
            node.run(["ip", "addr", "add", f"198.19.{index}.0/32", "dev", name])
            node.run(["ip", "link", "set", name, "mtu", "1450", "up"])
            link = json.loads(node.run(["ip", "-j", "link", "show", name]).stdout)[0]
            macs.append(link["address"])
        for index, node in enumerate(self.nodes, start=1):
            other = 3 - index
            remote = self.nodes[other - 1]
            node.run(
                [
                    "ip",
                    "neigh",
                    "add",
                    f"198.19.{other}.0",
                    "lladdr",
                    macs[other - 1],
                    "dev",
                    name,
                    "nud",
                    "permanent",
                ]
            )
            node.run(
                ["bridge", "fdb", "append", macs[other - 1], "dev", name, "dst", remote.underlay_ip]
            )
        self.tunnels["vxlan"] = Tunnel("vxlan", [name, name])

    def _start_wireguard_go(self, node: SandboxNode, name: str) -> ManagedProcess:
        process = node.start(
            f"wggo-{name}", ["wireguard-go", "-f", name], env={"WG_PROCESS_FOREGROUND": "1"}
        )
        deadline = time.monotonic() + 10
        while node.run(["ip", "link", "show", name], check=False).returncode != 0:
            if time.monotonic() > deadline or not process.alive():
                raise RuntimeError(f"wireguard-go did not start: {process.log_text()}")
            time.sleep(0.05)
        return process

    def _configure_wireguard_go(
        self,
        node: SandboxNode,
        name: str,
        key: PrivateKey,
        port: int,
        peer: PrivateKey,
        peer_node: SandboxNode,
        peer_subnet: str,
    ) -> None:
        key_file = self.workdir / f"{node.name}-{name}.key"
        key_file.write_text(key.to_base64())
        node.run(
            [
                "wg",
                "set",
                name,
                "private-key",
                str(key_file),
                "listen-port",
                str(port),
                "peer",
                peer.public_key.to_base64(),
                "endpoint",
                f"{peer_node.underlay_ip}:{port}",
                "allowed-ips",
                peer_subnet,
            ]
        )
        node.run(["ip", "link", "set", name, "mtu", "1420", "up"])

    def add_wireguard_go(self) -> None:
        names = [f"{self.box.prefix}g{i}" for i in (1, 2)]
        keys = [PrivateKey.generate(), PrivateKey.generate()]
        tunnel = Tunnel("wireguard-go", names)
        for index, node in enumerate(self.nodes, start=1):
            tunnel.processes.append(self._start_wireguard_go(node, names[index - 1]))
        for index, node in enumerate(self.nodes, start=1):
            other = 3 - index
            self._configure_wireguard_go(
                node,
                names[index - 1],
                keys[index - 1],
                WG_PORT,
                keys[other - 1],
                self.nodes[other - 1],
                pod_subnet(other),
            )
        self.tunnels["wireguard-go"] = tunnel

    def add_weavepy_to_wireguard_go(self, workers: bool = True) -> None:
        """Our device (standard transport) on node 1, wireguard-go on node 2."""
        ours, theirs = PrivateKey.generate(), PrivateKey.generate()
        name_ours, name_theirs = f"{self.box.prefix}m1", f"{self.box.prefix}m2"
        kind = "weavepy-to-wireguard-go"
        tunnel = Tunnel(kind, [name_ours, name_theirs])
        wg_process = self._start_wireguard_go(self.nodes[1], name_theirs)
        self._configure_wireguard_go(
            self.nodes[1], name_theirs, theirs, MIXED_PORT, ours, self.nodes[0], pod_subnet(1)
        )
        process, status = self._start_weavepy_device(
            self.nodes[0],
            name_ours,
            ours,
            MIXED_PORT,
            theirs,
            self.nodes[1],
            pod_subnet(2),
            extension=False,
            workers=workers,
            extra=None,
        )
        tunnel.processes += [process, wg_process]
        tunnel.status_files.append(status)
        self._wait_ready(tunnel)
        self.tunnels[kind] = tunnel

    def _start_weavepy_device(
        self,
        node: SandboxNode,
        name: str,
        key: PrivateKey,
        port: int,
        peer: PrivateKey,
        peer_node: SandboxNode,
        peer_subnet: str,
        *,
        extension: bool,
        workers: bool,
        extra: dict[str, Any] | None,
    ) -> tuple[ManagedProcess, Path]:
        status = self.workdir / f"{node.name}-{name}-status.json"
        config = {
            "name": name,
            "private_key": key.to_base64(),
            "listen_port": port,
            "mtu": 1420,
            "gso_max_size": TUN_GSO_MAX_SIZE,
            "workers": workers,
            "status_file": str(status),
            "peers": [
                {
                    "public_key": peer.public_key.to_base64(),
                    "allowed_ips": [peer_subnet],
                    "endpoint": [str(peer_node.underlay_ip), port],
                    "extension_ok": extension,
                }
            ],
            **(extra or {}),
        }
        path = self.workdir / f"{node.name}-{name}.json"
        path.write_text(json.dumps(config))
        process = node.start(
            name, [sys.executable, "-m", "tunnel.wireguard.device", str(path)], cwd=str(REPO)
        )
        return process, status

    def _wait_ready(self, tunnel: Tunnel) -> None:
        deadline = time.monotonic() + 60
        while not all(_read_json(f).get("ready") for f in tunnel.status_files):
            for process in tunnel.processes:
                if not process.alive():
                    raise RuntimeError(f"{tunnel.kind} died: {process.log_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{tunnel.kind} never became ready")
            time.sleep(0.1)

    def add_weavepy(
        self,
        kind: str,
        *,
        extension: bool,
        port: int,
        workers: bool = True,
        extra: dict[str, Any] | None = None,
    ) -> Tunnel:
        name = f"{self.box.prefix}{'x' if extension else 'w'}"
        keys = [PrivateKey.generate(), PrivateKey.generate()]
        tunnel = Tunnel(kind, [name, name])
        for index, node in enumerate(self.nodes, start=1):
            other = 3 - index
            process, status = self._start_weavepy_device(
                node,
                name,
                keys[index - 1],
                port,
                keys[other - 1],
                self.nodes[other - 1],
                pod_subnet(other),
                extension=extension,
                workers=workers,
                extra=extra,
            )
            tunnel.processes.append(process)
            tunnel.status_files.append(status)
        self._wait_ready(tunnel)
        self.tunnels[kind] = tunnel
        return tunnel

    def status(self, kind: str) -> list[dict[str, Any]]:
        return [_read_json(f) for f in self.tunnels[kind].status_files]

    # ------------------------------------------------------------------ choosing a path

    def use(self, kind: str, pod_gso_max_size: int | None = None) -> None:
        """Route pod traffic over `kind` and size the pod side for it."""
        mtu = PATH_MTU[kind]
        if pod_gso_max_size is None:
            pod_gso_max_size = TUN_GSO_MAX_SIZE if kind.startswith("weavepy") else 65536
        for index, node in enumerate(self.nodes, start=1):
            other = 3 - index
            if kind == "plain":
                via = ["via", self.nodes[other - 1].underlay_ip, "dev", node.iface]
            elif kind == "vxlan":
                via = [
                    "via",
                    f"198.19.{other}.0",
                    "dev",
                    self.tunnels[kind].devices[index - 1],
                    "onlink",
                ]
            else:
                via = ["dev", self.tunnels[kind].devices[index - 1]]
            node.run(["ip", "route", "replace", pod_subnet(other), *via])
            node.run(["ip", "link", "set", self.veth, "mtu", str(mtu)])
            pod = self.pods[index - 1]
            _ip(
                [
                    "-n",
                    pod,
                    "link",
                    "set",
                    "eth0",
                    "mtu",
                    str(mtu),
                    "gso_max_size",
                    str(pod_gso_max_size),
                ]
            )
            _ip(["-n", pod, "route", "flush", "cache"])
            node.run(["ip", "route", "flush", "cache"])

    # ------------------------------------------------------------------ measuring

    def iperf(self, streams: int, seconds: float, pids: Sequence[int]) -> dict[str, float]:
        """pod 1 -> pod 2 TCP; Gbit/s, retransmits and tunnel CPU seconds over the run."""
        return iperf(self.box, self.pods[0], self.pods[1], pod_ip(2), streams, seconds, pids)

    def ping(self, count: int = 20) -> float:
        return ping(self.pods[0], pod_ip(2), count)["avg"]

    def tunnel_pids(self, kind: str) -> list[int]:
        tunnel = self.tunnels.get(kind)
        if tunnel is None:
            return []
        pids = [p.pid for p in tunnel.processes]
        return pids + [child for pid in pids for child in _children(pid)]

    def close(self) -> None:
        for tunnel in self.tunnels.values():
            for process in tunnel.processes:
                process.stop(timeout=3)
        for pod in self.pods:
            _ip(["netns", "del", pod], check=False)


# ---------------------------------------------------------------------------- helpers


def _ip(args: list[str], check: bool = True) -> None:
    import subprocess

    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _run_in(netns: str, argv: list[str], timeout: float) -> str:
    import subprocess

    proc = subprocess.run(
        ["ip", "netns", "exec", netns, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} in {netns}: {proc.stderr.strip()} {proc.stdout}")
    return proc.stdout


def _start_in(box: Sandbox, netns: str, label: str, argv: list[str]) -> ManagedProcess:
    """A process in a pod namespace, recorded by the sandbox like node processes."""
    return box.namespace(netns).start(label, argv)


def iperf(box: Sandbox, client: str, server: str, server_ip: str, streams: int,
          seconds: float, pids: Sequence[int]) -> dict[str, float]:
    """TCP from the `client` namespace to `server_ip` in the `server` namespace: Gbit/s,
    retransmits, and the CPU seconds of `pids` (with their children) over the run."""
    process = _start_in(box, server, "iperf-server", ["iperf3", "-s", "-1", "-B", server_ip])
    try:
        time.sleep(0.3)
        cpu_before = sum(_cpu_seconds(pid) for pid in pids)
        result = _run_in(
            client,
            ["iperf3", "-c", server_ip, "-t", str(seconds), "-P", str(streams), "-J"],
            timeout=seconds + 30,
        )
        cpu_after = sum(_cpu_seconds(pid) for pid in pids)
    finally:
        process.stop(timeout=2)
    end = json.loads(result)["end"]
    return {
        "gbps": end["sum_received"]["bits_per_second"] / 1e9,
        "retransmits": float(end["sum_sent"].get("retransmits", 0)),
        "cpu_seconds": cpu_after - cpu_before,
        "seconds": float(end["sum_received"]["seconds"]),
    }


def ping(client: str, address: str, count: int) -> dict[str, float]:
    """`count` pings 50 ms apart from the `client` namespace: min / avg / max RTT in ms."""
    out = _run_in(client, ["ping", "-c", str(count), "-i", "0.05", "-q", address],
                  timeout=count + 10)
    for line in out.splitlines():
        if "min/avg/max" in line:
            low, avg, high = (float(x) for x in line.split("=")[1].split("/")[:3])
            return {"min": low, "avg": avg, "max": high}
    raise RuntimeError(f"no ping summary: {out}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value: dict[str, Any] = json.loads(path.read_text())
        return value
    except (OSError, ValueError):
        return {}


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


# ---------------------------------------------------------------------------- the benchmark


AGENT_PATHS: dict[str, tuple[str, ...]] = {
    "agents-vxlan": (),
    "agents-standard": ("--encrypt", "--wg-standard-only"),
    "agents-wgx": ("--encrypt",),
    "agents-vxlan-again": (),  # the A/A control: a second, identical pair on VXLAN
}
CONTROL = "agents-vxlan-again"
ANCHOR = "wireguard-go"
THROUGHPUT_GOAL = 0.35  # of VXLAN through agents, 1 and 4 streams (issue 16)
OFFLOADS_RELEASE = 20230000  # wireguard-go's TUN offloads (GSO/GRO) landed in 2023


@dataclass
class AgentPair:
    """Two real agents (`weavepy launch FLAGS`) in a 2-node sandbox, one pod behind each,
    created by CNI ADD through the installed weavepy-cni plugin."""

    kind: str
    box: Sandbox
    rig: AgentBox
    pods: list[str] = field(default_factory=list)
    pod_ips: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, kind: str, flags: Sequence[str], plugin: Path) -> AgentPair:
        box = Sandbox.create(nodes=2)
        try:
            rig = AgentBox(box, pod_range=str(box.pod_range), extra_args=flags)
            rig.launch_all()
            rig.wait_mesh(timeout=120)
            pair = cls(kind, box, rig)
            for index, node in enumerate(box.nodes, start=1):
                pod = box.add_netns(f"pod{index}").netns
                pair.pod_ips.append(rig.cni_add(node, plugin, pod))
                pair.pods.append(pod)
            pair.wait_reachable()
            return pair
        except BaseException:
            box.destroy()
            raise

    def wait_reachable(self, timeout: float = 60) -> None:
        """Until pod 1 pings pod 2 (the encrypted path needs its first handshake)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                ping(self.pods[0], self.pod_ips[1], 1)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.kind}: pod 1 cannot reach pod 2 "
                                       f"({self.pod_ips[1]}) after {timeout:g} s\n"
                                       f"{self.rig.logs_tail()}") from None
                time.sleep(0.5)

    def pids(self) -> list[int]:
        return [process.pid for process in self.rig.agents.values()]

    def wireguard_stats(self) -> dict[str, int]:
        """The WireGuard data-plane counters of both agents, summed."""
        total: dict[str, int] = {}
        for node in self.box.nodes:
            doc = self.rig.status(node) or {}
            stats = doc.get("dataplane", {}).get("wireguard", {}).get("stats", {})
            for key, value in stats.items():
                total[key] = total.get(key, 0) + int(value)
        return total

    def close(self) -> None:
        for node in self.box.nodes:
            if node.name in self.rig.agents:
                self.rig.stop(node)
        self.box.destroy()


def wireguard_go_note() -> str:
    """The anchor's version, and what its age means for every ratio against it."""
    line = anchor_version("Anchor wireguard-go", ["wireguard-go", "--version"], "wireguard-go")
    match = re.search(r"0\.0\.(\d{8})", line)
    if match and int(match.group(1)) < OFFLOADS_RELEASE:
        line += (f". This release ({match.group(1)}) predates wireguard-go's 2023 TUN offloads "
                 "(GSO/GRO batching): every ratio against it is against that older release, "
                 "and a current wireguard-go would be faster")
    return line + "."


def run(args: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench wireguard")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--paths", default=",".join([*AGENT_PATHS, *PATHS]),
                        help="paths to measure: agents-* (real agents) and the standalone "
                        f"ones ({', '.join(PATHS)})")
    parser.add_argument("--pings", type=int, default=20, help="pings per path and repetition")
    parser.add_argument(
        "--workers",
        action="store_true",
        help="standalone devices: one worker process per direction instead of the engines "
        "inside the control process (the agent's way)",
    )
    options = parser.parse_args(args)
    paths = [p for p in options.paths.split(",") if p]
    unknown = sorted(set(paths) - set(AGENT_PATHS) - set(PATHS))
    if unknown:
        parser.error(f"unknown paths: {', '.join(unknown)}")
    agent_paths = [p for p in paths if p in AGENT_PATHS]
    device_paths = [p for p in paths if p in PATHS]
    workdir = Path(tempfile.mkdtemp(prefix="weavepy-bench-wireguard-"))
    results: dict[str, dict[int, list[dict[str, float]]]] = {p: {1: [], 4: []} for p in paths}
    rtts: dict[str, list[dict[str, float]]] = {p: [] for p in paths}
    pairs: dict[str, AgentPair] = {}
    network: PodNetwork | None = None
    box: Sandbox | None = None
    try:
        if agent_paths:
            plugin = install_cni(workdir / "bin", workdir / "net.d").plugin
            for kind in agent_paths:
                pairs[kind] = AgentPair.start(kind, AGENT_PATHS[kind], plugin)
        if device_paths:
            box = Sandbox.create(nodes=2)
            network = _standalone(box, workdir, device_paths, workers=options.workers)
        for rep in range(options.reps):
            shift = rep % len(paths)
            for path in paths[shift:] + paths[:shift]:
                if path in pairs:
                    pair = pairs[path]
                    ends = (pair.box, pair.pods[0], pair.pods[1], pair.pod_ips[1])
                    pids = pair.pids()
                else:
                    assert network is not None
                    network.use(path)
                    ends = (network.box, network.pods[0], network.pods[1], pod_ip(2))
                    pids = network.tunnel_pids(path)
                ping(ends[1], ends[3], 3)  # warm up: handshakes, neighbours
                rtts[path].append(ping(ends[1], ends[3], options.pings))
                for streams in (1, 4):
                    results[path][streams].append(
                        iperf(*ends, streams, options.seconds, pids))
        transports = {kind: pair.wireguard_stats() for kind, pair in pairs.items()
                      if "--encrypt" in AGENT_PATHS[kind]}
        statuses = ({p: network.status(p) for p in device_paths if p.startswith("weavepy")}
                    if network is not None else {})
    finally:
        if network is not None:
            network.close()
        if box is not None:
            box.destroy()
        for pair in pairs.values():
            pair.close()
        shutil.rmtree(workdir, ignore_errors=True)
    sections = [wireguard_go_note() if ANCHOR in paths else
                "Anchor: wireguard-go was not in --paths, so no ratio against it.",
                anchor_version("Load generator iperf3", ["iperf3", "--version"], "iperf3") + "."]
    if agent_paths:
        sections.append(_agents_report(agent_paths, results, rtts, transports, options))
    if device_paths:
        latency = {p: statistics.median(r["avg"] for r in rtts[p]) for p in device_paths}
        sections.append(_report(device_paths, results, latency, statuses, options))
    return "\n\n".join(sections)


def _standalone(box: Sandbox, workdir: Path, paths: Sequence[str], *, workers: bool
                ) -> PodNetwork:
    network = PodNetwork(box, workdir)
    if "vxlan" in paths:
        network.add_vxlan()
    if "wireguard-go" in paths:
        network.add_wireguard_go()
    if "weavepy-standard" in paths:
        network.add_weavepy("weavepy-standard", extension=False, port=STD_PORT, workers=workers)
    if "weavepy-to-wireguard-go" in paths:
        network.add_weavepy_to_wireguard_go(workers=workers)
    if "weavepy-extension" in paths:
        network.add_weavepy("weavepy-extension", extension=True, port=EXT_PORT, workers=workers)
    return network


def _paired(results: dict[str, dict[int, list[dict[str, float]]]], path: str, base: str,
            streams: int) -> list[float]:
    """path / base within each repetition (both measured minutes apart at most)."""
    return [a["gbps"] / b["gbps"] for a, b in
            zip(results[path][streams], results[base][streams], strict=True) if b["gbps"] > 0]


def _percent_spread(ratios: Sequence[float]) -> str:
    if not ratios:
        return "-"
    return (f"{100 * statistics.median(ratios):.1f} % "
            f"({100 * min(ratios):.0f}-{100 * max(ratios):.0f})")


def _agents_report(
    agent_paths: list[str],
    results: dict[str, dict[int, list[dict[str, float]]]],
    rtts: dict[str, list[dict[str, float]]],
    transports: dict[str, dict[str, int]],
    options: argparse.Namespace,
) -> str:
    base = "agents-vxlan" if "agents-vxlan" in agent_paths else None
    anchor = ANCHOR if ANCHOR in results else None
    rows = []
    for path in [*agent_paths, *([anchor] if anchor else [])]:
        cells: list[str] = [path + (" (anchor, standalone)" if path == anchor else "")]
        for streams in (1, 4):
            runs = [r["gbps"] for r in results[path][streams]]
            cells.append(f"**{statistics.median(runs):.2f}** "
                         f"({' / '.join(f'{v:.2f}' for v in runs)})")
        cells.append(" / ".join(_percent_spread(_paired(results, path, base, s)) for s in (1, 4))
                     if base else "-")
        cells.append(" / ".join(
            f"{statistics.median(_paired(results, path, anchor, s)):.1f}x" for s in (1, 4))
            if anchor else "-")
        avgs = [r["avg"] for r in rtts[path]]
        cells.append(f"{statistics.median(avgs):.3f} ({min(r['min'] for r in rtts[path]):.3f}-"
                     f"{max(r['max'] for r in rtts[path]):.3f})")
        kernel = path.startswith("agents-vxlan")
        cpu = statistics.median(r["cpu_seconds"] / max(r["gbps"] * r["seconds"], 1e-9)
                                for r in results[path][1])
        cells.append("- (kernel)" if kernel else f"{cpu:.2f}")
        cells.append(f"{statistics.median(r['retransmits'] for r in results[path][1]):.0f}")
        rows.append(cells)
    header = ["path", "1 stream Gbit/s (runs)", "4 streams Gbit/s (runs)",
              "of agents on VXLAN, 1 / 4 (min-max)", "vs wireguard-go, 1 / 4",
              "ping RTT ms, median of reps (min-max ping)",
              "CPU s per Gbit, 1 stream (agents / wireguard-go)", "retransmits, 1 stream"]
    lines = [
        f"**Pods through real agents.** Each path is a 2-node sandbox with two `weavepy launch` "
        f"agents and one pod per node created by CNI ADD through the installed plugin, so MTU, "
        f"gso_max_size, routes and the tunnel are the agent's own; `agents-standard` runs "
        f"`--encrypt --wg-standard-only`, `agents-wgx` `--encrypt` (the super-packet "
        f"extension), the VXLAN pairs no flag. iperf3 -t {options.seconds:g} from pod 1 to pod "
        f"2, {options.reps} repetitions with every path (here and in the table below) "
        f"interleaved and the order rotated; {options.pings} pings per path and repetition "
        f"on the idle link. Ratios are medians of per-repetition ratios (min-max over "
        f"repetitions). Both nodes, both agents and iperf3 share the machine's cores.",
        "",
        table(header, rows),
        "",
    ]
    notes = []
    if CONTROL in agent_paths and base:
        notes.append(f"A/A control: `{CONTROL}` (a second, identical pair on VXLAN) reached "
                     + " / ".join(_percent_spread(_paired(results, CONTROL, base, s))
                                  for s in (1, 4))
                     + " of `agents-vxlan` (1 / 4 streams): differences of that size are noise.")
    for kind in ("agents-standard", "agents-wgx"):
        if kind not in agent_paths or not base:
            continue
        shares = [statistics.median(_paired(results, kind, base, s)) for s in (1, 4)]
        met = all(share >= THROUGHPUT_GOAL for share in shares)
        notes.append(f"Goal, encrypted throughput >= {THROUGHPUT_GOAL:.0%} of VXLAN through "
                     f"agents, `{kind}`: {100 * shares[0]:.1f} % / {100 * shares[1]:.1f} % "
                     f"({'met' if met else 'NOT met'}).")
    if anchor:
        theirs = statistics.median(r["avg"] for r in rtts[anchor])
        for kind in ("agents-standard", "agents-wgx"):
            if kind in agent_paths:
                ours = statistics.median(r["avg"] for r in rtts[kind])
                notes.append(f"Goal, encrypted latency <= wireguard-go's, `{kind}`: "
                             f"{ours:.3f} ms against {theirs:.3f} ms ({ours / theirs:.2f}x, "
                             f"{'met' if ours <= theirs else 'NOT met'}).")
    for kind, stats in transports.items():
        standard, extension = stats.get("messages_sent", 0), stats.get(
            "extension_messages_sent", 0)
        wanted_extension = "--wg-standard-only" not in AGENT_PATHS[kind]
        ok = (extension > 0) == wanted_extension
        notes.append(f"Transport check, `{kind}`: {standard} standard and {extension} extension "
                     f"messages sent by both agents"
                     + (" (as intended)." if ok else
                        " (NOT as intended: these agents did not honour --wg-standard-only, "
                        "so this row measures the extension)."))
    return "\n".join(lines + [f"- {note}" for note in notes])


def _report(
    paths: list[str],
    results: dict[str, dict[int, list[dict[str, float]]]],
    latency: dict[str, float],
    statuses: dict[str, list[dict[str, Any]]],
    options: argparse.Namespace,
) -> str:
    def med(path: str, streams: int, key: str = "gbps") -> float:
        return statistics.median(r[key] for r in results[path][streams])

    anchor = "wireguard-go" if "wireguard-go" in paths else None
    rows = []
    for path in paths:
        p1, p4 = med(path, 1), med(path, 4)
        runs = " / ".join(f"{r['gbps']:.2f}" for r in results[path][1])
        ratios = "-"
        if anchor:
            ratios = f"{p1 / med(anchor, 1):.1f}x / {p4 / med(anchor, 4):.1f}x"
        vx = "-"
        if "vxlan" in paths:
            vx = f"{p1 / med('vxlan', 1):.2f} / {p4 / med('vxlan', 4):.2f}"
        cpu = statistics.median(
            r["cpu_seconds"] / max(r["gbps"] * r["seconds"], 1e-9) for r in results[path][1]
        )
        cpu_text = f"{cpu:.2f}" if path not in ("vxlan", "plain") else "- (kernel)"
        rows.append(
            [
                path,
                f"**{p1:.2f}**",
                f"**{p4:.2f}**",
                runs,
                ratios,
                vx,
                cpu_text,
                f"{latency.get(path, float('nan')):.3f}",
                f"{med(path, 1, 'retransmits'):.0f}",
            ]
        )
    header = [
        "path",
        "TCP 1 stream Gbit/s",
        "TCP 4 streams Gbit/s",
        "1-stream runs",
        "vs wireguard-go (1 / 4)",
        "vs VXLAN (1 / 4)",
        "tunnel CPU s per Gbit (1 stream)",
        "ping avg ms",
        "retransmits (1 stream)",
    ]
    lines = [
        f"**Standalone devices** (no agent: our device started alone by "
        f"`python -m tunnel.wireguard.device`, routes and pods set by hand): pod to pod through "
        f"bridges, iperf3 -t {options.seconds:g}, {options.reps} interleaved repetitions "
        "(medians). Both nodes, both tunnel ends and iperf3 share the machine's cores, so each "
        "number is sender + receiver together. Our devices ran "
        + (
            "one worker process per direction (--workers)."
            if options.workers
            else "their engines inside the control process, as the agent does."
        ),
        "",
        table(header, rows),
        "",
    ]
    if anchor:
        goals = []
        std = "weavepy-standard"
        ext = "weavepy-extension"
        if std in paths:
            goals.append(
                f"standard transport >= 3x wireguard-go: "
                f"{med(std, 1) / med(anchor, 1):.1f}x (1 stream), "
                f"{med(std, 4) / med(anchor, 4):.1f}x (4 streams)"
            )
        mixed = "weavepy-to-wireguard-go"
        if mixed in paths:
            goals.append(
                f"weavepy sending to a stock wireguard-go: "
                f"{med(mixed, 1) / med(anchor, 1):.1f}x / {med(mixed, 4) / med(anchor, 4):.1f}x "
                "(its receiving end is wireguard-go itself)"
            )
        if ext in paths:
            goals.append(
                f"extension >= 6x wireguard-go: {med(ext, 1) / med(anchor, 1):.1f}x / "
                f"{med(ext, 4) / med(anchor, 4):.1f}x"
            )
            if "vxlan" in paths:
                goals.append(
                    f"extension >= 30 % of VXLAN: "
                    f"{100 * med(ext, 1) / med('vxlan', 1):.1f} % / "
                    f"{100 * med(ext, 4) / med('vxlan', 4):.1f} %"
                )
        lines += ["Goals: " + "; ".join(goals) + ".", ""]
    for path, status in statuses.items():
        drops: dict[str, int] = {}
        for node in status:
            for key, value in node.get("drops", {}).items():
                drops[key] = drops.get(key, 0) + value
        lines.append(f"{path} drops over the whole run (our ends): {drops or 'none'}.")
    return "\n".join(lines)
