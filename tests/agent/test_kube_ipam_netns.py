"""`--ipam kubernetes` with real agents: pod blocks are the nodes' podCIDRs (issue 15).

Three sandbox nodes run real agents with `--ipam kubernetes --kube-peers`. The Kubernetes API
is a stand-in (tests/agent/kube_live_api.py: no API server can run here), one inside each
node on 127.0.0.1, all serving one Node table with podCIDRs inside 198.19.0.0/16 as
kube-controller-manager `--allocate-node-cidrs` would write them. In order:

* n3's Node has no podCIDR yet: n3 says `waiting_for_pod_cidr` with the fix, is not ready, and
  nobody routes to it, while n1 and n2 route to each other's podCIDR;
* n3's Node gets its podCIDR (a watch event): every bridge carries its podCIDR's gateway and
  every node routes the other two podCIDRs;
* a pod on each node, made through the real CNI plugin, gets an address from its node's
  podCIDR and reaches the pods on the other nodes;
* no node receives an IPAM (0xC1) message or push/pull state, and none writes weavepy's IPAM
  state: there is no Paxos in this mode;
* with its API stand-in gone, n2's agent restarts: it keeps its podCIDR (saved in its state
  directory), its pod keeps working, and a new pod gets an address from the same podCIDR and
  is reached from n1.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from tests.agent.kube_live_api import LiveKube
from tests.conftest import require_binary
from weavepy.devtools.agentbox import AgentBox, gateway_of
from weavepy.devtools.sandbox import Sandbox, SandboxNode

pytestmark = [pytest.mark.netns, pytest.mark.slow]

POD_CIDRS = {"n1": "198.19.1.0/24", "n2": "198.19.2.0/24", "n3": "198.19.3.0/24"}
FIX = ("the control plane allocates podCIDRs with kube-controller-manager "
       "--allocate-node-cidrs (kubeadm --pod-network-cidr)")


def pings(box: Sandbox, netns: str, address: str) -> bool:
    result = box.namespace(netns).run(["ping", "-c", "2", "-i", "0.2", "-W", "2", address],
                                      check=False)
    return result.returncode == 0


def ipam_of(rig: AgentBox, node: SandboxNode, state: str, source: str
            ) -> Callable[[], dict[str, Any] | None]:
    def probe() -> dict[str, Any] | None:
        doc = rig.status(node)
        if doc and doc["ipam"]["state"] == state and doc["ipam"]["pod_cidr_source"] == source:
            return doc
        return None

    return probe


@pytest.mark.timeout(240)
def test_pods_get_their_nodes_pod_cidr_and_reach_each_other(
        sandbox_factory: Callable[..., Any]) -> None:
    from weavepy.cni.install import install_cni

    require_binary("ping", "iputils-ping")
    box = sandbox_factory(nodes=3)
    n1, n2, n3 = box.nodes
    rig = AgentBox(box, pod_range="198.19.0.0/16")
    installed = install_cni(rig.root / "cni-bin", rig.root / "cni-conf")
    kube = LiveKube(rig.root / "kube-api")
    for node in (n1, n2):  # dual-stack podCIDRs: the IPv6 one is ignored
        kube.put(node.name, node.underlay_ip, [POD_CIDRS[node.name], f"fd00:{node.index}::/64"])
    kube.put(n3.name, n3.underlay_ip)

    def launch(node: SandboxNode) -> None:
        rig.launch(node, extra=["--ipam", "kubernetes", "--kube-peers",
                                "--kubeconfig", str(kubeconfigs[node.name]),
                                "--cni-conf-dir", str(installed.conflist.parent)])

    kubeconfigs = {node.name: kube.serve(node) for node in box.nodes}
    for node in box.nodes:
        launch(node)  # no peers given: each finds the others through the API

    waiting = rig.wait("n3 waiting for its podCIDR",
                       ipam_of(rig, n3, "waiting_for_pod_cidr", "api"))
    assert waiting["ipam"]["mode"] == "kubernetes"
    assert waiting["ipam"]["detail"] == "node n3 has no podCIDR yet"
    assert waiting["ipam"]["fix"] == FIX
    assert not waiting["ready"]
    assert any("waiting_for_pod_cidr" in r for r in waiting["not_ready_reasons"])
    early = rig.wait_mesh([n1, n2])  # exactly each other's podCIDR, nothing for n3
    assert early == {"n1": [POD_CIDRS["n1"]], "n2": [POD_CIDRS["n2"]]}
    assert rig.dataplane(n3).bridge_addresses == ()

    kube.put(n3.name, n3.underlay_ip, [POD_CIDRS["n3"]])
    blocks = rig.wait_mesh(box.nodes)
    assert blocks == {name: [cidr] for name, cidr in POD_CIDRS.items()}
    for node in box.nodes:
        gateway = f"{gateway_of(POD_CIDRS[node.name])}/24"
        assert rig.dataplane(node).bridge_addresses == (gateway,)
        doc = rig.status(node)
        assert doc is not None and doc["ready"], doc and doc["not_ready_reasons"]
        assert (doc["ipam"]["state"], doc["ipam"]["pod_cidr"]) == ("ready",
                                                                  POD_CIDRS[node.name])

    pods: dict[str, tuple[str, str]] = {}
    for node in box.nodes:
        netns = box.add_netns(f"pod{node.index}").netns
        address = rig.cni_add(node, installed.plugin, netns)
        assert IPv4Address(address) in IPv4Network(POD_CIDRS[node.name]), address
        pods[node.name] = (netns, address)
    for name, (netns, _) in pods.items():
        for other, (_, address) in pods.items():
            if other != name:
                assert pings(box, netns, address), f"pod on {name} -> pod on {other}"

    for node in box.nodes:
        doc = rig.status(node)
        assert doc is not None
        dropped = doc["ipam"]["dropped"]
        assert "ipam_message" not in dropped and "ipam_state" not in dropped, dropped
        assert not (rig.state_dir(node) / "ipam-core.json").exists()
        assert doc["cluster_id"] == "kubernetes"

    kube.stop(n2)  # the API is unreachable from n2 from now on
    rig.stop(n2)
    launch(n2)
    back = rig.wait("n2 ready again from its saved podCIDR", ipam_of(rig, n2, "ready", "saved"))
    assert back["ipam"]["pod_cidr"] == POD_CIDRS["n2"] and back["ready"]
    netns = box.add_netns("pod2b").netns
    address = rig.cni_add(n2, installed.plugin, netns)
    assert IPv4Address(address) in IPv4Network(POD_CIDRS["n2"]), address
    assert address != pods["n2"][1]
    for target in (address, pods["n2"][1]):
        assert rig.wait(f"the pod on n1 reaching {target} on n2",
                        partial(pings, box, pods["n1"][0], target), timeout=30)
    assert (rig.status(n2) or {})["discovery"]["errors"] > 0  # the API did not answer
