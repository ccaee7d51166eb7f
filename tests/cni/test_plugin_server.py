"""The installed `weavepy-cni` against the real CNI server in a sandbox node: ADD, CHECK, DEL,
STATUS, GC and VERSION, every result version, and every kind of bad input with its code."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
from pathlib import Path

import pytest

from tests.cni.cnirun import Pod

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]


def _link(cluster, pod: Pod, ifname: str = "eth0") -> dict:
    out = cluster.pod_exec(pod, ["ip", "-d", "-j", "addr", "show", ifname])
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)[0]


def test_add_check_del_roundtrip(cni_cluster) -> None:
    cluster = cni_cluster(nodes=1)
    cni = cluster.nodes[0]
    pod = cluster.new_pod("web")
    runner = cni.runner()

    result = runner.add(pod)
    names = [i["name"] for i in result["interfaces"]]
    assert names[0] == "wpbr0" and names[1].startswith("wpv") and names[2] == "eth0"
    assert result["interfaces"][2]["sandbox"] == pod.netns
    (ip,) = result["ips"]
    assert ip["interface"] == 2 and ip["gateway"] == str(cni.gateway)
    address = ip["address"]
    assert address.endswith("/24") and address.split("/")[0] in {
        str(a) for a in cni.block.hosts()}
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": str(cni.gateway)}]

    link = _link(cluster, pod)
    assert link["operstate"] == "UP" and link["mtu"] == 1500
    assert link["address"] == result["interfaces"][2]["mac"]
    assert f"{link['addr_info'][0]['local']}/24" == address
    route = cluster.pod_exec(pod, ["ip", "route", "show", "default"]).stdout
    assert f"via {cni.gateway} dev eth0" in route
    ping = cluster.pod_exec(pod, ["ping", "-c", "1", "-W", "2", str(cni.gateway)])
    assert ping.returncode == 0, ping.stdout
    host = json.loads(cni.node.run(["ip", "-d", "-j", "link", "show", names[1]]).stdout)[0]
    assert host["master"] == "wpbr0"
    assert host["linkinfo"]["info_slave_data"]["hairpin"] is True
    assert cni.allocations()[0]["ip"] == address.split("/")[0]

    runner.check(pod)
    cluster.pod_exec(pod, ["ip", "addr", "flush", "dev", "eth0"])
    with pytest.raises(AssertionError, match=r"address .* is missing"):
        runner.check(pod)

    runner.delete(pod)
    assert cni.host_veths() == []
    assert cluster.pod_exec(pod, ["ip", "link", "show", "eth0"]).returncode != 0
    assert cni.allocations() == []
    # DEL again, then with an empty netns after the namespace is gone: both succeed
    runner.delete(pod)
    cluster.remove_pod_netns(pod)
    rc, out = cni.plugin("DEL", Pod(pod.container_id, netns=""))
    assert (rc, out) == (0, {})


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_result_in_the_config_version(cni_cluster, version: str) -> None:
    cluster = cni_cluster(nodes=1)
    cni = cluster.nodes[0]
    pod = cluster.new_pod("v")
    rc, result = cni.plugin("ADD", pod, cni.plugin_conf(version))
    assert rc == 0, result
    assert result["cniVersion"] == version
    assert ("version" in result["ips"][0]) == version.startswith("0.")
    assert ("mtu" in result["interfaces"][2]) == (version == "1.1.0")
    rc, out = cni.plugin("DEL", pod, cni.plugin_conf(version))
    assert rc == 0, out


def test_cni_args_in_any_order_name_the_owner(cni_cluster) -> None:
    cluster = cni_cluster(nodes=1)
    cni = cluster.nodes[0]
    pairs = ["IgnoreUnknown=1", "K8S_POD_NAMESPACE=default", "K8S_POD_NAME=web-0",
             "K8S_POD_INFRA_CONTAINER_ID=abc", "K8S_POD_UID=u-1"]
    random.Random(5).shuffle(pairs)
    pod = cluster.new_pod("args", cni_args=";".join(pairs))
    rc, out = cni.plugin("ADD", pod)
    assert rc == 0, out
    assert cni.allocations()[0]["owner"] == "default/web-0"
    assert cni.plugin("DEL", pod)[0] == 0


def test_bad_input_gets_the_right_code(cni_cluster) -> None:
    cluster = cni_cluster(nodes=1)
    cni = cluster.nodes[0]
    pod = cluster.new_pod("bad")
    cases = {
        "malformed JSON": (b'{"cniVersion": "1.0.0", ', pod, {}, 6),
        "unknown cniVersion": (cni.plugin_conf("7.0.0"), pod, {}, 1),
        "no cniVersion": ({"name": "weavepy", "type": "weavepy-cni",
                           "socketPath": str(cni.socket_path)}, pod, {}, 1),
        "missing CNI_CONTAINERID": (None, pod, {"CNI_CONTAINERID": ""}, 4),
        "missing CNI_IFNAME": (None, pod, {"CNI_IFNAME": ""}, 4),
        "missing CNI_NETNS": (None, pod, {"CNI_NETNS": ""}, 4),
        "missing CNI_COMMAND": (None, pod, {"CNI_COMMAND": ""}, 4),
        "netns does not exist": (None, Pod("nonet", "/run/netns/wpcni-does-not-exist"), {}, 8),
        "netns is not a namespace": (None, Pod("notns", "/etc/hostname"), {}, 8),
        "invalid network name": (cni.plugin_conf(name="no spaces allowed"), pod, {}, 7),
        "CHECK on 0.3.1": (cni.plugin_conf("0.3.1"), pod, {"CNI_COMMAND": "CHECK"}, 1),
    }
    for what, (conf, who, env, code) in cases.items():
        rc, out = cni.plugin("ADD", who, conf, env)
        assert rc == 1 and out.get("code") == code, f"{what}: {out}"
        assert set(out) == {"cniVersion", "code", "msg", "details"}, what
        assert out["msg"], what
    # nothing was allocated or created by any of them
    assert cni.allocations() == [] and cni.host_veths() == []
    # DEL of a netns that does not exist (and never existed) is fine
    assert cni.plugin("DEL", Pod("nonet", "/run/netns/wpcni-does-not-exist"))[0] == 0
    # raw garbage on the socket gets a decode error, and the server keeps serving
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(10)
        raw.connect(str(cni.socket_path))
        raw.sendall(b"\x00\xffnot a request")
        raw.shutdown(socket.SHUT_WR)
        reply = json.loads(raw.recv(65536))
    assert reply["code"] == 6
    assert cni.plugin("ADD", pod)[0] == 0
    assert cni.plugin("DEL", pod)[0] == 0


def test_version_status_and_gc(cni_cluster) -> None:
    cluster = cni_cluster(nodes=1)
    cni = cluster.nodes[0]
    rc, out = cni.plugin("VERSION", None, {"cniVersion": "0.4.0"})
    assert rc == 0 and out["cniVersion"] == "0.4.0" and "1.1.0" in out["supportedVersions"]
    assert cni.plugin("STATUS", None, cni.plugin_conf("1.1.0")) == (0, {})

    keep, drop = cluster.new_pod("keep"), cluster.new_pod("drop")
    for pod in (keep, drop):
        assert cni.plugin("ADD", pod, cni.plugin_conf("1.1.0"))[0] == 0
    assert len(cni.host_veths()) == 2
    gc_conf = cni.plugin_conf("1.1.0", **{"cni.dev/valid-attachments": [
        {"containerID": keep.container_id, "ifname": "eth0"}]})
    assert cni.plugin("GC", None, gc_conf) == (0, {})
    assert [a["containerID"] for a in cni.allocations()] == [keep.container_id]
    assert len(cni.host_veths()) == 1
    assert cluster.pod_exec(drop, ["ip", "link", "show", "eth0"]).returncode != 0
    assert cluster.pod_exec(keep, ["ip", "link", "show", "eth0"]).returncode == 0
    assert cni.plugin("DEL", keep, cni.plugin_conf("1.1.0"))[0] == 0

    # STATUS says "not available" when the bridge is gone
    cni.node.run(["ip", "link", "del", "wpbr0"])
    rc, out = cni.plugin("STATUS", None, cni.plugin_conf("1.1.0"))
    assert rc == 1 and out["code"] == 50


def test_pod_veth_gets_mtu_and_gso_limits(cni_cluster) -> None:
    cluster = cni_cluster(nodes=1, server_args=["--mtu", "1420", "--gso-max-size", "62000",
                                                "--gso-max-segs", "1000"])
    cni = cluster.nodes[0]
    pod = cluster.new_pod("gso")
    assert cni.plugin("ADD", pod)[0] == 0
    link = _link(cluster, pod)
    assert link["mtu"] == 1420
    assert link["gso_max_size"] == 62000 and link["gso_max_segs"] == 1000
    assert cni.plugin("DEL", pod)[0] == 0


def test_no_agent_means_try_again_later(plugin_dir: Path, tmp_path: Path) -> None:
    conf = {"cniVersion": "1.0.0", "name": "weavepy", "type": "weavepy-cni",
            "socketPath": str(tmp_path / "nobody-listens.sock")}
    env = dict(os.environ, CNI_COMMAND="ADD", CNI_CONTAINERID="c1", CNI_NETNS="/run/netns/x",
               CNI_IFNAME="eth0")
    proc = subprocess.run([str(plugin_dir / "weavepy-cni")], input=json.dumps(conf), env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["code"] == 11 and out["cniVersion"] == "1.0.0"
    assert "weavepy agent is not running" in out["msg"]
    assert str(tmp_path / "nobody-listens.sock") in out["details"]


def test_add_after_the_bridge_was_recreated(cni_cluster) -> None:
    # The agent's reconciler may recreate the bridge behind the server's back; ADD must notice
    # (the server caches the bridge's index) and use the new one.
    cluster = cni_cluster(nodes=1)
    cni = cluster.nodes[0]
    first, second = cluster.new_pod("before"), cluster.new_pod("after")
    assert cni.plugin("ADD", first)[0] == 0
    cni.node.run(["ip", "link", "del", "wpbr0"])  # the first pod's veth is left detached
    cni.node.run(["ip", "link", "add", "wpbr0", "type", "bridge"])
    cni.node.run(["ip", "addr", "add", f"{cni.gateway}/24", "dev", "wpbr0"])
    cni.node.run(["ip", "link", "set", "wpbr0", "up"])
    rc, result = cni.plugin("ADD", second)
    assert rc == 0, result
    host = json.loads(cni.node.run(["ip", "-j", "link", "show", result["interfaces"][1]["name"]]
                                   ).stdout)[0]
    assert host["master"] == "wpbr0"
    ping = cluster.pod_exec(second, ["ping", "-c", "1", "-W", "2", str(cni.gateway)])
    assert ping.returncode == 0, ping.stdout
    for pod in (first, second):
        assert cni.plugin("DEL", pod)[0] == 0
    assert cni.allocations() == []


def test_a_new_veth_for_an_address_updates_the_nodes_neighbour_entry(cni_cluster) -> None:
    """An address that comes back on a new veth (an ADD again without DEL after an agent
    crash; or an address handed out again) has a new MAC. ADD sets the node's neighbour entry,
    still fresh with the old MAC, to the new one at once, so traffic routed to the pod is not
    sent to the old MAC for up to 45 s."""
    cluster = cni_cluster(nodes=1)
    cni = cluster.nodes[0]
    pod = cluster.new_pod("again")
    rc, first = cni.plugin("ADD", pod)
    assert rc == 0, first
    address = first["ips"][0]["address"].split("/")[0]
    ping = cni.node.run(["ping", "-c", "1", "-W", "2", address], check=False)
    assert ping.returncode == 0, ping.stdout

    def node_entry() -> tuple[str, list[str]]:
        (entry,) = json.loads(cni.node.run(["ip", "-j", "neigh", "show", address,
                                            "dev", "wpbr0"]).stdout)
        return entry.get("lladdr", ""), entry.get("state", [])

    mac, state = node_entry()
    assert mac == first["interfaces"][2]["mac"] and state != ["FAILED"]
    rc, second = cni.plugin("ADD", pod)  # a new veth pair, a new MAC, the same address
    assert rc == 0, second
    assert second["ips"][0]["address"] == first["ips"][0]["address"]
    assert second["interfaces"][2]["mac"] != first["interfaces"][2]["mac"]
    assert node_entry()[0] == second["interfaces"][2]["mac"]
    assert cni.plugin("DEL", pod)[0] == 0
