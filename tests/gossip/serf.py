"""Run real `serf agent`s (Debian serf 0.9.4) on loopback as test peers, and read what they see.

This module owns serf processes for tests and benchmarks: each agent gets ports that are free
right now on 127.0.0.1 (gossip UDP+TCP, RPC TCP), `-log-level=debug`, and a log file; it is
stopped by its PID (SIGINT, then SIGKILL) by whoever started it, in a `finally`. `members()`
parses `serf members -format=json`; `problem_lines()` finds the `[ERR]`/`[WARN]` lines of a log
that a test did not expect. Nothing here uses the network beyond 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"
STOP_GRACE = 10.0
START_TIMEOUT = 10.0
PORT_RACE_RETRIES = 3

# Serf logs these when a peer does not speak serf's own layer (events, queries, coordinates);
# a memberlist-only node is allowed to cause them. Everything else at ERR/WARN is a finding.
USER_LAYER_PATTERNS = (
    r"serf: (Failed to decode|Receive) .*message",  # user messages serf does not know
    r"[Uu]nknown message type",
    r"user (state|message|event)",
    r"remote state",  # serf's push/pull user state
    r"[Cc]oordinate",  # no Vivaldi payload in our acks
)


def serf_binary() -> str | None:
    return shutil.which("serf")


def free_port(host: str = LOOPBACK) -> int:
    """A port free for both TCP and UDP on `host` right now (the caller binds it soon after)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port found")


def new_key() -> str:
    """A random serf `-encrypt` key: 32 bytes, base64."""
    return base64.b64encode(os.urandom(32)).decode()


@dataclass(frozen=True, slots=True)
class SerfMember:
    name: str
    addr: str
    port: int
    status: str
    tags: dict[str, str]


