"""`--kube-peers`: peers from the Kubernetes API, and the NetworkUnavailable condition.

No API server can run here, so these tests talk to a local HTTPS server on 127.0.0.1
(tests/deploy/kube_replay.py) that replays recorded API responses (tests/deploy/kube_api/,
written in the API server's wire shape; see its README). Everything else is real: lightkube's
in-cluster configuration reads a service-account directory (token, namespace, CA) and
$KUBERNETES_SERVICE_HOST/PORT, TLS is verified against that CA, and the client runs under trio.
"""

from __future__ import annotations

import json
import random
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from tests.deploy.kube_fixtures import TOKEN, Cluster
from tests.deploy.kube_replay import Watch, recorded
from weavepy.kube import (
    CONDITION_REASON,
    Backoff,
    KubeError,
    KubeNode,
    KubePeer,
    KubePeerSource,
    NodeChanges,
    NodeInfo,
    NodePeerTable,
    member_for_node,
    route_node_changes,
)

pytestmark = pytest.mark.timeout(60)

def source_for(cluster: Cluster, **kwargs: object) -> KubePeerSource:
    kwargs.setdefault("backoff", Backoff(0.05, 0.2, random.Random(1)))
    return KubePeerSource.in_cluster("n1", service_account_dir=cluster.account,
                                     **kwargs)  # type: ignore[arg-type]


def peers(*pairs: tuple[str, str]) -> frozenset[KubePeer]:
    return frozenset(KubePeer(n, a) for n, a in pairs)


# -- the sans-IO table -----------------------------------------------------------------------

def test_table_follows_list_and_events() -> None:
    table = NodePeerTable("n1")
    listing = recorded("nodes-list-1.json")
    assert table.replace([NodeInfo.from_dict(n) for n in listing["items"]], "1000")
    assert table.peers == peers(("n2", "198.18.0.2"), ("n3", "198.18.0.3"))
    assert table.skipped["no_ipv4_address"] == 1  # n6 has only an IPv6 InternalIP
    changes = []
    for line in recorded("watch-1.jsonl"):
        changes.append(table.apply(line["type"], NodeInfo.from_dict(line["object"])))
    # ADDED n4, heartbeat of n2 (no change), n3 gains an InternalIP, DELETED n2, n5 deleting
    assert changes == [True, False, True, True, False]
    assert table.peers == peers(("n3", "198.18.0.33"), ("n4", "198.18.0.4"))
    assert table.take_deleted() == (KubeNode("n2", "198.18.0.2"),)
    assert table.take_deleted() == ()  # each deletion is reported once
    assert {n.name for n in table.present} == {"n1", "n3", "n4", "n5", "n6"}  # n5: deleting
    assert table.resource_version == "1005"
    assert not table.apply("BOOKMARK", NodeInfo("n4", resource_version="1010"))
    assert table.resource_version == "1010"
    assert not table.apply("SURPRISE", NodeInfo("n9", (("InternalIP", "198.18.0.9"),)))
    assert table.skipped["malformed"] == 1
    # a fresh list (after 410 Gone) misses nodes deleted while the watch was down
    listing = recorded("nodes-list-2.json")
    table.replace([NodeInfo.from_dict(n) for n in listing["items"]], "1600")
    assert table.take_deleted() == (KubeNode("n5", "198.18.0.5"), KubeNode("n6", None))


def test_a_deleted_node_maps_to_the_member_of_its_name_else_of_its_address() -> None:
    members = {"n1": "198.18.0.1", "host-b": "198.18.0.2", "c": None, "d": "198.18.0.4",
               "e": "198.18.0.4"}
    assert member_for_node(KubeNode("n1", "198.18.0.9"), members) == "n1"
    assert member_for_node(KubeNode("node-b.example", "198.18.0.2"), members) == "host-b"
    assert member_for_node(KubeNode("node-x", None), members) is None
    assert member_for_node(KubeNode("node-y", "198.18.0.7"), members) is None
    assert member_for_node(KubeNode("node-z", "198.18.0.4"), members) is None  # ambiguous


