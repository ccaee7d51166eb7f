"""The agent's pod-network backend: pod addresses from an allocator, interfaces from `podnet`.

This module owns the meaning of each CNI command for weavepy (what ADD, DEL, CHECK, STATUS and
GC do) and maps failures to the spec's error codes. The rule it keeps: **an attachment's
address and its veth pair live and die together**: ADD releases a fresh address if the kernel
work fails, DEL removes the pair before it frees the address (so an address is never handed
out while a pod still holds it), and GC removes both for every attachment the runtime no
longer lists.

The allocator is anything that satisfies `PodAllocator` (pod addresses keyed by attachment,
idempotent allocation). `StaticBlockAllocator` serves one fixed block from a JSON state file;
the standalone server and the tests use it, and the agent plugs in its IPAM instead.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from weavepy.cni.podnet import (
    DEFAULT_ROUTE,
    NetnsError,
    PodNetError,
    PodNetwork,
    PodRoute,
    PodSpec,
    host_veth_name,
)
from weavepy.cni.protocol import Attachment, CniError, CniRequest, ErrorCode
from weavepy.cni.result import Interface, IPConfig, Result, Route, chain
from weavepy.fileio import atomic_write

log = logging.getLogger(__name__)


class AddressesExhausted(Exception):
    """The allocator has no free pod address right now."""


@dataclass(frozen=True)
class PodAddress:
    """A pod's address with its block's prefix length, and the block's gateway."""

    address: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address


class PodAllocator(Protocol):
    def allocate(self, attachment: Attachment, owner: str) -> tuple[PodAddress, bool]:
        """The attachment's address, allocating one if it has none (idempotent), and whether
        it is new (held by no one before this call: an ADD that fails releases only that)."""

    def lookup(self, attachment: Attachment) -> PodAddress | None: ...

    def release(self, attachment: Attachment) -> PodAddress | None:
        """Free the attachment's address; None if it had none (idempotent)."""

    def attachments(self) -> Iterable[Attachment]: ...

    def free_count(self) -> int: ...


@dataclass(frozen=True)
class PodLinkSettings:
    """How pod veths are built: MTU from the overlay, gso limits from the tunnel (the pod
    veth's gso_max_size must not exceed the encrypted TUN's)."""

    mtu: int = 1500
    gso_max_size: int | None = None
    gso_max_segs: int | None = None


# --- a one-block allocator --------------------------------------------------------------------


@dataclass
class StaticBlockAllocator:
    """Pod addresses from one block, persisted as JSON in `state_dir`.

    The block's first host address is the gateway (the bridge's address); the rest are handed
    out round-robin after the last one given, as host-local does, so a just-freed address is
    not reused at once. Every change replaces the file with `fileio.atomic_write` (durably), so
    it is always whole and a pod's address survives a power cut.
    """

    block: ipaddress.IPv4Network
    state_dir: Path
    _owners: dict[Attachment, tuple[ipaddress.IPv4Address, str]] = field(default_factory=dict)
    _last: int = 0

    def __post_init__(self) -> None:
        if self.block.prefixlen > 29:
            raise ValueError(f"block {self.block} is too small for pods")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._load()

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.block.network_address + 1

    @property
    def state_file(self) -> Path:
        return self.state_dir / f"pods-{self.block.network_address}-{self.block.prefixlen}.json"

    def _load(self) -> None:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return
        for entry in data.get("allocations", []):
            attachment = Attachment(entry["containerID"], entry["ifname"])
            self._owners[attachment] = (ipaddress.IPv4Address(entry["ip"]), entry.get("owner", ""))
        self._last = int(data.get("last", 0))

    def _save(self) -> None:
        data = {
            "block": str(self.block),
            "last": self._last,
            "allocations": [
                {"containerID": a.container_id, "ifname": a.ifname, "ip": str(ip), "owner": owner}
                for a, (ip, owner) in sorted(self._owners.items(), key=lambda kv: kv[1][0])
            ],
        }
        atomic_write(self.state_file, json.dumps(data).encode())

    def _address(self, ip: ipaddress.IPv4Address) -> PodAddress:
        return PodAddress(ipaddress.IPv4Interface(f"{ip}/{self.block.prefixlen}"), self.gateway)

    def allocate(self, attachment: Attachment, owner: str) -> tuple[PodAddress, bool]:
        held = self._owners.get(attachment)
        if held is not None:
            return self._address(held[0]), False
        used = {ip for ip, _ in self._owners.values()}
        first = int(self.gateway) + 1
        last = int(self.block.broadcast_address) - 1
        size = last - first + 1
        start = self._last + 1 if first <= self._last < last else first
        for step in range(size):
            candidate = ipaddress.IPv4Address(first + (start - first + step) % size)
            if candidate not in used:
                self._owners[attachment] = (candidate, owner)
                self._last = int(candidate)
                self._save()
                return self._address(candidate), True
        raise AddressesExhausted(f"block {self.block} has no free address")

    def lookup(self, attachment: Attachment) -> PodAddress | None:
        held = self._owners.get(attachment)
        return None if held is None else self._address(held[0])

    def release(self, attachment: Attachment) -> PodAddress | None:
        held = self._owners.pop(attachment, None)
        if held is None:
            return None
        self._save()
        return self._address(held[0])

    def attachments(self) -> list[Attachment]:
        return list(self._owners)

    def free_count(self) -> int:
        return self.block.num_addresses - 3 - len(self._owners)


