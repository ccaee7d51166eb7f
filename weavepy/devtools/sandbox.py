"""The sandbox: a cluster of simulated hosts built from network namespaces on one machine.

It owns everything a test, the demo, a chaos run or a benchmark creates on the machine, and it
keeps one rule: **every object it makes carries the run's prefix and is removed by `destroy()` or
`Sandbox.down(prefix)`, even after a crash**.

Layout for a run with prefix ``wp1a2b3c`` and N nodes::

    netns wp1a2b3c-hub : bridge wp1a2b3c-br, ports wp1a2b3c-v1 .. -vN   (the "switch")
    netns wp1a2b3c-n1  : eth0 198.18.0.11/24 (peer of wp1a2b3c-v1), lo   (a "host")
    ...

Nothing is created in the machine's own network namespace. Processes started in a node are
recorded (PID and kernel start time) in ``/run/weavepy-sandbox/<prefix>/processes`` so that
`down` can stop exactly those processes after a crash, and nothing else.

Impairments (this kernel has no netem, see docs/sandbox.md) are nftables rules inside the node's
namespace: loss and partitions drop on the ingress hook of the node's underlay link and on its
egress (postrouting), duplication uses ``dup to``; delay, jitter and reordering go through an
NFQUEUE delayer process (`weavepy.devtools.delayer`) that the sandbox starts in the node.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import logging
import os
import pickle
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUN_DIR = Path("/run/weavepy-sandbox")
LOG_ROOT = Path("/tmp/weavepy-sandbox")
PREFIX_FAMILY = "wp"  # every sandbox prefix starts with this; `down --all` removes the family
CLONE_NEWNET = 0x40000000
NODE_IFACE = "eth0"
STOP_GRACE = 3.0  # seconds the processes of a sandbox being destroyed get after SIGTERM
DEFAULT_UNDERLAY = "198.18.0.0/24"
DEFAULT_POD_RANGE = "198.19.0.0/16"
NFQUEUE_NUM = 7


class SandboxError(RuntimeError):
    """A sandbox operation failed; the message says which command and why."""


def new_prefix() -> str:
    """A fresh per-run prefix: short enough that prefixed link names fit in 15 characters."""
    return PREFIX_FAMILY + secrets.token_hex(3)


def _run(argv: Sequence[str], *, check: bool = True, input: str | None = None,
         timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, input=input,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise SandboxError(f"`{' '.join(argv)}` failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def _netns_list() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _proc_start_time(pid: int) -> int | None:
    """The kernel start time of `pid` (field 22 of /proc/PID/stat), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def enter_netns(netns: str) -> None:
    """Move the calling thread (in practice: a freshly forked child) into a named netns."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns}): {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass(eq=False)
class ManagedProcess:
    """A long-running process the sandbox started inside a node; stopped only by its PID."""

    label: str
    netns: str
    pid: int
    log_path: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return _proc_start_time(self.pid) is not None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def pause(self) -> None:
        """SIGSTOP: freeze the process (an event-loop stall as its peers see it)."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, then reap."""
        self.signal(signal.SIGKILL)
        self.wait(timeout=10)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM (after SIGCONT, in case it is paused), then SIGKILL after `timeout`."""
        if not self.alive():
            return self.wait(timeout=0.1)
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        if self.popen is not None:
            return self.popen.wait(timeout=timeout)
        deadline = time.monotonic() + (timeout or 0)
        while self.alive():
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.05)
        return None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class Impairment:
    """What is currently done to a node's underlay traffic; rendered as nftables rules."""

    loss: float = 0.0
    duplicate: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    reorder: float = 0.0
    blocked_from: set[str] = field(default_factory=set)  # drop arriving packets from these IPs
    blocked_to: set[str] = field(default_factory=set)  # drop leaving packets to these IPs

    def delays(self) -> bool:
        return self.delay_ms > 0 or self.jitter_ms > 0


