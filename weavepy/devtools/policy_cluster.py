"""The NetworkPolicy conformance cases on real packets: three sandbox nodes with real agents
enforcing policy, the cases' pods attached through the CNI plugin, and a prober that measures
the whole reachability matrix of a case and compares it with the case's truth table.

A `PolicyCluster` is three sandbox nodes running `weavepy launch --policy-dir DIR` (on the
VXLAN path, or the encrypted one with `--encrypt`). Namespaces x, y, z and pods a, b, c in
each (weavepy/devtools/policy_conformance.py places them on the nodes so that both bridged
and cross-node pairs exist) are network namespaces attached by the real `weavepy-cni`
plugin, with K8S_POD_NAMESPACE/K8S_POD_NAME in CNI_ARGS as a kubelet passes them. Each pod
runs a server answering TCP and UDP on 53, 80 and 81. The policy directory holds the case's
objects in Kubernetes form, one file per object: Namespaces, NetworkPolicies, and Pods with
labels, named ports, `spec.nodeName` and (once the CNI ADD gave it) `status.podIP`, as a
kubelet reports status to the API.

A case step rewrites the files, then probes every ordered pair of pods, each source trying
all its destinations at once (TCP connect and echo bounded to `TCP_TIMEOUT`, UDP bounded to
`UDP_TRIES` x `UDP_TIMEOUT`); the step settles by probing again until the matrix matches or
`SETTLE_TIMEOUT` passes (bounded in rounds too), and a mismatch reports both tables and the
wrong cells with what each probe saw. A first-packet step does not settle: the pod's Pod
document is written (without an address) and read by the agents, then the pod is attached
and probed the moment its CNI ADD returned. A step before an `over_established` probe leaves
TCP connections open from every pod (a holder process per pod), and the probe sends over them
after the next step's change is in force; the outcome is recorded, not judged (the spec leaves
it to the implementation). SCTP probes never reach the kernel (it has no SCTP): they are
reported as checked as rules only (tests/policy/test_conformance_cases.py checks them against
the compiled tables).

The rules it keeps: everything lives in the sandbox (its prefix names every namespace; its
processes are stopped by PID when it is destroyed); every wait and every loop is bounded in
time and count; nothing runs in the machine's own network namespace.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from weavepy.devtools.agentbox import AgentBox, WaitTimeout
from weavepy.devtools.policy_conformance import Case, Probe, Reach, Step, World
from weavepy.devtools.sandbox import ManagedProcess, Sandbox, SandboxError, SandboxNode
from weavepy.fileio import atomic_write

__all__ = ["PATHS", "CaseResult", "PolicyCluster", "ProbeResult", "policy_cluster",
           "probe_targets"]

PATHS = ("vxlan", "encrypted")
TCP_TIMEOUT = 1.0
UDP_TRIES = 2
UDP_TIMEOUT = 0.5
SETTLE_TIMEOUT = 20.0
SETTLE_ROUNDS = 40
SETTLE_PACE = 0.5  # a settling round takes at least this long, so the rounds span the time
DIRECTORY_POLL = 1.0  # the agent's policy-directory poll period (DirectorySource's default)
READY_TIMEOUT = 30.0
START_TIMEOUT = 180.0  # agents starting on a loaded machine
FIRST_PACKET_ROUNDS = 3
HOLD_TIMEOUT = 120.0

SERVER = r"""
import socket, sys, threading
def echo(conn):
    with conn:
        conn.settimeout(60)
        try:
            while True:
                data = conn.recv(2048)
                if not data:
                    return
                conn.sendall(b"tcp:" + data)
        except OSError:
            return
def serve(port, ready):
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", port))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", port))
    tcp.listen(128)
    def answer():
        while True:
            data, peer = udp.recvfrom(2048)
            udp.sendto(b"udp:" + data, peer)
    threading.Thread(target=answer, daemon=True).start()
    ready.release()
    while True:
        conn, _ = tcp.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()
