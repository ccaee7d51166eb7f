"""The chaos runner: a sandbox of N nodes with agents and pods, a fault schedule, the checker.

It owns the orchestration of one run and nothing of its judgement: it builds the sandbox
(`weavepy.devtools.sandbox`), launches the agents and creates one pod per node through the real
`weavepy-cni` plugin (`weavepy.devtools.agentbox`, as the demo does), starts a bounded-rate UDP
prober in every pod (`weavepy.devtools.chaos.probe`), applies each fault of the schedule, and
tells the `LiveChecker` the ground truth it made, what every node shows (status and kernel
state, polled twice a second in parallel), and every probe result. The rules it keeps:
everything it creates carries the sandbox's prefix and is removed at the end, also on failure or
Ctrl-C; every wait is bounded; a setup failure raises `ChaosSetupError` (the cluster never came
up), while an invariant violation is a finding in the report.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from weavepy.config import DEFAULT_ROUTE_GRACE
from weavepy.devtools.agentbox import (
    REPO,
    AgentBox,
    DataPlaneView,
    WaitTimeout,
    http_json,
    read_dataplane,
)
from weavepy.devtools.chaos.checker import (
    ChaosReport,
    LiveChecker,
    NodeSnapshot,
    ProbeResult,
    Truth,
)
from weavepy.devtools.chaos.probe import DEFAULT_PORT
from weavepy.devtools.chaos.schedule import Fault, Schedule
from weavepy.devtools.sandbox import ManagedProcess, Sandbox, SandboxError, SandboxNode

__all__ = ["ChaosSetupError", "RunOptions", "isolated_bound", "observe_node", "run_chaos"]

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.5
PROBE_INTERVAL = 0.5
PROBE_TIMEOUT = 1.0
STATUS_TIMEOUT = 1.5
STARTUP_TIMEOUT = 90.0  # agents up and meshed; generous, a loaded 2-core machine is slow


class ChaosSetupError(RuntimeError):
    """The cluster under test could not be brought up; the message says what failed."""


@dataclass
class RunOptions:
    poll_interval: float = POLL_INTERVAL
    probe_interval: float = PROBE_INTERVAL
    probe_timeout: float = PROBE_TIMEOUT
    keep: bool = False  # leave the sandbox up for inspection
    echo: Callable[[str], None] = field(default=lambda line: None)


def observe_node(api_timeout: float) -> tuple[dict[str, Any] | None, DataPlaneView | None]:
    """Inside a node: the agent's /status (None if it does not answer) and the kernel state."""
    status: dict[str, Any] | None = None
    try:
        answer = http_json("GET", "/status", timeout=api_timeout)
        if answer is not None and answer[0] == 200:
            status = answer[1]
    except OSError:
        status = None
    try:
        kernel: DataPlaneView | None = read_dataplane()
    except Exception:  # a netlink hiccup is "no observation", not a crash
        kernel = None
    return status, kernel


def isolated_bound(nodes: int, profile: str, slack: float = 10.0) -> float:
    """How long a node cut off on a partition's minority side may keep routes to the peers it
    lost (see the checker): n-1 probe rounds at the interval stretched to its maximum by
    Lifeguard, then the longest suspicion timeout (nobody confirms), plus reconcile slack."""
    from gossip.config import GossipConfig

    config = {"lan": GossipConfig.lan, "wan": GossipConfig.wan,
              "local": GossipConfig.local}[profile]()
    stretched_round = config.probe_interval * config.awareness_max_multiplier
    longest_suspicion = (config.suspicion_max_timeout_mult * config.suspicion_mult
                         * max(1.0, math.log10(nodes)) * config.probe_interval)
    return (nodes - 1) * stretched_round + longest_suspicion + slack


