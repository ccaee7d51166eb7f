"""Crash-safe persistence of IPAM state in the node's state directory.

This module owns the on-disk format of the state files and the way they are written: a
`StateFile` is replaced whole; a `SlotStateFile` (the pod allocations, saved before every CNI
ADD and DEL is answered) is two slots overwritten in turn. The rules it keeps:

* A write never leaves a half-written file under the real name: `fileio.atomic_write`
  replaces it durably (temporary file, fsync, rename, fsync of the directory), and the
  temporary files a crash left behind are removed when the file is next loaded.
* A `SlotStateFile` save costs one `fdatasync` and no new inode, rename or directory sync: it
  overwrites in place the slot that does *not* hold the newest state, so a save cut short by a
  crash leaves the other slot whole. Loading takes the whole slot with the highest write
  number. A slot that fails validation beside a whole one is such a cut-short save (never
  acknowledged, so nothing acknowledged is lost) and is overwritten next, as is the first slot
  when it is the only one; otherwise, when no slot is whole, the state is corrupt.
* A file that fails validation (not JSON, wrong kind or version, checksum mismatch) is never
  silently replaced by an empty state: it is renamed aside with a timestamp and
  `CorruptStateError` says where it went and what the operator can do. Losing IPAM state
  would make this node forget blocks it owns.

Format: UTF-8 JSON `{"kind": ..., "version": 1, "sha256": hex, "body": {...}}`; the checksum
covers the canonical JSON of the body (sorted keys, no whitespace). A slot holds the same
document on one line with a `write` number, its checksum covering the canonical JSON of
`{"body": ..., "write": n}`, padded with spaces to whole pages. A slot never shrinks, so most
saves keep its size and the sync writes data blocks only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from weavepy.fileio import atomic_write, discard_temporaries, fsync_directory
from weavepy.ipam.errors import CorruptStateError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAX_FILE_BYTES = 64 * 1024 * 1024
SLOT_PAGE = 4096


class _Invalid(Exception):
    """A file's bytes fail validation; the message says how."""


class StateFile:
    """One JSON state file (`kind` names what it holds, e.g. "ipam-core")."""

    def __init__(
        self, path: str | os.PathLike[str], kind: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = Path(path)
        self.kind = kind
        self._clock = clock

    def save(self, body: Mapping[str, Any]) -> None:
        """Atomically replace the file with `body` (JSON-serialisable)."""
        canonical = _canonical(body)
        document = {
            "kind": self.kind,
            "version": FORMAT_VERSION,
            "sha256": hashlib.sha256(canonical).hexdigest(),
            "body": body,
        }
        data = json.dumps(document, sort_keys=True, indent=1).encode() + b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, data)

    def load(self) -> dict[str, Any] | None:
        """The stored body, or None if there is no file. Raises CorruptStateError if invalid."""
        discard_temporaries(self.path)
        try:
            document = _document(_read(self.path), self.kind)
            if hashlib.sha256(_canonical(document["body"])).hexdigest() != \
                    document.get("sha256"):
                raise _Invalid("checksum mismatch")
        except FileNotFoundError:
            return None
        except _Invalid as exc:
            _reject(self.path, str(exc), self._clock)
        body: dict[str, Any] = document["body"]
        return body


