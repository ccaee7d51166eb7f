"""The DaemonSet that `weavepy manifest` prints, run from the image `make image` builds, on three
sandbox nodes.

Kubernetes does not run here, so stand-ins take its place, and say so: `weavepy.devtools.kubelet`
turns the manifest's pod spec, mechanically, into podman runs on each node (host network = the
node's network namespace, hostPaths = the node's directories, the manifest's command, env,
capabilities and privileges, the service account's token), `tests/cni/cri.py` makes the CRI
calls a kubelet makes for pods, to a containerd of each node, and `tests/deploy/kube_standin.py`
answers the agents' node list and watch (kube_replay.py's API, serving the sandbox's nodes) on
an address in the sandbox, so the manifest runs with its default `--kube-peers`. The image,
podman, containerd, runc, the CNI plugin the init container installs, its runtime, and the
agents are real.

What it proves, in order:
1. deploy/build-image.sh builds the image (once per image tag; cached), and its OCI archive
   loads, as on an airgapped node, into podman (a store the nodes share read-only) and into
   containerd (`ctr images import`);
2. on every node the init container installs the plugin, its Python runtime and the conflist,
   the agent starts under the manifest's security context, the probes the manifest declares
   pass against the running container, and the agents form a cluster (blocks, VXLAN routes);
3. pods that containerd's CRI starts get addresses from their node's block through the
   installed plugin, and talk across nodes over TCP;
4. a rolling update to a new image (per node: SIGTERM, the new init container, the new agent,
   readiness, minReadySeconds) deletes no route on the peers (`ip monitor route`), not even
   when the new pod takes longer than failure detection to come back (the peers keep a
   failed node's routes while it owns its block: `--route-grace`), and the pods keep their
   addresses and still talk;
5. the uninstall DaemonSet (`weavepy manifest --uninstall`) removes what the init container
   installed, and the agent's devices and state.
The first build takes minutes (the Debian bases and the wheels); later runs reuse the image.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import importlib.util
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cni.conftest import REFERENCE_PLUGINS, wait_for_socket
from tests.cni.cri import (
    PAUSE_CMD,
    containerd_config,
    exec_sync,
    pod_ip,
    remove_pod,
    remove_pods,
    run_pod,
    wget,
)
from tests.cni.oci import build_image
from tests.conftest import require, require_binary, require_root

pytestmark = [pytest.mark.netns, pytest.mark.peer, pytest.mark.slow, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[2]
BUSYBOX = "localhost/wpimg-busybox:1"
POD_RANGE = "198.19.0.0/16"
API_ADDRESS = "198.18.0.2"  # the API stand-in, on the sandbox's switch (nodes are .11 and up)
API_PORT = 6443
SLOW_POD_START = 15.0  # a pod that takes this long to come back: longer than failure detection


def podman_store(store: Path, *args: str, timeout: float = 600) -> str:
    done = subprocess.run(["podman", "--root", str(store / "storage"), "--runroot",
                           str(store / "run"), "--storage-driver", "overlay", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"podman {' '.join(args)}: {done.stderr[-2000:]}"
    return done.stdout


@dataclass(frozen=True)
class Images:
    """The built image, the rolling update's new one, both in a store the nodes read."""

    tag: str
    next_tag: str
    archive: Path
    store: Path


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    require_root()  # deploy/build-image.sh installs podman, buildah and debootstrap itself
    built = subprocess.run(["bash", str(REPO / "deploy" / "build-image.sh")],
                           capture_output=True, text=True, timeout=1800, check=False)
    assert built.returncode == 0, built.stderr[-3000:]
    tag = built.stdout.strip().splitlines()[-1]
    out = Path(os.environ.get("WEAVEPY_IMAGE_OUT", REPO / "build" / "image"))
    archive = out / f"weavepy-{tag.split(':', 1)[1]}.oci.tar"
    assert archive.is_file(), (archive, built.stderr[-2000:])
    # a short path: podman refuses a runroot longer than 50 characters (pytest's temporary
    # directories grow with pytest-xdist's worker names)
    store = Path(tempfile.mkdtemp(prefix="wpimg-store-"))
    loaded = podman_store(store, "load", "-i", str(archive))  # what an airgapped node does
    assert tag in loaded, loaded
    # the rolling update's image: a new image (its own ID) on top of the built one
    context = tmp_path_factory.mktemp("next-image")
    (context / "Containerfile").write_text(f"FROM {tag}\nLABEL io.weavepy.test.rollout=next\n")
    next_tag = f"{tag}-next"
    podman_store(store, "build", "--network", "none", "--pull=never", "-t", next_tag,
                 str(context))
    try:
        yield Images(tag, next_tag, archive, store)
    finally:
        with contextlib.suppress(AssertionError):
            podman_store(store, "rmi", "--all", "--force")
        shutil.rmtree(store, ignore_errors=True)


