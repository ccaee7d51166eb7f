"""Pod interfaces in the kernel: the node bridge, one veth pair per attachment, and checks.

This module owns every netlink operation of the CNI side. pyroute2 encodes every message;
ADD and DEL send theirs on a plain rtnetlink socket (`RtnlRequests`) because pyroute2's own
request loop costs more than the kernel work. It keeps three rules:

1. **Names are derived, never stored.** A pod's host-side veth is `wpv` + 12 hex digits of
   sha256(container ID, ifname), so DEL finds it with nothing but CNI_CONTAINERID and
   CNI_IFNAME (DEL may come with an empty CNI_NETNS), and GC can tell ours from others'.
2. **One message where the kernel allows it.** ADD creates the pair with its peer already in
   the pod's namespace under its final name, with MTU, MAC, gso limits and bridge master set
   (RTM_NEWLINK with IFLA_NET_NS_FD inside VETH_INFO_PEER), then enables hairpin on the bridge
   port, then configures the pod side: address, link up, routes. A failure part-way removes
   the pair, so an ADD either completes or leaves nothing behind. Last, the node's neighbour
   entry for the pod's address is set to the pod's MAC: an address handed out again, or a pod
   re-attached with a new veth, has a new MAC, and the node (which forwards every packet from
   other nodes to the pod) would otherwise send to the old one until its entry expires (15-45
   s). The reference `bridge` plugin sends a gratuitous ARP instead, which needs CAP_NET_RAW;
   the agent's DaemonSet does without it.
3. **The calling thread returns to its own namespace.** Work inside a pod's namespace is done
   on a netlink socket opened while the thread is briefly `setns()`-ed into it; a socket
   stays bound to the namespace it was created in. If the thread cannot get back, the process
   exits rather than touch the wrong namespace.

The bridge gets a fixed MAC at creation: a Linux bridge without one takes the lowest MAC of its
ports, so pods' ARP entries for the gateway would go stale whenever a port comes or goes.

Blocking calls: use one `PodNetwork` from one thread (the CNI server runs it on its worker).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import ipaddress
import logging
import os
import secrets
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink import (
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
)
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTM_DELLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RTM_SETLINK,
)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

log = logging.getLogger(__name__)

HOST_VETH_PREFIX = "wpv"
CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # ioctl on an nsfs file: which kind of namespace it is
IFF_UP = 0x1
AF_BRIDGE = 7
NUD_STALE = 0x04
NETLINK_ROUTE = 0
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
BRIDGE_MODE_HAIRPIN = 1
NETLINK_TIMEOUT = 10.0
DEFAULT_ROUTE = ipaddress.IPv4Network("0.0.0.0/0")


class PodNetError(Exception):
    """A kernel operation for a pod failed; the message says which and why."""


class NetnsError(PodNetError):
    """CNI_NETNS does not name a usable network namespace."""


class CheckFailed(PodNetError):
    """CHECK found the pod's network differs from what ADD set up."""


class _BridgeGone(PodNetError):
    """Creating a port was refused with EINVAL: most likely the cached bridge ifindex is gone
    because the bridge was recreated."""


def host_veth_name(container_id: str, ifname: str) -> str:
    """The host end of an attachment's veth pair: fixed prefix + hash, 15 characters."""
    digest = hashlib.sha256(f"{container_id}\0{ifname}".encode()).hexdigest()
    return HOST_VETH_PREFIX + digest[:12]


def random_mac() -> str:
    """A random locally administered unicast MAC."""
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


IP_FORWARD_SYSCTL = "/proc/sys/net/ipv4/ip_forward"


def enable_ip_forwarding(path: str = IP_FORWARD_SYSCTL) -> None:
    """Make sure IPv4 forwarding is on: read the sysctl first and write it only if it is
    off, so an unprivileged agent (read-only /proc/sys; the init container set it) works.
    PodNetError with the fix if it is off and cannot be turned on."""
    with open(path) as sysctl:
        if sysctl.read().strip() == "1":
            return
    try:
        with open(path, "w") as sysctl:
            sysctl.write("1")
    except OSError as exc:
        raise PodNetError(f"IPv4 forwarding is off and {path} cannot be written "
                          f"({exc.strerror or exc}): run `sysctl -w net.ipv4.ip_forward=1` "
                          f"on the host (the DaemonSet's init container does)") from None


