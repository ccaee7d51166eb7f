"""Fault schedules: the same seed gives the same schedule, YAML round-trips, bad input is
refused with a message naming the fault and the field."""

from __future__ import annotations

import pytest

from weavepy.devtools.chaos.schedule import FAULT_KINDS, ScheduleError, generate, load_schedule


@pytest.mark.parametrize("profile", ["short", "default", "soak"])
def test_same_seed_same_schedule(profile: str) -> None:
    duration = 300.0 if profile == "soak" else None
    first = generate(1234, 5, profile, duration)
    again = generate(1234, 5, profile, duration)
    assert first == again
    assert first.faults
    assert generate(1235, 5, profile, duration) != first


def test_default_profile_has_one_fault_of_each_kind() -> None:
    schedule = generate(7, 4, "default")
    assert sorted(f.kind for f in schedule.faults) == sorted(FAULT_KINDS)
    for fault in schedule.faults:
        assert all(t in schedule.node_names() for t in fault.targets)
        if fault.kind == "partition":
            assert len(fault.targets) * 2 < 4  # a minority


def test_duration_fills_the_schedule() -> None:
    short = generate(3, 5, "soak", 120)
    long = generate(3, 5, "soak", 1200)
    assert len(long.faults) > len(short.faults) * 5


def test_yaml_round_trip() -> None:
    schedule = generate(99, 5, "default")
    assert load_schedule(schedule.to_yaml()) == schedule


def test_scripted_schedule() -> None:
    schedule = load_schedule("""
nodes: 4
faults:
  - {kind: kill, targets: n2, hold_s: 3}
  - {kind: netem, targets: [n3], hold_s: 4, params: {loss: 0.05}}
  - {kind: partition, targets: [n4], hold_s: 10, gap_s: 1}
""")
    assert [f.kind for f in schedule.faults] == ["kill", "netem", "partition"]
    assert schedule.faults[0].targets == ("n2",)
    assert schedule.faults[1].params == {"loss": 0.05}
    assert schedule.faults[2].gap_s == 1


@pytest.mark.parametrize(("text", "message"), [
    ("nodes: 2\nfaults: []", "nodes"),
    ("faults: [{kind: explode, targets: [n1], hold_s: 1}]", "faults[0].kind"),
    ("faults: [{kind: kill, targets: [n9], hold_s: 1}]", "faults[0].targets"),
    ("faults: [{kind: kill, targets: [n1, n2], hold_s: 1}]", "exactly one node"),
    ("faults: [{kind: kill, targets: [n1], hold_s: -1}]", "faults[0].hold_s"),
    ("faults: [{kind: netem, targets: [n1], hold_s: 1, params: {loss: 2}}]", "params.loss"),
    ("faults: [{kind: netem, targets: [n1], hold_s: 1, params: {reorder: 0.5}}]", "delay_ms"),
    ("faults: [{kind: kill, targets: [n1], hold_s: 1, params: {loss: 0.1}}]", "only netem"),
    ("nodes: 3\nfaults: [{kind: partition, targets: [n1, n2, n3], hold_s: 1}]", "both sides"),
    ("faults: {kind: kill}", "faults: expected a list"),
    ("[1, 2", "not valid YAML"),
])
def test_bad_schedules_are_refused_with_the_place(text: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_schedule(text)


def test_too_few_nodes_for_generation() -> None:
    with pytest.raises(ScheduleError, match="at least 3"):
        generate(1, 2)
