"""The enforcer: this node's NetworkPolicy, from a source's state and this node's CNI
attachments to the kernel's policy table, kept there.

This module owns what the agent does with policy at run time. `PolicyEnforcer` holds the
source's `ClusterState`, the pods this node's CNI plugin attached (`model.Attachment`: address,
container ID, the runtime's namespace/name), and the `CompiledPolicy` the kernel holds; every
change compiles for this node (`compile_policy(attach(state, attachments), node)`) and goes to
the kernel through `PolicyApplier` in one transaction. Its methods block (nftables) and are
called from worker threads: the trio shell's, for source changes and the periodic check, and
the CNI server's, for ADD and DEL. One lock serializes them.

The rules it keeps:

* **A pod is isolated before its CNI ADD returns.** `pod_added` compiles with the new pod and
  applies before it returns; if the kernel refuses, the attachment is forgotten and
  `PolicyApplyError` is raised so that the ADD fails (fail closed). When the new pod changes
  nothing (no policy selects it, no peer set holds it) nothing is written to the kernel.
* **The table survives restarts, and is replaced whole.** Nothing here ever deletes the table
  (only `weavepy reset`, or starting with policy off). The first apply after start is the
  applier's full replace: one transaction from the old table to the new, no gap.
* **The last good state stays.** A source error never reaches here as an empty state; a
  failed apply keeps the previous table in the kernel and is retried at the next check.
* **Quiet when idle.** The periodic `check` is the applier's small listing; it logs only when
  it finds the table changed by someone else.

Attachments are kept in a small JSON file in the run directory, so that a restarted agent
knows which pod each local address belongs to before the source or the CNI tells it again.

Pure parts: `explain` (the reference evaluator on the live state, for `weavepy policy
explain`) and `status_document` (`weavepy status policy`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from weavepy.fileio import atomic_write
from weavepy.nft import NftError
from weavepy.policy.applier import PolicyApplier
from weavepy.policy.compiler import CompiledPolicy, CompileOptions, compile_policy
from weavepy.policy.evaluator import Endpoint, Host, allowed
from weavepy.policy.model import PROTOCOLS, Attachment, ClusterState, Pod, attach

__all__ = ["ApplyRecord", "ExplainError", "PolicyApplyError", "PolicyEnforcer", "explain",
           "parse_endpoint", "parse_port", "status_document"]

log = logging.getLogger(__name__)

ATTACHMENTS_FILE = "policy-pods.json"


class PolicyApplyError(Exception):
    """The kernel did not take the policy table; the message is one line."""


class ExplainError(ValueError):
    """An explain request names something that cannot be understood; one readable line."""


@dataclass(frozen=True)
class ApplyRecord:
    """One apply: what it did, how long it took, and why (for logs, status and metrics)."""

    kind: str  # "full", "incremental", "unchanged", "skipped" (nothing changed) or "error"
    seconds: float
    reason: str
    error: str | None = None


@dataclass
class _Counts:
    applies: int = 0
    errors: int = 0
    last_error: str | None = None
    last_apply: float | None = None  # time.time() of the last apply that wrote something
    last_kind: str | None = None


@dataclass
class PolicyEnforcer:
    """See the module docstring. `on_apply` is called (on the applying thread) after each
    attempt to write the kernel."""

    node: str
    applier: PolicyApplier
    options: CompileOptions = field(default_factory=CompileOptions)
    run_dir: Path | None = None
    on_apply: Callable[[ApplyRecord], None] | None = None
    source_state: ClusterState | None = None
    compiled: CompiledPolicy | None = None  # what the kernel holds (or was last asked to)
    state: ClusterState = field(default_factory=ClusterState)  # source + attachments
    attachments: dict[str, Attachment] = field(default_factory=dict)
    counts: _Counts = field(default_factory=_Counts)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _dirty: bool = False  # the last apply failed: the next check applies again

    def __post_init__(self) -> None:
        self.attachments = self._load_attachments()

    # -- what the agent calls ------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """The source has delivered a state (before that, the kernel keeps the old table)."""
        return self.source_state is not None

    def set_source(self, state: ClusterState) -> ApplyRecord:
        """The source's new state: compile and apply (blocks)."""
        with self._lock:
            first = self.source_state is None
            self.source_state = state
            return self._apply_locked("start" if first else "policy source changed")

    def pod_added(self, found: Attachment) -> ApplyRecord | None:
        """A pod was attached on this node: make its isolation real before returning. Raises
        PolicyApplyError (and forgets the pod) if the kernel refuses. None before the source
        is ready (the pod is remembered and applied with the first state)."""
        with self._lock:
            previous = self.attachments.get(found.container_id)
            self.attachments[found.container_id] = found
            if self.source_state is None:
                self._save_attachments()
                return None
            record = self._apply_locked(f"pod {found.container_id[:12]} added")
            if record.error is not None:
                if previous is None:
                    self.attachments.pop(found.container_id, None)
                else:
                    self.attachments[found.container_id] = previous
                raise PolicyApplyError(record.error)
            self._save_attachments()
            return record

    def pod_removed(self, container_id: str) -> ApplyRecord | None:
        """A pod's attachment was deleted; a failure is logged and retried by `check`."""
        with self._lock:
            if self.attachments.pop(container_id, None) is None:
                return None
            self._save_attachments()
            if self.source_state is None:
                return None
            return self._apply_locked(f"pod {container_id[:12]} removed")

    def retain(self, container_ids: Iterable[str]) -> ApplyRecord | None:
        """Forget attachments the CNI no longer holds (after GC, and at start)."""
        keep = set(container_ids)
        with self._lock:
            gone = [cid for cid in self.attachments if cid not in keep]
            if not gone:
                return None
            for cid in gone:
                del self.attachments[cid]
            self._save_attachments()
            if self.source_state is None:
                return None
            return self._apply_locked(f"{len(gone)} gone attachment(s) forgotten")

    def check(self, whole: bool = False) -> ApplyRecord | None:
        """The periodic look: apply again after a failure, or replace the table if someone
        changed it: the applier's cheap `check` (base chains and verdict maps), or with
        `whole` its `verify` (every chain, set and element). None when all is as written."""
        with self._lock:
            if self.source_state is None:
                return None
            if self._dirty or self.compiled is None or self.applier.applied is None:
                return self._apply_locked("retrying after a failed apply")
            try:
                if whole:
                    differences = self.applier.verify()
                    problem = "; ".join(differences[:3]) if differences else None
                else:
                    problem = self.applier.check()
            except NftError as exc:
                log.warning("policy table: cannot read it: %s", exc)
                return None
            if problem is None:
                return None
            self._dirty = True  # apply even though the desired table did not change
            return self._apply_locked(f"the table was changed by someone else: {problem}")

    def counter_values(self) -> dict[str, tuple[int, int]]:
        """The table's named counters: name -> (packets, bytes) ({} before the first apply)."""
        compiled = self.compiled
        if compiled is None:
            return {}
        with self._lock:
            return self.applier.counter_values(compiled.ruleset.table, compiled.ruleset.family)

    def snapshot(self) -> tuple[ClusterState, CompiledPolicy | None]:
        """The live state (source merged with this node's attachments) and what the kernel
        holds; both immutable, for status, explain and the drop log."""
        return self.state, self.compiled

    # -- inside the lock -----------------------------------------------------------------------

    def _apply_locked(self, reason: str) -> ApplyRecord:
        assert self.source_state is not None
        started = time.perf_counter()
        state = attach(self.source_state, self.attachments.values())
        compiled = compile_policy(state, self.node, self.options)
        self.state = state
        if (not self._dirty and self.compiled is not None and self.applier.applied is not None
                and compiled.ruleset == self.applier.applied):
            self.compiled = compiled
            return ApplyRecord("skipped", time.perf_counter() - started, reason)
        try:
            result = self.applier.apply(compiled.ruleset)
        except NftError as exc:
            self._dirty = True
            seconds = time.perf_counter() - started
            self.counts.errors += 1
            self.counts.last_error = f"{reason}: {exc}"
            log.error("policy table not applied (%s): %s; the kernel keeps the previous "
                      "table", reason, exc)
            record = ApplyRecord("error", seconds, reason, str(exc))
        else:
            self._dirty = False
            self.compiled = compiled
            seconds = time.perf_counter() - started
            self.counts.applies += 1
            self.counts.last_apply = time.time()
            self.counts.last_kind = result.kind
            if self.counts.last_error is not None:
                log.info("policy table applied again (%s)", reason)
                self.counts.last_error = None
            level = logging.INFO if result.kind == "full" else logging.DEBUG
            log.log(level, "policy table: %s change (%d commands, %.1f ms): %s%s", result.kind,
                    result.commands, seconds * 1e3, reason,
                    f" ({result.reason})" if result.reason else "")
            record = ApplyRecord(result.kind, seconds, reason)
        if self.on_apply is not None:
            self.on_apply(record)
        return record

    # -- the attachments file ------------------------------------------------------------------

    @property
    def attachments_path(self) -> Path | None:
        return self.run_dir / ATTACHMENTS_FILE if self.run_dir is not None else None

    def _load_attachments(self) -> dict[str, Attachment]:
        path = self.attachments_path
        if path is None:
            return {}
        try:
            entries = json.loads(path.read_text())["pods"]
            found = [Attachment(e["container_id"], IPv4Address(e["ip"]), e["node"],
                                e.get("namespace"), e.get("name")) for e in entries]
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s is unreadable (%s); this node's pods are learned again from the "
                        "CNI and the policy source", path, exc)
            return {}
        return {a.container_id: a for a in found}

    def _save_attachments(self) -> None:
        path = self.attachments_path
        if path is None:
            return
        entries = [{"container_id": a.container_id, "ip": str(a.ip), "node": a.node,
                    "namespace": a.namespace, "name": a.name}
                   for a in sorted(self.attachments.values(), key=lambda a: a.container_id)]
        try:
            # The run directory is a tmpfs: the file need not survive a reboot (nor do pods).
            atomic_write(path, json.dumps({"pods": entries}).encode(), durable=False)
        except OSError as exc:
            log.warning("cannot save %s: %s", path, exc)


