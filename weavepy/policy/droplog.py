"""The drop log: logged packets -> drops attributed to pods and policies, recent drops, counts,
and rate-limited log lines. Pure: fed packets, the cluster state and the time.

This module owns what a policy drop means to a person: "blocked by weavepy policy: TCP x/a
(198.19.0.2:41000) -> y/b (198.19.0.3:80) ingress, policies: y/deny-all", the line Weave
users knew as "blocked by Weave NPC", with pod names. In audit mode the packet passed and the
line says `would be blocked by weavepy policy (audit mode, passed)`. The reader
(dropreader.py) feeds it; the agent shows `status()` and exports `counts`.

The rules it keeps:

* **Bounded.** Recent drops are a ring of `capacity`; rate-limit state holds at most
  `max_flows` flows (expired ones are forgotten first); counters are keyed by bounded values.
* **One line per flow per window.** A flow is (verdict, direction, source, destination,
  protocol, destination port), by pod name when the address is a pod's. The first drop of a
  flow in a window is logged; the next line of that flow says how many were not.
* **Counted like weave-npc.** `blocked` counts what weave-npc's
  `weavenpc_blocked_connections_total{protocol, dport}` counted: a TCP plain SYN, or any UDP
  packet, that was dropped (not audited). `logged` counts every logged packet by direction
  and verdict. The kernel rate-limits the log rule (compiler: `limit drop-log`), so both are
  counts of logged drops; the table's counters count every drop.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from weavepy.policy.compiler import CompiledPolicy, parse_drop_log_prefix
from weavepy.policy.model import ClusterState, Direction
from weavepy.policy.nflog import LoggedPacket

__all__ = ["Drop", "DropLog"]

KNOWN_SIGNATURES = 4096  # signature chains remembered after they leave the table


@dataclass(frozen=True)
class Drop:
    """One logged drop (or, with `audit`, a packet that would have been dropped)."""

    at: float
    audit: bool
    direction: Direction
    chain: str
    protocol: str
    src: IPv4Address | None
    dst: IPv4Address | None
    sport: int | None
    dport: int | None
    src_pod: str | None
    dst_pod: str | None
    policies: tuple[str, ...]
    in_interface: str | None = None
    out_interface: str | None = None

    @property
    def flow(self) -> tuple[object, ...]:
        return (self.audit, self.direction, self.src_pod or self.src, self.dst_pod or self.dst,
                self.protocol, self.dport)

    def text(self) -> str:
        head = ("would be blocked by weavepy policy (audit mode, passed)" if self.audit
                else "blocked by weavepy policy")
        policies = ", ".join(self.policies) if self.policies else f"unknown ({self.chain})"
        return (f"{head}: {self.protocol} {_end(self.src_pod, self.src, self.sport)} -> "
                f"{_end(self.dst_pod, self.dst, self.dport)} {self.direction}, "
                f"policies: {policies}")

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "verdict": "audit" if self.audit else "drop",
                "direction": self.direction, "protocol": self.protocol,
                "src": None if self.src is None else str(self.src), "sport": self.sport,
                "dst": None if self.dst is None else str(self.dst), "dport": self.dport,
                "src_pod": self.src_pod, "dst_pod": self.dst_pod,
                "policies": list(self.policies), "chain": self.chain,
                "in_interface": self.in_interface, "out_interface": self.out_interface}


def _end(pod: str | None, address: IPv4Address | None, port: int | None) -> str:
    where = "?" if address is None else str(address)
    if port is not None:
        where = f"{where}:{port}"
    return f"{pod} ({where})" if pod else where


@dataclass
class _Flow:
    logged_at: float
    suppressed: int = 0


@dataclass
class DropLog:
    """Feed it `observe(packet, now)`; it returns the log lines to write now."""

    window: float = 10.0
    capacity: int = 100
    max_flows: int = 1024
    recent: deque[Drop] = field(init=False)
    blocked: Counter[tuple[str, str]] = field(default_factory=Counter)
    logged: Counter[tuple[str, str]] = field(default_factory=Counter)
    unattributed: int = 0
    suppressed_lines: int = 0
    _state: ClusterState = field(default_factory=ClusterState)
    _signatures: OrderedDict[str, tuple[str, ...]] = field(default_factory=OrderedDict)
    _flows: OrderedDict[tuple[object, ...], _Flow] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.recent = deque(maxlen=self.capacity)

    def update(self, state: ClusterState, compiled: CompiledPolicy) -> None:
        """The state and table now in force. Chains that left the table are remembered (a
        log message may still be on its way), up to KNOWN_SIGNATURES."""
        self._state = state
        for chain, policies in compiled.signatures.items():
            self._signatures[chain] = policies
            self._signatures.move_to_end(chain)
        while len(self._signatures) > KNOWN_SIGNATURES:
            self._signatures.popitem(last=False)

    def attribute(self, packet: LoggedPacket, at: float) -> Drop | None:
        """The drop `packet` records, or None when its prefix is not one of ours."""
        parsed = parse_drop_log_prefix(packet.prefix)
        if parsed is None:
            return None
        audit, direction, chain = parsed
        return Drop(
            at=at, audit=audit, direction=direction, chain=chain,
            protocol=packet.protocol_name, src=packet.src, dst=packet.dst,
            sport=packet.sport, dport=packet.dport,
            src_pod=self._pod_name(packet.src), dst_pod=self._pod_name(packet.dst),
            policies=self._signatures.get(chain, ()),
            in_interface=packet.in_name, out_interface=packet.out_name)

    def _pod_name(self, address: IPv4Address | None) -> str | None:
        pod = None if address is None else self._state.pod_at(address)
        return None if pod is None else pod.key

    def observe(self, packet: LoggedPacket, now: float, at: float | None = None) -> list[str]:
        """Record one logged packet seen at monotonic time `now` (`at`: wall-clock time for
        status, default the kernel's timestamp or `now`); return the lines to log."""
        drop = self.attribute(packet, at if at is not None else packet.timestamp or now)
        if drop is None:
            self.unattributed += 1
            return []
        self.recent.append(drop)
        verdict = "audit" if drop.audit else "drop"
        self.logged[(drop.direction, verdict)] += 1
        if not drop.audit and drop.dport is not None and (
                packet.is_new_tcp or drop.protocol == "UDP"):
            self.blocked[(drop.protocol.lower(), str(drop.dport))] += 1
        return self._rate_limited(drop, now)

    def _rate_limited(self, drop: Drop, now: float) -> list[str]:
        flow = self._flows.get(drop.flow)
        if flow is not None and now - flow.logged_at < self.window:
            flow.suppressed += 1
            self.suppressed_lines += 1
            return []
        line = drop.text()
        if flow is not None:
            if flow.suppressed:
                line += f" (and {flow.suppressed} more since the last line)"
            del self._flows[drop.flow]
        self._forget_expired(now)
        if len(self._flows) >= self.max_flows:
            self.suppressed_lines += 1
            return []
        self._flows[drop.flow] = _Flow(now)
        return [line]

    def _forget_expired(self, now: float) -> None:
        while self._flows:
            oldest = next(iter(self._flows.values()))
            if now - oldest.logged_at < self.window:
                return
            self._flows.popitem(last=False)

    def status(self) -> dict[str, Any]:
        """Recent drops (newest last) and the counts, for `weavepy status policy`."""
        return {
            "recent": [drop.as_dict() for drop in self.recent],
            "logged": [{"direction": d, "verdict": v, "count": n}
                       for (d, v), n in sorted(self.logged.items())],
            "blocked": [{"protocol": p, "dport": d, "count": n}
                        for (p, d), n in sorted(self.blocked.items())],
            "unattributed": self.unattributed,
            "suppressed_lines": self.suppressed_lines,
        }