def test_node_changes_reach_the_reclaimer_as_member_names() -> None:
    class Reclaimer:
        def __init__(self) -> None:
            self.deleted: list[tuple[str, str]] = []
            self.listed: list[list[str]] = []

        def members(self) -> dict[str, str | None]:
            return {"n1": "198.18.0.1", "host-b": "198.18.0.2", "n3": "198.18.0.3"}

        def node_deleted(self, member: str, node: str) -> None:
            self.deleted.append((member, node))

        def nodes_listed(self, members: Collection[str]) -> None:
            self.listed.append(list(members))

    reclaimer = Reclaimer()
    route_node_changes(NodeChanges(
        frozenset(), frozenset({KubeNode("n1", "198.18.0.1"), KubeNode("n3", "198.18.0.3"),
                                KubeNode("new", "198.18.0.9")}),
        (KubeNode("node-b", "198.18.0.2"), KubeNode("stranger", "198.18.0.8"))), reclaimer)
    assert reclaimer.deleted == [("host-b", "node-b")]
    assert reclaimer.listed == [["n1", "n3"]]


def test_node_info_rejects_nameless_nodes_and_skips_bad_addresses() -> None:
    with pytest.raises(ValueError, match=r"metadata\.name"):
        NodeInfo.from_dict({"kind": "Node", "metadata": {}})
    info = NodeInfo.from_dict({"metadata": {"name": "x"}, "status": {"addresses": [
        {"type": "InternalIP", "address": "not-an-ip"}, {"type": "InternalIP"}, "junk",
        {"type": "ExternalIP", "address": "198.18.5.5"}]}})
    assert info.peer_address() == "198.18.5.5"
    excluded = NodePeerTable("n1", exclude_addresses=["198.18.5.5"])
    assert not excluded.replace([info], "1")


def test_backoff_grows_with_jitter_and_resets() -> None:
    backoff = Backoff(1.0, 8.0, random.Random(7))
    delays = [backoff.next_delay() for _ in range(6)]
    ceilings = [1, 2, 4, 8, 8, 8]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    backoff.reset()
    assert backoff.next_delay() <= 1.0


# -- against the replayed API ----------------------------------------------------------------

async def test_list_then_watch_then_relist_after_410(cluster: Cluster) -> None:
    api = cluster.api
    api.lists.extend([recorded("nodes-list-1.json"), recorded("nodes-list-2.json")])
    api.watches.extend([Watch(recorded("watch-1.jsonl")),  # then the server ends the watch
                        Watch(recorded("watch-expired.jsonl")),
                        Watch(hang=True)])
    seen: list[frozenset[KubePeer]] = []
    deleted: list[KubeNode] = []
    async with source_for(cluster) as source, source.watch_nodes() as changes:
        with trio.fail_after(20):
            async for change in changes:
                deleted.extend(change.deleted)
                if not seen or change.peers != seen[-1]:
                    seen.append(change.peers)
                if change.peers == peers(("n3", "198.18.0.33"), ("n4", "198.18.0.4"),
                                         ("n7", "198.18.0.7")):
                    break
            # the generator advances only when asked for more: ask, and see it watch again
            async with trio.open_nursery() as nursery:
                nursery.start_soon(changes.receive)
                while len(api.requests()) < 5:  # 2 lists, 3 watches
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        status = source.status()
    assert seen == [
        peers(("n2", "198.18.0.2"), ("n3", "198.18.0.3")),
        peers(("n2", "198.18.0.2"), ("n3", "198.18.0.3"), ("n4", "198.18.0.4")),
        peers(("n2", "198.18.0.2"), ("n3", "198.18.0.33"), ("n4", "198.18.0.4")),
        peers(("n3", "198.18.0.33"), ("n4", "198.18.0.4")),
        peers(("n3", "198.18.0.33"), ("n4", "198.18.0.4"), ("n7", "198.18.0.7")),
    ]
    # n2 by its DELETED event; n5 (deleting) and n6 are missing from the list after 410
    assert [n.name for n in deleted] == ["n2", "n5", "n6"]
    lists = [r for r in api.requests() if "watch" not in r.query]
    watches = [r for r in api.requests() if r.query.get("watch") == "true"]
    assert len(lists) == 2
    # first watch from the list's version; after the server ended it, resume from the last
    # event's version (no list); after 410 Gone, list again and watch from the new version
    assert [w.query.get("resourceVersion") for w in watches[:3]] == ["1000", "1005", "1600"]
    assert all(w.query.get("timeoutSeconds") == "300" for w in watches)
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in api.seen)
    assert status["errors"] == 0 and status["lists"] == 2 and status["peers"] == 3


