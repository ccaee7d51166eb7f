"""NetworkPolicy enforced by real agents, proven with real packets between pods.

Agents in sandbox nodes read one policy directory (`--policy-dir`, shared by the nodes as a
ConfigMap would be); pods are network namespaces attached through the installed weavepy-cni
plugin, with K8S_POD_NAMESPACE/K8S_POD_NAME as a kubelet passes them. In namespace `x`, the
policy `x/server-ingress` isolates `app=server` pods for ingress and admits only
`role=client` pods on TCP 80.

A probe is a TCP connect to a port nothing listens on: "refused" means the SYN reached the pod
(its kernel answered with a reset), "timeout" that policy dropped it. That needs no server in
the pod, so the very first packet after CNI ADD returns can be probed.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from weavepy.devtools.agentbox import AgentBox

pytestmark = [pytest.mark.netns, pytest.mark.slow]

STARTUP = 180  # seconds an agent may take to come up on a loaded machine

POLICY = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-ingress, namespace: x}
spec:
  podSelector: {matchLabels: {app: server}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {role: client}}}]
    ports: [{port: 80, protocol: TCP}]
"""
PODS = """
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: x, labels: {app: server}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: x, labels: {role: client}}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: x, labels: {role: other}}
"""


def connect_result(src: str, dst: str, port: int, timeout: float) -> str:
    """From inside a pod: "open", "refused" or "timeout" (bounded by `timeout`)."""
    try:
        with socket.create_connection((dst, port), timeout=timeout, source_address=(src, 0)):
            return "open"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return "refused" if exc.errno == errno.ECONNREFUSED else f"error {exc.errno}"


def probe_series(src: str, dst: str, port: int, stop_file: str, count: int,
                 period: float) -> list[str]:
    """A probe every `period` s until `stop_file` exists, at most `count` (bounded in time:
    count x period)."""
    found = []
    for _ in range(count):
        started = time.monotonic()
        found.append(connect_result(src, dst, port, period))
        if os.path.exists(stop_file):
            break
        time.sleep(max(0.0, period - (time.monotonic() - started)))
    return found


class PolicyRig:
    """Agents with a shared policy directory, and pods attached through the CNI plugin."""

    def __init__(self, sandbox_factory: Callable[..., Any], nodes: int,
                 extra: tuple[str, ...] = ()) -> None:
        from weavepy.cni.install import install_cni

        self.box = sandbox_factory(nodes=nodes)
        self.policy_dir = self.box.run_dir / "policy"
        self.policy_dir.mkdir()
        (self.policy_dir / "pods.yaml").write_text(PODS)
        (self.policy_dir / "policy.yaml").write_text(POLICY)
        self.rig = AgentBox(self.box, pod_range=str(self.box.pod_range),
                            extra_args=("--policy-dir", str(self.policy_dir), *extra))
        first, *others = self.box.nodes
        self.rig.launch(first)
        self.rig.wait_api(first, timeout=STARTUP)
        for node in others:
            self.rig.launch(node, [first])
        for node in self.box.nodes:
            self.rig.wait("node ready", lambda n=node: (self.rig.status(n) or {}
                                                        ).get("ready") or None, timeout=STARTUP)
        self.plugin = install_cni(self.rig.root / "cni-bin", self.rig.root / "cni-conf").plugin
        self.pods: dict[str, tuple[Any, str]] = {}  # name -> (pod namespace, address)

    def cni(self, node: Any, command: str, name: str, namespace: str = "x"
            ) -> tuple[int, dict[str, Any]]:
        netns = f"{self.box.prefix}-{name}"
        conf = json.dumps({"cniVersion": "1.0.0", "name": "weavepy", "type": "weavepy-cni",
                           "socketPath": str(self.rig.run_dir(node) / "cni.sock")})
        env = [f"CNI_COMMAND={command}", f"CNI_CONTAINERID=cid-{name}",
               f"CNI_NETNS=/run/netns/{netns}", "CNI_IFNAME=eth0",
               f"CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}",
               f"CNI_PATH={self.plugin.parent}"]
        result = node.run(["env", *env, str(self.plugin)], input=conf, check=False, timeout=60)
        return result.returncode, json.loads(result.stdout) if result.stdout.strip() else {}

    def add(self, node: Any, name: str) -> str:
        pod = self.box.add_netns(name)
        code, answer = self.cni(node, "ADD", name)
        assert code == 0, f"ADD {name}: {answer}\n{self.rig.logs_tail()}"
        address = str(answer["ips"][0]["address"].split("/")[0])
        self.pods[name] = (pod, address)
        return address

    def probe(self, src: str, dst: str, port: int = 80, timeout: float = 1.0) -> str:
        pod, address = self.pods[src]
        result: str = pod.call(connect_result, address, self.pods[dst][1], port, timeout,
                               timeout=timeout + 10)
        return result

    def cli(self, node: Any, *args: str) -> subprocess.CompletedProcess[str]:
        return self.rig.cli(node, *args)

    def policy_status(self, node: Any) -> dict[str, Any]:
        answer = self.rig.api(node, "GET", "/policy")
        assert answer is not None and answer[0] == 200, answer
        doc: dict[str, Any] = answer[1]
        return doc


