"""The reference evaluator: is this connection allowed? Straight from the spec.

This module owns the meaning of NetworkPolicy, written to be read against the Kubernetes
documentation line by line and to share nothing with the compiler but the model. The compiler
is property-tested against it, the conformance truth tables are checked against it, and
`weavepy policy explain` answers with it.

The rules, as the spec states them:

* A pod is isolated for ingress (egress) when some policy of its own namespace selects it and
  has Ingress (Egress) in its policyTypes. A pod that is not isolated in a direction allows
  everything in that direction.
* An isolated pod allows a connection when at least one rule of at least one policy that
  isolates it allows the peer and the port: policies are a union, never an order.
* A connection needs both ends: the source's egress and the destination's ingress.
* A rule with no peers allows every peer; a rule with no ports allows every port of every
  protocol (other protocols, such as ICMP, are allowed only by such a rule).
* A named port is resolved on the destination pod, with the rule's protocol; if the
  destination has no container port of that name and protocol, the rule does not match it.
* ipBlock matches the peer's address, pod or not.
* Replies to an allowed connection are allowed (a stateful implementation: conntrack).
* Traffic between a pod and the node it runs on is always allowed, and a pod cannot block
  traffic to itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address

from weavepy.policy.model import (
    PROTOCOLS,
    ClusterState,
    Direction,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyPort,
    Rule,
)

__all__ = ["Decision", "Endpoint", "Host", "Verdict", "allowed", "selecting_policies"]


@dataclass(frozen=True)
class Host:
    """A node itself (kubelet, host-network processes), with the address it sends from."""

    node: str
    address: IPv4Address


Endpoint = Pod | Host | IPv4Address


@dataclass(frozen=True)
class Decision:
    """One end's verdict: the policies that isolate the pod in this direction and, of those,
    the ones whose rules allowed the connection."""

    direction: Direction
    pod: str
    isolating: tuple[str, ...]
    allowing: tuple[str, ...]

    @property
    def allowed(self) -> bool:
        return not self.isolating or bool(self.allowing)

    def text(self) -> str:
        if not self.isolating:
            return f"{self.direction} of {self.pod}: allowed (no policy selects it)"
        if self.allowing:
            return (f"{self.direction} of {self.pod}: allowed by {', '.join(self.allowing)}")
        return (f"{self.direction} of {self.pod}: denied (isolated by "
                f"{', '.join(self.isolating)}; no rule matches)")


@dataclass(frozen=True)
class Verdict:
    """Allowed or not, and what decided it (for `weavepy policy explain`)."""

    allowed: bool
    reason: str
    decisions: tuple[Decision, ...] = ()

    @property
    def deciding_policies(self) -> tuple[str, ...]:
        """The policies that allowed it, or, when denied, those that isolated the denying
        end."""
        found: list[str] = []
        for decision in self.decisions:
            wanted = decision.allowing if self.allowed else (
                () if decision.allowed else decision.isolating)
            found += [key for key in wanted if key not in found]
        return tuple(found)

    def text(self) -> str:
        lines = [("allowed" if self.allowed else "denied") + f": {self.reason}"]
        lines += [f"  {d.text()}" for d in self.decisions]
        return "\n".join(lines)


def selecting_policies(state: ClusterState, pod: Pod, direction: Direction,
                       ) -> list[NetworkPolicy]:
    """The policies of the pod's namespace that select it and affect `direction`."""
    return [p for p in sorted(state.policies, key=lambda p: p.key)
            if p.namespace == pod.namespace and p.affects(direction)
            and p.pod_selector.matches(pod.labels)]


def _address(end: Endpoint) -> IPv4Address | None:
    if isinstance(end, Pod):
        return end.ip
    if isinstance(end, Host):
        return end.address
    return end


def _peer_matches(state: ClusterState, policy: NetworkPolicy, peer: Peer,
                  other: Endpoint) -> bool:
    if peer.ip_block is not None:
        address = _address(other)
        return address is not None and peer.ip_block.contains(address)
    if not isinstance(other, Pod):
        return False
    if peer.namespace_selector is None:
        in_namespace = other.namespace == policy.namespace
    else:
        in_namespace = peer.namespace_selector.matches(state.namespace_labels(other.namespace))
    pods_match = peer.pod_selector is None or peer.pod_selector.matches(other.labels)
    return in_namespace and pods_match


def _port_matches(rule_port: PolicyPort, destination: Endpoint, port: int | None,
                  protocol: str) -> bool:
    if rule_port.protocol != protocol:
        return False
    if rule_port.port is None:
        return True
    if port is None:
        return False
    if isinstance(rule_port.port, str):
        if not isinstance(destination, Pod):
            return False
        return destination.named_port(rule_port.port, rule_port.protocol) == port
    last = rule_port.end_port if rule_port.end_port is not None else rule_port.port
    return rule_port.port <= port <= last


def _rule_allows(state: ClusterState, policy: NetworkPolicy, rule: Rule, peer: Endpoint,
                 destination: Endpoint, port: int | None, protocol: str) -> bool:
    if rule.peers and not any(_peer_matches(state, policy, p, peer) for p in rule.peers):
        return False
    if not rule.ports:
        return True
    return any(_port_matches(p, destination, port, protocol) for p in rule.ports)


def _decide(state: ClusterState, pod: Pod, direction: Direction, peer: Endpoint,
            destination: Endpoint, port: int | None, protocol: str) -> Decision:
    isolating = selecting_policies(state, pod, direction)
    allowing = [policy.key for policy in isolating
                if any(_rule_allows(state, policy, rule, peer, destination, port, protocol)
                       for rule in policy.rules(direction))]
    return Decision(direction, pod.key, tuple(p.key for p in isolating), tuple(allowing))


def allowed(state: ClusterState, src: Endpoint, dst: Endpoint, port: int | None,
            protocol: str) -> Verdict:
    """May `src` open a connection to `dst` on `port`/`protocol`?

    `protocol` is TCP, UDP, SCTP, or another IP protocol's name (ICMP: `port` None). A pod
    given as `src` or `dst` is looked up in `state` by namespace/name, so its labels and
    ports are the ones policy sees."""
    if isinstance(src, Pod):
        src = state.pod(src.key) or src
    if isinstance(dst, Pod):
        dst = state.pod(dst.key) or dst
    if protocol in PROTOCOLS and port is None:
        raise ValueError(f"a {protocol} connection needs a port")
    if isinstance(src, Pod) and isinstance(dst, Pod) and src.key == dst.key:
        return Verdict(True, "a pod cannot block traffic to itself")
    for host, pod in ((src, dst), (dst, src)):
        if isinstance(host, Host) and isinstance(pod, Pod) and pod.node == host.node:
            return Verdict(True, f"traffic between a pod and its node ({host.node}) is "
                                 f"always allowed")
    decisions = []
    if isinstance(src, Pod):
        decisions.append(_decide(state, src, "egress", dst, dst, port, protocol))
    if isinstance(dst, Pod):
        decisions.append(_decide(state, dst, "ingress", src, dst, port, protocol))
    if not decisions:
        return Verdict(True, "neither end is a pod")
    verdict = all(d.allowed for d in decisions)
    if verdict:
        isolated = [d for d in decisions if d.isolating]
        reason = ("allowed by " + ", ".join(sorted({k for d in isolated for k in d.allowing}))
                  if isolated else "no policy selects either end")
    else:
        reason = "; ".join(f"{d.direction} of {d.pod} is isolated and no rule matches"
                           for d in decisions if not d.allowed)
    return Verdict(verdict, reason, tuple(decisions))
