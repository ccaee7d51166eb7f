"""Result rendering per spec version, parsing of any version, and prevResult chaining."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weavepy.cni.result import (
    DNS,
    SUPPORTED_VERSIONS,
    Interface,
    IPConfig,
    Result,
    ResultFormatError,
    Route,
    chain,
    parse_result,
    render_result,
)

OURS = Result(
    interfaces=(Interface("weavepy0", "0a:00:00:00:00:01"),
                Interface("wpv0123456789ab", "0a:00:00:00:00:02"),
                Interface("eth0", "0a:00:00:00:00:03", sandbox="/run/netns/p", mtu=1410)),
    ips=(IPConfig(ipaddress.ip_interface("198.19.1.7/24"), ipaddress.ip_address("198.19.1.1"),
                  2),),
    routes=(Route(ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_address("198.19.1.1"),
                  mtu=1410, table=254),),
    dns=DNS(nameservers=("198.19.0.10",), search=("svc.cluster.local",)),
)


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_legacy_versions_carry_the_ip_version_field(version: str) -> None:
    out = render_result(OURS, version)
    assert out["cniVersion"] == version
    assert out["ips"] == [{"version": "4", "interface": 2, "address": "198.19.1.7/24",
                           "gateway": "198.19.1.1"}]
    assert "mtu" not in out["interfaces"][2]
    assert out["routes"] == [{"dst": "0.0.0.0/0", "gw": "198.19.1.1"}]


def test_1_0_0_drops_the_ip_version_and_has_no_1_1_fields() -> None:
    out = render_result(OURS, "1.0.0")
    assert out["ips"][0] == {"interface": 2, "address": "198.19.1.7/24", "gateway": "198.19.1.1"}
    assert out["interfaces"][2] == {"name": "eth0", "mac": "0a:00:00:00:00:03",
                                    "sandbox": "/run/netns/p"}
    assert out["routes"] == [{"dst": "0.0.0.0/0", "gw": "198.19.1.1"}]
    assert out["dns"] == {"nameservers": ["198.19.0.10"], "search": ["svc.cluster.local"]}


def test_1_1_0_adds_interface_mtu_and_route_attributes() -> None:
    out = render_result(OURS, "1.1.0")
    assert out["interfaces"][2]["mtu"] == 1410
    assert out["routes"] == [{"dst": "0.0.0.0/0", "gw": "198.19.1.1", "mtu": 1410, "table": 254}]


def test_unknown_version_is_refused() -> None:
    with pytest.raises(ResultFormatError):
        render_result(OURS, "2.0.0")


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_every_version_parses_back(version: str) -> None:
    back = parse_result(render_result(OURS, version))
    assert back.ips == OURS.ips and back.dns == OURS.dns
    assert [i.name for i in back.interfaces] == ["weavepy0", "wpv0123456789ab", "eth0"]
    assert back.container_addresses("eth0", "/run/netns/p") == list(OURS.ips)


def test_chaining_shifts_our_interface_indices() -> None:
    prev = parse_result({"interfaces": [{"name": "lo0"}, {"name": "net0", "sandbox": "/x"}],
                         "ips": [{"interface": 1, "address": "198.19.9.2/24"}],
                         "dns": {"nameservers": ["198.19.9.53"]}})
    merged = chain(prev, OURS)
    assert [i.name for i in merged.interfaces] == ["lo0", "net0", "weavepy0",
                                                   "wpv0123456789ab", "eth0"]
    assert [ip.interface for ip in merged.ips] == [1, 4]
    assert merged.dns.nameservers == ("198.19.9.53",)
    assert merged.dns.search == ("svc.cluster.local",)
    assert chain(None, OURS) is OURS


@pytest.mark.parametrize("bad", [
    [], {"ips": [{"address": "not-an-ip"}]}, {"interfaces": [{"mac": "x"}]},
    {"interfaces": [{"name": "a"}], "ips": [{"address": "198.19.1.2/24", "interface": 3}]},
    {"routes": [{"dst": "198.19.0.0/16", "gw": "nope"}]}, {"dns": []},
])
def test_malformed_results_are_rejected(bad: object) -> None:
    with pytest.raises(ResultFormatError):
        parse_result(bad)


addresses = st.ip_addresses(v=4).map(lambda a: ipaddress.ip_interface(f"{a}/24"))


@given(st.lists(addresses, max_size=4), st.sampled_from(SUPPORTED_VERSIONS))
def test_roundtrip_keeps_addresses(ips: list[ipaddress.IPv4Interface], version: str) -> None:
    result = Result(interfaces=(Interface("eth0", sandbox="/p"),),
                    ips=tuple(IPConfig(a, None, 0) for a in ips))
    assert parse_result(render_result(result, version)).ips == result.ips
