"""A plain Linux host with stock WireGuard joins the pod network from `weavepy wg-config`.

Nodes n1 and n2 run weavepy agents (pods over VXLAN between them); node n3 runs no agent,
only Debian's `wireguard-go` and `wg`. The operator declares n3 as an external peer on both
agents (`weavepy external add`), prints its configuration with `weavepy wg-config ext` on n1,
fills in the host's private key, and applies it. wg-quick itself needs resolvconf and
writes the host's DNS, so the test applies the same file the way wg-quick would:
`wg setconf` with the wg-quick-only keys (Address, MTU) stripped (`wg-quick strip`'s job),
then `ip address`/`ip link`/`ip route` for Address, MTU and each AllowedIPs. The host then
reaches a pod on each node over TCP, and the agents show the external connection.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest

from tests.agent.traffic import echo_server_argv, tcp_echo
from tests.conftest import require_binary
from weavepy.devtools.agentbox import AgentBox
from weavepy.devtools.sandbox import SandboxNode, call_in_netns

pytestmark = [pytest.mark.netns, pytest.mark.slow]

ECHO_PORT = 7012
POD_RANGE = "198.19.0.0/17"
HOST_ADDRESS = "198.19.200.1"  # outside the pod range
WG_ONLY_KEYS = ("address", "mtu", "dns", "table", "preup", "postup", "predown", "postdown",
                "saveconfig")


def apply_wg_quick(node: SandboxNode, ifname: str, text: str, workdir: Any) -> None:
    """Apply a wg-quick file the way wg-quick does, without wg-quick (see the docstring)."""
    stripped, addresses, routes, mtu = [], [], [], None
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition("="))
        lowered = key.lower()
        if lowered == "address":
            addresses += [a.strip() for a in value.split(",")]
        elif lowered == "mtu":
            mtu = value
        elif lowered == "allowedips":
            routes += [a.strip() for a in value.split(",")]
            stripped.append(line)
        elif lowered not in WG_ONLY_KEYS:
            stripped.append(line)
    conf = workdir / f"{ifname}.conf"
    conf.write_text("\n".join(stripped) + "\n")
    node.run(["wg", "setconf", ifname, str(conf)], check=True)
    for address in addresses:
        node.run(["ip", "address", "add", address, "dev", ifname], check=True)
    node.run(["ip", "link", "set", ifname, "mtu", str(mtu or 1420), "up"], check=True)
    for route in routes:
        node.run(["ip", "route", "replace", route, "dev", ifname], check=True)


@pytest.mark.timeout(180)
def test_a_stock_wireguard_host_reaches_pods_from_wg_config_alone(
        sandbox_factory: Callable[..., Any]) -> None:
    require_binary("wireguard-go")
    require_binary("wg", "wireguard-tools")
    box = sandbox_factory(nodes=3)
    rig = AgentBox(box, pod_range=POD_RANGE)
    n1, n2, host = box.nodes
    rig.launch_all([n1, n2])
    rig.wait_mesh([n1, n2], timeout=60)

    # the host: wireguard-go, and a key pair made with stock `wg`
    ifname = box.prefix + "x"
    wggo = host.start("wggo", ["wireguard-go", "-f", ifname],
                      env={"WG_PROCESS_FOREGROUND": "1"})
    rig.wait("wireguard-go's interface", lambda: host.run(
        ["ip", "link", "show", ifname], check=False).returncode == 0 or not wggo.alive(),
        timeout=10)
    private = host.run(["wg", "genkey"], check=True).stdout.strip()
    public = host.run(["wg", "pubkey"], check=True, input=private + "\n").stdout.strip()

    for node in (n1, n2):
        added = rig.cli(node, "external", "add", "ext", "--public-key", public,
                        "--allowed-ips", f"{HOST_ADDRESS}/32",
                        "--endpoint", f"{host.underlay_ip}:51820")
        assert added.returncode == 0, added.stdout + added.stderr
    refused = rig.cli(n1, "external", "add", "bad", "--public-key", public,
                      "--allowed-ips", "198.19.1.0/24")
    assert refused.returncode != 0 and "overlaps the cluster range" in refused.stderr

    # the configuration, printed by one node, is everything the host gets
    shown = rig.cli(n1, "wg-config", "ext")
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert text.count("[Peer]") == 2 and f"Address = {HOST_ADDRESS}/32" in text
    lines = [f"PrivateKey = {private}" if line.startswith("PrivateKey") else line
             for line in text.splitlines()]
    workdir = rig.root / "ext"
    workdir.mkdir()
    apply_wg_quick(host, ifname, "\n".join(lines), workdir)

    # one pod per node, each with an echo server
    from weavepy.cni.install import install_cni

    installed = install_cni(rig.root / "cni-bin", rig.root / "cni-conf")
    pod_ips = []
    for node in (n1, n2):
        netns = f"{box.prefix}-pod{node.index}"
        subprocess.run(["ip", "netns", "add", netns], check=True, timeout=10)
        pod_ips.append(rig.cni_add(node, installed.plugin, netns))
        node.start(f"echo{node.index}", ["ip", "netns", "exec", netns,
                                         *echo_server_argv("0.0.0.0", ECHO_PORT)])
    answers: dict[str, bytes] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(answers) < len(pod_ips):
        for ip in pod_ips:
            if ip not in answers:
                got = call_in_netns(box.nodes[2].netns, tcp_echo, HOST_ADDRESS, ip, ECHO_PORT,
                                    b"from the external host", 3.0, timeout=15)
                if got:
                    answers[ip] = got
        time.sleep(0.3)
    assert answers == {ip: b"tcp:from the external host" for ip in pod_ips}, (
        f"{answers}\n{host.run(['wg', 'show'], check=False).stdout}\n{rig.logs_tail()}")

    def external_connection(node: SandboxNode) -> dict[str, Any] | None:
        doc = rig.status(node)
        for conn in (doc or {}).get("connections", []):
            if conn["peer"] == "ext" and conn["state"] == "established":
                return dict(conn)
        return None

    for node in (n1, n2):
        conn = rig.wait(f"the external connection on {node.name}",
                        partial(external_connection, node), timeout=20)
        assert conn["path"] == "wireguard" and conn["encrypted"] and conn["external"]
