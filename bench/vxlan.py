"""bench.vxlan: pod-to-pod TCP throughput through weavepy's reconciled VXLAN, against a
hand-configured flannel-style VXLAN and bare routing over the same veth underlay; plus the cost
of a reconcile pass at a few hundred peers.

Four identical 2-node sandboxes are built. In each, both nodes get a pod bridge
(198.19.<i>.1/24) with one "pod" namespace behind it (198.19.<i>.2, default via the bridge), so
the measured traffic is forwarded, as pod traffic is. Only the node-to-node path differs:

- weavepy: `tunnel.vxlan.VxlanBackend` reconciles each node against the other;
- flannel: the same scheme typed by hand with `ip`/`bridge` commands (flannel.1, VNI 1, 8472);
- veth: `198.19.<j>.0/24 via <peer underlay IP> dev eth0`, no tunnel: the physical limit here;
- flannel again: a second, identical hand-configured sandbox, the A/A control that shows how
  far two identical setups drift apart on this (shared, 2-core) machine.

iperf3 runs from pod 1 to pod 2 with 1 and 4 streams, the paths interleaved within each
repetition (and their order rotated between repetitions) so background load and position
effects hit all of them alike. Pod MTU is 1450 on the VXLAN paths and
1500 on veth (what a CNI would set). Everything runs in namespaces the benchmark created and
is removed at the end, even on failure.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv4Network

from bench.common import anchor_version, table
from tunnel.vxlan import Peer, ReconcileReport, VxlanBackend, VxlanConfig
from weavepy.devtools.sandbox import Sandbox, SandboxNode

IPERF_PORT = 5201
IGNORED_LINK_KEYS = frozenset({"ifindex", "ifname"})  # differ by design: the device's name


def _mac(index: int) -> str:
    return f"02:42:00:00:00:{index:02x}"


def _block(index: int) -> IPv4Network:
    return IPv4Network(f"198.19.{index}.0/24")


def _pod_ns(box: Sandbox, index: int) -> str:
    return f"{box.prefix}-pod{index}"


def _ip(*argv: str, timeout: float = 30) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, timeout=timeout)


def _add_pod(box: Sandbox, node: SandboxNode, mtu: int) -> None:
    """Bridge with the block gateway in the node, and one pod namespace behind it."""
    i, bridge, pod = node.index, f"{box.prefix}-br{node.index}", _pod_ns(box, node.index)
    host_side = f"{box.prefix}-vp{i}"
    _ip("netns", "add", pod)
    node.run(["ip", "link", "add", bridge, "type", "bridge"])
    node.run(["ip", "addr", "add", f"198.19.{i}.1/24", "dev", bridge])
    node.run(["ip", "link", "add", host_side, "mtu", str(mtu), "type", "veth",
              "peer", "name", "eth0", "netns", pod])  # fmt: skip
    node.run(["ip", "link", "set", host_side, "master", bridge, "up"])
    node.run(["ip", "link", "set", bridge, "up"])
    _ip("-n", pod, "link", "set", "lo", "up")
    _ip("-n", pod, "addr", "add", f"198.19.{i}.2/24", "dev", "eth0")
    _ip("-n", pod, "link", "set", "eth0", "up")
    _ip("-n", pod, "route", "add", "default", "via", f"198.19.{i}.1")


def _setup_weavepy(box: Sandbox) -> None:
    for node in box.nodes:
        other = box.nodes[2 - node.index]
        config = VxlanConfig(vtep_mac=_mac(node.index), local_ip=IPv4Address(node.underlay_ip),
                             underlay_iface=node.iface, device="weavepy.1")  # fmt: skip
        peer = Peer(other.name, IPv4Address(other.underlay_ip), _mac(other.index),
                    [_block(other.index)])  # fmt: skip
        report = VxlanBackend(config, netns=node.netns).reconcile([peer], [_block(node.index)])
        if not report.ok:
            raise RuntimeError(f"weavepy reconcile failed in {node.name}: {report.summary()}")


def _setup_flannel(box: Sandbox) -> None:
    for node in box.nodes:
        other = box.nodes[2 - node.index]
        j = other.index
        node.run(["ip", "-batch", "-"], input="\n".join([
            f"link add flannel.1 type vxlan id 1 local {node.underlay_ip} dev eth0 dstport 8472 "
            "nolearning",
            f"link set flannel.1 address {_mac(node.index)} mtu 1450 up",
            f"addr add 198.19.{node.index}.0/32 dev flannel.1",
            f"neigh replace 198.19.{j}.0 lladdr {_mac(j)} dev flannel.1 nud permanent",
            f"route replace 198.19.{j}.0/24 via 198.19.{j}.0 dev flannel.1 onlink",
        ]) + "\n")  # fmt: skip
        node.run(["bridge", "fdb", "replace", _mac(j), "dev", "flannel.1", "dst",
                  other.underlay_ip, "self", "permanent"])  # fmt: skip


def _setup_veth(box: Sandbox) -> None:
    for node in box.nodes:
        other = box.nodes[2 - node.index]
        node.run(["ip", "route", "add", str(_block(other.index)), "via", other.underlay_ip,
                  "dev", "eth0"])  # fmt: skip


def _iperf(box: Sandbox, streams: int, seconds: int) -> tuple[float, int]:
    """(Gbit/s received, TCP retransmits) from pod 1 to pod 2."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", _pod_ns(box, 2), "iperf3", "-s", "-1", "-B", "198.19.2.2",
         "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client: subprocess.CompletedProcess[str] | None = None
        for _ in range(50):  # the server needs a moment to listen
            time.sleep(0.1)
            client = subprocess.run(
                ["ip", "netns", "exec", _pod_ns(box, 1), "iperf3", "-c", "198.19.2.2",
                 "-p", str(IPERF_PORT), "-t", str(seconds), "-O", "1", "-P", str(streams),
                 "-J"],
                capture_output=True, text=True, timeout=seconds + 30,
            )  # fmt: skip
            if client.returncode == 0 or "Connection refused" not in client.stdout:
                break
        assert client is not None
        result = json.loads(client.stdout)
        if "error" in result:
            raise RuntimeError(f"iperf3: {result['error']}")
        end = result["end"]
        return end["sum_received"]["bits_per_second"] / 1e9, int(
            end["sum_sent"].get("retransmits", 0)
        )
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=5)


