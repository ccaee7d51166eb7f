"""Crash-safe persistence of IPAM state in the node's state directory.

This module owns the on-disk format of one state file and the way it is replaced. The rules
it keeps:

* A write never leaves a half-written file under the real name: `fileio.atomic_write`
  replaces it durably (temporary file, fsync, rename, fsync of the directory), and the
  temporary files a crash left behind are removed when the file is next loaded.
* A file that fails validation (not JSON, wrong kind or version, checksum mismatch) is never
  silently replaced by an empty state: it is renamed aside with a timestamp and
  `CorruptStateError` says where it went and what the operator can do. Losing IPAM state
  would make this node forget blocks it owns.

Format: UTF-8 JSON `{"kind": ..., "version": 1, "sha256": hex, "body": {...}}`; the checksum
covers the canonical JSON of the body (sorted keys, no whitespace).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from weavepy.fileio import atomic_write, discard_temporaries, fsync_directory
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, data)

    def load(self) -> dict[str, Any] | None:
        """The stored body, or None if there is no file. Raises CorruptStateError if invalid."""
        discard_temporaries(self.path)
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
            fsync_directory(self.path.parent)
            moved: str | None = str(aside)
        except OSError:
            moved = None
        raise CorruptStateError(str(self.path), moved, reason)


def _canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