@pytest.mark.timeout(600)
def test_a_pod_is_isolated_when_its_add_returns_on_the_bridge_and_across_vxlan(
        sandbox_factory: Callable[..., Any]) -> None:
    rig = PolicyRig(sandbox_factory, nodes=2)
    n1, n2 = rig.box.nodes
    rig.add(n2, "client")
    rig.add(n2, "other")
    rig.add(n1, "other2")  # same node as the server: bridged traffic
    # The first packets right after ADD returns: the disallowed pods are dropped (they time
    # out), the allowed one reaches the pod (its kernel refuses: nothing listens yet).
    rig.add(n1, "server")
    results: dict[str, str] = {}
    threads = [threading.Thread(target=lambda s=src: results.__setitem__(
        s, rig.probe(s, "server", timeout=1.5))) for src in ("other", "other2", "client")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {"other": "timeout", "other2": "timeout", "client": "refused"}, (
        results, rig.rig.logs_tail())
    # not isolated in the other direction, nor on other ports for other pods
    assert rig.probe("server", "other") == "refused"
    assert rig.probe("client", "server", port=81) == "timeout"

    # explain agrees with the packets, from the live state of the server's node
    denied = rig.cli(n1, "policy", "explain", "x/other", "x/server", "80/TCP")
    assert denied.returncode == 1, denied
    assert denied.stdout.startswith("denied"), denied.stdout
    assert "x/server-ingress" in denied.stdout, denied.stdout
    allowed = rig.cli(n1, "policy", "explain", "x/client", rig.pods["server"][1], "80/TCP")
    assert allowed.returncode == 0, allowed
    assert allowed.stdout.startswith("allowed: allowed by x/server-ingress"), allowed.stdout
    by_port = rig.cli(n1, "policy", "explain", "--json", "x/client", "x/server", "81/TCP")
    assert json.loads(by_port.stdout)["allowed"] is False, by_port.stdout
    wrong = rig.cli(n1, "policy", "explain", "x/nobody", "x/server", "80/TCP")
    assert wrong.returncode != 0 and "no pod x/nobody" in wrong.stderr + wrong.stdout, wrong
    assert "Traceback" not in wrong.stderr

    # status shows the policy, the pod it isolates on this node, and the drops counted
    doc = rig.policy_status(n1)
    assert doc["mode"] == "directory" and doc["ready"] is True, doc
    [policy] = doc["policies"]
    assert policy["policy"] == "x/server-ingress" and policy["pods"] == ["x/server"], policy
    assert policy["drops"]["ingress"] > 0, policy
    [pod] = doc["pods"]
    assert pod["pod"] == "x/server" and pod["isolated"] == {"ingress": ["x/server-ingress"]}
    assert pod["drops"]["ingress"] > 0, pod
    text = rig.cli(n1, "status", "policy")
    assert text.returncode == 0 and "x/server-ingress" in text.stdout, text
    metrics = n1.run([sys.executable, "-c", "import urllib.request; print(urllib.request.urlopen("
                      "'http://127.0.0.1:6782/metrics').read().decode())"], check=False)
    assert 'weavepy_policy_drops_total{direction="ingress",policy="x/server-ingress"}' in (
        metrics.stdout), metrics.stdout[-2000:]

    # a change of the directory is enforced on both nodes: other becomes a client
    (rig.policy_dir / "pods.yaml").write_text(PODS.replace("role: other", "role: client"))
    rig.rig.wait("the relabelled pod is admitted", lambda: rig.probe(
        "other", "server", timeout=0.5) == "refused" or None, timeout=30)
    # DEL takes the pod out of the sets; its address is no longer isolated
    code, answer = rig.cni(n1, "DEL", "server")
    assert code == 0, answer
    doc = rig.policy_status(n1)
    assert doc["pods"] == [], doc


@pytest.mark.timeout(600)
def test_a_denied_flow_stays_denied_across_an_agent_restart(
        sandbox_factory: Callable[..., Any]) -> None:
    rig = PolicyRig(sandbox_factory, nodes=1)
    [n1] = rig.box.nodes
    rig.add(n1, "server")
    rig.add(n1, "client")
    rig.add(n1, "other")
    assert rig.probe("other", "server") == "timeout"
    assert rig.probe("client", "server") == "refused"
    before = rig.policy_status(n1)
    # Probe continuously (every 0.25 s, at most 4 minutes) while the agent stops and starts
    # again, and until the new agent has applied its table.
    other_pod, other_ip = rig.pods["other"]
    client_pod, client_ip = rig.pods["client"]
    server_ip = rig.pods["server"][1]
    results: dict[str, list[str]] = {}

    stop_file = rig.box.run_dir / "probes-stop"

    def prober(name: str, pod: Any, src: str) -> None:
        results[name] = pod.call(probe_series, src, server_ip, 80, str(stop_file), 960, 0.25,
                                 timeout=300)

    threads = [threading.Thread(target=prober, args=("other", other_pod, other_ip)),
               threading.Thread(target=prober, args=("client", client_pod, client_ip))]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    assert rig.rig.stop(n1) == 0, rig.rig.logs_tail()
    rig.rig.launch(n1)
    rig.rig.wait("the restarted agent applied its policy table", lambda: (
        (rig.rig.api(n1, "GET", "/policy") or (0, {}))[1].get("applies") or None),
        timeout=STARTUP)
    time.sleep(1)
    stop_file.touch()
    for thread in threads:
        thread.join()
    assert set(results["other"]) == {"timeout"}, results["other"]
    assert set(results["client"]) == {"refused"}, results["client"]
    after = rig.policy_status(n1)
    assert after["last_kind"] == "full" and after["pods"] == before["pods"], after
    # the drop counters carried over the replace
    assert after["pods"][0]["drops"]["ingress"] >= before["pods"][0]["drops"]["ingress"]

    # bad content in the directory: one readable error in status, the last good state stays
    (rig.policy_dir / "policy.yaml").write_text(POLICY.replace("podSelector: {matchLabels",
                                                               "podSelector: {matchLabelz"))
    rig.rig.wait("the source error in status", lambda: (
        rig.policy_status(n1)["source_status"]["invalid"] or None), timeout=30)
    assert rig.probe("other", "server") == "timeout"
    assert rig.probe("client", "server") == "refused"
    text = rig.cli(n1, "status", "policy")
    assert "source error (last good version kept)" in text.stdout, text.stdout

    # a bad --policy-dir: one readable line and a non-zero exit
    assert rig.rig.stop(n1) == 0
    bad = n1.run(rig.rig.argv(n1, extra=("--policy-dir", str(rig.box.run_dir / "nope"))),
                 check=False, timeout=60)
    assert bad.returncode != 0 and "--policy-dir" in bad.stderr, bad
    assert "Traceback" not in bad.stderr, bad.stderr
    # the table outlives the agent; only `weavepy reset` removes it
    listed = n1.run(["nft", "list", "tables"], check=False)
    assert "weavepy-policy" in listed.stdout, listed
    reset = rig.cli(n1, "reset", "--force", "--state-dir", str(rig.rig.state_dir(n1)),
                    "--run-dir", str(rig.rig.run_dir(n1)))
    assert reset.returncode == 0, reset
    assert "weavepy-policy" not in n1.run(["nft", "list", "tables"], check=False).stdout