def _link_attributes(node: SandboxNode, device: str) -> dict[str, object]:
    """`ip -d link` and the addresses of `device`, flattened (`linkinfo.info_data.port`)."""
    doc = json.loads(node.run(["ip", "-d", "-j", "link", "show", device]).stdout)[0]
    addresses = json.loads(node.run(["ip", "-j", "addr", "show", "dev", device]).stdout)[0]
    flat: dict[str, object] = {"addresses": sorted(
        f"{a['local']}/{a['prefixlen']}" for a in addresses.get("addr_info", []))}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif prefix not in IGNORED_LINK_KEYS:
            flat[prefix] = value

    walk("", doc)
    return flat


def _compare_links(ours: Sandbox, theirs: Sandbox) -> tuple[int, list[str]]:
    """weavepy.1 against flannel.1, node by node: attributes compared, and the differences."""
    compared, differences = 0, []
    for mine, other in zip(ours.nodes, theirs.nodes, strict=True):
        a, b = _link_attributes(mine, "weavepy.1"), _link_attributes(other, "flannel.1")
        compared = max(compared, len(set(a) | set(b)))
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                differences.append(f"{mine.name} `{key}`: weavepy {a.get(key)!r}, "
                                   f"flannel {b.get(key)!r}")
    return compared, differences


def _fake_peer(i: int) -> Peer:
    """Peer number `i` (< 1600) with its own MAC, underlay address and /27 block."""
    return Peer(
        f"p{i}",
        IPv4Address(f"198.18.{1 + i // 200}.{1 + i % 200}"),
        f"02:55:00:00:{i >> 8:02x}:{i & 255:02x}",
        [IPv4Network(f"198.19.{16 + i // 8}.{(i % 8) * 32}/27")],
    )


def _reconcile_costs(counts: Sequence[int]) -> list[list[object]]:
    """Wall time of a first, a no-op and an emptying reconcile with `count` fake peers."""
    rows: list[list[object]] = []
    box = Sandbox.create(nodes=1)
    try:
        node = box.nodes[0]
        config = VxlanConfig(vtep_mac=_mac(1), local_ip=IPv4Address(node.underlay_ip),
                             device="weavepy.1")  # fmt: skip
        backend = VxlanBackend(config, netns=node.netns)
        local = [IPv4Network("198.19.1.0/24")]
        for count in counts:
            peers = [_fake_peer(i) for i in range(count)]
            passes: list[ReconcileReport] = [
                backend.reconcile(peers, local),
                backend.reconcile(peers, local),
                backend.reconcile([], local),
            ]
            for report in passes:
                if not report.ok:
                    raise RuntimeError(report.summary())
            rows.append([count, *(f"{r.duration_s * 1000:.0f}" for r in passes),
                         sum(len(r.changes) for r in passes[:1])])  # fmt: skip
    finally:
        box.destroy()
    return rows


def _paired_ratio(results: dict[tuple[str, int], list[float]], path: str, base: str,
                  streams: int) -> float:
    """Median over repetitions of path/base measured in the same repetition."""
    pairs = zip(results[(path, streams)], results[(base, streams)], strict=True)
    return statistics.median(a / b for a, b in pairs if b > 0)  # fmt: skip


