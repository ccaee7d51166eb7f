"""The enforcer against the kernel, inside a sandbox node: an ADD that no policy concerns does
no nftables work at all; an ADD of a pod a policy selects puts its address in the kernel's
verdict map before `pod_added` returns; when the kernel refuses, the ADD's pod is forgotten
and `PolicyApplyError` raised (the CNI ADD then fails closed); a table deleted by someone
else is put back by the periodic check."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any

import pytest

pytestmark = [pytest.mark.netns]

POLICY = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
          "metadata": {"name": "deny", "namespace": "x"},
          "spec": {"podSelector": {"matchLabels": {"app": "server"}}}}
SERVER = {"apiVersion": "v1", "kind": "Pod",
          "metadata": {"name": "server", "namespace": "x", "labels": {"app": "server"}}}


def exercise() -> dict[str, Any]:
    """Runs inside the node's namespace (forked): the enforcer with the real nftables."""
    from weavepy.nft import Nft, NftError
    from weavepy.policy.applier import PolicyApplier
    from weavepy.policy.enforcer import PolicyApplyError, PolicyEnforcer
    from weavepy.policy.model import Attachment, ClusterState, parse_object

    class CountingNft(Nft):
        """The real binding, counting transactions; `refuse` makes the next one fail as a
        kernel refusal would (before reaching the kernel)."""

        calls = 0
        refuse = False

        def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
            self.calls += 1
            if self.refuse and any("add" in c for c in commands):
                raise NftError("Error: Could not process rule: No buffer space available")
            return super().run(commands)

    def in_map(address: str) -> bool:
        listed = Nft().run([{"list": {"map": {"family": "inet", "table": "weavepy-policy",
                                              "name": "ingress-pods"}}}])
        return address in str(listed)

    nft = CountingNft()
    enforcer = PolicyEnforcer("n1", PolicyApplier(nft))
    out: dict[str, Any] = {}
    enforcer.set_source(ClusterState())
    nft.calls = 0
    enforcer.pod_added(Attachment("c-a", IPv4Address("198.19.0.2"), "n1", "x", "a"))
    out["calls_for_an_unconcerned_pod"] = nft.calls

    policy, server = parse_object(POLICY), parse_object(SERVER)
    enforcer.set_source(ClusterState(policies=(policy,), pods=(server,)))  # type: ignore[arg-type]
    out["server_in_map_before_add"] = in_map("198.19.0.3")
    enforcer.pod_added(Attachment("c-s", IPv4Address("198.19.0.3"), "n1", "x", "server"))
    out["server_in_map_after_add"] = in_map("198.19.0.3")

    nft.refuse = True
    try:
        enforcer.pod_added(Attachment("c-t", IPv4Address("198.19.0.4"), "n1", "x", "server"))
    except PolicyApplyError as exc:
        out["refused"] = str(exc)
    out["refused_pod_remembered"] = "c-t" in enforcer.attachments
    nft.refuse = False

    Nft().run([{"delete": {"table": {"family": "inet", "name": "weavepy-policy"}}}])
    record = enforcer.check()
    out["check_after_delete"] = record.kind if record else None
    out["server_in_map_after_check"] = in_map("198.19.0.3")
    out["quiet_check"] = enforcer.check()
    return out


def test_the_enforcer_against_the_kernel(sandbox_factory: Callable[..., Any]) -> None:
    box = sandbox_factory(nodes=1)
    out = box.nodes[0].call(exercise, timeout=120)
    assert out["calls_for_an_unconcerned_pod"] == 0, out
    assert out["server_in_map_before_add"] is False, out
    assert out["server_in_map_after_add"] is True, out
    assert "No buffer space" in out["refused"] and out["refused_pod_remembered"] is False, out
    assert out["check_after_delete"] == "full" and out["server_in_map_after_check"], out
    assert out["quiet_check"] is None, out
