"""`weavepy ps` on a live node: pods made through the real CNI plugin (weavepy-cni, installed
as a runtime would find it) against a real agent in a sandbox node, and the listing checked
against the kernel of the pods' own namespaces (and Weave's `weave_ips` counting them). Also
the kernel read alone (weavepy.podlist.read_pod_macs) over more veths than one batch holds."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.ops.test_ops_netns import samples, scrape, value
from weavepy.cni.podnet import host_veth_name
from weavepy.devtools.agentbox import AgentBox
from weavepy.devtools.sandbox import Sandbox
from weavepy.podlist import read_pod_macs

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def _mac(netns: str, ifname: str) -> str:
    out = subprocess.run(["ip", "-n", netns, "-j", "link", "show", ifname], check=True,
                         capture_output=True, text=True, timeout=10).stdout
    mac: str = json.loads(out)[0]["address"]
    return mac


@pytest.mark.timeout(120)
def test_ps_lists_the_pods_of_this_node(agent_box: Any) -> None:
    rig: AgentBox = agent_box(1)
    node = rig.box.nodes[0]
    rig.launch(node)
    rig.wait_mesh(timeout=45)
    from weavepy.cni.install import install_cni

    installed = install_cni(rig.root / "cni-bin", rig.root / "cni-conf")
    pods = [(f"{rig.box.prefix}-pod1", "eth0"), (f"{rig.box.prefix}-pod2", "net1")]
    addresses = {}
    for netns, ifname in pods:
        subprocess.run(["ip", "netns", "add", netns], check=True, timeout=10)
        addresses[netns] = rig.cni_add(node, installed.plugin, netns, ifname=ifname)

    listed = rig.cli(node, "ps", "--json")
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    assert [(e["container_id"], e["ifname"]) for e in entries] == pods
    for entry, (netns, ifname) in zip(entries, pods, strict=True):
        assert entry["host_ifname"] == host_veth_name(netns, ifname)
        node.run(["ip", "link", "show", entry["host_ifname"]])  # the host end is there
        assert entry["mac"] == _mac(netns, ifname), "the pod side's MAC, from the kernel"
        assert entry["addresses"] == [f"{addresses[netns]}/24"]
        assert entry["problem"] is None

    assert value(samples(node.call(scrape)), "weave_ips", state="local-used") == len(pods)

    text = rig.cli(node, "ps")
    assert text.returncode == 0, text.stderr
    for entry in entries:
        row = next(line for line in text.stdout.splitlines()
                   if line.startswith(entry["container_id"] + " "))
        assert row.split() == [entry["container_id"], entry["ifname"], entry["host_ifname"],
                               entry["mac"], *entry["addresses"]]

    # the second pod's interface disappears behind the runtime's back: ps says so
    gone_ns, gone_if = pods[1]
    subprocess.run(["ip", "-n", gone_ns, "link", "del", gone_if], check=True, timeout=10)
    after = json.loads(rig.cli(node, "ps", "--json").stdout)
    assert after[0] == entries[0]
    assert after[1]["mac"] is None
    assert after[1]["problem"].startswith(f"its host veth {host_veth_name(gone_ns, gone_if)} "
                                          f"is gone")
    assert f"{gone_ns}/{gone_if}: its host veth" in rig.cli(node, "ps").stdout


def _veth_macs(prefix: str) -> dict[str, str | None]:
    """read_pod_macs in small batches, in this namespace (run with node.call)."""
    return read_pod_macs(prefix, batch=3)


@pytest.mark.timeout(90)
def test_read_pod_macs_over_several_batches(sandbox_factory: Any) -> None:
    box: Sandbox = sandbox_factory(nodes=1)
    node = box.nodes[0]
    expected: dict[str, str | None] = {}
    for i in range(7):  # 7 pods, each in its own namespace: three batches of at most 3
        netns = f"{box.prefix}-v{i}"
        subprocess.run(["ip", "netns", "add", netns], check=True, timeout=10)
        node.run(["ip", "link", "add", f"wpt{i}", "type", "veth", "peer", "name", "eth0",
                  "netns", netns])
        expected[f"wpt{i}"] = _mac(netns, "eth0")
    node.run(["ip", "link", "add", "wpt-local", "type", "veth", "peer", "name", "wpt-twin"])
    twin = json.loads(node.run(["ip", "-j", "link", "show", "wpt-twin"]).stdout)[0]
    # both ends here: its twin is listed too (it carries the prefix), each with the other's MAC
    local = json.loads(node.run(["ip", "-j", "link", "show", "wpt-local"]).stdout)[0]
    expected["wpt-local"] = twin["address"]
    expected["wpt-twin"] = local["address"]
    node.run(["ip", "link", "add", "other0", "type", "veth", "peer", "name", "other1"])
    assert node.call(_veth_macs, "wpt") == expected
