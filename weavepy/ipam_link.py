"""The IPAM link: the sans-IO `IpamCore` and `PodAllocator` driven on the agent's trio loop.

This module owns everything between gossip and the IPAM core, and between the CNI server and
the pod allocator:

* `IpamDelegate` is the gossip `Delegate`. It multiplexes user messages and push/pull user
  state: IPAM payloads (first byte 0xC1, `weavepy.ipam.wire.is_ipam`) go to the core; serf's
  own user messages (a small type byte) and anything else are counted by reason and ignored.
  Delegate hooks run synchronously inside the gossip node, so they only queue work.
* `IpamLink.run` is the one task that feeds the core (queued messages, member liveness, timers)
  and carries out its outputs in the order the core demands: persist the snapshot (fsync, in a
  worker thread), `mark_persisted`, and only then send its messages and act on its events.
  Every message goes by the gossip layer's reliable stream; a broadcast goes so to each live
  member (see `_send_out` for why not by gossip).
* `CniAllocator` serves the CNI server's worker thread: each call hops onto the trio loop
  (`trio.from_thread`), runs the allocator there under the same lock as the core, persists the
  allocations before answering. "No address yet, a block is asked for" becomes the server's
  `AnswerLater`: the ADD waits for the block on the loop, off the worker thread (so a DEL is
  never queued behind it), and runs again; after `ADDRESS_WAIT` it is CNI's "try again later".

The rules it keeps: only `IpamLink` touches the core and the allocator, always under one lock,
so nothing interleaves with a persist in flight; nothing leaves this node before the state that
produced it is on disk; bad input is counted by reason (`drops`) and never raises out of a hook.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from gossip.events import MemberState
from gossip.transport import GossipService
from weavepy.config import AgentConfig, IpallocInit
from weavepy.identity import Identity
from weavepy.ipam.allocator import Allocation, PodAllocator, Unavailable
from weavepy.ipam.core import TAG_KEY, Bootstrap, IpamCore
from weavepy.ipam.errors import ConfigError, CorruptStateError, IpamDecodeError, RmpeerError
from weavepy.ipam.report import status_document
from weavepy.ipam.status import (
    BlockAcquired,
    BlockLost,
    ClusterFounded,
    ClusterJoined,
    ClusterMismatch,
    Event,
    IpamState,
    IpamStatus,
    LeaseChanged,
    MemberRemoved,
    RemovedFromCluster,
    SlotDecided,
)
from weavepy.ipam.store import SlotStateFile, StateFile, slot_paths
from weavepy.ipam.wire import is_ipam

if TYPE_CHECKING:
    from weavepy.ipam_mode import NodeIpam

__all__ = [
    "CORE_FILE",
    "PODS_FILE",
    "PODS_FILES",
    "CniAllocator",
    "IpamDelegate",
    "IpamLink",
    "IpamLinkError",
    "NoAddress",
    "corrupt_leftovers",
]

log = logging.getLogger(__name__)

CORE_FILE = "ipam-core.json"
PODS_FILE = "ipam-pods.json"  # from before the slots; now the slots' base name
# every file that holds pod allocations: the slots, and the single file they replaced
PODS_FILES = (*(slot.name for slot in slot_paths(PODS_FILE)), PODS_FILE)
INBOX_SIZE = 4096
BATCH = 256
ADDRESS_WAIT = 8.0  # seconds a CNI ADD waits for a block before answering "try again later"
SERF_MAX_TYPE = 0x3F  # serf's message types are small integers
# With --kube-peers and no static peers, a node that has heard from no peer for this long
# founds the cluster alone (a one-node cluster); a start of many nodes elects a founder first.
KUBE_FOUND_ALONE_AFTER = 20.0


class IpamLinkError(Exception):
    """IPAM state that cannot be used, or an IPAM request refused; the message is one readable
    line."""


def corrupt_leftovers(state_dir: Path) -> list[Path]:
    """State files an earlier start found corrupt and moved aside (they block a new start)."""
    found: list[Path] = []
    for name in (CORE_FILE, *PODS_FILES):
        found.extend(sorted(state_dir.glob(f"{name}.corrupt-*")))
    return found


class IpamDelegate:
    """The gossip Delegate: IPAM user messages and push/pull state in, nothing else."""

    def __init__(self, link: IpamLink) -> None:
        self._link = link

    def node_meta(self, limit: int) -> bytes:
        return b""  # the agent passes its tags to the gossip service directly

    def notify_msg(self, payload: bytes) -> None:
        if is_ipam(payload):
            self._link.enqueue(("message", payload))
        elif payload and payload[0] <= SERF_MAX_TYPE:
            self._link.drops["serf_user_message"] += 1
        else:
            self._link.drops["unknown_user_message"] += 1

    def get_broadcasts(self, overhead: int, limit: int) -> list[bytes]:
        return []  # broadcasts go through GossipService.send_user_message

    def local_state(self, join: bool) -> bytes:
        return self._link.core.local_state()

    def merge_remote_state(self, buf: bytes, join: bool) -> None:
        if is_ipam(buf):
            self._link.enqueue(("state", buf))
        elif buf:
            self._link.drops["foreign_push_pull_state"] += 1


def bootstrap_for(config: AgentConfig) -> tuple[Bootstrap, float | None]:
    """How a node without IPAM state enters a cluster: (bootstrap, found alone after).

    Launched with peers, it joins their cluster. With --kube-peers its peers are the other
    Kubernetes nodes, which the API names only after the start, and every node of a new
    cluster starts at once (a DaemonSet): founding at start would make each node its own
    cluster, which never merge. So it joins too: nodes that meet without state elect the
    founder (the lowest name), and a node alone for KUBE_FOUND_ALONE_AFTER founds by itself.
    Launched with neither, it founds the cluster at once."""
    if config.peers:
        return "join", None
    if config.kube_peers:
        return "join", KUBE_FOUND_ALONE_AFTER
    return "found", None


class IpamLink:
    """Owns the IPAM core and the pod allocator on the trio loop (see the module docstring)."""

    def __init__(self, config: AgentConfig, identity: Identity, *,
                 on_table_change: Callable[[], None],
                 on_cluster_id: Callable[[str], None],
                 on_tag_change: Callable[[], None]) -> None:
        self.config = config
        self.on_table_change = on_table_change
        self.on_cluster_id = on_cluster_id
        self.on_tag_change = on_tag_change
        leftovers = corrupt_leftovers(config.state_dir)
        if leftovers:
            raise IpamLinkError(
                f"an earlier start found this node's IPAM state corrupt and moved it aside to "
                f"{leftovers[0]}; this node would forget blocks it owns, so it will not start "
                f"empty on its own: restore the file to {config.state_dir / CORE_FILE}, or run "
                f"`weavepy reset` to start it as a new member")
        self.observer = config.ipalloc_init is not None and \
            config.ipalloc_init.mode == "observer"
        self.core_file = StateFile(config.state_dir / CORE_FILE, "ipam-core")
        self.pods_file = SlotStateFile(config.state_dir / PODS_FILE, "ipam-pods")
        bootstrap, found_alone_after = bootstrap_for(config)
        try:
            core_snapshot = self.core_file.load()
            pods_snapshot = self.pods_file.load()
            self.core = IpamCore(
                config.name, config.ipalloc_range, config.block_prefix,
                rng=random.Random(), reclaim_after=config.reclaim_after,
                lease=min(config.ipam_lease, config.reclaim_after),
                bootstrap=bootstrap, found_alone_after=found_alone_after,
                **founding(config.ipalloc_init), snapshot=core_snapshot)
            self.allocator = PodAllocator(self.core, snapshot=pods_snapshot)
        except CorruptStateError as exc:
            raise IpamLinkError(str(exc)) from None
        except ConfigError as exc:
            raise IpamLinkError(f"IPAM: {exc}") from None
        except IpamDecodeError as exc:
            raise IpamLinkError(f"IPAM state in {config.state_dir} cannot be used ({exc}); "
                                f"restore it, or run `weavepy reset` to start as a new member"
                                ) from None
        if identity.cluster_id and self.core.cluster_id and \
                identity.cluster_id != self.core.cluster_id:
            raise IpamLinkError(
                f"the identity in {config.state_dir} says cluster {identity.cluster_id} but the "
                f"IPAM state says {self.core.cluster_id}; run `weavepy reset` to start afresh")
        self.delegate = IpamDelegate(self)
        self.drops: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self._send, self._receive = trio.open_memory_channel[tuple[str, Any]](INBOX_SIZE)
        self._lock = trio.Lock()
        self._svc: GossipService | None = None
        self._blocks: dict[str, list[IPv4Network]] = {}
        self._removed: dict[str, MemberRemoved] = {}
        self._removed_event = trio.Event()
        self._blocks_event = trio.Event()
        self._address_waits: dict[tuple[str, str], float] = {}  # ADDs waiting: their deadline
        self._cluster_id = self.core.cluster_id
        self.trio_token: trio.lowlevel.TrioToken | None = None
        self._meta_tag = ""
        self._refreshed_seq: int | None = None
        self._refresh_blocks(notify=False)

    # -- inputs (non-blocking; from the delegate and the membership task) ----------------------

    def attach(self, svc: GossipService) -> None:
        self._svc = svc

    def enqueue(self, item: tuple[str, Any]) -> None:
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self.drops["inbox_full"] += 1

    def member_alive(self, name: str, tags: Mapping[str, str]) -> None:
        """`tags` are the member's gossip tags: its IPAM tag (`TAG_KEY`) says which cluster
        and generation its current process speaks as."""
        self.enqueue(("alive", (name, tags.get(TAG_KEY))))

    def member_dead(self, name: str) -> None:
        self.enqueue(("dead", name))

    def node_deleted(self, member: str, node: str) -> None:
        """Kubernetes deleted Node `node`, which was member `member` (weavepy.kube)."""
        self.enqueue(("deleted", (member, node)))

    def nodes_listed(self, members: Collection[str]) -> None:
        """These members' Nodes are listed: forget an earlier deletion of any of them."""
        self.enqueue(("listed", frozenset(members)))

    def member_names(self) -> list[str]:
        """The members of the decided state (alive or not)."""
        cluster = self.core.cluster
        return sorted(cluster.members) if cluster is not None else []

    # -- reading ---------------------------------------------------------------------------------

    @property
    def cluster_id(self) -> str | None:
        return self._cluster_id

    def blocks_by_node(self) -> dict[str, list[IPv4Network]]:
        """Every member's blocks as the decided state records them (dead members included)."""
        return self._blocks

    def status(self) -> IpamStatus:
        return self.core.status(trio.current_time())

    def state_name(self) -> str:
        return self.status().state.value

    def status_json(self) -> dict[str, Any]:
        return status_document(self.status(), self.allocator.usage(), self.drops)

    def _refresh_blocks(self, notify: bool = True) -> None:
        """Re-read the blocks, cluster id and tag after a change of the core's state (`seq`);
        a batch that changed nothing (a member event, a refused message) costs nothing here."""
        if self.core.seq == self._refreshed_seq:
            return
        self._refreshed_seq = self.core.seq
        now = trio.current_time() if notify else 0.0
        status = self.core.status(now)
        blocks = {m.name: [IPv4Network(b) for b in m.blocks] for m in status.members if m.blocks}
        if blocks != self._blocks:
            self._blocks = blocks
            event, self._blocks_event = self._blocks_event, trio.Event()
            event.set()
            if notify:
                self.on_table_change()
        if status.cluster_id != self._cluster_id and status.cluster_id is not None:
            self._cluster_id = status.cluster_id
            if notify:
                self.on_cluster_id(status.cluster_id)
        tag = self.core.meta_tag
        if tag != self._meta_tag:
            self._meta_tag = tag
            if notify:
                self.on_tag_change()

    def tags(self) -> dict[str, str]:
        """What this node publishes about its IPAM standing in its gossip meta."""
        return {TAG_KEY: self._meta_tag} if self._meta_tag else {}

    # -- the driver task -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.trio_token = trio.lowlevel.current_trio_token()
        async with self._lock:
            self.allocator.drop_lost_blocks()
            await self._flush()
        task_status.started()
        while True:
            deadline = self.core.next_deadline()
            items: list[tuple[str, Any]] = []
            with trio.move_on_at(math.inf if deadline is None else deadline):
                items.append(await self._receive.receive())
            while len(items) < BATCH:
                try:
                    items.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            async with self._lock:
                now = trio.current_time()
                for item in items:
                    self._feed(item, now)
                deadline = self.core.next_deadline()
                if deadline is not None and deadline <= now:
                    self.core.handle_timer(now)
                await self._flush()

    def _feed(self, item: tuple[str, Any], now: float) -> None:
        kind, value = item
        try:
            if kind == "message":
                self.core.on_message(None, value, now)
            elif kind == "state":
                self.core.merge_remote_state(value, now)
            elif kind == "alive":
                name, ipam_tag = value
                self.core.on_member_alive(name, now, ipam_tag=ipam_tag)
            elif kind == "dead":
                self.core.on_member_dead(value, now)
            elif kind == "deleted":
                member, node = value
                log.warning("Kubernetes deleted node %s: %s", node,
                            self.core.node_deleted(member, now))
            elif kind == "listed":
                for name in sorted(value & self.core.wishes.deleted.keys()):
                    log.warning("Kubernetes lists the node of %s again: it is not removed "
                                "early", name)
                    self.core.node_restored(name, now)
        except IpamDecodeError as exc:
            self.drops[f"decode_{exc.reason}"] += 1
            log.debug("dropped an IPAM %s: %s", kind, exc)

    def _want_space(self, now: float) -> None:
        """A node without blocks asks for one (before it is even a member, so the claim follows
        its join at once): every node but an observer gets a pod block at launch, and again
        after a removal."""
        if not self.observer and not self.core.held_blocks():
            status = self.core.status(now)
            if status.pending_block_requests == 0 and status.state not in (
                    IpamState.OUT_OF_SPACE, IpamState.OWNED_BY_UNREACHABLE_PEERS):
                self.core.request_block(now)

    async def _flush(self) -> None:
        """Persist, then release messages and events (caller holds the lock)."""
        core, allocator = self.core, self.allocator
        self._want_space(trio.current_time())
        if core.persist_needed:
            snapshot = core.snapshot()
            try:
                await trio.to_thread.run_sync(self.core_file.save, snapshot)
            except OSError as exc:
                # Nothing the core produced may leave before its state is on disk: hold it all
                # back (the core's own timers bring us here again to retry).
                self.drops["persist_failed"] += 1
                log.error("cannot save IPAM state to %s: %s; holding back IPAM messages until "
                          "it works", self.core_file.path, exc)
                return
            core.mark_persisted(int(snapshot["seq"]))
        for outgoing in core.messages_to_send():
            self._send_out(outgoing.to, outgoing.payload)
        for event in core.events():
            self._on_event(event)
        if allocator.persist_needed:
            await self._persist_pods()
        self._refresh_blocks()

    async def _persist_pods(self) -> None:
        snapshot = self.allocator.snapshot()
        try:
            await trio.to_thread.run_sync(self.pods_file.save, snapshot)
        except OSError as exc:  # the CNI request that changed it fails (see `allocate`)
            self.drops["persist_failed"] += 1
            log.error("cannot save pod allocations in %s: %s", self.config.state_dir, exc)
            return
        self.allocator.mark_persisted(int(snapshot["seq"]))

    async def flush(self) -> None:
        """Persist whatever is pending (on the way out)."""
        async with self._lock:
            await self._flush()

    def _send_out(self, to: str | None, payload: bytes) -> None:
        """Direct messages by the gossip layer's reliable stream; a broadcast as one reliable
        stream to each live member. (memberlist gossips a user broadcast only a few times
        and receivers do not pass it on, so with 5 nodes one of them misses a decision about
        one time in four and lags until the next push/pull; IPAM decisions must not.)"""
        svc = self._svc
        if svc is None:
            self.drops["send_before_gossip"] += 1
            return
        if to is None:
            targets = [m.name for m in svc.members()
                       if m.name != svc.name and m.state in (MemberState.ALIVE,
                                                              MemberState.SUSPECT)]
            self.sent["broadcast"] += 1
        else:
            targets = [to]
        for target in targets:
            try:
                svc.send_user_message(payload, to=target, reliable=True)
                self.sent["stream"] += 1
            except LookupError:
                self.drops["send_to_unknown_member"] += 1
            except (ValueError, RuntimeError) as exc:
                self.drops["send_failed"] += 1
                log.warning("cannot send an IPAM message to %s: %s", target, exc)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, ClusterFounded):
            log.warning("founded a new cluster %s", event.cluster_id)
        elif isinstance(event, ClusterJoined):
            log.info("IPAM member of cluster %s (generation %d)", event.cluster_id,
                     event.generation)
        elif isinstance(event, BlockAcquired):
            log.info("claimed block %s", event.block)
        elif isinstance(event, BlockLost):
            log.warning("lost block %s: %s", event.block, event.reason)
            for lost in self.allocator.drop_lost_blocks():
                log.warning("pod address %s of %s/%s is gone with its block", lost.address,
                            lost.container_id[:12], lost.ifname)
        elif isinstance(event, LeaseChanged):
            log.log(logging.INFO if event.valid else logging.WARNING, "IPAM lease %s",
                    "valid: may hand out addresses" if event.valid else
                    "lapsed: no new addresses until a majority of voters confirms it")
        elif isinstance(event, MemberRemoved):
            log.warning("member %s (generation %d) removed: %s; freed %s, quarantined %s",
                        event.name, event.generation, event.reason,
                        [str(b) for b in event.freed] or "none",
                        [str(b) for b in event.quarantined] or "none")
            self._removed[event.name] = event
            done, self._removed_event = self._removed_event, trio.Event()
            done.set()
        elif isinstance(event, RemovedFromCluster):
            log.error("THIS NODE WAS REMOVED from the cluster (%s): %s", event.reason,
                      event.message)
            self.allocator.drop_lost_blocks()
        elif isinstance(event, ClusterMismatch):
            log.error("cluster mismatch with %s: %s", event.peer, event.message)
        elif isinstance(event, SlotDecided):
            log.debug("IPAM slot %d decided (%s)", event.slot,
                      "by us" if event.proposed_here else "by a peer")

    # -- requests from the API -------------------------------------------------------------------

    async def rmpeer(self, name: str, force: bool) -> dict[str, Any]:
        async with self._lock:
            self._removed.pop(name, None)
            try:
                message = self.core.rmpeer(name, trio.current_time(), force)
            except RmpeerError as exc:
                raise IpamLinkError(str(exc)) from None
            await self._flush()
        log.warning("rmpeer %s%s: %s", name, " (forced)" if force else "", message)
        while name not in self._removed:
            await self._removed_event.wait()
        removed = self._removed[name]
        return {"message": message, "removed": name, "generation": removed.generation,
                "freed": [str(b) for b in removed.freed],
                "quarantined": [str(b) for b in removed.quarantined]}

    async def leave(self) -> dict[str, Any]:
        """Give this node's blocks back to the cluster (a decided `Leave`, like Weave's
        DELETE /peer) and wait for the decision: for `weavepy reset`. IpamLinkError, with
        nothing proposed, when no majority of voters is reachable."""
        name = self.config.name
        async with self._lock:
            now = trio.current_time()
            status = self.core.status(now)
            if status.generation is None:
                return {"left": name, "generation": None, "freed": [],
                        "message": f"{name} is not an IPAM member ({status.state.value}: "
                                   f"{status.detail}): it holds no blocks to give back"}
            if status.voters_reachable < status.quorum:
                raise IpamLinkError(
                    f"only {status.voters_reachable} of {len(status.voters)} voters are "
                    f"reachable from {name}, not a majority: it cannot give its blocks back "
                    f"now; its blocks stay its own until `weavepy rmpeer {name}` runs on a "
                    f"node of the majority (or the automatic reclaim)")
            self._removed.pop(name, None)
            self.core.leave(now)
            await self._flush()
        log.warning("leaving IPAM cluster %s: giving back %s", status.cluster_id,
                    [str(b) for b in status.held_blocks] or "no blocks")
        while name not in self._removed:
            await self._removed_event.wait()
        removed = self._removed[name]
        freed = [str(b) for b in removed.freed]
        return {"left": name, "generation": removed.generation, "freed": freed,
                "message": f"{name} left IPAM cluster {status.cluster_id}; the voters freed "
                           f"{', '.join(freed) or 'no blocks'}"}

    # -- pod addresses (called on the trio loop by CniAllocator) ---------------------------------

    async def allocate(self, container_id: str, ifname: str
                       ) -> Allocation | Callable[[], Awaitable[None]]:
        """One attempt at the attachment's address: the allocation, or, while the node waits
        for a block it asked for, a wait to await before the next attempt (until the blocks
        change, or `ADDRESS_WAIT` after the first attempt). Raises `NoAddress` when there is
        none to wait for, or no more waiting."""
        if self.observer:
            raise NoAddress(Unavailable(IpamState.OUT_OF_SPACE, (
                "this node is an IPAM observer (IPALLOC_INIT=observer): it owns no pod space; "
                "run pods on other nodes, or relaunch it without --ipalloc-init observer")))
        key = (container_id, ifname)
        async with self._lock:
            result = self.allocator.add(container_id, ifname, trio.current_time())
            blocks_changed = self._blocks_event  # set by the next change, even one before
            await self._flush()                  # the caller starts to wait
            if self.allocator.persist_needed:
                self._address_waits.pop(key, None)
                raise NoAddress(Unavailable(self.core.status(trio.current_time()).state,
                                            f"cannot save pod allocations in "
                                            f"{self.config.state_dir}"))
        if isinstance(result, Allocation):
            self._address_waits.pop(key, None)
            return result
        now = trio.current_time()
        deadline = self._address_waits.setdefault(key, now + ADDRESS_WAIT)
        if now >= deadline or result.state in (IpamState.OUT_OF_SPACE,
                                               IpamState.OWNED_BY_UNREACHABLE_PEERS):
            self._address_waits.pop(key, None)
            raise NoAddress(result)

        async def wait_for_blocks() -> None:
            with trio.move_on_at(deadline):
                await blocks_changed.wait()

        return wait_for_blocks

    async def lookup(self, container_id: str, ifname: str) -> Allocation | None:
        return self.allocator.get(container_id, ifname)

    async def release(self, container_id: str, ifname: str) -> Allocation | None:
        async with self._lock:
            released = self.allocator.release(container_id, ifname)
            await self._flush()
        return released

    async def gc(self, valid: list[tuple[str, str]]) -> list[Allocation]:
        async with self._lock:
            freed = self.allocator.gc(valid)
            await self._flush()
        return freed

