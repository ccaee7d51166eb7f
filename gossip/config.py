"""Gossip tuning: one frozen `GossipConfig` with memberlist's LAN, WAN and local profiles.

This module owns the protocol's knobs and nothing else. Every duration is in seconds (floats),
every number is memberlist's own default (`config.go`: `DefaultLANConfig`, `DefaultWANConfig`,
`DefaultLocalConfig`), so a weavepy node and a serf agent on the same profile agree on timing.
Change a value with `dataclasses.replace(GossipConfig.lan(), probe_interval=2.0)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# memberlist MetaMaxSize: node metadata (serf tags) never exceeds this many bytes.
META_MAX_SIZE = 512

# memberlist ProtocolVersionMin / ProtocolVersionMax, and ProtocolVersion2Compatible (PCur).
PROTOCOL_VERSION_MIN = 1
PROTOCOL_VERSION_MAX = 5
PROTOCOL_VERSION_CURRENT = 2

# The delegate (serf) protocol range we advertise: overlaps serf's [2, 5] and speaks 5,
# exactly what a serf 0.9.x agent advertises (docs/dataplane-facts.md).
DELEGATE_VERSION_MIN = 2
DELEGATE_VERSION_MAX = 5
DELEGATE_VERSION_CURRENT = 5


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """Timing and sizing of one gossip node (memberlist `Config`, durations in seconds)."""

    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    indirect_checks: int = 3
    suspicion_mult: int = 4
    suspicion_max_timeout_mult: int = 6
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    gossip_to_the_dead_time: float = 30.0
    retransmit_mult: int = 4
    push_pull_interval: float = 30.0
    tcp_timeout: float = 10.0
    awareness_max_multiplier: int = 8
    # 0 disables it: a dead node's name can then be taken by a new address only after it left.
    dead_node_reclaim_time: float = 0.0
    udp_buffer_size: int = 1400
    enable_compression: bool = True
    disable_tcp_pings: bool = False
    # memberlist maxPushPullRequests: inbound push/pulls served at once; more are refused.
    max_push_pull_requests: int = 128
    protocol_min: int = PROTOCOL_VERSION_MIN
    protocol_max: int = PROTOCOL_VERSION_MAX
    protocol_current: int = PROTOCOL_VERSION_CURRENT
    delegate_min: int = DELEGATE_VERSION_MIN
    delegate_max: int = DELEGATE_VERSION_MAX
    delegate_current: int = DELEGATE_VERSION_CURRENT
    # Lifeguard (local health awareness, dynamic suspicion with confirmations, nacks and the
    # buddy system). memberlist always has it on; turning it off gives plain SWIM with a fixed
    # suspicion timeout, which only the simulator uses, to show what Lifeguard buys.
    lifeguard: bool = True

    def __post_init__(self) -> None:
        positive = {
            "probe_interval": self.probe_interval,
            "probe_timeout": self.probe_timeout,
            "gossip_interval": self.gossip_interval,
            "tcp_timeout": self.tcp_timeout,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.probe_timeout > self.probe_interval:
            raise ValueError("probe_timeout must not exceed probe_interval")
        if self.awareness_max_multiplier < 1:
            raise ValueError("awareness_max_multiplier must be at least 1")
        if self.suspicion_mult < 1 or self.suspicion_max_timeout_mult < 1:
            raise ValueError("suspicion multipliers must be at least 1")
        if not 0 < self.protocol_min <= self.protocol_current <= self.protocol_max <= 255:
            raise ValueError("need 0 < protocol_min <= protocol_current <= protocol_max")
        if not 0 <= self.delegate_min <= self.delegate_current <= self.delegate_max <= 255:
            raise ValueError("need delegate_min <= delegate_current <= delegate_max")
        if self.udp_buffer_size < 512:
            raise ValueError("udp_buffer_size below 512 bytes cannot carry a full alive message")

    @property
    def vsn(self) -> bytes:
        """memberlist's Vsn: [pmin, pmax, pcur, dmin, dmax, dcur] as 6 raw bytes."""
        return bytes(
            [
                self.protocol_min,
                self.protocol_max,
                self.protocol_current,
                self.delegate_min,
                self.delegate_max,
                self.delegate_current,
            ]
        )

    @classmethod
    def lan(cls) -> GossipConfig:
        """memberlist DefaultLANConfig (serf's `-profile=lan`, the default)."""
        return cls()

    @classmethod
    def wan(cls) -> GossipConfig:
        """memberlist DefaultWANConfig."""
        return dataclasses.replace(
            cls(),
            tcp_timeout=30.0,
            suspicion_mult=6,
            push_pull_interval=60.0,
            probe_timeout=3.0,
            probe_interval=5.0,
            gossip_nodes=4,
            gossip_interval=0.5,
            gossip_to_the_dead_time=60.0,
        )

    @classmethod
    def local(cls) -> GossipConfig:
        """memberlist DefaultLocalConfig (loopback or one host)."""
        return dataclasses.replace(
            cls(),
            tcp_timeout=1.0,
            indirect_checks=1,
            retransmit_mult=2,
            suspicion_mult=3,
            push_pull_interval=15.0,
            probe_timeout=0.2,
            probe_interval=1.0,
            gossip_interval=0.1,
            gossip_to_the_dead_time=15.0,
        )
