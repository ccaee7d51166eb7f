"""How a node without IPAM state enters a cluster, by how it was launched (ipam_link.bootstrap_for).

The --kube-peers case was found by running the DaemonSet for real
(tests/deploy/test_image_daemonset.py): every node founded its own cluster at start, before the
API named its peers, and the three clusters never merged. The simulation below shows the fix:
nodes launched as with --kube-peers meet without state and elect one founder; a lone one
founds by itself after KUBE_FOUND_ALONE_AFTER.
"""

from __future__ import annotations

from weavepy.config import load_config
from weavepy.ipam.sim import IpamSim
from weavepy.ipam.status import IpamState
from weavepy.ipam_link import KUBE_FOUND_ALONE_AFTER, bootstrap_for


def test_launch_modes() -> None:
    assert bootstrap_for(load_config({"name": "n1"})) == ("found", None)
    assert bootstrap_for(load_config({"name": "n1", "peers": ["198.18.0.12"]})) == ("join", None)
    assert bootstrap_for(load_config({"name": "n1", "kube_peers": True})) == (
        "join", KUBE_FOUND_ALONE_AFTER)


def cluster_of(sim: IpamSim, name: str) -> str | None:
    status = sim.status(name)
    assert status is not None
    return status.cluster_id


def test_kube_nodes_started_together_form_one_cluster() -> None:
    sim = IpamSim(7)
    for name in ("n1", "n2", "n3"):
        sim.add_node(name, *bootstrap_for(load_config({"name": name, "kube_peers": True})))
    sim.run(60.0)
    ids = {cluster_of(sim, name) for name in ("n1", "n2", "n3")}
    assert len(ids) == 1 and None not in ids, ids
    assert all(sim.status(n).state is IpamState.READY for n in ("n1", "n2", "n3"))  # type: ignore[union-attr]


def test_a_lone_kube_node_founds_after_waiting() -> None:
    sim = IpamSim(7)
    sim.add_node("only", *bootstrap_for(load_config({"name": "only", "kube_peers": True})))
    sim.run(KUBE_FOUND_ALONE_AFTER - 1)
    assert cluster_of(sim, "only") is None
    sim.run(5.0)
    assert cluster_of(sim, "only") is not None