async def test_api_errors_are_retried_and_reported(cluster: Cluster) -> None:
    api = cluster.api
    api.lists.append(recorded("nodes-list-1.json"))
    api.watches.extend([Watch(status=500, body=recorded("status-500.json")),
                        Watch(lines=["this is not JSON"]),
                        Watch(lines=[{"type": "ADDED", "object": {
                            "kind": "Node", "apiVersion": "v1",
                            "metadata": {"name": "n8", "resourceVersion": "1100"},
                            "status": {"addresses": [{"type": "InternalIP",
                                                      "address": "198.18.0.8"}]}}}],
                              hang=True)])
    async with source_for(cluster) as source, source.watch_nodes() as changes:
        with trio.fail_after(20):
            first = await changes.receive()
            assert first.peers == peers(("n2", "198.18.0.2"), ("n3", "198.18.0.3"))
            second = await changes.receive()
    assert KubePeer("n8", "198.18.0.8") in second.peers
    assert source.errors == 2  # the 500, then the garbage line; each retried after a backoff
    assert source.last_error is None  # cleared by the success that followed
    assert len([r for r in api.requests() if "watch" not in r.query]) == 3  # re-listed twice


async def test_unreachable_api_keeps_trying(account: tuple[Path, Path, Path],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    directory, _, _ = account
    with trio.socket.socket() as probe:  # a port nobody listens on
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(port))
    source = KubePeerSource.in_cluster("n1", service_account_dir=directory,
                                       backoff=Backoff(0.01, 0.05, random.Random(2)))
    async with source:
        async with source.watch_nodes() as changes:
            with trio.move_on_after(1.0):
                await changes.receive()
                pytest.fail("no peer set can come from an unreachable API")
        assert source.errors >= 3
        assert source.last_error and "Connect" in source.last_error
        with pytest.raises(KubeError, match="cannot list nodes"):
            await source.list_peers()


async def test_token_rotation_is_followed(cluster: Cluster) -> None:
    api = cluster.api
    api.lists.append(recorded("nodes-list-1.json"))
    async with source_for(cluster) as source:
        assert len(await source.list_peers()) == 2
        api.token = "eyJhbGciOiJSUzI1NiJ9.test-token-2"  # the kubelet rotated the token
        (cluster.account / "token").write_text(api.token)
        assert len(await source.list_peers()) == 2
    codes = [r.headers["authorization"] for r in api.requests()]
    assert codes == [f"Bearer {TOKEN}", f"Bearer {TOKEN}", f"Bearer {api.token}"]


async def test_set_network_available_patches_the_status(cluster: Cluster) -> None:
    now = datetime(2026, 11, 21, 10, 10, 0, tzinfo=UTC)
    async with source_for(cluster) as source:
        await source.set_network_available(now=now)
        cluster.api.token = "revoked"
        (cluster.account / "token").write_text("also-wrong")
        with pytest.raises(KubeError, match="NetworkUnavailable=False on node n2: 401"):
            await source.set_network_available("n2", now=now)
    patch = cluster.api.requests("PATCH", "/api/v1/nodes/n1/status")[0]
    assert patch.headers["content-type"] == "application/strategic-merge-patch+json"
    assert json.loads(patch.body) == {"status": {"conditions": [{
        "type": "NetworkUnavailable", "status": "False", "reason": CONDITION_REASON,
        "message": "weavepy is running on this node",
        "lastTransitionTime": "2026-11-21T10:10:00Z",
        "lastHeartbeatTime": "2026-11-21T10:10:00Z"}]}}


