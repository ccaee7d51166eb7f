"""The demo: a local multi-node weavepy cluster in network namespaces, shown working, then removed.

It builds on the sandbox only, so it never touches the machine's own network; everything it
creates carries a fresh prefix and is torn down on the way out, also on Ctrl-C or failure.

What it shows, in order: one weavepy agent per node (the first founds the cluster, the others
join it; gossip encrypted with a generated key), every node owning a pod block and holding a
VXLAN route to every other node's block, each node's pod-bridge gateway reaching the others
through VXLAN, and one pod per node, created through the real `weavepy-cni` plugin, reaching
the pods on the other nodes.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from typing import Any

from weavepy.devtools.agentbox import DEVICE, WG_DEVICE, AgentBox, WaitTimeout, gateway_of
from weavepy.devtools.sandbox import Sandbox, SandboxError

PING_RTT = re.compile(r"= [\d.]+/([\d.]+)/")


def _ping(argv_prefix: list[str], dst_ip: str, source: str | None = None) -> str:
    argv = [*argv_prefix, "ping", "-c", "3", "-i", "0.05", "-W", "1"]
    if source:
        argv += ["-I", source]
    result = subprocess.run([*argv, dst_ip], capture_output=True, text=True, timeout=15,
                            check=False)
    match = PING_RTT.search(result.stdout)
    return f"{float(match.group(1)):.2f} ms" if result.returncode == 0 and match else "FAIL"


def _matrix(echo: Callable[[str], None], names: list[str],
            cell: Callable[[int, int], str]) -> int:
    failures = 0
    echo("      " + "".join(f"{n:>11}" for n in names))
    for i, src in enumerate(names):
        cells = []
        for j in range(len(names)):
            if i == j:
                cells.append(f"{'-':>11}")
                continue
            value = cell(i, j)
            failures += value == "FAIL"
            cells.append(f"{value:>11}")
        echo(f"{src:<6}" + "".join(cells))
    return failures


def _all_established(doc: dict[str, Any] | None) -> bool:
    conns = (doc or {}).get("connections", [])
    return bool(conns) and all(c.get("state") == "established" for c in conns)


def run_demo(nodes: int, keep: bool, echo: Callable[[str], None], encrypt: bool = False) -> int:
    """Run the demo; returns the process exit code (0 when every check passed)."""
    if os.geteuid() != 0:
        echo("Error: the demo needs root (it creates network namespaces)")
        return 1
    started = time.monotonic()
    echo(f"weavepy demo: building a {nodes}-node sandbox in network namespaces ...")
    try:
        box = Sandbox.create(nodes=nodes)
    except (SandboxError, ValueError) as exc:
        echo(f"Error: {exc}")
        return 1
    failures = 0
    try:
        rig = AgentBox(box, pod_range=str(box.pod_range),
                       extra_args=["--encrypt"] if encrypt else ())
        echo(f"sandbox {box.prefix}: underlay {box.underlay}, pod range {box.pod_range}")
        echo(f"launching one weavepy agent per node (gossip key {rig.key_file}) ...")
        rig.launch_all()
        blocks = rig.wait_mesh(timeout=45)
        echo(f"every node has a block and a route to every other block "
             f"({time.monotonic() - started:.1f} s since start)")
        echo("")
        echo(f"{'node':<6}{'underlay':<15}{'block':<17}{'gateway':<14}{'IPAM':<8}peers")
        for node in box.nodes:
            doc = rig.status(node) or {}
            alive = sum(1 for p in doc.get("peers", []) if p["state"] == "alive")
            block = " ".join(blocks[node.name])
            echo(f"{node.name:<6}{node.underlay_ip:<15}{block:<17}"
                 f"{gateway_of(blocks[node.name][0]):<14}"
                 f"{doc.get('ipam', {}).get('state', '?'):<8}{alive} alive")
        first = box.nodes[0]
        echo("")
        if encrypt:  # routes exist before the first handshake; wait for every session
            rig.wait("WireGuard sessions between all nodes",
                     lambda: all(_all_established(rig.status(n)) for n in box.nodes) or None,
                     timeout=30)
        view = rig.dataplane(first)
        if encrypt:
            echo(f"kernel state on {first.name} (routes via the WireGuard device {WG_DEVICE}):")
            for block, source in sorted(view.encrypted_routes.items()):
                echo(f"  {block} dev {WG_DEVICE} src {source}")
            echo(f"connections of {first.name}:")
            for conn in (rig.status(first) or {}).get("connections", []):
                echo(f"  {conn.get('peer')}: {conn.get('path')}, "
                     f"{'encrypted' if conn.get('encrypted') else 'plain'}, "
                     f"MTU {conn.get('mtu')}, {conn.get('state')}")
        else:
            echo(f"kernel state on {first.name} (routes via the VXLAN device {DEVICE}):")
            for block, gateway in sorted(view.routes.items()):
                echo(f"  {block} via {gateway} onlink, neighbour {gateway} -> "
                     f"{view.neighbours.get(gateway, '?')}, FDB -> "
                     f"{view.fdb.get(view.neighbours.get(gateway, ''), '?')}")
        path_name = "WireGuard (encrypted)" if encrypt else "VXLAN"
        echo("")
        echo(f"pod bridge gateways reaching each other through {path_name} "
             "(ping, average RTT):")
        names = [n.name for n in box.nodes]
        gateways = [gateway_of(blocks[n][0]) for n in names]
        failures += _matrix(echo, names, lambda i, j: _ping(
            ["ip", "netns", "exec", box.nodes[i].netns], gateways[j], gateways[i]))
        echo("")
        echo("one pod per node through the weavepy-cni plugin (CNI ADD):")
        from weavepy.cni.install import install_cni

        installed = install_cni(box.run_dir / "cni-bin", box.run_dir / "cni-conf")
        pod_ns: list[str] = []
        pod_ips: list[str] = []
        for node in box.nodes:
            netns = f"{box.prefix}-pod{node.index}"
            subprocess.run(["ip", "netns", "add", netns], check=True, timeout=10)
            pod_ns.append(netns)
            pod_ips.append(rig.cni_add(node, installed.plugin, netns))
            echo(f"  pod{node.index} on {node.name}: {pod_ips[-1]}")
        echo("pod-to-pod across nodes (ping, average RTT):")
        pods = [f"pod{n.index}" for n in box.nodes]
        failures += _matrix(echo, pods, lambda i, j: _ping(
            ["ip", "netns", "exec", pod_ns[i]], pod_ips[j]))
        echo("")
        verdict = "everything reaches everything" if not failures else f"{failures} paths FAILED"
        echo(f"result: {verdict} ({time.monotonic() - started:.1f} s)")
    except (WaitTimeout, SandboxError, subprocess.SubprocessError, OSError) as exc:
        echo(f"Error: {exc}")
        failures += 1
    finally:
        if keep:
            echo(f"sandbox kept: remove it with `weavepy sandbox down {box.prefix}`")
        else:
            box.destroy()
            echo(f"sandbox {box.prefix} removed")
    return 1 if failures else 0

