"""A representative subset of the conformance cases on real packets, bridged on one node:
a sandbox node with a pod bridge, the nine pods of the cases as network namespaces on it
(each serving TCP and UDP on 80, 81 and 53), and an applier process in the node fed the
case's objects. Every pair of pods is probed (concurrently, each try bounded to a second).

The whole matrix, across three nodes with agents and on both data paths, is
tests/policy/test_conformance_cluster.py and `python -m bench policy_conformance` (same
data, same servers and prober: weavepy/devtools/policy_cluster.py); this one checks the
applier alone, without an agent."""

from __future__ import annotations

import concurrent.futures
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address
from typing import Any

import pytest

from tests.policy.test_applier_netns import Applier
from weavepy.devtools.policy_cluster import SERVER, probe_targets
from weavepy.devtools.policy_conformance import CASES, NAMESPACES, PODS, Case, World

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(900)]

SUBSET = ("deny-all-ingress-in-x", "x-a-from-pod-b", "x-a-from-pod-b-in-y-or-z",
          "x-a-named-port-with-the-wrong-protocol", "x-a-tcp-80-to-81",
          "client-egress-deny-beats-server-ingress-allow",
          "x-a-egress-to-the-pod-range-except-y-b", "allow-all-changed-to-deny-all-then-deleted",
          "namespaces-relabelled", "x-egress-to-dns-in-namespace-z-only")
def address(key: str) -> str:
    ns, pod = key.split("/")
    return f"198.19.0.{10 + NAMESPACES.index(ns) * 10 + PODS.index(pod)}"


class Pods:
    def __init__(self, box: Any) -> None:
        self.box = box
        self.node = box.nodes[0]
        self.netns: dict[str, Any] = {}

    def probe(self, port: int, protocol: str) -> dict[tuple[str, str], bool]:
        keys = sorted(self.netns)

        def row(src: str) -> list[bool]:
            targets = [(address(dst), port, protocol) for dst in keys if dst != src]
            seen: list[str] = self.netns[src].call(probe_targets, address(src), targets,
                                                   timeout=60)
            return [outcome == "ok" for outcome in seen]

        with concurrent.futures.ThreadPoolExecutor(len(keys)) as pool:
            rows = dict(zip(keys, pool.map(row, keys), strict=True))
        return {(src, dst): ok for src in keys
                for dst, ok in zip([d for d in keys if d != src], rows[src], strict=True)}


@pytest.fixture(scope="module")
def pods() -> Iterator[Pods]:
    from tests.conftest import require_root
    from weavepy.devtools.sandbox import Sandbox

    require_root()
    box = Sandbox.create(nodes=1)
    try:
        lab = Pods(box)
        node = lab.node
        for argv in (["ip", "link", "add", "pbr", "type", "bridge"],
                     ["ip", "addr", "add", "198.19.0.1/24", "dev", "pbr"],
                     ["ip", "link", "set", "pbr", "up"],
                     ["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"]):
            node.run(argv)
        for ns in NAMESPACES:
            for pod in PODS:
                key = f"{ns}/{pod}"
                pod_ns = box.add_netns(f"{ns}{pod}")
                node.run(["ip", "link", "add", f"v{ns}{pod}", "type", "veth", "peer", "name",
                          "eth0", "netns", pod_ns.netns])
                node.run(["ip", "link", "set", f"v{ns}{pod}", "master", "pbr", "up"])
                pod_ns.run(["ip", "addr", "add", f"{address(key)}/24", "dev", "eth0"])
                pod_ns.run(["ip", "link", "set", "eth0", "up"])
                pod_ns.run(["ip", "route", "add", "default", "via", "198.19.0.1"])
                pod_ns.start("server", [sys.executable, "-c", SERVER])
                lab.netns[key] = pod_ns
        yield lab
    finally:
        box.destroy()


def world_on_one_node() -> World:
    world = World.initial("198.19.0.0/24")
    for key, obj in world.pods.items():
        obj["spec"]["nodeName"] = "n1"
        world.set_address(key, IPv4Address(address(key)))
    return world


@pytest.mark.parametrize("case", [c for c in CASES if c.name in SUBSET], ids=lambda c: c.name)
def test_case_on_real_packets(pods: Pods, case: Case) -> None:
    applier = Applier(pods.node)
    try:
        world = world_on_one_node()
        applier.ask(op="apply", objects=world.objects())
        baseline = pods.probe(80, "TCP")  # servers up, nothing isolated: everything answers
        assert all(baseline.values()), [k for k, v in baseline.items() if not v]
        for number, step in enumerate(case.steps):
            for action in step.actions:
                world.apply(action)
            applier.ask(op="apply", objects=world.objects())
            for probe in step.probes:
                if probe.expected is None or not probe.on_kernel:
                    continue
                seen = pods.probe(probe.port, probe.protocol)
                expected = probe.expected.table(pods.netns)
                wrong = sorted(f"{s}->{d} expected {'allowed' if e else 'denied'}"
                               for (s, d), e in expected.items() if seen[(s, d)] != e)
                assert not wrong, f"step {number} {probe.port}/{probe.protocol}: {wrong}"
    finally:
        applier.close()
