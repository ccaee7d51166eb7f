"""bench.wireguard: encrypted pod-to-pod throughput, CPU and latency, against wireguard-go.

One 2-node sandbox; on each node a "pod" namespace sits behind a bridge (198.19.<i>.2 behind
198.19.<i>.1/24), so the measured traffic is forwarded, as pod traffic is. Every path exists at
once; a path is chosen by replacing the nodes' route to the other pod subnet and setting the pod
MTU (and, for our TUN paths, the pod veth's gso_max_size to the TUN's, the rule from
docs/dataplane-facts.md). The paths, interleaved within each repetition and rotated
between repetitions:

- wireguard-go: Debian's wireguard-go + wg, MTU 1420 (the anchor);
- weavepy standard: our device with stock WireGuard transport messages, MTU 1420;
- weavepy to wireguard-go: our device (standard transport) on node 1, Debian's wireguard-go on
  node 2, so pod 1 -> pod 2 is weavepy sending to a stock receiver (port 51823);
- weavepy extension: our device with the super-packet extension (peers flagged extension_ok);
- vxlan: kernel VXLAN, flannel-style by hand (VNI 1, port 8472), unencrypted, MTU 1450;
- plain: routing over the underlay, MTU 1500 (the physical limit).

iperf3 TCP runs from pod 1 to pod 2 with 1 and 4 streams; ping runs between the pods when the
link is idle. Tunnel CPU is the user+system time of the tunnel processes (wireguard-go, or our
control process and its two workers, on both nodes) over the run, per Gbit transferred.

`run(args)` returns the markdown report; `PodNetwork` is also used by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import table
from tunnel.wireguard.keys import PrivateKey
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
        server = _start_in(
            self.box, self.pods[1], "iperf-server", ["iperf3", "-s", "-1", "-B", pod_ip(2)]
        )
        try:
            time.sleep(0.3)
            cpu_before = sum(_cpu_seconds(pid) for pid in pids)
            result = _run_in(
                self.pods[0],
                ["iperf3", "-c", pod_ip(2), "-t", str(seconds), "-P", str(streams), "-J"],
                timeout=seconds + 30,
            )
            cpu_after = sum(_cpu_seconds(pid) for pid in pids)
        finally:
            server.stop(timeout=2)
        report = json.loads(result)
        end = report["end"]
        gbits = end["sum_received"]["bits_per_second"] / 1e9
        return {
            "gbps": gbits,
            "retransmits": float(end["sum_sent"].get("retransmits", 0)),
            "cpu_seconds": cpu_after - cpu_before,
            "seconds": float(end["sum_received"]["seconds"]),
        }

    def ping(self, count: int = 20) -> float:
        out = _run_in(
            self.pods[0],
            ["ping", "-c", str(count), "-i", "0.05", "-q", pod_ip(2)],
            timeout=count + 10,
        )
        for line in out.splitlines():
            if "min/avg/max" in line:
                return float(line.split("=")[1].split("/")[1])
        raise RuntimeError(f"no ping summary: {out}")

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


def run(args: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench wireguard")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run our devices' engines inside the control process (the agent's default) "
        "instead of one worker process per direction",
    )
    options = parser.parse_args(args)
    paths = [p for p in options.paths.split(",") if p]
    workdir = Path("/tmp/weavepy-bench-wireguard")
    workdir.mkdir(parents=True, exist_ok=True)
    box = Sandbox.create(nodes=2)
    network: PodNetwork | None = None
    results: dict[str, dict[int, list[dict[str, float]]]] = {p: {1: [], 4: []} for p in paths}
    latency: dict[str, float] = {}
    try:
        network = PodNetwork(box, workdir)
        if "vxlan" in paths:
            network.add_vxlan()
        if "wireguard-go" in paths:
            network.add_wireguard_go()
        if "weavepy-standard" in paths:
            network.add_weavepy(
                "weavepy-standard", extension=False, port=STD_PORT, workers=not options.in_process
            )
        if "weavepy-to-wireguard-go" in paths:
            network.add_weavepy_to_wireguard_go(workers=not options.in_process)
        if "weavepy-extension" in paths:
            network.add_weavepy(
                "weavepy-extension", extension=True, port=EXT_PORT, workers=not options.in_process
            )
        for rep in range(options.reps):
            order = paths[rep % len(paths) :] + paths[: rep % len(paths)]
            for path in order:
                network.use(path)
                network.ping(count=3)  # warm up: handshakes, neighbours
                pids = network.tunnel_pids(path)
                for streams in (1, 4):
                    results[path][streams].append(network.iperf(streams, options.seconds, pids))
        for path in paths:
            network.use(path)
            latency[path] = network.ping(count=40)
        statuses = {p: network.status(p) for p in paths if p.startswith("weavepy")}
    finally:
        if network is not None:
            network.close()
        box.destroy()
    return _report(paths, results, latency, statuses, options)


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
        f"Pod to pod through bridges, iperf3 -t {options.seconds:g}, {options.reps} interleaved "
        "repetitions (medians). Both nodes, both tunnel ends and iperf3 share the machine's "
        "cores, so each number is sender + receiver together. Our devices ran "
        + (
            "their engines inside the control process (--in-process)."
            if options.in_process
            else "one worker process per direction."
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
