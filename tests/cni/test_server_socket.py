"""The CNI server's socket handling, in-process under trio, with the real backend: mode 0600,
stale and live sockets, oversized, malformed and silent clients, the request observer, and
clean shutdown. No request here reaches the kernel beyond a read-only link lookup (STATUS for
a bridge that does not exist), so these run without a sandbox."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest
import trio

from weavepy.cni.backend import BridgeBackend, StaticBlockAllocator
from weavepy.cni.server import MAX_REQUEST_BYTES, CniServer

pytestmark = pytest.mark.timeout(60)

BRIDGE = "wpcnitest0"  # never created: STATUS must find it missing


def _server(tmp_path: Path, **kwargs: object) -> CniServer:
    import ipaddress

    def build() -> BridgeBackend:
        allocator = StaticBlockAllocator(ipaddress.IPv4Network("198.19.9.0/24"),
                                         tmp_path / "state")
        return BridgeBackend(allocator, bridge=BRIDGE)

    return CniServer(build, tmp_path / "run" / "cni.sock", **kwargs)  # type: ignore[arg-type]


async def _ask(path: Path, payload: bytes) -> dict[str, object]:
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(payload)
        await stream.send_eof()
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    reply: dict[str, object] = json.loads(data)
    return reply


def _wire(env: dict[str, str], stdin: str) -> bytes:
    return json.dumps({"wire": 1, "env": env, "stdin": stdin}).encode()


async def test_socket_serves_answers_and_goes_away(tmp_path: Path) -> None:
    seen: list[tuple[str, int]] = []
    server = _server(tmp_path, on_request=lambda cmd, code, secs: seen.append((cmd, code)))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        path = server.socket_path
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

        reply = await _ask(path, _wire({"CNI_COMMAND": "VERSION"}, '{"cniVersion":"0.3.1"}'))
        assert reply["code"] == 0
        assert json.loads(str(reply["stdout"]))["cniVersion"] == "0.3.1"

        conf = json.dumps({"cniVersion": "1.1.0", "name": "weavepy", "type": "weavepy-cni"})
        reply = await _ask(path, _wire({"CNI_COMMAND": "STATUS"}, conf))
        assert reply["code"] == 50
        assert BRIDGE in json.loads(str(reply["stdout"]))["details"]

        reply = await _ask(path, b"\x00 not json")
        assert reply["code"] == 6

        reply = await _ask(path, b"x" * (MAX_REQUEST_BYTES + 1))
        assert reply["code"] == 5
        nursery.cancel_scope.cancel()
    assert not server.socket_path.exists()
    assert seen == [("VERSION", 0), ("STATUS", 50), ("?", 6)]


async def test_silent_client_is_dropped_and_others_are_served(tmp_path: Path) -> None:
    server = _server(tmp_path, read_timeout=0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        silent = await trio.open_unix_socket(str(server.socket_path))
        reply = await _ask(server.socket_path, _wire({"CNI_COMMAND": "VERSION"}, ""))
        assert reply["code"] == 0  # served while the silent client still holds its socket
        with trio.fail_after(5):
            assert await silent.receive_some(100) == b""  # closed after read_timeout
        await silent.aclose()
        nursery.cancel_scope.cancel()


async def test_stale_socket_is_replaced_and_live_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "run" / "cni.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crashed agent leaves
    server = _server(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        assert (await _ask(path, _wire({"CNI_COMMAND": "VERSION"}, "")))["code"] == 0
        second = _server(tmp_path)
        with pytest.raises(RuntimeError, match="another process is serving"):
            await second.serve()
        assert (await _ask(path, _wire({"CNI_COMMAND": "VERSION"}, "")))["code"] == 0
        nursery.cancel_scope.cancel()
    assert not [p for p in path.parent.iterdir()]  # no temporary names left behind


async def test_a_file_in_the_way_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "run" / "cni.sock"
    path.parent.mkdir()
    path.write_text("not a socket")
    with pytest.raises(RuntimeError, match="not a socket"):
        await _server(tmp_path).serve()
    assert path.read_text() == "not a socket"
    assert os.listdir(path.parent) == ["cni.sock"]
