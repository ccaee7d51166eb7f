"""The drop reader's handling of what the socket gives (no socket here: the NFLOG group itself
is read in test_droplog_netns.py): the live state is taken from the enforcer's snapshot when a
drop arrives, interfaces are named, lines are written, malformed messages are counted."""

from __future__ import annotations

from ipaddress import IPv4Address

from tests.policy.nflog_messages import ipv4_tcp, packet_message
from weavepy.policy.compiler import CompiledPolicy, compile_policy, drop_log_prefix
from weavepy.policy.droplog import DropLog
from weavepy.policy.dropreader import DropReader
from weavepy.policy.model import ClusterState, LabelSelector, NetworkPolicy, Pod

STATE = ClusterState(
    policies=(NetworkPolicy("x", "deny", LabelSelector()),),
    pods=(Pod("x", "a", ip=IPv4Address("198.19.0.2"), node="n1"),
          Pod("x", "b", ip=IPv4Address("198.19.0.3"), node="n1")))


def test_a_datagram_becomes_a_named_line_with_the_state_of_the_moment() -> None:
    compiled = compile_policy(STATE, "n1")
    snapshots: list[tuple[ClusterState, CompiledPolicy | None]] = [(ClusterState(), None)]
    lines: list[str] = []
    reader = DropReader(DropLog(), 6784, snapshot=lambda: snapshots[-1], write=lines.append,
                        clock=lambda: 0.0, wallclock=lambda: 1.0)
    assert reader.status()["recent"] == []  # idle: nothing read, nothing asked
    snapshots.append((STATE, compiled))
    prefix = drop_log_prefix(False, compiled.isolated["x/b"]["ingress"])
    reader.handle(packet_message(ipv4_tcp("198.19.0.2", "198.19.0.3", 40000, 80), prefix,
                                 indev=1, outdev=999999, physindev=None))
    assert lines == ["blocked by weavepy policy: TCP x/a (198.19.0.2:40000) -> x/b "
                     "(198.19.0.3:80) ingress, policies: x/deny"]
    [drop] = reader.status()["recent"]
    assert (drop["in_interface"], drop["out_interface"], drop["at"]) == ("lo", "if999999", 1.0)

    reader.handle(b"\x10\x00\x00\x00garbage!")
    assert reader.status()["errors"] == {"malformed": 1}
