"""The Node -> blocks mapping of `--ipam kubernetes` (weavepy.ipam.podcidr), pure."""

from __future__ import annotations

from ipaddress import IPv4Network

from hypothesis import given
from hypothesis import strategies as st

from weavepy.ipam.podcidr import pod_cidr_table
from weavepy.ipam.status import IpamState

RANGE = IPv4Network("198.19.0.0/16")


def test_each_nodes_ipv4_pod_cidr_is_its_block() -> None:
    table = pod_cidr_table({"n1": ["198.19.1.0/24"], "n2": ["198.19.2.0/24", "fd00:2::/64"],
                            "n3": ["fd00:3::/64", "198.19.3.0/25"]}, "n1", RANGE)
    assert table.state is IpamState.READY
    assert table.pod_cidr == IPv4Network("198.19.1.0/24")
    assert table.blocks == {"n1": (IPv4Network("198.19.1.0/24"),),
                            "n2": (IPv4Network("198.19.2.0/24"),),
                            "n3": (IPv4Network("198.19.3.0/25"),)}
    assert table.ipv6_ignored == {"n2": ("fd00:2::/64",), "n3": ("fd00:3::/64",)}
    assert not table.refused


def test_the_legacy_single_pod_cidr_order_does_not_matter() -> None:
    table = pod_cidr_table({"n1": ["fd00:1::/64", "198.19.1.0/24"]}, "n1", RANGE)
    assert table.pod_cidr == IPv4Network("198.19.1.0/24")


def test_a_node_without_a_pod_cidr_waits_for_one() -> None:
    table = pod_cidr_table({"n1": [], "n2": ["198.19.2.0/24"]}, "n1", RANGE)
    assert table.state is IpamState.WAITING_FOR_POD_CIDR
    assert table.detail == "node n1 has no podCIDR yet"
    assert table.pod_cidr is None
    assert table.blocks == {"n2": (IPv4Network("198.19.2.0/24"),)}  # routes to the others


def test_an_ipv6_only_node_waits_and_says_why() -> None:
    table = pod_cidr_table({"n1": ["fd00:1::/64"]}, "n1", RANGE)
    assert table.state is IpamState.WAITING_FOR_POD_CIDR
    assert "only IPv6 podCIDRs (fd00:1::/64)" in table.detail
    assert table.ipv6_ignored == {"n1": ("fd00:1::/64",)}


def test_a_node_the_api_does_not_list_waits_and_names_the_rule() -> None:
    table = pod_cidr_table({"n2": ["198.19.2.0/24"]}, "n1", RANGE)
    assert table.state is IpamState.WAITING_FOR_POD_CIDR
    assert "no Node named n1" in table.detail and "--name" in table.detail


def test_a_pod_cidr_outside_the_range_is_refused_in_one_line() -> None:
    table = pod_cidr_table({"n1": ["192.0.1.0/24"], "n2": ["192.0.2.0/24"],
                            "n3": ["198.19.3.0/24"]}, "n1", RANGE)
    assert table.state is IpamState.POD_CIDR_REFUSED
    assert table.detail == ("podCIDR 192.0.1.0/24 of node n1 is outside --ipalloc-range "
                            "198.19.0.0/16")
    assert "\n" not in table.detail
    assert table.pod_cidr is None
    assert set(table.refused) == {"n1", "n2"}
    assert table.blocks == {"n3": (IPv4Network("198.19.3.0/24"),)}


def test_malformed_and_too_small_pod_cidrs_are_refused() -> None:
    table = pod_cidr_table({"n1": ["198.19.1.0/33"], "n2": ["198.19.2.1/24"],
                            "n3": ["198.19.3.0/31"]}, "n1", RANGE)
    assert table.state is IpamState.POD_CIDR_REFUSED
    assert "not a CIDR network" in table.refused["n1"]
    assert "not a CIDR network" in table.refused["n2"]  # host bits set
    assert "no room for pods" in table.refused["n3"]
    assert table.blocks == {}


def test_overlapping_pod_cidrs_are_refused_for_both_nodes() -> None:
    table = pod_cidr_table({"n1": ["198.19.0.0/23"], "n2": ["198.19.1.0/24"],
                            "n3": ["198.19.2.0/24"]}, "n2", RANGE)
    assert table.state is IpamState.POD_CIDR_REFUSED
    assert table.refused["n2"] == ("podCIDR 198.19.1.0/24 of node n2 overlaps node n1's "
                                   "198.19.0.0/23")
    assert "overlaps node n2's" in table.refused["n1"]
    assert table.blocks == {"n3": (IPv4Network("198.19.2.0/24"),)}


node_names = st.sampled_from([f"n{i}" for i in range(8)])
cidrs = st.builds(lambda third, prefix: str(IPv4Network(f"198.{third}.0.0/{prefix}",
                                                        strict=False)),
                  st.integers(18, 20), st.integers(14, 24)) | st.builds(
    lambda third, fourth, prefix: str(IPv4Network(f"198.19.{third}.{fourth}/{prefix}",
                                                  strict=False)),
    st.integers(0, 255), st.integers(0, 255), st.integers(16, 31))


@given(st.dictionaries(node_names, st.lists(cidrs, max_size=2)), node_names)
def test_blocks_never_overlap_and_stay_in_the_range(nodes: dict[str, list[str]],
                                                    me: str) -> None:
    table = pod_cidr_table(nodes, me, RANGE)
    owned = [(name, b) for name, blocks in table.blocks.items() for b in blocks]
    for name, block in owned:
        assert block.subnet_of(RANGE)
        assert name not in table.refused
        for other, theirs in owned:
            assert other == name or not block.overlaps(theirs)
    assert set(table.blocks) | set(table.refused) <= set(nodes)
    assert (table.state is IpamState.READY) == (me in table.blocks)
    if table.pod_cidr is not None:
        assert table.blocks[me] == (table.pod_cidr,)
