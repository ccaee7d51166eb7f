"""The reconciler's pacing: a poke after a quiet spell starts a pass at once (after
`DEBOUNCE`); a burst of pokes, such as a join wave's member events, shares passes no closer
than `PASS_GAP`, unless the node's own blocks changed; and with no poke a pass still runs
every `interval`. Trio's mock clock stands in for time; the reconciler is the agent's own
(its kernel side is not touched)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import trio
import trio.testing

from weavepy.reconcile import DEBOUNCE, PASS_GAP, Reconciler


def reconciler(run_dir: Path) -> Reconciler:
    unused: Any = None  # next_pass() reads neither the backend, the source nor the bridge
    return Reconciler(unused, unused, run_dir=run_dir, bridge="unused", mtu=1500,
                      ensure_bridge=unused, interval=30.0)


async def passes_for(rec: Reconciler, pokes_at: list[float], until: float,
                     urgent_at: float | None = None) -> list[tuple[float, str]]:
    """Drive `next_pass` as the run loop does, poking at the given times; the passes' start
    times (from the first poke's clock) and their reasons."""
    start = trio.current_time()
    passes: list[tuple[float, str]] = []

    async def poker() -> None:
        for i, at in enumerate(pokes_at):
            await trio.sleep_until(start + at)
            rec.poke(f"event {i}")
        if urgent_at is not None:
            await trio.sleep_until(start + urgent_at)
            rec.poke("own block", urgent=True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poker)
        with trio.move_on_at(start + until):
            while True:
                reasons = await rec.next_pass()
                passes.append((round(trio.current_time() - start, 3), reasons))
        nursery.cancel_scope.cancel()
    return passes


def test_a_burst_of_pokes_shares_passes_spaced_by_the_gap(tmp_path: Path) -> None:
    async def main() -> None:
        rec = reconciler(tmp_path)
        burst = [1.0 + 0.02 * i for i in range(100)]  # 100 member events in 2 s
        passes = await passes_for(rec, burst, until=10.0)
        starts = [at for at, _ in passes]
        assert starts[0] == round(1.0 + DEBOUNCE, 3), passes  # the first poke: at once
        assert all(b - a >= PASS_GAP - 1e-6 for a, b in itertools.pairwise(starts)), passes
        assert len(passes) <= 4, passes  # not 100
        assert "event 99" in passes[-1][1], passes  # the last event is not left behind

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_change_of_the_nodes_own_blocks_does_not_wait_for_the_gap(tmp_path: Path) -> None:
    """Its pods wait for the bridge to carry the block's gateway."""
    async def main() -> None:
        rec = reconciler(tmp_path)
        passes = await passes_for(rec, [1.0, 1.1], until=5.0, urgent_at=1.2)
        assert passes[:2] == [(round(1.0 + DEBOUNCE, 3), "event 0"),
                              (1.2, "event 1, own block")], passes  # not at 2.005

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_without_pokes_a_pass_still_runs_every_interval(tmp_path: Path) -> None:
    async def main() -> None:
        rec = reconciler(tmp_path)
        passes = await passes_for(rec, [], until=65.0)
        assert [reason for _, reason in passes] == ["periodic", "periodic"], passes

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
