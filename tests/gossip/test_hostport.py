"""gossip.hostport: the one `host:port` parser, its options and its errors.

The examples come from the five parsers it replaced (gossip's join seeds, the agent's settings,
external WireGuard endpoints); the properties say what holds for any text.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gossip.hostport import HostKind, HostPortError, parse_host_port
from gossip.transport import DEFAULT_PORT

KINDS: tuple[HostKind, ...] = ("name", "ip", "ipv4")

# ------------------------------------------------------------------ examples (the old parsers')


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7946", ("127.0.0.1", 7946)),
        ("127.0.0.1", ("127.0.0.1", 7946)),
        ("[::1]:8000", ("::1", 8000)),
        ("[::1]", ("::1", 7946)),
        ("::1", ("::1", 7946)),
        ("node-a:1", ("node-a", 1)),
    ],
)
def test_join_seeds(text: str, expected: tuple[str, int]) -> None:
    """gossip.transport's seeds (was `parse_address`)."""
    assert parse_host_port(text, default_port=DEFAULT_PORT) == expected


@pytest.mark.parametrize("text", ["", ":1", "a:b", "a:70000", "[::1", "[::1]x"])
def test_bad_join_seeds(text: str) -> None:
    with pytest.raises(HostPortError):
        parse_host_port(text, default_port=DEFAULT_PORT)


def test_agent_peers() -> None:
    """weavepy.config's peers (its `parse_peer` binds the gossip port 6783)."""
    assert parse_host_port("node-a.example", default_port=6783) == ("node-a.example", 6783)
    assert parse_host_port("198.18.0.1:7000", default_port=6783) == ("198.18.0.1", 7000)
    assert parse_host_port("[fd00::1]:7000", default_port=6783) == ("fd00::1", 7000)
    for bad in ["198.18.0.1:0", "198.18.0.1:x", ":80", "bad host!", "[fd00::1"]:
        with pytest.raises(HostPortError):
            parse_host_port(bad, default_port=6783)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("198.18.0.50", "a port is required"),
        ("nowhere:51820", "not an IPv4 address"),
        ("[fd00::1]:51820", "not an IPv4 address"),
        ("198.18.0.50:0", r"out of range \(1-65535\)"),
        ("198.18.0.50:65536", "out of range"),
        ("198.18.0.50:", "no port after ':'"),
    ],
)
def test_external_endpoints_are_ipv4_with_a_port(text: str, problem: str) -> None:
    """weavepy.wgpath's external peer endpoints (`IPv4:PORT`, no default)."""
    with pytest.raises(HostPortError, match=problem):
        parse_host_port(text, hosts="ipv4")
    assert parse_host_port("198.18.0.50:51820", hosts="ipv4") == ("198.18.0.50", 51820)


def test_bind_addresses_may_ask_for_any_port() -> None:
    """Port 0 ("pick a free one") only where the caller says so (a bind address)."""
    assert parse_host_port("127.0.0.1:0", allow_port_zero=True, hosts="ip") == ("127.0.0.1", 0)
    with pytest.raises(HostPortError, match=r"out of range \(1-65535\)"):
        parse_host_port("127.0.0.1:0", hosts="ip")
    with pytest.raises(HostPortError, match=r"out of range \(0-65535\)"):
        parse_host_port("127.0.0.1:70000", allow_port_zero=True)


@pytest.mark.parametrize(
    ("text", "hosts", "problem"),
    [
        ("localhost:6784", "ip", "the host 'localhost' is not an IP address"),
        ("[node-a]:1", "name", "brackets hold an IPv6 address"),
        ("[198.18.0.1]:1", "name", "brackets hold an IPv6 address"),
        ("a..b:1", "name", "is not an IP address or a host name"),
        ("-a:1", "name", "is not an IP address or a host name"),
        (("x" * 64) + ".example:1", "name", "is not an IP address or a host name"),
        ("198.18.0.1:+80", "name", "is not a number"),
        ("198.18.0.1:٨٠", "name", "is not a number"),  # digits, but not ASCII ones
        ("   ", "name", "no address given"),
    ],
)
def test_errors_are_one_readable_sentence(text: str, hosts: HostKind, problem: str) -> None:
    with pytest.raises(HostPortError, match=problem) as caught:
        parse_host_port(text, default_port=1, hosts=hosts)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, ValueError), "callers that catch ValueError keep working"


# ------------------------------------------------------------------ properties

_LABEL = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", fullmatch=True)
host_names = st.lists(_LABEL, min_size=1, max_size=4).map(".".join).filter(lambda n: len(n) <= 253)
ipv4s = st.ip_addresses(v=4).map(str)
ipv6s = st.ip_addresses(v=6).map(str)
ports = st.integers(1, 65535)


def _joined(host: str, port: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


@given(st.one_of(host_names, ipv4s, ipv6s), ports)
def test_what_is_written_is_what_is_read(host: str, port: int) -> None:
    assert parse_host_port(_joined(host, port)) == (host, port)
    assert parse_host_port(_joined(host, None), default_port=port) == (host, port)
    assert parse_host_port(host, default_port=port) == (host, port)  # bare IPv6 too


@given(st.one_of(ipv4s, ipv6s, host_names), ports)
def test_each_host_kind_takes_exactly_its_hosts(host: str, port: int) -> None:
    text = _joined(host, port)
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    accepted = {
        "name": True,
        "ip": address is not None,
        "ipv4": isinstance(address, ipaddress.IPv4Address),
    }
    for kind in KINDS:
        if accepted[kind]:
            assert parse_host_port(text, hosts=kind) == (host, port)
        else:
            with pytest.raises(HostPortError, match=f"the host {host!r} is not"):
                parse_host_port(text, hosts=kind)


@given(st.one_of(ipv4s, ipv6s, host_names), st.integers(0, 10**6), st.booleans())
def test_the_port_range_is_the_option_s(host: str, port: int, zero: bool) -> None:
    text = _joined(host, port)
    if (0 if zero else 1) <= port <= 65535:
        assert parse_host_port(text, allow_port_zero=zero) == (host, port)
    else:
        with pytest.raises(HostPortError, match="out of range"):
            parse_host_port(text, allow_port_zero=zero)


@given(
    st.text(alphabet=st.sampled_from("[]:.-%aZ09 \t\n\u0663"), max_size=24) | st.text(max_size=24),
    st.sampled_from(KINDS),
    st.booleans(),
    st.one_of(st.none(), ports),
)
def test_any_text_is_parsed_or_refused_with_one_sentence(
    text: str, hosts: HostKind, zero: bool, default: int | None
) -> None:
    try:
        host, port = parse_host_port(text, default_port=default, allow_port_zero=zero, hosts=hosts)
    except HostPortError as exc:
        assert exc.problem and "\n" not in exc.problem
        assert str(exc).startswith(repr(text.strip()) if text.strip() else repr(text))
        return
    assert host and host == host.strip()
    assert (0 if zero else 1) <= port <= 65535 or port == default
    if hosts != "name":
        address = ipaddress.ip_address(host)
        assert hosts == "ip" or isinstance(address, ipaddress.IPv4Address)
    assert parse_host_port(f" {text}\n", default_port=default, allow_port_zero=zero,
                           hosts=hosts) == (host, port)
