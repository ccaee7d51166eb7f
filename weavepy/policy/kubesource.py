"""NetworkPolicy, Pod and Namespace from the Kubernetes API, as one `ClusterState` stream.

This module owns the policy side's conversation with the API server. For each kind it runs the
reflector pattern (client-go's, and weavepy.kube's for nodes): list, then watch from the
list's resourceVersion; the server ends each watch after `watch_timeout` s and the client
gives it `WATCH_GRACE` s more (a half-open connection would hang a watch forever); `410 Gone`
(in the response or in the stream) relists at once; any other failure is logged, counted,
kept in `status()`, and retried after a jittered exponential backoff, from a fresh list.

The rules it keeps:

* **The last known state stays while the API is unreachable.** Objects are only replaced by
  a successful list or changed by a watch event; a failure changes nothing, so the node keeps
  enforcing what it last knew (weave-npc stopped at an API outage; weave#3191 crash-looped).
* **No state before every kind has been listed once.** A policy known before its pods would
  compile to empty peer sets; the first `ClusterState` is yielded only after the three lists.
* Pods of every namespace are watched (peer sets are cluster-wide). Host-network and finished
  pods are left out (model.parse_pod); an object that does not parse is one logged line and
  keeps its last good version (sources.PolicyStore).

RBAC: get/list/watch on networkpolicies (networking.k8s.io), pods and namespaces.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import msgspec
import trio
from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ApiError, ConfigError
from lightkube.resources.core_v1 import Namespace as NamespaceResource
from lightkube.resources.core_v1 import Pod as PodResource
from lightkube.resources.networking_v1 import NetworkPolicy as NetworkPolicyResource

from weavepy.kube import (
    DEFAULT_WATCH_TIMEOUT,
    REQUEST_TIMEOUT,
    SERVICE_ACCOUNT_DIR,
    WATCH_GRACE,
    Backoff,
    KubeError,
)
from weavepy.kube import _describe as describe_failure
from weavepy.policy.model import ClusterState, Pod, PolicyInputError, parse_pod
from weavepy.policy.sources import KINDS, Kind, PolicyStore

__all__ = ["KubePolicySource"]

log = logging.getLogger(__name__)

RESOURCES: dict[Kind, Any] = {"NetworkPolicy": NetworkPolicyResource, "Pod": PodResource,
                              "Namespace": NamespaceResource}
NAMESPACED: dict[Kind, bool] = {"NetworkPolicy": True, "Pod": True, "Namespace": False}


@dataclass
class _KindStatus:
    lists: int = 0
    watches: int = 0
    errors: int = 0
    last_error: str | None = None
    resource_version: str | None = None


class KubePolicySource:
    """Policy state from the Kubernetes API; see the module docstring. Close the client with
    `aclose()` (or `async with`)."""

    def __init__(self, client: AsyncClient, *, watch_timeout: int = DEFAULT_WATCH_TIMEOUT,
                 watch_grace: float = WATCH_GRACE,
                 backoff: dict[Kind, Backoff] | None = None) -> None:
        self.client = client
        self.watch_timeout = watch_timeout
        self.watch_grace = watch_grace
        self.store = PolicyStore()
        self.kinds = {kind: _KindStatus() for kind in KINDS}
        self._backoff = backoff or {kind: Backoff() for kind in KINDS}
        self._listed: set[Kind] = set()
        self._changed = trio.Event()

    @classmethod
    def in_cluster(cls, *, service_account_dir: Path = SERVICE_ACCOUNT_DIR,
                   **kwargs: Any) -> KubePolicySource:
        """A source that talks to the API server of the cluster this pod runs in."""
        try:
            config = KubeConfig.from_service_account(service_account=service_account_dir)
            client = AsyncClient(config=config, timeout=httpx2.Timeout(REQUEST_TIMEOUT),
                                 field_manager="weavepy")
        except (ConfigError, KeyError, OSError) as exc:
            detail = f"${exc.args[0]} is not set" if isinstance(exc, KeyError) else str(exc)
            raise KubeError(f"policy from Kubernetes needs the in-cluster service account "
                            f"({service_account_dir}, $KUBERNETES_SERVICE_HOST/PORT): "
                            f"{detail}") from None
        return cls(client, **kwargs)

    async def __aenter__(self) -> KubePolicySource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()

    @trio.as_safe_channel
    async def watch_state(self) -> AsyncGenerator[ClusterState, None]:
        """The state once every kind is listed, then again after each change (bursts are
        coalesced: a slow reader gets the latest state); runs until cancelled. Failures never
        end it. Use as ``async with source.watch_state() as states: async for s in states``."""
        async with trio.open_nursery() as nursery:
            for kind in KINDS:
                nursery.start_soon(self._reflect, kind)
            announced: ClusterState | None = None
            while True:
                await self._changed.wait()
                self._changed = trio.Event()
                if self._listed != set(KINDS):
                    continue
                state = self.store.snapshot()
                if state != announced:
                    announced = state
                    yield state

    def _wake(self) -> None:
        self._changed.set()

    async def _list(self, kind: Kind) -> str | None:
        status = self.kinds[kind]
        namespace = "*" if NAMESPACED[kind] else None
        listing = self.client.list(RESOURCES[kind], namespace=namespace)
        items = [obj.to_dict() async for obj in listing]
        status.lists += 1
        if self.store.replace(kind, items) or kind not in self._listed:
            self._listed.add(kind)
            self._wake()
        return listing.resourceVersion

    async def _reflect(self, kind: Kind) -> None:
        status = self.kinds[kind]
        backoff = self._backoff[kind]
        namespace = "*" if NAMESPACED[kind] else None
        while True:
            try:
                if status.resource_version is None:
                    status.resource_version = await self._list(kind)
                    backoff.reset()
                    status.last_error = None
                status.watches += 1
                events = self.client.watch(RESOURCES[kind], namespace=namespace,
                                           resource_version=status.resource_version,
                                           server_timeout=self.watch_timeout)
                with trio.move_on_after(self.watch_timeout + self.watch_grace):
                    # lightkube types the watch as an AsyncIterable; it is an async generator
                    async with contextlib.aclosing(events):  # type: ignore[type-var]
                        async for event, obj in events:
                            raw = obj.to_dict()
                            version = (raw.get("metadata") or {}).get("resourceVersion")
                            if version:
                                status.resource_version = version
                            if self.store.apply(kind, event, raw):
                                self._wake()
                            backoff.reset()
                            status.last_error = None
                continue  # the watch ended or timed out: resume from the last version
            except ApiError as exc:
                if exc.status is not None and exc.status.code == 410:
                    log.info("%s watch: resourceVersion %s is too old; listing again", kind,
                             status.resource_version)
                    status.resource_version = None
                    continue
                failure = describe_failure(exc)
            except (httpx2.HTTPError, msgspec.MsgspecError, OSError) as exc:
                failure = describe_failure(exc)
            status.errors += 1
            status.last_error = failure
            status.resource_version = None
            delay = backoff.next_delay()
            log.warning("Kubernetes API (%s): %s; keeping the last known state, retrying in "
                        "%.1f s", kind, failure, delay)
            await trio.sleep(delay)

    async def fetch_pod(self, namespace: str, name: str, timeout: float = 2.0) -> Pod | None:
        """One Pod read from the API now (for a CNI ADD that came before the watch told us
        of the pod), also kept in the store; None if it is not there or the API does not
        answer within `timeout` s."""
        with trio.move_on_after(timeout):
            try:
                obj = await self.client.get(PodResource, name=name, namespace=namespace)
            except ApiError as exc:
                if exc.status is None or exc.status.code != 404:
                    log.warning("Kubernetes API: reading pod %s/%s: %s", namespace, name,
                                describe_failure(exc))
                return None
            except (httpx2.HTTPError, msgspec.MsgspecError, OSError) as exc:
                log.warning("Kubernetes API: reading pod %s/%s: %s", namespace, name,
                            describe_failure(exc))
                return None
            raw = obj.to_dict()
            self.store.apply("Pod", "ADDED", raw)
            try:
                return parse_pod(raw)
            except PolicyInputError:
                return None  # the store logged it
        log.warning("Kubernetes API: reading pod %s/%s took longer than %g s", namespace,
                    name, timeout)
        return None

    def status(self) -> dict[str, Any]:
        """For the agent's status document."""
        return {"source": "kubernetes", "ready": self._listed == set(KINDS),
                "kinds": {kind: vars(s).copy() for kind, s in self.kinds.items()},
                "invalid": dict(self.store.errors)}
