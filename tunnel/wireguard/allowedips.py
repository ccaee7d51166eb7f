"""Allowed-IPs: the cryptokey routing table (whitepaper section 2), longest prefix wins.

It answers two questions with one table: which peer an outgoing packet's destination belongs
to, and whether an incoming packet's source is one the sending peer may use. A prefix belongs
to exactly one peer; inserting it for another peer moves it (as `wg set` does).

Lookups run once per packet (or super-packet) on the hot path, so they take the raw 4- or
16-byte address from the packet: one `int.from_bytes`, then one dict probe per distinct prefix
length in the table, longest first.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

Value = TypeVar("Value", bound=Hashable)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Family(Generic[Value]):
    __slots__ = ("bits", "by_length", "lengths")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.by_length: dict[int, dict[int, Value]] = {}
        self.lengths: list[int] = []  # longest first

    def insert(self, prefix_length: int, key: int, value: Value) -> Value | None:
        table = self.by_length.get(prefix_length)
        if table is None:
            table = self.by_length[prefix_length] = {}
            self.lengths = sorted(self.by_length, reverse=True)
        previous = table.get(key)
        table[key] = value
        return previous

    def remove(self, prefix_length: int, key: int) -> None:
        table = self.by_length.get(prefix_length)
        if table is None:
            return
        table.pop(key, None)
        if not table:
            del self.by_length[prefix_length]
            self.lengths = sorted(self.by_length, reverse=True)

    def lookup(self, address: int) -> Value | None:
        bits = self.bits
        for length in self.lengths:
            value = self.by_length[length].get(address >> (bits - length))
            if value is not None:
                return value
        return None


class AllowedIPs(Generic[Value]):
    """Prefixes to values (peers), with longest-prefix lookup for IPv4 and IPv6."""

    def __init__(self) -> None:
        self._v4: _Family[Value] = _Family(32)
        self._v6: _Family[Value] = _Family(128)
        self._networks: dict[Value, set[Network]] = {}

    def _family(self, network: Network) -> _Family[Value]:
        return self._v4 if network.version == 4 else self._v6

    def insert(self, network: str | Network, value: Value) -> None:
        net = ipaddress.ip_network(network, strict=False) if isinstance(network, str) else network
        family = self._family(net)
        key = int(net.network_address) >> (family.bits - net.prefixlen)
        previous = family.insert(net.prefixlen, key, value)
        if previous is not None and previous != value:
            self._networks[previous].discard(net)
        self._networks.setdefault(value, set()).add(net)

    def remove(self, network: str | Network) -> None:
        net = ipaddress.ip_network(network, strict=False) if isinstance(network, str) else network
        family = self._family(net)
        key = int(net.network_address) >> (family.bits - net.prefixlen)
        owner = family.by_length.get(net.prefixlen, {}).get(key)
        family.remove(net.prefixlen, key)
        if owner is not None:
            self._networks[owner].discard(net)

    def remove_value(self, value: Value) -> None:
        for net in list(self._networks.pop(value, ())):
            family = self._family(net)
            family.remove(net.prefixlen, int(net.network_address) >> (family.bits - net.prefixlen))

    def networks(self, value: Value) -> list[Network]:
        return sorted(self._networks.get(value, ()), key=lambda n: (n.version, n))

    def lookup(self, address: bytes | memoryview) -> Value | None:
        """The value for a packed IPv4 (4 bytes) or IPv6 (16 bytes) address."""
        family = self._v4 if len(address) == 4 else self._v6
        return family.lookup(int.from_bytes(address, "big"))

    def __iter__(self) -> Iterator[tuple[Network, Value]]:
        for value, nets in self._networks.items():
            for net in nets:
                yield net, value