@dataclass(eq=False)
class SandboxNode:
    """One simulated host: a network namespace with an underlay link to the hub bridge."""

    box: Sandbox
    index: int
    name: str
    netns: str
    underlay_ip: str
    hub_port: str
    iface: str = NODE_IFACE
    impairment: Impairment = field(default_factory=Impairment)
    _delayer: ManagedProcess | None = field(default=None, repr=False)

    # --- running things -------------------------------------------------------------------
    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 30,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside this node and wait for it."""
        return _run(["ip", "netns", "exec", self.netns, *argv], check=check, input=input,
                    timeout=timeout)

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 30) -> Any:
        """Run a picklable callable in a forked child inside this node; return its result."""
        return call_in_netns(self.netns, fn, *args, timeout=timeout)

    def start(self, label: str, argv: Sequence[str], env: dict[str, str] | None = None,
              cwd: str | None = None) -> ManagedProcess:
        """Start a long-running process in this node, logging to the run's log directory."""
        return self.box._start(self, label, argv, env=env, cwd=cwd)

    # --- the underlay link ----------------------------------------------------------------
    def cut(self) -> None:
        """Take the node's underlay link down on the hub side (the cable is pulled)."""
        self.box._hub(["link", "set", self.hub_port, "down"])

    def restore(self) -> None:
        self.box._hub(["link", "set", self.hub_port, "up"])

    def netem(self, loss: float = 0.0, delay_ms: float = 0.0, jitter_ms: float = 0.0,
              duplicate: float = 0.0, reorder: float = 0.0) -> None:
        """Impair this node's underlay traffic, both directions for loss; outgoing for the rest.

        `loss`, `duplicate` and `reorder` are fractions (0.05 is 5 %). `reorder` sends that
        fraction of packets at once while the rest wait `delay_ms` (netem's meaning); it needs
        a delay.
        """
        for value in (loss, duplicate, reorder):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"fractions must be within 0..1, got {value}")
        if delay_ms < 0 or jitter_ms < 0:
            raise ValueError("delay and jitter must not be negative")
        imp = self.impairment
        imp.loss, imp.duplicate = loss, duplicate
        imp.delay_ms, imp.jitter_ms, imp.reorder = delay_ms, jitter_ms, reorder
        self._apply()

    def clear_netem(self) -> None:
        self.netem()

    def _apply(self) -> None:
        self.run(["nft", "-f", "-"], input=render_nft(self.impairment, self.iface))
        _run(["ip", "netns", "exec", self.box.hub_netns, "nft", "-f", "-"],
             input=render_hub_nft(self.impairment, self.hub_port))
        self._sync_delayer()

    def _sync_delayer(self) -> None:
        imp = self.impairment
        if not imp.delays():
            if self._delayer is not None:
                self._delayer.stop()
                self._delayer = None
            self.run(["iptables-legacy", "-t", "mangle", "-F", "POSTROUTING"], check=False)
            return
        if self._delayer is not None:
            self._delayer.stop()
        self._delayer = self.start(
            "delayer",
            [sys.executable, "-m", "weavepy.devtools.delayer", "--queue", str(NFQUEUE_NUM),
             "--delay-ms", str(imp.delay_ms), "--jitter-ms", str(imp.jitter_ms),
             "--reorder", str(imp.reorder)],
        )
        deadline = time.monotonic() + 10
        while "bound" not in self._delayer.log_text():
            if not self._delayer.alive() or time.monotonic() > deadline:
                raise SandboxError(f"the delayer in {self.name} did not start: "
                                   f"{self._delayer.log_text()[-500:]}")
            time.sleep(0.02)
        self.run(["iptables-legacy", "-t", "mangle", "-F", "POSTROUTING"], check=False)
        self.run(["iptables-legacy", "-t", "mangle", "-A", "POSTROUTING", "-o", self.iface,
                  "-j", "NFQUEUE", "--queue-num", str(NFQUEUE_NUM), "--queue-bypass"])

    def addresses(self) -> list[str]:
        out = self.run(["ip", "-j", "addr", "show"]).stdout
        return [f"{a['local']}/{a['prefixlen']}" for link in json.loads(out)
                for a in link.get("addr_info", [])]