# --- the backend ------------------------------------------------------------------------------


class BridgeBackend:
    """`PodNetworkBackend` for weavepy: pods on the node bridge, addresses from `allocator`.

    Blocking (netlink and file I/O); the CNI server calls it from one worker thread.
    """

    def __init__(self, allocator: PodAllocator, *, bridge: str,
                 settings: PodLinkSettings | None = None,
                 podnet: PodNetwork | None = None) -> None:
        self.allocator = allocator
        self.bridge = bridge
        self.settings = settings or PodLinkSettings()
        self.podnet = podnet or PodNetwork()

    def close(self) -> None:
        self.podnet.close()

    def add(self, request: CniRequest) -> Result:
        attachment = request.attachment
        owner = request.pod.label() if request.pod else request.container_id
        try:
            pod, fresh = self.allocator.allocate(attachment, owner)
        except AddressesExhausted as exc:
            raise CniError(ErrorCode.TRY_AGAIN_LATER, "no free pod address on this node",
                           str(exc)) from None
        routes = (PodRoute(DEFAULT_ROUTE, pod.gateway),)
        spec = PodSpec(
            container_id=request.container_id, ifname=request.ifname, netns=request.netns,
            bridge=self.bridge, address=pod.address, routes=routes, mtu=self.settings.mtu,
            gso_max_size=self.settings.gso_max_size, gso_max_segs=self.settings.gso_max_segs,
            mac=request.config.runtime_config.mac,
        )
        try:
            built = self.podnet.add_pod(spec)
        except BaseException as exc:
            if fresh:
                self.allocator.release(attachment)
            if isinstance(exc, PodNetError):
                raise self._cni_error(exc, "ADD") from None
            raise
        log.info("ADD %s/%s -> %s (%s)", request.container_id[:12], request.ifname,
                 pod.address, owner)
        ours = Result(
            interfaces=(
                Interface(name=built.bridge, mac=built.bridge_mac),
                Interface(name=built.host_ifname, mac=built.host_mac),
                Interface(name=built.container_ifname, mac=built.container_mac,
                          sandbox=built.sandbox, mtu=built.mtu),
            ),
            ips=(IPConfig(address=pod.address, gateway=pod.gateway, interface=2),),
            routes=tuple(Route(dst=r.dst, gw=r.gateway) for r in routes),
            dns=request.config.dns,
        )
        return chain(request.config.prev_result, ours)

    def delete(self, request: CniRequest) -> None:
        try:
            self.podnet.delete_pod(request.container_id, request.ifname)
        except PodNetError as exc:
            raise self._cni_error(exc, "DEL") from None
        released = self.allocator.release(request.attachment)
        log.info("DEL %s/%s%s", request.container_id[:12], request.ifname,
                 f" released {released.address.ip}" if released else " (nothing held)")

    def check(self, request: CniRequest) -> None:
        held = self.allocator.lookup(request.attachment)
        if held is None:
            raise CniError(ErrorCode.INTERNAL, "CHECK failed",
                           f"no pod address is reserved for {request.container_id}/"
                           f"{request.ifname}")
        prev = request.config.prev_result
        expected = prev.container_addresses(request.ifname, request.netns) if prev else []
        addresses = [ip.address for ip in expected]
        if held.address not in addresses:
            raise CniError(ErrorCode.INTERNAL, "CHECK failed",
                           f"the reserved address {held.address} is not in prevResult")
        routes = [PodRoute(DEFAULT_ROUTE, held.gateway)]
        try:
            self.podnet.check_pod(request.container_id, request.ifname, request.netns,
                                  self.bridge, addresses, routes)
        except PodNetError as exc:
            raise self._cni_error(exc, "CHECK") from None

    def status(self, request: CniRequest) -> None:
        bridge = self.podnet.bridge_state(self.bridge)
        if bridge is None or not bridge.up:
            raise CniError(ErrorCode.PLUGIN_NOT_AVAILABLE, "the pod bridge is not ready",
                           f"bridge {self.bridge} is missing or down")
        if self.allocator.free_count() <= 0:
            raise CniError(ErrorCode.PLUGIN_NOT_AVAILABLE, "no free pod address on this node")

    def gc(self, request: CniRequest) -> None:
        valid = request.config.valid_attachments
        errors = []
        for attachment in list(self.allocator.attachments()):
            if attachment in valid:
                continue
            try:
                self.podnet.delete_pod(attachment.container_id, attachment.ifname)
            except PodNetError as exc:
                errors.append(str(exc))
                continue
            self.allocator.release(attachment)
            log.info("GC released %s/%s", attachment.container_id[:12], attachment.ifname)
        keep = {host_veth_name(a.container_id, a.ifname) for a in valid}
        for name in self.podnet.host_veths():
            if name not in keep:
                try:
                    self.podnet.delete_link(name)
                except PodNetError as exc:
                    errors.append(str(exc))
        if errors:
            raise CniError(ErrorCode.INTERNAL, "GC left some resources behind",
                           "; ".join(errors))

    @staticmethod
    def _cni_error(exc: PodNetError, command: str) -> CniError:
        if isinstance(exc, NetnsError):
            return CniError(ErrorCode.INVALID_NETNS, "invalid environment variable CNI_NETNS",
                            str(exc))
        return CniError(ErrorCode.INTERNAL, f"{command} failed", str(exc))
