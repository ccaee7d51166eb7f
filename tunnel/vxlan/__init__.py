"""tunnel.vxlan: the kernel VXLAN data path, flannel-style, and the reconciler that keeps it true.

The package re-exports what the agent uses: `VxlanConfig`, `Peer`, `VxlanBackend` and its
`ReconcileReport`, and `watch_device`. The pure plan's own names (`plan`, `validate_peers`, the
states and operations) are in `tunnel.vxlan.plan`.

Theory of operation
===================

Every node owns one or more pod blocks (CIDRs) and one VXLAN device (default `weavepy.1`, VNI 1,
UDP 8472, `nolearning`, bound to the underlay interface and local address, MTU = underlay MTU
- 50). The device carries the network address of the node's first block as a /32 and a stable
MAC (the "VTEP MAC") that the agent persists and advertises to its peers.

For each remote peer `Peer(name, underlay_ip, vtep_mac, blocks)` three kernel objects live on our
device, and nothing else:

1. a permanent neighbour entry: peer anchor -> peer VTEP MAC, where the anchor is the network
   address of the peer's *first* block (the address its own device carries);
2. a permanent FDB entry: peer VTEP MAC -> peer underlay IP (where to send the UDP packet);
3. one route per peer block: `block via <anchor> dev <device> onlink`.

A packet for a remote pod hits route 3, so the kernel needs the MAC of the gateway (anchor): entry
1 answers without ARP; the VXLAN driver then needs the underlay address for that MAC: entry 2
answers without flooding. Nothing is learned and no miss is ever sent to userspace, so a
restarting agent leaves a working data path alone (flannel's third-generation scheme).

Why every block of a peer goes via its first block's address: the gateway address only selects the
neighbour entry (hence the inner destination MAC); the receiving kernel routes the decapsulated
packet by its inner destination IP. One neighbour entry per peer is therefore enough for any
number of blocks. The anchor must be stable, so the agent passes blocks in claim order (the first
claimed block first) both for peers and for `local_blocks`, and a node's device carries the same
anchor its peers use. If a peer's first block changes, its routes are replaced in place (no gap).

Ordering rules (so no packet is routed to an entry that is not there yet):
- add: neighbour, then FDB, then route; remove: route first, then neighbour and FDB;
- within one reconcile: delete stale routes; set neighbours and FDB entries; add or replace
  routes; delete stale neighbours, FDB entries and addresses.

The reconciler is split the h11 way, one file per half. The pure core (`plan.py`, which imports
no I/O) turns (config, desired peers, local blocks, observed kernel state) into an ordered list
of operations (`plan`), with bad input rejected per peer (`validate_peers`). The IO shell
(`kernel.py`, `VxlanBackend`) reads the kernel with one request per table, applies the
operations one by one and reports what changed. A kernel error on one operation is recorded
against its peer and that peer's later steps are skipped; every other peer is still programmed.
Only a device that cannot be deleted, created or brought up stops the pass (reported in
`ReconcileReport.device_error`, not raised).

Between passes, `watch_device` (`watch.py`) listens to RTMGRP_LINK and tells the agent at once
when our device is deleted or set down, so it can reconcile without waiting for its periodic
timer.

Which kernel objects are "ours": the device with our name, and the addresses, neighbours, FDB
entries and main-table routes whose interface is that device. Anything on another interface is
never read for deletion and never changed; a route we would add that collides with a foreign one
is reported, not replaced. Neighbour entries the kernel made itself (non-permanent) are left to
age out.
"""

from __future__ import annotations

from tunnel.vxlan.kernel import VxlanBackend
from tunnel.vxlan.plan import (
    DEFAULT_DEVICE,
    DEFAULT_PORT,
    DEFAULT_VNI,
    ENCAP_OVERHEAD,
    Change,
    Peer,
    PeerProblem,
    ReconcileReport,
    VxlanConfig,
)
from tunnel.vxlan.watch import DeviceEvent, watch_device

__all__ = [
    "DEFAULT_DEVICE",
    "DEFAULT_PORT",
    "DEFAULT_VNI",
    "ENCAP_OVERHEAD",
    "Change",
    "DeviceEvent",
    "Peer",
    "PeerProblem",
    "ReconcileReport",
    "VxlanBackend",
    "VxlanConfig",
    "watch_device",
]