def render_nft(imp: Impairment, iface: str) -> str:
    """Node-side nftables rules: what arrives is dropped on ingress (silently, as on a real
    wire), and duplication happens on the way out. Replaces the previous rules atomically.
    Random loss spares ARP, so an impaired link degrades IP traffic instead of flapping
    neighbour resolution (netem would drop ARP too; tests want the IP loss rate they ask for)."""
    lines = [
        "table netdev wpsandbox {}", "delete table netdev wpsandbox",
        "table ip wpsandbox {}", "delete table ip wpsandbox",
        "table netdev wpsandbox {",
        f'  chain ingress {{ type filter hook ingress device "{iface}" priority 0;',
    ]
    lines += [f"    ip saddr {src} counter drop" for src in sorted(imp.blocked_from)]
    if imp.loss > 0:
        lines.append(f"    meta protocol ip {_chance(imp.loss)}counter drop")
    lines += ["  }", "}", "table ip wpsandbox {",
              "  chain out { type filter hook postrouting priority 0;"]
    if imp.duplicate > 0:
        lines.append(f'    oifname "{iface}" {_chance(imp.duplicate)}'
                     f'counter dup to ip daddr device "{iface}"')
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def render_hub_nft(imp: Impairment, port: str) -> str:
    """Hub-side rules on a node's switch port: what the node sends is dropped as it enters
    the switch, so the sender sees no error (a local drop would fail its sendto with EPERM)."""
    table = f"wpsb_{port.rsplit('-', 1)[-1]}"
    lines = [
        f"table netdev {table} {{}}", f"delete table netdev {table}",
        f"table netdev {table} {{",
        f'  chain ingress {{ type filter hook ingress device "{port}" priority 0;',
    ]
    lines += [f"    ip daddr {dst} counter drop" for dst in sorted(imp.blocked_to)]
    if imp.loss > 0:
        lines.append(f"    meta protocol ip {_chance(imp.loss)}counter drop")
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def _chance(fraction: float) -> str:
    """An nftables match that holds with probability `fraction` (nothing when it is 1)."""
    per10k = max(0, min(10000, round(fraction * 10000)))
    return "" if per10k >= 10000 else f"numgen random mod 10000 < {per10k} "


