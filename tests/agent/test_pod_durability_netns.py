"""A pod address handed out survives the agent's crash: SIGKILL right after the ADD returns.

One real agent (`weavepy launch`, founding a one-node cluster) in a sandbox node. Three pods
are added through the installed weavepy-cni; the agent is killed with SIGKILL the moment the
last ADD returns, and launched again. The allocations must still be owned: `GET /pods` lists
each pod with the address its ADD returned, a repeated ADD of a pod returns that address, and
a new pod gets an address none of them holds. (Without a save before the answer the restarted
agent would hand out the first pod's address again: its next-fit cursor restarts too.)
"""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = [pytest.mark.netns]


def _pods(rig: Any, node: Any) -> dict[str, str]:
    answer = rig.api(node, "GET", "/pods")
    assert answer is not None and answer[0] == 200, rig.logs_tail()
    return {entry["container_id"]: entry["addresses"][0].split("/")[0]
            for entry in answer[1]["pods"]}


@pytest.mark.timeout(240)
def test_addresses_handed_out_are_still_owned_after_a_sigkill_right_after_the_add(
        agent_box: Any) -> None:
    from weavepy.cni.install import install_cni

    rig = agent_box(nodes=1)
    node = rig.box.nodes[0]

    def serving() -> bool:
        doc = rig.status(node)
        return bool(doc and doc["cni"]["listening"] and doc["dataplane"]["local_blocks"])

    rig.launch(node)
    rig.wait("the agent's CNI socket and a block", serving, timeout=90)
    plugin = install_cni(rig.root / "cni-bin", rig.root / "cni-conf").plugin
    pods = [rig.box.add_netns(f"dur{i}").netns for i in range(3)]
    handed_out = {pod: rig.cni_add(node, plugin, pod) for pod in pods}
    rig.kill(node)  # SIGKILL: nothing after the last answer runs
    assert len(set(handed_out.values())) == len(pods), handed_out

    rig.launch(node)
    rig.wait("the agent's CNI socket and a block after the restart", serving, timeout=90)
    assert _pods(rig, node) == handed_out
    assert rig.cni_add(node, plugin, pods[-1]) == handed_out[pods[-1]]
    newcomer = rig.cni_add(node, plugin, rig.box.add_netns("dur-new").netns)
    assert newcomer not in handed_out.values(), (newcomer, handed_out)