class SerfAgent:
    """One running `serf agent`, owned by the test that started it."""

    def __init__(
        self,
        name: str,
        log_dir: Path,
        *,
        join: Sequence[str] = (),
        encrypt: str | None = None,
        profile: str = "lan",
        tags: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        log_level: str = "debug",
        command_prefix: Sequence[str] = (),
        port: int | None = None,
        rpc_port: int | None = None,
    ) -> None:
        binary = serf_binary()
        if binary is None:
            raise RuntimeError("serf is not installed")
        self.binary = binary
        self.prefix = list(command_prefix)  # e.g. `ip netns exec NS`, which execs in place
        self.name = name
        # Explicit ports for a private network namespace, where free_port() cannot look.
        self._auto_ports = port is None and rpc_port is None
        self.port = port if port is not None else free_port()
        self.rpc_port = rpc_port if rpc_port is not None else free_port()
        self.log_path = log_dir / f"serf-{name}.log"
        self._options = [f"-profile={profile}", f"-log-level={log_level}"]
        self._options += [f"-join={seed}" for seed in join]
        if encrypt is not None:
            self._options.append(f"-encrypt={encrypt}")
        for key, value in (tags or {}).items():
            self._options += ["-tag", f"{key}={value}"]
        self._options += list(extra_args)
        self._log = self.log_path.open("wb")
        self._log_offset = 0
        self._log_rest = b""
        self.log_lines: list[tuple[float, str]] = []  # (time.monotonic() seen, line)
        self.process = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        args = [
            *self.prefix,
            self.binary,
            "agent",
            f"-node={self.name}",
            f"-bind={LOOPBACK}:{self.port}",
            f"-rpc-addr={LOOPBACK}:{self.rpc_port}",
            *self._options,
        ]
        return subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def rpc_address(self) -> str:
        return f"{LOOPBACK}:{self.rpc_port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until the agent answers RPC (it has joined its seeds by then)."""
        deadline = time.monotonic() + timeout
        respawns = PORT_RACE_RETRIES
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                # free_port() only said the ports were free *then*; someone may have taken one.
                if self._auto_ports and respawns and "address already in use" in self.log_text():
                    respawns -= 1
                    self.port, self.rpc_port = free_port(), free_port()
                    self.process = self._spawn()
                    continue
                raise RuntimeError(
                    f"serf {self.name} exited with {self.process.returncode}: {self.log_tail()}"
                )
            try:
                self.members()
                return
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError):
                time.sleep(0.1)
        raise TimeoutError(f"serf {self.name} did not answer RPC in {timeout} s")

    def members(self) -> dict[str, SerfMember]:
        """`serf members -format=json`, by name."""
        out = subprocess.run(
            [*self.prefix, self.binary, "members", f"-rpc-addr={self.rpc_address}",
             "-format=json"],
            capture_output=True,
            check=True,
            timeout=5,
        ).stdout
        return parse_members(out)

    def join(self, address: str) -> subprocess.CompletedProcess[bytes]:
        """`serf join ADDRESS` through this agent's RPC (does not raise on failure)."""
        return subprocess.run(
            [*self.prefix, self.binary, "join", f"-rpc-addr={self.rpc_address}", address],
            capture_output=True,
            timeout=15,
        )

    def wait_status(self, name: str, statuses: Iterable[str], timeout: float) -> float:
        """Poll until member `name` has one of `statuses`; return the seconds it took."""
        wanted = set(statuses)
        started = time.monotonic()
        last = None
        while time.monotonic() - started < timeout:
            member = self.members().get(name)
            last = member.status if member is not None else None
            if last in wanted:
                return time.monotonic() - started
            time.sleep(0.1)
        raise TimeoutError(
            f"serf {self.name}: {name} is {last!r}, not {sorted(wanted)}, after {timeout} s"
        )

    def poll_log(self) -> list[tuple[float, str]]:
        """Read the log lines written since the last call, stamped with the time we saw them."""
        now = time.monotonic()
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            chunk = log.read()
        self._log_offset += len(chunk)
        *complete, self._log_rest = (self._log_rest + chunk).split(b"\n")
        fresh = [(now, line.decode(errors="replace")) for line in complete]
        self.log_lines.extend(fresh)
        return fresh

    def wait_log(self, pattern: str, timeout: float, after: float = 0.0) -> float:
        """Poll the log until a line matching `pattern` shows up (seen at or after `after`);
        return when we saw it (time.monotonic())."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            self.poll_log()
            for seen, line in self.log_lines[checked:]:
                if seen >= after and regex.search(line):
                    return seen
            checked = len(self.log_lines)
            if time.monotonic() > deadline:
                raise TimeoutError(f"serf {self.name}: no log line matching {pattern!r}")
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL this agent (a crash) and reap it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        """SIGINT (serf leaves gracefully), then SIGKILL after a grace period; always reap."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
                self.process.wait()
        self._log.close()

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def parse_members(out: bytes | str) -> dict[str, SerfMember]:
    """Parse `serf members -format=json` output."""
    data = json.loads(out)
    members: dict[str, SerfMember] = {}
    for entry in data.get("members", []):
        host, _, port = str(entry["addr"]).rpartition(":")
        members[entry["name"]] = SerfMember(
            name=entry["name"],
            addr=host.strip("[]"),
            port=int(entry.get("port") or port),
            status=entry["status"],
            tags=dict(entry.get("tags") or {}),
        )
    return members


def problem_lines(log: str, allowed: Iterable[str] = ()) -> list[str]:
    """The `[ERR]` and `[WARN]` lines of a serf log that match neither the user-layer patterns
    (things a memberlist-only peer legitimately causes) nor `allowed` (regexes)."""
    patterns = [re.compile(p) for p in (*USER_LAYER_PATTERNS, *allowed)]
    found = []
    for line in log.splitlines():
        if "[ERR]" not in line and "[WARN]" not in line:
            continue
        if not any(p.search(line) for p in patterns):
            found.append(line)
    return found


@contextmanager
def serf_fleet(log_dir: Path) -> Iterator[list[SerfAgent]]:
    """A list to start agents into; every agent in it is stopped by PID on exit."""
    agents: list[SerfAgent] = []
    try:
        yield agents
    finally:
        for agent in agents:
            agent.stop()
