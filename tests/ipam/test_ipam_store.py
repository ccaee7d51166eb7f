"""Crash-safe persistence: atomic replace, corruption detected and moved aside, reload."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from weavepy.ipam.core import IpamCore
from weavepy.ipam.errors import CorruptStateError
from weavepy.ipam.store import StateFile


def fixed_clock() -> float:
    return 1_800_000_000.0  # 2027-01-15T08:00:00Z


def test_save_then_load_round_trips_and_leaves_no_temporary(tmp_path: Path) -> None:
    store = StateFile(tmp_path / "ipam.json", "ipam-core")
    assert store.load() is None
    store.save({"a": [1, 2, 3], "b": {"c": "d"}})
    assert store.load() == {"a": [1, 2, 3], "b": {"c": "d"}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ipam.json"]
    store.save({"a": []})
    assert store.load() == {"a": []}


def test_a_crash_before_the_rename_keeps_the_old_file(tmp_path: Path) -> None:
    """A leftover temporary (crash between write and rename) is ignored and cleaned up."""
    store = StateFile(tmp_path / "ipam.json", "ipam-core")
    store.save({"generation": 1})
    (tmp_path / ".ipam.json.tmp-12345").write_text('{"half": ')
    assert store.load() == {"generation": 1}
    assert not list(tmp_path.glob(".ipam.json.tmp-*"))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda text: text[: len(text) // 2], "not JSON"),
        (lambda text: text.replace('"generation": 7', '"generation": 8'), "checksum mismatch"),
        (lambda text: text.replace('"ipam-core"', '"other"'), "holds 'other'"),
        (lambda text: text.replace('"version": 1', '"version": 9'), "format version 9"),
        (lambda text: "[1, 2]", "not a JSON object"),
        (lambda text: "\xff\xfe\x00", "not JSON"),  # not UTF-8 at all
    ],
)
def test_corruption_is_detected_moved_aside_and_explained(
    tmp_path: Path, damage: Callable[[str], str], reason: str
) -> None:
    path = tmp_path / "ipam.json"
    store = StateFile(path, "ipam-core", clock=fixed_clock)
    store.save({"generation": 7, "cluster": None})
    path.write_text(damage(path.read_text()), encoding="latin-1")
    with pytest.raises(CorruptStateError) as caught:
        store.load()
    error = caught.value
    assert reason in error.reason
    assert error.moved_to == str(tmp_path / "ipam.json.corrupt-20270115T080000Z")
    assert Path(error.moved_to).exists() and not path.exists()
    assert "weavepy reset" in str(error) and "will not start with an empty state" in str(error)
    # a second corrupt file at the same second gets its own name
    store.save({"generation": 7})
    path.write_text("garbage")
    with pytest.raises(CorruptStateError) as again:
        store.load()
    assert again.value.moved_to == str(tmp_path / "ipam.json.corrupt-20270115T080000Z-2")


def test_file_is_human_readable_json_with_a_checksum(tmp_path: Path) -> None:
    path = tmp_path / "ipam.json"
    StateFile(path, "ipam-core").save({"x": 1})
    document = json.loads(path.read_text())
    assert document["kind"] == "ipam-core" and document["version"] == 1
    assert len(document["sha256"]) == 64 and document["body"] == {"x": 1}


def test_a_core_restarts_from_its_file_with_its_blocks(tmp_path: Path) -> None:
    store = StateFile(tmp_path / "ipam.json", "ipam-core")
    core = IpamCore("n1", "198.19.0.0/16", 24, rng=random.Random(1), bootstrap="found")
    core.handle_timer(0.0)
    core.request_block(0.0, count=2)
    assert core.persist_needed
    snapshot = core.snapshot()
    store.save(snapshot)
    core.mark_persisted(snapshot["seq"])
    assert [str(core.space.block(i)) for i in core.held_blocks()] == [
        "198.19.0.0/24",
        "198.19.1.0/24",
    ]
    again = IpamCore("n1", "198.19.0.0/16", 24, rng=random.Random(2), snapshot=store.load())
    assert again.held_blocks() == core.held_blocks()
    assert again.cluster_id == core.cluster_id
    assert again.usable_blocks(5.0) == []  # no lease survives a restart ...
    again.handle_timer(5.0)  # ... the sole voter renews it at once
    assert again.usable_blocks(5.0) == core.held_blocks()
