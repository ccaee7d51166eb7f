"""Two pods behind bridges on two sandbox nodes, joined by a pair of our WireGuard devices.

The encrypted fast path's test rig: on each of the first two nodes of a sandbox, a pod
namespace `<prefix>-p<i>` sits behind a bridge (pod 198.19.<i>.2 behind 198.19.<i>.1/24), so
traffic between the pods is forwarded by the nodes, as pod traffic is. `add_devices` starts our
standalone device (`python -m tunnel.wireguard.device`) on both nodes, each the other's peer;
`use` routes the other pod's subnet over a device pair and sizes the pod veths for it
(MTU 1420, and a gso_max_size, by default the TUN's: docs/dataplane-facts.md).

The rules it keeps: every process is a sandbox process and every namespace carries the
sandbox's prefix, so `Sandbox.destroy()` removes all of it even after a failure; nothing runs
in the machine's own namespace. A device's status is the JSON file it writes (about twice a
second); `status` reads it as it is.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunnel.tun import FAST_PATH_GSO_MAX_SIZE
from tunnel.wireguard.keys import PrivateKey
from weavepy.devtools.sandbox import ManagedProcess, Sandbox, SandboxError, SandboxNode

__all__ = ["PodPair", "pod_ip"]

REPO = Path(__file__).resolve().parents[2]
TUNNEL_MTU = 1420
READY_TIMEOUT = 60.0


def pod_ip(index: int) -> str:
    return f"198.19.{index}.2"


def pod_subnet(index: int) -> str:
    return f"198.19.{index}.0/24"


@dataclass
class DevicePair:
    """Our device on each of the two nodes (same name on both, one status file per node)."""

    name: str
    processes: list[ManagedProcess] = field(default_factory=list)
    status_files: list[Path] = field(default_factory=list)


class PodPair:
    """Pods behind bridges on the first two nodes of `box`, and device pairs between them."""

    def __init__(self, box: Sandbox, workdir: Path) -> None:
        self.box = box
        self.workdir = workdir
        self.nodes: list[SandboxNode] = box.nodes[:2]
        self.pods: list[SandboxNode] = []
        self.veth = f"{box.prefix}vp"  # the node's side of the pod veth
        self.devices: dict[str, DevicePair] = {}
        bridge = f"{box.prefix}pb"
        for index, node in enumerate(self.nodes, start=1):
            pod = box.add_netns(f"p{index}")
            self.pods.append(pod)
            node.run(["ip", "-batch", "-"], input="\n".join([
                f"link add {bridge} type bridge",
                f"addr add 198.19.{index}.1/24 dev {bridge}",
                f"link set {bridge} up",
                f"link add {self.veth} type veth peer name eth0 netns {pod.netns}",
                f"link set {self.veth} master {bridge} up",
            ]) + "\n")
            pod.run(["ip", "-batch", "-"], input="\n".join([
                f"addr add {pod_ip(index)}/24 dev eth0",
                "link set eth0 up",
                f"route add default via 198.19.{index}.1",
            ]) + "\n")

    def add_devices(self, kind: str, *, extension: bool, port: int, workers: bool = True,
                    extra: dict[str, Any] | None = None) -> DevicePair:
        """Our device on both nodes, each with the other as its one peer (announcing the
        super-packet extension if `extension`); returns once both say they are ready."""
        name = f"{self.box.prefix}{'x' if extension else 'w'}"
        keys = [PrivateKey.generate(), PrivateKey.generate()]
        pair = DevicePair(name)
        for index, node in enumerate(self.nodes, start=1):
            other = 3 - index
            status = self.workdir / f"{node.name}-{kind}-status.json"
            config = {
                "name": name,
                "private_key": keys[index - 1].to_base64(),
                "listen_port": port,
                "mtu": TUNNEL_MTU,
                "gso_max_size": FAST_PATH_GSO_MAX_SIZE,
                "workers": workers,
                "status_file": str(status),
                "peers": [{
                    "public_key": keys[other - 1].public_key.to_base64(),
                    "allowed_ips": [pod_subnet(other)],
                    "endpoint": [self.nodes[other - 1].underlay_ip, port],
                    "extension_ok": extension,
                }],
                **(extra or {}),
            }
            path = self.workdir / f"{node.name}-{kind}.json"
            path.write_text(json.dumps(config))
            pair.processes.append(node.start(
                kind, [sys.executable, "-m", "tunnel.wireguard.device", str(path)],
                cwd=str(REPO)))
            pair.status_files.append(status)
        self.devices[kind] = pair
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(status.get("ready") for status in self.status(kind)):
            for process in pair.processes:
                if not process.alive():
                    raise SandboxError(f"{kind} device died: {process.log_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise SandboxError(f"{kind} devices not ready after {READY_TIMEOUT:.0f} s")
            time.sleep(0.1)
        return pair

    def status(self, kind: str) -> list[dict[str, Any]]:
        """Each node's device status (`{}` while a file is missing or half written)."""
        found = []
        for path in self.devices[kind].status_files:
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                found.append({})
        return found

    def use(self, kind: str, pod_gso_max_size: int = FAST_PATH_GSO_MAX_SIZE) -> None:
        """Route each pod subnet over the `kind` devices and size the pod veths for them."""
        name = self.devices[kind].name
        for index, (node, pod) in enumerate(zip(self.nodes, self.pods, strict=True), start=1):
            node.run(["ip", "route", "replace", pod_subnet(3 - index), "dev", name])
            node.run(["ip", "link", "set", self.veth, "mtu", str(TUNNEL_MTU)])
            pod.run(["ip", "link", "set", "eth0", "mtu", str(TUNNEL_MTU), "gso_max_size",
                     str(pod_gso_max_size)])
            for where in (node, pod):
                where.run(["ip", "route", "flush", "cache"])

    def run_in_pod(self, index: int, argv: Sequence[str], timeout: float = 30
                   ) -> str:
        """Run `argv` in pod `index` (1 or 2) and return its output; raise if it fails."""
        result = self.pods[index - 1].run(argv, check=False, timeout=timeout)
        if result.returncode != 0:
            raise SandboxError(f"{' '.join(argv)} in pod {index}: {result.stderr.strip()} "
                               f"{result.stdout.strip()}")
        return result.stdout

    def start_in_pod(self, index: int, label: str, argv: Sequence[str]) -> ManagedProcess:
        return self.pods[index - 1].start(label, argv)
