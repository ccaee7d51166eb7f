"""The CNI backend with NetworkPolicy: the pod network's backend, and the pod's isolation made
real in the kernel before its ADD returns.

This module owns the order of a pod's start and end as policy sees them. It wraps the agent's
`PodNetworkBackend` and runs on the CNI server's worker thread. The rules it keeps:

* **No start race.** ADD builds the pod's network, then hands the pod (address, container ID,
  K8S_POD_NAMESPACE/K8S_POD_NAME) to the enforcer, which applies the node's policy table with
  the pod in it before the answer goes back; the runtime starts the pod's processes only
  after that. A pod no policy touches costs no kernel work.
* **Fail closed.** If the policy cannot be applied, the ADD undoes the pod's network and
  fails with a CNI error: never a running pod that should be isolated and is not.
* **No guess before the source answers.** Until the policy source has given its first state
  (the Kubernetes lists, the directory's first read) an ADD waits for it off the worker
  thread (`AnswerLater`), at most `ready_timeout` s, then fails with "try again later".
* DEL and GC forget the pod after its network is gone; their policy work never fails them
  (a leftover element is harmless and the enforcer's next check retries).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address

from weavepy.cni.backend import BridgeBackend
from weavepy.cni.protocol import CniError, CniRequest, ErrorCode
from weavepy.cni.result import Result
from weavepy.cni.server import AnswerLater
from weavepy.nft import NftError
from weavepy.policy.enforcer import PolicyApplyError, PolicyEnforcer
from weavepy.policy.model import Attachment

__all__ = ["PolicyBackend"]

log = logging.getLogger(__name__)

READY_TIMEOUT = 20.0  # seconds an ADD waits for the policy source's first state


class PolicyBackend:
    """`PodNetworkBackend`: `inner` for the pod's network, `enforcer` for its isolation.
    `wait_ready` (run on the event loop) returns when the enforcer is ready or gives up."""

    def __init__(self, inner: BridgeBackend, enforcer: PolicyEnforcer,
                 wait_ready: Callable[[], Awaitable[None]], *,
                 ready_timeout: float = READY_TIMEOUT) -> None:
        self.inner = inner
        self.enforcer = enforcer
        self.wait_ready = wait_ready
        self.ready_timeout = ready_timeout
        self._waiting_since: dict[str, float] = {}  # container ID -> first ADD before ready

    def close(self) -> None:
        self.inner.close()

    def forget_gone(self) -> None:
        """Forget the enforcer's pods the allocator no longer holds (at start, after GC)."""
        held = {a.container_id for a in self.inner.allocator.attachments()}
        try:
            self.enforcer.retain(held)
        except NftError as exc:
            log.warning("policy: forgetting gone pods failed: %s (retried at the next check)",
                        exc)

    def add(self, request: CniRequest) -> Result:
        self._wait_for_source(request.container_id)
        result = self.inner.add(request)
        ours = result.ips[-1].address.ip if result.ips else None
        if not isinstance(ours, IPv4Address):
            return result  # no IPv4 address: nothing for IPv4 policy to isolate
        pod = request.pod
        found = Attachment(request.container_id, ours, self.enforcer.node,
                           (pod.namespace or None) if pod else None,
                           (pod.name or None) if pod else None)
        try:
            self.enforcer.pod_added(found)
        except (PolicyApplyError, NftError) as exc:
            log.error("ADD %s: NetworkPolicy could not be applied (%s); undoing the pod's "
                      "network", request.container_id[:12], exc)
            try:
                self.inner.delete(request)
            except CniError as undo:
                log.error("ADD %s: undoing the pod's network failed too: %s",
                          request.container_id[:12], undo)
            raise CniError(ErrorCode.INTERNAL, "NetworkPolicy could not be applied to the pod",
                           str(exc)) from None
        return result

    def _wait_for_source(self, container_id: str) -> None:
        if self.enforcer.ready:
            self._waiting_since.pop(container_id, None)
            return
        now = time.monotonic()
        since = self._waiting_since.setdefault(container_id, now)
        if now - since >= self.ready_timeout:
            self._waiting_since.pop(container_id, None)
            raise CniError(ErrorCode.TRY_AGAIN_LATER, "NetworkPolicy is not known yet",
                           f"the policy source gave no state within {self.ready_timeout:g} "
                           f"s; see `weavepy status policy`")
        raise AnswerLater(self.wait_ready)

    def delete(self, request: CniRequest) -> None:
        self._waiting_since.pop(request.container_id, None)
        self.inner.delete(request)
        try:
            self.enforcer.pod_removed(request.container_id)
        except NftError as exc:
            log.warning("DEL %s: policy table not updated (%s); retried at the next check",
                        request.container_id[:12], exc)

    def check(self, request: CniRequest) -> None:
        self.inner.check(request)

    def status(self, request: CniRequest) -> None:
        self.inner.status(request)

    def gc(self, request: CniRequest) -> None:
        try:
            self.inner.gc(request)
        finally:
            self.forget_gone()
