"""tunnel.vxlan.kernel: the IO shell of the VXLAN reconciler (theory of operation: the package
docstring, tunnel/vxlan/__init__.py).

It owns `VxlanBackend`: each pass reads every kernel table it needs once (retried when a dump
is interrupted), asks the pure plan (plan.py) for the ordered operations and applies them in
that order. The rule it keeps: a kernel error costs only its peer's later steps; only a device
that cannot be deleted, created or brought up stops the pass, reported and never raised.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from types import MappingProxyType
from typing import Any

import trio

from tunnel.netlink import (
    AF_BRIDGE,
    GONE_ERRNOS,
    IFF_UP,
    NTF_SELF,
    NUD_NOARP,
    NUD_PERMANENT,
    RT_TABLE_MAIN,
    RTNH_F_ONLINK,
    NetlinkDumpInterrupted,
    NetlinkError,
    errno_of,
    open_iproute,
)
from tunnel.vxlan.plan import (
    AddAddress,
    AddRoute,
    CreateDevice,
    DeleteAddress,
    DeleteDevice,
    DeleteFdb,
    DeleteNeighbour,
    DeleteRoute,
    DeviceState,
    KernelState,
    Neighbour,
    Op,
    Peer,
    PeerProblem,
    ReconcileReport,
    ReplaceRoute,
    RouteState,
    SetDeviceMtu,
    SetDeviceUp,
    SetFdb,
    SetNeighbour,
    UnderlayState,
    VxlanConfig,
    desired_state,
    plan,
    validate_peers,
)

__all__ = ["VxlanBackend"]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# IO shell: read the kernel


def _linkinfo(link: Any) -> tuple[str, dict[str, Any]]:
    info = link.get_attr("IFLA_LINKINFO")
    if info is None:
        return "", {}
    kind = info.get_attr("IFLA_INFO_KIND") or ""
    data = info.get_attr("IFLA_INFO_DATA")
    attrs: dict[str, Any] = {}
    if data is not None and not isinstance(data, str | bytes):
        attrs = {name: value for name, value in data.get("attrs", [])}
    return str(kind), attrs


def _device_state(link: Any) -> DeviceState:
    kind, data = _linkinfo(link)
    local = data.get("IFLA_VXLAN_LOCAL")
    return DeviceState(
        ifindex=int(link["index"]),
        kind=kind,
        vni=data.get("IFLA_VXLAN_ID"),
        port=data.get("IFLA_VXLAN_PORT"),
        local=IPv4Address(local) if local else None,
        link=data.get("IFLA_VXLAN_LINK"),
        learning=bool(data.get("IFLA_VXLAN_LEARNING", 1)),
        mac=str(link.get_attr("IFLA_ADDRESS") or "").lower(),
        mtu=int(link.get_attr("IFLA_MTU") or 0),
        up=bool(link["flags"] & IFF_UP),
    )


def _get_link(ipr: Any, **match: Any) -> Any | None:
    try:
        found = ipr.link("get", **match)
    except NetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT):
            return None
        raise
    return found[0] if found else None


class _UnderlayMissing(Exception):
    pass


def _read_underlay(ipr: Any, config: VxlanConfig, addresses: Sequence[Any]) -> UnderlayState:
    if config.underlay_iface is not None:
        link = _get_link(ipr, ifname=config.underlay_iface)
        if link is None:
            raise _UnderlayMissing(f"underlay interface {config.underlay_iface} not found")
    else:
        holders = [a["index"] for a in addresses if a.get_attr("IFA_LOCAL") == str(config.local_ip)]
        if not holders:
            raise _UnderlayMissing(f"no interface holds the local address {config.local_ip}")
        link = _get_link(ipr, index=holders[0])
        if link is None:
            raise _UnderlayMissing(f"interface {holders[0]} holding {config.local_ip} vanished")
    return UnderlayState(
        ifindex=int(link["index"]),
        name=str(link.get_attr("IFLA_IFNAME")),
        mtu=int(link.get_attr("IFLA_MTU") or 1500),
    )


def _read_kernel(ipr: Any, config: VxlanConfig) -> tuple[UnderlayState, KernelState]:
    """One request per table: device (get), addresses, neighbours, FDB and main routes (dumps)."""
    addresses = list(ipr.get_addr(family=socket.AF_INET))
    underlay = _read_underlay(ipr, config, addresses)
    link = _get_link(ipr, ifname=config.device)
    if link is None:
        return underlay, KernelState()
    device = _device_state(link)
    index = device.ifindex
    own_addresses = frozenset(
        IPv4Interface((a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS"), a["prefixlen"]))
        for a in addresses
        if a["index"] == index
    )
    neighbours: dict[IPv4Address, Neighbour] = {}
    for n in ipr.get_neighbours(family=socket.AF_INET):
        dst, mac = n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR")
        if n["ifindex"] == index and dst and mac:
            neighbours[IPv4Address(dst)] = Neighbour(
                str(mac).lower(), bool(n["state"] & NUD_PERMANENT)
            )
    fdb: dict[str, tuple[IPv4Address | None, ...]] = {}
    for n in ipr.get_neighbours(family=AF_BRIDGE):
        mac = n.get_attr("NDA_LLADDR")
        if n["ifindex"] != index or not mac:
            continue
        dst = n.get_attr("NDA_DST")
        fdb[str(mac).lower()] = (*fdb.get(str(mac).lower(), ()), IPv4Address(dst) if dst else None)
    routes: dict[tuple[IPv4Network, int], RouteState] = {}
    for r in ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_MAIN):
        table = r.get_attr("RTA_TABLE") or r["table"]
        if r.get_attr("RTA_OIF") != index or table != RT_TABLE_MAIN:
            continue
        network = IPv4Network((r.get_attr("RTA_DST") or "0.0.0.0", r["dst_len"]))
        gateway = r.get_attr("RTA_GATEWAY")
        routes[(network, int(r.get_attr("RTA_PRIORITY") or 0))] = RouteState(
            IPv4Address(gateway) if gateway else None, bool(r["flags"] & RTNH_F_ONLINK)
        )
    return underlay, KernelState(
        device=device,
        addresses=own_addresses,
        neighbours=MappingProxyType(neighbours),
        fdb=MappingProxyType(fdb),
        routes=MappingProxyType(routes),
    )


# ---------------------------------------------------------------------------------------------
# IO shell: apply operations


def _apply(ipr: Any, op: Op, ifindex: int | None) -> int | None:
    """Carry out one operation; returns the device ifindex (new after CreateDevice)."""
    if isinstance(op, CreateDevice):
        s = op.spec
        ipr.link(
            "add",
            ifname=s.name,
            kind="vxlan",
            vxlan_id=s.vni,
            vxlan_port=s.port,
            vxlan_local=str(s.local),
            vxlan_link=s.underlay_ifindex,
            vxlan_learning=0,
            address=s.mac,
            mtu=s.mtu,
            state="up",
        )
        created = _get_link(ipr, ifname=s.name)
        if created is None:
            raise OSError(errno.ENODEV, f"{s.name} vanished right after it was created")
        return int(created["index"])
    if isinstance(op, DeleteDevice):
        ipr.link("del", index=ifindex)
        return None
    if ifindex is None:
        raise OSError(errno.ENODEV, "no device")
    if isinstance(op, SetDeviceMtu):
        ipr.link("set", index=ifindex, mtu=op.mtu)
    elif isinstance(op, SetDeviceUp):
        ipr.link("set", index=ifindex, state="up")
    elif isinstance(op, AddAddress):
        ipr.addr(
            "add", index=ifindex, address=str(op.address.ip), prefixlen=op.address.network.prefixlen
        )
    elif isinstance(op, DeleteAddress):
        ipr.addr(
            "del", index=ifindex, address=str(op.address.ip), prefixlen=op.address.network.prefixlen
        )
    elif isinstance(op, SetNeighbour):
        ipr.neigh("set", ifindex=ifindex, dst=str(op.ip), lladdr=op.mac, state=NUD_PERMANENT)
    elif isinstance(op, DeleteNeighbour):
        ipr.neigh("del", ifindex=ifindex, dst=str(op.ip), lladdr=op.mac)
    elif isinstance(op, SetFdb):
        # A unicast VXLAN FDB entry has exactly one remote; "replace" sets or moves it.
        ipr.neigh(
            "replace",
            family=AF_BRIDGE,
            ifindex=ifindex,
            lladdr=op.mac,
            dst=str(op.dst),
            state=NUD_PERMANENT | NUD_NOARP,
            flags=NTF_SELF,
        )
    elif isinstance(op, DeleteFdb):
        if op.dst is None:
            ipr.fdb("del", ifindex=ifindex, lladdr=op.mac)
        else:
            ipr.fdb("del", ifindex=ifindex, lladdr=op.mac, dst=str(op.dst))
    elif isinstance(op, AddRoute | ReplaceRoute):
        # "add" is exclusive: it never overwrites a foreign route with the same key.
        command = "add" if isinstance(op, AddRoute) else "replace"
        ipr.route(
            command,
            dst=str(op.network),
            gateway=str(op.gateway),
            oif=ifindex,
            flags=RTNH_F_ONLINK,
            table=RT_TABLE_MAIN,
        )
    elif isinstance(op, DeleteRoute):
        ipr.route(
            "del", dst=str(op.network), oif=ifindex, priority=op.priority, table=RT_TABLE_MAIN
        )
    return ifindex


_DUMP_ATTEMPTS = 3
_DELETE_OPS = (DeleteDevice, DeleteAddress, DeleteNeighbour, DeleteFdb, DeleteRoute)
# Operations whose failure leaves no usable device: the pass stops there.
_DEVICE_OPS = (CreateDevice, DeleteDevice, SetDeviceUp)


class VxlanBackend:
    """Keeps one node's VXLAN device and its per-peer entries equal to the desired state.

    `reconcile` is blocking netlink IO (call it from a worker thread, or use `areconcile` under
    trio); concurrent calls are serialised. It works in the caller's network namespace, or in
    `netns` (a name under /run/netns) when given.
    """

    def __init__(self, config: VxlanConfig, *, netns: str | None = None) -> None:
        self.config = config
        self.netns = netns
        self._lock = threading.Lock()

    def reconcile(
        self, desired_peers: Iterable[Peer], local_blocks: Sequence[IPv4Network]
    ) -> ReconcileReport:
        for block in local_blocks:
            if not isinstance(block, IPv4Network):
                raise TypeError(f"local block must be an IPv4Network, got {block!r}")
        with self._lock:
            started = time.monotonic()
            report = ReconcileReport()
            try:
                self._reconcile(list(desired_peers), list(local_blocks), report)
            finally:
                report.duration_s = time.monotonic() - started
        log.debug("%s", report.summary())
        return report

    async def areconcile(
        self, desired_peers: Iterable[Peer], local_blocks: Sequence[IPv4Network]
    ) -> ReconcileReport:
        """`reconcile` in a trio worker thread (not abandoned on cancel: the calls are short)."""
        return await trio.to_thread.run_sync(self.reconcile, list(desired_peers), local_blocks)

    def _reconcile(
        self, peers: list[Peer], local_blocks: list[IPv4Network], report: ReconcileReport
    ) -> None:
        valid, report.rejected, report.idle_peers = validate_peers(peers, local_blocks, self.config)
        for problem in report.rejected:
            log.warning("vxlan: rejected %s", problem)
        try:
            ipr = open_iproute(self.netns)
        except (OSError, NetlinkError) as exc:
            report.device_error = f"cannot open netlink (netns {self.netns}): {exc}"
            return
        try:
            try:
                underlay, actual = self._read(ipr)
            except _UnderlayMissing as exc:
                report.device_error = str(exc)
                return
            except (OSError, NetlinkError) as exc:
                report.device_error = f"cannot read kernel state: {exc}"
                return
            desired = desired_state(self.config, valid, local_blocks, underlay)
            report.mtu = desired.device.mtu
            failed = self._execute(ipr, plan(desired, actual), actual, report)
            if report.device_error is None:
                report.programmed_peers = sum(1 for p in valid if p.name not in failed)
        finally:
            ipr.close()

    def _read(self, ipr: Any) -> tuple[UnderlayState, KernelState]:
        """`_read_kernel`, retried when the kernel flags a dump as interrupted by a change."""
        for _ in range(_DUMP_ATTEMPTS - 1):
            try:
                return _read_kernel(ipr, self.config)
            except NetlinkDumpInterrupted:
                continue
        return _read_kernel(ipr, self.config)

    def remove(self) -> ReconcileReport:
        """Delete our device (its routes, neighbours and FDB entries go with it): for reset."""
        with self._lock:
            started = time.monotonic()
            report = ReconcileReport()
            try:
                ipr = open_iproute(self.netns)
            except (OSError, NetlinkError) as exc:
                report.device_error = f"cannot open netlink (netns {self.netns}): {exc}"
                return report
            try:
                link = _get_link(ipr, ifname=self.config.device)
                if link is not None:
                    op = DeleteDevice(self.config.device, "removed on request")
                    try:
                        _apply(ipr, op, int(link["index"]))
                        report.changes.append(op.change())
                    except (OSError, NetlinkError) as exc:
                        if errno_of(exc) not in GONE_ERRNOS:
                            report.device_error = f"{op.change()}: {exc}"
            finally:
                ipr.close()
                report.duration_s = time.monotonic() - started
        return report

    def _execute(
        self, ipr: Any, ops: list[Op], actual: KernelState, report: ReconcileReport
    ) -> set[str]:
        ifindex = actual.device.ifindex if actual.device is not None else None
        failed: set[str] = set()
        for op in ops:
            if op.peer is not None and op.peer in failed:
                continue
            try:
                ifindex = _apply(ipr, op, ifindex)
            except (OSError, NetlinkError) as exc:
                code = errno_of(exc)
                if isinstance(op, _DELETE_OPS) and code in GONE_ERRNOS:
                    continue  # already gone: the goal holds
                if isinstance(op, _DEVICE_OPS):
                    report.device_error = f"{op.change()}: {exc}"
                    log.error("vxlan: %s", report.device_error)
                    break
                reason = "kernel-error"
                if isinstance(op, AddRoute) and code == errno.EEXIST:
                    reason = "foreign-route"
                problem = PeerProblem(op.peer, reason, f"{op.change()}: {exc}")
                report.errors.append(problem)
                log.warning("vxlan: %s", problem)
                if op.peer is not None:
                    failed.add(op.peer)
                continue
            report.changes.append(op.change())
        return failed
