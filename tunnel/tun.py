"""TUN devices for the userspace data paths: open, offloads, virtio-net headers, sizing.

A TUN opened here is always IFF_TUN | IFF_NO_PI (raw IP packets, no packet-info prefix) and,
for the fast path, IFF_VNET_HDR: every read and write starts with a 10-byte
`struct virtio_net_hdr`. With offloads enabled through TUNSETOFFLOAD (checksum, TSO4/6, TSO
with ECN) the kernel hands us TCP super-packets of up to 64 KB with a partial checksum, and
accepts them back the same way; docs/dataplane-facts.md says what that is worth.

The rule it keeps (docs/dataplane-facts.md): a super-packet reaches the TUN whole
only if it is smaller than the TUN's `gso_max_size`; for forwarded pod traffic the pod veth's
`gso_max_size` must therefore not exceed the TUN's (`set_gso_max_size` does either side).

Opening uses python-pytun (it knows the flags); TUNSETOFFLOAD and link settings use ioctl and
pyroute2, which pytun does not cover.
"""

from __future__ import annotations

import fcntl
import struct
from dataclasses import dataclass
from typing import Any

import pytun

TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40

# What the fast path asks for: checksum offload and TCP segmentation offload for IPv4/IPv6,
# including ECN flows (without TSO_ECN the kernel segments CWR-marked super-packets first).
DEFAULT_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN

VNET_HDR_SIZE = 10
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_ECN = 0x80

VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
NO_VNET_HDR = bytes(VNET_HDR_SIZE)  # "a plain packet, checksums complete"

# A super-packet plus its vnet header must fit one read; 64 KB IP packet + header + slack.
MAX_READ = 65536 + VNET_HDR_SIZE + 64
# The TUN gso_max_size the fast path uses: one super-packet (plus our framing) fits one 64 KB
# UDP GSO send on a 1500-byte underlay (docs/dataplane-facts.md).
FAST_PATH_GSO_MAX_SIZE = 62000


@dataclass(frozen=True, slots=True)
class VirtioNetHeader:
    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    def pack(self) -> bytes:
        return VNET_HDR.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> VirtioNetHeader:
        return cls(*VNET_HDR.unpack_from(data, 0))


class Tun:
    """One TUN device with one or more queues (file descriptors).

    With `multi_queue` every queue is its own fd; the kernel spreads outgoing flows over them.
    The object keeps pytun's handles alive: closing it closes the fds.
    """

    def __init__(
        self,
        name: str,
        *,
        vnet_hdr: bool = True,
        offloads: int = DEFAULT_OFFLOADS,
        queues: int = 1,
    ) -> None:
        if len(name) > 15:
            raise ValueError(f"interface name {name!r} is longer than 15 characters")
        flags = pytun.IFF_TUN | pytun.IFF_NO_PI
        if vnet_hdr:
            flags |= pytun.IFF_VNET_HDR
        if queues > 1:
            flags |= pytun.IFF_MULTI_QUEUE
        self.vnet_hdr = vnet_hdr
        self._handles: list[Any] = []
        try:
            for _ in range(queues):
                handle = pytun.TunTapDevice(name=name, flags=flags)
                self._handles.append(handle)
                if vnet_hdr:
                    fcntl.ioctl(handle.fileno(), TUNSETOFFLOAD, offloads)
        except Exception:
            self.close()
            raise
        self.name: str = self._handles[0].name
        self.offloads = offloads if vnet_hdr else 0

    @property
    def fds(self) -> list[int]:
        return [h.fileno() for h in self._handles]

    def configure(
        self,
        *,
        mtu: int | None = None,
        addresses: tuple[str, ...] = (),
        gso_max_size: int | None = None,
        txqueuelen: int | None = None,
        up: bool = True,
    ) -> None:
        """Set MTU, addresses (CIDR strings), gso_max_size and state with netlink."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=self.name)[0]
            settings: dict[str, Any] = {}
            if mtu is not None:
                settings["mtu"] = mtu
            if txqueuelen is not None:
                settings["txqlen"] = txqueuelen
            if settings:
                ipr.link("set", index=index, **settings)
            if gso_max_size is not None:
                set_gso_max_size(self.name, gso_max_size, ipr=ipr)
            for cidr in addresses:
                address, _, prefix = cidr.partition("/")
                ipr.addr("replace", index=index, address=address, prefixlen=int(prefix or 32))
            if up:
                ipr.link("set", index=index, state="up")

    def close(self) -> None:
        for handle in self._handles:
            handle.close()
        self._handles.clear()

    def __enter__(self) -> Tun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def set_gso_max_size(ifname: str, size: int, *, ipr: Any = None) -> None:
    """Set a link's gso_max_size (IFLA_GSO_MAX_SIZE) in the current network namespace."""
    if ipr is None:
        from pyroute2 import IPRoute

        with IPRoute() as own:
            set_gso_max_size(ifname, size, ipr=own)
        return
    index = ipr.link_lookup(ifname=ifname)[0]
    ipr.link("set", index=index, gso_max_size=size)


def gso_max_size(ifname: str) -> int:
    """The link's current gso_max_size."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        (link,) = ipr.get_links(index)
        return int(link.get_attr("IFLA_GSO_MAX_SIZE"))
