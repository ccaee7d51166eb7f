"""Fault schedules for chaos runs: generated from a seed, or scripted in YAML.

This module owns *what* goes wrong, in which order, to which nodes, for how long. It keeps two
rules: **the same seed, node count, profile and duration always give the same schedule** (a
run is replayed from the seed its report prints), and **a schedule is plain data** that
round-trips through YAML, so a generated schedule can be saved, edited and run again.

Faults run one at a time: the runner applies a fault, holds it for `hold_s`, undoes it, waits
until the cluster has converged again (at most the convergence bound), rests `gap_s`, and only
then starts the next one. Wall-clock timing therefore adapts to the cluster; the order,
targets and parameters do not.

Kinds (targets are node names such as "n2"):

=================  ========================================================================
``kill``           SIGKILL the target's agent, restart it after `hold_s` (same state dir)
``node_loss``      SIGKILL the agent and pull the underlay cable; after `hold_s` plug it
                   back and restart the agent
``partition``      the targets (a minority) lose the rest of the cluster, both ways
``asym_partition`` traffic from the targets to the rest is dropped, the other way passes
``netem``          impair the targets' underlay: params loss, duplicate, delay_ms,
                   jitter_ms, reorder (fractions 0..1, milliseconds)
``stall``          SIGSTOP the target's agent (an event-loop stall past the probe timeout),
                   SIGCONT after `hold_s`
=================  ========================================================================
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = [
    "FAULT_KINDS",
    "PROFILES",
    "Fault",
    "Schedule",
    "ScheduleError",
    "generate",
    "load_schedule",
]

FAULT_KINDS = ("kill", "node_loss", "partition", "asym_partition", "netem", "stall")
NETEM_PARAMS = ("loss", "duplicate", "delay_ms", "jitter_ms", "reorder")
PROFILES = ("short", "default", "soak")
DEFAULT_CONVERGENCE_BOUND = 30.0
SOAK_DURATION = 1800.0
# Rough seconds a fault costs beyond its hold (detection, convergence, gap): sizes generated
# schedules to a requested duration.
EXPECTED_SETTLE = 4.0


class ScheduleError(ValueError):
    """A schedule is not valid; the message names the fault and the field."""


@dataclass(frozen=True)
class Fault:
    kind: str
    targets: tuple[str, ...]
    hold_s: float
    params: Mapping[str, float] = field(default_factory=dict)
    gap_s: float = 2.0

    def describe(self) -> str:
        extra = "".join(f" {k}={v:g}" for k, v in sorted(self.params.items()))
        return f"{self.kind} {','.join(self.targets)} for {self.hold_s:g}s{extra}"

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"kind": self.kind, "targets": list(self.targets),
                               "hold_s": self.hold_s}
        if self.params:
            doc["params"] = dict(self.params)
        if self.gap_s != 2.0:
            doc["gap_s"] = self.gap_s
        return doc


@dataclass(frozen=True)
class Schedule:
    seed: int
    nodes: int
    profile: str
    faults: tuple[Fault, ...]
    convergence_bound_s: float = DEFAULT_CONVERGENCE_BOUND

    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "nodes": self.nodes, "profile": self.profile,
                "convergence_bound_s": self.convergence_bound_s,
                "faults": [f.to_dict() for f in self.faults]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- generation


def _pick(rng: random.Random, names: Sequence[str], count: int) -> tuple[str, ...]:
    return tuple(sorted(rng.sample(list(names), count), key=lambda n: int(n[1:])))


def _random_fault(rng: random.Random, kind: str, names: Sequence[str],
                  long_partitions: bool = False) -> Fault:
    n = len(names)
    if kind == "kill":
        return Fault(kind, _pick(rng, names, 1), round(rng.uniform(2.0, 8.0), 1))
    if kind == "node_loss":
        return Fault(kind, _pick(rng, names, 1), round(rng.uniform(4.0, 10.0), 1))
    if kind == "partition":
        minority = rng.randint(1, max(1, (n - 1) // 2))
        # a soak also holds partitions past the minority's longest suspicion timeout
        low, high = (20.0, 40.0) if long_partitions else (9.0, 14.0)
        return Fault(kind, _pick(rng, names, minority), round(rng.uniform(low, high), 1))
    if kind == "asym_partition":
        return Fault(kind, _pick(rng, names, rng.randint(1, max(1, n // 2))),
                     round(rng.uniform(3.0, 6.0), 1))
    if kind == "stall":
        # past the LAN probe timeout (0.5 s) and often past a probe interval or two
        return Fault(kind, _pick(rng, names, 1), round(rng.uniform(1.5, 4.0), 1))
    if kind == "netem":
        flavour = rng.choice(("loss", "delay", "duplicate", "reorder"))
        params: dict[str, float]
        if flavour == "loss":
            params = {"loss": round(rng.uniform(0.01, 0.1), 3)}
        elif flavour == "delay":
            params = {"delay_ms": float(rng.randint(10, 80)),
                      "jitter_ms": float(rng.randint(0, 10))}
        elif flavour == "duplicate":
            params = {"duplicate": round(rng.uniform(0.05, 0.3), 3)}
        else:
            params = {"delay_ms": float(rng.randint(10, 40)),
                      "reorder": round(rng.uniform(0.2, 0.5), 3)}
        return Fault(kind, _pick(rng, names, 1), round(rng.uniform(4.0, 8.0), 1), params)
    raise ScheduleError(f"unknown fault kind {kind!r} (known: {', '.join(FAULT_KINDS)})")


def generate(seed: int, nodes: int = 5, profile: str = "default",
             duration: float | None = None,
             convergence_bound_s: float = DEFAULT_CONVERGENCE_BOUND) -> Schedule:
    """A seeded schedule. `short` is three faults, `default` one of each kind (shuffled),
    `soak` random faults; a `duration` (seconds, required sense for soak, default 30 min)
    keeps drawing random faults until their expected cost fills it."""
    if profile not in PROFILES:
        raise ScheduleError(f"unknown profile {profile!r} (known: {', '.join(PROFILES)})")
    if nodes < 3:
        raise ScheduleError(f"a chaos run needs at least 3 nodes (a majority must survive "
                            f"a minority partition), not {nodes}")
    rng = random.Random(f"weavepy-chaos:{seed}:{nodes}:{profile}")
    names = [f"n{i}" for i in range(1, nodes + 1)]
    faults: list[Fault] = []
    if profile == "short":
        kinds = ["kill", "partition", "stall"]
        rng.shuffle(kinds)
        faults = [_random_fault(rng, kind, names) for kind in kinds]
    elif profile == "default":
        kinds = list(FAULT_KINDS)
        rng.shuffle(kinds)
        faults = [_random_fault(rng, kind, names) for kind in kinds]
    if profile == "soak" and duration is None:
        duration = SOAK_DURATION
    if duration is not None:
        spent = sum(f.hold_s + EXPECTED_SETTLE for f in faults)
        while spent < duration:
            fault = _random_fault(rng, rng.choice(FAULT_KINDS), names, profile == "soak")
            faults.append(fault)
            spent += fault.hold_s + EXPECTED_SETTLE
    return Schedule(seed, nodes, profile, tuple(faults), convergence_bound_s)


# --------------------------------------------------------------------------- scripted


def _number(where: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScheduleError(f"{where}: expected a number, got {value!r}")
    if not low <= float(value) <= high:
        raise ScheduleError(f"{where}: {value} is outside {low:g}..{high:g}")
    return float(value)


def _fault_from(index: int, doc: object, names: Sequence[str]) -> Fault:
    where = f"faults[{index}]"
    if not isinstance(doc, dict):
        raise ScheduleError(f"{where}: expected a mapping with kind, targets and hold_s")
    unknown = set(doc) - {"kind", "targets", "hold_s", "params", "gap_s"}
    if unknown:
        raise ScheduleError(f"{where}: unknown keys {sorted(unknown)}")
    kind = doc.get("kind")
    if kind not in FAULT_KINDS:
        raise ScheduleError(f"{where}.kind: {kind!r} is not one of {', '.join(FAULT_KINDS)}")
    targets = doc.get("targets")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(t in names for t in targets):
        raise ScheduleError(f"{where}.targets: expected a list of node names from "
                            f"{names[0]}..{names[-1]}, got {targets!r}")
    if len(set(targets)) != len(targets):
        raise ScheduleError(f"{where}.targets: {targets} names a node twice")
    if kind in ("kill", "node_loss", "stall") and len(targets) != 1:
        raise ScheduleError(f"{where}.targets: {kind} takes exactly one node")
    if kind in ("partition", "asym_partition") and len(targets) >= len(names):
        raise ScheduleError(f"{where}.targets: a partition needs nodes on both sides")
    hold = _number(f"{where}.hold_s", doc.get("hold_s"), 0.1, 3600)
    gap = _number(f"{where}.gap_s", doc.get("gap_s", 2.0), 0.0, 3600)
    raw_params = doc.get("params", {})
    if not isinstance(raw_params, dict):
        raise ScheduleError(f"{where}.params: expected a mapping")
    if raw_params and kind != "netem":
        raise ScheduleError(f"{where}.params: only netem faults take parameters")
    params: dict[str, float] = {}
    for key, value in raw_params.items():
        if key not in NETEM_PARAMS:
            raise ScheduleError(f"{where}.params.{key}: not one of {', '.join(NETEM_PARAMS)}")
        high = 10000.0 if key.endswith("_ms") else 1.0
        params[key] = _number(f"{where}.params.{key}", value, 0.0, high)
    if kind == "netem" and not any(params.values()):
        raise ScheduleError(f"{where}.params: a netem fault needs a non-zero parameter")
    if params.get("reorder") and not params.get("delay_ms"):
        raise ScheduleError(f"{where}.params: reorder needs delay_ms (netem's meaning)")
    ordered = sorted(targets, key=lambda n: int(n[1:]))
    return Fault(str(kind), tuple(ordered), hold, params, gap)


def load_schedule(text: str) -> Schedule:
    """Parse a YAML schedule (the format `Schedule.to_yaml` writes); ScheduleError if bad."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScheduleError(f"the schedule is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ScheduleError("the schedule must be a mapping with nodes and faults")
    unknown = set(doc) - {"seed", "nodes", "profile", "convergence_bound_s", "faults"}
    if unknown:
        raise ScheduleError(f"unknown top-level keys {sorted(unknown)}")
    nodes = doc.get("nodes", 5)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or not 3 <= nodes <= 50:
        raise ScheduleError(f"nodes: expected a whole number from 3 to 50, got {nodes!r}")
    seed = doc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ScheduleError(f"seed: expected a whole number, got {seed!r}")
    bound = _number("convergence_bound_s", doc.get("convergence_bound_s",
                                                   DEFAULT_CONVERGENCE_BOUND), 1, 3600)
    raw = doc.get("faults")
    if not isinstance(raw, list):
        raise ScheduleError("faults: expected a list")
    names = [f"n{i}" for i in range(1, nodes + 1)]
    faults = tuple(_fault_from(i, f, names) for i, f in enumerate(raw))
    return Schedule(seed, nodes, str(doc.get("profile", "scripted")), faults, bound)
