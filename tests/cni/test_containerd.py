"""containerd 1.6's CRI plugin (Debian containerd + runc) creates pods on two sandbox nodes
through weavepy-cni and the weavepy agent, driven over gRPC by a small kubelet stand-in (PyPI
container-runtime-interface-api): pods get addresses from their node's IPAM block, reach each
other across nodes over TCP through the agents' VXLAN routes, a hostPort works, and
StopPodSandbox + RemovePodSandbox (DEL twice, the second with an empty netns) release
everything.

Each node runs its own containerd (root, state, sockets, runc root, cgroup parent and CNI
directories belong to this run), started and stopped by PID, and a weavepy agent. containerd
runs in a private mount namespace, where it mounts the pod namespaces; the agent joins that
mount namespace (`nsenter --mount`) so it can open CNI_NETNS, as a real agent does through a
shared /run/netns.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.cni.conftest import REFERENCE_PLUGINS, REPO, wait_for_socket
from tests.cni.cri import PAUSE_CMD, containerd_config, remove_pods, run_pod, wget
from tests.cni.oci import build_image
from tests.conftest import require, require_binary, require_root

pytestmark = [pytest.mark.netns, pytest.mark.peer, pytest.mark.slow, pytest.mark.timeout(300)]

IMAGE = "localhost/wpcni-busybox:1"
HOST_PORT = 18090

@dataclass
class CriNode:
    """One sandbox node with its containerd, weavepy agent and CRI client."""

    node: Any  # weavepy.devtools.sandbox.SandboxNode
    dir: Path
    cni_socket: Path
    containerd: Any = None
    agent: Any = None
    channel: Any = None
    runtime: Any = None
    sandboxes: list[str] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)

    def owns(self, address: str) -> bool:
        return any(ipaddress.ip_address(address) in ipaddress.ip_network(b) for b in self.blocks)

    @property
    def cgroup_parent(self) -> str:
        """Pods' cgroups go under a parent named for this run (cgroupfs driver)."""
        return f"/{self.node.netns}-pods"

    @property
    def socket(self) -> Path:
        return self.dir / "containerd.sock"

    def ctr(self, *args: str, timeout: float = 120) -> str:
        return self.node.run(["ctr", "--address", str(self.socket), "-n", "k8s.io", *args],
                             timeout=timeout).stdout


