"""The drop log: logged packets become drops named by pod and policy, lines are rate-limited
per flow, counts follow weave-npc's metric, and everything stays bounded."""

from __future__ import annotations

from ipaddress import IPv4Address

from hypothesis import given
from hypothesis import strategies as st

from weavepy.policy.compiler import (
    CompileOptions,
    compile_policy,
    drop_log_prefix,
    parse_drop_log_prefix,
)
from weavepy.policy.droplog import DropLog
from weavepy.policy.model import (
    ClusterState,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Pod,
)
from weavepy.policy.nflog import LoggedPacket

STATE = ClusterState(
    policies=(NetworkPolicy("y", "deny-all", LabelSelector()),),
    pods=(Pod("x", "a", ip=IPv4Address("198.19.0.2"), node="n1"),
          Pod("y", "b", ip=IPv4Address("198.19.0.3"), node="n1")),
    namespaces=(Namespace("x"), Namespace("y")))


def logged(prefix: str, src: str = "198.19.0.2", dst: str = "198.19.0.3", dport: int = 80,
           protocol: int = 6, flags: int | None = 0x02, sport: int = 41000) -> LoggedPacket:
    return LoggedPacket(group=6784, prefix=prefix, src=IPv4Address(src), dst=IPv4Address(dst),
                        protocol=protocol, sport=sport, dport=dport, tcp_flags=flags)


def drop_log(audit: bool = False, **options: float) -> tuple[DropLog, str]:
    compiled = compile_policy(STATE, "n1", CompileOptions(audit=audit))
    drops = DropLog(**options)  # type: ignore[arg-type]
    drops.update(STATE, compiled)
    chain = compiled.isolated["y/b"]["ingress"]
    return drops, drop_log_prefix(audit, chain)


def test_a_drop_is_named_by_pods_and_policies() -> None:
    drops, prefix = drop_log()
    lines = drops.observe(logged(prefix), now=100.0)
    assert lines == ["blocked by weavepy policy: TCP x/a (198.19.0.2:41000) -> y/b "
                     "(198.19.0.3:80) ingress, policies: y/deny-all"]
    [drop] = drops.recent
    assert (drop.src_pod, drop.dst_pod, drop.policies) == ("x/a", "y/b", ("y/deny-all",))
    assert drops.blocked == {("tcp", "80"): 1}
    assert drops.logged == {("ingress", "drop"): 1}


def test_audit_says_would_be_blocked_and_counts_nothing_blocked() -> None:
    drops, prefix = drop_log(audit=True)
    [line] = drops.observe(logged(prefix, src="198.18.9.2"), now=1.0)
    assert line.startswith("would be blocked by weavepy policy (audit mode, passed): TCP "
                           "198.18.9.2:41000 -> y/b")
    assert not drops.blocked and drops.logged == {("ingress", "audit"): 1}


def test_one_line_per_flow_per_window() -> None:
    drops, prefix = drop_log(window=10.0)
    assert len(drops.observe(logged(prefix), now=0.0)) == 1
    assert drops.observe(logged(prefix, sport=41001), now=1.0) == []  # same flow
    assert drops.observe(logged(prefix, sport=41002), now=9.9) == []
    assert len(drops.observe(logged(prefix, dport=81), now=2.0)) == 1  # another flow
    [line] = drops.observe(logged(prefix, sport=41003), now=10.0)
    assert line.endswith("(and 2 more since the last line)")
    assert drops.suppressed_lines == 2 and len(drops.recent) == 5


def test_weave_npc_counts_new_tcp_and_udp_only() -> None:
    drops, prefix = drop_log()
    drops.observe(logged(prefix, flags=0x12), now=0.0)  # SYN-ACK: not a new connection
    drops.observe(logged(prefix, flags=0x10), now=0.0)  # ACK
    drops.observe(logged(prefix, protocol=1, flags=None), now=0.0)
    drops.observe(logged(prefix, protocol=17, flags=None, dport=53), now=0.0)
    assert drops.blocked == {("udp", "53"): 1}
    assert drops.logged == {("ingress", "drop"): 4}


def test_foreign_prefixes_and_unknown_chains() -> None:
    drops, _prefix = drop_log()
    assert drops.observe(logged("something else"), now=0.0) == []
    assert drops.unattributed == 1
    [line] = drops.observe(logged(drop_log_prefix(False, "egress-ffffffffff")), now=0.0)
    assert line.endswith("egress, policies: unknown (egress-ffffffffff)")


def test_bounded() -> None:
    drops, prefix = drop_log(capacity=3, max_flows=2, window=10.0)
    lines = [drops.observe(logged(prefix, dport=port), now=0.0) for port in range(10)]
    assert [len(one) for one in lines] == [1, 1] + [0] * 8
    assert len(drops.recent) == 3 and drops.recent[-1].dport == 9
    assert len(drops.observe(logged(prefix, dport=5), now=10.0)) == 1  # expired flows go


@given(st.booleans(), st.sampled_from(["ingress", "egress"]),
       st.text("0123456789abcdef", min_size=1, max_size=10))
def test_prefixes_round_trip(audit: bool, direction: str, digest: str) -> None:
    chain = f"{direction}-{digest}"
    prefix = drop_log_prefix(audit, chain)
    assert len(prefix) < 128  # NF_LOG_PREFIXLEN
    assert parse_drop_log_prefix(prefix) == (audit, direction, chain)
