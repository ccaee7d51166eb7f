"""The reference plugins (Debian containernetworking-plugins, third-party) chained after ours:
they must accept our result as their prevResult and do their job with it."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from tests.cni.cnirun import Pod

pytestmark = [pytest.mark.netns, pytest.mark.peer, pytest.mark.timeout(120)]

POD_SERVER = textwrap.dedent("""
    import socket, sys
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(sys.argv[1])))
    srv.listen(8)
    srv.settimeout(60)
    print("ready", flush=True)
    for _ in range(int(sys.argv[2])):
        conn, peer = srv.accept()
        conn.sendall(f"hello from pod to {peer[0]}\\n".encode())
        conn.close()
""")

CLIENT = textwrap.dedent("""
    import socket, sys
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as s:
            print(s.recv(100).decode().strip())
    except OSError as exc:
        print(f"error: {exc}")
""")


def _start_pod_server(cluster, pod: Pod, port: int, accepts: int):
    proc = cluster.run_in_pod(pod, [sys.executable, "-c", POD_SERVER, str(port), str(accepts)])
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_portmap_host_port_reaches_the_pod(cni_cluster) -> None:
    cluster = cni_cluster(nodes=2)
    node1, node2 = cluster.nodes
    conflist = node1.conflist({"type": "portmap", "capabilities": {"portMappings": True},
                               "snat": True})
    runner = node1.runner(conflist)
    # containerd sends CamelCase keys; portmap (Go) and we both read them case-insensitively
    mappings = [{"HostPort": 18080, "ContainerPort": 8080, "Protocol": "tcp", "HostIP": ""}]
    pod = cluster.new_pod("web", capability_args={"portMappings": mappings})
    result = runner.add(pod)
    pod_ip = result["ips"][0]["address"].split("/")[0]
    assert pod_ip.startswith("198.19.1.")

    _start_pod_server(cluster, pod, 8080, accepts=1)
    out = node2.node.run([sys.executable, "-c", CLIENT, node1.node.underlay_ip, "18080"],
                         timeout=30).stdout
    assert out.startswith("hello from pod"), out

    nat = node1.node.run(["iptables", "-t", "nat", "-S"]).stdout
    assert "--dport 18080" in nat and pod_ip in nat
    runner.delete(pod)
    nat = node1.node.run(["iptables", "-t", "nat", "-S"]).stdout
    assert "--dport 18080" not in nat and pod_ip not in nat
    assert node1.allocations() == [] and node1.host_veths() == []
    out = node2.node.run([sys.executable, "-c", CLIENT, node1.node.underlay_ip, "18080"],
                         timeout=30).stdout
    assert out.startswith("error"), out


def test_tuning_changes_the_pod_interface(cni_cluster) -> None:
    cluster = cni_cluster(nodes=1)
    cni = cluster.nodes[0]
    conflist = cni.conflist({"type": "tuning", "mtu": 1400,
                             "sysctl": {"net.ipv4.conf.eth0.arp_announce": "2"}},
                            version="0.4.0")
    runner = cni.runner(conflist)
    pod = cluster.new_pod("tuned")
    result = runner.add(pod)
    assert result["cniVersion"] == "0.4.0" and result["ips"][0]["version"] == "4"
    link = json.loads(cluster.pod_exec(pod, ["ip", "-j", "link", "show", "eth0"]).stdout)[0]
    assert link["mtu"] == 1400
    sysctl = cluster.pod_exec(pod, ["sysctl", "-n", "net.ipv4.conf.eth0.arp_announce"]).stdout
    assert sysctl.strip() == "2"
    runner.check(pod)  # tuning and we both accept the final result as prevResult
    runner.delete(pod)
    assert cni.allocations() == []


def test_bandwidth_shapes_the_host_veth(cni_cluster) -> None:
    cluster = cni_cluster(nodes=1)
    cni = cluster.nodes[0]
    conflist = cni.conflist({"type": "bandwidth", "capabilities": {"bandwidth": True}})
    runner = cni.runner(conflist)
    limits = {"IngressRate": 8_000_000, "IngressBurst": 4294967295,
              "EgressRate": 16_000_000, "EgressBurst": 4294967295}
    pod = cluster.new_pod("shaped", capability_args={"bandwidth": limits})
    result = runner.add(pod)
    host_veth = result["interfaces"][1]["name"]
    qdiscs = cni.node.run(["tc", "qdisc", "show", "dev", host_veth]).stdout
    assert "tbf" in qdiscs, qdiscs  # ingress limit: tbf on the host end
    links = json.loads(cni.node.run(["ip", "-d", "-j", "link", "show", "type", "ifb"]).stdout)
    assert len(links) == 1  # egress limit: mirrored to an ifb device with its own tbf
    assert "tbf" in cni.node.run(["tc", "qdisc", "show", "dev", links[0]["ifname"]]).stdout
    runner.check(pod)
    runner.delete(pod)
    assert json.loads(cni.node.run(["ip", "-j", "link", "show", "type", "ifb"]).stdout) == []
    assert cni.host_veths() == []
