"""The pods on this node, as `weavepy ps` shows them (Weave Net's `weave ps`).

This module owns joining IPAM's pod allocations (container ID, interface name and address:
what the CNI plugin asked for and got) with the kernel's view of each attachment: its
host-side veth (named from the attachment by weavepy.cni.podnet.host_veth_name) and the MAC of
the pod's end of the pair.

The rules it keeps:

* `pod_list` is pure: allocations and MACs in, the documented JSON entries out (docs/api.md,
  `GET /pods`), sorted by container ID.
* The kernel is read in a fixed number of netlink round trips, not one per pod, and no thread
  enters a pod's namespace: `read_pod_macs` dumps this namespace's links once (each host veth
  names its peer by ifindex and namespace ID: IFLA_LINK, IFLA_LINK_NETNSID), then asks for
  the peers with RTM_GETLINK requests that carry IFLA_IF_NETNSID (the kernel's
  IFLA_TARGET_NETNSID, Linux 4.20+), `batch` requests to one write.
* Read-only. A pod whose veth is gone is listed with a `problem` (its address is still
  allocated), and a peer that vanished between the two reads has no MAC; neither is an error.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR
from pyroute2.netlink.rtnl import RTM_GETLINK, RTM_NEWLINK
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from weavepy.cni.podnet import HOST_VETH_PREFIX, host_veth_name
from weavepy.ipam.allocator import Allocation

__all__ = ["PodListError", "pod_list", "read_pod_macs"]

NETLINK_ROUTE = 0
NETLINK_TIMEOUT = 5.0
BATCH = 64  # requests per write: their answers (~1.5 KiB each) fit the default receive buffer
RECV_SIZE = 1 << 18
DUMP_SEQ = 1
MISSING_VETH = ("its host veth {host} is gone, but IPAM still holds its address (the runtime's "
                "CNI DEL or GC frees it)")


class PodListError(Exception):
    """The kernel's links could not be read; the message is one sentence."""


def pod_list(allocations: Iterable[Allocation],
             macs: Mapping[str, str | None]) -> list[dict[str, Any]]:
    """One entry per attachment: `container_id`, `ifname` (the pod's side), `host_ifname`,
    `mac` (the pod side's, None when unknown), `addresses`, `gateway` and `problem` (None, or
    why the attachment is not whole). `macs` maps host veth names to the pod side's MAC, as
    `read_pod_macs` returns it."""
    entries = []
    for allocation in sorted(allocations, key=lambda a: (a.container_id, a.ifname)):
        host = host_veth_name(allocation.container_id, allocation.ifname)
        entries.append({
            "container_id": allocation.container_id,
            "ifname": allocation.ifname,
            "host_ifname": host,
            "mac": macs.get(host),
            "addresses": [str(allocation.interface)],
            "gateway": str(allocation.gateway),
            "problem": None if host in macs else MISSING_VETH.format(host=host),
        })
    return entries


def read_pod_macs(prefix: str = HOST_VETH_PREFIX, batch: int = BATCH) -> dict[str, str | None]:
    """{host veth name: MAC of its peer (the pod's interface), or None if unreadable} for every
    veth in this namespace whose name starts with `prefix`."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                         NETLINK_ROUTE)
    try:
        sock.settimeout(NETLINK_TIMEOUT)
        sock.bind((0, 0))
        links = _dump_links(sock)
        peers: dict[str, tuple[int, int]] = {}
        macs: dict[str, str | None] = {}
        by_index = {link["index"]: link for link in links}
        for link in links:
            name = link.get_attr("IFLA_IFNAME") or ""
            kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
            peer = link.get_attr("IFLA_LINK")
            if not name.startswith(prefix) or kind != "veth":
                continue
            nsid = link.get_attr("IFLA_LINK_NETNSID")
            if nsid is None:  # both ends here: the peer is in this very dump
                twin = by_index.get(peer)
                macs[name] = twin.get_attr("IFLA_ADDRESS") if twin is not None else None
            elif peer is None:
                macs[name] = None
            else:
                peers[name] = (peer, nsid)
        names = list(peers)
        for start in range(0, len(names), batch):
            chunk = names[start:start + batch]
            macs.update(_peer_macs(sock, [(name, *peers[name]) for name in chunk]))
        return macs
    except TimeoutError:
        raise PodListError(f"the kernel did not answer a link request within "
                           f"{NETLINK_TIMEOUT:.0f} s") from None
    except OSError as exc:
        raise PodListError(f"cannot read the links: {exc.strerror or exc}") from None
    finally:
        sock.close()


def _messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, sequence number, whole message) of each netlink message in `data`."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _, seq, _ = struct.unpack_from("=IHHII", data, offset)
        if length < 16:
            raise PodListError("malformed netlink reply")
        yield kind, seq, data[offset:offset + length]
        offset += (length + 3) & ~3


def _error_code(message: bytes) -> int:
    (error,) = struct.unpack_from("=i", message, 16)
    return -int(error)


def _dump_links(sock: socket.socket) -> list[Any]:
    request = ifinfmsg()
    request["header"]["type"] = RTM_GETLINK
    request["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
    request["header"]["sequence_number"] = DUMP_SEQ
    request.encode()
    sock.send(request.data)
    links: list[Any] = []
    while True:
        for kind, seq, message in _messages(sock.recv(RECV_SIZE)):
            if seq != DUMP_SEQ:
                continue
            if kind == NLMSG_DONE:
                return links
            if kind == NLMSG_ERROR:
                raise OSError(_error_code(message), "link dump refused")
            if kind == RTM_NEWLINK:
                link = ifinfmsg(message)
                link.decode()
                links.append(link)


def _peer_macs(sock: socket.socket, wanted: list[tuple[str, int, int]]
               ) -> dict[str, str | None]:
    """The MAC of each (host veth, peer ifindex, peer namespace ID) in one write."""
    first = DUMP_SEQ + 1
    data = bytearray()
    for offset, (_, index, nsid) in enumerate(wanted):
        request = ifinfmsg()
        request["header"]["type"] = RTM_GETLINK
        request["header"]["flags"] = NLM_F_REQUEST
        request["header"]["sequence_number"] = first + offset
        request["index"] = index
        request["attrs"] = [["IFLA_IF_NETNSID", nsid]]
        request.encode()
        data += request.data
    sock.send(bytes(data))
    found: dict[str, str | None] = {}
    while len(found) < len(wanted):
        for kind, seq, message in _messages(sock.recv(RECV_SIZE)):
            slot = seq - first
            if not 0 <= slot < len(wanted) or kind not in (RTM_NEWLINK, NLMSG_ERROR):
                continue
            name = wanted[slot][0]
            if kind == NLMSG_ERROR:  # the peer went away between the two reads
                found[name] = None
                continue
            link = ifinfmsg(message)
            link.decode()
            found[name] = link.get_attr("IFLA_ADDRESS")
    return found
