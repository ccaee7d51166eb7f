"""Run `python -m gossip agent` as a child process and read its JSON event lines as they come.

This module owns agent processes for tests and benchmarks: each is started with the current
interpreter, its stdout is read by a thread that stamps every JSON line with the monotonic time
it arrived, its stderr goes to a log file, and it is stopped by its PID (SIGTERM for a graceful
leave, SIGKILL for a crash) by whoever started it, in a `finally`.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"
STOP_GRACE = 10.0


@dataclass(frozen=True, slots=True)
class AgentEvent:
    event: str
    name: str
    addr: str
    port: int
    tags: dict[str, str]
    time: float  # the agent's wall-clock stamp
    received: float  # time.monotonic() when the line reached us


class AgentProcess:
    """One running `python -m gossip agent`, owned by the code that started it."""

    def __init__(
        self,
        name: str,
        log_dir: Path,
        *,
        bind: str = f"{LOOPBACK}:0",
        join: Sequence[str] = (),
        tags: dict[str, str] | None = None,
        keyring_file: Path | None = None,
        profile: str = "lan",
        log_level: str = "info",
        extra_args: Sequence[str] = (),
        command_prefix: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.stderr_path = log_dir / f"agent-{name}.log"
        args = [
            *command_prefix,
            sys.executable,
            "-m",
            "gossip",
            "agent",
            "--name",
            name,
            "--bind",
            bind,
            "--profile",
            profile,
            "--log-level",
            log_level,
        ]
        for seed in join:
            args += ["--join", seed]
        for key, value in (tags or {}).items():
            args += ["--tag", f"{key}={value}"]
        if keyring_file is not None:
            args += ["--keyring-file", str(keyring_file)]
        args += list(extra_args)
        self._stderr = self.stderr_path.open("wb")
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env=env,
        )
        self.events: list[AgentEvent] = []
        self.raw_lines: list[str] = []  # every stdout line, as printed
        self._lines: queue.Queue[AgentEvent | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            received = time.monotonic()
            self.raw_lines.append(raw.decode(errors="replace").rstrip("\n"))
            try:
                data: dict[str, Any] = json.loads(raw)
                event = AgentEvent(
                    event=data["event"],
                    name=data["name"],
                    addr=data["addr"],
                    port=int(data["port"]),
                    tags=dict(data["tags"]),
                    time=float(data["time"]),
                    received=received,
                )
            except (ValueError, KeyError, TypeError):
                continue  # not an event line; the tests that care read stdout themselves
            self._lines.put(event)
        self._lines.put(None)

    def _pump(self, timeout: float) -> bool:
        """Move one line into `events`; False on timeout or end of output."""
        try:
            event = self._lines.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return False
        if event is None:
            self._lines.put(None)  # keep reporting the end
            return False
        self.events.append(event)
        return True

    def wait_event(
        self, kinds: Iterable[str], name: str, timeout: float, after: float = 0.0
    ) -> AgentEvent:
        """The first event of one of `kinds` about `name` received at or after `after`."""
        wanted = set(kinds)
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event.event in wanted and event.name == name and event.received >= after:
                    return event
            seen = len(self.events)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            pumped = self._pump(min(remaining, 0.5))
            if not pumped and self.process.poll() is not None and self._lines.qsize() <= 1:
                break
        raise TimeoutError(
            f"agent {self.name}: no {sorted(wanted)} event for {name} in {timeout} s "
            f"(exit status {self.process.poll()}): {self.stderr_tail()}"
        )

    def wait_started(self, timeout: float = 20.0) -> None:
        """Wait for our own join line, which carries the port we bound."""
        event = self.wait_event(["join"], self.name, timeout)
        self.port = event.port

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def terminate(self, timeout: float = STOP_GRACE) -> int:
        """SIGTERM (a graceful leave); return the exit status (SIGKILL if it hangs)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
        return self.process.wait()

    def stop(self) -> None:
        """Make sure the process is gone (SIGTERM, then SIGKILL) and release its files."""
        self.terminate()
        self._reader.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()

    def stderr_text(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def stderr_tail(self, lines: int = 10) -> str:
        return " | ".join(self.stderr_text().splitlines()[-lines:])