ready = threading.Semaphore(0)
for port in (53, 80, 81):
    threading.Thread(target=serve, args=(port, ready), daemon=True).start()
for _ in range(3):
    ready.acquire()
print("ready", flush=True)
threading.Event().wait()
"""

# Opens a TCP connection to every target and checks it echoes, writes which did to
# `opened`, waits (bounded) for `trigger` to exist, sends once more over each open
# connection and writes what came back to `result`.
HOLDER = r"""
import json, os, socket, sys, time
source, targets, opened, trigger, result, limit = json.loads(sys.argv[1])
conns = {}
for dst, port in targets:
    try:
        conn = socket.create_connection((dst, port), timeout=1.0, source_address=(source, 0))
        conn.sendall(b"1")
        if conn.recv(64) == b"tcp:1":
            conns[f"{dst}:{port}"] = conn
        else:
            conn.close()
    except OSError:
        pass
with open(opened + ".tmp", "w") as out:
    json.dump(sorted(conns), out)
os.replace(opened + ".tmp", opened)
deadline = time.monotonic() + limit
while not os.path.exists(trigger) and time.monotonic() < deadline:
    time.sleep(0.05)
seen = {}
for name, conn in conns.items():
    try:
        conn.settimeout(1.5)
        conn.sendall(b"2")
        seen[name] = "ok" if conn.recv(64) == b"tcp:2" else "garbled"
    except TimeoutError:
        seen[name] = "timeout"
    except OSError as exc:
        seen[name] = type(exc).__name__
with open(result + ".tmp", "w") as out:
    json.dump(seen, out)
os.replace(result + ".tmp", result)
"""


# -- probing (runs inside a pod) -------------------------------------------------------------


def probe_targets(source: str, targets: Sequence[tuple[str, int, str]]) -> list[str]:
    """Inside a pod: try every (address, port, protocol) at once. Each outcome is "ok" (the
    server answered), "timeout" (nothing came back: a drop), "refused" (the packet reached a
    host with nothing listening), or the error's name."""
    def one(target: tuple[str, int, str]) -> str:
        dst, port, protocol = target
        try:
            if protocol == "TCP":
                with socket.create_connection((dst, port), timeout=TCP_TIMEOUT,
                                              source_address=(source, 0)) as conn:
                    conn.sendall(b"p")
                    return "ok" if conn.recv(64) == b"tcp:p" else "garbled"
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind((source, 0))
                sock.settimeout(UDP_TIMEOUT)
                for _ in range(UDP_TRIES):
                    sock.sendto(b"p", (dst, port))
                    try:
                        return "ok" if sock.recvfrom(64)[0] == b"udp:p" else "garbled"
                    except TimeoutError:
                        continue
                return "timeout"
        except TimeoutError:
            return "timeout"
        except ConnectionRefusedError:
            return "refused"
        except OSError as exc:
            return type(exc).__name__

    if not targets:
        return []
    with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
        return list(pool.map(one, targets))


# -- results -----------------------------------------------------------------------------------


def _grid(pods: Sequence[str], cell: Callable[[str, str], str]) -> str:
    lines = ["      " + " ".join(f"{k:>5}" for k in pods)]
    for src in pods:
        lines.append(f"{src:>5} " + " ".join(
            f"{'.' if src == dst else cell(src, dst):>5}" for dst in pods))
    return "\n".join(lines)


