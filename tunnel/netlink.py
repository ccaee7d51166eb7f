"""tunnel.netlink: thin helpers around pyroute2 for the kernel data paths.

It owns three things and nothing else: opening an rtnetlink request socket in the caller's (or a
named) network namespace, opening a bound rtnetlink *monitor* socket for multicast groups, and
turning raw rtnetlink bytes into small typed `RtnlEvent` records.

The rule it keeps: it never creates a network namespace (pyroute2 does that by default when a
named one is missing; we pass flags=0 so a missing namespace is an error), and it never reads a
clock or keeps state between calls. Parsing is a pure function of the bytes.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError
from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_LINK,
    RTMGRP_NEIGH,
)
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

__all__ = [
    "AF_BRIDGE",
    "GONE_ERRNOS",
    "IFF_UP",
    "NETLINK_ROUTE",
    "NTF_SELF",
    "NUD_NOARP",
    "NUD_PERMANENT",
    "RTMGRP_IPV4_IFADDR",
    "RTMGRP_IPV4_ROUTE",
    "RTMGRP_LINK",
    "RTMGRP_NEIGH",
    "RTNH_F_ONLINK",
    "RT_TABLE_MAIN",
    "NetlinkDumpInterrupted",
    "NetlinkError",
    "RtnlEvent",
    "errno_of",
    "open_iproute",
    "open_monitor_socket",
    "parse_events",
]

AF_BRIDGE = 7
NETLINK_ROUTE = 0
IFF_UP = 0x1
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTNH_F_ONLINK = 0x4
RT_TABLE_MAIN = 254

# A delete that fails with one of these found nothing to delete: the goal is already met.
GONE_ERRNOS = frozenset({errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENODEV})

_MONITOR_RCVBUF = 4 * 1024 * 1024


def errno_of(exc: BaseException) -> int | None:
    """The errno of a pyroute2 NetlinkError or an OSError, else None."""
    if isinstance(exc, NetlinkError):
        return int(exc.code)
    if isinstance(exc, OSError):
        return exc.errno
    return None


def open_iproute(netns: str | None = None) -> Any:
    """A synchronous pyroute2 IPRoute in `netns` (None: the caller's namespace).

    No multicast groups are joined (the socket only answers requests), and a named namespace
    that does not exist raises instead of being created.
    """
    if netns is None:
        return IPRoute(groups=0)
    return IPRoute(netns=netns, flags=0, groups=0)


def open_monitor_socket(groups: int, netns: str | None = None) -> socket.socket:
    """A non-blocking rtnetlink socket bound to the multicast `groups` (RTMGRP_* bit mask).

    With `netns`, the socket is created inside that namespace (pyroute2 forks a short-lived
    child that enters it and passes the descriptor back); it keeps that namespace for life.
    """
    if netns is None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    else:
        sock = pyroute2_netns.create_socket(
            netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE, flags=0
        )
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _MONITOR_RCVBUF)
        sock.bind((0, groups))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class RtnlEvent:
    """One rtnetlink notification, reduced to what a reconciler or a test needs.

    kind: "link", "addr", "route", "neigh" (AF_INET neighbour) or "fdb" (AF_BRIDGE neighbour).
    action: "new" or "del".
    key: the object's identity: ifname (link), "ip/len" (addr), "dst/len" (route), the
    destination address (neigh) or the MAC (fdb).
    """

    kind: str
    action: str
    ifindex: int | None
    key: str
    detail: dict[str, str] = field(default_factory=dict, compare=False)


_EVENT_KINDS = MappingProxyType(
    {
        "RTM_NEWLINK": ("link", "new"),
        "RTM_DELLINK": ("link", "del"),
        "RTM_NEWADDR": ("addr", "new"),
        "RTM_DELADDR": ("addr", "del"),
        "RTM_NEWROUTE": ("route", "new"),
        "RTM_DELROUTE": ("route", "del"),
        "RTM_NEWNEIGH": ("neigh", "new"),
        "RTM_DELNEIGH": ("neigh", "del"),
    }
)


def _event_from_message(msg: Any) -> RtnlEvent | None:
    name = msg.get("event")
    if name not in _EVENT_KINDS:
        return None
    kind, action = _EVENT_KINDS[name]
    detail: dict[str, str] = {}
    if kind == "link":
        ifindex = msg.get("index")
        key = str(msg.get_attr("IFLA_IFNAME") or "")
        detail["flags"] = str(msg.get("flags"))
        detail["mac"] = str(msg.get_attr("IFLA_ADDRESS") or "")
    elif kind == "addr":
        ifindex = msg.get("index")
        key = f"{msg.get_attr('IFA_ADDRESS')}/{msg.get('prefixlen')}"
    elif kind == "route":
        ifindex = msg.get_attr("RTA_OIF")
        key = f"{msg.get_attr('RTA_DST') or '0.0.0.0'}/{msg.get('dst_len')}"
        detail["gateway"] = str(msg.get_attr("RTA_GATEWAY") or "")
        detail["table"] = str(msg.get_attr("RTA_TABLE") or msg.get("table"))
        detail["flags"] = str(msg.get("flags"))
    else:
        ifindex = msg.get("ifindex")
        detail["state"] = str(msg.get("state"))
        if msg.get("family") == AF_BRIDGE:
            kind = "fdb"
            key = str(msg.get_attr("NDA_LLADDR") or "")
            detail["dst"] = str(msg.get_attr("NDA_DST") or "")
        else:
            key = str(msg.get_attr("NDA_DST") or "")
            detail["mac"] = str(msg.get_attr("NDA_LLADDR") or "")
    return RtnlEvent(
        kind=kind,
        action=action,
        ifindex=int(ifindex) if ifindex is not None else None,
        key=key,
        detail=detail,
    )


def parse_events(data: bytes) -> list[RtnlEvent]:
    """Decode one datagram from a monitor socket; messages we do not model are left out.

    A truncated or malformed message ends the parse of that datagram (the kernel never sends
    one, so it is only a guard); nothing raises.
    """
    events: list[RtnlEvent] = []
    try:
        messages: Iterable[Any] = list(MarshalRtnl().parse(data))
    except Exception:  # pyroute2 raises assorted types on garbage
        return events
    for msg in messages:
        if msg.get("header", {}).get("error") is not None:
            continue
        try:
            event = _event_from_message(msg)
        except Exception:
            continue
        if event is not None:
            events.append(event)
    return events