async def test_a_kubeconfig_file_reaches_the_api(cluster: Cluster, tmp_path: Path) -> None:
    """`--kubeconfig`: the agent outside a pod reads the server, CA and token from a file."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "c", "cluster": {
            "server": f"https://127.0.0.1:{cluster.port}",
            "certificate-authority": str(cluster.account / "ca.crt")}}],
        "users": [{"name": "u", "user": {"token": TOKEN}}],
        "contexts": [{"name": "test", "context": {"cluster": "c", "user": "u"}}]}))
    cluster.api.lists.append(recorded("nodes-list-1.json"))
    async with KubePeerSource.from_kubeconfig(kubeconfig, "n1") as source:
        assert await source.list_peers() == peers(("n2", "198.18.0.2"), ("n3", "198.18.0.3"))
    with pytest.raises(KubeError, match=r"^--kubeconfig .*missing"):
        KubePeerSource.from_kubeconfig(tmp_path / "missing", "n1")


def test_in_cluster_outside_a_pod_is_a_readable_error(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeError, match="in-cluster service account"):
        KubePeerSource.in_cluster("n1", service_account_dir=tmp_path / "missing")
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "namespace").write_text("kube-system")
    with pytest.raises(KubeError, match=r"\$KUBERNETES_SERVICE_HOST is not set"):
        KubePeerSource.in_cluster("n1", service_account_dir=tmp_path)


async def test_requests_stay_within_the_rbac_rules(cluster: Cluster) -> None:
    """Every call the client makes is allowed by the ClusterRole that `weavepy manifest`
    renders (nodes get/list/watch, nodes/status patch), so least privilege is enough."""
    from weavepy.manifest import ManifestSettings, render_objects

    role = next(o for o in render_objects(ManifestSettings()) if o["kind"] == "ClusterRole")
    allowed = {(resource, verb) for rule in role["rules"] for resource in rule["resources"]
               for verb in rule["verbs"]}
    api = cluster.api
    api.lists.append(recorded("nodes-list-1.json"))
    async with source_for(cluster) as source:
        await source.list_peers()
        async with source.watch_nodes() as changes:
            with trio.fail_after(10):
                await changes.receive()
                async with trio.open_nursery() as nursery:  # let it go on to the watch
                    nursery.start_soon(changes.receive)
                    await api.watch_started.wait()
                    nursery.cancel_scope.cancel()
        await source.set_network_available()
    for request in api.seen:
        if request.path == "/api/v1/nodes":
            need = ("nodes", "watch" if request.query.get("watch") == "true" else "list")
        else:
            assert request.path.endswith("/status")
            need = ("nodes/status", request.method.lower())
        assert need in allowed, need


# -- podCIDRs for --ipam kubernetes ------------------------------------------------------------


def test_node_info_reads_pod_cidrs_of_either_field() -> None:
    both = NodeInfo.from_dict({"metadata": {"name": "a"}, "spec": {
        "podCIDR": "198.19.1.0/24", "podCIDRs": ["198.19.1.0/24", "fd00:1::/64"]}})
    assert both.pod_cidrs == ("198.19.1.0/24", "fd00:1::/64")
    legacy = NodeInfo.from_dict({"metadata": {"name": "b"}, "spec": {"podCIDR": "198.19.2.0/24"}})
    assert legacy.pod_cidrs == ("198.19.2.0/24",)
    assert NodeInfo.from_dict({"metadata": {"name": "c"}, "spec": {}}).pod_cidrs == ()
    assert NodeInfo.from_dict({"metadata": {"name": "d"}}).pod_cidrs == ()


class Recorder:
    """A NodeObserver that keeps what it is told: ("list", {name: podCIDRs}) and
    (event, name, podCIDRs)."""

    def __init__(self) -> None:
        self.seen: list[tuple[object, ...]] = []

    def replace_nodes(self, nodes: list[NodeInfo]) -> None:
        self.seen.append(("list", {n.name: n.pod_cidrs for n in nodes}))

    def apply_node(self, event: str, node: NodeInfo) -> None:
        self.seen.append((event, node.name, node.pod_cidrs))


async def test_observers_get_every_nodes_pod_cidrs_from_the_one_watch(cluster: Cluster) -> None:
    api = cluster.api
    api.lists.append(recorded("nodes-list-podcidrs.json"))
    api.watches.append(Watch(recorded("watch-podcidrs.jsonl"), hang=True))
    observer = Recorder()
    async with source_for(cluster, observers=[observer]) as source, \
            source.watch_nodes() as sets:
        with trio.fail_after(20):
            async for _ in sets:
                if len(observer.seen) == 3:
                    break
    assert observer.seen == [
        ("list", {"n1": ("198.19.1.0/24", "fd00:1::/64"), "n2": ("198.19.2.0/24",),
                  "n3": ()}),
        ("MODIFIED", "n3", ("198.19.3.0/24",)),
        ("DELETED", "n2", ("198.19.2.0/24",)),
    ]
    assert len(api.requests()) == 2  # one list, one watch: peers and podCIDRs share them


def test_a_bad_kubeconfig_is_a_readable_error(tmp_path: Path) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text("clusters: [")
    with pytest.raises(KubeError, match=r"^--kubeconfig .*kubeconfig: not valid YAML"):
        KubePeerSource.from_kubeconfig(bad, "n1")
    with pytest.raises(KubeError, match="--kubeconfig"):
        KubePeerSource.from_kubeconfig(tmp_path / "missing", "n1")
    for text in ("{}", "clusters: []\n", "current-context: nowhere\n"):
        bad.write_text(text)
        with pytest.raises(KubeError, match="--kubeconfig") as refused:
            KubePeerSource.from_kubeconfig(bad, "n1")
        assert "\n" not in str(refused.value)
