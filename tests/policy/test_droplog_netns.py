"""Drops you can see, on real packets: a sandbox node with a pod bridge and two "pods"
(network namespaces on veths), x/a and y/b; a worker inside the node applies the compiled
table and reads its NFLOG group with the drop reader, as the agent does. A denied connection
is recorded with both pods' names and the policy, its log line is written once per rate
window, and audit mode lets the packet through and logs it."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.agent.traffic import echo_server_argv, tcp_echo
from tests.policy.conftest import JsonWorker, bridged_pods

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(600)]

BRIDGE = "198.19.0.1"
PODS = {"x/a": "198.19.0.2", "y/b": "198.19.0.3"}
WINDOW = 60.0


class Worker(JsonWorker):
    def __init__(self, node: Any) -> None:
        super().__init__(["ip", "netns", "exec", node.netns, sys.executable, "-m",
                          "tests.policy.drop_worker", "n1", str(WINDOW)])
        assert self.proc.stdout is not None
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def wait_for(self, enough: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first `drops` answer that is `enough` (bounded: 100 asks, 0.1 s apart)."""
        for _ in range(100):
            reply = self.ask(op="drops")
            if enough(reply):
                return reply
            time.sleep(0.1)
        return reply


def pod(key: str, **labels: str) -> dict[str, Any]:
    namespace, name = key.split("/")
    return {"kind": "Pod", "metadata": {"name": name, "namespace": namespace,
                                        "labels": labels},
            "spec": {"nodeName": "n1"}, "status": {"podIP": PODS[key]}}


def deny(key: str, *types: str) -> dict[str, Any]:
    namespace, name = key.split("/")
    return {"kind": "NetworkPolicy", "apiVersion": "networking.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"podSelector": {}, "policyTypes": list(types)}}


OBJECTS = [{"kind": "Namespace", "metadata": {"name": ns}} for ns in ("x", "y")] + [
    pod("x/a", pod="a"), pod("y/b", pod="b")]


@pytest.fixture
def lab(sandbox_factory: Any) -> Iterator[tuple[Worker, Callable[[], bool]]]:
    box = sandbox_factory(nodes=1)
    node = box.nodes[0]
    by_short = bridged_pods(box, node, {key[-1]: a for key, a in PODS.items()}, BRIDGE)
    pods = {key: by_short[key[-1]] for key in PODS}
    pods["y/b"].start("echo80", echo_server_argv("0.0.0.0", 80))

    def connect() -> bool:
        return bool(pods["x/a"].call(tcp_echo, PODS["x/a"], PODS["y/b"], 80, b"hi",
                                     1.0) == b"tcp:hi")

    worker = Worker(node)
    try:
        for _ in range(20):  # the pods reach each other before any policy
            if connect():
                break
            time.sleep(0.25)
        else:
            pytest.fail("x/a cannot reach y/b before any policy is applied")
        yield worker, connect
    finally:
        worker.close()


LINE = re.compile(r"blocked by weavepy policy: TCP x/a \(198\.19\.0\.2:\d+\) -> "
                  r"y/b \(198\.19\.0\.3:80\) ingress, policies: y/deny-in$")


def test_a_denied_connection_is_recorded_with_pod_names_and_logged_once_per_window(
        lab: tuple[Worker, Callable[[], bool]]) -> None:
    worker, connect = lab
    assert worker.ask(op="apply", objects=[*OBJECTS, deny("y/deny-in", "Ingress")])
    assert worker.ask(op="drops")["status"]["recent"] == []  # a connection that passed: none
    assert not connect()
    reply = worker.wait_for(lambda r: len(r["lines"]) >= 1)
    assert len(reply["lines"]) == 1 and LINE.match(reply["lines"][0]), reply["lines"]
    drop = reply["status"]["recent"][0]
    assert (drop["src_pod"], drop["dst_pod"], drop["policies"]) == ("x/a", "y/b",
                                                                     ["y/deny-in"])
    assert (drop["verdict"], drop["direction"], drop["protocol"], drop["dport"]) == (
        "drop", "ingress", "TCP", 80)
    assert drop["in_interface"] == "vetha" and drop["out_interface"] == "vethb"

    # more denied connections in the same window: recorded, not logged again
    assert not connect() and not connect()
    reply = worker.wait_for(lambda r: len(r["status"]["recent"]) >= 3)
    assert len(reply["status"]["recent"]) >= 3 and len(reply["lines"]) == 1
    assert reply["status"]["errors"] == {}

    # the next window: one more line, saying how many were not logged
    worker.ask(op="advance", seconds=WINDOW)
    assert not connect()
    reply = worker.wait_for(lambda r: len(r["lines"]) >= 2)
    assert len(reply["lines"]) == 2
    assert LINE.match(reply["lines"][1].split(" (and ")[0])
    assert re.search(r"\(and \d+ more since the last line\)$", reply["lines"][1])

    # egress, on the source's side: named after the source's policy
    worker.ask(op="apply", objects=[*OBJECTS, deny("x/deny-out", "Egress")])
    assert not connect()
    reply = worker.wait_for(lambda r: len(r["lines"]) >= 3)
    assert reply["lines"][2].startswith("blocked by weavepy policy: TCP x/a (198.19.0.2:")
    assert reply["lines"][2].endswith("-> y/b (198.19.0.3:80) egress, policies: x/deny-out")


def test_audit_mode_passes_the_packet_and_logs_it(
        lab: tuple[Worker, Callable[[], bool]]) -> None:
    worker, connect = lab
    worker.ask(op="apply", objects=[*OBJECTS, deny("y/deny-in", "Ingress")], audit=True)
    assert connect()
    reply = worker.wait_for(lambda r: len(r["lines"]) >= 1)
    assert [line.split(": TCP")[0] for line in reply["lines"]] == [
        "would be blocked by weavepy policy (audit mode, passed)"]
    assert reply["lines"][0].endswith("-> y/b (198.19.0.3:80) ingress, policies: y/deny-in")
    assert reply["status"]["recent"][0]["verdict"] == "audit"
