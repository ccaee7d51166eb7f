"""`atomic_write`: whole files only, the final mode before the data is visible, durable by
default, and a failed write keeps the old file."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from weavepy import fileio
from weavepy.fileio import atomic_write, discard_temporaries

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def umask() -> Iterator[None]:
    """A umask that would strip bits from a file created the ordinary way."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def test_atomic_write_leaves_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # private unless asked otherwise


@pytest.mark.usefixtures("umask")
@pytest.mark.parametrize("mode", [0o600, 0o644, 0o755])
def test_the_mode_is_set_before_the_data_is_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    """At the moment of the rename the new file is complete and already has its final mode,
    and the old one is still in place: nobody ever sees the new bytes with other bits."""
    target = tmp_path / "plugin"
    target.write_bytes(b"old")
    seen: list[tuple[int, bytes, bytes]] = []
    real_replace = os.replace

    def watching_replace(src: str, dst: Path) -> None:
        seen.append((stat.S_IMODE(os.stat(src).st_mode), Path(src).read_bytes(),
                     Path(dst).read_bytes()))
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", watching_replace)
    atomic_write(target, b"new", mode=mode)
    assert seen == [(mode, b"new", b"old")]
    assert stat.S_IMODE(target.stat().st_mode) == mode
    assert target.read_bytes() == b"new"


def test_a_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    """A real short write: the file-size limit makes write() fail with EFBIG half-way."""
    target = tmp_path / "state.json"
    target.write_bytes(b"old and whole")
    script = (
        "import resource, signal, sys\n"
        "from weavepy.fileio import atomic_write\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))\n"
        "try:\n"
        "    atomic_write(sys.argv[1], b'n' * 65536)\n"
        "except OSError as exc:\n"
        "    print(exc.errno)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(target)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == str(errno.EFBIG), done.stderr
    assert target.read_bytes() == b"old and whole"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_rename_leaves_the_target_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "inside").write_bytes(b"kept")
    with pytest.raises(IsADirectoryError):
        atomic_write(target, b"data")
    assert (target / "inside").read_bytes() == b"kept"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_a_failed_fsync_leaves_the_old_file(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "disk gone")

    monkeypatch.setattr(fileio.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


@pytest.mark.parametrize(("durable", "synced"), [(True, ["file", "directory"]), (False, [])])
def test_durable_syncs_the_file_then_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool, synced: list[str]
) -> None:
    calls: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        calls.append("directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", recording_fsync)
    atomic_write(tmp_path / "f", b"x", durable=durable)
    assert calls == synced
    assert (tmp_path / "f").read_bytes() == b"x"


def test_discard_temporaries_removes_only_that_files_leftovers(tmp_path: Path) -> None:
    for name in (".f.json.tmp-abc123", ".f.json.tmp-zz", ".g.json.tmp-abc", "f.json",
                 "f.json.corrupt-20270115T080000Z"):
        (tmp_path / name).write_bytes(b"x")
    discard_temporaries(tmp_path / "f.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".g.json.tmp-abc", "f.json", "f.json.corrupt-20270115T080000Z"]
    discard_temporaries(tmp_path / "missing-dir" / "f.json")  # no directory: nothing to do