def render(*flags: str) -> list[dict[str, Any]]:
    """What `weavepy manifest FLAGS` prints, as objects."""
    done = subprocess.run([sys.executable, "-m", "weavepy.cli", "manifest", *flags],
                          capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return [o for o in yaml.safe_load_all(done.stdout) if o]


def pod_template(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    daemonset = next(o for o in objects if o["kind"] == "DaemonSet")
    return daemonset, daemonset["spec"]["template"]["spec"]


@dataclass
class Node:
    """One sandbox node: its container host (podman), containerd, and the pods on it."""

    node: Any  # weavepy.devtools.sandbox.SandboxNode
    root: Path
    host: Any  # weavepy.devtools.kubelet.PodmanHost
    containerd: Any = None
    channel: Any = None
    runtime: Any = None
    agent: Any = None  # the agent's ContainerPlan
    pods: dict[str, tuple[str, str, str]] = field(default_factory=dict)

    @property
    def socket(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    def ctr(self, *args: str, timeout: float = 300) -> str:
        return self.node.run(["ctr", "--address", str(self.socket), "-n", "k8s.io", *args],
                             timeout=timeout).stdout


def start_containerd(n: Node, busybox: Path) -> None:
    """The node's containerd, in the node's mount namespace: its CNI directories are the
    node's /opt/cni/bin and /etc/cni/net.d (the init container fills them), pod namespaces go
    to the node's /var/run/netns (the agent's netns volume)."""
    bin_dir = n.root / "opt" / "cni" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("loopback", "portmap"):  # what the node's kubernetes-cni package provides
        shutil.copy2(Path(REFERENCE_PLUGINS, name), bin_dir / name)
    state = n.root / "containerd"
    state.mkdir(parents=True, exist_ok=True)
    config = state / "config.toml"
    config.write_text(containerd_config(
        root=state / "root", state=Path("/run/containerd"), socket=n.socket,
        runc_root=Path("/run/containerd/runc"), bin_dir="/opt/cni/bin",
        conf_dir="/etc/cni/net.d", image=BUSYBOX, netns_under_state=False))
    n.containerd = n.node.start("containerd", [*n.host.enter(), "containerd", "--config",
                                               str(config)])
    wait_for_socket(n.socket, n.containerd, timeout=60)
    n.ctr("images", "import", str(busybox))

    import grpc
    from cri_api.v1 import api_pb2_grpc

    n.channel = grpc.insecure_channel(f"unix://{n.socket}")
    n.runtime = api_pb2_grpc.RuntimeServiceStub(n.channel)


def start_kube_api(box: Any, directory: Path) -> Any:
    """The API stand-in, in the sandbox's hub namespace on API_ADDRESS; its ApiAccess."""
    from tests.deploy.kube_replay import make_ca_and_server_cert
    from weavepy.devtools.kubelet import ApiAccess

    ca, cert, key = make_ca_and_server_cert(directory, API_ADDRESS)
    token = secrets.token_urlsafe(24)
    (directory / "token").write_text(token)
    subprocess.run(["ip", "-n", box.hub_netns, "addr", "add", f"{API_ADDRESS}/24", "dev",
                    box.bridge], check=True, timeout=10)
    hub = box.namespace(box.hub_netns)
    server = hub.start("kube-api", [
        sys.executable, "-m", "tests.deploy.kube_standin", "--bind", f"{API_ADDRESS}:{API_PORT}",
        "--cert", str(cert), "--key", str(key), "--token-file", str(directory / "token"),
        *(arg for n in box.nodes for arg in ("--node", f"{n.name}={n.underlay_ip}"))],
        cwd=str(REPO))
    deadline = time.monotonic() + 30
    while box.nodes[0].run(["bash", "-c", f"exec 3<>/dev/tcp/{API_ADDRESS}/{API_PORT}"],
                           check=False).returncode != 0:
        assert server.alive() and time.monotonic() < deadline, server.log_text()[-2000:]
        time.sleep(0.2)
    return ApiAccess(API_ADDRESS, API_PORT, token, ca.read_bytes())


def report(nodes: list[Node], rig: Any) -> str:
    """Each node's agent status and the last lines of its container's log (for failures)."""
    parts = []
    for n in nodes:
        status = rig.status(n.node)
        brief = None if status is None else {
            k: status.get(k) for k in ("name", "ready", "reasons", "peers", "ipam", "kube")}
        log = n.host.logs(n.agent) if n.agent is not None else ""
        parts.append(f"--- {n.node.name}: {json.dumps(brief)[:1500]}\n"
                     + "\n".join(log.splitlines()[-25:]))
    return "\n".join(parts)


def wait_mesh(nodes: list[Node], rig: Any) -> dict[str, list[str]]:
    from weavepy.devtools.agentbox import WaitTimeout

    try:
        blocks: dict[str, list[str]] = rig.wait_mesh(timeout=120)
    except WaitTimeout as exc:
        raise AssertionError(f"{str(exc)[:300]}\n{report(nodes, rig)}") from None
    return blocks


def routes_deleted(log: str) -> list[str]:
    """The route deletions `ip -ts -o monitor route` saw."""
    return [line for line in log.splitlines() if "Deleted" in line.split(" ", 2)[:3]]


@pytest.fixture
def nodes(sandbox_factory: Callable[..., Any], images: Images,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Node]]:
    require_root()
    for binary, package in (("containerd", "containerd"), ("runc", "runc"),
                            ("ctr", "containerd"), ("nsenter", "util-linux"),
                            ("unshare", "util-linux")):
        require_binary(binary, package)
    require(Path(REFERENCE_PLUGINS, "portmap").exists(), "needs containernetworking-plugins")
    require(importlib.util.find_spec("cri_api") is not None,
            "needs PyPI container-runtime-interface-api (with grpcio)")
    require(Path("/bin/busybox").exists(), "needs Debian busybox-static")
    from weavepy.devtools.kubelet import WEAVEPY_VIEWS, PodmanHost

    busybox = build_image(tmp_path_factory.mktemp("busybox") / "busybox.oci.tar", BUSYBOX,
                          PAUSE_CMD)
    box = sandbox_factory(nodes=3)
    top = Path(f"/tmp/wpk-{box.prefix}")  # short: unix socket paths have 107 bytes
    made: list[Node] = []
    try:
        for sandbox_node in box.nodes:
            root = top / sandbox_node.name
            host = PodmanHost(sandbox_node, root, [images.store / "storage"], WEAVEPY_VIEWS)
            node = Node(sandbox_node, root, host)
            made.append(node)
            host.start()
            (root / "lib" / "modules").mkdir(parents=True)  # this kernel loads no modules
            start_containerd(node, busybox)
        yield made
    finally:
        for node in made:
            if node.runtime is not None:
                remove_pods(node.runtime)
            if node.channel is not None:
                node.channel.close()
            if node.containerd is not None:
                node.containerd.stop(timeout=15)
            node.host.close()
            cgroups = Path("/sys/fs/cgroup")
            parent = f"{node.node.netns}-pods"
            for directory in [cgroups / parent, *(h / parent for h in cgroups.iterdir()
                                                  if h.is_dir())]:
                with contextlib.suppress(OSError):
                    directory.rmdir()
        if not os.environ.get("WEAVEPY_SANDBOX_KEEP_LOGS"):
            shutil.rmtree(top, ignore_errors=True)


@dataclass
class Replacement:
    """One node's agent replaced: the steps' times, each peer's route changes (`ip -ts monitor
    route`) and agent log meanwhile, and a peer pod's pings to the node's pod meanwhile."""

    node: str
    steps: list[tuple[str, float]]
    routes: dict[str, str]
    peer_logs: dict[str, str]
    pings: str

    def deleted(self) -> dict[str, list[str]]:
        return {peer: routes_deleted(log) for peer, log in self.routes.items()
                if routes_deleted(log)}

    def summary(self) -> str:
        start = self.steps[0][1]
        steps = ", ".join(f"{what} +{t - start:.1f} s" for what, t in self.steps)
        routes = "; ".join(f"{peer}: {' / '.join(log.splitlines()) or 'no change'}"
                           for peer, log in self.routes.items())
        return f"{self.node}: {steps}\n  pings {self.pings}\n  routes {routes}"


@dataclass
class Rollout:
    """What the rolling update did: each node replaced in turn, then one slow replacement."""

    fast: dict[str, Replacement] = field(default_factory=dict)
    slow: Replacement | None = None

    def summary(self) -> str:
        parts = ["rolling update:", *(r.summary() for r in self.fast.values())]
        if self.slow is not None:
            parts += [f"slow replacement ({SLOW_POD_START:g} s pause):", self.slow.summary()]
        return "\n".join(parts)


@pytest.fixture(scope="module")
def rollout() -> Rollout:
    """Shared by the scenario below and the check after it (they run in file order)."""
    return Rollout()


def replace_agent(n: Node, peers: list[Node], plan: Any, pause: float,
                  min_ready: float) -> Replacement:
    """What the DaemonSet controller and the kubelet do to one node in a rolling update: the
    old agent gets SIGTERM; after `pause` (0: at once), the new pod's init container, then its
    agent; readiness; minReadySeconds. The peers' route changes and one peer pod's pings to
    this node's pod are recorded meanwhile."""
    monitors = {p.node.name: p.node.start(f"routes-{n.node.name}",
                                           ["ip", "-ts", "-o", "monitor", "route"])
                for p in peers}
    time.sleep(0.5)  # the monitors subscribe
    since = {p.node.name: len(p.host.logs(p.agent)) for p in peers}
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pinger:
        pings = pinger.submit(exec_sync, peers[0].runtime, peers[0].pods["web"][1], [
            "ping", "-q", "-c", str(int((pause + 18) * 5)), "-i", "0.2", "-w",
            str(int(pause + 18)), n.pods["web"][2]], int(pause + 30))
        steps = [("SIGTERM", time.time())]
        assert n.host.stop_container(n.agent) == 0  # a clean exit
        steps.append(("exited", time.time()))
        time.sleep(pause)
        n.host.prepare(plan)
        n.host.run_init(plan.init_containers[0])
        steps.append(("init done", time.time()))
        n.host.start_container(plan.containers[0])
        n.agent = plan.containers[0]
        steps.append(("agent started", time.time()))
        n.host.wait_probe(n.agent, "readinessProbe", timeout=180)
        steps.append(("ready", time.time()))
        time.sleep(min_ready)
        output = pings.result()[1]
    summary = re.search(r"\d+ packets transmitted, \d+ packets received", output)
    routes = {}
    for name, monitor in monitors.items():
        monitor.stop(timeout=5)
        routes[name] = monitor.log_text().strip()
    return Replacement(n.node.name, steps, routes,
                       {p.node.name: p.host.logs(p.agent)[since[p.node.name]:] for p in peers},
                       summary.group(0) if summary else output[-300:])


def test_daemonset_from_the_image_runs_upgrades_and_uninstalls(nodes: list[Node],
                                                               images: Images,
                                                               rollout: Rollout,
                                                               tmp_path: Path) -> None:
    from weavepy.devtools.agentbox import AgentBox
    from weavepy.devtools.kubelet import translate

    box = nodes[0].node.box
    keyring = tmp_path / "keyring"
    keyring.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    api = start_kube_api(box, tmp_path)
    flags = ["--ipalloc-range", POD_RANGE, "--keyring-file", str(keyring)]  # kube peers: on
    objects = render("--image", images.tag, *flags)
    daemonset, spec = pod_template(objects)
    namespace = daemonset["metadata"]["namespace"]
    rig = AgentBox(box, pod_range=POD_RANGE)
    # 1. the archive also loads into containerd, as on an airgapped containerd node
    nodes[0].ctr("images", "import", str(images.archive))
    assert images.tag in nodes[0].ctr("images", "ls", "-q").split()

    # 2. the pod on every node: init container, then the agent
    for n in nodes:
        plan = translate(spec, objects, n.host.context(api), f"weavepy-{n.node.name}",
                         namespace)
        n.host.prepare(plan)
        output = n.host.run_init(plan.init_containers[0])
        assert "installed the CNI plugin's Python runtime" in output, output
        n.host.start_container(plan.containers[0])
        n.agent = plan.containers[0]
        runtime = next((n.root / "opt" / "weavepy").glob("python-*"))
        plugin = (n.root / "opt" / "cni" / "bin" / "weavepy-cni").read_text()
        assert plugin.startswith(f"#!/opt/weavepy/{runtime.name}/bin/python3")
        conflist = json.loads((n.root / "etc/cni/net.d/10-weavepy.conflist").read_text())
        assert [p["type"] for p in conflist["plugins"]] == ["weavepy-cni", "portmap"]
    for n in nodes:
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            seen = n.host.wait_probe(n.agent, kind, timeout=180)
            assert seen.startswith("200"), (kind, seen)
        inspect = json.loads(n.host.podman("inspect", n.agent.podman_name).stdout)[0]
        assert sorted(inspect["EffectiveCaps"]) == ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"]
        assert inspect["HostConfig"]["ReadonlyRootfs"] is True
    blocks = wait_mesh(nodes, rig)
    for n in nodes:
        status = rig.status(n.node)
        assert status is not None and status["name"] == n.node.name

    # 3. pods through containerd's CRI and the plugin the init container installed
    for n in nodes:
        n.pods["web"] = run_pod(
            n.runtime, f"web-{n.node.name}", image=BUSYBOX,
            command=["/bin/httpd", "-f", "-p", "8080", "-h", "/etc"],
            log_dir=n.root / "logs", cgroup_parent=f"/{n.node.netns}-pods")
        ip = n.pods["web"][2]
        assert any(ip_in(ip, block) for block in blocks[n.node.name]), (ip, blocks)

    def all_talk() -> None:
        for a in nodes:
            for b in nodes:
                if a is not b:
                    got = wget(a.runtime, a.pods["web"][1], f"http://{b.pods['web'][2]}:8080/"
                               f"hostname")
                    assert got.strip() == f"web-{b.node.name}"

    all_talk()
    addresses = {n.node.name: n.pods["web"][2] for n in nodes}

    # 4. the rolling update, one node at a time, as the DaemonSet controller does it
    new_objects = render("--image", images.next_tag, *flags)
    _, new_spec = pod_template(new_objects)
    min_ready = int(daemonset["spec"].get("minReadySeconds", 0))

    def replace(n: Node, pause: float) -> Replacement:
        plan = translate(new_spec, new_objects, n.host.context(api), f"weavepy-{n.node.name}",
                         namespace)
        done = replace_agent(n, [p for p in nodes if p is not n], plan, pause, min_ready)
        assert n.host.podman("inspect", "--format", "{{.ImageName}}",
                             n.agent.podman_name).stdout.strip() == images.next_tag
        return done

    for n in nodes:
        done = replace(n, 0.0)
        rollout.fast[n.node.name] = done
        assert not done.deleted(), done.summary()  # no peer deleted a route
    # the same with a pod that takes longer than failure detection to start (a slow node): the
    # peers declare it failed and keep its routes, since it still owns its block
    rollout.slow = replace(nodes[0], SLOW_POD_START)
    print(rollout.summary())
    assert wait_mesh(nodes, rig) == blocks
    assert {n.node.name: pod_ip(n.runtime, n.pods["web"][0]) for n in nodes} == addresses
    for n in nodes:
        code, out, _ = exec_in_pod(n, ["ip", "-o", "-4", "addr", "show", "eth0"])
        assert code == 0 and f" {addresses[n.node.name]}/" in out, out
    all_talk()

    # 5. uninstall: pods drained and weavepy's DaemonSet deleted, then the uninstall DaemonSet
    for n in nodes:
        remove_pod(n.runtime, n.pods.pop("web")[0])
        assert n.host.stop_container(n.agent) == 0
    uninstall_objects = render("--uninstall", "--image", images.next_tag, *flags)
    _, uninstall_spec = pod_template(uninstall_objects)
    for n in nodes:
        plan = translate(uninstall_spec, uninstall_objects, n.host.context(api),
                         f"weavepy-uninstall-{n.node.name}", namespace)
        n.host.prepare(plan)
        output = n.host.run_init(plan.init_containers[0])
        assert "removed" in output, output
        n.host.start_container(plan.containers[0])
        assert sorted(p.name for p in (n.root / "opt" / "cni" / "bin").iterdir()) == [
            "loopback", "portmap"]
        assert list((n.root / "etc" / "cni" / "net.d").iterdir()) == []
        assert list((n.root / "opt" / "weavepy").iterdir()) == []
        links = json.loads(n.node.run(["ip", "-j", "link", "show"]).stdout)
        assert not {x["ifname"] for x in links} & {"weavepy.1", "weavepy0"}, links
        assert not list((n.root / "var" / "lib" / "weavepy").glob("*.json")), output


def test_a_slow_replacement_deletes_no_route_on_the_peers(rollout: Rollout) -> None:
    """The slow replacement of the scenario above, seen from the peers: they declared the node
    failed, and deleted no route (its block is still its own, so its routes stay)."""
    if rollout.slow is None:
        pytest.fail("needs test_daemonset_from_the_image_runs_upgrades_and_uninstalls first")
    slow = rollout.slow
    assert not slow.deleted(), rollout.summary()
    assert any(f"member {slow.node}: failed" in log for log in slow.peer_logs.values()), \
        f"the pause was not longer than failure detection:\n{rollout.summary()}"


def ip_in(address: str, block: str) -> bool:
    return ipaddress.ip_address(address) in ipaddress.ip_network(block)


def exec_in_pod(n: Node, argv: list[str]) -> tuple[int, str, str]:
    return exec_sync(n.runtime, n.pods["web"][1], argv)