@dataclass
class ProbeResult:
    """One probe of one step: what was expected, what each pair saw, and what differs."""

    step: int
    probe: Probe
    pods: tuple[str, ...] = ()
    seen: dict[tuple[str, str], str] = field(default_factory=dict)
    rounds: int = 0
    note: str = ""

    @property
    def label(self) -> str:
        kind = (" first packet" if self.probe.first_packet else
                " over established" if self.probe.over_established else "")
        return f"step {self.step} {self.probe.port}/{self.probe.protocol}{kind}"

    @property
    def expected(self) -> dict[tuple[str, str], bool]:
        return self.probe.expected.table(self.pods) if self.probe.expected else {}

    @property
    def wrong(self) -> list[tuple[str, str]]:
        return sorted(pair for pair, allowed in self.expected.items()
                      if (self.seen.get(pair) == "ok") != allowed)

    @property
    def ok(self) -> bool:
        return not self.wrong

    def diff(self) -> str:
        """Expected and observed tables (rows: from, columns: to) and the wrong cells."""
        expected = self.probe.expected or Reach()
        wrong = set(self.wrong)

        def seen_cell(src: str, dst: str) -> str:
            mark = "✓" if self.seen.get((src, dst)) == "ok" else "X"
            return ("!" + mark) if (src, dst) in wrong else mark

        lines = [f"{self.label}: {len(wrong)} of {len(self.expected)} pairs wrong "
                 f"(after {self.rounds} probe round(s))",
                 "expected:", expected.text(self.pods),
                 "observed (! marks a wrong cell):", _grid(self.pods, seen_cell)]
        lines += [f"  {s} -> {d}: expected {'allowed' if self.expected[(s, d)] else 'denied'}"
                  f", saw {self.seen.get((s, d), 'no probe')}" for s, d in sorted(wrong)]
        return "\n".join(lines)


@dataclass
class CaseResult:
    case: Case
    path: str
    probes: list[ProbeResult] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and all(p.ok for p in self.probes)

    def report(self) -> str:
        head = f"{self.path} {self.case.family:02d}-{self.case.name}"
        if self.ok:
            return f"{head}: ok"
        parts = [f"{head}: FAILED"] + ([self.error] if self.error else [])
        parts += [p.diff() for p in self.probes if not p.ok]
        return "\n".join(parts)


# -- the cluster --------------------------------------------------------------------------------


@dataclass
class LivePod:
    key: str
    node: SandboxNode
    netns: SandboxNode
    server: ManagedProcess
    address: str = ""


