"""The sandbox itself: idempotent create/teardown, no leftovers after failures or crashes, and
impairments (loss, delay, duplication, partitions, cut links) checked with real packets."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import require_root

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[1]


def _namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix + "-")]


def _ping(node, ip: str, count: int = 20, interval: float = 0.01) -> tuple[int, int, str]:
    """(sent, received, output) of a bounded ping from a sandbox node."""
    out = node.run(["ping", "-c", str(count), "-i", str(interval), "-W", "1", ip],
                   check=False, timeout=30).stdout
    match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert match, out
    return int(match.group(1)), int(match.group(2)), out


def test_create_and_destroy_are_idempotent(sandbox_factory) -> None:
    from weavepy.devtools.sandbox import Sandbox

    box = sandbox_factory(nodes=2)
    assert sorted(_namespaces(box.prefix)) == [f"{box.prefix}-hub", f"{box.prefix}-n1",
                                               f"{box.prefix}-n2"]
    sent, received, _ = _ping(box.nodes[0], box.nodes[1].underlay_ip, count=3)
    assert received == sent
    box.destroy()
    box.destroy()  # a second teardown is a no-op
    assert _namespaces(box.prefix) == []
    assert Sandbox.down(box.prefix) == []
    # the same prefix can be built again after teardown
    again = sandbox_factory(nodes=1, prefix=box.prefix)
    assert sorted(_namespaces(again.prefix)) == [f"{box.prefix}-hub", f"{box.prefix}-n1"]


def test_create_refuses_existing_prefix(sandbox_factory) -> None:
    from weavepy.devtools.sandbox import Sandbox, SandboxError

    box = sandbox_factory(nodes=1)
    with pytest.raises(SandboxError, match="already exist"):
        Sandbox.create(nodes=1, prefix=box.prefix)
    assert len(_namespaces(box.prefix)) == 2  # the refused attempt removed nothing of ours


def test_nothing_is_created_in_the_root_namespace(sandbox_factory) -> None:
    before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    box = sandbox_factory(nodes=2)
    after = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert box.prefix not in after
    assert len(after.splitlines()) == len(before.splitlines())


def test_a_failing_test_leaves_nothing_behind(pytester: pytest.Pytester) -> None:
    require_root()
    pytester.makeconftest((REPO / "tests" / "conftest.py").read_text())
    record = pytester.path / "record.json"
    pytester.makepyfile(test_fails=textwrap.dedent(f"""
        import json
        def test_fails(sandbox_factory):
            box = sandbox_factory(nodes=2)
            proc = box.nodes[0].start("sleeper", ["sleep", "300"])
            json.dump({{"prefix": box.prefix, "pid": proc.pid}}, open({str(record)!r}, "w"))
            assert False, "deliberate failure"
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q",
                                           "-o", "trio_mode=false")
    result.assert_outcomes(failed=1)
    info = json.loads(record.read_text())
    assert _namespaces(info["prefix"]) == []
    assert not Path(f"/proc/{info['pid']}").exists()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert info["prefix"] not in links