def call_in_netns(netns: str, fn: Callable[..., Any], *args: Any, timeout: float = 30) -> Any:
    """Fork, enter `netns` in the child, run `fn(*args)` there, and return its result."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(read_fd)
            try:
                enter_netns(netns)
                payload = pickle.dumps((True, fn(*args)))
            except BaseException as exc:
                payload = pickle.dumps((False, exc))
                code = 1
            with os.fdopen(write_fd, "wb") as out:
                out.write(payload)
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    import select

    with os.fdopen(read_fd, "rb") as src:
        while True:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([src], [], [], max(0.0, remaining))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise TimeoutError(f"call in {netns} took longer than {timeout}s")
            chunk = os.read(src.fileno(), 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    os.waitpid(pid, 0)
    if not chunks:
        raise SandboxError(f"call in {netns} died without a result")
    ok, value = pickle.loads(b"".join(chunks))
    if not ok:
        raise value
    return value


class Sandbox:
    """N simulated hosts on one underlay bridge. Create with `Sandbox.create()`."""

    def __init__(self, prefix: str, underlay: ipaddress.IPv4Network,
                 pod_range: ipaddress.IPv4Network, mtu: int) -> None:
        self.prefix = prefix
        self.underlay = underlay
        self.pod_range = pod_range
        self.mtu = mtu
        self.hub_netns = f"{prefix}-hub"
        self.bridge = f"{prefix}-br"
        self.nodes: list[SandboxNode] = []
        self.processes: list[ManagedProcess] = []
        self.run_dir = RUN_DIR / prefix
        self.logdir = LOG_ROOT / prefix
        self._destroyed = False

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def create(cls, nodes: int = 3, prefix: str | None = None,
               underlay: str = DEFAULT_UNDERLAY, pod_range: str = DEFAULT_POD_RANGE,
               mtu: int = 1500, static_neighbours: bool = False) -> Sandbox:
        """`static_neighbours` gives every node a permanent neighbour entry for every other
        node's underlay address, so no ARP runs on the underlay. One kernel's IPv4 neighbour
        table is shared by all namespaces and holds gc_thresh3 (1,024 by default) resolved
        entries, settable only in the machine's own namespace; permanent entries do not count
        against it. A full mesh of more than about 32 nodes needs this."""
        if not 1 <= nodes <= 200:
            raise ValueError(f"a sandbox has 1 to 200 nodes, not {nodes}")
        prefix = prefix or new_prefix()
        if not prefix.startswith(PREFIX_FAMILY) or len(prefix) > 9 or not prefix.isalnum():
            raise ValueError(f"prefix must be alphanumeric, start with '{PREFIX_FAMILY}' and "
                             f"have at most 9 characters: {prefix!r}")
        net = ipaddress.IPv4Network(underlay)
        pods = ipaddress.IPv4Network(pod_range)
        if nodes + 10 >= net.num_addresses:
            raise ValueError(f"underlay {net} is too small for {nodes} nodes")
        if any(ns.startswith(prefix + "-") for ns in _netns_list()):
            raise SandboxError(f"namespaces with prefix {prefix} already exist; "
                               f"run `weavepy sandbox down {prefix}` first")
        box = cls(prefix, net, pods, mtu)
        try:
            box._build(nodes)
            if static_neighbours:
                box._pin_neighbours()
        except BaseException:
            box.destroy()
            raise
        return box

    def _build(self, count: int) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.logdir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "meta.json").write_text(json.dumps(
            {"prefix": self.prefix, "nodes": count, "underlay": str(self.underlay),
             "pod_range": str(self.pod_range), "mtu": self.mtu, "created": time.time()}))
        _run(["ip", "netns", "add", self.hub_netns])
        hub_batch = [
            f"link add {self.bridge} type bridge",
            f"link set {self.bridge} mtu {self.mtu} up",
            "link set lo up",
        ]
        for i in range(1, count + 1):
            netns = f"{self.prefix}-n{i}"
            _run(["ip", "netns", "add", netns])
            port = f"{self.prefix}-v{i}"
            ip = str(self.underlay.network_address + 10 + i)
            self.nodes.append(SandboxNode(self, i, f"n{i}", netns, ip, port))
            hub_batch += [
                f"link add {port} mtu {self.mtu} type veth peer name {NODE_IFACE} mtu {self.mtu} "
                f"netns {netns}",
                f"link set {port} master {self.bridge} up",
            ]
        self._hub_batch(hub_batch)
        for node in self.nodes:
            _run(["ip", "-n", node.netns, "-batch", "-"], input="\n".join([
                "link set lo up",
                f"addr add {node.underlay_ip}/{self.underlay.prefixlen} dev {NODE_IFACE}",
                f"link set {NODE_IFACE} up",
            ]) + "\n")
            node.run(["sysctl", "-qw", "net.ipv4.ip_forward=1",
                      "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])

    def _pin_neighbours(self) -> None:
        macs = {node.netns: json.loads(_run(
            ["ip", "-n", node.netns, "-j", "link", "show", NODE_IFACE]).stdout)[0]["address"]
            for node in self.nodes}
        for node in self.nodes:
            _run(["ip", "-n", node.netns, "-batch", "-"], input="".join(
                f"neigh replace {peer.underlay_ip} lladdr {macs[peer.netns]} dev {NODE_IFACE} "
                "nud permanent\n" for peer in self.nodes if peer is not node))

    # --- helpers ------------------------------------------------------------------------------
    def _hub(self, args: Sequence[str]) -> None:
        _run(["ip", "-n", self.hub_netns, *args])

    def _hub_batch(self, commands: Sequence[str]) -> None:
        _run(["ip", "-n", self.hub_netns, "-batch", "-"], input="\n".join(commands) + "\n")

    def node(self, name_or_index: str | int) -> SandboxNode:
        for node in self.nodes:
            if name_or_index in (node.name, node.index, node.netns):
                return node
        raise KeyError(f"no sandbox node {name_or_index!r} in {self.prefix}")

    def add_netns(self, label: str) -> SandboxNode:
        """Create an extra namespace `<prefix>-<label>` (a pod, a client) with `lo` up.

        It has no underlay link; the caller wires it (veth to a node). `destroy()` and `down`
        remove it with the rest, because it carries the prefix."""
        if not label.replace("-", "").isalnum() or len(label) > 40:
            raise ValueError(f"namespace label must be alphanumeric (dashes allowed): {label!r}")
        netns = f"{self.prefix}-{label}"
        _run(["ip", "netns", "add", netns])
        _run(["ip", "-n", netns, "link", "set", "lo", "up"])
        return self.namespace(netns)

    def namespace(self, netns: str) -> SandboxNode:
        """A handle to run and start processes in an existing namespace of this run."""
        if not netns.startswith(self.prefix + "-"):
            raise ValueError(f"{netns} does not belong to sandbox {self.prefix}")
        for node in self.nodes:
            if node.netns == netns:
                return node
        return SandboxNode(self, 0, netns.removeprefix(self.prefix + "-"), netns, "", "")

    def _start(self, node: SandboxNode, label: str, argv: Sequence[str],
               env: dict[str, str] | None, cwd: str | None) -> ManagedProcess:
        if self._destroyed:
            raise SandboxError(f"sandbox {self.prefix} is destroyed")
        log_path = self.logdir / f"{node.name}-{label}.log"
        full_env = dict(os.environ)
        full_env.update(env or {})
        with open(log_path, "ab") as out:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", node.netns, *argv], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=full_env, cwd=cwd, start_new_session=True)
        proc = ManagedProcess(label, node.netns, popen.pid, log_path, popen)
        self.processes.append(proc)
        start = _proc_start_time(popen.pid)
        with open(self.run_dir / "processes", "a") as record:
            record.write(f"{popen.pid} {start} {node.netns} {label}\n")
        return proc

    def partition(self, side_a: Sequence[SandboxNode], side_b: Sequence[SandboxNode],
                  asymmetric: bool = False) -> None:
        """Drop traffic between two groups; with `asymmetric`, only from side_a to side_b."""
        for a in side_a:
            for b in side_b:
                b.impairment.blocked_from.add(a.underlay_ip)
                a.impairment.blocked_to.add(b.underlay_ip)
                if not asymmetric:
                    a.impairment.blocked_from.add(b.underlay_ip)
                    b.impairment.blocked_to.add(a.underlay_ip)
        for node in {*side_a, *side_b}:
            node._apply()

    def heal(self) -> None:
        """Undo every partition (loss and delay stay as they are)."""
        for node in self.nodes:
            if node.impairment.blocked_from or node.impairment.blocked_to:
                node.impairment.blocked_from.clear()
                node.impairment.blocked_to.clear()
                node._apply()

    # --- teardown -----------------------------------------------------------------------------
    def destroy(self) -> None:
        """Stop every process and remove every namespace of this run. Safe to call twice."""
        self._destroyed = True
        running = [proc for proc in reversed(self.processes) if proc.alive()]
        for proc in running:  # all at once: a hundred agents leaving one by one take minutes
            proc.signal(signal.SIGCONT)
            proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for proc in running:
            with contextlib.suppress(Exception):
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
        Sandbox.down(self.prefix)
        if not os.environ.get("WEAVEPY_SANDBOX_KEEP_LOGS"):
            shutil.rmtree(self.logdir, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    @staticmethod
    def down(prefix: str) -> list[str]:
        """Remove everything carrying `prefix`: recorded processes, processes inside its
        namespaces, and the namespaces themselves (with their links). Returns what it removed."""
        if not prefix.startswith(PREFIX_FAMILY):
            raise ValueError(f"refusing to remove a prefix outside the '{PREFIX_FAMILY}' family")
        removed: list[str] = []
        record = RUN_DIR / prefix / "processes"
        if record.exists():
            for line in record.read_text().splitlines():
                parts = line.split()
                if len(parts) < 2 or not parts[0].isdigit():
                    continue
                pid, start = int(parts[0]), parts[1]
                if str(_proc_start_time(pid)) == start:  # still the process we started
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    removed.append(f"process {pid}")
        ours = [ns for ns in _netns_list() if ns.startswith(prefix + "-")]
        for ns in ours:  # processes living inside our own namespaces are ours too
            pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid_text in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_text), signal.SIGKILL)
                    removed.append(f"process {pid_text}")
        for ns in ours:
            _run(["ip", "netns", "del", ns], check=False)
            removed.append(f"netns {ns}")
        shutil.rmtree(RUN_DIR / prefix, ignore_errors=True)
        return removed

    @staticmethod
    def list_prefixes() -> list[str]:
        """Prefixes that have namespaces or run records on this machine."""
        found = {ns.split("-", 1)[0] for ns in _netns_list()
                 if ns.startswith(PREFIX_FAMILY) and "-" in ns}
        if RUN_DIR.exists():
            found.update(p.name for p in RUN_DIR.iterdir() if p.name.startswith(PREFIX_FAMILY))
        return sorted(found)

    @classmethod
    def attach(cls, prefix: str) -> Sandbox:
        """Rebuild a handle on an existing sandbox (for the CLI's status/exec/down)."""
        meta_path = RUN_DIR / prefix / "meta.json"
        if not meta_path.exists():
            raise SandboxError(f"no sandbox with prefix {prefix} (no {meta_path})")
        meta = json.loads(meta_path.read_text())
        box = cls(prefix, ipaddress.IPv4Network(meta["underlay"]),
                  ipaddress.IPv4Network(meta["pod_range"]), int(meta["mtu"]))
        for i in range(1, int(meta["nodes"]) + 1):
            box.nodes.append(SandboxNode(box, i, f"n{i}", f"{prefix}-n{i}",
                                         str(box.underlay.network_address + 10 + i),
                                         f"{prefix}-v{i}"))
        return box