def founding(init: IpallocInit | None) -> dict[str, Any]:
    """The core's founding rule for Weave's IPALLOC_INIT (docs/migrating-from-weave.md)."""
    if init is None:
        return {}
    if init.mode == "consensus" and init.count is not None:
        return {"found_quorum": init.count // 2 + 1}
    if init.mode == "seed":
        return {"founders": frozenset(init.seeds)}
    return {"founders": frozenset()}  # observer


class NoAddress(Exception):
    """No address for a CNI ADD, and no more waiting for one (either IPAM mode)."""

    def __init__(self, unavailable: Unavailable) -> None:
        super().__init__(f"{unavailable.state.value}: {unavailable.detail}")
        self.unavailable = unavailable


class CniAllocator:
    """The CNI backend's `PodAllocator`, on the CNI worker thread, backed by the agent's IPAM
    (`IpamLink` or `weavepy.kube_ipam.KubeIpam`)."""

    def __init__(self, link: NodeIpam, token: Any) -> None:
        self._link = link
        self._token = token

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    @staticmethod
    def _pod_address(allocation: Allocation) -> Any:
        from weavepy.cni.backend import PodAddress

        return PodAddress(IPv4Interface(allocation.interface), IPv4Address(allocation.gateway))

    def allocate(self, attachment: Any, owner: str) -> tuple[Any, bool]:
        from weavepy.cni.backend import AddressesExhausted
        from weavepy.cni.server import AnswerLater

        try:
            allocation, fresh = self._run(self._allocate, attachment.container_id,
                                          attachment.ifname)
        except NoAddress as exc:
            raise AddressesExhausted(str(exc)) from None
        if not isinstance(allocation, Allocation):
            raise AnswerLater(allocation)
        return self._pod_address(allocation), fresh

    async def _allocate(self, container_id: str, ifname: str
                        ) -> tuple[Allocation | Callable[[], Awaitable[None]], bool]:
        """The link's answer and whether it is a new address, in one hop onto the loop."""
        held = await self._link.lookup(container_id, ifname)
        allocation = await self._link.allocate(container_id, ifname)
        fresh = isinstance(allocation, Allocation) and (
            held is None or held.address != allocation.address)
        return allocation, fresh

    def lookup(self, attachment: Any) -> Any:
        found = self._run(self._link.lookup, attachment.container_id, attachment.ifname)
        return None if found is None else self._pod_address(found)

    def release(self, attachment: Any) -> Any:
        released = self._run(self._link.release, attachment.container_id, attachment.ifname)
        return None if released is None else self._pod_address(released)

    def attachments(self) -> Iterable[Any]:
        from weavepy.cni.protocol import Attachment

        allocations = self._run(self._allocations)
        return [Attachment(a.container_id, a.ifname) for a in allocations]

    async def _allocations(self) -> list[Allocation]:
        return self._link.allocator.allocations()

    def free_count(self) -> int:
        return int(self._run(self._free_count))

    async def _free_count(self) -> int:
        usage = self._link.allocator.usage()
        return sum(capacity - used for used, capacity in usage.values())