def run(args: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench vxlan", description=__doc__)
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (5)")
    parser.add_argument("--seconds", type=int, default=4, help="iperf3 -t per run, 3..5 (4)")
    parser.add_argument("--peers", default="100,300,1000", help="reconcile sizes to time")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the second flannel sandbox (the A/A noise control)")  # fmt: skip
    opts = parser.parse_args(args)
    if not 3 <= opts.seconds <= 5:
        parser.error("--seconds must be within 3..5")
    if shutil.which("iperf3") is None:
        raise SystemExit("Error: bench vxlan needs iperf3 (Debian package iperf3)")

    setups: dict[str, Callable[[Sandbox], None]] = {
        "weavepy": _setup_weavepy,
        "flannel": _setup_flannel,
        "flannel again": _setup_flannel,
        "veth": _setup_veth,
    }
    paths = [p for p in setups if not (opts.no_control and p == "flannel again")]
    boxes: dict[str, Sandbox] = {}
    results: dict[tuple[str, int], list[float]] = {(p, s): [] for p in paths for s in (1, 4)}
    retrans: dict[tuple[str, int], list[int]] = {(p, s): [] for p in paths for s in (1, 4)}
    try:
        for path in paths:
            box = Sandbox.create(nodes=2)
            boxes[path] = box
            for node in box.nodes:
                _add_pod(box, node, 1500 if path == "veth" else 1450)
            setups[path](box)
        compared, differences = _compare_links(boxes["weavepy"], boxes["flannel"])
        for rep in range(opts.reps):
            shift = rep % len(paths)  # rotate the order so no path always runs first
            for path in paths[shift:] + paths[:shift]:
                for streams in (1, 4):
                    gbps, lost = _iperf(boxes[path], streams, opts.seconds)
                    results[(path, streams)].append(gbps)
                    retrans[(path, streams)].append(lost)
    finally:
        for box in boxes.values():
            box.destroy()

    med = {key: statistics.median(values) for key, values in results.items()}

    def ratios(path: str, base: str) -> str:
        return " / ".join(f"{_paired_ratio(results, path, base, s):.1%}" for s in (1, 4))

    rows = [
        [
            path,
            f"{med[(path, 1)]:.2f}",
            f"{med[(path, 4)]:.2f}",
            " / ".join(f"{v:.2f}" for v in results[(path, 1)]),
            " / ".join(f"{v:.2f}" for v in results[(path, 4)]),
            ratios(path, "flannel"),
            ratios(path, "veth"),
            f"{statistics.median(retrans[(path, 1)]):.0f}",
        ]
        for path in paths
    ]
    goal = min(_paired_ratio(results, "weavepy", "flannel", s) for s in (1, 4))
    throughput = table(
        ["path", "P1 Gbit/s (median)", "P4 Gbit/s (median)", "P1 runs", "P4 runs",
         "vs flannel P1 / P4", "vs veth P1 / P4", "P1 retransmits (median)"],
        rows,
    )  # fmt: skip
    control = ""
    if "flannel again" in paths:
        spread = min(_paired_ratio(results, "flannel again", "flannel", s) for s in (1, 4))
        control = (
            f" The A/A control (a second, identical hand-configured sandbox) lands at "
            f"{spread:.1%} of the first: differences of that size are noise on this machine."
        )
    if differences:
        links = (f"but their `ip -d link` and addresses differ ({len(differences)} of "
                 f"{compared} attributes; name and index ignored): "
                 + "; ".join(differences) + ". The ratio may show that difference")
    else:
        links = (f"and their `ip -d link` and addresses were compared attribute by attribute "
                 f"({compared} per node, name and index ignored): identical. So the ratio can "
                 f"only show setup mistakes or noise")
    sizes = [int(x) for x in opts.peers.split(",") if x.strip()]
    costs = table(
        ["peers", "first pass ms", "no-op pass ms", "remove-all pass ms", "changes (first)"],
        _reconcile_costs(sizes),
    )
    return (
        f"Pod-to-pod iperf3 TCP (`-t {opts.seconds} -O 1`) through forwarded bridges, "
        f"{opts.reps} interleaved repetitions with the path order rotated; pods, nodes and "
        f"iperf3 share the same 2 cores. Ratios are medians of per-repetition ratios.\n\n"
        f"{throughput}\n\n"
        f"weavepy vs hand-configured flannel-style VXLAN, worse of P1/P4: {goal:.1%} "
        f"(goal >= 95 %: {'met' if goal >= 0.95 else 'NOT met'}). Both run the same kernel "
        f"data path (VNI 1, port 8472, nolearning, MTU 1450), {links}.{control}\n\n"
        f"Anchor: flannel's VXLAN scheme typed by hand with `ip` and `bridge` (no flannel "
        f"binary runs: its daemon needs etcd or the Kubernetes API); kernel "
        f"{platform.release()}, {anchor_version('iproute2', ['ip', '-V'], 'iproute2')}.\n\n"
        f"Reconcile cost at scale (one node, fake peers with one /27 each; wall time of "
        f"`VxlanBackend.reconcile`, netlink dumps included):\n\n{costs}\n"
    )