@dataclass(frozen=True)
class PodRoute:
    dst: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address | None = None


@dataclass(frozen=True)
class PodSpec:
    """Everything ADD needs to build one attachment."""

    container_id: str
    ifname: str
    netns: str
    bridge: str
    address: ipaddress.IPv4Interface
    routes: Sequence[PodRoute]
    mtu: int = 1500
    gso_max_size: int | None = None
    gso_max_segs: int | None = None
    mac: str = ""


@dataclass(frozen=True)
class PodInterfaces:
    """What ADD built, for the CNI result."""

    bridge: str
    bridge_mac: str
    host_ifname: str
    host_mac: str
    container_ifname: str
    container_mac: str
    sandbox: str
    mtu: int


@dataclass(frozen=True)
class BridgeState:
    index: int
    mac: str
    up: bool
    mtu: int
    addresses: tuple[ipaddress.IPv4Interface, ...] = field(default=())


class RtnlRequests:
    """Blocking rtnetlink requests on one raw socket, for ADD's and DEL's hot path.

    pyroute2's message classes encode each request; this only sends it and waits for the
    kernel's acknowledgement. pyroute2's `IPRoute` runs an event-loop round per call (~0.3 ms
    here) and ~0.5 ms to open, which is a fifth of what a pod ADD costs in the kernel; the
    rest of this module keeps using `IPRoute`. Like any socket, it stays bound to the network
    namespace it was opened in.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   NETLINK_ROUTE)
        self._sock.settimeout(NETLINK_TIMEOUT)
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def request(self, kind: int, msg: Any, flags: int = 0) -> None:
        """Send one request and wait for its ack; NetlinkError(errno) if the kernel refuses."""
        self._seq += 1
        msg["header"]["type"] = kind
        msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | flags
        msg["header"]["sequence_number"] = self._seq
        msg.encode()
        try:
            self._sock.send(msg.data)
            while True:
                data = self._sock.recv(65536)
                offset = 0
                while offset + 20 <= len(data):
                    length, reply, _, seq, _ = struct.unpack_from("=IHHII", data, offset)
                    if reply == NLMSG_ERROR and seq == self._seq:
                        (error,) = struct.unpack_from("=i", data, offset + 16)
                        if error:
                            raise NetlinkError(-error)
                        return
                    if length < 16:
                        raise PodNetError("malformed netlink reply")
                    offset += (length + 3) & ~3
        except TimeoutError:
            raise PodNetError(f"the kernel did not answer a netlink request within "
                              f"{NETLINK_TIMEOUT:.0f} s") from None

    def set_link_up(self, index: int) -> None:
        msg = ifinfmsg()
        msg["index"], msg["flags"], msg["change"] = index, IFF_UP, IFF_UP
        self.request(RTM_NEWLINK, msg)

    def add_address(self, index: int, address: ipaddress.IPv4Interface) -> None:
        msg = ifaddrmsg()
        msg["family"], msg["prefixlen"], msg["index"] = 2, address.network.prefixlen, index
        attrs = [["IFA_LOCAL", str(address.ip)], ["IFA_ADDRESS", str(address.ip)]]
        if address.network.prefixlen < 31:  # as `ip addr add ... brd +` and the Go plugins do
            attrs.append(["IFA_BROADCAST", str(address.network.broadcast_address)])
        msg["attrs"] = attrs
        self.request(RTM_NEWADDR, msg, NLM_F_CREATE | NLM_F_EXCL)

    def add_route(self, index: int, route: PodRoute) -> None:
        msg = rtmsg()
        msg["family"], msg["dst_len"], msg["table"] = 2, route.dst.prefixlen, RT_TABLE_MAIN
        msg["proto"], msg["type"] = RTPROT_BOOT, RTN_UNICAST
        msg["scope"] = RT_SCOPE_UNIVERSE if route.gateway is not None else RT_SCOPE_LINK
        attrs: list[list[Any]] = [["RTA_OIF", index]]
        if route.dst.prefixlen:
            attrs.append(["RTA_DST", str(route.dst.network_address)])
        if route.gateway is not None:
            attrs.append(["RTA_GATEWAY", str(route.gateway)])
        msg["attrs"] = attrs
        self.request(RTM_NEWROUTE, msg, NLM_F_CREATE | NLM_F_EXCL)

    def set_neighbour(self, index: int, ip: ipaddress.IPv4Address, mac: str) -> None:
        """Create or replace the neighbour entry `ip` -> `mac` on link `index`, STALE: used at
        once, confirmed by the kernel's own probe on first use."""
        msg = ndmsg()
        msg["family"], msg["ifindex"], msg["state"] = 2, index, NUD_STALE
        msg["attrs"] = [["NDA_DST", str(ip)], ["NDA_LLADDR", mac]]
        self.request(RTM_NEWNEIGH, msg, NLM_F_CREATE | NLM_F_REPLACE)

    def set_hairpin(self, index: int) -> None:
        """Hairpin on a bridge port (what `bridge link set dev X hairpin on` sends)."""
        msg = ifinfmsg()
        msg["family"], msg["index"] = AF_BRIDGE, index
        # NLA_F_NESTED matters: without it the bridge reads IFLA_PROTINFO as a bare port state
        msg["attrs"] = [("IFLA_PROTINFO", {"attrs": [["IFLA_BRPORT_MODE", BRIDGE_MODE_HAIRPIN]]},
                         NLA_F_NESTED)]
        self.request(RTM_SETLINK, msg)

    def create_veth(self, name: str, mac: str, mtu: int, master: int,
                    peer: list[list[Any]]) -> None:
        """A veth pair, this end up and on `master`; `peer` holds the peer's attributes (its
        name, namespace fd, MTU...). The peer cannot be created up: its end is not yet
        paired while it is being configured (the kernel answers ENOTCONN)."""
        msg = ifinfmsg()
        msg["flags"], msg["change"] = IFF_UP, IFF_UP
        msg["attrs"] = [
            ["IFLA_IFNAME", name], ["IFLA_ADDRESS", mac], ["IFLA_MTU", mtu],
            ["IFLA_MASTER", master],
            ["IFLA_LINKINFO", {"attrs": [
                ["IFLA_INFO_KIND", "veth"],
                ["IFLA_INFO_DATA", {"attrs": [["VETH_INFO_PEER", {"attrs": peer}]]}],
            ]}],
        ]
        self.request(RTM_NEWLINK, msg, NLM_F_CREATE | NLM_F_EXCL)

    def delete_link(self, name: str) -> None:
        msg = ifinfmsg()
        msg["attrs"] = [["IFLA_IFNAME", name]]
        self.request(RTM_DELLINK, msg)


