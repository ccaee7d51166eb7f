"""weavepy.ipam: which node owns which pod block, and pod addresses out of this node's blocks.

Everything here is sans-IO (no trio, no sockets, no clocks, no gossip imports) except
`store.py`, the one module that touches the disk: it reads and atomically replaces the state
files. The agent (`weavepy/ipam_link.py`) feeds the core gossip liveness, IPAM payloads and
time, persists the core's snapshot through `store.py` when told to, and sends what it is
given. `core.py` keeps the safety rules and the contract, `liveness.py` chooses what to
propose, `report.py` renders the status; docs/ipam.md has the design and its proof.
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
