"""Crash-safe persistence of IPAM state in the node's state directory.

This module owns the on-disk format of one state file and the way it is replaced. The rules
it keeps:

* A write never leaves a half-written file under the real name: write a temporary file in
  the same directory, flush and fsync it, rename it over the old one, then fsync the
  directory so the rename itself survives a power cut.
* A file that fails validation (not JSON, wrong kind or version, checksum mismatch) is never
  silently replaced by an empty state: it is renamed aside with a timestamp and
  `CorruptStateError` says where it went and what the operator can do. Losing IPAM state
  would make this node forget blocks it owns.

Format: UTF-8 JSON `{"kind": ..., "version": 1, "sha256": hex, "body": {...}}`; the checksum
covers the canonical JSON of the body (sorted keys, no whitespace).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from weavepy.ipam.errors import CorruptStateError

FORMAT_VERSION = 1
MAX_FILE_BYTES = 64 * 1024 * 1024


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
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        temporary = directory / f".{self.path.name}.tmp-{os.getpid()}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            raise
        _fsync_directory(directory)

    def load(self) -> dict[str, Any] | None:
        """The stored body, or None if there is no file. Raises CorruptStateError if invalid."""
        self._remove_stale_temporaries()
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return None
        if size > MAX_FILE_BYTES:
            self._reject(f"{size} bytes, more than {MAX_FILE_BYTES}")
        raw = self.path.read_bytes()
        try:
            document = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._reject(f"not JSON ({exc}); truncated or overwritten?")
        if not isinstance(document, dict):
            self._reject("not a JSON object")
        if document.get("kind") != self.kind:
            self._reject(f"holds {document.get('kind')!r}, expected {self.kind!r}")
        if document.get("version") != FORMAT_VERSION:
            self._reject(f"format version {document.get('version')!r}, expected {FORMAT_VERSION}")
        body = document.get("body")
        if not isinstance(body, dict):
            self._reject("no body")
        if hashlib.sha256(_canonical(body)).hexdigest() != document.get("sha256"):
            self._reject("checksum mismatch")
        return body

    def _reject(self, reason: str) -> NoReturn:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        counter = 1
        while aside.exists():
            counter += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{counter}")
        try:
            os.replace(self.path, aside)
            _fsync_directory(self.path.parent)
            moved: str | None = str(aside)
        except OSError:
            moved = None
        raise CorruptStateError(str(self.path), moved, reason)

    def _remove_stale_temporaries(self) -> None:
        for leftover in self.path.parent.glob(f".{self.path.name}.tmp-*"):
            with contextlib.suppress(OSError):
                leftover.unlink()


def _canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
