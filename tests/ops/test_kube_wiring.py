"""`--kube-peers` wiring in the agent (weavepy.kube's agent tasks): the Kubernetes node set
becomes the join targets, and once the node is ready the NetworkUnavailable condition is set,
retried until the API takes it. No API server can run here: the API is
tests/deploy/kube_replay.py, a local HTTPS server replaying recorded responses."""

from __future__ import annotations

import json
import random

import trio

from tests.deploy.kube_fixtures import TOKEN, Cluster
from tests.deploy.kube_replay import Watch, recorded
from weavepy.kube import Backoff, KubePeerSource, follow_kube_peers, mark_network_available
from weavepy.targets import TargetSchedule


def source_for(replay: Cluster) -> KubePeerSource:
    return KubePeerSource.in_cluster("n1", service_account_dir=replay.account,
                                     backoff=Backoff(0.05, 0.2, random.Random(1)))


async def test_node_set_replaces_the_join_targets(cluster: Cluster) -> None:
    cluster.api.lists.append(recorded("nodes-list-1.json"))
    cluster.api.watches.append(Watch(recorded("watch-1.jsonl"), hang=True))
    targets = TargetSchedule(random.Random(1))
    targets.add(["198.18.0.77:6783"], trio.current_time())  # replaced, like Weave's peers
    changes = trio.Event()
    seen: list[list[str]] = []

    def changed() -> None:
        seen.append(targets.addresses())
        changes.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow_kube_peers, source_for(cluster), targets, 6783,
                           ["198.18.0.99:6783"], changed)
        with trio.fail_after(20):
            while not seen or sorted(seen[-1]) != ["198.18.0.33:6783", "198.18.0.4:6783",
                                                   "198.18.0.99:6783"]:
                await changes.wait()
                changes = trio.Event()
        nursery.cancel_scope.cancel()
    assert sorted(seen[0]) == ["198.18.0.2:6783", "198.18.0.3:6783", "198.18.0.99:6783"]


async def test_condition_waits_for_ready_and_retries(cluster: Cluster) -> None:
    api = cluster.api
    api.token = "not-yet"  # the first patches are refused (401)
    ready = False
    async with trio.open_nursery() as nursery, source_for(cluster) as source:
        done = trio.Event()

        async def mark() -> None:
            await mark_network_available(source, lambda: ready, backoff=(0.05, 0.1),
                                         poll=0.01)
            done.set()

        nursery.start_soon(mark)
        await trio.sleep(0.2)
        assert not api.requests("PATCH", "/api/v1/nodes/n1/status"), "patched before ready"
        ready = True
        with trio.fail_after(10):
            while len(api.requests("PATCH", "/api/v1/nodes/n1/status")) < 2:
                await trio.sleep(0.01)
            assert not done.is_set()
            api.token = TOKEN
            await done.wait()
    body = json.loads(api.requests("PATCH", "/api/v1/nodes/n1/status")[-1].body)
    condition = body["status"]["conditions"][0]
    assert (condition["type"], condition["status"]) == ("NetworkUnavailable", "False")