# -- explain --------------------------------------------------------------------------------


def parse_port(text: str) -> tuple[int | None, str]:
    """`80/TCP`, `53/udp`, `80` (TCP) or `ICMP` -> (port, protocol)."""
    number, _, protocol = text.strip().partition("/")
    if not protocol and not number.isdigit():
        return None, number.upper()
    protocol = (protocol or "TCP").upper()
    try:
        port = int(number)
    except ValueError:
        raise ExplainError(f"port {text!r}: expected PORT/PROTOCOL, like 80/TCP") from None
    if not 1 <= port <= 65535:
        raise ExplainError(f"port {text!r}: must be between 1 and 65535")
    if protocol not in PROTOCOLS:
        raise ExplainError(f"port {text!r}: the protocol must be one of "
                           f"{', '.join(PROTOCOLS)} (or give no port, like ICMP)")
    return port, protocol


def parse_endpoint(state: ClusterState, text: str,
                   node_addresses: Mapping[IPv4Address, str] | None = None) -> Endpoint:
    """A pod by namespace/name, or an address: a pod's, a node's (`node_addresses`), or any
    other (an ipBlock peer)."""
    text = text.strip()
    if "/" in text:
        pod = state.pod(text)
        if pod is None:
            raise ExplainError(f"no pod {text} is known to the policy source or this node's "
                               f"CNI")
        return pod
    try:
        address = IPv4Address(text)
    except ValueError:
        raise ExplainError(f"{text!r}: give a pod as NAMESPACE/NAME or an IPv4 address"
                           ) from None
    pod = state.pod_at(address)
    if pod is not None:
        return pod
    node = (node_addresses or {}).get(address)
    if node is not None:
        return Host(node, address)
    return address


