"""Joining the cluster: the task that drives the join schedule against the gossip service.

This module owns how a running agent finds its peers, with trio, around the sans-IO schedule
of `weavepy.targets`:

* the join loop: the operator's targets (`launch PEER...`, `connect`, the Kubernetes API's
  nodes) are joined when due and retried with backoff until a live member answers at that
  address; once per reconnect interval one failed member is tried again, so two halves of a
  healed partition merge;
* the last run's members (`known-peers.json`, weavepy.peerstore): joined once, all at once, at
  start, so a founder launched without peers finds its cluster again after a crash or a reboot;
  the live members' addresses are saved again when they change: at once after a quiet spell,
  then at most every `KNOWN_PEERS_SAVE_GAP` seconds (a join wave of N members would otherwise
  rewrite the file N times on every node), in a worker thread;
* when the start-up view is complete (`settle`): two seconds after the first successful join,
  two seconds after start when there is nobody to join, and at most 15 s after start. Until
  then the reconciler keeps the peers it programmed in the last run, so nothing flaps.

The rules it keeps: every join attempt is bounded in time, and a failed one is logged (with a
hint when the gossip keys seem to differ) and retried, never an error that stops the agent.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

import trio

from gossip.events import MemberState
from gossip.transport import GossipService, JoinError
from weavepy.config import parse_peer
from weavepy.peerstore import load_known_peers, save_known_peers
from weavepy.targets import TargetSchedule

__all__ = ["Joiner"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
SETTLE_AFTER_JOIN = 2.0  # seconds after the first successful join before retained peers go
SETTLE_MAX = 15.0  # ... and at most this long after start, joined or not
KNOWN_PEERS_SAVE_GAP = 5.0  # seconds at least between two saves of the live members


class Joiner:
    """The join loop of one agent named `name` (see the module docstring). `peers` are the
    operator's, as `host:port` (weavepy.targets.normalise_addresses)."""

    def __init__(self, name: str, gossip_port: int, peers: list[str], state_dir: Path,
                 rng: random.Random) -> None:
        self.name = name
        self.gossip_port = gossip_port
        self.peers = peers
        self.state_dir = state_dir
        self.rng = rng
        self.targets = TargetSchedule(rng)
        self.known_peers = load_known_peers(state_dir)
        self.first_join: float | None = None
        self._changed = trio.Event()
        self._members_changed = trio.Event()
        self._known_saved: list[str] | None = None

    def wake(self) -> None:
        """The targets changed: look at them now."""
        self._changed.set()

    def live_addresses(self, svc: GossipService) -> set[str]:
        """The gossip addresses of the other members that are alive or suspect."""
        found: set[str] = set()
        for member in svc.members():
            if member.state in (MemberState.ALIVE, MemberState.SUSPECT) and \
                    member.name != self.name:
                with contextlib.suppress(ValueError):
                    found.add(f"{IPv4Address(member.addr)}:{member.port}")
        return found

    def members_changed(self) -> None:
        """A member event arrived: the live members may differ from those saved."""
        self._members_changed.set()

    async def keep_known(self, svc: GossipService) -> None:
        """Remember the live members' addresses (rejoined at the next start, as serf's
        snapshot does), so a node launched without peers finds its cluster again at once."""
        try:
            while True:
                await self._members_changed.wait()
                self._members_changed = trio.Event()
                known = self._known_to_save(svc)
                if known is not None:
                    saved = await trio.to_thread.run_sync(save_known_peers, self.state_dir, known)
                    self._known_saved = known if saved else self._known_saved
                await trio.sleep(KNOWN_PEERS_SAVE_GAP)
        finally:  # stopping: what changed since the last save is saved now
            known = self._known_to_save(svc) if self._members_changed.is_set() else None
            if known is not None and save_known_peers(self.state_dir, known):
                self._known_saved = known

    def _known_to_save(self, svc: GossipService) -> list[str] | None:
        known = sorted(self.live_addresses(svc))
        return known if known and known != self._known_saved else None

    async def settle(self, settled: Callable[[], None]) -> None:
        """Call `settled()` once the start-up view is complete (joined, or nobody to join)."""
        with trio.move_on_after(SETTLE_MAX):
            while True:
                if not (self.peers or self.targets.addresses() or self.known_peers):
                    await trio.sleep(SETTLE_AFTER_JOIN)
                    break
                if self.first_join is not None:
                    await trio.sleep_until(self.first_join + SETTLE_AFTER_JOIN)
                    break
                await trio.sleep(0.1)
        settled()

    async def run(self, svc: GossipService) -> None:
        """Join the targets (retrying with backoff) and reconnect to failed members."""
        self.targets.add(self.peers, trio.current_time())
        own = "{}:{}".format(*svc.advertise_address)
        async with trio.open_nursery() as attempts:
            if self.known_peers:  # members of the last run: one attempt, all at once
                attempts.start_soon(self._rejoin_known, svc)
            while True:
                now = trio.current_time()
                # this node's own address in the peer list (a list shared by every node) counts
                # as joined: joining it would answer, yet never show a member to observe
                self.targets.observe(self.live_addresses(svc) | {own}, now)
                for address in self.targets.due(now):
                    attempts.start_soon(self._attempt, svc, address)
                if self.targets.reconnect_due(now):
                    failed = [m for m in svc.members() if m.state == MemberState.DEAD]
                    if failed:
                        member = self.rng.choice(failed)
                        address = f"{IPv4Address(member.addr)}:{member.port}"
                        attempts.start_soon(self._attempt, svc, address, True)
                with trio.move_on_at(min(self.targets.next_deadline(), now + 1.0)):
                    await self._changed.wait()
                self._changed = trio.Event()

    async def _rejoin_known(self, svc: GossipService) -> None:
        seeds = [parse_peer(p, self.gossip_port) for p in self.known_peers]
        with trio.move_on_after(CONNECT_TIMEOUT + 2):
            try:
                answered = await svc.join(seeds)
            except (JoinError, OSError) as exc:
                log.info("none of the last run's %d members answered (%s)", len(seeds), exc)
                return
            log.info("rejoined through %d of the last run's %d members", answered, len(seeds))
            if self.first_join is None:
                self.first_join = trio.current_time()

    async def _attempt(self, svc: GossipService, address: str, reconnect: bool = False) -> None:
        host, port = parse_peer(address, self.gossip_port)
        ok, error = False, None
        try:
            with trio.fail_after(CONNECT_TIMEOUT + 2):
                await svc.join([(host, port)])
            ok = True
        except JoinError as exc:
            error = "; ".join(r.error for r in exc.results) or str(exc)
        except (OSError, trio.TooSlowError) as exc:
            error = str(exc) or type(exc).__name__
        now = trio.current_time()
        if not reconnect:
            self.targets.attempted(address, ok, error, now)
        if ok:
            if self.first_join is None:
                self.first_join = now
            log.info("joined the cluster through %s", address)
        elif reconnect:
            log.debug("reconnect to failed member at %s: %s", address, error)
        else:
            hint = ""
            if error and ("decrypt" in error or "EOF" in error or "closed" in error):
                hint = " (a different gossip key on either side?)"
            log.warning("cannot join %s: %s%s; retrying", address, error, hint)
        self.wake()
