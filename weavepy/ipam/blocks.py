"""CIDR block arithmetic for the cluster range: which block is number *i*, and what lives in it.

This module owns the mapping between the cluster range (e.g. 10.32.0.0/12) cut into equal
CIDR blocks (e.g. /24) and the small integers the replicated state uses to name them. The
rule it keeps: a block index is valid only inside `0 <= index < count`, and every address
handed to a pod lies in exactly one block, never on the block's reserved addresses (its
network address, which the VXLAN device uses as its /32; its first host, the bridge gateway;
and, for IPv4, its broadcast address).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The replicated state names blocks by index; more than this many blocks makes the state too
# big to gossip (4096 /24s in the default 10.32.0.0/12 is the design point).
MAX_BLOCKS = 65536


class BlockError(ValueError):
    """A range, block size, block index or address that does not fit the block space."""


@dataclass(frozen=True, slots=True)
class BlockSpace:
    """The cluster range cut into `2 ** (block_prefix - range.prefixlen)` equal CIDR blocks."""

    cluster_range: IPNetwork
    block_prefix: int

    @classmethod
    def parse(cls, cluster_range: str | IPNetwork, block_prefix: int) -> BlockSpace:
        """Validate and build; raises BlockError with the reason."""
        try:
            network = ipaddress.ip_network(cluster_range, strict=True)
        except ValueError as exc:
            raise BlockError(
                f"cluster range {cluster_range!r} is not a CIDR network: {exc}"
            ) from exc
        if not isinstance(block_prefix, int) or isinstance(block_prefix, bool):
            raise BlockError(f"block prefix must be an integer, got {block_prefix!r}")
        if block_prefix < network.prefixlen:
            raise BlockError(
                f"block prefix /{block_prefix} is larger than the cluster range {network}"
            )
        host_bits = network.max_prefixlen - block_prefix
        if host_bits < 2:
            raise BlockError(
                f"block prefix /{block_prefix} leaves no room for pods (need <= /"
                f"{network.max_prefixlen - 2})"
            )
        count = 1 << (block_prefix - network.prefixlen)
        if count > MAX_BLOCKS:
            raise BlockError(
                f"{network} in /{block_prefix} blocks makes {count} blocks; at most {MAX_BLOCKS}"
            )
        return cls(network, block_prefix)

    @property
    def count(self) -> int:
        return 1 << (self.block_prefix - self.cluster_range.prefixlen)

    @property
    def block_size(self) -> int:
        return 1 << (self.cluster_range.max_prefixlen - self.block_prefix)

    def block(self, index: int) -> IPNetwork:
        """The CIDR network of block `index`."""
        self._check_index(index)
        base = int(self.cluster_range.network_address) + index * self.block_size
        return type(self.cluster_range)((base, self.block_prefix))

    def blocks(self) -> Iterator[IPNetwork]:
        """Every block of the range, in index order."""
        for index in range(self.count):
            yield self.block(index)

    def index_of(self, item: str | IPAddress | IPNetwork) -> int:
        """The index of the block holding an address, or of a network that is exactly a block."""
        if isinstance(item, str):
            try:
                item = ipaddress.ip_address(item) if "/" not in item else ipaddress.ip_network(item)
            except ValueError as exc:
                raise BlockError(f"{item!r} is neither an address nor a network: {exc}") from exc
        if isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network):
            if item.prefixlen != self.block_prefix:
                raise BlockError(f"{item} is not a /{self.block_prefix} block")
            address: IPAddress = item.network_address
        else:
            address = item
        if address.version != self.cluster_range.version or address not in self.cluster_range:
            raise BlockError(f"{address} is outside the cluster range {self.cluster_range}")
        offset = int(address) - int(self.cluster_range.network_address)
        return offset // self.block_size

    def contains(self, index: int, address: IPAddress) -> bool:
        """True if `address` lies in block `index` (reserved addresses included)."""
        return address in self.block(index)

    def gateway(self, index: int) -> IPAddress:
        """The bridge gateway of block `index`: its first host address (`.1` of a /24)."""
        return self.block(index).network_address + 1

    def vtep_address(self, index: int) -> IPAddress:
        """The block's network address, which the overlay device holds as a /32 (flannel)."""
        return self.block(index).network_address

    def is_reserved(self, index: int, address: IPAddress) -> bool:
        """Network address, gateway, and (IPv4) broadcast are never handed to pods."""
        network = self.block(index)
        if address == network.network_address or address == network.network_address + 1:
            return True
        return network.version == 4 and address == network.broadcast_address

    def pod_addresses(self, index: int) -> Iterator[IPAddress]:
        """The addresses of block `index` that pods may get, lowest first."""
        network = self.block(index)
        first = int(network.network_address) + 2
        last = int(network.broadcast_address) - (1 if network.version == 4 else 0)
        address_type = type(network.network_address)
        for value in range(first, last + 1):
            yield address_type(value)

    def pod_capacity(self) -> int:
        """How many pod addresses one block holds (253 for an IPv4 /24)."""
        return self.block_size - (3 if self.cluster_range.version == 4 else 2)

    def _check_index(self, index: int) -> None:
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < self.count:
            raise BlockError(f"block index {index!r} is outside 0..{self.count - 1}")
