"""The in-process data plane (device._ThreadPlane, threads.py): one plain thread beside trio.

Real UDP sockets on loopback and a pipe standing in for the TUN (no device, no namespace),
the owner a recorder of what reaches the control plane: an engine that raises costs one read
and the thread goes on; a thread that dies fails the plane with the reason instead of leaving
half a device; closing stops the thread and releases every fd it opened; handshake messages
reach the control plane from the thread. Then a real interface in a sandbox node: cancelled,
it leaves no thread and no fd behind; with its TUN device deleted under it, it fails visibly.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from tunnel.wireguard.device import _ThreadPlane
from tunnel.wireguard.messages import MESSAGE_INITIATION
from tunnel.wireguard.plane import PlaneConfig


class Owner:
    """Stands in for WireGuardInterface: records what the plane hands to the control plane."""

    def __init__(self) -> None:
        self.datagrams: list[tuple[bytes, object]] = []
        self.reports: list[object] = []

    def handle_datagram(self, data: bytes, origin: object) -> None:
        self.datagrams.append((data, origin))

    def handle_reports(self, reports: object) -> None:
        self.reports.append(reports)


class Rig:
    def __init__(self) -> None:
        self.receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.receiver.bind(("127.0.0.1", 0))
        self.sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tun_read, self.tun_write = os.pipe()
        self.plane = _ThreadPlane(self.tun_read, self.receiver, PlaneConfig())
        self.owner = Owner()

    def send(self, data: bytes) -> None:
        self.sender.sendto(data, self.receiver.getsockname())

    def close(self) -> None:
        for fd in (self.tun_read, self.tun_write):
            os.close(fd)
        self.receiver.close()
        self.sender.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    made = Rig()
    yield made
    made.close()


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _data_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "wg-data"]


async def _until(predicate: Any, what: str) -> None:
    with trio.fail_after(5):
        while not predicate():
            await trio.sleep(0.01)


@pytest.mark.timeout(20)
async def test_an_engine_that_raises_loses_one_read_not_the_data_path(
    rig: Rig, caplog: Any, monkeypatch: Any
) -> None:
    """Defence in depth for engine bugs (like the 1-byte 0x77 datagram the fuzzer found): the
    engine counts an exception of its own as a drop, and the thread reads on."""
    calls = []

    def explode(*args: object) -> list[bytes]:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("engine bug")
        return []

    monkeypatch.setattr(rig.plane.rx, "_process", explode)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.plane.serve, rig.owner)
        for _ in range(2):
            rig.send(b"\x04" + bytes(40))
        await _until(lambda: len(calls) >= 2, "two reads")
        nursery.cancel_scope.cancel()
    await rig.plane.close()
    assert rig.plane.rx.counters["engine_error_rx"] == 1
    assert "the rx engine failed on one read" in caplog.text


@pytest.mark.timeout(20)
async def test_handshake_messages_reach_the_control_plane_from_the_thread(rig: Rig) -> None:
    initiation = bytes([MESSAGE_INITIATION, 0, 0, 0]) + bytes(144)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.plane.serve, rig.owner)
        rig.send(initiation)
        await _until(lambda: rig.owner.datagrams, "the initiation")
        nursery.cancel_scope.cancel()
    await rig.plane.close()
    ((data, origin),) = rig.owner.datagrams
    assert data == initiation and origin == ("127.0.0.1", rig.sender.getsockname()[1])


@pytest.mark.timeout(20)
async def test_closing_stops_the_thread_and_releases_its_fds(rig: Rig) -> None:
    before = _open_fds()
    plane = _ThreadPlane(rig.tun_read, rig.receiver, PlaneConfig())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(plane.serve, rig.owner)
        await _until(lambda: _data_threads(), "the thread")
        os.write(rig.tun_write, b"not an IP packet")  # the TX side reads and drops it
        await _until(lambda: plane.tx.counters["tun_truncated"], "the TUN read")
        nursery.cancel_scope.cancel()
    await plane.close()
    assert _data_threads() == []
    assert _open_fds() == before, "the plane left an fd open (its eventfd?)"


@pytest.mark.timeout(20)
async def test_a_dead_thread_fails_the_plane_with_its_reason(
    rig: Rig, caplog: Any, monkeypatch: Any
) -> None:
    """Not a bad packet (the engines count those) but a broken fd or a bug in the loop: the
    thread ends, and serve() raises so the owner restarts the interface visibly."""

    def broken(now: float) -> None:
        raise OSError(9, "Bad file descriptor")

    tx_side = rig.plane._thread.tx
    monkeypatch.setattr(tx_side, "read", broken)
    with pytest.raises(ExceptionGroup) as failed:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rig.plane.serve, rig.owner)
            os.write(rig.tun_write, b"x")
    await rig.plane.close()
    (error,) = failed.value.exceptions
    assert isinstance(error, RuntimeError)
    assert str(error) == "wg data-plane thread failed: OSError(9, 'Bad file descriptor')"
    assert _data_threads() == []
    assert "wg data-plane thread wg-data failed" in caplog.text



def _interface_lifecycle(delete_device: bool) -> dict[str, Any]:
    """Run in a sandbox node (call_in_netns): a real interface with its data-plane thread,
    stopped by cancellation or broken by deleting its TUN device under it."""
    import subprocess

    from tunnel.wireguard.device import InterfaceConfig, WireGuardInterface
    from tunnel.wireguard.keys import PrivateKey

    before = _open_fds()
    found: dict[str, Any] = {}

    async def main() -> None:
        config = InterfaceConfig(
            name="wgthr0", private_key=PrivateKey.generate(), listen_port=51999, workers=False
        )
        interface = WireGuardInterface(config)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(interface.run)
                await _until(_data_threads, "the data-plane thread")
                found["running"] = [t.name for t in _data_threads()]
                if delete_device:
                    subprocess.run(["ip", "link", "del", "wgthr0"], check=True, timeout=10)
                    await trio.sleep(5)  # the plane fails long before this
                    found["survived_deletion"] = True
                nursery.cancel_scope.cancel()
        except Exception as exc:  # an ExceptionGroup from the nursery
            found["error"] = repr(exc.exceptions[0] if isinstance(exc, ExceptionGroup) else exc)

    trio.run(main)
    found["after"] = [t.name for t in _data_threads()]
    found["leaked_fds"] = sorted(_open_fds() - before)
    return found


@pytest.mark.netns
@pytest.mark.timeout(60)
@pytest.mark.parametrize("delete_device", [False, True], ids=["cancelled", "device-deleted"])
def test_a_real_interface_stops_its_thread_or_fails_visibly(
    sandbox_factory: Any, delete_device: bool
) -> None:
    from weavepy.devtools.sandbox import call_in_netns

    box = sandbox_factory(nodes=1)
    found = call_in_netns(box.nodes[0].netns, _interface_lifecycle, delete_device, timeout=40)
    assert found["running"] == ["wg-data"]
    assert found["after"] == [] and found["leaked_fds"] == [], found
    if delete_device:
        assert "survived_deletion" not in found, "the data plane went on without its device"
        assert "wg data-plane thread failed" in found["error"], found
    else:
        assert "error" not in found, found


@pytest.mark.netns
@pytest.mark.peer
@pytest.mark.timeout(90)
def test_the_thread_plane_rekeys_under_pings_against_wireguard_go_and_loses_none(
    sandbox_factory: Any, tmp_path: Any
) -> None:
    """The agent's data plane (workers=False) against Debian's wireguard-go, with timers short
    enough for several rekeys during 300 pings 20 ms apart: a keypair command reaches the
    thread through its queue while it reads, and no ping may be lost (a fixed count and a
    loss count: unlike TCP, nothing retransmits behind our back)."""
    from tests.tunnel.test_wireguard_interop import THEIRS, Pair

    timers = {
        "rekey_after_time": 1.5,
        "reject_after_time": 3.0,
        "keepalive_timeout": 1.0,
        "rekey_timeout": 1.0,
    }
    pair = Pair(sandbox_factory(nodes=2), tmp_path, workers=False, timers=timers)
    assert pair.ping(pair.n1, THEIRS)
    before = pair.handshakes()
    result = pair.n1.run(
        ["ping", "-n", "-c", "300", "-i", "0.02", "-q", THEIRS], check=False, timeout=40
    )
    assert "\n300 packets transmitted, 300 received," in result.stdout, result.stdout
    assert pair.handshakes() >= before + 2, "fewer than 2 rekeys during the pings"
    assert not pair.ours.status()["drops"].get("engine_error_rx")