class PolicyCluster:
    """Three nodes with agents enforcing the policy directory, and the cases' pods."""

    def __init__(self, box: Sandbox, path: str, enforce: bool = True,
                 extra_args: Sequence[str] = ()) -> None:
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, not {path!r}")
        self.box = box
        self.path = path
        self.policy_dir = box.run_dir / "policy"
        self.policy_dir.mkdir(parents=True, exist_ok=True)
        args = [*(["--encrypt"] if path == "encrypted" else []), *extra_args]
        if enforce:
            args += ["--policy-dir", str(self.policy_dir)]
        self.rig = AgentBox(box, pod_range=str(box.pod_range), extra_args=args)
        self.pods: dict[str, LivePod] = {}
        self.written: dict[str, str] = {}
        self.world = World.initial(box.pod_range)
        self.serial = itertools.count(1)  # names of process logs and scratch directories
        self.plugin: Path | None = None

    # -- setting up ------------------------------------------------------------------------------

    def start(self) -> None:
        """Agents on every node, a complete mesh, the plugin installed, the initial pods
        attached and serving, and every pair reaching every other."""
        from weavepy.cni.install import install_cni

        self.write_files()
        first, *others = self.box.nodes
        self.rig.launch(first)
        self.rig.wait_api(first, timeout=START_TIMEOUT)
        for node in others:
            self.rig.launch(node, [first])
        self.rig.wait_mesh(timeout=START_TIMEOUT)
        self.plugin = install_cni(self.rig.root / "cni-bin", self.rig.root / "cni-conf").plugin
        self.reset()

    def node_of(self, key: str) -> SandboxNode:
        return self.box.node(str(self.world.pods[key]["spec"]["nodeName"]))

    @staticmethod
    def netns_label(key: str) -> str:
        return "p" + key.replace("/", "")

    def _attach(self, key: str, after_add: Callable[[], None] | None = None) -> LivePod:
        """A namespace for pod `key`, its server listening, then CNI ADD on its node;
        `after_add` runs the moment the ADD returned, before anything else."""
        assert self.plugin is not None
        node = self.node_of(key)
        netns = self.box.add_netns(self.netns_label(key))
        server = netns.start(f"server{next(self.serial)}", [sys.executable, "-c", SERVER])
        def ready() -> bool:
            if not server.alive():
                raise SandboxError(f"{key}'s server died: {server.log_text()[-500:]}")
            return "ready" in server.log_text()

        self.rig.wait(f"the server of {key}", ready, timeout=READY_TIMEOUT, interval=0.05)
        namespace, name = key.split("/")
        address = self.rig.cni_add(node, self.plugin, netns.netns, args={
            "K8S_POD_NAMESPACE": namespace, "K8S_POD_NAME": name,
            "K8S_POD_INFRA_CONTAINER_ID": netns.netns})
        pod = LivePod(key, node, netns, server, address)
        self.pods[key] = pod
        if after_add is not None:
            after_add()
        self.world.set_address(key, address)
        return pod

    def _detach(self, key: str) -> None:
        assert self.plugin is not None
        pod = self.pods.pop(key)
        namespace, name = key.split("/")
        self.rig.cni_del(pod.node, self.plugin, pod.netns.netns, args={
            "K8S_POD_NAMESPACE": namespace, "K8S_POD_NAME": name})
        pod.server.stop()
        subprocess.run(["ip", "netns", "del", pod.netns.netns], check=True, timeout=30)

    def sync_pods(self) -> None:
        """Attach the world's pods that are not live; detach live pods it no longer has
        (or has on another node)."""
        for key in sorted(self.pods):
            wanted = self.world.pods.get(key)
            if wanted is None or wanted["spec"]["nodeName"] != self.pods[key].node.name:
                self._detach(key)
        missing = sorted(k for k in self.world.pods if k not in self.pods)
        if missing:  # at once: each waits mostly for its server to start
            with concurrent.futures.ThreadPoolExecutor(len(missing)) as pool:
                list(pool.map(self._attach, missing))
        for key in sorted(self.world.pods):
            self.world.set_address(key, self.pods[key].address)

    # -- the policy directory --------------------------------------------------------------------

    @staticmethod
    def file_name(obj: Mapping[str, Any]) -> str:
        meta = obj["metadata"]
        namespace = meta.get("namespace")
        return (f"{obj['kind'].lower()}-{namespace + '-' if namespace else ''}"
                f"{meta['name']}.yaml")

    def write_files(self) -> bool:
        """Make the directory hold the world's objects, one file each, each written
        atomically and only when it changed; True if anything changed."""
        wanted = {self.file_name(o): yaml.safe_dump(o, sort_keys=True)
                  for o in self.world.objects()}
        changed = False
        for name in sorted(set(self.written) - set(wanted)):
            (self.policy_dir / name).unlink(missing_ok=True)
            del self.written[name]
            changed = True
        for name, text in sorted(wanted.items()):
            if self.written.get(name) != text:
                atomic_write(self.policy_dir / name, text.encode(), mode=0o644, durable=False)
                self.written[name] = text
                changed = True
        return changed

    def wait_read(self) -> None:
        """Bounded: long enough for every agent to have polled the directory since the
        last write (two of its poll periods)."""
        time.sleep(2 * DIRECTORY_POLL + 0.2)

    def reported_policies(self, node: SandboxNode) -> set[str] | None:
        """The policies the node's agent says it enforces (`GET /policy`), or None if it
        does not say (no such endpoint, not ready)."""
        answer = self.rig.api(node, "GET", "/policy")
        if answer is None or answer[0] != 200 or not isinstance(answer[1], dict):
            return None
        if answer[1].get("mode") == "off" or not answer[1].get("ready", True):
            return None
        return {str(p.get("policy")) for p in answer[1].get("policies") or ()}

    def wait_applied(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Wait (bounded) until every agent reports the world's policies, where agents
        report them; probing settles the rest (labels, pods, addresses)."""
        wanted = set(self.world.policies)
        deadline = time.monotonic() + timeout
        pending = list(self.box.nodes)
        while pending and time.monotonic() < deadline:
            pending = [n for n in pending if self.reported_policies(n) not in (wanted, None)]
            if pending:
                time.sleep(0.1)

    # -- probing -------------------------------------------------------------------------------

    def probe(self, port: int, protocol: str) -> dict[tuple[str, str], str]:
        """Every ordered pair of live pods, all sources at once: (src, dst) -> outcome."""
        keys = sorted(self.pods)

        def row(src: str) -> list[str]:
            pod = self.pods[src]
            targets = [(self.pods[d].address, port, protocol) for d in keys if d != src]
            found: list[str] = pod.netns.call(probe_targets, pod.address, targets, timeout=30)
            return found

        with concurrent.futures.ThreadPoolExecutor(len(keys)) as pool:
            rows = dict(zip(keys, pool.map(row, keys), strict=True))
        return {(src, dst): seen for src in keys
                for dst, seen in zip([d for d in keys if d != src], rows[src], strict=True)}

    def settle(self, result: ProbeResult, deadline: float) -> ProbeResult:
        """Probe until the matrix matches or the deadline (or the round limit) passes."""
        result.pods = tuple(sorted(self.pods))
        for _ in range(SETTLE_ROUNDS):
            started = time.monotonic()
            result.seen = self.probe(result.probe.port, result.probe.protocol)
            result.rounds += 1
            if result.ok or time.monotonic() > deadline:
                break
            time.sleep(max(0.0, started + SETTLE_PACE - time.monotonic()))
        return result

    # -- cases ---------------------------------------------------------------------------------

    def reset(self) -> None:
        """Back to the initial world: no policy, the nine pods at their places (reattached if
        a case deleted them), every pair reaching every other on 80/TCP."""
        self.world = World.initial(self.box.pod_range)
        self.sync_pods()
        self.write_files()
        self.wait_applied()
        baseline = self.settle(ProbeResult(0, Probe(80, "TCP", Reach())),
                               time.monotonic() + 60)
        if not baseline.ok:
            raise WaitTimeout("the pods do not all reach each other with no policy:\n"
                              + baseline.diff() + "\n" + self.rig.logs_tail())

    def apply(self, step: Step) -> None:
        """A step's actions, in order, on the world, the pods and the files (not settled)."""
        for action in step.actions:
            self.world.apply(action)
        self.sync_pods()
        self.write_files()

    def first_packet_step(self, number: int, step: Step) -> list[ProbeResult]:
        """The start race: the new pod's document is read by the agents first (labels, no
        address), then the pod is attached and every probe runs the moment the CNI ADD
        returned. A pair that should be denied fails if any try got through; one that
        should be allowed may take `FIRST_PACKET_ROUNDS` tries. Only then is the pod's
        address published to the other nodes."""
        created = [a for a in step.actions if a.kind == "create-pod"]
        if len(created) != 1:
            raise ValueError("a first-packet step creates exactly one pod")
        for action in step.actions:
            self.world.apply(action)
        self.write_files()
        self.wait_read()
        results = [ProbeResult(number, p) for p in step.probes]

        def probe_now() -> None:
            for result in results:
                if result.probe.on_kernel:
                    result.pods = tuple(sorted(self.pods))
                    result.seen = self.probe(result.probe.port, result.probe.protocol)
                    result.rounds = 1

        self._attach(created[0].target, after_add=probe_now)
        for result in results:  # an allowed pair may need a retry (a loaded machine)
            while result.probe.on_kernel and not result.ok and result.rounds < FIRST_PACKET_ROUNDS:
                again = self.probe(result.probe.port, result.probe.protocol)
                result.seen = {pair: "ok" if "ok" in (seen, again.get(pair)) else seen
                               for pair, seen in result.seen.items()}
                result.rounds += 1
        self.write_files()
        for result in results:
            if not result.probe.on_kernel:
                result.note = "SCTP: checked as rules only (this kernel has no SCTP)"
        return results

    def run_case(self, case: Case) -> CaseResult:
        """Reset, then each step: apply, settle the probes, record the outcome."""
        outcome = CaseResult(case, self.path)
        started = time.monotonic()
        try:
            self.reset()
            holders: HeldConnections | None = None
            for number, step in enumerate(case.steps):
                if any(p.first_packet for p in step.probes):
                    outcome.probes += self.first_packet_step(number, step)
                    continue
                self.apply(step)
                deadline = time.monotonic() + SETTLE_TIMEOUT
                self.wait_applied()
                for probe in step.probes:
                    result = ProbeResult(number, probe)
                    if not probe.on_kernel:
                        result.note = "SCTP: checked as rules only (this kernel has no SCTP)"
                    elif not probe.over_established:
                        self.settle(result, deadline)
                    outcome.probes.append(result)
                for result in outcome.probes:
                    if result.probe.over_established and result.step == number:
                        if holders is None:
                            raise ValueError(f"{case.name}: no connections were held")
                        result.pods = tuple(sorted(self.pods))
                        result.seen = holders.finish()
                        result.rounds = 1
                        result.note = "outcome recorded (the spec leaves it open)"
                        holders = None
                following = case.steps[number + 1] if number + 1 < len(case.steps) else None
                held = [p for p in (following.probes if following else ())
                        if p.over_established]
                if held:
                    holders = HeldConnections(self, held[0].port, held[0].protocol)
        except (SandboxError, WaitTimeout, TimeoutError, ValueError) as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.seconds = time.monotonic() - started
        return outcome


class HeldConnections:
    """TCP connections from every live pod to every other, held open across a step."""

    def __init__(self, cluster: PolicyCluster, port: int, protocol: str) -> None:
        if protocol != "TCP":
            raise ValueError(f"held connections are TCP, not {protocol}")
        self.cluster = cluster
        serial = next(cluster.serial)
        self.dir = cluster.box.run_dir / f"held{serial}"
        self.dir.mkdir()
        self.trigger = self.dir / "go"
        self.port = port
        self.keys = sorted(cluster.pods)
        self.holders: dict[str, ManagedProcess] = {}
        for src in self.keys:
            pod = cluster.pods[src]
            targets = [(cluster.pods[d].address, port) for d in self.keys if d != src]
            spec = [pod.address, targets, str(self.file(src, "opened")), str(self.trigger),
                    str(self.file(src, "result")), HOLD_TIMEOUT]
            self.holders[src] = pod.netns.start(f"holder{serial}",
                                                [sys.executable, "-c", HOLDER, json.dumps(spec)])
        cluster.rig.wait("held connections", lambda: all(
            self.file(k, "opened").exists() for k in self.keys), timeout=30)

    def file(self, key: str, what: str) -> Path:
        return self.dir / f"{key.replace('/', '-')}.{what}"

    def finish(self) -> dict[tuple[str, str], str]:
        """Send once more over every held connection; (src, dst) -> outcome ("not opened"
        where the connection could not be opened before the change)."""
        self.trigger.touch()
        self.cluster.rig.wait("the held connections' answers", lambda: all(
            self.file(k, "result").exists() for k in self.keys), timeout=30)
        seen: dict[tuple[str, str], str] = {}
        for src in self.keys:
            answers = json.loads(self.file(src, "result").read_text())
            for dst in self.keys:
                if dst != src:
                    name = f"{self.cluster.pods[dst].address}:{self.port}"
                    seen[(src, dst)] = answers.get(name, "not opened")
            self.holders[src].stop()
        return seen


@contextmanager
def policy_cluster(path: str, *, enforce: bool = True, extra_args: Sequence[str] = (),
                   box: Sandbox | None = None) -> Iterator[PolicyCluster]:
    """A started `PolicyCluster` on `path` ("vxlan" or "encrypted"), torn down after
    (the sandbox too, unless the caller passed its own)."""
    own = box is None
    box = box or Sandbox.create(nodes=3)
    try:
        cluster = PolicyCluster(box, path, enforce=enforce, extra_args=extra_args)
        cluster.start()
        yield cluster
    finally:
        if own:
            box.destroy()
