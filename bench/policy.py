"""NetworkPolicy: the ruleset's size, and what one pod's change costs the applier.

`python -m bench policy [--sizes 100,1000,10000] [--reps 5]`

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

Not measured here yet: policy change to enforced on every node through real agents, throughput
with policies in force and first-packet cost. They need the agent's enforcement (`weavepy
launch --policy-dir`), which this branch does not have; see the report's last line.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from ipaddress import IPv4Address
from typing import Any

from bench.common import median_spread, no_anchor, table
from weavepy.devtools.policy_workload import synthetic_cluster
from weavepy.devtools.sandbox import Sandbox
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


def run(args: Sequence[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench policy")
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--reps", type=int, default=5)
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
        ratio = (sorted(replace)[len(replace) // 2] / sorted(diff)[len(diff) // 2]
                 if diff else float("nan"))
        change_rows.append([f"{pods:,}", median_spread(diff), median_spread(replace),
                            f"{ratio:.1f}x", median_spread(ms["joined diff"]),
                            median_spread(ms["check"]), f"{ms['compile'][0]:.0f}"])
    kinds = sorted({k for r in results.values() for k in r["kinds"]})
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
        "Not measured in this run: policy change to enforced on every node, throughput with "
        "100 policies and first-packet cost. They need agents that enforce policy "
        "(`weavepy launch --policy-dir`), which this branch does not have.",
    ])
