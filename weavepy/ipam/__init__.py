"""weavepy.ipam: which node owns which pod block, and pod addresses out of this node's blocks.

Sans-IO throughout: no trio, no sockets, no clocks, no gossip imports. The agent feeds the
core gossip liveness, IPAM payloads and time, persists what it is told to, and sends what it
is given (see `core.py` for the contract and docs/ipam.md for the design and its proof).
"""

from weavepy.ipam.allocator import Allocation, PodAllocator, Unavailable
from weavepy.ipam.blocks import BlockSpace
from weavepy.ipam.core import TAG_KEY, IpamCore
from weavepy.ipam.errors import (
    ConfigError,
    CorruptStateError,
    IpamDecodeError,
    IpamError,
    RmpeerError,
)
from weavepy.ipam.liveness import Timings
from weavepy.ipam.status import IpamState, IpamStatus
from weavepy.ipam.store import StateFile
from weavepy.ipam.wire import Outgoing, is_ipam

__all__ = [
    "TAG_KEY",
    "Allocation",
    "BlockSpace",
    "ConfigError",
    "CorruptStateError",
    "IpamCore",
    "IpamDecodeError",
    "IpamError",
    "IpamState",
    "IpamStatus",
    "Outgoing",
    "PodAllocator",
    "RmpeerError",
    "StateFile",
    "Timings",
    "Unavailable",
    "is_ipam",
]
