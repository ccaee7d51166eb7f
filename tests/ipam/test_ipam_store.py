"""Crash-safe persistence: atomic replace, corruption detected and moved aside, reload; the
pod allocations' two slots, a save cut short by a crash, and the file from before the slots."""

from __future__ import annotations

import json
import random
import resource
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from weavepy.ipam.core import IpamCore
from weavepy.ipam.errors import CorruptStateError
from weavepy.ipam.store import SLOT_PAGE, SlotStateFile, StateFile


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


# --- SlotStateFile: two slots overwritten in turn ------------------------------------------------


def _slots(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "pods.0.json", tmp_path / "pods.1.json"


def test_slots_alternate_and_the_newest_whole_one_is_loaded(tmp_path: Path) -> None:
    store = SlotStateFile(tmp_path / "pods.json", "ipam-pods")
    assert store.load() is None
    for n in range(1, 6):
        store.save({"seq": n})
        assert SlotStateFile(tmp_path / "pods.json", "ipam-pods").load() == {"seq": n}
    first, second = _slots(tmp_path)
    assert store.slots == (first, second)
    assert json.loads(first.read_bytes())["body"] == {"seq": 5}  # writes 1, 3, 5
    assert json.loads(second.read_bytes())["body"] == {"seq": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pods.0.json", "pods.1.json"]
    assert first.stat().st_mode & 0o777 == 0o600
    assert first.stat().st_size % SLOT_PAGE == 0


def test_a_slot_keeps_its_size_when_the_state_shrinks(tmp_path: Path) -> None:
    store = SlotStateFile(tmp_path / "pods.json", "ipam-pods")
    store.save({"pods": ["x" * 100] * 100})
    store.save({"pods": ["x" * 100] * 100})
    size = _slots(tmp_path)[0].stat().st_size
    store.save({"pods": []})
    assert _slots(tmp_path)[0].stat().st_size == size
    assert SlotStateFile(tmp_path / "pods.json", "ipam-pods").load() == {"pods": []}


@pytest.mark.parametrize(
    "cut_short",
    [
        lambda old, new: new[: new.index(b"\n") // 2] + old[new.index(b"\n") // 2:],  # half
        lambda old, new: b"\0" * len(new),  # size grew, data never reached the disk
        lambda old, new: new.replace(b'"seq":4', b'"seq":5'),  # whole JSON, wrong checksum
    ],
)
def test_a_save_cut_short_falls_back_to_the_other_slot_and_is_overwritten_next(
        tmp_path: Path, cut_short: Callable[[bytes, bytes], bytes]) -> None:
    store = SlotStateFile(tmp_path / "pods.json", "ipam-pods")
    for n in range(1, 4):
        store.save({"seq": n})  # slot 0 holds write 3, slot 1 write 2
    second = _slots(tmp_path)[1]
    old = second.read_bytes()
    store.save({"seq": 4})  # to slot 1 ...
    second.write_bytes(cut_short(old, second.read_bytes()))  # ... which a crash cut short
    again = SlotStateFile(tmp_path / "pods.json", "ipam-pods")
    assert again.load() == {"seq": 3}
    first_bytes = _slots(tmp_path)[0].read_bytes()
    again.save({"seq": 5})
    assert _slots(tmp_path)[0].read_bytes() == first_bytes, "the whole slot was overwritten"
    assert SlotStateFile(tmp_path / "pods.json", "ipam-pods").load() == {"seq": 5}


def test_a_failed_save_leaves_the_newest_state_and_raises(tmp_path: Path) -> None:
    store = SlotStateFile(tmp_path / "pods.json", "ipam-pods")
    store.save({"seq": 1})
    # the kernel refuses most of the write (a file size limit of 10 bytes: a short write)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (10, limits[1]))
    try:
        with pytest.raises(OSError):
            store.save({"seq": 2})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert SlotStateFile(tmp_path / "pods.json", "ipam-pods").load() == {"seq": 1}
    store.save({"seq": 3})
    assert SlotStateFile(tmp_path / "pods.json", "ipam-pods").load() == {"seq": 3}


def test_the_first_save_cut_short_is_no_state_not_corruption(tmp_path: Path) -> None:
    _slots(tmp_path)[0].write_bytes(b'{"kind":"ipam-pods","vers')
    store = SlotStateFile(tmp_path / "pods.json", "ipam-pods")
    assert store.load() is None
    store.save({"seq": 1})
    assert SlotStateFile(tmp_path / "pods.json", "ipam-pods").load() == {"seq": 1}


def test_no_whole_slot_is_corruption_with_both_moved_aside(tmp_path: Path) -> None:
    store = SlotStateFile(tmp_path / "pods.json", "ipam-pods", clock=fixed_clock)
    store.save({"seq": 1})
    store.save({"seq": 2})
    first, second = _slots(tmp_path)
    first.write_text("garbage")
    second.write_text(second.read_text().replace('"ipam-pods"', '"other"'))
    with pytest.raises(CorruptStateError) as caught:
        SlotStateFile(tmp_path / "pods.json", "ipam-pods", clock=fixed_clock).load()
    assert "weavepy reset" in str(caught.value)
    assert not first.exists() and not second.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "pods.0.json.corrupt-20270115T080000Z", "pods.1.json.corrupt-20270115T080000Z"]


def test_the_single_file_from_before_the_slots_is_read_then_replaced(tmp_path: Path) -> None:
    StateFile(tmp_path / "pods.json", "ipam-pods").save({"seq": 7})
    store = SlotStateFile(tmp_path / "pods.json", "ipam-pods")
    assert store.load() == {"seq": 7}
    store.save({"seq": 8})
    assert not (tmp_path / "pods.json").exists()
    assert SlotStateFile(tmp_path / "pods.json", "ipam-pods").load() == {"seq": 8}
