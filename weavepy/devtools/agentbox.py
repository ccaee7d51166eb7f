"""Run weavepy agents in sandbox nodes and look at them: the demo's, tests' and benchmarks' rig.

This module owns the conventions for an agent inside a sandbox node: where its state and run
directories live (under the sandbox's run directory, so `Sandbox.down` removes them), the
gossip key they share, the flags they are launched with, and how to read an agent's status
(its local API, from inside the node) and its kernel state (netlink, from inside the node).

The rules it keeps: every agent is a process the sandbox started, stopped only by its PID;
every wait is bounded and, when it gives up, says what it waited for and shows the agents'
last log lines; nothing here runs in the machine's own network namespace.
"""

from __future__ import annotations

import base64
import http.client
import json
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute  # imported here so forked readers do not pay for it each time

from weavepy.devtools.sandbox import ManagedProcess, Sandbox, SandboxError, SandboxNode

__all__ = ["AgentBox", "DataPlaneView", "WaitTimeout", "read_dataplane"]

REPO = Path(__file__).resolve().parents[1]
API_PORT = 6784
DEVICE = "weavepy.1"
WG_DEVICE = "weavepy.wg"  # the agent's default --wg-device
BRIDGE = "weavepy0"
T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A bounded wait gave up; the message says for what, and shows the last observation."""


@dataclass(frozen=True)
class DataPlaneView:
    """One node's data-plane kernel state: VXLAN routes (block -> gateway), neighbours, FDB,
    bridge, and the routes of the encrypted path (block -> source address on the TUN)."""

    routes: dict[str, str]
    neighbours: dict[str, str]
    fdb: dict[str, str]
    device_up: bool
    bridge_addresses: tuple[str, ...]
    encrypted_routes: dict[str, str] = field(default_factory=dict)

    def all_routes(self) -> set[str]:
        """Every peer block this node routes, over either path."""
        return set(self.routes) | set(self.encrypted_routes)


def read_dataplane(device: str = DEVICE, bridge: str = BRIDGE,
                   wg_device: str = WG_DEVICE) -> DataPlaneView:
    """Read the VXLAN device's routes, permanent neighbours and FDB, and the WireGuard
    device's routes, in this namespace (run it inside a node with `node.call`)."""
    with IPRoute() as ipr:
        encrypted: dict[str, str] = {}
        tun = ipr.link_lookup(ifname=wg_device)
        if tun:
            for r in ipr.get_routes(family=socket.AF_INET, table=254):
                if r.get_attr("RTA_OIF") == tun[0] and r.get_attr("RTA_DST"):
                    encrypted[f"{r.get_attr('RTA_DST')}/{r['dst_len']}"] = str(
                        r.get_attr("RTA_PREFSRC"))
        found = ipr.link_lookup(ifname=device)
        routes: dict[str, str] = {}
        neighbours: dict[str, str] = {}
        fdb: dict[str, str] = {}
        up = False
        if found:
            index = found[0]
            up = bool(ipr.get_links(index)[0]["flags"] & 1)
            for r in ipr.get_routes(family=socket.AF_INET, table=254):
                if r.get_attr("RTA_OIF") == index and r.get_attr("RTA_DST"):
                    routes[f"{r.get_attr('RTA_DST')}/{r['dst_len']}"] = str(
                        r.get_attr("RTA_GATEWAY"))
            for n in ipr.get_neighbours(family=socket.AF_INET, ifindex=index):
                if n["state"] & 0x80:
                    neighbours[str(n.get_attr("NDA_DST"))] = str(n.get_attr("NDA_LLADDR"))
            for n in ipr.get_neighbours(family=7, ifindex=index):
                if n.get_attr("NDA_DST"):
                    fdb[str(n.get_attr("NDA_LLADDR"))] = str(n.get_attr("NDA_DST"))
        bridge_addresses: list[str] = []
        bridges = ipr.link_lookup(ifname=bridge)
        if bridges:
            for a in ipr.get_addr(family=socket.AF_INET, index=bridges[0]):
                bridge_addresses.append(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
    return DataPlaneView(routes, neighbours, fdb, up, tuple(sorted(bridge_addresses)),
                         encrypted)


def http_json(method: str, path: str, port: int = API_PORT, body: Any = None,
              timeout: float = 5.0, token: str | None = None) -> tuple[int, Any] | None:
    """One API call on 127.0.0.1 in this namespace (with `token` as the bearer, which
    requests other than GET need); None if nothing listens."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload else {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None
    except (ConnectionRefusedError, TimeoutError, ConnectionResetError):
        return None
    finally:
        conn.close()


@dataclass
class AgentBox:
    """Agents in the nodes of one sandbox, all sharing a generated gossip key."""

    box: Sandbox
    pod_range: str = "198.19.0.0/16"
    block_prefix: int = 24
    profile: str = "lan"
    extra_args: Sequence[str] = ()
    log_level: str = "info"
    agents: dict[str, ManagedProcess] = field(default_factory=dict)
    state_root: Path | None = None  # holds each agent's state and run directory

    def __post_init__(self) -> None:
        self.root = self.state_root or self.box.run_dir / "agents"
        self.root.mkdir(parents=True, exist_ok=True)
        self.key_file = self.root / "gossip.key"
        if not self.key_file.exists():
            self.key_file.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
            self.key_file.chmod(0o600)

    # -- paths and commands --------------------------------------------------------------------

    def state_dir(self, node: SandboxNode) -> Path:
        return self.root / node.name / "state"

    def run_dir(self, node: SandboxNode) -> Path:
        return self.root / node.name / "run"

    def argv(self, node: SandboxNode, peers: Iterable[SandboxNode] = (),
             extra: Sequence[str] = (), key_file: Path | None = None) -> list[str]:
        return [
            sys.executable, "-m", "weavepy.cli", "--log-level", self.log_level, "launch",
            *(p.underlay_ip for p in peers),
            "--name", node.name, "--ipalloc-range", self.pod_range,
            "--block-prefix", str(self.block_prefix),
            "--state-dir", str(self.state_dir(node)), "--run-dir", str(self.run_dir(node)),
            "--keyring-file", str(key_file or self.key_file), "--profile", self.profile,
            *self.extra_args, *extra,
        ]

    def cli(self, node: SandboxNode, *args: str, timeout: float = 30
            ) -> subprocess.CompletedProcess[str]:
        """Run `weavepy ARGS` inside the node (the real CLI, as an operator would), with
        $WEAVEPY_STATE_DIR naming the node's state directory as the agent's environment
        would, so commands that change the node find its API token."""
        return node.run(["env", f"WEAVEPY_STATE_DIR={self.state_dir(node)}", sys.executable,
                         "-m", "weavepy.cli", *args], check=False, timeout=timeout)

    def api_token(self, node: SandboxNode) -> str | None:
        """The node's API token (None before its agent first started)."""
        from weavepy.apitoken import TokenError, read_token

        try:
            return read_token(self.state_dir(node))
        except TokenError:
            return None

    # -- lifecycle -------------------------------------------------------------------------------

    def launch(self, node: SandboxNode, peers: Iterable[SandboxNode] = (),
               extra: Sequence[str] = (), key_file: Path | None = None) -> ManagedProcess:
        old = self.agents.get(node.name)
        if old is not None and old.alive():
            raise RuntimeError(f"the agent in {node.name} is still running")
        proc = node.start("agent", self.argv(node, peers, extra, key_file), cwd=str(REPO))
        self.agents[node.name] = proc
        return proc

    def launch_all(self, nodes: Sequence[SandboxNode] | None = None) -> None:
        """The first node founds the cluster; the others join through it."""
        nodes = list(nodes if nodes is not None else self.box.nodes)
        self.launch(nodes[0])
        self.wait_api(nodes[0])
        for node in nodes[1:]:
            self.launch(node, [nodes[0]])

    def kill(self, node: SandboxNode) -> None:
        self.agents[node.name].kill()

    def stop(self, node: SandboxNode, timeout: float = 10) -> int | None:
        return self.agents[node.name].stop(timeout=timeout)

    def log(self, node: SandboxNode) -> str:
        proc = self.agents.get(node.name)
        return proc.log_text() if proc is not None else ""

    def logs_tail(self, lines: int = 15) -> str:
        parts = []
        for name, proc in self.agents.items():
            tail = proc.log_text().strip().splitlines()[-lines:]
            parts.append(f"--- {name} ({'alive' if proc.alive() else 'exited'}):\n"
                         + "\n".join(tail))
        return "\n".join(parts)

    # -- pods ------------------------------------------------------------------------------------

    def cni_add(self, node: SandboxNode, plugin: str | Path, pod_netns: str,
                ifname: str = "eth0", timeout: float = 30,
                args: Mapping[str, str] | None = None) -> str:
        """CNI ADD of the pod in netns `pod_netns` through the installed weavepy-cni `plugin`,
        run inside `node` against its agent's CNI socket; the pod's address (no prefix).
        `args` become CNI_ARGS (a kubelet passes K8S_POD_NAMESPACE and K8S_POD_NAME).

        The container id is the pod's netns name, so repeating the ADD (after an agent
        restart) asks for the same pod again. A failed, hung or unreadable ADD raises
        `SandboxError` with the plugin's own output."""
        result = self._cni("ADD", node, plugin, pod_netns, ifname, timeout, args)
        try:
            address: str = json.loads(result.stdout)["ips"][0]["address"]
        except (ValueError, LookupError, TypeError):
            raise SandboxError(f"CNI ADD in {node.name} printed no address: "
                               f"{result.stdout.strip()[:500]}") from None
        return address.split("/")[0]

    def cni_del(self, node: SandboxNode, plugin: str | Path, pod_netns: str,
                ifname: str = "eth0", timeout: float = 30,
                args: Mapping[str, str] | None = None) -> None:
        """CNI DEL of the pod `cni_add` attached in netns `pod_netns`."""
        self._cni("DEL", node, plugin, pod_netns, ifname, timeout, args)

    def _cni(self, command: str, node: SandboxNode, plugin: str | Path, pod_netns: str,
             ifname: str, timeout: float, args: Mapping[str, str] | None
             ) -> subprocess.CompletedProcess[str]:
        conf = {"cniVersion": "1.0.0", "name": "weavepy", "type": "weavepy-cni",
                "socketPath": str(self.run_dir(node) / "cni.sock")}
        plugin = Path(plugin)
        env = [f"CNI_COMMAND={command}", f"CNI_CONTAINERID={pod_netns}",
               f"CNI_NETNS=/run/netns/{pod_netns}", f"CNI_IFNAME={ifname}",
               f"CNI_PATH={plugin.parent}"]
        if args:
            env.append("CNI_ARGS=" + ";".join(f"{k}={v}" for k, v in args.items()))
        try:
            result = node.run(["env", *env, str(plugin)], input=json.dumps(conf), check=False,
                              timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SandboxError(f"CNI {command} in {node.name} took longer than {timeout:g} s"
                               ) from None
        if result.returncode != 0:
            raise SandboxError(f"CNI {command} in {node.name} failed: {result.stdout.strip()}")
        return result

    # -- observing -------------------------------------------------------------------------------

    def api(self, node: SandboxNode, method: str, path: str, body: Any = None,
            timeout: float = 10) -> tuple[int, Any] | None:
        """One API call inside the node; requests other than GET carry its API token. None when
        the agent does not answer: refused, timed out, or the call into the node overran (a
        starved machine)."""
        token = None if method == "GET" else self.api_token(node)
        try:
            result: tuple[int, Any] | None = node.call(http_json, method, path, API_PORT, body,
                                                       timeout, token, timeout=timeout + 5)
        except TimeoutError:
            return None
        return result

    def status(self, node: SandboxNode) -> dict[str, Any] | None:
        """The node's status, or None when it does not answer (a wait polls again)."""
        answer = self.api(node, "GET", "/status")
        return answer[1] if answer is not None and answer[0] == 200 else None

    def dataplane(self, node: SandboxNode) -> DataPlaneView:
        view: DataPlaneView = node.call(read_dataplane)
        return view

    def wait(self, what: str, probe: Callable[[], T | None], timeout: float = 30,
             interval: float = 0.1) -> T:
        """Poll `probe` until it returns something truthy; WaitTimeout (with logs) if not."""
        deadline = time.monotonic() + timeout
        while True:
            last = probe()
            if last:
                return last
            if time.monotonic() > deadline:
                raise WaitTimeout(f"gave up after {timeout:.0f} s waiting for {what}; last "
                                  f"observation: {str(last)[:1500]}\n{self.logs_tail()}")
            time.sleep(interval)

    def wait_api(self, node: SandboxNode, timeout: float = 30) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            proc = self.agents.get(node.name)
            if proc is not None and not proc.alive():
                raise WaitTimeout(f"the agent in {node.name} exited:\n{proc.log_text()[-3000:]}")
            return self.status(node)

        return self.wait(f"the API of {node.name}", probe, timeout)

    def blocks_of(self, nodes: Sequence[SandboxNode]) -> dict[str, list[str]]:
        """Each node's own blocks, from its own status ({} entries missing if it has none)."""
        found: dict[str, list[str]] = {}
        for node in nodes:
            doc = self.status(node)
            if doc and doc["dataplane"]["local_blocks"]:
                found[node.name] = list(doc["dataplane"]["local_blocks"])
        return found

    def mesh_complete(self, nodes: Sequence[SandboxNode], kept: Sequence[str] = ()
                      ) -> dict[str, list[str]] | None:
        """Every node has a block, and a kernel route to every other node's blocks, and no
        route to a block of a node outside `nodes`, except the blocks (by `status`) of the
        members named in `kept`: failed peers whose routes the grace keeps (`--route-grace`).
        Returns the blocks, or None."""
        blocks = self.blocks_of(nodes)
        if len(blocks) != len(nodes):
            return None
        doc = self.status(nodes[0]) if kept else None
        allowed = {b["block"] for b in (doc or {}).get("blocks", []) if b["owner"] in kept}
        for node in nodes:
            routes = self.dataplane(node).all_routes()
            wanted = {b for other, owned in blocks.items() if other != node.name for b in owned}
            if routes - allowed != wanted - allowed:
                return None
        return blocks

    def wait_mesh(self, nodes: Sequence[SandboxNode] | None = None, timeout: float = 45,
                  kept: Sequence[str] = ()) -> dict[str, list[str]]:
        nodes = list(nodes if nodes is not None else self.box.nodes)
        return self.wait(f"routes between all of {[n.name for n in nodes]}",
                         lambda: self.mesh_complete(nodes, kept), timeout, interval=0.2)


def gateway_of(block: str) -> str:
    return str(IPv4Network(block).network_address + 1)