def _start_containerd(cri: CriNode, image_tar: Path) -> None:
    from weavepy.cni.install import install_cni

    d = cri.dir
    for sub in ("root", "state", "opt", "runc", "logs"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    bin_dir = d / "cni-bin"
    bin_dir.mkdir()
    for name in ("loopback", "portmap"):  # containerd runs loopback itself for every pod
        (bin_dir / name).symlink_to(Path(REFERENCE_PLUGINS, name))
    installed = install_cni(bin_dir, d / "net.d", socket_path=str(cri.cni_socket))
    # declare the portMappings capability on weavepy too, so containerd hands us its
    # CamelCase runtimeConfig (HostPort, ContainerPort) and we must parse it
    conf = json.loads(installed.conflist.read_text())
    conf["plugins"][0]["capabilities"] = {"portMappings": True}
    installed.conflist.write_text(json.dumps(conf, indent=2))
    config = d / "containerd.toml"
    config.write_text(containerd_config(
        root=d / "root", state=d / "state", socket=cri.socket, runc_root=d / "runc",
        bin_dir=bin_dir, conf_dir=d / "net.d", image=IMAGE, netns_under_state=True))
    # `ip netns exec` gives the process a fresh /sys without the cgroup mounts runc needs, so
    # containerd goes back to the test's mount namespace and takes a private copy of it
    # (mount propagation: slave): the real /sys/fs/cgroup, and its own mounts die with it.
    cri.containerd = cri.node.start("containerd", [
        "nsenter", f"--mount=/proc/{os.getpid()}/ns/mnt", "--",
        "unshare", "--mount", "--propagation", "slave", "--",
        "containerd", "--config", str(config)])
    wait_for_socket(cri.socket, cri.containerd, timeout=60)
    cri.ctr("image", "import", str(image_tar))

    import grpc
    from cri_api.v1 import api_pb2_grpc

    cri.channel = grpc.insecure_channel(f"unix://{cri.socket}")
    cri.runtime = api_pb2_grpc.RuntimeServiceStub(cri.channel)


def _launch_agent(rig: Any, cri: CriNode, peers: list[Any]) -> None:
    """The weavepy agent of this node, inside containerd's mount namespace (see above)."""
    cri.agent = cri.node.start("agent", [
        "nsenter", f"--mount=/proc/{cri.containerd.pid}/ns/mnt", "--",
        *rig.argv(cri.node, peers)], cwd=str(REPO))
    rig.agents[cri.node.name] = cri.agent
    rig.wait_api(cri.node, timeout=60)


def _cleanup(cri: CriNode) -> None:
    if cri.runtime is not None:
        remove_pods(cri.runtime)
    if cri.channel is not None:
        cri.channel.close()
    if cri.containerd is not None:
        cri.containerd.stop(timeout=15)
    # containers whose shim outlived containerd: remove them with runc, under our own root
    runc_root = cri.dir / "runc"
    for state in (runc_root.glob("*/*/state.json") if runc_root.exists() else []):
        subprocess.run(["runc", "--root", str(state.parent.parent), "delete", "--force",
                        state.parent.name], capture_output=True, timeout=30, check=False)
    if cri.agent is not None:
        cri.agent.stop(timeout=10)
    cgroups = Path("/sys/fs/cgroup")
    parent = cri.cgroup_parent.lstrip("/")
    # cgroup v1 has one hierarchy per controller, v2 one tree; empty once the pods are gone
    for directory in [cgroups / parent, *(h / parent for h in cgroups.iterdir() if h.is_dir())]:
        with contextlib.suppress(OSError):
            directory.rmdir()
    for leftover in ("/run/containerd/s", "/run/containerd/fifo", "/run/containerd"):
        with contextlib.suppress(OSError):  # the shims' directories, removed only when empty
            os.rmdir(leftover)


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(Path("/bin/busybox").exists(), "needs Debian busybox-static")
    return build_image(tmp_path_factory.mktemp("oci") / "busybox.oci.tar", IMAGE, PAUSE_CMD)


@pytest.fixture
def cri_nodes(sandbox_factory: Callable[..., Any], busybox_image: Path
              ) -> Iterator[list[CriNode]]:
    require_root()
    for binary, package in (("containerd", "containerd"), ("runc", "runc"),
                            ("ctr", "containerd"), ("nsenter", "util-linux")):
        require_binary(binary, package)
    require(Path(REFERENCE_PLUGINS, "loopback").exists(), "needs containernetworking-plugins")
    require(importlib.util.find_spec("cri_api") is not None and
            importlib.util.find_spec("grpc") is not None,
            "needs PyPI container-runtime-interface-api (with grpcio)")
    from weavepy.devtools.agentbox import AgentBox

    box = sandbox_factory(nodes=2)
    rig = AgentBox(box, pod_range=str(box.pod_range))
    root = Path(f"/tmp/weavepy-cri-{box.prefix}")  # short: unix socket paths max 107 bytes
    nodes = [CriNode(node, root / node.name, rig.run_dir(node) / "cni.sock")
             for node in box.nodes]
    try:
        for cri in nodes:
            _start_containerd(cri, busybox_image)
        _launch_agent(rig, nodes[0], [])
        _launch_agent(rig, nodes[1], [box.nodes[0]])
        blocks = rig.wait_mesh(timeout=60)  # blocks claimed, VXLAN routes both ways
        for cri in nodes:
            cri.blocks = blocks[cri.node.name]
        yield nodes
    finally:
        for cri in nodes:
            _cleanup(cri)
        if not os.environ.get("WEAVEPY_SANDBOX_KEEP_LOGS"):
            shutil.rmtree(root, ignore_errors=True)


def _run_pod(cri: CriNode, name: str) -> tuple[str, str, str]:
    """A busybox httpd pod with a hostPort; returns (sandbox id, container id, pod IP)."""
    sandbox_id, container_id, ip = run_pod(
        cri.runtime, name, image=IMAGE, command=["/bin/httpd", "-f", "-p", "8080", "-h", "/etc"],
        log_dir=cri.dir / "logs", cgroup_parent=cri.cgroup_parent, host_port=HOST_PORT)
    cri.sandboxes.append(sandbox_id)
    return sandbox_id, container_id, ip


def _wget(cri: CriNode, container_id: str, url: str) -> str:
    return wget(cri.runtime, container_id, url)


def test_containerd_pods_on_two_nodes_talk_over_tcp(cri_nodes: list[CriNode]) -> None:
    from cri_api.v1 import api_pb2

    one, two = cri_nodes
    version = one.runtime.Version(api_pb2.VersionRequest(), timeout=30)
    assert version.runtime_name == "containerd"

    sandbox_a, web_a, ip_a = _run_pod(one, "pod-a")
    sandbox_b, web_b, ip_b = _run_pod(two, "pod-b")
    assert one.owns(ip_a) and two.owns(ip_b), (ip_a, one.blocks, ip_b, two.blocks)

    # pod B asks pod A over TCP (HTTP) across nodes, and the other way round
    assert _wget(two, web_b, f"http://{ip_a}:8080/hostname").strip() == "pod-a"
    assert _wget(one, web_a, f"http://{ip_b}:8080/hostname").strip() == "pod-b"
    # the hostPort (portmap, chained after us) reaches pod A from node two's underlay
    node_a_ip = one.node.underlay_ip
    assert _wget(two, web_b, f"http://{node_a_ip}:{HOST_PORT}/hostname").strip() == "pod-a"

    for cri, sandbox in ((one, sandbox_a), (two, sandbox_b)):
        cri.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox),
                                   timeout=120)
        cri.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox),
                                     timeout=120)
        links = json.loads(cri.node.run(["ip", "-j", "link", "show"]).stdout)
        assert not [x["ifname"] for x in links if x["ifname"].startswith("wpv")]
        # DEL twice: StopPodSandbox (with the netns) released the address, RemovePodSandbox
        # (empty netns) found nothing left and succeeded
        log = cri.agent.log_text()
        dels = [line for line in log.splitlines() if f"DEL {sandbox[:12]}/eth0" in line]
        assert len(dels) == 2, log[-3000:]
        assert "released" in dels[0] and "nothing held" in dels[1]
