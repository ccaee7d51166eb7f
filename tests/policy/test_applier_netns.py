"""The applier on real packets: a sandbox node with a pod bridge, three "pods" (network
namespaces on veths) and an outside host routed through the node; an applier process inside
the node, fed Kubernetes-format objects. Policies deny, then allow; pods join and are
relabelled through the incremental path; a table flushed or deleted by someone else is
noticed and restored. Traffic: ICMP echo, TCP and UDP echo, each try bounded to a second."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.agent.traffic import echo_server_argv, tcp_echo, udp_echo
from tests.policy.conftest import JsonWorker, bridged_pods

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(600)]

BRIDGE = "198.19.0.1"
PODS = {"a": "198.19.0.2", "b": "198.19.0.3", "c": "198.19.0.4"}
OUTSIDE = "198.18.9.2"


class Applier(JsonWorker):
    def __init__(self, node: Any) -> None:
        super().__init__(["ip", "netns", "exec", node.netns, sys.executable, "-m",
                          "tests.policy.applier_worker", "n1"])


@dataclass
class Lab:
    box: Any
    node: Any
    pods: dict[str, Any]
    outside: Any
    applier: Applier

    def tcp(self, src: str, dst: str, port: int) -> bool:
        ns = self.outside if src == "outside" else self.pods[src]
        source = OUTSIDE if src == "outside" else PODS[src]
        return ns.call(tcp_echo, source, PODS[dst], port, b"hi", 1.0) == b"tcp:hi"

    def udp(self, src: str, dst: str, port: int) -> bool:
        return self.pods[src].call(udp_echo, PODS[src], PODS[dst], port, b"hi", 1,
                                   1.0) == b"udp:hi"

    def ping(self, src: str, dst: str) -> bool:
        ns = self.node if src == "node" else self.pods[src]
        return ns.run(["ping", "-c", "1", "-W", "1", PODS[dst]], check=False).returncode == 0


def namespace(name: str) -> dict[str, Any]:
    return {"kind": "Namespace", "metadata": {"name": name, "labels": {"ns": name}}}


def pod(name: str, **labels: str) -> dict[str, Any]:
    return {"kind": "Pod", "metadata": {"name": name, "namespace": "x", "labels": labels},
            "spec": {"nodeName": "n1", "containers": [{"ports": [
                {"containerPort": 80, "name": "serve-80-tcp"},
                {"containerPort": 80, "protocol": "UDP", "name": "serve-80-udp"}]}]},
            "status": {"podIP": PODS[name]}}


def policy(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "NetworkPolicy", "apiVersion": "networking.k8s.io/v1",
            "metadata": {"name": name, "namespace": "x"}, "spec": spec}


@pytest.fixture
def lab(sandbox_factory: Any) -> Iterator[Lab]:
    box = sandbox_factory(nodes=1)
    node = box.nodes[0]
    pods = bridged_pods(box, node, PODS, BRIDGE)
    outside = box.add_netns("out")
    node.run(["ip", "link", "add", "vout", "type", "veth", "peer", "name", "eth0", "netns",
              outside.netns])
    node.run(["ip", "addr", "add", "198.18.9.1/30", "dev", "vout"])
    node.run(["ip", "link", "set", "vout", "up"])
    outside.run(["ip", "addr", "add", f"{OUTSIDE}/30", "dev", "eth0"])
    outside.run(["ip", "link", "set", "eth0", "up"])
    outside.run(["ip", "route", "add", "default", "via", "198.18.9.1"])
    for port in (80, 81):
        pods["b"].start(f"echo{port}", echo_server_argv("0.0.0.0", port))
    applier = Applier(node)
    lab = Lab(box, node, pods, outside, applier)
    try:
        assert _eventually(lambda: lab.tcp("a", "b", 80) and lab.tcp("a", "b", 81))
        yield lab
    finally:
        applier.close()


def _eventually(probe: Any, tries: int = 20) -> bool:
    import time

    for _ in range(tries):
        if probe():
            return True
        time.sleep(0.25)
    return False


BASE = [namespace("x"), pod("a", pod="a"), pod("b", pod="b")]
DENY_B = policy("deny-b", {"podSelector": {"matchLabels": {"pod": "b"}}})
ALLOW_A_80 = policy("allow-a-80", {
    "podSelector": {"matchLabels": {"pod": "b"}},
    "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}],
                 "ports": [{"port": "serve-80-tcp"}]}]})


def test_deny_then_allow_increments_and_repairs(lab: Lab) -> None:
    ask = lab.applier.ask
    assert ask(op="apply", objects=BASE)["kind"] == "full"  # at start, always whole
    assert lab.ping("a", "b") and lab.tcp("outside", "b", 80)

    # deny everything into b: pods, the outside host and ICMP are refused; the node is not
    # (a new policy adds its chains by a diff, not a replace)
    assert ask(op="apply", objects=[*BASE, DENY_B])["kind"] == "incremental"
    assert not lab.tcp("a", "b", 80) and not lab.ping("a", "b")
    assert not lab.tcp("outside", "b", 80) and not lab.udp("a", "b", 80)
    assert lab.ping("node", "b")  # kubelet probes come from the node: always allowed
    assert lab.ping("b", "a")     # b's egress is not isolated, and the reply passes

    # a named port from pod=a only: TCP 80 yes, 81 no, UDP 80 (serve-80-udp) no, ICMP no
    assert ask(op="apply", objects=[*BASE, DENY_B, ALLOW_A_80])["kind"] == "incremental"
    assert lab.tcp("a", "b", 80)
    assert not lab.tcp("a", "b", 81) and not lab.udp("a", "b", 80)
    assert not lab.ping("a", "b") and not lab.tcp("outside", "b", 80)

    # pod c appears labelled pod=a, then is relabelled: only set elements change
    with_c = [*BASE, DENY_B, ALLOW_A_80, pod("c", pod="a")]
    assert ask(op="apply", objects=with_c)["kind"] == "incremental"
    assert lab.tcp("c", "b", 80)
    relabelled = [*BASE, DENY_B, ALLOW_A_80, pod("c", pod="z")]
    assert ask(op="apply", objects=relabelled)["kind"] == "incremental"
    assert not lab.tcp("c", "b", 80)
    assert ask(op="apply", objects=relabelled)["kind"] == "unchanged"

    # drops were counted per pod and per set of policies
    counters = ask(op="counters")["counters"]
    assert counters["in.x.b"][0] > 0
    assert sum(v[0] for k, v in counters.items() if k.startswith("ingress-")) > 0
    dropped = counters["in.x.b"][0]

    # someone flushes the table: traffic flows until the applier notices and restores it
    lab.node.run(["nft", "flush", "table", "inet", "weavepy-policy"])
    assert lab.tcp("a", "b", 81)
    assert ask(op="check")["problem"] is not None
    reply = ask(op="apply", objects=relabelled)
    assert reply["kind"] == "full" and "someone else" in reply["reason"]
    assert not lab.tcp("a", "b", 81) and lab.tcp("a", "b", 80)
    assert ask(op="check")["problem"] is None and ask(op="verify")["differences"] == []
    # the replace kept the counters
    assert ask(op="counters")["counters"]["in.x.b"][0] > dropped

    # someone deletes the table, or one element of a set: noticed (the latter by verify)
    lab.node.run(["nft", "delete", "table", "inet", "weavepy-policy"])
    assert ask(op="apply", objects=relabelled)["kind"] == "full"
    assert not lab.tcp("a", "b", 81)
    listing = json.loads(lab.node.run(["nft", "-j", "list", "table", "inet",
                                       "weavepy-policy"]).stdout)
    peer_set = next(o["set"]["name"] for o in listing["nftables"]
                    if "set" in o and o["set"].get("elem") == [PODS["a"]])
    lab.node.run(["nft", "delete", "element", "inet", "weavepy-policy", peer_set,
                  "{", PODS["a"], "}"])
    assert not lab.tcp("a", "b", 80)
    assert ask(op="check")["problem"] is None  # the cheap check does not look at peer sets
    assert ask(op="verify")["differences"] != []
    assert ask(op="apply", objects=relabelled)["kind"] == "full"
    assert lab.tcp("a", "b", 80)


def test_replies_pass_an_isolated_client_and_audit_mode_passes_what_it_would_drop(
        lab: Lab) -> None:
    ask = lab.applier.ask
    deny_a_in = policy("deny-a", {"podSelector": {"matchLabels": {"pod": "a"}}})
    assert ask(op="apply", objects=[*BASE, deny_a_in])["kind"] == "full"
    assert lab.tcp("a", "b", 80) and lab.udp("a", "b", 80)  # replies into a pass
    deny_a_out = policy("deny-a-out", {"podSelector": {"matchLabels": {"pod": "a"}},
                                       "policyTypes": ["Egress"]})
    assert ask(op="apply", objects=[*BASE, deny_a_out])["kind"] == "incremental"
    assert not lab.tcp("a", "b", 80) and lab.tcp("c", "b", 80)
    assert ask(op="apply", objects=[*BASE, deny_a_out], audit=True)["kind"] == "incremental"
    before = ask(op="counters")["counters"]["eg.x.a"][0]
    assert lab.tcp("a", "b", 80)
    assert ask(op="counters")["counters"]["eg.x.a"][0] > before
