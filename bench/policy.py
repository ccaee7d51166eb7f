"""NetworkPolicy: the ruleset's size, one pod's change in the applier, a policy change to
enforced on every node through real agents, and throughput and first-packet cost with policy.

`python -m bench policy [--sizes 100,1000,10000] [--reps 5] [--agent-sizes 30,300]
[--changes 20] [--traffic-reps 3] [--seconds 3] [--connects 200]`

Clusters come from `weavepy.devtools.policy_workload.synthetic_cluster` (namespaces of 10 pods,
3 policies each, every pod on the measured node). Everything kernel-side runs in one node of a
sandbox made for this run (a network namespace of its own), through the product's compiler and
`PolicyApplier` (libnftables' JSON API), and is removed at the end.

1. **Ruleset size**: rules and set elements of the compiled table (`Ruleset.size()`) and as
   the kernel lists them after the table was loaded (`nft -j list table`), beside what a
   per-pair translation would hold: one iptables rule per (selected pod, allowed peer pod or
   block, port), plus a drop per isolated pod and direction. That last column is *computed*
   from the same cluster, not loaded (kube-router#945 reached 675,056 iptables rules).
2. **One pod's change** at each size, the applier's time from `apply()` called to the kernel
   holding the new table (check of the live table, diff, one transaction): a pod arriving that
   brings a set of policies the node has no chain for yet (a new signature chain and its
   policy chains and selector sets: before this applier's diff, a full replace), and a pod
   joining an existing signature (elements only, incremental before and now). "replace" is
   the same change written as a full replace by a fresh applier, the path the first case took
   before; the two are interleaved in every repetition. Compile time is printed apart (both
   paths need it).

3. **Policy change to enforced on every node** (`--agents`, on by default): three real agents
   (`weavepy launch --policy-dir DIR`) in a sandbox of 3 nodes, at 30 pods / 10 policies and
   300 pods / 100 policies (the synthetic shape, plus one allow policy per namespace). The
   pods are *simulated*: Pod objects in the directory with `spec.nodeName` and
   `status.podIP`, no network namespace behind them (the agents compile them as their local
   pods exactly as CNI-attached ones; no packet is sent). A change is a policy written into
   (then removed from) the directory, renamed into place; "enforced" is read from each node's
   kernel: a watcher forked into every node polls nftables' generation (NFT_MSG_GETGEN) and,
   when it moves, lists the policy's chain, until the chain is there (or gone). The time is
   from the rename to the last node's kernel holding it.

4. **Throughput and first packet** (in the first size's sandbox): pod a on n1 and pod b on n2,
   attached by CNI ADD through the agents (labelled through the directory by container ID).
   In every repetition, interleaved: no policy, 100 policies that select both pods (ingress
   and egress; each admits iperf3's port and the probe port), no policy again (the A/A
   control); each block runs iperf3 (a to b) and TCP connects from a to a closed port of b
   (the SYN passes both nodes' policy chains as a new connection, the RST comes back as a
   reply): median connect time with policy minus without is the first packet's added cost.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from collections.abc import Sequence
from functools import partial
from ipaddress import IPv4Address
from typing import Any

from bench.common import anchor_version, median_spread, no_anchor, summary, table, tail, tail_label
from weavepy.devtools.agentbox import AgentBox
from weavepy.devtools.policy_workload import synthetic_cluster
from weavepy.devtools.sandbox import Sandbox, SandboxNode
from weavepy.policy.compiler import compile_policy
from weavepy.policy.model import (
    ClusterState,
    Direction,
    Labels,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyPort,
    Rule,
)
from weavepy.policy.ruleset import Ruleset, parse_listing

NODE = "n1"
KUBE_ROUTER_945 = 675_056


# -- the per-pair count, computed -----------------------------------------------------------


def per_pair_rules(state: ClusterState) -> int:
    """Rules a per-pair translation would hold: per selected pod and direction, one rule per
    allowed peer pod (or block, or "anyone") and port, and one drop."""
    pods = state.addressed_pods
    by_namespace: dict[str, list[Pod]] = {}
    for pod in pods:
        by_namespace.setdefault(pod.namespace, []).append(pod)
    peer_counts: dict[tuple[str | None, Peer], int] = {}

    def peer_pods(policy: NetworkPolicy, peer: Peer) -> int:
        if peer.ip_block is not None:
            return 1 + len(peer.ip_block.excepts)
        key = (policy.namespace if peer.namespace_selector is None else None, peer)
        if key not in peer_counts:
            selector = peer.pod_selector or LabelSelector()
            if peer.namespace_selector is None:
                namespaces = [policy.namespace]
            else:
                chosen = peer.namespace_selector
                namespaces = [ns for ns in by_namespace
                              if chosen.matches(state.namespace_labels(ns))]
            peer_counts[key] = sum(1 for ns in namespaces for pod in by_namespace.get(ns, ())
                                   if selector.matches(pod.labels))
        return peer_counts[key]

    total = 0
    directions: tuple[Direction, ...] = ("ingress", "egress")
    for policy in state.policies:
        selected = sum(1 for pod in by_namespace.get(policy.namespace, ())
                       if policy.pod_selector.matches(pod.labels))
        for direction in directions:
            if not policy.affects(direction):
                continue
            per_pod = 1  # the drop
            for rule in policy.rules(direction):
                peers = sum(peer_pods(policy, p) for p in rule.peers) if rule.peers else 1
                per_pod += peers * max(1, len(rule.ports))
            total += selected * per_pod
    return total


# -- one pod's change ----------------------------------------------------------------------


def _changes(pods: int) -> tuple[ClusterState, ClusterState, ClusterState]:
    """(before, a pod with a new set of policies, a pod joining an existing one)."""
    grown = synthetic_cluster(pods + 10)
    base = synthetic_cluster(pods)
    new_namespace = f"ns{pods // 10}"
    namespaces = tuple(n for n in grown.namespaces if n.name != new_namespace)
    before = ClusterState(grown.policies, base.pods, (*namespaces,
                                                      Namespace(new_namespace, Labels())))
    template = base.pods[1]  # app=a1: isolated by default-deny and web
    address = IPv4Address(int(max(p.ip for p in base.pods if p.ip)) + 1)
    web = Pod(new_namespace, "web", template.labels, address, NODE, template.ports)
    joined = Pod(template.namespace, "joined", template.labels, address, NODE, template.ports)
    return (before, ClusterState(before.policies, (*before.pods, web), before.namespaces),
            ClusterState(before.policies, (*before.pods, joined), before.namespaces))


def _timed_apply(applier: Any, ruleset: Ruleset) -> tuple[float, str]:
    started = time.perf_counter()
    result = applier.apply(ruleset)
    return time.perf_counter() - started, result.kind


def measure_in_node(pods: int, reps: int) -> dict[str, Any]:
    """Runs inside the sandbox node (forked by `SandboxNode.call`)."""
    from weavepy.nft import Nft
    from weavepy.policy.applier import PolicyApplier

    before, new_signature, joined = _changes(pods)
    started = time.perf_counter()
    compiled = compile_policy(synthetic_cluster(pods), NODE).ruleset
    compile_s = time.perf_counter() - started
    nft = Nft()
    applier = PolicyApplier(nft)
    applier.apply(compiled)
    listing = parse_listing(nft.list_table(compiled.family, compiled.table) or [])
    kernel = {"rules": sum(len(r) for r in listing.chains.values()),
              "elements": sum(len(e) for e in listing.elements.values())}
    tables = {name: compile_policy(state, NODE).ruleset for name, state in
              (("before", before), ("signature", new_signature), ("joined", joined))}
    times: dict[str, list[float]] = {"signature diff": [], "signature replace": [],
                                     "joined diff": [], "check": []}
    kinds: set[str] = set()
    applier.apply(tables["before"])
    for _ in range(reps):
        started = time.perf_counter()
        applier.check()
        times["check"].append(time.perf_counter() - started)
        for change in ("signature", "joined"):
            elapsed, kind = _timed_apply(applier, tables[change])
            times[f"{change} diff"].append(elapsed)
            kinds.add(f"{change} {kind}")
            applier.apply(tables["before"])
        fresh = PolicyApplier(nft)  # the old path: the whole table written again
        elapsed, kind = _timed_apply(fresh, tables["signature"])
        times["signature replace"].append(elapsed)
        kinds.add(f"replace {kind}")
        applier = PolicyApplier(nft)
        applier.apply(tables["before"])
    started = time.perf_counter()
    compile_policy(new_signature, NODE)
    times["compile"] = [time.perf_counter() - started]
    return {"size": compiled.size(), "kernel": kernel, "compile_full": compile_s,
            "times": times, "kinds": sorted(kinds)}


# -- policy change to enforced, through real agents -------------------------------------------

STARTUP = 240.0  # seconds an agent may take to come up on a loaded machine
AGENT_POD_RANGE = "198.19.64.0/18"  # CNI pods; the simulated ones are below 198.19.64.0
CHANGE = "bench-change"


def _selector(selector: LabelSelector) -> dict[str, Any]:
    return {"matchLabels": dict(selector.match_labels.items())} if selector.match_labels else {}


def _peer(peer: Peer) -> dict[str, Any]:
    if peer.ip_block is not None:
        return {"ipBlock": {"cidr": str(peer.ip_block.cidr),
                            "except": [str(b) for b in peer.ip_block.excepts]}}
    found: dict[str, Any] = {}
    if peer.pod_selector is not None:
        found["podSelector"] = _selector(peer.pod_selector)
    if peer.namespace_selector is not None:
        found["namespaceSelector"] = _selector(peer.namespace_selector)
    return found


def _rule(rule: Rule, word: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if rule.peers:
        found[word] = [_peer(p) for p in rule.peers]
    if rule.ports:
        found["ports"] = [{"protocol": p.protocol, "port": p.port} for p in rule.ports]
    return found


def kubernetes_objects(state: ClusterState) -> list[dict[str, Any]]:
    """The cluster as Kubernetes-format objects (the subset the synthetic shape uses)."""
    objects: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": n.name, "labels": dict(n.labels.items())}}
        for n in state.namespaces]
    for policy in state.policies:
        spec: dict[str, Any] = {"podSelector": _selector(policy.pod_selector),
                                "policyTypes": sorted(t.capitalize()
                                                      for t in policy.policy_types)}
        if policy.ingress:
            spec["ingress"] = [_rule(r, "from") for r in policy.ingress]
        if policy.egress:
            spec["egress"] = [_rule(r, "to") for r in policy.egress]
        objects.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                        "metadata": {"name": policy.name, "namespace": policy.namespace},
                        "spec": spec})
    for pod in state.pods:
        objects.append({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": pod.name, "namespace": pod.namespace,
                                     "labels": dict(pod.labels.items())},
                        "spec": {"nodeName": pod.node, "containers": [{"ports": [
                            {"containerPort": p.port, "protocol": p.protocol, "name": p.name}
                            for p in pod.ports]}]},
                        "status": {"podIP": str(pod.ip)}})
    return objects


def _with_fillers(pods: int) -> ClusterState:
    """The synthetic cluster (3 policies per 10 pods) plus an allow policy in every third
    namespace: 10 policies per 30 pods."""
    state = synthetic_cluster(pods, nodes=3)
    fillers = tuple(NetworkPolicy(n.name, "allow-metrics", LabelSelector(Labels({"app": "a2"})),
                                  ingress=(Rule((), (PolicyPort("TCP", 9100),)),))
                    for n in state.namespaces[::3])
    return ClusterState((*state.policies, *fillers), state.pods, state.namespaces)


def _write(path: Any, objects: list[dict[str, Any]]) -> None:
    import yaml

    temporary = path.with_name("." + path.name)
    temporary.write_text(yaml.safe_dump_all(objects))
    temporary.rename(path)


def watch_chain(table: str, chain: str, present: bool, timeout: float) -> float | None:
    """In a node: the monotonic time at which `chain` is there (or gone), else None."""
    from weavepy.nft import Nft, NftError

    nft = Nft()
    deadline = time.monotonic() + timeout
    seen: int | None = None
    while time.monotonic() < deadline:
        generation = nft.generation()
        if generation != seen:
            seen = generation
            try:
                nft.run([{"list": {"chain": {"family": "inet", "table": table,
                                             "name": chain}}}])
                found = True
            except NftError:
                found = False
            if found == present:
                return time.monotonic()
        time.sleep(0.001)
    return None


def _change_to_enforced(nodes: list[SandboxNode], policy_dir: Any, present: bool,
                        objects: list[dict[str, Any]]) -> float | None:
    import threading

    chain = f"pol-in-ns0.{CHANGE}"
    found: dict[str, float | None] = {}

    def watch(node: SandboxNode) -> None:
        found[node.name] = node.call(watch_chain, "weavepy-policy", chain, present, 30.0,
                                     timeout=60)

    watchers = [threading.Thread(target=watch, args=(n,)) for n in nodes]
    for thread in watchers:
        thread.start()
    time.sleep(0.5)  # the watchers are forked and polling
    path = policy_dir / "change.yaml"
    started = time.monotonic()
    if present:
        _write(path, objects)
    else:
        path.unlink()
    for thread in watchers:
        thread.join()
    times = list(found.values())
    if any(t is None for t in times):
        return None
    return max(t for t in times if t is not None) - started


# -- throughput and the first packet, pods attached through CNI --------------------------------

TRAFFIC_POLICIES = 100
CLOSED_PORT = 7001  # nothing listens: a connect is the SYN there and the RST back
DENIED_PORT = 7002  # no policy admits it: with the policies on, its SYN is dropped


def _traffic_policies() -> list[dict[str, Any]]:
    """100 policies that all select both pods, ingress and egress, each admitting iperf3's
    port, the probe port and one port of its own."""
    def rule(word: str, i: int) -> dict[str, Any]:
        return {word: [{"podSelector": {}}], "ports": [
            {"protocol": "TCP", "port": port} for port in (5201, CLOSED_PORT, 10000 + i)]}
    return [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": f"p{i:03d}", "namespace": "default"},
             "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                      "ingress": [rule("from", i)], "egress": [rule("to", i)]}}
            for i in range(TRAFFIC_POLICIES)]


def connect_times(src: str, dst: str, port: int, count: int) -> list[float]:
    """In a pod: `count` TCP connects to a closed port, each SYN to RST, in microseconds
    (bounded: each connect waits 0.5 s at most, and the block stops after 5 unanswered)."""
    import socket

    found: list[float] = []
    unanswered = 0
    for _ in range(count):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            sock.bind((src, 0))
            started = time.perf_counter()
            try:
                sock.connect((dst, port))
            except ConnectionRefusedError:
                found.append((time.perf_counter() - started) * 1e6)
            except OSError:
                unanswered += 1
                if unanswered >= 5:
                    break
    return found


def _set_policies(box: Sandbox, policy_dir: Any, on: bool) -> None:
    import threading

    path = policy_dir / "traffic-policies.yaml"
    done: dict[str, float | None] = {}

    def watch(node: SandboxNode) -> None:
        done[node.name] = node.call(watch_chain, "weavepy-policy", "pol-in-default.p000", on,
                                    60.0, timeout=90)

    watchers = [threading.Thread(target=watch, args=(n,)) for n in box.nodes[:2]]
    for thread in watchers:
        thread.start()
    if on:
        _write(path, _traffic_policies())
    elif path.exists():
        path.unlink()
    for thread in watchers:
        thread.join()
    if any(v is None for v in done.values()):
        raise RuntimeError(f"policies {'on' if on else 'off'} not enforced in 60 s: {done}")


def measure_traffic(box: Sandbox, rig: AgentBox, policy_dir: Any, reps: int, seconds: int,
                    connects: int) -> dict[str, dict[str, list[float]]]:
    """Pod a on n1 to pod b on n2 (CNI ADD through the agents), with the 100 policies off, on,
    and off again (the A/A control), interleaved in every repetition."""
    import json

    from weavepy.cni.install import install_cni

    plugin = install_cni(rig.root / "cni-bin", rig.root / "cni-conf").plugin
    pods = {}
    nodes = {"pa": box.nodes[0], "pb": box.nodes[1]}
    for label, node in nodes.items():
        namespace = box.add_netns(label)
        pods[label] = (namespace, rig.cni_add(node, plugin, namespace.netns, timeout=120))
    # the pods' labels, and their addresses for the other node (as a shared directory must)
    _write(policy_dir / "traffic-pods.yaml", [
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": pods[label][0].netns, "namespace": "default",
                      "labels": {"app": "perf"}},
         "spec": {"nodeName": nodes[label].name}, "status": {"podIP": pods[label][1]}}
        for label in pods])
    (client, client_ip), (server, server_ip) = pods["pa"], pods["pb"]
    iperf = server.start("iperf3", ["iperf3", "-s", "-B", server_ip])
    results: dict[str, dict[str, list[float]]] = {
        c: {"gbits": [], "connect_us": [], "denied_port_answered": []}
        for c in ("none", "policy", "none-again")}
    try:
        time.sleep(1.0)
        for _ in range(reps):
            for condition in ("none", "policy", "none-again"):
                _set_policies(box, policy_dir, condition == "policy")
                try:
                    run = client.run(["iperf3", "-c", server_ip, "-B", client_ip, "-t",
                                      str(seconds), "-J"], check=False, timeout=seconds + 30)
                    report = json.loads(run.stdout or "{}")
                except subprocess.TimeoutExpired:
                    report = {}
                received = report.get("end", {}).get("sum_received", {})
                if "bits_per_second" in received:
                    results[condition]["gbits"].append(received["bits_per_second"] / 1e9)
                results[condition]["connect_us"] += client.call(
                    connect_times, client_ip, server_ip, CLOSED_PORT, connects, timeout=120)
                # proof the policies are in force: a port none of them admits is dropped
                answered = client.call(connect_times, client_ip, server_ip, DENIED_PORT, 1,
                                       timeout=30)
                results[condition]["denied_port_answered"].append(float(len(answered)))
    finally:
        iperf.stop()
    return results


def _ready(rig: AgentBox, node: SandboxNode) -> bool:
    return bool((rig.status(node) or {}).get("ready"))


def measure_agents(pods: int, changes: int, traffic: tuple[int, int, int] | None,
                   ) -> dict[str, Any]:
    state = _with_fillers(pods)
    change = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": CHANGE, "namespace": "ns0"},
              "spec": {"podSelector": {}, "ingress": [{
                  "from": [{"podSelector": {"matchLabels": {"app": "a0"}}}],
                  "ports": [{"protocol": "TCP", "port": 8443}]}]}}
    results: dict[str, list[float]] = {"added": [], "removed": []}
    lost = 0
    with Sandbox.create(nodes=3) as box:
        policy_dir = box.run_dir / "policy"
        policy_dir.mkdir()
        _write(policy_dir / "cluster.yaml", kubernetes_objects(state))
        rig = AgentBox(box, pod_range=AGENT_POD_RANGE,
                       extra_args=("--policy-dir", str(policy_dir)))
        first, *others = box.nodes
        rig.launch(first)
        rig.wait_api(first, timeout=STARTUP)
        for node in others:
            rig.launch(node, [first])
        for node in box.nodes:
            rig.wait("node ready", partial(_ready, rig, node), timeout=STARTUP)
        rig.wait_mesh(timeout=STARTUP)
        for node in box.nodes:  # the initial table is in every kernel
            rig.wait("policy table", partial(node.call, watch_chain, "weavepy-policy",
                                             "pol-in-ns0.default-deny", True, 1.0),
                     timeout=STARTUP)
        for _ in range(changes):
            for present, label in ((True, "added"), (False, "removed")):
                elapsed = _change_to_enforced(box.nodes, policy_dir, present, [change])
                if elapsed is None:
                    lost += 1
                else:
                    results[label].append(elapsed)
        flows = measure_traffic(box, rig, policy_dir, *traffic) if traffic else None
    return {"policies": len(state.policies), "times": results, "lost": lost,
            "traffic": flows}


def run(args: Sequence[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench policy")
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--agent-sizes", default="30,300",
                        help="pods for the change-to-enforced part ('' to skip it)")
    parser.add_argument("--changes", type=int, default=20,
                        help="policy changes (each added, then removed) per size")
    parser.add_argument("--traffic-reps", type=int, default=3,
                        help="repetitions of none / policy / none-again (0: skip)")
    parser.add_argument("--seconds", type=int, default=3, help="iperf3 -t")
    parser.add_argument("--connects", type=int, default=200, help="connects per block")
    options = parser.parse_args(list(args))
    sizes = [int(s) for s in options.sizes.split(",")]
    results: dict[int, dict[str, Any]] = {}
    with Sandbox.create(nodes=1) as box:
        node = box.nodes[0]
        for pods in sizes:
            results[pods] = node.call(measure_in_node, pods, options.reps, timeout=3600)
    size_rows = []
    for pods in sizes:
        found = results[pods]
        size = found["size"]
        state = synthetic_cluster(pods)
        pairs = per_pair_rules(state)
        size_rows.append([f"{pods:,}", f"{len(state.policies):,}", f"{size.rules:,}",
                          f"{size.elements:,}", f"{found['kernel']['rules']:,}",
                          f"{found['kernel']['elements']:,}", f"{pairs:,}",
                          f"{pairs / max(1, size.rules + size.elements):,.0f}x"])
    change_rows = []
    for pods in sizes:
        times = results[pods]["times"]
        ms = {k: [v * 1000 for v in vs] for k, vs in times.items()}
        diff, replace = ms["signature diff"], ms["signature replace"]
        ratio = statistics.median(replace) / statistics.median(diff)
        change_rows.append([f"{pods:,}", median_spread(diff), median_spread(replace),
                            f"{ratio:.1f}x", median_spread(ms["joined diff"]),
                            median_spread(ms["check"]), f"{ms['compile'][0]:.0f}"])
    kinds = sorted({k for r in results.values() for k in r["kinds"]})
    agent_rows = []
    flows: dict[str, dict[str, list[float]]] | None = None
    for index, pods in enumerate(int(s) for s in options.agent_sizes.split(",") if s):
        wanted = ((options.traffic_reps, options.seconds, options.connects)
                  if index == 0 and options.traffic_reps else None)
        found = measure_agents(pods, options.changes, wanted)
        flows = flows or found["traffic"]
        every = [v * 1000 for vs in found["times"].values() for v in vs]
        stats = summary(every)
        goal = ("met" if stats["median"] <= 200 and stats["p99" if stats["n"] >= 100
                                                         else "max"] <= 1000 else "missed")
        agent_rows.append([f"{pods:,}", f"{found['policies']} (+1 changed)", int(stats["n"]),
                           f"{stats['median']:.0f}", f"{stats['min']:.0f}",
                           f"{tail_label(int(stats['n']))} {tail(every):.0f}",
                           median_spread([v * 1000 for v in found["times"]["added"]], 0),
                           median_spread([v * 1000 for v in found["times"]["removed"]], 0),
                           found["lost"], goal])
    return "\n\n".join([
        no_anchor("Sizes are compared with a per-pair translation computed from the same "
                  "cluster (not loaded); the applier's diff with the full replace it "
                  "replaces, in the same run."),
        "### Ruleset size on the node holding every pod (rules and set elements)\n\n"
        + table(["pods", "policies", "rules (compiled)", "elements (compiled)",
                 "rules (kernel)", "elements (kernel)", "per-pair rules (computed)",
                 "per-pair / (rules + elements)"], size_rows)
        + f"\n\nkube-router#945 reached {KUBE_ROUTER_945:,} iptables rules.",
        f"### One pod's change, ms ({options.reps} repetitions: median (min, max))\n\n"
        + table(["pods", "new signature: diff", "same change: full replace",
                 "replace / diff", "pod joins a signature: diff", "check() alone",
                 "compile ms"], change_rows)
        + f"\n\nApplier results seen: {', '.join(kinds)}. Times are `apply()` from call to "
          "the kernel holding the table, check of the live table included (the replace "
          "has no check: a fresh applier).",
        "### Policy change to enforced on all 3 nodes, ms (real agents, simulated pods)\n\n"
        + table(["pods", "policies", "changes", "median", "min", "tail", "added",
                 "removed", "not enforced in 30 s", "goal median <= 200, p99 <= 1000"],
                agent_rows)
        + "\n\nPods are Pod objects with `spec.nodeName` and `status.podIP` in the policy "
          "directory (no network namespace behind them); a change is a policy renamed into "
          "the directory (or removed); enforced = the policy's chain listed by every node's "
          "kernel. With fewer than 100 changes the tail is the maximum.",
        _traffic_report(flows, options),
    ])


def _traffic_report(flows: dict[str, dict[str, list[float]]] | None,
                    options: argparse.Namespace) -> str:
    if not flows:
        return "Throughput and first packet: not measured in this run."
    none, policy, again = (flows[c] for c in ("none", "policy", "none-again"))
    rows = []
    for label, key, digits in (("iperf3 Gbit/s", "gbits", 2), ("connect us", "connect_us", 0)):
        base = statistics.median(none[key]) if none[key] else float("nan")
        both = none[key] + again[key]
        rows.append([label, median_spread(none[key], digits), median_spread(policy[key], digits),
                     median_spread(again[key], digits),
                     f"{statistics.median(policy[key]) / base:.1%}" if policy[key] else "n/a",
                     f"{statistics.median(again[key]) / base:.1%}" if again[key] else "n/a",
                     f"{statistics.median(policy[key]) / statistics.median(both):.1%}"
                     if policy[key] and both else "n/a"])
    added = (statistics.median(policy["connect_us"]) - statistics.median(none["connect_us"])
             if policy["connect_us"] and none["connect_us"] else float("nan"))
    proof = (f"Policies in force (a connect to port {DENIED_PORT}, which none admits): "
             f"answered in {sum(policy['denied_port_answered']):.0f} of "
             f"{len(policy['denied_port_answered'])} policy blocks (0 expected), in "
             f"{sum(none['denied_port_answered'] + again['denied_port_answered']):.0f} of "
             f"{len(none['denied_port_answered'] + again['denied_port_answered'])} blocks "
             f"without.")
    return ("### Pod to pod across nodes through agents, 100 policies selecting both pods\n\n"
            + anchor_version("Load generator iperf3", ["iperf3", "--version"], "iperf3")
            + "\n\n"
            + table(["measure", "no policy", "100 policies", "no policy again (A/A)",
                     "policy / none", "A/A (again / none)",
                     "policy / both no-policy blocks"], rows)
            + f"\n\nFirst packet: median connect time added by policy {added:.0f} us (goal "
              f"<= 50 us). Pods a (n1) and b (n2) attached by CNI ADD through the agents; "
              f"{options.traffic_reps} repetitions of none / policy / none-again, each iperf3 "
              f"-t {options.seconds} and {options.connects} TCP connects to a closed port "
              f"(SYN through both nodes' policy chains, RST back); goal throughput >= 95 %. "
              + proof)
