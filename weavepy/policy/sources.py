"""Where policy state comes from: the objects by kind (`PolicyStore`, sans-IO) and a directory
of Kubernetes-format YAML, watched for changes (`DirectorySource`).

This module owns turning documents into a `ClusterState`. The rule it keeps: **a bad object
or file is one logged line, and the last good state stays.** A file that stops parsing keeps
contributing the objects it held when it last parsed, until it parses again or is removed; an
object that fails to parse keeps its previous version.

The directory (for hosts without Kubernetes, and for tests): every `*.yaml`, `*.yml` and
`*.json` file below it (hidden ones skipped), each with one or more documents (`---`), each a
Namespace, a NetworkPolicy, a Pod, or a `kind: List` of them. A Pod document gives labels and
named container ports to a pod known by namespace/name or by CNI container ID (annotation
`weavepy.io/container-id`); its address and node may be written in it (`status.podIP`,
`spec.nodeName`) or come from this node's CNI attachments (`model.attach`). When two files
define the same object, the first by path wins and the other is reported.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import trio
import yaml

from weavepy.policy.model import (
    ClusterState,
    Namespace,
    NetworkPolicy,
    Pod,
    PolicyInputError,
    parse_namespace,
    parse_network_policy,
    parse_object,
    parse_pod,
)

__all__ = ["KINDS", "DirectorySource", "Kind", "PolicyStore", "load_file"]

log = logging.getLogger(__name__)

Kind = Literal["NetworkPolicy", "Pod", "Namespace"]
KINDS: tuple[Kind, ...] = ("NetworkPolicy", "Pod", "Namespace")
SUFFIXES = (".yaml", ".yml", ".json")
PolicyObject = NetworkPolicy | Pod | Namespace


def _key(obj: PolicyObject) -> str:
    return obj.name if isinstance(obj, Namespace) else obj.key


def _object_key(kind: Kind, raw: Mapping[str, Any]) -> str | None:
    """namespace/name (or name, for a Namespace) of a raw object, if it has one."""
    meta = raw.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
        return None
    if kind == "Namespace":
        return str(meta["name"])
    namespace = meta.get("namespace", "default")
    return f"{namespace}/{meta['name']}"


def _parse(kind: Kind, raw: Mapping[str, Any]) -> PolicyObject | None:
    if kind == "NetworkPolicy":
        return parse_network_policy(raw)
    if kind == "Pod":
        return parse_pod(raw)
    return parse_namespace(raw)


class PolicyStore:
    """The objects of each kind by key, fed lists and watch events (sans-IO)."""

    def __init__(self) -> None:
        self._objects: dict[Kind, dict[str, PolicyObject]] = {k: {} for k in KINDS}
        self.errors: dict[str, str] = {}  # key -> the last parse error, while it stands

    def _parsed(self, kind: Kind, raw: Mapping[str, Any]) -> tuple[str | None,
                                                                   PolicyObject | None, bool]:
        """(key, object or None for an object policy ignores, parsed fine)."""
        key = _object_key(kind, raw)
        try:
            obj = _parse(kind, raw)
        except PolicyInputError as exc:
            if key is not None and self.errors.get(f"{kind} {key}") != str(exc):
                log.warning("policy source: %s (keeping its last good version)", exc)
            if key is not None:
                self.errors[f"{kind} {key}"] = str(exc)
            return key, None, False
        if key is not None:
            self.errors.pop(f"{kind} {key}", None)
        return key, obj, True

    def replace(self, kind: Kind, objects: Iterable[Mapping[str, Any]]) -> bool:
        """A full list of `kind`; True if the store changed."""
        before = dict(self._objects[kind])
        fresh: dict[str, PolicyObject] = {}
        for raw in objects:
            key, obj, ok = self._parsed(kind, raw)
            if key is None:
                continue
            if ok and obj is not None:
                fresh[key] = obj
            elif not ok and key in before:
                fresh[key] = before[key]
        self._objects[kind] = fresh
        return fresh != before

    def apply(self, kind: Kind, event: str, raw: Mapping[str, Any]) -> bool:
        """One watch event (ADDED, MODIFIED, DELETED); True if the store changed."""
        objects = self._objects[kind]
        if event == "DELETED":
            key = _object_key(kind, raw)
            if key is not None:
                self.errors.pop(f"{kind} {key}", None)
            return key is not None and objects.pop(key, None) is not None
        if event not in ("ADDED", "MODIFIED"):
            return False
        key, obj, ok = self._parsed(kind, raw)
        if key is None or not ok:
            return False
        if obj is None:
            return objects.pop(key, None) is not None
        changed = objects.get(key) != obj
        objects[key] = obj
        return changed

    def snapshot(self) -> ClusterState:
        return _state(*(self._objects[k].values() for k in KINDS))


def _state(*groups: Iterable[PolicyObject]) -> ClusterState:
    objects = [obj for group in groups for obj in group]
    return ClusterState(
        tuple(sorted((o for o in objects if isinstance(o, NetworkPolicy)), key=_key)),
        tuple(sorted((o for o in objects if isinstance(o, Pod)), key=_key)),
        tuple(sorted((o for o in objects if isinstance(o, Namespace)), key=_key)))


# -- the directory ---------------------------------------------------------------------------


def load_file(path: Path) -> list[PolicyObject]:
    """Every object of one file; PolicyInputError (naming the file) for the first problem."""
    try:
        documents = list(yaml.safe_load_all(path.read_text()))
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyInputError(f"{path}: cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PolicyInputError(f"{path}:{where}: not YAML: {problem}") from None
    found: list[PolicyObject] = []
    for index, document in enumerate(documents):
        if document is None:
            continue
        items = (document.get("items") if isinstance(document, Mapping)
                 and document.get("kind") == "List" else [document])
        for item in items if isinstance(items, list) else [items]:
            try:
                obj = parse_object(item)
            except PolicyInputError as exc:
                raise PolicyInputError(f"{path} (document {index + 1}): {exc}") from None
            if obj is not None:
                found.append(obj)
    return found


@dataclass
class _FileState:
    stamp: tuple[int, int]
    objects: list[PolicyObject]
    error: str | None = None


class DirectorySource:
    """A directory of Kubernetes-format YAML, watched for changes: with inotify where it
    works (a change is read within about `SETTLE` s, and idle costs nothing), else polled
    every `interval` s; with inotify, a whole re-read every `backstop` s still catches what
    inotify cannot see (an NFS mount, a directory created after start)."""

    def __init__(self, directory: Path, *, interval: float = 1.0,
                 backstop: float = 10.0) -> None:
        self.directory = Path(directory)
        self.interval = interval
        self.backstop = backstop
        self._files: dict[Path, _FileState] = {}
        self.state = ClusterState()
        self.duplicates: list[str] = []
        self.polls = 0
        self.notified = False  # inotify covers the directory

    @property
    def errors(self) -> dict[str, str]:
        """file -> the error that keeps its last good objects in force."""
        return {str(p): f.error for p, f in self._files.items() if f.error is not None}

    def _paths(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.rglob("*")
                      if p.suffix in SUFFIXES and p.is_file()
                      and not any(part.startswith(".")
                                  for part in p.relative_to(self.directory).parts))

    def poll(self) -> bool:
        """Read what changed since the last poll; True when the state changed."""
        self.polls += 1
        seen: dict[Path, _FileState] = {}
        changed = False
        for path in self._paths():
            try:
                stat = path.stat()
            except OSError:
                continue
            stamp = (stat.st_mtime_ns, stat.st_size)
            known = self._files.get(path)
            if known is not None and known.stamp == stamp:
                seen[path] = known
                continue
            try:
                objects = load_file(path)
            except PolicyInputError as exc:
                log.warning("policy directory: %s (keeping the file's last good objects)", exc)
                seen[path] = _FileState(stamp, known.objects if known else [], str(exc))
                continue
            seen[path] = _FileState(stamp, objects)
            changed = changed or known is None or known.objects != objects
        changed = changed or set(seen) != set(self._files)
        self._files = seen
        if changed:
            self.state = self._merge()
        return changed

    def _merge(self) -> ClusterState:
        chosen: dict[tuple[str, str], tuple[Path, PolicyObject]] = {}
        self.duplicates = []
        for path, entry in self._files.items():
            for obj in entry.objects:
                identity = (type(obj).__name__, _key(obj))
                if identity in chosen:
                    first = chosen[identity][0]
                    self.duplicates.append(f"{identity[0]} {identity[1]} in {path} is also in "
                                           f"{first}; using {first}")
                    continue
                chosen[identity] = (path, obj)
        for line in self.duplicates:
            log.warning("policy directory: %s", line)
        return _state(obj for _, obj in chosen.values())

    @trio.as_safe_channel
    async def watch(self) -> AsyncGenerator[ClusterState, None]:
        """The state now, then again after each change; runs until cancelled."""
        notify = _DirectoryNotify(self.directory)
        try:
            # Watches go on before each read (events queue in the fd meanwhile), so that
            # nothing written after a read is missed, even while the consumer is busy.
            self.notified = notify.cover()
            await trio.to_thread.run_sync(self.poll)
            yield self.state
            while True:
                await notify.wait(self.backstop if self.notified else self.interval)
                self.notified = notify.cover()
                if await trio.to_thread.run_sync(self.poll):
                    yield self.state
        finally:
            notify.close()


# inotify events after which a file or directory below the root may read differently
_IN_ATTRIB, _IN_CLOSE_WRITE, _IN_MOVED_FROM, _IN_MOVED_TO = 0x4, 0x8, 0x40, 0x80
_IN_CREATE, _IN_DELETE, _IN_DELETE_SELF, _IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
WATCH_MASK = (_IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE
              | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF)
SETTLE = 0.005  # after the first event, let a burst finish (an editor's save, a ConfigMap swap)


class _DirectoryNotify:
    """inotify watches on a directory and its subdirectories; the fd is waited on by trio,
    never by a thread. `wait` returns after a change or a timeout. libc's two calls through
    ctypes: the binding pyroute2 ships imports all of pyroute2 and wants a polling thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fd: int | None = None
        self._libc: Any = None

    def cover(self) -> bool:
        """Watch the root and every subdirectory (new ones too); False where inotify cannot
        (no such directory yet, no inotify)."""
        if not self.root.is_dir():
            self.close()
            return False
        try:
            if self.fd is None:
                self._libc = ctypes.CDLL(None, use_errno=True)
                fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
                if fd < 0:
                    raise OSError(ctypes.get_errno(), "inotify_init1 failed")
                self.fd = fd
            directories = [self.root, *(p for p in self.root.rglob("*") if p.is_dir())]
            for directory in directories:
                if self._libc.inotify_add_watch(self.fd, os.fsencode(directory),
                                                WATCH_MASK) < 0:
                    raise OSError(ctypes.get_errno(), f"cannot watch {directory}")
        except (OSError, AttributeError) as exc:
            log.debug("policy directory %s: no inotify (%s); polling", self.root, exc)
            self.close()
            return False
        return True

    async def wait(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            if self.fd is None:
                await trio.sleep_forever()
            await trio.lowlevel.wait_readable(self.fd)
            await trio.sleep(SETTLE)
        self._drain()

    def _drain(self) -> None:
        if self.fd is None:
            return
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass
        except OSError as exc:
            log.debug("policy directory %s: inotify read failed (%s)", self.root, exc)
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
