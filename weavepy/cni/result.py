"""CNI result objects and their JSON forms for every spec version weavepy speaks.

This module owns the shape of an ADD result (interfaces, ips, routes, dns) and its rendering
into the format of the configuration's `cniVersion`. The rule it keeps: **a result is rendered
in exactly the version asked for, never a newer one**, because the runtime and every chained
plugin decode it with that version's types (libcni rejects a result whose version it was not
asked for, and an older decoder may choke on fields it does not know).

Per version (from the CNI SPEC.md of each release and libcni's `types/040` and `types/100`):

- 0.3.0, 0.3.1, 0.4.0: every IP carries `"version": "4"` or `"6"`; interfaces have `name`, `mac`,
  `sandbox`; routes have `dst`, `gw`.
- 1.0.0: the IP `version` field is gone; otherwise as 0.4.0.
- 1.1.0: interfaces may also carry `mtu`, `socketPath`, `pciID`; routes may also carry `mtu`,
  `advmss`, `priority`, `table`, `scope`.

Parsing is lenient in the other direction: `parse_result` accepts any of those shapes (a
`prevResult` from a newer or older plugin), so results can be chained and checked.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SUPPORTED_VERSIONS: tuple[str, ...] = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LEGACY_IP_VERSION_FIELD = frozenset({"0.3.0", "0.3.1", "0.4.0"})
EXTENDED_FIELDS = frozenset({"1.1.0"})


class ResultFormatError(ValueError):
    """A result (usually a prevResult) is not a well-formed CNI result."""


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str = ""
    sandbox: str = ""
    mtu: int = 0
    socket_path: str = ""
    pci_id: str = ""


@dataclass(frozen=True)
class IPConfig:
    address: IPInterface
    gateway: IPAddress | None = None
    interface: int | None = None


@dataclass(frozen=True)
class Route:
    dst: IPNetwork
    gw: IPAddress | None = None
    mtu: int = 0
    advmss: int = 0
    priority: int = 0
    table: int | None = None
    scope: int | None = None


@dataclass(frozen=True)
class DNS:
    nameservers: tuple[str, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Result:
    interfaces: tuple[Interface, ...] = ()
    ips: tuple[IPConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    dns: DNS = field(default_factory=DNS)

    def container_addresses(self, ifname: str, sandbox: str | None = None) -> list[IPConfig]:
        """The IPs this result puts on interface `ifname` inside a sandbox."""
        wanted = {
            index for index, iface in enumerate(self.interfaces)
            if iface.name == ifname and iface.sandbox and (sandbox is None
                                                            or iface.sandbox == sandbox)
        }
        return [ip for ip in self.ips if ip.interface in wanted]


# --- rendering --------------------------------------------------------------------------------


def render_result(result: Result, cni_version: str) -> dict[str, Any]:
    """The JSON object for `result` in the format of `cni_version`."""
    if cni_version not in SUPPORTED_VERSIONS:
        raise ResultFormatError(f"cannot render a result for cniVersion {cni_version!r}")
    extended = cni_version in EXTENDED_FIELDS
    out: dict[str, Any] = {"cniVersion": cni_version}
    if result.interfaces:
        out["interfaces"] = [_render_interface(i, extended) for i in result.interfaces]
    if result.ips:
        out["ips"] = [_render_ip(ip, cni_version in LEGACY_IP_VERSION_FIELD) for ip in result.ips]
    if result.routes:
        out["routes"] = [_render_route(r, extended) for r in result.routes]
    out["dns"] = _render_dns(result.dns)
    return out


def _render_interface(iface: Interface, extended: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"name": iface.name}
    if iface.mac:
        out["mac"] = iface.mac
    if extended and iface.mtu:
        out["mtu"] = iface.mtu
    if iface.sandbox:
        out["sandbox"] = iface.sandbox
    if extended and iface.socket_path:
        out["socketPath"] = iface.socket_path
    if extended and iface.pci_id:
        out["pciID"] = iface.pci_id
    return out


def _render_ip(ip: IPConfig, legacy: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if legacy:
        out["version"] = str(ip.address.version)
    if ip.interface is not None:
        out["interface"] = ip.interface
    out["address"] = ip.address.with_prefixlen
    if ip.gateway is not None:
        out["gateway"] = str(ip.gateway)
    return out


def _render_route(route: Route, extended: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"dst": route.dst.with_prefixlen}
    if route.gw is not None:
        out["gw"] = str(route.gw)
    if extended:
        for key, value in (("mtu", route.mtu), ("advmss", route.advmss),
                           ("priority", route.priority)):
            if value:
                out[key] = value
        if route.table is not None:
            out["table"] = route.table
        if route.scope is not None:
            out["scope"] = route.scope
    return out


def _render_dns(dns: DNS) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if dns.nameservers:
        out["nameservers"] = list(dns.nameservers)
    if dns.domain:
        out["domain"] = dns.domain
    if dns.search:
        out["search"] = list(dns.search)
    if dns.options:
        out["options"] = list(dns.options)
    return out


# --- parsing ----------------------------------------------------------------------------------


def parse_result(obj: object) -> Result:
    """Parse a result object of any supported version (e.g. a `prevResult`)."""
    if not isinstance(obj, Mapping):
        raise ResultFormatError("a result must be a JSON object")
    interfaces = tuple(_parse_interface(i) for i in _list(obj, "interfaces"))
    ips = tuple(_parse_ip(ip, len(interfaces)) for ip in _list(obj, "ips"))
    routes = tuple(_parse_route(r) for r in _list(obj, "routes"))
    dns_obj = obj.get("dns")
    if dns_obj is None:
        dns_obj = {}
    if not isinstance(dns_obj, Mapping):
        raise ResultFormatError("result field 'dns' must be an object")
    return Result(interfaces, ips, routes, parse_dns(dns_obj))


def parse_dns(obj: Mapping[str, Any]) -> DNS:
    """Parse a `dns` object (a result's, or the network config's well-known `dns` key)."""
    return DNS(
        nameservers=_strings(obj, "nameservers"),
        domain=_string(obj, "domain"),
        search=_strings(obj, "search"),
        options=_strings(obj, "options"),
    )


def _list(obj: Mapping[str, Any], key: str) -> Sequence[Any]:
    value = obj.get(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ResultFormatError(f"result field {key!r} must be a list")
    return value


def _string(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ResultFormatError(f"field {key!r} must be a string")
    return value


def _strings(obj: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = obj.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ResultFormatError(f"field {key!r} must be a list of strings")
    return tuple(value)


def _uint(obj: Mapping[str, Any], key: str) -> int:
    value = obj.get(key, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ResultFormatError(f"field {key!r} must be a non-negative integer")
    return value


def _parse_interface(obj: object) -> Interface:
    if not isinstance(obj, Mapping):
        raise ResultFormatError("each interface must be an object")
    name = _string(obj, "name")
    if not name:
        raise ResultFormatError("an interface has no name")
    return Interface(
        name=name,
        mac=_string(obj, "mac"),
        sandbox=_string(obj, "sandbox"),
        mtu=_uint(obj, "mtu"),
        socket_path=_string(obj, "socketPath"),
        pci_id=_string(obj, "pciID"),
    )


def _parse_ip(obj: object, interface_count: int) -> IPConfig:
    if not isinstance(obj, Mapping):
        raise ResultFormatError("each ip must be an object")
    try:
        address = ipaddress.ip_interface(_string(obj, "address"))
        gateway_text = _string(obj, "gateway")
        gateway = ipaddress.ip_address(gateway_text) if gateway_text else None
    except ValueError as exc:
        raise ResultFormatError(f"bad ip entry {dict(obj)!r}: {exc}") from None
    index = obj.get("interface")
    if index is not None:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ResultFormatError(f"ip {address} has a bad interface index {index!r}")
        if interface_count and index >= interface_count:
            raise ResultFormatError(f"ip {address} points at interface index {index}, "
                                    f"but the result has {interface_count} interfaces")
    return IPConfig(address, gateway, index)


def _parse_route(obj: object) -> Route:
    if not isinstance(obj, Mapping):
        raise ResultFormatError("each route must be an object")
    try:
        dst = ipaddress.ip_network(_string(obj, "dst"), strict=False)
        gw_text = _string(obj, "gw")
        gw = ipaddress.ip_address(gw_text) if gw_text else None
    except ValueError as exc:
        raise ResultFormatError(f"bad route {dict(obj)!r}: {exc}") from None
    table = obj.get("table")
    scope = obj.get("scope")
    return Route(
        dst=dst, gw=gw, mtu=_uint(obj, "mtu"), advmss=_uint(obj, "advmss"),
        priority=_uint(obj, "priority"),
        table=_uint(obj, "table") if table is not None else None,
        scope=_uint(obj, "scope") if scope is not None else None,
    )


# --- chaining ---------------------------------------------------------------------------------


def chain(previous: Result | None, ours: Result) -> Result:
    """Our result appended to a `prevResult` (when weavepy is not first in a chain).

    The previous interfaces keep their indices; our IPs' `interface` indices are shifted past
    them. DNS from the previous result wins where it is set, as it came first.
    """
    if previous is None:
        return ours
    offset = len(previous.interfaces)
    shifted = tuple(
        replace(ip, interface=None if ip.interface is None else ip.interface + offset)
        for ip in ours.ips
    )
    prev_dns, our_dns = previous.dns, ours.dns
    dns = DNS(
        nameservers=prev_dns.nameservers or our_dns.nameservers,
        domain=prev_dns.domain or our_dns.domain,
        search=prev_dns.search or our_dns.search,
        options=prev_dns.options or our_dns.options,
    )
    return Result(previous.interfaces + ours.interfaces, previous.ips + shifted,
                  previous.routes + ours.routes, dns)
