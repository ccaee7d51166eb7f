"""The host-rules shell against a real kernel, in one sandbox node with no agent: the table goes
in whole and stays unchanged on the next pass, accepts land in every strict chain (iptables
legacy, iptables-nft, native nftables), removed or flushed rules come back and are reported,
`remove()` leaves every ruleset exactly as it was, and br_netfilter is switched on."""

from __future__ import annotations

import subprocess
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_binary
from tests.hostrules.hostsetup import STRICT_KINDS, make_strict, rulesets
from weavepy.hostrules import (
    HostRules,
    HostRulesSpec,
    HostRulesState,
    enable_bridge_netfilter,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

PODS = IPv4Network("198.19.0.0/16")
DEVICES = ("weavepy0", "weavepy.1", "weavepy.wg")
PEER = IPv4Address("198.18.0.12")
SPEC = HostRulesSpec(PODS, DEVICES,
                     no_masq_cidrs=(IPv4Network("10.0.0.0/8"), IPv4Network("192.0.2.7/32")),
                     peer_node_addresses=frozenset({PEER}), api_guard_port=6784)
EVERYWHERE = ("nft inet filter forward", "iptables-legacy filter FORWARD",
              "iptables-nft filter FORWARD")


@pytest.fixture
def node(sandbox_factory: Any) -> Any:
    for tool in ("nft", "iptables-legacy", "iptables-nft"):
        require_binary(tool, "iptables" if tool.startswith("iptables") else "nftables")
    return sandbox_factory(nodes=1).nodes[0]


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def _ensure_twice() -> tuple[HostRulesState, HostRulesState, str]:
    rules = HostRules()
    first = rules.ensure(SPEC)
    second = rules.ensure(SPEC)
    return first, second, rulesets()["nft"]


def test_the_table_goes_in_whole_and_the_next_pass_changes_nothing(node: Any) -> None:
    first, second, text = node.call(_ensure_twice)
    assert first.present and first.errors == ()
    assert first.changes == ("table ip weavepy: missing",)
    assert first.accepts_in == ()  # nothing here drops forwarded traffic: no accepts anywhere
    assert second.present and second.changes == () and second.restored == ()
    for line in ("type nat hook postrouting priority srcnat; policy accept;",
                 "ip saddr != 198.19.0.0/16 return",
                 "ip daddr 198.19.0.0/16 return",
                 "ip daddr 224.0.0.0/4 return",
                 "ip daddr 10.0.0.0/8 return",
                 "ip daddr 192.0.2.7 return",
                 "ip daddr @peer_nodes masquerade fully-random",
                 "elements = { 198.18.0.12 }",
                 'counter name "masqueraded"',
                 "tcp dport 6784 fib saddr type != local"):
        assert line in text, f"{line!r} not in:\n{text}"
    assert text.index("ip daddr 198.19.0.0/16 return") < text.index("masquerade fully")


def _strict_ensure_remove() -> dict[str, Any]:
    make_strict(STRICT_KINDS)
    found: dict[str, Any] = {"before": rulesets()}
    rules = HostRules()
    found["state"] = rules.ensure(SPEC)
    found["during"] = rulesets()
    found["removed"] = rules.remove()
    found["after"] = rulesets()
    found["removed_again"] = rules.remove()
    return found


def test_strict_chains_get_accepts_and_remove_leaves_every_ruleset_as_it_was(node: Any
                                                                             ) -> None:
    found = node.call(_strict_ensure_remove)
    state = found["state"]
    assert state.present and state.errors == ()
    assert sorted(state.accepts_in) == sorted(EVERYWHERE)
    during = found["during"]
    for tool in ("iptables-legacy-save", "iptables-nft-save"):
        assert f"-A FORWARD -s {PODS} -m comment --comment weavepy -j ACCEPT" in during[tool]
        assert f"-A FORWARD -d {PODS} -m comment --comment weavepy -j ACCEPT" in during[tool]
        assert "-j ACCEPT" in found["before"][tool]  # the host's own rule is still there
    native = during["nft"].split("table inet filter")[1]
    assert f'ip saddr {PODS} accept comment "weavepy"' in native
    assert f'ip daddr {PODS} accept comment "weavepy"' in native
    assert found["after"] == found["before"]  # byte for byte, timestamps of the save tools aside
    assert found["removed"] == ("table ip weavepy: removed",
                                "nft inet filter forward: accepts removed",
                                "iptables-legacy filter FORWARD: accepts removed",
                                "iptables-nft filter FORWARD: accepts removed")
    assert found["removed_again"] == ()


def _sabotage_and_repair() -> list[HostRulesState]:
    make_strict(STRICT_KINDS)
    rules = HostRules()
    states = [rules.ensure(SPEC)]
    _sh("nft", "flush", "table", "ip", "weavepy")
    _sh("iptables-legacy", "-w", "-F", "FORWARD")
    _sh("iptables-nft", "-w", "-D", "FORWARD", "-s", str(PODS), "-m", "comment", "--comment",
        "weavepy", "-j", "ACCEPT")
    _sh("nft", "flush", "chain", "inet", "filter", "forward")
    states.append(rules.ensure(SPEC))
    states.append(rules.ensure(SPEC))
    _sh("nft", "delete", "table", "ip", "weavepy")
    states.append(rules.ensure(SPEC))
    moved = HostRulesSpec(PODS, DEVICES, no_masq_cidrs=SPEC.no_masq_cidrs,
                          peer_node_addresses=frozenset({PEER, IPv4Address("198.18.0.14")}),
                          api_guard_port=SPEC.api_guard_port)
    states.append(rules.ensure(moved))
    return states


def test_removed_or_flushed_rules_come_back_and_each_repair_is_reported(node: Any) -> None:
    first, repaired, quiet, table_back, peers_moved = node.call(_sabotage_and_repair)
    assert first.restored == () and first.restorations == 0
    assert sorted(repaired.restored) == sorted([
        "table ip weavepy: chain egress was flushed",
        "nft inet filter forward: accepts missing",
        "iptables-legacy filter FORWARD: accepts missing",
        "iptables-nft filter FORWARD: accepts missing"])
    assert repaired.restorations == 4 and repaired.present
    assert quiet.changes == () and quiet.restorations == 4
    assert table_back.restored == ("table ip weavepy: missing",)
    assert table_back.restorations == 5
    # a peer joining is an update, not a repair
    assert peers_moved.changes == ("set peer_nodes: peer nodes changed",)
    assert peers_moved.restored == () and peers_moved.restorations == 5


def _bridge_netfilter() -> tuple[str, str, str]:
    path = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    path.write_text("0\n")
    first = enable_bridge_netfilter()
    second = enable_bridge_netfilter()
    return first, second, path.read_text().strip()


def test_bridge_netfilter_is_switched_on_where_it_exists(node: Any, tmp_path: Path) -> None:
    assert enable_bridge_netfilter(tmp_path / "no-br-netfilter") == "absent"
    assert node.call(_bridge_netfilter) == ("enabled", "on", "1")
