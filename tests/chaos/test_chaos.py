"""`weavepy chaos` end to end: the default profile against a 4-node sandbox must pass.

The run builds its own sandbox (fresh prefix, destroyed at the end even on failure), launches
four agents, one pod per node through the real weavepy-cni plugin, probes pod to pod, and
goes through one fault of each kind (kill, node loss, partition, asymmetric partition,
impairment, stall) with the live checker watching. A fixed seed keeps it reproducible.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import require_root
from weavepy.devtools.chaos.cli import chaos_command

pytestmark = [pytest.mark.netns, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _restore_weavepy_log_level() -> Iterator[None]:
    """The command quiets the `weavepy` logger for its own output; later tests in this process
    must not inherit that."""
    logger = logging.getLogger("weavepy")
    level = logger.level
    yield
    logger.setLevel(level)


@pytest.mark.timeout(240)
def test_default_profile_passes() -> None:
    require_root()
    result = CliRunner().invoke(chaos_command, ["--nodes", "4", "--seed", "1", "--json"])
    # exit 2 (setup failed) or a crash prints no report: show why, not a JSON decode error
    assert result.stdout.strip(), (f"exit {result.exit_code}, no report; stderr:\n"
                                   f"{result.stderr[-4000:]}\nexception: {result.exc_info}")
    doc = json.loads(result.stdout)
    assert result.exit_code == 0, json.dumps(doc["violations"], indent=1) + result.stderr
    assert doc["ok"] and doc["seed"] == 1
    assert {"1:no_overlap", "2:kernel_matches_membership", "3:restart_kept_blocks",
            "3:pod_kept_address", "4:minority_never_claims",
            "5:probe_success"} <= set(doc["checks"])
    assert doc["probes"]["judged"] > 100
    assert doc["convergence_summary"]["count"] >= 5
    events = [e["event"] for e in doc["timeline"]]
    for kind in ("kill", "node_loss", "partition", "asym_partition", "netem", "stall"):
        assert any(e.startswith(f"start: {kind} ") for e in events), events


def test_print_schedule_replays_and_bad_schedules_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    first = runner.invoke(chaos_command, ["--seed", "42", "--print-schedule"])
    again = runner.invoke(chaos_command, ["--seed", "42", "--print-schedule"])
    assert first.exit_code == 0 and first.stdout == again.stdout
    saved = tmp_path / "schedule.yaml"
    saved.write_text(first.stdout)
    scripted = runner.invoke(chaos_command, ["--schedule", str(saved), "--print-schedule"])
    assert scripted.stdout == first.stdout
    saved.write_text("faults: [{kind: kill, targets: [n7], hold_s: 1}]\nnodes: 3\n")
    bad = runner.invoke(chaos_command, ["--schedule", str(saved)])
    assert bad.exit_code == 2
    assert "faults[0].targets" in bad.stderr