def slot_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The two slot files of a `SlotStateFile` at `path`."""
    base = Path(path)
    return (base.with_name(f"{base.stem}.0{base.suffix}"),
            base.with_name(f"{base.stem}.1{base.suffix}"))


class SlotStateFile:
    """A state saved on a hot path, as two slots beside `path` (`slot_paths`; see the module
    docstring). A `StateFile` at `path` itself, written before the slots existed, is read when
    no slot exists and removed by the first save."""

    def __init__(
        self, path: str | os.PathLike[str], kind: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = Path(path)
        self.kind = kind
        self.slots = slot_paths(self.path)
        self._clock = clock
        self._write = 0  # the write number of the newest whole slot
        self._next = 0  # the slot the next save overwrites: never the newest whole one
        self._legacy = False  # a StateFile at `path` is still there

    def load(self) -> dict[str, Any] | None:
        """The newest whole slot's body (or the old single file's); None if there is none.
        Raises CorruptStateError, with the slots moved aside, if slots exist and none is
        whole."""
        whole: list[tuple[int, int, dict[str, Any]]] = []  # (write, slot index, body)
        broken: list[tuple[Path, str]] = []
        for index, slot in enumerate(self.slots):
            try:
                write, body = self._read_slot(_read(slot))
            except FileNotFoundError:
                continue
            except _Invalid as exc:
                broken.append((slot, str(exc)))
                continue
            whole.append((write, index, body))
        self._legacy = self.path.exists()
        if not whole:
            first_save_cut_short = [slot for slot, _ in broken] == [self.slots[0]] and \
                not self.slots[1].exists()
            if broken and not first_save_cut_short:
                for slot, reason in broken[:-1]:
                    with contextlib.suppress(CorruptStateError):
                        _reject(slot, reason, self._clock)
                _reject(*broken[-1], self._clock)
            if broken:
                log.warning("%s: %s; the first save was cut short (a crash)", *broken[0])
            self._write, self._next = 0, 0
            return StateFile(self.path, self.kind, clock=self._clock).load()
        write, index, body = max(whole)
        for slot, reason in broken:
            log.warning("%s: %s; a save was cut short (a crash), using %s (write %d)", slot,
                        reason, self.slots[index], write)
        self._write, self._next = write, 1 - index
        return body

    def save(self, body: Mapping[str, Any]) -> None:
        """Durably overwrite the older slot with `body` (JSON-serialisable); OSError if that
        failed, and then the newest slot is still the one a load returns."""
        write = self._write + 1
        document = {"kind": self.kind, "version": FORMAT_VERSION, "write": write,
                    "sha256": hashlib.sha256(_canonical({"body": body, "write": write}))
                    .hexdigest(), "body": body}
        data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        slot = self.slots[self._next]
        try:
            fd = os.open(slot, os.O_WRONLY | os.O_CLOEXEC)
            created = False
        except FileNotFoundError:
            slot.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(slot, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            created = True
        try:
            if created:
                os.fchmod(fd, 0o600)  # whatever the umask
            size = max(os.fstat(fd).st_size, -(-len(data) // SLOT_PAGE) * SLOT_PAGE)
            padded = data.ljust(size, b" ")
            if os.pwrite(fd, padded, 0) != len(padded):
                raise OSError(f"short write to {slot}")
            if created:
                os.fsync(fd)
            else:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        if created or self._legacy:
            if self._legacy:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                self._legacy = False
            fsync_directory(slot.parent)
        self._write, self._next = write, 1 - self._next

    def _read_slot(self, raw: bytes) -> tuple[int, dict[str, Any]]:
        document = _document(raw, self.kind)
        write = document.get("write")
        if not isinstance(write, int) or write < 1:
            raise _Invalid(f"write number {write!r}")
        expected = hashlib.sha256(_canonical({"body": document["body"], "write": write}))
        if expected.hexdigest() != document.get("sha256"):
            raise _Invalid("checksum mismatch")
        return write, document["body"]


def _read(path: Path) -> bytes:
    """The file's bytes (FileNotFoundError if absent); _Invalid if it is implausibly large."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise _Invalid(f"{size} bytes, more than {MAX_FILE_BYTES}")
    return path.read_bytes()


def _document(raw: bytes, kind: str) -> dict[str, Any]:
    """The document in `raw`, with its kind, version and body checked (not its checksum)."""
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Invalid(f"not JSON ({exc}); truncated or overwritten?") from None
    if not isinstance(document, dict):
        raise _Invalid("not a JSON object")
    if document.get("kind") != kind:
        raise _Invalid(f"holds {document.get('kind')!r}, expected {kind!r}")
    if document.get("version") != FORMAT_VERSION:
        raise _Invalid(f"format version {document.get('version')!r}, expected {FORMAT_VERSION}")
    if not isinstance(document.get("body"), dict):
        raise _Invalid("no body")
    return document


def _reject(path: Path, reason: str, clock: Callable[[], float]) -> NoReturn:
    """Move `path` aside with a timestamp and raise CorruptStateError saying where."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(clock()))
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    counter = 1
    while aside.exists():
        counter += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{counter}")
    try:
        os.replace(path, aside)
        fsync_directory(path.parent)
        moved: str | None = str(aside)
    except OSError:
        moved = None
    raise CorruptStateError(str(path), moved, reason)


def _canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