def _endpoint_json(end: Endpoint) -> dict[str, Any]:
    if isinstance(end, Pod):
        return {"pod": end.key, "ip": str(end.ip) if end.ip else None, "node": end.node,
                "labels": dict(end.labels)}
    if isinstance(end, Host):
        return {"node": end.node, "ip": str(end.address)}
    return {"ip": str(end)}


def explain(state: ClusterState, src: str, dst: str, port: str,
            node_addresses: Mapping[IPv4Address, str] | None = None) -> dict[str, Any]:
    """The reference evaluator's verdict on a connection, on the live state."""
    number, protocol = parse_port(port)
    source = parse_endpoint(state, src, node_addresses)
    destination = parse_endpoint(state, dst, node_addresses)
    verdict = allowed(state, source, destination, number, protocol)
    return {
        "allowed": verdict.allowed,
        "verdict": "allowed" if verdict.allowed else "denied",
        "reason": verdict.reason,
        "policies": list(verdict.deciding_policies),
        "decisions": [dataclasses.asdict(d) | {"allowed": d.allowed, "text": d.text()}
                      for d in verdict.decisions],
        "source": _endpoint_json(source),
        "destination": _endpoint_json(destination),
        "port": number,
        "protocol": protocol,
        "text": verdict.text(),
    }


# -- status ---------------------------------------------------------------------------------


def status_document(state: ClusterState, compiled: CompiledPolicy | None, node: str,
                    counters: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
    """Policies, the pods of this node they select, isolation per direction, drops (from the
    compiler's named counters) and notes."""
    policies: dict[str, dict[str, Any]] = {
        p.key: {"policy": p.key, "types": sorted(p.policy_types), "pods": [],
                "drops": {"ingress": 0, "egress": 0}}
        for p in sorted(state.policies, key=lambda p: p.key)}
    pods: list[dict[str, Any]] = []
    if compiled is not None:
        pod_drops: dict[str, dict[str, int]] = {}
        for counter, (subject, direction) in compiled.drop_counters.items():
            packets = counters.get(counter, (0, 0))[0]
            if counter in compiled.signatures:
                for key in compiled.signatures[counter]:
                    if key in policies:
                        policies[key]["drops"][direction] += packets
            else:
                pod_drops.setdefault(subject, {})[direction] = packets
        for key, directions in sorted(compiled.isolated.items()):
            pod = state.pod(key)
            for chain in directions.values():
                for policy_key in compiled.signatures.get(chain, ()):
                    if policy_key in policies and key not in policies[policy_key]["pods"]:
                        policies[policy_key]["pods"].append(key)
            pods.append({
                "pod": key, "ip": str(pod.ip) if pod and pod.ip else None,
                "isolated": {d: list(compiled.signatures.get(c, ())) for d, c in
                             sorted(directions.items())},
                "drops": pod_drops.get(key, {}),
            })
    local = [p for p in state.addressed_pods if p.node == node]
    return {
        "policies": list(policies.values()),
        "pods": pods,
        "local_pods": len(local),
        "isolated_pods": {d: sum(1 for p in pods if d in p["isolated"])
                          for d in ("ingress", "egress")},
        "notes": list(compiled.notes) if compiled is not None else [],
        "table": compiled.ruleset.table if compiled is not None else None,
        "size": dataclasses.asdict(compiled.ruleset.size()) if compiled is not None else None,
    }
