"""gossip.hostport: the project's one parser of `host:port` text.

It owns `parse_host_port` and its error, `HostPortError`. It lives in `gossip`, the lowest
layer that reads such text (join seeds, the gossip CLI); `weavepy` uses it for every address
setting and flag, and `tunnel` takes already-parsed `(host, port)` pairs from its callers.

The rule it keeps: one syntax for every caller; what differs between callers is said by
explicit options, and every refusal is one sentence that quotes the text.

Syntax (Go's `net.SplitHostPort`, which memberlist and serf use, with the port optional):

    HOST          the default port (an error when the caller gives none)
    HOST:PORT
    [IPV6]        brackets hold an IPv6 address, nothing else
    [IPV6]:PORT
    IPV6          a bare IPv6 address (two or more ':') is a host without a port

PORT is decimal digits in 1..65535 (0 too with `allow_port_zero`: "pick a free port", which
only a bind address means). Which hosts are accepted (`hosts`):

    "name"  an IP address or a DNS host name (dot-separated labels of letters, digits and '-',
            each 1-63 long, not starting or ending with '-'; at most 253 in all)
    "ip"    an IPv4 or IPv6 address
    "ipv4"  an IPv4 address

Leading and trailing whitespace is ignored. The host comes back as written (without brackets).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

__all__ = ["HostKind", "HostPortError", "parse_host_port"]

HostKind = Literal["name", "ip", "ipv4"]

_MAX_PORT = 65535
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_MAX_NAME = 253
_HOST_WORDS: dict[HostKind, str] = {
    "name": "an IP address or a host name",
    "ip": "an IP address",
    "ipv4": "an IPv4 address",
}


class HostPortError(ValueError):
    """`text` is not an address this caller accepts; `problem` says why, in words."""

    def __init__(self, text: str, problem: str) -> None:
        self.text = text
        self.problem = problem
        super().__init__(f"{text!r}: {problem}")


def parse_host_port(
    text: str,
    *,
    default_port: int | None = None,
    allow_port_zero: bool = False,
    hosts: HostKind = "name",
) -> tuple[str, int]:
    """`text` as (host, port) by the rules in the module docstring; HostPortError if not.

    `default_port` is the port of a text without one, used as given; None makes the port
    required.
    """
    stripped = text.strip()
    if not stripped:
        raise HostPortError(text, "no address given")
    host, port_text, bracketed = _split(stripped)
    if not host:
        raise HostPortError(stripped, "no host before the port")
    _check_host(stripped, host, bracketed, hosts)
    if port_text is None:
        if default_port is None:
            raise HostPortError(stripped, "a port is required (HOST:PORT)")
        return host, default_port
    return host, _port(stripped, port_text, allow_port_zero)


def _split(text: str) -> tuple[str, str | None, bool]:
    """(host, port text or None, whether the host was in brackets)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise HostPortError(text, "'[' is never closed")
        host, rest = text[1:end], text[end + 1 :]
        if not rest:
            return host, None, True
        if not rest.startswith(":"):
            raise HostPortError(text, f"expected ':PORT' after ']', found {rest!r}")
        return host, rest[1:], True
    if text.count(":") == 1:
        host, port_text = text.split(":")
        return host, port_text, False
    return text, None, False


def _check_host(text: str, host: str, bracketed: bool, hosts: HostKind) -> None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if bracketed and not isinstance(address, ipaddress.IPv6Address):
        raise HostPortError(text, f"brackets hold an IPv6 address, and {host!r} is not one")
    if address is None:
        is_name = len(host) <= _MAX_NAME and _HOST_NAME.fullmatch(host) is not None
        if hosts != "name" or not is_name:
            raise HostPortError(text, f"the host {host!r} is not {_HOST_WORDS[hosts]}")
    elif hosts == "ipv4" and not isinstance(address, ipaddress.IPv4Address):
        raise HostPortError(text, f"the host {host!r} is not an IPv4 address")


def _port(text: str, port_text: str, allow_zero: bool) -> int:
    if not port_text:
        raise HostPortError(text, "no port after ':'")
    if not (port_text.isascii() and port_text.isdigit()):
        raise HostPortError(text, f"the port {port_text!r} is not a number")
    port = int(port_text)
    low = 0 if allow_zero else 1
    if not low <= port <= _MAX_PORT:
        raise HostPortError(text, f"the port {port} is out of range ({low}-{_MAX_PORT})")
    return port