class _Run:
    """One chaos run's moving parts; `run_chaos` drives it."""

    def __init__(self, schedule: Schedule, box: Sandbox, options: RunOptions) -> None:
        self.schedule = schedule
        self.box = box
        self.options = options
        self.rig = AgentBox(box, pod_range=str(box.pod_range))
        self.nodes = {node.name: node for node in box.nodes}
        self.checker = LiveChecker({n.name: n.underlay_ip for n in box.nodes},
                                   schedule.convergence_bound_s, time.monotonic(),
                                   seed=schedule.seed,
                                   isolated_bound=isolated_bound(len(box.nodes),
                                                                 self.rig.profile),
                                   route_grace=DEFAULT_ROUTE_GRACE)  # the agents' default
        self.truth = Truth(defined=False)
        self.pool = ThreadPoolExecutor(max_workers=len(box.nodes))
        self.pod_netns: dict[str, str] = {}
        self.plugin: Path | None = None
        self.probers: dict[str, ManagedProcess] = {}
        self.probe_offsets: dict[str, int] = {}
        self.readd_pending: set[str] = set()
        self.last_poll = 0.0

    # -- set-up --------------------------------------------------------------------------------

    def start_cluster(self) -> None:
        echo = self.options.echo
        try:
            # The founder first, then the others join it (AgentBox.launch_all), with a start-up
            # allowance for a loaded machine: an agent's imports alone can take tens of seconds
            # when dozens of other Python processes start at the same time.
            first, *rest = self.box.nodes
            self.rig.launch(first)
            self.rig.wait_api(first, timeout=STARTUP_TIMEOUT)
            for node in rest:
                self.rig.launch(node, [first])
            self.rig.wait_mesh(timeout=STARTUP_TIMEOUT)
        except (WaitTimeout, SandboxError) as exc:
            raise ChaosSetupError(f"the agents did not form a mesh: {exc}") from None
        echo(f"{len(self.nodes)} agents up, full mesh")
        from weavepy.cni.install import install_cni

        installed = install_cni(self.box.run_dir / "cni-bin", self.box.run_dir / "cni-conf")
        self.plugin = Path(installed.plugin)
        addresses: dict[str, str] = {}
        for node in self.box.nodes:
            netns = f"{self.box.prefix}-pod{node.index}"
            subprocess.run(["ip", "netns", "add", netns], check=True, timeout=10)
            self.pod_netns[node.name] = netns
            try:
                addresses[node.name] = self.rig.cni_add(node, self.plugin, netns)
            except SandboxError as exc:
                raise ChaosSetupError(str(exc)) from None
            self.checker.pod_address(time.monotonic(), netns, addresses[node.name], "before")
        echo("pods: " + ", ".join(f"{n}={ip}" for n, ip in addresses.items()))
        for node in self.box.nodes:
            targets = [f"--target={other}={ip}" for other, ip in addresses.items()
                       if other != node.name]
            argv = ["ip", "netns", "exec", self.pod_netns[node.name], sys.executable, "-m",
                    "weavepy.devtools.chaos.probe", "--port", str(DEFAULT_PORT),
                    "--interval", str(self.options.probe_interval),
                    "--timeout", str(self.options.probe_timeout), *targets]
            self.probers[node.name] = node.start("probe", argv, cwd=str(REPO))
            self.probe_offsets[node.name] = 0
        self.set_truth(replace(self.truth, defined=True), "cluster up, pods probing",
                       self.nodes)

    # -- ground truth and observation ----------------------------------------------------------

    def set_truth(self, truth: Truth, label: str, affected: Any) -> None:
        self.truth = truth
        self.checker.set_truth(time.monotonic(), truth, label, affected)
        self.options.echo(f"{time.monotonic() - self.checker.origin:8.2f}s  {label}")

    def poll(self) -> None:
        names = list(self.nodes)
        futures = [self.pool.submit(self._observe, self.nodes[name]) for name in names]
        snapshots = []
        for name, future in zip(names, futures, strict=True):
            status, kernel = future.result()
            snapshots.append(NodeSnapshot(name, status, kernel))
        self.checker.observe(time.monotonic(), snapshots)
        self.read_probes()
        for snap in snapshots:
            if snap.node in self.readd_pending and snap.status is not None:
                self.readd_pending.discard(snap.node)
                self.repeat_pod_add(snap.node)

    def _observe(self, node: SandboxNode) -> tuple[dict[str, Any] | None, DataPlaneView | None]:
        try:
            result: tuple[dict[str, Any] | None, DataPlaneView | None] = node.call(
                observe_node, STATUS_TIMEOUT, timeout=STATUS_TIMEOUT + 10)
        except (TimeoutError, SandboxError, OSError):
            return None, None
        except Exception as exc:  # a broken observation is no observation, not a crashed run
            log.warning("observing %s failed: %r", node.name, exc)
            return None, None
        return result

    def repeat_pod_add(self, name: str) -> None:
        """After an agent restart: the same ADD again must give the pod the same address."""
        assert self.plugin is not None
        netns = self.pod_netns[name]
        try:
            address = self.rig.cni_add(self.nodes[name], self.plugin, netns)
        except SandboxError as exc:
            self.checker.note(time.monotonic(), f"repeated CNI ADD on {name} failed: {exc}")
            return
        self.checker.pod_address(time.monotonic(), netns, address, "after")

    def read_probes(self) -> None:
        for name, proc in self.probers.items():
            try:
                with open(proc.log_path, "rb") as src:
                    src.seek(self.probe_offsets[name])
                    chunk = src.read()
            except OSError:
                continue
            end = chunk.rfind(b"\n") + 1
            self.probe_offsets[name] += end
            for line in chunk[:end].splitlines():
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if "dst" in doc:
                    self.checker.probe(ProbeResult(name, doc["dst"], doc["sent"],
                                                   doc["deadline"], bool(doc["ok"]),
                                                   doc.get("rtt_ms")))

    def wait(self, seconds: float, until: Callable[[], bool] | None = None) -> None:
        """Keep polling for `seconds` (or until `until()` holds)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            pause = self.last_poll + self.options.poll_interval - time.monotonic()
            if pause > 0:
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            self.last_poll = time.monotonic()
            self.poll()
            if until is not None and until():
                return

    def settle(self) -> None:
        self.wait(self.schedule.convergence_bound_s + 2 * self.options.poll_interval,
                  lambda: not self.checker.settling)

    # -- faults ------------------------------------------------------------------------------

    def others(self, names: tuple[str, ...]) -> list[SandboxNode]:
        return [node for name, node in self.nodes.items() if name not in names]

    def apply(self, fault: Fault) -> None:
        t = self.truth
        targets = fault.targets
        nodes = [self.nodes[name] for name in targets]
        what = fault.describe()
        if fault.kind == "kill":
            self.rig.kill(nodes[0])
            self.set_truth(replace(t, down=t.down | {targets[0]}), f"start: {what}", targets)
        elif fault.kind == "node_loss":
            self.rig.kill(nodes[0])
            nodes[0].cut()
            self.set_truth(replace(t, down=t.down | {targets[0]}, cut=t.cut | {targets[0]}),
                           f"start: {what}", targets)
        elif fault.kind in ("partition", "asym_partition"):
            rest = self.others(targets)
            symmetric = fault.kind == "partition"
            self.box.partition(nodes, rest, asymmetric=not symmetric)
            pairs = {(a.name, b.name) for a in nodes for b in rest}
            if symmetric:
                pairs |= {(b, a) for a, b in pairs}
            minority = frozenset(targets) if symmetric and len(targets) * 2 < len(
                self.nodes) else frozenset()
            self.set_truth(replace(t, blocked=t.blocked | pairs, minority=minority,
                                   defined=symmetric), f"start: {what}", targets)
        elif fault.kind == "netem":
            for node in nodes:
                node.netem(**dict(fault.params))
            self.set_truth(replace(t, impaired=t.impaired | set(targets)), f"start: {what}",
                           targets)
        elif fault.kind == "stall":
            self.rig.agents[targets[0]].pause()
            self.set_truth(replace(t, stalled=t.stalled | {targets[0]}, defined=False),
                           f"start: {what}", targets)
        else:
            raise ValueError(f"unknown fault kind {fault.kind}")

    def undo(self, fault: Fault) -> None:
        t = self.truth
        targets = fault.targets
        nodes = [self.nodes[name] for name in targets]
        what = fault.describe()
        if fault.kind in ("kill", "node_loss"):
            node = nodes[0]
            if fault.kind == "node_loss":
                node.restore()
            self.rig.launch(node, self.others(targets))
            self.readd_pending.add(node.name)
            self.set_truth(replace(t, down=t.down - {node.name}, cut=t.cut - {node.name}),
                           f"end: {what} (agent restarted)", targets)
        elif fault.kind in ("partition", "asym_partition"):
            self.box.heal()
            self.set_truth(replace(t, blocked=frozenset(), minority=frozenset(), defined=True),
                           f"end: {what} (healed)", targets)
        elif fault.kind == "netem":
            for node in nodes:
                node.clear_netem()
            self.set_truth(replace(t, impaired=t.impaired - set(targets)), f"end: {what}",
                           targets)
        elif fault.kind == "stall":
            self.rig.agents[targets[0]].resume()
            self.set_truth(replace(t, stalled=t.stalled - {targets[0]}, defined=True),
                           f"end: {what} (SIGCONT)", targets)

    def check_agents_alive(self) -> None:
        for name, proc in self.rig.agents.items():
            if name not in self.truth.down and not proc.alive():
                self.checker.note(time.monotonic(), f"agent {name} exited by itself: "
                                  f"{proc.log_text().strip().splitlines()[-1:]}")
                self.truth = replace(self.truth, down=self.truth.down | {name})
                self.checker.set_truth(time.monotonic(), self.truth,
                                       f"agent {name} died on its own", [name])

    def run(self) -> ChaosReport:
        echo = self.options.echo
        self.start_cluster()
        self.settle()
        for index, fault in enumerate(self.schedule.faults, 1):
            echo(f"fault {index}/{len(self.schedule.faults)}: {fault.describe()}")
            self.apply(fault)
            self.wait(fault.hold_s)
            self.undo(fault)
            self.settle()
            self.wait(fault.gap_s)
            self.check_agents_alive()
        self.wait(self.options.probe_timeout + 0.5)
        for proc in self.probers.values():
            proc.stop(timeout=3)
        self.read_probes()
        return self.checker.finish(time.monotonic())

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def run_chaos(schedule: Schedule, options: RunOptions | None = None) -> ChaosReport:
    """Run `schedule` against a fresh sandbox and return the checker's report."""
    options = options or RunOptions()
    try:
        box = Sandbox.create(nodes=schedule.nodes)
    except (SandboxError, ValueError) as exc:
        raise ChaosSetupError(f"cannot build the sandbox: {exc}") from None
    options.echo(f"sandbox {box.prefix}: {schedule.nodes} nodes, seed {schedule.seed}, "
                 f"profile {schedule.profile}, {len(schedule.faults)} faults")
    run = _Run(schedule, box, options)
    try:
        return run.run()
    finally:
        run.close()
        if options.keep:
            options.echo(f"sandbox kept: remove it with `weavepy sandbox down {box.prefix}`")
        else:
            box.destroy()
