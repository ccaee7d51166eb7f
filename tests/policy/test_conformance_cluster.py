"""The conformance cases on real packets through real agents: three sandbox nodes running
`weavepy launch --policy-dir`, pods x/a..z/c attached by the weavepy-cni plugin (bridged and
cross-node pairs), on the VXLAN path and on the encrypted path (weavepy/devtools/
policy_cluster.py). A representative subset of the cases runs here, on both paths; the whole
matrix is `python -m bench policy_conformance`.

Also here: the start race in a bounded loop of new pods (their very first packets, the
moment CNI ADD returned, get the right verdict), family 21 (tightening a policy under
established connections: they survive, as docs/policy.md says), and SCTP. This kernel has no
SCTP, so SCTP cases are checked as rules only: the nodes' compiled tables, for the world
these pods really have (their IPAM addresses), run through the interpreter."""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from tests.policy.strategies import enforced, node_tables
from weavepy.devtools.policy_cluster import PATHS, PolicyCluster, policy_cluster
from weavepy.devtools.policy_conformance import (
    ALL,
    CASES,
    NODES,
    Action,
    Case,
    Probe,
    Step,
    World,
    create,
    netpol,
    sel,
)

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(1200)]

SUBSET = ("deny-all-ingress-in-x", "x-a-from-pod-b-in-y-or-z", "x-a-named-port-egress",
          "client-egress-deny-beats-server-ingress-allow", "x-a-from-y-b-slash-32",
          "namespaces-relabelled", "x-egress-to-dns-in-namespace-z-only",
          "x-a-from-pod-b-on-sctp-80", "egress-policy-before-its-pod",
          "deny-all-over-established-connections")
RACE_PODS = 4


@pytest.fixture(scope="module", params=PATHS)
def cluster(request: pytest.FixtureRequest) -> Iterator[PolicyCluster]:
    from tests.conftest import require_root

    require_root()
    with policy_cluster(request.param) as found:
        yield found


@pytest.mark.parametrize("name", SUBSET)
def test_case_on_real_packets(cluster: PolicyCluster, name: str) -> None:
    case = next(c for c in CASES if c.name == name)
    result = cluster.run_case(case)
    assert result.ok, result.report() + "\n" + cluster.rig.logs_tail()
    if case.family == 21:  # established connections survive a tightening (docs/policy.md)
        held = [p for p in result.probes if p.probe.over_established]
        assert held and held[0].seen, "no connection was held"
        cut = {pair: seen for pair, seen in held[0].seen.items() if seen != "ok"}
        assert not cut, f"established connections were cut: {cut}"
    for probe in result.probes:
        assert probe.probe.on_kernel or "rules only" in probe.note


def test_first_packets_of_new_pods_get_the_right_verdict(cluster: PolicyCluster) -> None:
    """The policies exist; pods they select start one after another (on every node), and
    each is probed the moment its CNI ADD returned: a disallowed peer's first TCP SYN and
    UDP datagram are dropped (ingress of pod=d, egress of pod=e), an allowed one passes."""
    cluster.reset()
    setup = Step((create(netpol("d-from-a", pods=sel(pod="d"), ingress=[
        {"from": [{"podSelector": sel(pod="a")}]}])),
        create(netpol("e-no-out", pods=sel(pod="e"), types=["Egress"]))), ())
    cluster.apply(setup)
    cluster.wait_read()
    expected = ALL
    failures = []
    for number in range(RACE_PODS):
        kind = "d" if number % 2 == 0 else "e"
        key = f"x/{kind}{number}"
        expected = (expected.deny_ingress(key).allow("x/a", key) if kind == "d"
                    else expected.deny_egress(key))
        step = Step((Action("create-pod", key, {"labels": {"pod": kind},
                                                "node": NODES[number % 3]}),),
                    (Probe(80, "TCP", expected, first_packet=True),
                     Probe(80, "UDP", expected, first_packet=True)))
        for result in cluster.first_packet_step(number, step):
            if not result.ok:
                failures.append(f"{key} on {NODES[number % 3]}: " + result.diff())
    assert not failures, "\n".join(failures) + "\n" + cluster.rig.logs_tail()


def test_sctp_cases_as_rules_only(cluster: PolicyCluster) -> None:
    """No SCTP in this kernel: the SCTP probes are checked against the compiled tables of
    the three nodes for the pods' real addresses, not on the wire."""
    cluster.reset()
    sctp_cases = [c for c in CASES if any(p.protocol == "SCTP" for s in c.steps
                                          for p in s.probes)]
    assert sctp_cases
    for case in sctp_cases:
        check_rules_only(case, {k: p.address for k, p in cluster.pods.items()})


def check_rules_only(case: Case, addresses: dict[str, str]) -> None:
    world = World.initial()
    for key, address in addresses.items():
        world.set_address(key, IPv4Address(address))
    for number, step in enumerate(case.steps):
        for action in step.actions:
            world.apply(action)
        state = world.state()
        tables = node_tables(state, nodes=NODES)
        pods = {p.key: p for p in state.pods}
        for probe in step.probes:
            if probe.on_kernel or probe.expected is None:
                continue
            wrong = [f"{s} -> {d}" for (s, d), allowed in probe.expected.table(pods).items()
                     if enforced(tables, pods[s], pods[d], probe.port, probe.protocol)
                     != allowed]
            assert not wrong, f"{case.name} step {number} {probe.port}/SCTP: {wrong}"
