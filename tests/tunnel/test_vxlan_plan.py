"""The sans-IO half of tunnel.vxlan: peer validation, desired state and the ordered plan.

No kernel here. The plan is checked against a small model of the kernel objects: applying it
must reach the desired state, a second plan must be empty, and at every step a route may only
point at a gateway whose neighbour and FDB entries are already in place.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.netlink import parse_events
from tunnel.vxlan.plan import (
    AddAddress,
    AddRoute,
    CreateDevice,
    DeleteAddress,
    DeleteDevice,
    DeleteFdb,
    DeleteNeighbour,
    DeleteRoute,
    DesiredState,
    DeviceState,
    KernelState,
    Neighbour,
    Op,
    Peer,
    ReplaceRoute,
    RouteState,
    SetDeviceMtu,
    SetDeviceUp,
    SetFdb,
    SetNeighbour,
    UnderlayState,
    ValidPeer,
    VxlanConfig,
    desired_state,
    normalize_mac,
    plan,
    validate_peers,
)
from tunnel.vxlan.watch import device_events

N = IPv4Network
A = IPv4Address
UNDERLAY = UnderlayState(ifindex=2, name="eth0", mtu=1500)
CONFIG = VxlanConfig(vtep_mac="02:00:00:00:00:01", local_ip=A("198.18.0.11"), device="wpvx.1")
LOCAL = [N("198.19.1.0/24")]


def peer(i: int, *blocks: str, mac: str | None = None, ip: str | None = None) -> Peer:
    return Peer(
        name=f"n{i}",
        underlay_ip=A(ip or f"198.18.0.{10 + i}"),
        vtep_mac=mac or f"02:00:00:00:00:{i:02x}",
        blocks=[N(b) for b in blocks] or [N(f"198.19.{i}.0/24")],
    )


def desired_for(peers: list[Peer], local: list[N] = LOCAL) -> DesiredState:
    valid, rejected, _ = validate_peers(peers, local, CONFIG)
    assert not rejected
    return desired_state(CONFIG, valid, local, UNDERLAY)


def device_from(desired: DesiredState, **changes: object) -> DeviceState:
    spec = desired.device
    base = DeviceState(
        ifindex=7,
        kind="vxlan",
        vni=spec.vni,
        port=spec.port,
        local=spec.local,
        link=spec.underlay_ifindex,
        learning=False,
        mac=spec.mac,
        mtu=spec.mtu,
        up=True,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# A model of the kernel objects on our device, with the ordering rules checked at every step


@dataclass
class Model:
    device: DeviceState | None
    addresses: set[IPv4Interface] = field(default_factory=set)
    neighbours: dict[A, Neighbour] = field(default_factory=dict)
    fdb: dict[str, tuple[A | None, ...]] = field(default_factory=dict)
    routes: dict[tuple[N, int], RouteState] = field(default_factory=dict)

    @classmethod
    def of(cls, state: KernelState) -> Model:
        return cls(
            state.device,
            set(state.addresses),
            dict(state.neighbours),
            dict(state.fdb),
            dict(state.routes),
        )

    def state(self) -> KernelState:
        return KernelState(
            self.device,
            frozenset(self.addresses),
            dict(self.neighbours),
            dict(self.fdb),
            dict(self.routes),
        )

    def routable(self, gateway: A) -> bool:
        neighbour = self.neighbours.get(gateway)
        return (
            neighbour is not None
            and neighbour.permanent
            and neighbour.mac in self.fdb
            and self.device is not None
            and self.device.up
        )

    def apply(self, op: Op) -> None:
        if isinstance(op, CreateDevice):
            assert self.device is None
            s = op.spec
            self.device = DeviceState(8, "vxlan", s.vni, s.port, s.local, s.underlay_ifindex,
                                      False, s.mac, s.mtu, True)  # fmt: skip
            return
        if isinstance(op, DeleteDevice):  # the kernel drops everything on the device with it
            self.device = None
            self.addresses, self.neighbours, self.fdb, self.routes = set(), {}, {}, {}
            return
        assert self.device is not None, f"{op} without a device"
        if isinstance(op, SetDeviceMtu):
            self.device = replace(self.device, mtu=op.mtu)
        elif isinstance(op, SetDeviceUp):
            self.device = replace(self.device, up=True)
        elif isinstance(op, AddAddress):
            self.addresses.add(op.address)
        elif isinstance(op, DeleteAddress):
            self.addresses.discard(op.address)
        elif isinstance(op, SetNeighbour):
            self.neighbours[op.ip] = Neighbour(op.mac, True)
        elif isinstance(op, DeleteNeighbour):
            using = [k for k, r in self.routes.items() if r.gateway == op.ip]
            assert not using, f"neighbour {op.ip} deleted while routes {using} use it"
            del self.neighbours[op.ip]
        elif isinstance(op, SetFdb):
            self.fdb[op.mac] = (op.dst,)
        elif isinstance(op, DeleteFdb):
            for key, route in self.routes.items():
                gw = self.neighbours.get(route.gateway) if route.gateway else None
                assert gw is None or gw.mac != op.mac, f"fdb {op.mac} deleted under {key}"
            del self.fdb[op.mac]
        elif isinstance(op, AddRoute | ReplaceRoute):
            assert self.routable(op.gateway), f"route {op.network} before its neighbour/fdb"
            assert isinstance(op, ReplaceRoute) == ((op.network, 0) in self.routes)
            self.routes[(op.network, 0)] = RouteState(op.gateway, True)
        elif isinstance(op, DeleteRoute):
            del self.routes[(op.network, op.priority)]
        else:  # pragma: no cover
            raise AssertionError(op)


def converge(desired: DesiredState, actual: KernelState) -> tuple[list[Op], KernelState]:
    ops = plan(desired, actual)
    model = Model.of(actual)
    for op in ops:
        model.apply(op)
    return ops, model.state()


def assert_matches(desired: DesiredState, state: KernelState) -> None:
    assert state.device is not None and state.device.up
    assert state.device.mtu == desired.device.mtu
    assert state.addresses == desired.addresses
    assert {ip: n.mac for ip, n in state.neighbours.items() if n.permanent} == {
        ip: mac for ip, (mac, _) in desired.neighbours.items()
    }
    assert dict(state.fdb) == {mac: (dst,) for mac, (dst, _) in desired.fdb.items()}
    assert {net: r.gateway for (net, _), r in state.routes.items()} == {
        net: gw for net, (gw, _) in desired.routes.items()
    }


# ---------------------------------------------------------------------------------------------
# plan: concrete cases


def test_fresh_node_creates_device_then_neighbour_fdb_route_per_peer() -> None:
    desired = desired_for([peer(2), peer(3, "198.19.3.0/24", "198.19.30.0/24")])
    ops, state = converge(desired, KernelState())
    assert isinstance(ops[0], CreateDevice)
    assert ops[1] == AddAddress(IPv4Interface("198.19.1.0/32"))
    kinds = [type(op).__name__ for op in ops[2:]]
    assert kinds == ["SetNeighbour"] * 2 + ["SetFdb"] * 2 + ["AddRoute"] * 3
    # a second block goes via the peer's first block address
    assert AddRoute(N("198.19.30.0/24"), A("198.19.3.0"), "n3") in ops
    assert_matches(desired, state)
    assert plan(desired, state) == []


def test_same_state_again_plans_nothing() -> None:
    desired = desired_for([peer(2), peer(3)])
    _, state = converge(desired, KernelState())
    assert plan(desired, state) == []


def test_removed_peer_loses_route_first_then_neighbour_and_fdb() -> None:
    before = desired_for([peer(2), peer(3)])
    _, state = converge(before, KernelState())
    after = desired_for([peer(2)])
    ops, final = converge(after, state)
    assert ops == [
        DeleteRoute(N("198.19.3.0/24"), A("198.19.3.0"), 0),
        DeleteNeighbour(A("198.19.3.0"), "02:00:00:00:00:03"),
        DeleteFdb("02:00:00:00:00:03", A("198.18.0.13")),
    ]
    assert_matches(after, final)


def test_moved_peer_updates_fdb_in_place() -> None:
    _, state = converge(desired_for([peer(2)]), KernelState())
    moved = desired_for([peer(2, ip="198.18.0.99")])
    ops, _ = converge(moved, state)
    assert ops == [SetFdb("02:00:00:00:00:02", A("198.18.0.99"), "n2")]


def test_new_first_block_replaces_routes_after_new_neighbour() -> None:
    _, state = converge(desired_for([peer(2, "198.19.2.0/24", "198.19.20.0/24")]), KernelState())
    reordered = desired_for([peer(2, "198.19.20.0/24", "198.19.2.0/24")])
    ops, final = converge(reordered, state)
    assert [type(op).__name__ for op in ops] == [
        "SetNeighbour",
        "ReplaceRoute",
        "ReplaceRoute",
        "DeleteNeighbour",
    ]
    assert_matches(reordered, final)


def test_rebooted_peer_with_new_mac_gets_new_entries_and_old_fdb_removed() -> None:
    _, state = converge(desired_for([peer(2)]), KernelState())
    new_mac = desired_for([peer(2, mac="02:00:00:00:aa:02")])
    ops, final = converge(new_mac, state)
    assert ops == [
        SetNeighbour(A("198.19.2.0"), "02:00:00:00:aa:02", "n2"),
        SetFdb("02:00:00:00:aa:02", A("198.18.0.12"), "n2"),
        DeleteFdb("02:00:00:00:00:02", A("198.18.0.12")),
    ]
    assert_matches(new_mac, final)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"vni": 99}, "vni 99 != 1"),
        ({"port": 4789}, "port 4789 != 8472"),
        ({"local": A("198.18.0.99")}, "local 198.18.0.99"),
        ({"link": 5}, "underlay ifindex 5 != 2"),
        ({"learning": True}, "learning is on"),
        ({"kind": "bridge"}, "kind bridge is not vxlan"),
        ({"mac": "02:00:00:00:00:77"}, "mac 02:00:00:00:00:77"),
    ],
)
def test_device_with_wrong_parameters_is_recreated(change: dict[str, object], reason: str) -> None:
    desired = desired_for([peer(2)])
    _, good = converge(desired, KernelState())
    broken = replace(good, device=device_from(desired, **change))
    ops, final = converge(desired, broken)
    assert isinstance(ops[0], DeleteDevice) and reason in ops[0].reason
    assert isinstance(ops[1], CreateDevice)
    assert sum(isinstance(op, AddRoute) for op in ops) == 1
    assert_matches(desired, final)


def test_mtu_and_down_are_fixed_live() -> None:
    desired = desired_for([peer(2)])
    _, good = converge(desired, KernelState())
    broken = replace(good, device=device_from(desired, mtu=1400, up=False))
    assert plan(desired, broken) == [SetDeviceMtu(1450), SetDeviceUp()]


def test_mtu_follows_underlay_unless_configured() -> None:
    valid, _, _ = validate_peers([peer(2)], LOCAL, CONFIG)
    jumbo = UnderlayState(2, "eth0", 9000)
    assert desired_state(CONFIG, valid, LOCAL, jumbo).device.mtu == 8950
    fixed = replace(CONFIG, mtu=1300)
    assert desired_state(fixed, valid, LOCAL, jumbo).device.mtu == 1300


def test_extra_entries_on_our_device_are_removed_but_kernel_made_neighbours_age_out() -> None:
    desired = desired_for([peer(2)])
    _, good = converge(desired, KernelState())
    dirty = replace(
        good,
        addresses=good.addresses | {IPv4Interface("198.19.9.9/24")},
        neighbours={**good.neighbours, A("198.19.9.1"): Neighbour("02:00:00:00:09:01", False)},
        routes={
            **good.routes,
            (N("198.19.9.0/24"), 0): RouteState(None, False),
            (N("198.19.2.0/24"), 100): RouteState(A("198.19.2.0"), True),
        },
    )
    ops = plan(desired, dirty)
    assert ops == [
        DeleteRoute(N("198.19.9.0/24"), None, 0),
        DeleteRoute(N("198.19.2.0/24"), A("198.19.2.0"), 100),
        DeleteAddress(IPv4Interface("198.19.9.9/24")),
    ]


def test_non_permanent_or_wrong_neighbour_is_set_and_route_without_onlink_replaced() -> None:
    desired = desired_for([peer(2)])
    _, good = converge(desired, KernelState())
    stale = replace(
        good,
        neighbours={A("198.19.2.0"): Neighbour("02:00:00:00:00:02", False)},
        routes={(N("198.19.2.0/24"), 0): RouteState(A("198.19.2.0"), False)},
    )
    assert plan(desired, stale) == [
        SetNeighbour(A("198.19.2.0"), "02:00:00:00:00:02", "n2"),
        ReplaceRoute(N("198.19.2.0/24"), A("198.19.2.0"), "n2"),
    ]


def test_no_local_blocks_means_no_address() -> None:
    valid, _, _ = validate_peers([peer(2)], [], CONFIG)
    desired = desired_state(CONFIG, valid, [], UNDERLAY)
    assert desired.addresses == frozenset()


# ---------------------------------------------------------------------------------------------
# validation


def reasons(peers: list[object], local: list[N] = LOCAL) -> dict[str | None, str]:
    _, rejected, _ = validate_peers(peers, local, CONFIG)
    return {p.peer: p.reason for p in rejected}


@pytest.mark.parametrize(
    "mac",
    ["zz:00:00:00:00:01", "02:00:00:00:00", "01:00:5e:00:00:01", "00:00:00:00:00:00", 42, None],
)
def test_invalid_mac_is_rejected(mac: object) -> None:
    bad = Peer("n2", A("198.18.0.12"), mac, [N("198.19.2.0/24")])  # type: ignore[arg-type]
    valid, rejected, _ = validate_peers([bad, peer(3)], LOCAL, CONFIG)
    assert [p.name for p in valid] == ["n3"]
    assert rejected[0].reason == "invalid-mac" and rejected[0].peer == "n2"


def test_mac_forms_are_normalised() -> None:
    assert normalize_mac("02-AA-bb-CC-dd-EE") == "02:aa:bb:cc:dd:ee"
    with pytest.raises(ValueError, match="multicast"):
        VxlanConfig(vtep_mac="03:00:00:00:00:01", local_ip=A("198.18.0.11"))


def test_overlapping_peers_are_both_rejected_others_kept() -> None:
    got = reasons([peer(2, "198.19.2.0/23"), peer(3), peer(4), peer(5, "198.19.5.0/25")])
    assert got == {"n2": "overlapping-block", "n3": "overlapping-block"}


def test_peer_overlapping_a_local_block_or_itself_is_rejected() -> None:
    got = reasons([peer(2, "198.19.1.128/25"), peer(3, "198.19.3.0/24", "198.19.3.64/26")])
    assert got == {"n2": "overlapping-block", "n3": "overlapping-block"}


def test_duplicate_names_macs_and_own_mac_are_rejected() -> None:
    got = reasons(
        [
            peer(2),
            replace(peer(2), blocks=[N("198.19.22.0/24")]),
            peer(3, mac="02:00:00:00:00:09"),
            peer(4, mac="02:00:00:00:00:09"),
            peer(5, mac=CONFIG.vtep_mac),
            peer(6),
        ]
    )
    assert got == {
        "n2": "duplicate-name",
        "n3": "duplicate-mac",
        "n4": "duplicate-mac",
        "n5": "duplicate-mac",
    }


@pytest.mark.parametrize(
    ("field_name", "value", "reason"),
    [
        ("name", "", "invalid-name"),
        ("underlay_ip", "not-an-ip", "invalid-underlay-ip"),
        ("underlay_ip", "0.0.0.0", "invalid-underlay-ip"),
        ("underlay_ip", "224.0.0.1", "invalid-underlay-ip"),
        ("underlay_ip", "198.18.0.11", "invalid-underlay-ip"),
        ("underlay_ip", "2001:db8::1", "invalid-underlay-ip"),
        ("blocks", "198.19.2.0/24", "invalid-block"),
        ("blocks", ["198.19.2.1/24"], "invalid-block"),
        ("blocks", ["0.0.0.0/0"], "invalid-block"),
        ("blocks", [N("127.0.0.0/8")], "invalid-block"),
        ("blocks", [None], "invalid-block"),
    ],
)
def test_bad_fields_are_rejected_with_a_reason(field_name: str, value: object, reason: str) -> None:
    bad = replace(peer(2), **{field_name: value})  # type: ignore[arg-type]
    valid, rejected, _ = validate_peers([bad, peer(3)], LOCAL, CONFIG)
    assert [p.name for p in valid] == ["n3"]
    assert [p.reason for p in rejected] == [reason]


def test_strings_from_the_wire_are_accepted_when_well_formed() -> None:
    wire = Peer("n2", "198.18.0.12", "02:00:00:00:00:02", ["198.19.2.0/24"])  # type: ignore[arg-type, list-item]
    valid, rejected, idle = validate_peers([wire], LOCAL, CONFIG)
    assert not rejected and not idle
    assert valid == [ValidPeer("n2", A("198.18.0.12"), "02:00:00:00:00:02", (N("198.19.2.0/24"),))]


def test_blocks_outside_the_pod_range_are_rejected() -> None:
    ranged = replace(CONFIG, pod_range=N("198.19.0.0/16"))
    _, rejected, _ = validate_peers([peer(2, "198.20.2.0/24")], LOCAL, ranged)
    assert [p.reason for p in rejected] == ["block-outside-range"]


def test_peer_without_blocks_is_idle_not_rejected() -> None:
    empty = Peer("n2", A("198.18.0.12"), "02:00:00:00:00:02", [])
    valid, rejected, idle = validate_peers([empty], LOCAL, CONFIG)
    assert (valid, rejected, idle) == ([], [], ["n2"])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 255), st.integers(20, 28), st.integers(0, 9)), max_size=30)
)
def test_overlap_detection_matches_brute_force(raw: list[tuple[int, int, int]]) -> None:
    blocks = [
        (
            N((int(A("198.19.0.0")) + (third << 8) + (i * 37 % 256), 32)).supernet(new_prefix=plen),
            owner,
        )
        for i, (third, plen, owner) in enumerate(raw)
    ]
    peers: dict[int, list[N]] = {}
    for block, owner in blocks:
        peers.setdefault(owner, []).append(block)
    candidates = [
        Peer(f"n{o}", A(f"198.18.1.{o + 1}"), f"02:00:00:00:01:{o:02x}", bs)
        for o, bs in peers.items()
    ]
    _, rejected, _ = validate_peers(candidates, [], CONFIG)
    expected = {
        f"n{o}"
        for (b1, o), (b2, o2) in itertools.permutations(blocks, 2)
        if b1.overlaps(b2)
        for o in (o, o2)
    }
    assert {p.peer for p in rejected} == expected


# ---------------------------------------------------------------------------------------------
# property: from any kernel state, one plan reaches the desired state, in a safe order


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[DesiredState, KernelState]:
    count = draw(st.integers(0, 8))
    thirds = draw(st.lists(st.integers(2, 250), min_size=count, max_size=count, unique=True))
    peers = []
    for i, third in enumerate(thirds):
        extra = draw(st.booleans())
        blocks = [f"198.19.{third}.0/25"] + ([f"198.19.{third}.128/25"] if extra else [])
        peers.append(peer(i + 2, *blocks, ip=f"198.18.0.{draw(st.integers(12, 250))}"))
    desired = desired_for(peers)
    _, full = converge(desired, KernelState())
    if draw(st.booleans()):
        return desired, KernelState()
    device = full.device
    assert device is not None
    device = draw(
        st.sampled_from(
            [device, replace(device, mtu=1400), replace(device, up=False), replace(device, vni=5)]
        )
    )
    neighbours = {
        ip: draw(
            st.sampled_from([n, Neighbour("02:00:00:00:ff:ff", True), Neighbour(n.mac, False)])
        )
        for ip, n in full.neighbours.items()
        if draw(st.booleans())
    }
    fdb = {mac: dsts for mac, dsts in full.fdb.items() if draw(st.booleans())}
    routes = {
        key: draw(
            st.sampled_from(
                [
                    r,
                    RouteState(A("198.19.254.0"), True),
                    RouteState(None, False),
                    RouteState(A("198.19.251.0"), True),  # via the departed peer below
                ]
            )
        )
        for key, r in full.routes.items()
        if draw(st.booleans())
    }
    # entries of a peer that left (some routes above may still point at it)
    if draw(st.booleans()):
        neighbours[A("198.19.251.0")] = Neighbour("02:00:00:00:fb:00", True)
        fdb["02:00:00:00:fb:00"] = (A("198.18.0.251"),)
        routes[(N("198.19.251.0/25"), 0)] = RouteState(A("198.19.251.0"), True)
    return desired, KernelState(device, full.addresses, neighbours, fdb, routes)


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_one_plan_converges_in_a_safe_order(scenario: tuple[DesiredState, KernelState]) -> None:
    desired, actual = scenario
    _, final = converge(desired, actual)
    assert_matches(desired, final)
    assert plan(desired, final) == []


# ---------------------------------------------------------------------------------------------
# netlink parsing and the device watcher's filter (pure)


def _link_message(msg_type: int, ifname: str, flags: int) -> bytes:
    name = ifname.encode() + b"\0"
    attr = struct.pack("HH", 4 + len(name), 3) + name  # IFLA_IFNAME
    attr += b"\0" * (-len(attr) % 4)
    body = struct.pack("BxHiII", 0, 1, 9, flags, 0xFFFFFFFF) + attr
    return struct.pack("IHHII", 16 + len(body), msg_type, 0, 0, 0) + body


def test_link_notifications_become_device_events() -> None:
    data = (
        _link_message(16, "other", 0)  # RTM_NEWLINK, someone else's link
        + _link_message(16, "wpvx.1", 0x1)  # up: nothing to do
        + _link_message(16, "wpvx.1", 0)  # down
        + _link_message(17, "wpvx.1", 0)  # RTM_DELLINK
    )
    events = parse_events(data)
    assert [(e.kind, e.action, e.key, e.ifindex) for e in events][:2] == [
        ("link", "new", "other", 9),
        ("link", "new", "wpvx.1", 9),
    ]
    assert [e.reason for e in device_events(events, "wpvx.1")] == ["down", "deleted"]


@given(st.binary(max_size=200))
def test_garbage_netlink_bytes_never_raise(data: bytes) -> None:
    for event in parse_events(data):
        assert event.kind in {"link", "addr", "route", "neigh", "fdb"}


# the layout: the plan is pure by construction

