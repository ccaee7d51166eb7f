"""The host rules' pure plan: what the table says, where accepts go, and what a plan changes."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from weavepy.hostrules.plan import (
    MASQ_COUNTER,
    PEER_SET,
    TAG,
    ForeignChain,
    HostRulesSpec,
    HostView,
    IptablesForward,
    NftView,
    Plan,
    Rule,
    desired_table,
    plan,
    plan_removal,
    read_iptables_save,
    read_ruleset,
)

PODS = IPv4Network("198.19.0.0/16")
DEVICES = ("weavepy0", "weavepy.1", "weavepy.wg")
ACCEPT_S = f"-A FORWARD -s {PODS} -m comment --comment {TAG} -j ACCEPT"
ACCEPT_D = f"-A FORWARD -d {PODS} -m comment --comment {TAG} -j ACCEPT"


def _spec(**kwargs: object) -> HostRulesSpec:
    return HostRulesSpec(PODS, DEVICES, **kwargs)  # type: ignore[arg-type]


def _comments(spec: HostRulesSpec, chain: str = "egress") -> list[str | None]:
    return [r.comment for r in desired_table(spec).chains[chain].rules]


def _as_listing(spec: HostRulesSpec) -> list[dict[str, object]]:
    """The objects `list ruleset` shows once the table of `spec` is in place."""
    content = desired_table(spec)
    objects: list[dict[str, object]] = [{"table": {"family": "ip", "name": "weavepy"}}]
    objects += [{"counter": {"family": "ip", "table": "weavepy", "name": n, "packets": 7,
                             "bytes": 700}} for n in content.counters]
    objects.append({"set": {"family": "ip", "table": "weavepy", "name": PEER_SET,
                            "elem": sorted(content.peer_nodes or ())}})
    for name, chain in content.chains.items():
        objects.append({"chain": {"family": "ip", "table": "weavepy", "name": name,
                                  "type": chain.type, "hook": chain.hook, "prio": chain.prio,
                                  "policy": chain.policy}})
        for handle, rule in enumerate(chain.rules, 100):
            body = {"family": "ip", "table": "weavepy", "chain": name, "handle": handle,
                    "expr": rule.expr}
            if rule.comment:
                body["comment"] = rule.comment
            objects.append({"rule": body})
    return objects


def test_pod_to_pod_returns_before_anything_is_masqueraded() -> None:
    comments = _comments(_spec(no_masq_cidrs=(IPv4Network("10.0.0.0/8"),)))
    assert comments[:2] == ["only traffic from pods", "pod to pod keeps its source"]
    masquerades = [i for i, r in enumerate(desired_table(_spec()).chains["egress"].rules)
                   if "masquerade" in r.expr_json]
    returns = [i for i, r in enumerate(desired_table(_spec()).chains["egress"].rules)
               if "return" in r.expr_json]
    assert max(returns) < min(masquerades)
    assert comments[-1] == "egress: leaves with the node's address"
    for device in DEVICES:
        assert f"stays on weavepy's device {device}" in comments
    assert {"multicast", "limited broadcast"} <= set(comments)


def test_exclusions_are_collapsed_and_skipped_when_masquerade_is_off() -> None:
    spec = _spec(no_masq_cidrs=(IPv4Network("10.1.0.0/16"), IPv4Network("10.0.0.0/8"),
                                IPv4Network("192.0.2.7/32")))
    assert spec.no_masq_cidrs == (IPv4Network("10.0.0.0/8"), IPv4Network("192.0.2.7/32"))
    assert [c for c in _comments(spec) if c and c.startswith("operator")] == [
        "operator exclusion 10.0.0.0/8", "operator exclusion 192.0.2.7/32"]
    off = _comments(_spec(masquerade=False, no_masq_cidrs=(IPv4Network("10.0.0.0/8"),)))
    assert not [c for c in off if c and (c.startswith("operator") or c.startswith("egress"))]
    # the peer-node rule stays: strict rp_filter needs it whatever the switch says
    assert any(c and "peer node" in c for c in off)


def test_bad_specs_are_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="switch masquerading off"):
        _spec(no_masq_cidrs=(IPv4Network("0.0.0.0/0"),))
    with pytest.raises(ValueError, match=r"1\.\.65535"):
        _spec(api_guard_port=70000)
    with pytest.raises(ValueError, match="devices"):
        HostRulesSpec(PODS, ())


def test_the_api_guard_is_a_separate_chain_only_when_asked_for() -> None:
    assert "api_guard" not in desired_table(_spec()).chains
    guarded = desired_table(_spec(api_guard_port=6784))
    rule = guarded.chains["api_guard"].rules[0]
    assert guarded.chains["api_guard"].hook == "input"
    assert '"right":6784' in rule.expr_json and '"drop":null' in rule.expr_json


def test_an_unchanged_host_gives_an_empty_plan() -> None:
    spec = _spec(peer_node_addresses=frozenset({IPv4Address("198.18.0.12")}),
                 api_guard_port=6784, no_masq_cidrs=(IPv4Network("10.0.0.0/8"),))
    view = read_ruleset(_as_listing(spec))
    assert view.counter_values[MASQ_COUNTER] == (7, 700)
    assert plan(spec, HostView(view)).empty


def test_a_missing_or_flushed_table_is_replaced_in_one_transaction() -> None:
    spec = _spec()
    todo = plan(spec, HostView(NftView()))
    assert [str(c) for c in todo.changes] == ["table ip weavepy: missing"]
    assert todo.nft[:3] == ({"add": {"table": {"family": "ip", "name": "weavepy"}}},
                            {"delete": {"table": {"family": "ip", "name": "weavepy"}}},
                            {"add": {"table": {"family": "ip", "name": "weavepy"}}})
    flushed = [o for o in _as_listing(spec)
               if not ("rule" in o and o["rule"]["chain"] == "egress")]  # type: ignore[index]
    todo = plan(spec, HostView(read_ruleset(flushed)))
    assert [str(c) for c in todo.changes] == ["table ip weavepy: chain egress was flushed"]


def test_a_new_peer_refreshes_the_set_alone_as_a_routine_change() -> None:
    before = _spec(peer_node_addresses=frozenset({IPv4Address("198.18.0.12")}))
    after = _spec(peer_node_addresses=frozenset({IPv4Address("198.18.0.12"),
                                                 IPv4Address("198.18.0.14")}))
    todo = plan(after, HostView(read_ruleset(_as_listing(before))))
    assert [(c.where, c.routine) for c in todo.changes] == [(f"set {PEER_SET}", True)]
    assert todo.nft[0] == {"flush": {"set": {"family": "ip", "table": "weavepy",
                                             "name": PEER_SET}}}
    assert todo.nft[1]["add"]["element"]["elem"] == ["198.18.0.12", "198.18.0.14"]
    assert len(todo.nft) == 2  # no table replacement: the counters keep counting


def test_iptables_save_is_read_per_backend() -> None:
    text = "\n".join(["# Generated by iptables-save", "*nat", ":POSTROUTING ACCEPT [0:0]",
                      "-A POSTROUTING -j MASQUERADE", "COMMIT", "*filter",
                      ":INPUT ACCEPT [0:0]", ":FORWARD DROP [3:180]", ACCEPT_S,
                      "-A FORWARD -j DOCKER-USER", "-A FORWARD -i docker0 -j ACCEPT", "COMMIT"])
    view = read_iptables_save("iptables-legacy", text)
    assert view == IptablesForward("iptables-legacy", "DROP", 2, (ACCEPT_S,))
    assert view.filters
    assert not read_iptables_save("iptables-nft", "").filters  # no filter table
    idle = read_iptables_save("iptables-nft", "*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n")
    assert idle.policy == "ACCEPT" and not idle.filters


def test_accepts_go_to_each_iptables_backend_that_filters() -> None:
    host = HostView(NftView(table=read_ruleset(_as_listing(_spec())).table), (
        IptablesForward("iptables-legacy", "DROP"),
        IptablesForward("iptables-nft", "ACCEPT", foreign_rules=1)))
    todo = plan(_spec(), host)
    assert todo.nft == ()
    scripts = {r.backend: r.script for r in todo.restores}
    expected = ("*filter\n"  # inserted at the top in turn: -s ends up first
                f"-I FORWARD 1 -d {PODS} -m comment --comment {TAG} -j ACCEPT\n"
                f"-I FORWARD 1 -s {PODS} -m comment --comment {TAG} -j ACCEPT\n"
                "COMMIT\n")
    assert scripts == {"iptables-legacy": expected, "iptables-nft": expected}
    assert todo.accepts_in == ("iptables-legacy filter FORWARD", "iptables-nft filter FORWARD")


def test_stale_and_duplicate_accepts_are_replaced_and_a_relaxed_chain_loses_them() -> None:
    old = f"-A FORWARD -s 198.19.0.0/17 -m comment --comment {TAG} -j ACCEPT"
    host = HostView(NftView(table=read_ruleset(_as_listing(_spec())).table), (
        IptablesForward("iptables-legacy", "DROP", 0, (old, ACCEPT_D, ACCEPT_D)),
        IptablesForward("iptables-nft", "ACCEPT", 0, (ACCEPT_S, ACCEPT_D))))
    scripts = {r.backend: r.script.splitlines() for r in plan(_spec(), host).restores}
    assert scripts["iptables-legacy"] == [
        "*filter", "-D" + old[2:], "-D" + ACCEPT_D[2:],
        f"-I FORWARD 1 -s {PODS} -m comment --comment {TAG} -j ACCEPT", "COMMIT"]
    assert scripts["iptables-nft"] == ["*filter", "-D" + ACCEPT_S[2:], "-D" + ACCEPT_D[2:],
                                       "COMMIT"]
    # already right: nothing to do
    right = HostView(host.nft, (IptablesForward("iptables-legacy", "DROP", 0,
                                                (ACCEPT_S, ACCEPT_D)),))
    assert plan(_spec(), right).empty


def _foreign_listing(policy: str, *tagged: Rule) -> list[dict[str, object]]:
    objects: list[dict[str, object]] = [
        {"table": {"family": "inet", "name": "filter"}},
        {"chain": {"family": "inet", "table": "filter", "name": "forward", "type": "filter",
                   "hook": "forward", "prio": 0, "policy": policy}},
        {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "type": "filter",
                   "hook": "forward", "prio": 0, "policy": "drop"}},  # iptables-nft's own
        {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 3,
                  "expr": [{"accept": None}], "comment": "the host's"}},
    ]
    objects += [{"rule": {"family": "inet", "table": "filter", "chain": "forward",
                          "handle": 10 + i, "expr": r.expr, "comment": TAG}}
                for i, r in enumerate(tagged)]
    return objects


def test_native_drop_chains_get_accepts_and_iptables_nft_chain_is_left_to_iptables() -> None:
    listing = _as_listing(_spec()) + _foreign_listing("drop")
    view = read_ruleset(listing)
    assert [c.where for c in view.forward_chains] == ["nft inet filter forward"]
    todo = plan(_spec(), HostView(view))
    inserts = [c["insert"]["rule"] for c in todo.nft]
    assert [(r["family"], r["table"], r["chain"], r["comment"]) for r in inserts] == [
        ("inet", "filter", "forward", TAG)] * 2
    assert [r["expr"] for r in inserts][::-1] == [
        [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": f}},
                    "right": {"prefix": {"addr": "198.19.0.0", "len": 16}}}}, {"accept": None}]
        for f in ("saddr", "daddr")]
    assert todo.accepts_in == ("nft inet filter forward",)
    # once they are there, nothing changes; when the chain accepts again, they go
    placed = read_ruleset(_as_listing(_spec()) + _foreign_listing("drop", *_rules_of(todo)))
    assert plan(_spec(), HostView(placed)).empty
    relaxed = read_ruleset(_as_listing(_spec()) + _foreign_listing("accept", *_rules_of(todo)))
    assert [c["delete"]["rule"]["handle"] for c in plan(_spec(), HostView(relaxed)).nft] == [
        10, 11]


def _rules_of(todo: Plan) -> list[Rule]:
    """The rules a plan inserts, in the order they end up in the chain."""
    return [Rule.of(TAG, *c["insert"]["rule"]["expr"]) for c in todo.nft][::-1]


def test_removal_takes_the_table_and_every_tagged_accept_and_nothing_else() -> None:
    rule = Rule.of(TAG, {"accept": None})
    view = read_ruleset(_as_listing(_spec()) + _foreign_listing("drop", rule))
    host = HostView(view, (IptablesForward("iptables-legacy", "DROP", 1, (ACCEPT_S,)),
                           IptablesForward("iptables-nft", "DROP", 0, ())))
    todo = plan_removal(host)
    assert list(todo.nft) == [
        {"delete": {"table": {"family": "ip", "name": "weavepy"}}},
        {"delete": {"rule": {"family": "inet", "table": "filter", "chain": "forward",
                             "handle": 10}}}]
    assert [(r.backend, r.script) for r in todo.restores] == [
        ("iptables-legacy", "*filter\n-D" + ACCEPT_S[2:] + "\nCOMMIT\n")]
    assert plan_removal(HostView(NftView(), (IptablesForward("iptables-legacy", "DROP"),))
                        ).empty


def test_foreign_chains_of_other_families_or_hooks_are_not_touched() -> None:
    objects = [{"chain": {"family": "bridge", "table": "t", "name": "f", "hook": "forward",
                          "policy": "drop"}},
               {"chain": {"family": "inet", "table": "t", "name": "in", "hook": "input",
                          "policy": "drop"}}]
    assert read_ruleset(objects).forward_chains == ()
    assert ForeignChain("inet", "t", "f", "drop", ()).where == "nft inet t f"
