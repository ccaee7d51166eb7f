"""IPAM at scale, in the simulator: time from claim to decided, decisions per second, and
messages per member, at 1,000 nodes.

`python -m bench ipam_sim [--nodes 1000] [--singles 10] [--loss 0] [--idle 30] [--seed 1]`

Every number comes from real `IpamCore` + `PodAllocator` pairs driven by `weavepy.ipam.sim` in
virtual time (the same cores the agent runs; messages are encoded and decoded as on the wire;
every node persists what its core asks before anything leaves it), with the agent's lease and
push/pull interval (memberlist's 30 s, scaled for the cluster's size: 180 s at 1,000). The
simulator's scale mode (`full_checks=False`: no partitions here) keeps no per-pair contact
history and writes a node's simulated disk only when it is read (at a kill; the bench kills
none), since serialising every node's whole state at every decision is each agent's own cost
but would be the simulator's N times over; its other checks (no overlapping blocks, Paxos
agreement) run throughout. Phases, one after the other:

1. **join**: n1 founds the cluster, then the n-1 others start at the same moment and join (a
   cluster booting together): virtual seconds until every node is a ready member.
2. **claims one at a time**: `--singles` nodes each request a block on an idle cluster, one
   after the other: time from the request to the block being usable at that node.
3. **claims all at once**: every other node requests its block at the same moment (the cluster's
   first pods everywhere): per-node time to decided, and decisions per virtual second.
4. **idle**: `--idle` virtual seconds with nothing to decide: messages per member per second.

Messages are IPAM messages (a broadcast counts once per receiver); "decisions" are Paxos
slots decided (one slot may carry several claims). Times are polled every `POLL` virtual
seconds, so they are +- that. The wall-clock time of each phase is printed: at 1,000 nodes the
simulator runs every node's core in one process, so it takes long.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence

from bench.common import median_spread, no_anchor, table
from gossip.config import GossipConfig
from gossip.node import push_pull_scale
from weavepy.ipam.core import DEFAULT_LEASE, DEFAULT_RECLAIM_AFTER
from weavepy.ipam.sim import IpamSim, SimConfig
from weavepy.ipam.status import IpamState

POLL = 0.05  # virtual seconds between looks at the nodes' status
POD_RANGE = "198.19.0.0/16"
PHASE_TIMEOUT = 1800.0  # virtual seconds


def block_prefix(nodes: int) -> int:
    """The longest prefix that still cuts POD_RANGE into at least 2 blocks per node."""
    return min(30, 16 + math.ceil(math.log2(2 * nodes)))


def _decided_slots(sim: IpamSim) -> int:
    return len(sim.checker.decisions.decided)


def _wait(sim: IpamSim, pending: set[str], done: Callable[[str], bool]) -> dict[str, float]:
    """Run until `done(name)` for every pending node; {name: virtual seconds it took}."""
    started = sim.now
    took: dict[str, float] = {}
    while pending:
        if sim.now - started > PHASE_TIMEOUT:
            raise RuntimeError(f"{len(pending)} nodes not done after {PHASE_TIMEOUT:g} "
                               f"virtual s, e.g. {sorted(pending)[:5]}")
        sim.run(POLL)
        for name in [n for n in pending if done(n)]:
            took[name] = sim.now - started
            pending.discard(name)
    return took


def _ready(sim: IpamSim) -> Callable[[str], bool]:
    return lambda name: sim.state(name) is IpamState.READY


def _owns_block(sim: IpamSim) -> Callable[[str], bool]:
    return lambda name: bool(sim.usable_blocks(name))


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: Sequence[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench ipam_sim")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--singles", type=int, default=10,
                        help="claims one at a time on the idle cluster")
    parser.add_argument("--loss", type=float, default=0.0, help="message loss on every link")
    parser.add_argument("--idle", type=float, default=30.0, help="virtual seconds of idle")
    parser.add_argument("--seed", type=int, default=1)
    opts = parser.parse_args(list(args))
    if opts.nodes < 3 or not 0 <= opts.singles < opts.nodes:
        parser.error("--nodes must be at least 3 and --singles below it")
    n = opts.nodes
    prefix = block_prefix(n)
    # the agent's lease and reclaim delay (the simulator's defaults are short, for the property
    # tests): with a 60 s lease every member renews every 30 s, N/30 slots a second, more than
    # the ~9 slots a second one Paxos slot at a time decides once N passes ~270
    # and the agent's push/pull: memberlist's LAN interval, scaled up for the cluster's size
    pushpull = push_pull_scale(GossipConfig.lan().push_pull_interval, n)
    sim = IpamSim(opts.seed, SimConfig(cluster_range=POD_RANGE, block_prefix=prefix,
                                       lease=DEFAULT_LEASE, reclaim_after=DEFAULT_RECLAIM_AFTER,
                                       drop=opts.loss, duplicate=0.0, full_checks=False,
                                       pushpull_interval=pushpull))
    rows: list[list[object]] = []
    names = [f"n{i}" for i in range(1, n + 1)]

    wall = time.monotonic()
    sim.add_node(names[0], bootstrap="found")
    _wait(sim, {names[0]}, _ready(sim))
    slots, sent, started = _decided_slots(sim), sim.messages_sent, sim.now
    sim.add_nodes(names[1:])
    joined = _wait(sim, set(names[1:]), _ready(sim))
    join = _phase(sim, "join (all at once)", joined, slots, sent, started, wall, n)
    rows.append(join)
    _progress(f"join: {join}")

    wall = time.monotonic()
    singles: dict[str, float] = {}
    slots, sent, started = _decided_slots(sim), sim.messages_sent, sim.now
    for name in names[:opts.singles]:
        sim.request_block(name)
        singles.update(_wait(sim, {name}, _owns_block(sim)))
        sim.run(1.0)  # idle again before the next one
    if singles:
        rows.append(_phase(sim, "claim, one at a time", singles, slots, sent, started, wall, n))
        _progress(f"singles: {rows[-1]}")

    wall = time.monotonic()
    rest = names[opts.singles:]
    slots, sent, started = _decided_slots(sim), sim.messages_sent, sim.now
    for name in rest:
        sim.request_block(name)
    burst = _wait(sim, set(rest), _owns_block(sim))
    rows.append(_phase(sim, f"claim, {len(rest)} at once", burst, slots, sent, started, wall, n))
    _progress(f"burst: {rows[-1]}")

    wall = time.monotonic()
    sent, started = sim.messages_sent, sim.now
    sim.run(opts.idle)
    idle_rate = (sim.messages_sent - sent) / n / (sim.now - started)
    idle_wall = time.monotonic() - wall
    sim.check_status_invariants()
    owned = [b for s in sim.statuses() for b in s.owned_blocks]

    header = ["phase", "nodes done", "virtual s to done, per node", "phase virtual s",
              "decisions (slots)", "decisions per virtual s", "messages per member",
              "wall s"]
    return "\n\n".join([
        no_anchor("No other IPAM runs at this size here (Weave Net's IPAM has no simulator, "
                  "and 1,000 agents do not fit on this machine); the numbers are weavepy's "
                  "cores in virtual time."),
        f"{n} simulated nodes, range {POD_RANGE} in /{prefix} blocks, message loss "
        f"{opts.loss:g}, lease {sim.config.lease:g} s (the agent's), "
        f"delays {sim.config.delay[0] * 1e3:g}-{sim.config.delay[1] * 1e3:g} ms "
        f"({sim.config.slow_fraction:.0%} of messages {sim.config.slow_delay[0]:g}-"
        f"{sim.config.slow_delay[1]:g} s late), gossip notices changes after "
        f"{sim.config.gossip_delay[0]:g}-{sim.config.gossip_delay[1]:g} s, push/pull every "
        f"{pushpull:g} s (the agent's, for {n} members), seed {opts.seed}. "
        f"Times polled every {POLL:g} virtual s; per node: median (min, max or p99).",
        table(header, rows),
        f"Idle: {idle_rate:.2f} messages per member per virtual second over {opts.idle:g} s "
        f"(wall {idle_wall:.0f} s). At the end: {len(owned)} blocks owned by {n} nodes, "
        f"{len(set(owned))} distinct (invariant 1), {_decided_slots(sim)} slots decided, "
        f"all agreed (the simulator checks every application of every slot).",
    ])


def _phase(sim: IpamSim, label: str, took: dict[str, float], slots: int, sent: int,
           started: float, wall: float, n: int) -> list[object]:
    decided = _decided_slots(sim) - slots
    span = sim.now - started
    return [label, len(took), median_spread(list(took.values()), 2), f"{span:.2f}", decided,
            f"{decided / span:.1f}" if span > 0 else "-",
            f"{(sim.messages_sent - sent) / n:.1f}", f"{time.monotonic() - wall:.0f}"]
