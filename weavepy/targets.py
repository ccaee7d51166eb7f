"""Join targets: which peer addresses to (re)join and when, as a sans-IO schedule.

Gossip membership heals itself while any member still reaches another, but two groups that
lost each other (a partition, a node that was down longer than its peers remember it, a node
launched before its peers) only find each other again by an explicit join. This module owns
that decision, in Weave's `ConnectionMaker` spirit:

* a *target* is an address the operator named (`launch PEER...`, `connect`), kept until
  `forget`; it is joined at once and retried with capped exponential backoff and jitter while
  no member alive at that address is known;
* a *reconnect* is a failed member's last address, tried one at a time every
  `reconnect_interval` (serf's reconnect behaviour), so a healed partition merges again.

The rule it keeps: no clock and no I/O. The driver asks `due(now)`, makes the attempts, and
reports each with `attempted(...)`; `next_deadline()` says when to ask again. Addresses are
compared in one form, `host:port`: `normalise_addresses` turns what the operator typed into it.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

from weavepy.config import parse_peer

__all__ = ["TargetSchedule", "TargetState", "normalise_addresses"]

FIRST_RETRY = 1.0
MAX_RETRY = 30.0
RECONNECT_INTERVAL = 5.0


def normalise_addresses(peers: Iterable[str], default_port: int) -> list[str]:
    """Peer addresses (`host`, `host:port`, `[v6]:port`) as `host:port`, the form the schedule
    compares; ValueError (one sentence) for the first bad one."""
    out = []
    for peer in peers:
        host, port = parse_peer(peer, default_port)
        out.append(f"{host}:{port}")
    return out


class TargetState(enum.Enum):
    CONNECTING = "connecting"  # an attempt is running
    RETRYING = "retrying"  # the last attempt failed; waiting for the next
    CONNECTED = "connected"  # a live member answers at this address
    WAITING = "waiting"  # joined once; will try again only if that member is lost


@dataclass
class _Target:
    address: str  # "host:port" as given
    state: TargetState = TargetState.RETRYING
    next_try: float = 0.0
    delay: float = FIRST_RETRY
    attempts: int = 0
    last_error: str | None = None


class TargetSchedule:
    """The join schedule; addresses are compared as the strings the driver resolves to."""

    def __init__(self, rng: random.Random, reconnect_interval: float = RECONNECT_INTERVAL) -> None:
        self._rng = rng
        self._targets: dict[str, _Target] = {}
        self._reconnect_interval = reconnect_interval
        self._next_reconnect = 0.0

    def add(self, addresses: Iterable[str], now: float) -> list[str]:
        """Add targets (due at once); returns the ones that are new."""
        added = []
        for address in addresses:
            target = self._targets.get(address)
            if target is None:
                self._targets[address] = _Target(address, next_try=now)
                added.append(address)
            elif target.state is not TargetState.CONNECTING:
                target.next_try, target.delay = now, FIRST_RETRY
        return added

    def replace(self, addresses: Iterable[str], now: float) -> None:
        wanted = list(addresses)
        for address in list(self._targets):
            if address not in wanted:
                del self._targets[address]
        self.add(wanted, now)

    def remove(self, addresses: Iterable[str]) -> list[str]:
        """Forget targets; returns the ones that were known."""
        return [a for a in addresses if self._targets.pop(a, None) is not None]

    def addresses(self) -> list[str]:
        return list(self._targets)

    def observe(self, live_addresses: set[str], now: float) -> None:
        """Mark targets at which a live member answers; re-arm the others that were joined."""
        for target in self._targets.values():
            if target.state is TargetState.CONNECTING:
                continue
            if target.address in live_addresses:
                target.state, target.delay, target.last_error = TargetState.CONNECTED, \
                    FIRST_RETRY, None
            elif target.state in (TargetState.CONNECTED, TargetState.WAITING):
                target.state, target.next_try = TargetState.RETRYING, now

    def due(self, now: float) -> list[str]:
        """Targets to attempt now (they turn CONNECTING until `attempted`)."""
        ready = [t for t in self._targets.values()
                 if t.state is TargetState.RETRYING and t.next_try <= now]
        for target in ready:
            target.state = TargetState.CONNECTING
            target.attempts += 1
        return [t.address for t in ready]

    def attempted(self, address: str, ok: bool, error: str | None, now: float) -> None:
        target = self._targets.get(address)
        if target is None:
            return
        if ok:
            target.state, target.delay, target.last_error = TargetState.WAITING, FIRST_RETRY, None
            return
        target.state = TargetState.RETRYING
        target.last_error = error
        target.next_try = now + target.delay * self._rng.uniform(0.8, 1.2)
        target.delay = min(MAX_RETRY, target.delay * 2)

    def reconnect_due(self, now: float) -> bool:
        """True once per `reconnect_interval`: time to try one failed member."""
        if now < self._next_reconnect:
            return False
        self._next_reconnect = now + self._reconnect_interval * self._rng.uniform(0.8, 1.2)
        return True

    def next_retry(self) -> float:
        """When the next target is due (inf if none is waiting)."""
        times = [t.next_try for t in self._targets.values() if t.state is TargetState.RETRYING]
        return min(times, default=math.inf)

    def next_deadline(self) -> float:
        return min(self.next_retry(), self._next_reconnect)

    def to_json(self) -> list[dict[str, object]]:
        return [{"peer": t.address, "state": t.state.value, "attempts": t.attempts,
                 "last_error": t.last_error} for t in self._targets.values()]
