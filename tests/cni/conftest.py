"""Fixtures for the CNI tests: sandbox nodes running the CNI server, pods as namespaces.

Each node runs `python -m weavepy.cni.server` (the real server and backend) inside its
namespace with its own block 198.19.<node index>.0/24, socket and state directory. Pods are
namespaces named with the sandbox prefix (`<prefix>-<name>`), so `Sandbox.down` removes them
even after a crash. The plugin is the real installed `weavepy-cni` file.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.cni.cnirun import ChainRunner, Pod, exec_plugin
from tests.conftest import require, require_root

REPO = Path(__file__).resolve().parents[2]
REFERENCE_PLUGINS = "/usr/lib/cni"
BRIDGE = "wpbr0"


def wait_for_socket(path: Path, proc: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise AssertionError(f"CNI server exited: {proc.log_text()[-2000:]}")
        if path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
                return
            except OSError:
                pass
            finally:
                probe.close()
        time.sleep(0.05)
    raise AssertionError(f"CNI server did not listen on {path}: {proc.log_text()[-2000:]}")


@dataclass
class CniNode:
    """A sandbox node with a running CNI server."""

    node: Any  # weavepy.devtools.sandbox.SandboxNode
    block: ipaddress.IPv4Network
    socket_path: Path
    state_dir: Path
    plugin_dir: Path
    proc: Any = None
    server_args: Sequence[str] = ()

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.block.network_address + 1

    @property
    def cni_path(self) -> list[str]:
        return [str(self.plugin_dir), REFERENCE_PLUGINS]

    def start(self) -> None:
        self.proc = self.node.start("cni", [
            sys.executable, "-m", "weavepy.cni.server", "--socket", str(self.socket_path),
            "--bridge", BRIDGE, "--block", str(self.block), "--state-dir", str(self.state_dir),
            "--log-level", "DEBUG", *self.server_args], cwd=str(REPO))
        wait_for_socket(self.socket_path, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=10)

    def conflist(self, *after: dict[str, Any], version: str = "1.0.0",
                 name: str = "weavepy") -> dict[str, Any]:
        return {"cniVersion": version, "name": name, "plugins": [
            {"type": "weavepy-cni", "socketPath": str(self.socket_path)}, *after]}

    def plugin_conf(self, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
        """The request config for our plugin alone (what a runtime sends it)."""
        return {"cniVersion": version, "name": "weavepy", "type": "weavepy-cni",
                "socketPath": str(self.socket_path), **extra}

    def runner(self, conflist: dict[str, Any] | None = None) -> ChainRunner:
        return ChainRunner(self.node, conflist or self.conflist(), self.cni_path)

    def plugin(self, command: str, pod: Pod | None, conf: dict[str, Any] | bytes | None = None,
               env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        """Run our plugin once; return (exit status, decoded stdout or {})."""
        rc, out, _ = exec_plugin(self.node, "weavepy-cni", self.cni_path, command,
                                 self.plugin_conf() if conf is None else conf, pod, env)
        return rc, (json.loads(out) if out.strip() else {})

    def allocations(self) -> list[dict[str, Any]]:
        files = list(self.state_dir.glob("pods-*.json"))
        if not files:
            return []
        data: dict[str, Any] = json.loads(files[0].read_text())
        allocations: list[dict[str, Any]] = data["allocations"]
        return allocations

    def host_veths(self) -> list[str]:
        links = json.loads(self.node.run(["ip", "-j", "link", "show"]).stdout)
        return [link["ifname"] for link in links if link["ifname"].startswith("wpv")]


@dataclass
class CniCluster:
    box: Any  # weavepy.devtools.sandbox.Sandbox
    nodes: list[CniNode]
    pod_processes: list[subprocess.Popen[str]] = field(default_factory=list)

    def new_pod(self, name: str, ifname: str = "eth0", **kwargs: Any) -> Pod:
        netns = f"{self.box.prefix}-{name}"
        subprocess.run(["ip", "netns", "add", netns], check=True, timeout=10)
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True, timeout=10)
        return Pod(container_id=f"{self.box.prefix}{name}", netns=f"/run/netns/{netns}",
                   ifname=ifname, **kwargs)

    def remove_pod_netns(self, pod: Pod) -> None:
        subprocess.run(["ip", "netns", "del", Path(pod.netns).name], check=False, timeout=10)

    def run_in_pod(self, pod: Pod, argv: Sequence[str]) -> subprocess.Popen[str]:
        """A process inside a pod namespace; stopped by PID at teardown."""
        proc = subprocess.Popen(["ip", "netns", "exec", Path(pod.netns).name, *argv],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.pod_processes.append(proc)
        return proc

    def pod_exec(self, pod: Pod, argv: Sequence[str], timeout: float = 30
                 ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", Path(pod.netns).name, *argv],
                              capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real `weavepy-cni` executable, installed as `weavepy install-cni` does it."""
    from weavepy.cni.install import install_cni

    root = tmp_path_factory.mktemp("cni")
    installed = install_cni(root / "bin", root / "net.d")
    return installed.plugin.parent


@pytest.fixture
def cni_cluster(sandbox_factory: Callable[..., Any], tmp_path: Path,
                plugin_dir: Path) -> Iterator[Callable[..., CniCluster]]:
    """Build a sandbox whose nodes run the CNI server: `cni_cluster(nodes=2)`."""
    require_root()
    require(Path(REFERENCE_PLUGINS, "portmap").exists(),
            "needs the reference CNI plugins (Debian containernetworking-plugins)")
    made: list[CniCluster] = []

    def make(nodes: int = 1, server_args: Sequence[str] = ()) -> CniCluster:
        box = sandbox_factory(nodes=nodes)
        cluster = CniCluster(box, [])
        made.append(cluster)
        for node in box.nodes:
            cni = CniNode(node=node, block=ipaddress.IPv4Network(f"198.19.{node.index}.0/24"),
                          socket_path=tmp_path / f"{node.name}.sock",
                          state_dir=tmp_path / f"{node.name}-state", plugin_dir=plugin_dir,
                          server_args=server_args)
            cni.start()
            cluster.nodes.append(cni)
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            for proc in cluster.pod_processes:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
            for cni in cluster.nodes:
                cni.stop()
