"""`--ipam kubernetes` (weavepy.kube_ipam.KubeIpam) without the kernel: the nodes' podCIDRs
become the block table only once saved, a restart with the API unreachable keeps serving pods
from the saved podCIDR, addresses come from the podCIDR, and no IPAM protocol runs. The Node
objects are what weavepy.kube hands over (`NodeInfo`); the agent tests with real agents and
the replayed API are in tests/agent/test_kube_ipam_netns.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
import trio

from weavepy.config import AgentConfig, load_config
from weavepy.identity import load_or_create
from weavepy.ipam.status import IpamState
from weavepy.ipam.wire import MAGIC
from weavepy.ipam_link import CORE_FILE, IpamLink, IpamLinkError, NoAddress
from weavepy.ipam_mode import node_observers, open_ipam
from weavepy.kube import NodeInfo
from weavepy.kube_ipam import POD_CIDRS_FILE, KubeIpam

pytestmark = pytest.mark.timeout(60)


def config_for(state_dir: Path, name: str = "n1", **flags: object) -> AgentConfig:
    return load_config({"name": name, "ipalloc_range": "198.19.0.0/16", "state_dir": str(state_dir),
                        "ipam": "kubernetes", "kube_peers": True, **flags}, {})


def nodes(**pod_cidrs: tuple[str, ...]) -> list[NodeInfo]:
    return [NodeInfo(name, pod_cidrs=cidrs) for name, cidrs in pod_cidrs.items()]


class Pokes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@asynccontextmanager
async def running(config: AgentConfig, pokes: Callable[[], None] = lambda: None
                  ) -> AsyncIterator[KubeIpam]:
    ipam = KubeIpam(config, on_table_change=pokes)
    async with trio.open_nursery() as nursery:
        await nursery.start(ipam.run)
        yield ipam
        await ipam.flush()
        nursery.cancel_scope.cancel()


async def adopted(ipam: KubeIpam, state: IpamState) -> None:
    with trio.fail_after(10):
        while ipam.source != "api" or ipam.status().state is not state:
            await trio.sleep(0.01)


async def test_the_nodes_pod_cidrs_are_the_blocks_once_saved(tmp_path: Path) -> None:
    pokes = Pokes()
    async with running(config_for(tmp_path), pokes) as ipam:
        assert ipam.status().state is IpamState.WAITING_FOR_POD_CIDR
        assert ipam.status().detail == "waiting for the Kubernetes API to list the nodes"
        ipam.replace_nodes(nodes(n1=("198.19.1.0/24", "fd00:1::/64"), n2=("198.19.2.0/24",),
                                 n3=()))
        await adopted(ipam, IpamState.READY)
        assert (tmp_path / POD_CIDRS_FILE).exists()
        assert ipam.blocks_by_node() == {"n1": [IPv4Network("198.19.1.0/24")],
                                         "n2": [IPv4Network("198.19.2.0/24")]}
        assert pokes.count == 1
        doc = ipam.status_json()
        assert (doc["mode"], doc["state"], doc["pod_cidr"], doc["pod_cidr_source"]) == (
            "kubernetes", "ready", "198.19.1.0/24", "api")
        assert doc["owned_blocks"] == ["198.19.1.0/24"] and doc["voters"] == []

        first = await ipam.allocate("c1", "eth0")
        assert first.address in IPv4Network("198.19.1.0/24")
        assert first.gateway == IPv4Address("198.19.1.1")
        assert first.interface.network == IPv4Network("198.19.1.0/24")

        ipam.apply_node("MODIFIED", NodeInfo("n3", pod_cidrs=("198.19.3.0/24",)))
        with trio.fail_after(10):
            while "n3" not in ipam.blocks_by_node():
                await trio.sleep(0.01)
        ipam.apply_node("MODIFIED", NodeInfo("n3", pod_cidrs=("198.19.3.0/24",)))  # heartbeat
        ipam.apply_node("DELETED", NodeInfo("n2", pod_cidrs=("198.19.2.0/24",)))
        with trio.fail_after(10):
            while "n2" in ipam.blocks_by_node():
                await trio.sleep(0.01)
        assert pokes.count == 3


async def test_a_restart_while_the_api_is_unreachable_keeps_serving_pods(tmp_path: Path
                                                                        ) -> None:
    config = config_for(tmp_path)
    async with running(config) as ipam:
        ipam.replace_nodes(nodes(n1=("198.19.1.0/24",), n2=("198.19.2.0/24",)))
        await adopted(ipam, IpamState.READY)
        before = await ipam.allocate("c1", "eth0")
    async with running(config) as again:  # nobody calls replace_nodes: the API is down
        status = again.status()
        assert status.state is IpamState.READY
        assert "the Kubernetes API has not answered since the start" in status.detail
        assert again.status_json()["pod_cidr_source"] == "saved"
        assert again.blocks_by_node() == {"n1": [IPv4Network("198.19.1.0/24")],
                                          "n2": [IPv4Network("198.19.2.0/24")]}
        assert await again.lookup("c1", "eth0") == before
        second = await again.allocate("c2", "eth0")
        assert second.address in IPv4Network("198.19.1.0/24") and second != before


async def test_the_table_is_used_only_once_it_is_on_disk(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    async with running(config_for(tmp_path)) as ipam:
        def full(body: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(ipam.table_file, "save", full)
        ipam.replace_nodes(nodes(n1=("198.19.1.0/24",)))
        with trio.fail_after(10):
            while not ipam.drops["persist_failed"]:
                await trio.sleep(0.01)
        assert ipam.status().state is IpamState.WAITING_FOR_POD_CIDR
        with pytest.raises(NoAddress):
            await ipam.allocate("c1", "eth0")
        monkeypatch.undo()
        await adopted(ipam, IpamState.READY)  # retried


async def test_a_missing_node_keeps_its_pods_and_a_new_pod_cidr_forgets_them(tmp_path: Path
                                                                             ) -> None:
    async with running(config_for(tmp_path)) as ipam:
        ipam.replace_nodes(nodes(n1=("198.19.1.0/24",)))
        await adopted(ipam, IpamState.READY)
        pod = await ipam.allocate("c1", "eth0")
        ipam.apply_node("DELETED", NodeInfo("n1"))  # the Node is re-registering
        await adopted(ipam, IpamState.WAITING_FOR_POD_CIDR)
        assert "no Node named n1" in ipam.status().detail
        with pytest.raises(NoAddress, match="waiting_for_pod_cidr: no Node named n1"):
            await ipam.allocate("c2", "eth0")
        assert await ipam.lookup("c1", "eth0") == pod  # not forgotten meanwhile
        ipam.apply_node("ADDED", NodeInfo("n1", pod_cidrs=("198.19.1.0/24",)))
        await adopted(ipam, IpamState.READY)
        assert await ipam.lookup("c1", "eth0") == pod
        assert (await ipam.allocate("c2", "eth0")).address != pod.address

        ipam.apply_node("MODIFIED", NodeInfo("n1", pod_cidrs=("198.19.0.0/23",)))  # resized
        with trio.fail_after(10):
            while ipam.status_json()["pod_cidr"] != "198.19.0.0/23":
                await trio.sleep(0.01)
        kept = await ipam.lookup("c1", "eth0")
        assert kept is not None and kept.address == pod.address
        assert kept.gateway == IPv4Address("198.19.0.1")
        ipam.apply_node("MODIFIED", NodeInfo("n1", pod_cidrs=("198.19.8.0/24",)))
        with trio.fail_after(10):
            while ipam.status_json()["pod_cidr"] != "198.19.8.0/24":
                await trio.sleep(0.01)
        assert await ipam.lookup("c1", "eth0") is None


async def test_a_pod_cidr_outside_the_range_is_refused_and_serves_nothing(tmp_path: Path
                                                                         ) -> None:
    async with running(config_for(tmp_path)) as ipam:
        ipam.replace_nodes(nodes(n1=("192.0.1.0/24",)))
        await adopted(ipam, IpamState.POD_CIDR_REFUSED)
        assert ipam.status().detail == ("podCIDR 192.0.1.0/24 of node n1 is outside "
                                        "--ipalloc-range 198.19.0.0/16")
        assert not ipam.status().owned_blocks and ipam.blocks_by_node() == {}
        with pytest.raises(NoAddress, match=r"pod_cidr_refused: podCIDR 192\.0\.1\.0/24"):
            await ipam.allocate("c1", "eth0")


async def test_a_full_pod_cidr_says_who_sizes_it(tmp_path: Path) -> None:
    async with running(config_for(tmp_path)) as ipam:
        ipam.replace_nodes(nodes(n1=("198.19.1.0/30",)))  # one pod address
        await adopted(ipam, IpamState.READY)
        await ipam.allocate("c1", "eth0")
        with pytest.raises(NoAddress, match=r"out_of_space: every address of podCIDR "
                                            r"198\.19\.1\.0/30 is in use.*--node-cidr-mask-size"):
            await ipam.allocate("c2", "eth0")


def test_no_ipam_protocol_in_this_mode(tmp_path: Path) -> None:
    ipam = KubeIpam(config_for(tmp_path), on_table_change=lambda: None)
    delegate = ipam.delegate
    assert delegate.local_state(join=True) == b"" and delegate.get_broadcasts(0, 1400) == []
    delegate.notify_msg(bytes([MAGIC]) + b"anything")
    delegate.merge_remote_state(bytes([MAGIC]) + b"state", join=False)
    assert ipam.status_json()["dropped"] == {"ipam_message": 1, "ipam_state": 1}
    assert ipam.tags() == {} and ipam.cluster_id == "kubernetes"
    assert node_observers(ipam) == (ipam,)


async def test_rmpeer_points_at_kubectl(tmp_path: Path) -> None:
    ipam = KubeIpam(config_for(tmp_path), on_table_change=lambda: None)
    with pytest.raises(IpamLinkError, match="kubectl delete node n2"):
        await ipam.rmpeer("n2", force=False)


def test_a_node_switching_modes_is_told_to_reset_first(tmp_path: Path) -> None:
    identity, _ = load_or_create(tmp_path, "n1")
    kube = config_for(tmp_path)
    weave = load_config({"name": "n1", "ipalloc_range": "198.19.0.0/16",
                         "state_dir": str(tmp_path)}, {})
    ipam = open_ipam(weave, identity, on_table_change=lambda: None,
                     on_cluster_id=lambda _: None, on_tag_change=lambda: None)
    assert isinstance(ipam, IpamLink) and node_observers(ipam) == ()
    (tmp_path / CORE_FILE).write_text("{}")
    with pytest.raises(IpamLinkError, match=r"holds weavepy IPAM state.*`weavepy reset` before "
                                            r"--ipam kubernetes"):
        open_ipam(kube, identity, on_table_change=lambda: None,
                  on_cluster_id=lambda _: None, on_tag_change=lambda: None)
    (tmp_path / CORE_FILE).unlink()
    (tmp_path / POD_CIDRS_FILE).write_text("{}")
    with pytest.raises(IpamLinkError, match=r"holds --ipam kubernetes state.*before --ipam "
                                            r"weavepy"):
        open_ipam(weave, identity, on_table_change=lambda: None,
                  on_cluster_id=lambda _: None, on_tag_change=lambda: None)


async def test_the_ipam_section_matches_the_report_schema(tmp_path: Path) -> None:
    import json

    import jsonschema

    schema = json.loads((Path(__file__).parents[2] / "docs" / "report.schema.json").read_text())
    section = schema["properties"]["ipam"]
    async with running(config_for(tmp_path)) as ipam:
        waiting = ipam.status_json()
        waiting["fix"] = None
        jsonschema.validate(waiting, section)
        ipam.replace_nodes(nodes(n1=("198.19.1.0/24",), n2=("192.0.2.0/24",)))
        await adopted(ipam, IpamState.READY)
        await ipam.allocate("c1", "eth0")
        ready = ipam.status_json()
        ready["fix"] = None
        jsonschema.validate(ready, section)
        assert ready["refused_pod_cidrs"] == {
            "n2": "podCIDR 192.0.2.0/24 of node n2 is outside --ipalloc-range 198.19.0.0/16"}
        assert ready["pods"] == {"198.19.1.0/24": {"used": 1, "capacity": 253}}
        del ready["pod_cidr"]
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(ready, section)


async def test_the_metrics_read_this_mode_as_the_other(tmp_path: Path) -> None:
    from weavepy.metrics import AgentMetrics

    async with running(config_for(tmp_path)) as ipam:
        ipam.replace_nodes(nodes(n1=("198.19.1.0/24",)))
        await adopted(ipam, IpamState.READY)
        await ipam.allocate("c1", "eth0")
        metrics = AgentMetrics()
        metrics.update_from_status({"ready": True, "ipam": ipam.status_json(),
                                    "config": {"ipalloc_range": "198.19.0.0/16"}})
        text = metrics.render().decode()
    assert 'weavepy_ipam_state{state="ready"} 1.0' in text
    assert 'weavepy_ipam_blocks{state="owned"} 1.0' in text
    assert 'weave_ips{state="local-used"} 1.0' in text