def test_down_cleans_up_after_a_crash() -> None:
    require_root()
    script = textwrap.dedent("""
        import json, os, sys
        from weavepy.devtools.sandbox import Sandbox
        box = Sandbox.create(nodes=2)
        proc = box.nodes[1].start("sleeper", ["sleep", "300"])
        print(json.dumps({"prefix": box.prefix, "pid": proc.pid}), flush=True)
        os._exit(3)  # crash: no teardown runs
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert out.returncode == 3, out.stderr
    info = json.loads(out.stdout)
    try:
        assert len(_namespaces(info["prefix"])) == 3
        assert Path(f"/proc/{info['pid']}").exists()
        cli = subprocess.run([sys.executable, "-m", "weavepy.cli", "sandbox", "down",
                              info["prefix"]], capture_output=True, text=True, cwd=REPO,
                             timeout=60)
        assert cli.returncode == 0, cli.stderr
    finally:
        from weavepy.devtools.sandbox import Sandbox

        Sandbox.down(info["prefix"])
    assert _namespaces(info["prefix"]) == []
    # the sleeper was reparented to init when its parent crashed; it is gone or a zombie
    assert _wait_state_or_gone(info["pid"])


def test_run_call_and_processes(sandbox_factory) -> None:
    box = sandbox_factory(nodes=2)
    node = box.nodes[0]
    assert node.call(_underlay_addresses) == [f"{node.underlay_ip}"]
    proc = node.start("echo", [sys.executable, "-c", "import time; print('hello', flush=True);"
                                                    "time.sleep(60)"])
    for _ in range(100):
        if "hello" in proc.log_text():
            break
        import time

        time.sleep(0.05)
    assert "hello" in proc.log_text()
    proc.pause()
    assert _wait_state(proc.pid, lambda state: state == "T")
    proc.resume()
    assert _wait_state(proc.pid, lambda state: state != "T")
    proc.stop(timeout=5)
    assert not proc.alive()
    victim = node.start("victim", ["sleep", "60"])
    victim.kill()
    assert not victim.alive() and victim.returncode == -9


def _underlay_addresses() -> list[str]:
    import ipaddress
    import socket

    # Runs inside the node: list IPv4 addresses of eth0 through the kernel's view.
    out = subprocess.run(["ip", "-j", "-4", "addr", "show", "dev", "eth0"],
                         capture_output=True, text=True, check=True).stdout
    addrs = [a["local"] for link in json.loads(out) for a in link["addr_info"]]
    assert all(ipaddress.ip_address(a) in ipaddress.ip_network("198.18.0.0/16") for a in addrs)
    assert socket.gethostname()
    return addrs


def _wait_state_or_gone(pid: int) -> bool:
    try:
        return _wait_state(pid, lambda state: state in "ZX")
    except FileNotFoundError:
        return True


def _wait_state(pid: int, wanted, tries: int = 100) -> bool:
    """Poll the process state letter until `wanted(state)` (signals land asynchronously)."""
    import time

    for _ in range(tries):
        if wanted(Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]):
            return True
        time.sleep(0.02)
    return False


def test_loss_is_applied_with_real_packets(sandbox_factory) -> None:
    box = sandbox_factory(nodes=2)
    a, b = box.nodes
    a.netem(loss=0.5)
    sent, received, _ = _ping(a, b.underlay_ip, count=200, interval=0.002)
    # 50 % each way: about 25 % of round trips survive. Far from 0 % and from 100 %.
    assert 0.05 * sent < received < 0.6 * sent
    a.clear_netem()
    sent, received, _ = _ping(a, b.underlay_ip, count=20)
    assert received == sent


def test_delay_jitter_and_duplication_with_real_packets(sandbox_factory) -> None:
    box = sandbox_factory(nodes=2)
    a, b = box.nodes
    a.netem(delay_ms=40)
    _, received, out = _ping(a, b.underlay_ip, count=5, interval=0.05)
    assert received == 5
    # The delayer got every echo request, and it releases a packet no earlier than 40 ms after
    # it got it: the fastest round trip cannot be shorter, however loaded the machine is.
    # (There is no upper bound to check: that would measure the machine, not the sandbox.)
    assert _queued(a) >= 5
    assert float(re.search(r"= ([\d.]+)/", out).group(1)) >= 40
    a.netem(duplicate=1.0)
    _, _, out = _ping(a, b.underlay_ip, count=5, interval=0.05)
    assert "DUP!" in out
    a.netem(delay_ms=30, jitter_ms=25, reorder=0.3)
    _, received, _ = _ping(a, b.underlay_ip, count=20, interval=0.01)
    assert received == 20  # delayed and reordered, not lost
    a.clear_netem()
    sent, received, _ = _ping(a, b.underlay_ip, count=3)
    assert received == sent == 3
    # cleared: no queue rule, no delayer bound to the queue, so nothing is held any more
    rules = a.run(["iptables-legacy", "-t", "mangle", "-S", "POSTROUTING"]).stdout
    assert "NFQUEUE" not in rules
    assert _queued(a) is None


def _queued(node) -> int | None:
    """Packets the kernel has handed to the delayer's NFQUEUE in `node` (the queue's last
    packet id), or None when no process is bound to the queue."""
    from weavepy.devtools.sandbox import NFQUEUE_NUM

    table = node.run(["cat", "/proc/net/netfilter/nfnetlink_queue"], check=False).stdout
    for line in table.splitlines():
        fields = line.split()
        if fields and int(fields[0]) == NFQUEUE_NUM:
            return int(fields[7])
    return None


def test_partitions_symmetric_and_asymmetric(sandbox_factory) -> None:
    box = sandbox_factory(nodes=3)
    n1, n2, n3 = box.nodes
    box.partition([n1], [n2, n3])
    assert _ping(n1, n2.underlay_ip, count=3)[1] == 0
    assert _ping(n3, n1.underlay_ip, count=3)[1] == 0
    assert _ping(n2, n3.underlay_ip, count=3)[1] == 3  # the majority still talks
    box.heal()
    assert _ping(n1, n2.underlay_ip, count=3)[1] == 3
    # asymmetric: n1 -> n2 is dropped, n2 -> n1 arrives. Check one direction with UDP.
    box.partition([n1], [n2], asymmetric=True)
    assert _udp_delivered(n1, n2) == 0
    assert _udp_delivered(n2, n1) == 10
    box.heal()
    assert _udp_delivered(n1, n2) == 10


def _udp_delivered(src, dst, count: int = 10) -> int:
    """Send `count` UDP datagrams src -> dst and count what arrives (bounded in time)."""
    receiver = dst.start("udp-recv", [sys.executable, "-c", textwrap.dedent(f"""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("{dst.underlay_ip}", 47001)); s.settimeout(1.5)
        n = 0
        try:
            while True:
                s.recv(100); n += 1
        except TimeoutError:
            pass
        print("RECEIVED", n, flush=True)
    """)])
    import time

    time.sleep(0.3)
    src.run([sys.executable, "-c", textwrap.dedent(f"""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range({count}):
            s.sendto(b"x", ("{dst.underlay_ip}", 47001))
    """)])
    receiver.wait(timeout=10)
    match = re.search(r"RECEIVED (\d+)", receiver.log_text())
    assert match, receiver.log_text()
    log_path = receiver.log_path
    log_path.unlink()
    return int(match.group(1))


def test_cut_and_restore_link(sandbox_factory) -> None:
    box = sandbox_factory(nodes=2)
    a, b = box.nodes
    a.cut()
    assert _ping(b, a.underlay_ip, count=2)[1] == 0
    a.restore()
    for _ in range(20):
        if _ping(b, a.underlay_ip, count=1)[1] == 1:
            break
    assert _ping(b, a.underlay_ip, count=3)[1] == 3


def test_cli_up_status_exec_down() -> None:
    require_root()
    cli = [sys.executable, "-m", "weavepy.cli", "sandbox"]
    up = subprocess.run([*cli, "up", "--nodes", "2"], capture_output=True, text=True,
                        cwd=REPO, timeout=60)
    assert up.returncode == 0, up.stderr
    prefix = up.stdout.strip()
    try:
        status = subprocess.run([*cli, "status", prefix, "--json"], capture_output=True,
                                text=True, cwd=REPO, timeout=60)
        nodes = json.loads(status.stdout)[0]["nodes"]
        assert [n["underlay_ip"] for n in nodes] == ["198.18.0.11", "198.18.0.12"]
        exe = subprocess.run([*cli, "exec", prefix, "n2", "--", "ip", "-4", "-o", "addr"],
                             capture_output=True, text=True, cwd=REPO, timeout=60)
        assert "198.18.0.12/24" in exe.stdout
        bad = subprocess.run([*cli, "exec", prefix, "n9", "--", "true"], capture_output=True,
                             text=True, cwd=REPO, timeout=60)
        assert bad.returncode != 0 and "Traceback" not in bad.stderr
        assert "no sandbox node" in bad.stderr
    finally:
        subprocess.run([*cli, "down", prefix], cwd=REPO, timeout=60, check=False)
    assert _namespaces(prefix) == []


def test_bad_input_is_one_readable_line() -> None:
    require_root()
    cli = [sys.executable, "-m", "weavepy.cli", "sandbox"]
    for args in (["up", "--nodes", "0"], ["up", "--prefix", "evil"], ["down"],
                 ["down", "notours"], ["status", "wpnothere"]):
        out = subprocess.run([*cli, *args], capture_output=True, text=True, cwd=REPO,
                             timeout=60)
        assert out.returncode != 0, args
        assert "Traceback" not in out.stderr, out.stderr
        assert out.stderr.strip().count("\n") <= 3, out.stderr


def test_extra_namespaces_belong_to_the_run(sandbox_factory) -> None:
    box = sandbox_factory(nodes=1)
    pod = box.add_netns("pod1")
    assert pod.netns == f"{box.prefix}-pod1"
    assert "127.0.0.1/8" in pod.addresses()
    proc = pod.start("sleeper", ["sleep", "60"])
    assert proc.alive()
    with pytest.raises(ValueError):
        box.namespace("someone-else")
    box.destroy()
    assert _namespaces(box.prefix) == []
    assert not proc.alive()


def test_the_underlay_mtu_holds_on_every_link(sandbox_factory) -> None:
    box = sandbox_factory(nodes=2, mtu=1450)
    first, second = box.nodes
    link = json.loads(first.run(["ip", "-j", "link", "show", "eth0"]).stdout)[0]
    assert link["mtu"] == 1450
    full = first.run(["ping", "-M", "do", "-c", "1", "-W", "2", "-s", "1422",
                      second.underlay_ip], check=False)
    assert full.returncode == 0, full.stdout + full.stderr
    over = first.run(["ping", "-M", "do", "-c", "1", "-W", "2", "-s", "1423",
                      second.underlay_ip], check=False)
    assert over.returncode != 0 and "mtu=1450" in over.stdout + over.stderr


def test_static_neighbours_pin_the_underlay_without_arp(sandbox_factory) -> None:
    """Every node knows every other node's underlay MAC as a permanent entry, so traffic on the
    underlay resolves nothing (nothing counts against the kernel's shared neighbour-table cap)."""
    box = sandbox_factory(nodes=3, static_neighbours=True)
    for node in box.nodes:
        for peer in box.nodes:
            if peer is not node:
                sent, received, out = _ping(node, peer.underlay_ip, count=2)
                assert received == sent, out
    for node in box.nodes:
        entries = json.loads(node.run(["ip", "-j", "neigh", "show", "dev", "eth0"]).stdout)
        others = {peer.underlay_ip for peer in box.nodes if peer is not node}
        assert sorted((e["dst"], e.get("state")) for e in entries) == sorted(
            (ip, ["PERMANENT"]) for ip in others)
