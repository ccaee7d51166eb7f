"""The atheris harness (bench/fuzz_atheris.py) runs every target for a short, fixed number of
libFuzzer executions without a crash. Long runs are `python -m bench fuzz_atheris`; this keeps
the harness itself working and gives every decoder a coverage-guided pass on each suite run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from bench.fuzz_atheris import TARGETS, fuzz_target
from tests.conftest import require

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("target", TARGETS)
def test_target_survives_a_short_run(target: str, tmp_path: Path) -> None:
    require(importlib.util.find_spec("atheris") is not None,
            "needs atheris (the bench extra: pip install -e '.[bench]')")
    result = fuzz_target(target, None, 1500, tmp_path)
    assert not result.crashed, result.excerpt
    assert result.executions == 1500, result
    assert result.coverage > 20, result  # the modules under test were instrumented