class PodNetwork:
    """Netlink work for pods, from the namespace of the thread that created it."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._home_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        home = os.fstat(self._home_fd)
        self._home_id = (home.st_dev, home.st_ino)
        self._ipr: IPRoute | None = None
        self._rtnl: RtnlRequests | None = None
        self._bridges: dict[str, tuple[int, str]] = {}  # name -> (ifindex, MAC), see add_pod

    @property
    def ipr(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    @property
    def rtnl(self) -> RtnlRequests:
        if self._rtnl is None:
            self._rtnl = RtnlRequests()
        return self._rtnl

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._rtnl is not None:
            self._rtnl.close()
            self._rtnl = None
        if self._home_fd >= 0:
            os.close(self._home_fd)
            self._home_fd = -1

    # --- namespaces -------------------------------------------------------------------------

    @contextlib.contextmanager
    def open_netns(self, path: str) -> Iterator[int]:
        """An fd for the pod namespace at `path`, checked to be a network namespace that is
        not the agent's own."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NetnsError(f"network namespace {path} does not exist") from None
        except OSError as exc:
            raise NetnsError(f"cannot open network namespace {path}: {exc.strerror}") from None
        try:
            try:
                kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
            except OSError:
                kind = -1
            if kind != CLONE_NEWNET:
                raise NetnsError(f"{path} is not a network namespace")
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == self._home_id:
                raise NetnsError(f"{path} is the agent's own network namespace")
            yield fd
        finally:
            os.close(fd)

    def _setns(self, fd: int) -> None:
        if self._libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns: {os.strerror(err)}")

    @contextlib.contextmanager
    def inside(self, netns_fd: int) -> Iterator[None]:
        """Run the block with this thread in the namespace `netns_fd`, then return home.

        Keep the block short: open sockets (they stay bound to the namespace) and look up
        names; do the work after it.
        """
        self._setns(netns_fd)
        try:
            yield
        finally:
            try:
                self._setns(self._home_fd)
            except OSError:  # pragma: no cover - the kernel refused to let us go home
                log.critical("cannot return to the agent's network namespace; exiting")
                os._exit(70)

    def socket_in(self, netns_fd: int) -> IPRoute:
        """A netlink socket bound to the namespace `netns_fd`; the thread stays home."""
        with self.inside(netns_fd):
            return IPRoute()

    # --- the bridge -------------------------------------------------------------------------

    def bridge_state(self, name: str) -> BridgeState | None:
        links = self._get_link(name)
        if links is None:
            return None
        index = links["index"]
        addrs = tuple(
            ipaddress.IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
            for a in self.ipr.get_addr(index=index, family=2)
        )
        return BridgeState(index=index, mac=links.get_attr("IFLA_ADDRESS") or "",
                           up=bool(links["flags"] & IFF_UP), mtu=links.get_attr("IFLA_MTU"),
                           addresses=addrs)

    def _get_link(self, name: str) -> Any:
        try:
            found = self.ipr.link("get", ifname=name)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise
        return found[0] if found else None

    def ensure_bridge(self, name: str, gateway_cidrs: Iterable[str | ipaddress.IPv4Interface],
                      mtu: int, *, forwarding: bool = True) -> BridgeState:
        """Create or repair the node's pod bridge: up, `mtu`, and exactly the IPv4 gateway
        addresses given (one per block the node owns). Idempotent."""
        wanted = {ipaddress.IPv4Interface(c) for c in gateway_cidrs}
        link = self._get_link(name)
        if link is None:
            self.ipr.link("add", ifname=name, kind="bridge", address=random_mac(), mtu=mtu)
            link = self._get_link(name)
            log.info("created pod bridge %s (mtu %d)", name, mtu)
        kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
        if kind != "bridge":
            raise PodNetError(f"{name} exists but is a {kind or 'plain'} link, not a bridge")
        index = link["index"]
        if link.get_attr("IFLA_MTU") != mtu:
            self.ipr.link("set", index=index, mtu=mtu)
        if not link["flags"] & IFF_UP:
            self.ipr.link("set", index=index, state="up")
        state = self.bridge_state(name)
        assert state is not None
        present = set(state.addresses)
        for cidr in sorted(wanted - present):
            self.ipr.addr("add", index=index, address=str(cidr.ip),
                          prefixlen=cidr.network.prefixlen)
            log.info("bridge %s: added gateway %s", name, cidr)
        for cidr in sorted(present - wanted):
            self.ipr.addr("del", index=index, address=str(cidr.ip),
                          prefixlen=cidr.network.prefixlen)
            log.info("bridge %s: removed gateway %s", name, cidr)
        if forwarding:
            enable_ip_forwarding()
        final = self.bridge_state(name)
        assert final is not None
        self._bridges[name] = (final.index, final.mac)
        return final

    def _bridge(self, name: str, *, refresh: bool = False) -> tuple[int, str]:
        """The bridge's (ifindex, MAC), cached: ADD needs them on every call, and they change
        only when the bridge is recreated (then creating a port fails and we look again)."""
        if not refresh and name in self._bridges:
            return self._bridges[name]
        self._bridges.pop(name, None)
        link = self._get_link(name)
        if link is None or not link["flags"] & IFF_UP:
            raise PodNetError(f"the pod bridge {name} is missing or down")
        found = (link["index"], link.get_attr("IFLA_ADDRESS") or "")
        self._bridges[name] = found
        return found

    # --- pods -------------------------------------------------------------------------------

    def add_pod(self, spec: PodSpec) -> PodInterfaces:
        """Create the attachment's veth pair and configure the pod side (see rule 2)."""
        bridge_index, bridge_mac = self._bridge(spec.bridge)
        host_name = host_veth_name(spec.container_id, spec.ifname)
        host_mac = random_mac()
        pod_mac = spec.mac or random_mac()
        with self.open_netns(spec.netns) as ns_fd:
            peer: list[list[Any]] = [["IFLA_IFNAME", spec.ifname], ["IFLA_NET_NS_FD", ns_fd],
                                     ["IFLA_MTU", spec.mtu], ["IFLA_ADDRESS", pod_mac]]
            if spec.gso_max_size is not None:
                peer.append(["IFLA_GSO_MAX_SIZE", spec.gso_max_size])
            if spec.gso_max_segs is not None:
                peer.append(["IFLA_GSO_MAX_SEGS", spec.gso_max_segs])
            try:
                self._create_pair(spec, host_name, host_mac, bridge_index, peer)
            except _BridgeGone:
                bridge_index, bridge_mac = self._bridge(spec.bridge, refresh=True)
                self._create_pair(spec, host_name, host_mac, bridge_index, peer)
            try:
                try:
                    self.rtnl.set_hairpin(socket.if_nametoindex(host_name))
                except (NetlinkError, OSError) as exc:
                    raise PodNetError(f"enabling hairpin on {host_name} failed: {exc}") from None
                self._configure_pod_side(ns_fd, spec)
            except BaseException:
                self.delete_link(host_name)
                raise
            try:
                self.rtnl.set_neighbour(bridge_index, spec.address.ip, pod_mac)
            except NetlinkError as exc:  # the pod works without it; a reused address is late
                log.warning("setting the node's neighbour entry for %s failed: %s",
                            spec.address.ip, exc)
        return PodInterfaces(bridge=spec.bridge, bridge_mac=bridge_mac, host_ifname=host_name,
                             host_mac=host_mac, container_ifname=spec.ifname,
                             container_mac=pod_mac, sandbox=spec.netns, mtu=spec.mtu)

    def _create_pair(self, spec: PodSpec, host_name: str, host_mac: str, bridge_index: int,
                     peer: list[list[Any]]) -> None:
        for attempt in (1, 2):
            try:
                self.rtnl.create_veth(host_name, host_mac, spec.mtu, bridge_index, peer)
                return
            except NetlinkError as exc:
                if exc.code == errno.EINVAL and attempt == 1:
                    raise _BridgeGone(f"creating veth {host_name} on bridge {spec.bridge} "
                                      f"failed: {exc}") from None
                if exc.code != errno.EEXIST:
                    raise PodNetError(f"creating veth {host_name} / {spec.ifname} failed: "
                                      f"{exc}") from None
                if attempt == 1 and self.delete_link(host_name):
                    # A stale pair of this same attachment (an ADD without DEL): replace it.
                    log.warning("replaced stale veth %s of %s/%s", host_name,
                                spec.container_id, spec.ifname)
                    continue
                raise PodNetError(f"interface {spec.ifname} already exists in "
                                  f"{spec.netns}") from None

    def _configure_pod_side(self, ns_fd: int, spec: PodSpec) -> None:
        with self.inside(ns_fd):
            pod = RtnlRequests()
            try:
                index = socket.if_nametoindex(spec.ifname)
            except OSError:
                pod.close()
                raise PodNetError(f"{spec.ifname} did not appear in {spec.netns}") from None
        try:
            pod.add_address(index, spec.address)
            pod.set_link_up(index)
            for route in spec.routes:
                try:
                    pod.add_route(index, route)
                except NetlinkError as exc:
                    # a second attachment in the same namespace on the same network
                    if exc.code != errno.EEXIST:
                        raise
                    log.info("route %s already present in %s", route.dst, spec.netns)
        except NetlinkError as exc:
            raise PodNetError(f"configuring {spec.ifname} in {spec.netns} failed: "
                              f"{exc}") from None
        finally:
            pod.close()

    def delete_link(self, name: str) -> bool:
        """Delete a link by name; False if it was not there."""
        try:
            self.rtnl.delete_link(name)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise PodNetError(f"deleting {name} failed: {exc}") from None
        return True

    def delete_pod(self, container_id: str, ifname: str) -> bool:
        """Remove an attachment's veth pair (both ends go together). Idempotent: False when it
        was already gone, e.g. because the runtime deleted the pod's namespace first."""
        return self.delete_link(host_veth_name(container_id, ifname))

    def host_veths(self) -> list[str]:
        """Names of all host-side pod veths (ours by prefix) in this namespace."""
        names = []
        for link in self.ipr.get_links():
            name = link.get_attr("IFLA_IFNAME") or ""
            kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
            if name.startswith(HOST_VETH_PREFIX) and kind == "veth":
                names.append(name)
        return names

    def check_pod(self, container_id: str, ifname: str, netns: str, bridge: str,
                  addresses: Iterable[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
                  routes: Iterable[PodRoute]) -> None:
        """Raise `CheckFailed` unless the attachment's veth pair exists, its host end is on
        `bridge`, and the pod side is up with `addresses` and `routes`."""
        host_name = host_veth_name(container_id, ifname)
        host = self._get_link(host_name)
        if host is None:
            raise CheckFailed(f"host veth {host_name} of {container_id}/{ifname} is missing")
        bridge_state = self.bridge_state(bridge)
        if bridge_state is None or host.get_attr("IFLA_MASTER") != bridge_state.index:
            raise CheckFailed(f"host veth {host_name} is not attached to bridge {bridge}")
        with self.open_netns(netns) as ns_fd:
            nsr = self.socket_in(ns_fd)
            try:
                self._check_inside(nsr, ifname, netns, addresses, routes)
            finally:
                nsr.close()

    @staticmethod
    def _check_inside(nsr: IPRoute, ifname: str, netns: str,
                      addresses: Iterable[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
                      routes: Iterable[PodRoute]) -> None:
        try:
            link = nsr.link("get", ifname=ifname)[0]
        except (NetlinkError, IndexError):
            raise CheckFailed(f"interface {ifname} is missing in {netns}") from None
        if link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") != "veth":
            raise CheckFailed(f"{ifname} in {netns} is not a veth")
        if not link["flags"] & IFF_UP:
            raise CheckFailed(f"{ifname} in {netns} is down")
        index = link["index"]
        present = {
            ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
            for a in nsr.get_addr(index=index)
        }
        for address in addresses:
            if address not in present:
                raise CheckFailed(f"address {address} is missing on {ifname} in {netns}")
        installed = set()
        for r in nsr.get_routes(family=2, table=254):
            dst_text = r.get_attr("RTA_DST") or "0.0.0.0"
            gw_text = r.get_attr("RTA_GATEWAY")
            installed.add(PodRoute(ipaddress.IPv4Network(f"{dst_text}/{r['dst_len']}"),
                                   ipaddress.IPv4Address(gw_text) if gw_text else None))
        for route in routes:
            if route not in installed:
                via = f" via {route.gateway}" if route.gateway else ""
                raise CheckFailed(f"route {route.dst}{via} is missing in {netns}")


def ensure_bridge(name: str, gateway_cidrs: Iterable[str | ipaddress.IPv4Interface],
                  mtu: int, *, forwarding: bool = True) -> BridgeState:
    """Create or repair the node's pod bridge in the caller's namespace (see
    `PodNetwork.ensure_bridge`)."""
    net = PodNetwork()
    try:
        return net.ensure_bridge(name, gateway_cidrs, mtu, forwarding=forwarding)
    finally:
        net.close()
