"""Replacing a file atomically: the one way weavepy writes a file that must never be half there.

This module owns `atomic_write` and the name of its temporary files. The rules it keeps:

* A reader sees the old file or the new one, never a mix: the bytes go to a temporary file in
  the target's directory (so the rename cannot cross a file system), which gets its final mode
  before the first byte is written and is renamed over the target only once it is complete.
* Durable by default: the temporary file is fsynced before the rename and the directory after
  it, so after a power cut the target holds the old bytes or the new ones and the rename itself
  is not lost. A caller that passes `durable=False` gives that up, and says why where it does.
* A write that fails leaves the old file as it was, removes its temporary file and raises.
* It creates no directory: the caller owns its directory and that directory's mode.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "discard_temporaries", "fsync_directory"]


def atomic_write(
    path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600, durable: bool = True
) -> None:
    """Replace `path` with `data` atomically, with permission bits `mode` (durably by default)."""
    target = Path(path)
    fd, temporary = tempfile.mkstemp(prefix=_temporary_prefix(target), dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)  # exact bits, whatever the umask, before any data
            out.write(data)
            out.flush()
            if durable:
                os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    if durable:
        fsync_directory(target.parent)


def discard_temporaries(path: str | os.PathLike[str]) -> None:
    """Remove the temporary files that `atomic_write(path, ...)` calls left behind by a crash."""
    target = Path(path)
    prefix = _temporary_prefix(target)
    with contextlib.suppress(FileNotFoundError):
        for leftover in target.parent.iterdir():
            if leftover.name.startswith(prefix):
                with contextlib.suppress(OSError):
                    leftover.unlink()


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make the renames and removals already done in `directory` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"
