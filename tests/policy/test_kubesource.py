"""Policy state from the Kubernetes API (weavepy.policy.kubesource): lists, then watches of
NetworkPolicy, Pod and Namespace; 410 Gone relists; an unreachable API keeps the last state.

No API server can run here: the tests talk to a stand-in on 127.0.0.1
(tests/policy/kube_policy_replay.py) that serves scripted lists and watch streams over HTTPS.
Everything else is real: lightkube's in-cluster configuration reads a service-account
directory and $KUBERNETES_SERVICE_HOST/PORT, TLS is verified against its CA, under trio."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.deploy.kube_fixtures import TOKEN
from tests.deploy.kube_replay import Watch, serve_replay
from tests.policy.kube_policy_replay import PolicyReplayApi, listing, status
from weavepy.kube import Backoff
from weavepy.policy.kubesource import KubePolicySource
from weavepy.policy.model import ClusterState
from weavepy.policy.sources import KINDS

pytestmark = pytest.mark.timeout(60)


def namespace(name: str, version: str = "1") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "resourceVersion": version,
                         "labels": {"kubernetes.io/metadata.name": name, "ns": name}},
            "status": {"phase": "Active"}}


def pod(name: str, address: str, version: str = "1", **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "x", "resourceVersion": version,
                         "labels": labels},
            "spec": {"nodeName": "n1", "containers": [
                {"name": "server", "image": "registry.k8s.io/e2e-test-images/agnhost:2.47",
                 "ports": [{"containerPort": 80, "name": "serve-80-tcp",
                            "protocol": "TCP"}]}]},
            "status": {"phase": "Running", "podIP": address, "podIPs": [{"ip": address}]}}


def policy(name: str, version: str = "1", **match: str) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "x", "resourceVersion": version},
            "spec": {"podSelector": {"matchLabels": match}, "policyTypes": ["Ingress"]}}


def event(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "object": obj}


@pytest.fixture
async def api(account: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch,
              nursery: trio.Nursery) -> AsyncIterator[tuple[PolicyReplayApi, Path]]:
    directory, cert, key = account
    replay = PolicyReplayApi(TOKEN)
    port: int = await nursery.start(serve_replay, replay, cert, key)  # type: ignore[arg-type]
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(port))
    yield replay, directory


def base_lists(replay: PolicyReplayApi) -> None:
    replay.lists["Namespace"].append(listing("Namespace", "10", [namespace("x")]))
    replay.lists["Pod"].append(listing("Pod", "20", [pod("a", "198.19.0.2", pod="a")]))
    replay.lists["NetworkPolicy"].append(listing("NetworkPolicy", "30", [policy("deny")]))


def source_for(directory: Path) -> KubePolicySource:
    backoff = {kind: Backoff(0.05, 0.2, random.Random(i)) for i, kind in enumerate(KINDS)}
    return KubePolicySource.in_cluster(service_account_dir=directory, backoff=backoff)


async def next_state(states: Any) -> ClusterState:
    with trio.fail_after(15):
        state: ClusterState = await states.receive()
        return state


async def test_lists_then_follows_watch_events(api: tuple[PolicyReplayApi, Path]) -> None:
    replay, directory = api
    base_lists(replay)
    replay.watches["Pod"].append(Watch(lines=[
        event("ADDED", pod("b", "198.19.0.3", "21", pod="b")),
        event("MODIFIED", pod("a", "198.19.0.2", "22", pod="z"))], hang=True))
    async with source_for(directory) as source, source.watch_state() as states:
        first = await next_state(states)
        assert [p.key for p in first.policies] == ["x/deny"]
        assert first.namespace_labels("x")["ns"] == "x"
        final = first
        while {p.key: p.labels.get("pod") for p in final.pods} != {"x/a": "z", "x/b": "b"}:
            final = await next_state(states)
        watches = replay.requests("Pod", watch=True)
        assert watches[0].query["resourceVersion"] == "20"
        assert watches[0].query.get("timeoutSeconds") == "300"
        assert source.status()["ready"] is True
        assert source.kinds["Pod"].resource_version == "22"


async def test_410_gone_relists_at_once(api: tuple[PolicyReplayApi, Path]) -> None:
    replay, directory = api
    base_lists(replay)
    relisted = listing("NetworkPolicy", "40", [policy("deny"), policy("allow", pod="a")])
    replay.lists["NetworkPolicy"].append(relisted)
    replay.watches["NetworkPolicy"].append(Watch(lines=[event("ERROR", status(
        410, "Expired", "too old resource version: 30 (35)"))]))
    async with source_for(directory) as source, source.watch_state() as states:
        state = await next_state(states)
        while len(state.policies) < 2:
            state = await next_state(states)
        assert [p.key for p in state.policies] == ["x/allow", "x/deny"]
        assert source.kinds["NetworkPolicy"].errors == 0  # a relist, not a failure
        assert len(replay.requests("NetworkPolicy", watch=False)) == 2


async def test_an_unreachable_api_keeps_the_last_state_and_retries(
        api: tuple[PolicyReplayApi, Path], caplog: pytest.LogCaptureFixture) -> None:
    replay, directory = api
    base_lists(replay)
    failing = Watch(status=500, body=status(500, "InternalError", "etcdserver: leader changed"))
    replay.watches["NetworkPolicy"].extend([failing])
    # the relist after the failure fails twice too, then answers with another policy
    replay.lists["NetworkPolicy"].extend([failing, failing,
                                          listing("NetworkPolicy", "50", [policy("later")])])
    caplog.set_level(logging.WARNING)
    async with source_for(directory) as source, source.watch_state() as states:
        first = await next_state(states)
        assert [p.key for p in first.policies] == ["x/deny"]
        second = await next_state(states)  # only once the API answers again
        assert [p.key for p in second.policies] == ["x/later"] and second.pods == first.pods
        status_ = source.status()["kinds"]["NetworkPolicy"]
        assert status_["errors"] == 3 and status_["last_error"] is None
        assert any("keeping the last known state" in r.getMessage() for r in caplog.records)


async def test_nothing_before_every_kind_is_listed(api: tuple[PolicyReplayApi, Path]) -> None:
    replay, directory = api
    base_lists(replay)
    replay.lists["Pod"].appendleft(Watch(status=500, body=status(500, "InternalError", "x")))
    async with source_for(directory) as source, source.watch_state() as states:
        state = await next_state(states)
        assert [p.key for p in state.pods] == ["x/a"]  # the first state already has pods
        assert source.kinds["Pod"].errors == 1


async def test_a_policy_that_does_not_parse_keeps_its_last_version(
        api: tuple[PolicyReplayApi, Path], caplog: pytest.LogCaptureFixture) -> None:
    replay, directory = api
    base_lists(replay)
    broken = policy("deny", "31")
    broken["spec"]["ingress"] = [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8",
                                                         "except": ["11.0.0.0/8"]}}]}]
    replay.watches["NetworkPolicy"].append(Watch(lines=[
        event("MODIFIED", broken), event("ADDED", policy("other", "32"))], hang=True))
    caplog.set_level(logging.WARNING)
    async with source_for(directory) as source, source.watch_state() as states:
        state = await next_state(states)
        while len(state.policies) < 2:
            state = await next_state(states)
        deny = state.policy("x/deny")
        assert deny is not None and deny.ingress == ()  # the last good version
        assert "NetworkPolicy x/deny" in source.status()["invalid"]
        assert [r.getMessage() for r in caplog.records if "except[0]" in r.getMessage()]
