"""What the agent reads from the host's network: underlay and route checks, link counters.

This module owns three read-only questions about the network namespace the agent runs in:

* which interface and address are the underlay (`find_underlay`): the `--iface` given, else
  the interface of the default route, else the route towards the first peer, else the only
  interface with an IPv4 address; and its MTU, from which the overlay MTU follows;
* whether the cluster range collides with the host (`range_conflicts`): a route or an address
  outside weavepy's own devices that overlaps the range would make pods unreachable or hijack
  host traffic, so the agent refuses to start, as Weave did ("Network 10.32.0.0/12 overlaps
  with existing route ...");
* how many bytes and packets a link has moved (`read_link_counters`, the kernel's link stats),
  which `LinkCounterSampler` keeps fresh for the status and the metrics while the agent runs.

The rule it keeps: it only reads (one netlink dump per table) and raises `HostNetError` with one
readable sentence that says what to change. Overlap logic is a pure function for tests.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_address
from typing import Any

import trio

from tunnel.netlink import RT_TABLE_MAIN, open_iproute
from weavepy.config import parse_peer

__all__ = [
    "HostNetError",
    "HostRoute",
    "LinkCounterSampler",
    "Underlay",
    "find_underlay",
    "host_routes",
    "overlapping_routes",
    "range_conflicts",
    "read_link_counters",
]

log = logging.getLogger(__name__)

IFF_LOOPBACK = 0x8
LINK_SAMPLE_INTERVAL = 2.0  # seconds between reads of a link's counters


class HostNetError(Exception):
    """The host's network does not allow the agent to start; the message says what to do."""


@dataclass(frozen=True)
class Underlay:
    iface: str
    ifindex: int
    local_ip: IPv4Address
    mtu: int
    how: str  # how it was chosen, for the log


@dataclass(frozen=True)
class HostRoute:
    network: IPv4Network
    device: str
    kind: str  # "route" or "address"


def overlapping_routes(cluster_range: IPv4Network, routes: Iterable[HostRoute],
                       own_devices: Iterable[str]) -> list[HostRoute]:
    """Routes and addresses that overlap the range and are not on weavepy's devices (pure).

    A default route (prefix 0) is never a conflict: more specific routes win over it.
    """
    ours = set(own_devices)
    return [r for r in routes
            if r.network.prefixlen > 0 and r.device not in ours
            and r.network.overlaps(cluster_range)]


def _links(ipr: Any) -> dict[int, tuple[str, int, int]]:
    """ifindex -> (name, flags, mtu)."""
    return {int(link["index"]): (str(link.get_attr("IFLA_IFNAME")), int(link["flags"]),
                                 int(link.get_attr("IFLA_MTU") or 1500))
            for link in ipr.get_links()}


def host_routes(netns: str | None = None) -> list[HostRoute]:
    """IPv4 routes of the main table and IPv4 interface addresses, with device names."""
    ipr = open_iproute(netns)
    try:
        links = _links(ipr)
        found: list[HostRoute] = []
        for r in ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_MAIN):
            if (r.get_attr("RTA_TABLE") or r["table"]) != RT_TABLE_MAIN:
                continue
            dst = r.get_attr("RTA_DST") or "0.0.0.0"
            oif = r.get_attr("RTA_OIF")
            name = links.get(int(oif), ("?",))[0] if oif is not None else "?"
            found.append(HostRoute(IPv4Network((dst, r["dst_len"]), strict=False), name,
                                   "route"))
        for a in ipr.get_addr(family=socket.AF_INET):
            local = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
            name = links.get(int(a["index"]), ("?",))[0]
            found.append(HostRoute(IPv4Interface((local, a["prefixlen"])).network, name,
                                   "address"))
        return found
    finally:
        ipr.close()


def range_conflicts(cluster_range: IPv4Network, own_devices: Sequence[str],
                    netns: str | None = None) -> None:
    """Raise HostNetError if the range overlaps a host route or address not owned by us."""
    clashes = overlapping_routes(cluster_range, host_routes(netns), own_devices)
    if clashes:
        first = clashes[0]
        more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
        raise HostNetError(
            f"the cluster range {cluster_range} overlaps the host's {first.kind} "
            f"{first.network} on {first.device}{more}; pick a free range with --ipalloc-range "
            f"(or $IPALLOC_RANGE)"
        )


