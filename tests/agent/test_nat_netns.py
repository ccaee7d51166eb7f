"""A node behind NAT: `--advertise-addr` with the node behind an SNAT router.

Sandbox nodes n1 and n2 run agents on the underlay. n3 is no agent but a home router: its
`eth0` is on the underlay (198.18.0.13) and a private link leads to the namespace `nat`
(198.18.1.2/24 behind 198.18.1.1). The router masquerades what `nat` sends out, and forwards
the gossip port (UDP and TCP 6783) and VXLAN (UDP 8472) arriving at 198.18.0.13 to it.
n1 and n2 have no route to 198.18.1.0/24 at all: the only way to `nat` is through the
router's address, which is what the agent in `nat` advertises.

Checked: the NATed node joins; its peers program the advertised address (their FDB entry for
its VTEP sends to 198.18.0.13), not the private one; pods on n1 and on the NATed node talk
both ways over TCP and UDP.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest

from tests.agent.traffic import echo_server_argv, tcp_echo, udp_echo
from weavepy.devtools.agentbox import AgentBox
from weavepy.devtools.sandbox import call_in_netns

pytestmark = [pytest.mark.netns, pytest.mark.slow]

ROUTER_LAN, NATTED = "198.18.1.1", "198.18.1.2"
ECHO_PORT = 7013


def _build_router(box: Any) -> Any:
    """Turn n3 into an SNAT router for a new namespace `nat`; return `nat`'s handle."""
    router = box.nodes[2]
    natted = box.add_netns("nat")
    lan = f"{box.prefix}lan"
    router.run(["ip", "-batch", "-"], input="\n".join([
        f"link add {lan} type veth peer name eth0 netns {natted.netns}",
        f"addr add {ROUTER_LAN}/24 dev {lan}",
        f"link set {lan} up",
    ]) + "\n")
    natted.run(["ip", "-batch", "-"], input="\n".join([
        f"addr add {NATTED}/24 dev eth0",
        "link set eth0 up",
        f"route add default via {ROUTER_LAN}",
    ]) + "\n")
    public = router.underlay_ip
    router.run(["nft", "-f", "-"], input=f"""
table ip {box.prefix}nat {{
    chain inbound {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "eth0" ip daddr {public} udp dport {{ 6783, 8472 }} dnat to {NATTED}
        iifname "eth0" ip daddr {public} tcp dport 6783 dnat to {NATTED}
    }}
    chain outbound {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr 198.18.1.0/24 oifname "eth0" masquerade
    }}
}}
""")
    return natted


def _peer(rig: AgentBox, node: Any, name: str) -> dict[str, Any] | None:
    doc = rig.status(node)
    if doc is None:
        return None
    found = [p for p in doc["peers"] if p["name"] == name and p["state"] == "alive"]
    return found[0] if found else None


def _echo_both(src: str, dst: str) -> tuple[bytes, bytes]:
    return (tcp_echo(src, dst, ECHO_PORT, b"over the NAT", timeout=5.0),
            udp_echo(src, dst, ECHO_PORT, b"over the NAT", tries=5))


@pytest.mark.timeout(240)
def test_a_node_behind_snat_joins_with_its_advertised_address_and_pods_talk(
        agent_box: Any) -> None:
    from weavepy.cni.install import install_cni

    rig: AgentBox = agent_box(nodes=3)
    box = rig.box
    n1, n2, router = box.nodes
    natted = _build_router(box)
    rig.launch(n1)
    rig.wait_api(n1)
    rig.launch(n2, [n1])
    rig.launch(natted, [n1], extra=["--advertise-addr", router.underlay_ip])
    members = [n1, n2, natted]
    rig.wait_mesh(members, timeout=90)

    # its peers know it by the router's address and program VXLAN to it
    for node in (n1, n2):
        peer = rig.wait(f"{node.name} to see the NATed node alive",
                        partial(_peer, rig, node, natted.name), timeout=30)
        assert peer["tags"]["ip"] == router.underlay_ip, peer
        fdb = rig.dataplane(node).fdb
        assert fdb.get(peer["vtep_mac"]) == router.underlay_ip, fdb
    own = rig.status(natted)
    assert own is not None
    assert {p["name"] for p in own["peers"] if p["state"] == "alive"} == {"n1", "n2"}

    # pods on n1 and behind the NAT talk, both ways
    installed = install_cni(rig.root / "cni-bin", rig.root / "cni-conf")
    pods = {}
    for node in (n1, natted):
        pod = box.add_netns(f"pod-{node.name}")
        address = rig.cni_add(node, installed.plugin, pod.netns)
        pods[node.name] = (pod, address)
        pod.start("echo", echo_server_argv(address, ECHO_PORT))
    for here, there in (("n1", natted.name), (natted.name, "n1")):
        (pod, source), (_, target) = pods[here], pods[there]
        answers = rig.wait(f"pod on {here} to reach the pod on {there}",
                           lambda pod=pod, source=source, target=target: (
                               lambda got: got if all(got) else None)(
                               call_in_netns(pod.netns, _echo_both, source, target)),
                           timeout=30, interval=0.5)
        assert answers == (b"tcp:over the NAT", b"udp:over the NAT"), answers
