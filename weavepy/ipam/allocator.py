"""Pod addresses out of this node's blocks: idempotent ADD, DEL, GC, and asking for more space.

This module owns the per-node table (container id, interface) -> address. The rules it keeps:

* ADD is idempotent: the same (container, ifname) gets the same address for as long as its
  block stays ours, so a retried CNI ADD never leaks or changes an address.
* New addresses come only from *usable* blocks (held by the decided state and covered by a
  valid lease, see `core.py`); an existing allocation survives a lapsed lease (the pod keeps
  running), and is dropped only when the block itself is lost.
* Reserved addresses are never handed out: the block's network address (the overlay
  device's /32), its first host (the bridge gateway, `.1` of a /24), and the IPv4 broadcast.
* Within a block, addresses are handed out next-fit (after the last one given) so a released
  address is not reused at once, which would confuse ARP caches and conntrack on peers.
* When every usable block is full the allocator asks the core for one more block and answers
  `Unavailable` with the core's state (e.g. `waiting_for_quorum`, `out_of_space`): it never
  blocks. The caller retries when a `BlockAcquired`/`LeaseChanged` event arrives.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from weavepy.ipam.blocks import BlockSpace, IPAddress, IPNetwork
from weavepy.ipam.errors import IpamDecodeError
from weavepy.ipam.status import IpamState, IpamStatus

MAX_CONTAINER_ID = 256
MAX_IFNAME = 15  # Linux IFNAMSIZ - 1
SNAPSHOT_FORMAT = 1

AttachmentKey = tuple[str, str]  # (container id, interface name inside the container)


class BlockSource(Protocol):
    """What the allocator needs from the IPAM core (IpamCore implements it)."""

    @property
    def space(self) -> BlockSpace: ...

    def held_blocks(self) -> list[int]: ...

    def usable_blocks(self, now: float) -> list[int]: ...

    def request_block(self, now: float, count: int = 1) -> IpamState: ...

    def status(self, now: float) -> IpamStatus: ...


@dataclass(frozen=True, slots=True)
class Allocation:
    container_id: str
    ifname: str
    address: IPAddress
    block: IPNetwork
    gateway: IPAddress

    @property
    def interface(self) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
        """Address with the block's prefix length, as the pod's interface carries it."""
        return ipaddress.ip_interface(f"{self.address}/{self.block.prefixlen}")


@dataclass(frozen=True, slots=True)
class Unavailable:
    """No address now; `state` and `detail` say why (shown to the CNI caller verbatim)."""

    state: IpamState
    detail: str


class PodAllocator:
    """Addresses for pod attachments, from the blocks the core says this node may use."""

    def __init__(self, source: BlockSource, *, snapshot: Mapping[str, Any] | None = None) -> None:
        self._source = source
        self._space = source.space
        self._by_key: dict[AttachmentKey, IPAddress] = {}
        self._by_address: dict[IPAddress, AttachmentKey] = {}
        self._cursor: dict[int, int] = {}  # block index -> offset of the last address handed out
        self._asked = False  # we asked the core for a block and have not withdrawn it
        self._seq = 0
        self._persisted_seq = 0
        if snapshot is not None:
            self._restore(snapshot)

    # ------------------------------------------------------------------ operations

    def add(self, container_id: str, ifname: str, now: float) -> Allocation | Unavailable:
        """CNI ADD: the attachment's address, allocating one if it has none."""
        key = _check_key(container_id, ifname)
        existing = self._by_key.get(key)
        held = set(self._source.held_blocks())
        if existing is not None:
            index = self._space.index_of(existing)
            if index in held:
                return self._allocation(key, existing)
            self._forget(key)  # its block is gone: this attachment needs a new address
        usable = self._source.usable_blocks(now)
        for index in sorted(usable):
            address = self._next_free(index)
            if address is not None:
                self._by_key[key] = address
                self._by_address[address] = key
                self._seq += 1
                if self._asked:
                    self._source.request_block(now, count=0)  # room again: withdraw the wish
                    self._asked = False
                return self._allocation(key, address)
        state = self._source.request_block(now, count=1)
        self._asked = True
        detail = self._source.status(now).detail
        if usable:
            detail = f"all {len(usable)} usable block(s) are full; asked for another ({detail})"
        return Unavailable(state, detail)

    def get(self, container_id: str, ifname: str) -> Allocation | None:
        key = _check_key(container_id, ifname)
        address = self._by_key.get(key)
        return self._allocation(key, address) if address is not None else None

    def release(self, container_id: str, ifname: str) -> Allocation | None:
        """CNI DEL: free the attachment's address; releasing twice is fine (returns None)."""
        key = _check_key(container_id, ifname)
        address = self._by_key.get(key)
        if address is None:
            return None
        allocation = self._allocation(key, address)
        self._forget(key)
        return allocation

    def gc(self, valid: Iterable[AttachmentKey]) -> list[Allocation]:
        """CNI GC: free every attachment not in `valid`; returns what was freed."""
        keep = {(c, i) for c, i in valid}
        freed = []
        for key in sorted(set(self._by_key) - keep):
            freed.append(self._allocation(key, self._by_key[key]))
            self._forget(key)
        return freed

    def drop_lost_blocks(self) -> list[Allocation]:
        """Forget attachments whose block is no longer ours (call on BlockLost, and at start)."""
        held = set(self._source.held_blocks())
        lost = []
        for key, address in sorted(self._by_key.items()):
            if self._space.index_of(address) not in held:
                lost.append(self._allocation(key, address))
        for allocation in lost:
            self._forget((allocation.container_id, allocation.ifname))
        return lost

    def moved_to(self, source: BlockSource) -> tuple[PodAllocator, list[Allocation]]:
        """A new allocator over `source` (another block size: `--ipam kubernetes` when this
        node's podCIDR changes size) that keeps every attachment whose address `source` holds
        and may give a pod; and the attachments it could not keep. Saving it is still to do
        (`persist_needed`)."""
        moved = PodAllocator(source)
        space, held = moved._space, set(source.held_blocks())
        lost = []
        for key, address in sorted(self._by_key.items()):
            index = space.index_of(address)
            if index in held and not space.is_reserved(index, address):
                moved._by_key[key] = address
                moved._by_address[address] = key
            else:
                lost.append(self._allocation(key, address))
        moved._seq = self._seq + 1
        moved._persisted_seq = self._persisted_seq
        return moved, lost

    def allocations(self) -> list[Allocation]:
        return [self._allocation(key, address) for key, address in sorted(self._by_key.items())]

    def usage(self) -> dict[IPNetwork, tuple[int, int]]:
        """Per held block: (addresses in use, addresses pods may get)."""
        capacity = self._space.pod_capacity()
        used: dict[int, int] = dict.fromkeys(self._source.held_blocks(), 0)
        for address in self._by_address:
            index = self._space.index_of(address)
            used[index] = used.get(index, 0) + 1
        return {self._space.block(i): (n, capacity) for i, n in sorted(used.items())}

    # ------------------------------------------------------------------ persistence

    @property
    def persist_needed(self) -> bool:
        return self._seq > self._persisted_seq

    def mark_persisted(self, seq: int) -> None:
        self._persisted_seq = max(self._persisted_seq, seq)

    def snapshot(self) -> dict[str, Any]:
        return {
            "format": SNAPSHOT_FORMAT,
            "seq": self._seq,
            "range": str(self._space.cluster_range),
            "block_prefix": self._space.block_prefix,
            "allocations": [[c, i, str(a)] for (c, i), a in sorted(self._by_key.items())],
            "cursors": [[b, o] for b, o in sorted(self._cursor.items())],
        }

    def _restore(self, snapshot: Mapping[str, Any]) -> None:
        try:
            if snapshot["format"] != SNAPSHOT_FORMAT:
                raise ValueError(f"unknown allocator snapshot format {snapshot['format']!r}")
            if (snapshot["range"], snapshot["block_prefix"]) != (
                str(self._space.cluster_range),
                self._space.block_prefix,
            ):
                raise ValueError("allocations were made in a different cluster range")
            for container_id, ifname, text in snapshot["allocations"]:
                key = _check_key(container_id, ifname)
                address = ipaddress.ip_address(text)
                index = self._space.index_of(address)
                if self._space.is_reserved(index, address) or address in self._by_address:
                    raise ValueError(f"{address} is reserved or allocated twice")
                self._by_key[key] = address
                self._by_address[address] = key
            for index, offset in snapshot["cursors"]:
                self._space.block(index)
                self._cursor[int(index)] = int(offset)
            self._seq = self._persisted_seq = int(snapshot["seq"])
        except (KeyError, TypeError, ValueError) as exc:
            raise IpamDecodeError("bad_allocations", f"{type(exc).__name__}: {exc}") from exc

    # ------------------------------------------------------------------ internals

    def _next_free(self, index: int) -> IPAddress | None:
        network = self._space.block(index)
        base = int(network.network_address)
        first, last = 2, self._space.block_size - (2 if network.version == 4 else 1)
        span = last - first + 1
        start = self._cursor.get(index, first - 1) + 1
        address_type = type(network.network_address)
        for step in range(span):
            offset = first + (start - first + step) % span
            candidate = address_type(base + offset)
            if candidate not in self._by_address:
                self._cursor[index] = offset
                return candidate
        return None

    def _forget(self, key: AttachmentKey) -> None:
        address = self._by_key.pop(key)
        del self._by_address[address]
        self._seq += 1

    def _allocation(self, key: AttachmentKey, address: IPAddress) -> Allocation:
        index = self._space.index_of(address)
        return Allocation(
            key[0], key[1], address, self._space.block(index), self._space.gateway(index)
        )


def _check_key(container_id: str, ifname: str) -> AttachmentKey:
    if not isinstance(container_id, str) or not 0 < len(container_id) <= MAX_CONTAINER_ID:
        raise ValueError(f"container id must be 1..{MAX_CONTAINER_ID} characters")
    if not isinstance(ifname, str) or not 0 < len(ifname) <= MAX_IFNAME or "/" in ifname:
        raise ValueError(f"interface name must be 1..{MAX_IFNAME} characters without '/'")
    return (container_id, ifname)