def _first_ipv4(ipr: Any, ifindex: int) -> IPv4Address | None:
    for a in ipr.get_addr(family=socket.AF_INET, index=ifindex):
        local = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
        if local:
            return IPv4Address(local)
    return None


def find_underlay(iface: str | None, peers: Sequence[str], own_devices: Sequence[str],
                  netns: str | None = None) -> Underlay:
    """The underlay interface, its IPv4 address and MTU (see the module docstring)."""
    ipr = open_iproute(netns)
    try:
        links = _links(ipr)
        by_name = {name: index for index, (name, _, _) in links.items()}

        def pick(index: int, how: str) -> Underlay:
            name, _, mtu = links[index]
            local = _first_ipv4(ipr, index)
            if local is None:
                raise HostNetError(f"the underlay interface {name} has no IPv4 address; "
                                   f"give it one, or pick another with --iface")
            return Underlay(name, index, local, mtu, how)

        if iface is not None:
            if iface not in by_name:
                raise HostNetError(f"--iface {iface}: no such interface (have: "
                                   f"{', '.join(sorted(by_name))})")
            return pick(by_name[iface], "--iface")
        for r in ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_MAIN):
            if r["dst_len"] == 0 and r.get_attr("RTA_OIF") in links:
                return pick(int(r.get_attr("RTA_OIF")), "default route")
        for peer in peers:
            try:
                target = ip_address(parse_peer(peer)[0])
            except ValueError:  # a host name: the route to it is not known before DNS
                continue
            if target.version != 4:
                continue
            try:
                answer = ipr.route("get", dst=str(target))
            except Exception:  # no route to that peer: try the next way
                continue
            oif = answer[0].get_attr("RTA_OIF") if answer else None
            if oif in links and not links[int(oif)][1] & IFF_LOOPBACK:
                return pick(int(oif), f"route to peer {target}")
        candidates = [index for index, (name, flags, _) in links.items()
                      if not flags & IFF_LOOPBACK and name not in own_devices
                      and _first_ipv4(ipr, index) is not None]
        if len(candidates) == 1:
            return pick(candidates[0], "only interface with an address")
        if not candidates:
            raise HostNetError("no interface with an IPv4 address to use as the underlay; "
                               "configure one, or name it with --iface")
        names = ", ".join(sorted(links[i][0] for i in candidates))
        raise HostNetError(f"cannot tell which interface is the underlay ({names}) and there "
                           f"is no default route; pick one with --iface")
    finally:
        ipr.close()


def read_link_counters(name: str) -> dict[str, int] | None:
    """The link's rx/tx bytes and packets in this process's namespace (None: no link).

    Read from /proc/self/net/dev (the kernel's 64-bit link stats, the same numbers as
    IFLA_STATS64): one small read, no netlink socket, cheap enough for an idle agent's sampler.
    """
    with open("/proc/self/net/dev") as table:
        for line in table.readlines()[2:]:
            link, _, fields = line.partition(":")
            if link.strip() == name:
                values = fields.split()
                return {"rx_bytes": int(values[0]), "rx_packets": int(values[1]),
                        "tx_bytes": int(values[8]), "tx_packets": int(values[9])}
    return None


class LinkCounterSampler:
    """Keeps `latest` (the link's counters, see `read_link_counters`) fresh while `run` runs;
    a missing link (before the agent's first pass creates it) or a failed read keeps the last
    sample, None until there is one."""

    def __init__(self, name: str, interval: float = LINK_SAMPLE_INTERVAL) -> None:
        self.name = name
        self.interval = interval
        self.latest: dict[str, int] | None = None

    async def run(self) -> None:
        while True:
            try:
                sample = read_link_counters(self.name)  # a procfs read: no thread needed
            except OSError as exc:
                log.debug("cannot read %s counters: %s", self.name, exc)
                sample = None
            if sample is not None:
                self.latest = sample
            await trio.sleep(self.interval)
