"""`weavepy ps` without an agent: IPAM's allocations joined with the kernel's MACs
(weavepy.podlist.pod_list) and their text (weavepy.statusview.render_pods). The live view,
with pods made by the real CNI plugin, is tests/ops/test_ps_netns.py."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from weavepy.cni.podnet import host_veth_name
from weavepy.ipam.allocator import Allocation
from weavepy.podlist import pod_list
from weavepy.statusview import Table, render_pods

BLOCK = IPv4Network("198.19.4.0/24")
RUNTIME_ID = "f" * 8 + "0123456789abcdef" * 3 + "01234567"  # 64 hex digits, as containerd's


def allocation(container_id: str, ifname: str, last_octet: int) -> Allocation:
    return Allocation(container_id, ifname, IPv4Address(f"198.19.4.{last_octet}"), BLOCK,
                      IPv4Address("198.19.4.1"))


def test_pod_list_joins_allocations_with_the_kernel() -> None:
    allocations = [allocation("pod-b", "eth0", 3), allocation("pod-a", "net1", 4),
                   allocation("pod-a", "eth0", 2), allocation("pod-c", "eth0", 5)]
    macs = {host_veth_name("pod-a", "eth0"): "0a:00:00:00:00:01",
            host_veth_name("pod-a", "net1"): "0a:00:00:00:00:02",
            host_veth_name("pod-b", "eth0"): None,  # the peer vanished between the reads
            "wpv000000000000": "0a:00:00:00:00:09"}  # a veth IPAM does not know
    pods = pod_list(allocations, macs)
    assert [(p["container_id"], p["ifname"]) for p in pods] == [
        ("pod-a", "eth0"), ("pod-a", "net1"), ("pod-b", "eth0"), ("pod-c", "eth0")]
    assert pods[0] == {"container_id": "pod-a", "ifname": "eth0",
                       "host_ifname": host_veth_name("pod-a", "eth0"),
                       "mac": "0a:00:00:00:00:01", "addresses": ["198.19.4.2/24"],
                       "gateway": "198.19.4.1", "problem": None}
    assert pods[2]["mac"] is None and pods[2]["problem"] is None
    missing = host_veth_name("pod-c", "eth0")
    assert pods[3]["mac"] is None
    assert pods[3]["problem"] == (f"its host veth {missing} is gone, but IPAM still holds its "
                                  f"address (the runtime's CNI DEL or GC frees it)")


def test_ps_text() -> None:
    doc = {"pods": pod_list([allocation(RUNTIME_ID, "eth0", 2), allocation("pod-c", "eth0", 5)],
                            {host_veth_name(RUNTIME_ID, "eth0"): "0a:00:00:00:00:01"})}
    table, problem = render_pods(doc)
    assert isinstance(table, Table)
    assert table.plain().splitlines() == [
        "pods:",
        "CONTAINER     IFNAME  HOST IFNAME      MAC                ADDRESSES",
        f"ffffffff0123  eth0    {host_veth_name(RUNTIME_ID, 'eth0')}  0a:00:00:00:00:01  "
        f"198.19.4.2/24",
        f"pod-c         eth0    {host_veth_name('pod-c', 'eth0')}  -                  "
        f"198.19.4.5/24",
    ]
    assert problem == f"pod-c/eth0: {doc['pods'][1]['problem']}"
    assert render_pods({}) == [Table("pods", table.header, ())]
    assert render_pods({"pods": [{"container_id": 7}, "junk"]})[0].rows == (  # type: ignore[union-attr]
        ("7", "-", "-", "-", "-"),)
