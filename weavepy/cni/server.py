"""The agent's CNI endpoint: a unix socket that answers `weavepy-cni` clients.

This module owns the socket and the dispatch of a request to a `PodNetworkBackend`. The rules
it keeps:

- **One request per connection, one answer, always.** Every failure, from undecodable bytes to
  an exception in the backend, becomes a CNI error object in the answer; a connection problem
  ends that connection only, never the server.
- **trio only moves bytes.** Parsing, dispatch and the backend's blocking kernel work run as
  one synchronous call (`answer`) on a single worker thread, so requests are serialized (the
  backend needs no locks), netlink work never blocks the event loop, and the backend always
  runs on the same thread (pyroute2 sockets are per-thread).
- **Nothing queues behind a wait.** A request that cannot be answered yet (an ADD while the
  IPAM decides a new block) raises `AnswerLater` before any kernel work; its wait runs on the
  event loop, off the worker thread, and then the request runs again from the start. A DEL
  sent meanwhile is answered at once.
- **Every answer is timed, cheaply.** A debug line per request gives the time from accept to
  reply sent and, of that, the worker thread's own work (the rest is reading the request and
  waiting for the thread); `bench cni` reads it as the agent's share of a pod's ADD.
- **The socket is private.** It is created under a temporary name, set to mode 0600 and then
  renamed into place; a live socket of another agent at the same path is never replaced.

Standalone use (tests, and an agent-less node with one static block)::

    python -m weavepy.cni.server --socket /run/weavepy/cni.sock --bridge weavepy0 \\
        --block 198.19.5.0/24 --state-dir /var/lib/weavepy/cni [--mtu 1450]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import errno
import ipaddress
import json
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio

from weavepy.cni.protocol import (
    DEFAULT_SOCKET_PATH,
    CniError,
    CniRequest,
    Command,
    ErrorCode,
    best_effort_version,
    decode_wire_request,
    encode_wire_reply,
    parse_request,
    version_reply,
)
from weavepy.cni.result import Result, render_result

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 20
READ_TIMEOUT = 10.0
WRITE_TIMEOUT = 10.0

T = TypeVar("T")
RequestObserver = Callable[[str, int, float], None]  # (command, code, seconds)


class AnswerLater(Exception):
    """Raised by a backend that cannot answer yet but may soon; it has done no kernel work.
    The server awaits `wait` on its event loop, off the worker thread, then runs the request
    again (the backend decides when to stop asking for that and fail instead)."""

    def __init__(self, wait: Callable[[], Awaitable[None]]) -> None:
        super().__init__("not yet")
        self.wait = wait


class PodNetworkBackend(Protocol):
    """What the agent does for each CNI command. Methods block; they raise `CniError`."""

    def add(self, request: CniRequest) -> Result: ...

    def delete(self, request: CniRequest) -> None: ...

    def check(self, request: CniRequest) -> None: ...

    def status(self, request: CniRequest) -> None: ...

    def gc(self, request: CniRequest) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Answer:
    command: str
    code: int
    stdout: str
    later: Callable[[], Awaitable[None]] | None = None  # await it, then ask again

    def to_wire(self) -> bytes:
        return encode_wire_reply(self.code, self.stdout)


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


def timed_answer(backend: PodNetworkBackend, data: bytes) -> tuple[Answer, float]:
    """`answer`, and the seconds it took on the worker thread (the agent's own work, without
    the wait for the thread)."""
    started = time.perf_counter()
    result = answer(backend, data)
    return result, time.perf_counter() - started


def answer(backend: PodNetworkBackend, data: bytes) -> Answer:
    """Decode one client request, run it on `backend`, and return the answer (never raises)."""
    command = "?"
    stdin = b""
    version: str | None = None
    try:
        env, stdin = decode_wire_request(data)
        command = env.get("CNI_COMMAND", "?")
        if command == Command.VERSION:
            return Answer(command, 0, _dumps(version_reply(stdin)))
        request = parse_request(env, stdin)
        version = request.config.cni_version
        stdout = ""
        if request.command is Command.ADD:
            stdout = _dumps(render_result(backend.add(request), version))
        elif request.command is Command.DEL:
            backend.delete(request)
        elif request.command is Command.CHECK:
            backend.check(request)
        elif request.command is Command.STATUS:
            backend.status(request)
        elif request.command is Command.GC:
            backend.gc(request)
        return Answer(command, 0, stdout)
    except AnswerLater as pending:
        return Answer(command, 0, "", later=pending.wait)
    except CniError as exc:
        version = version or best_effort_version(stdin)
        log.info("%s failed with code %d: %s", command, exc.code, exc)
        return Answer(command, int(exc.code), _dumps(exc.to_json(version)))
    except Exception as exc:
        log.exception("%s failed unexpectedly", command)
        error = CniError(ErrorCode.INTERNAL, "internal error in the weavepy agent",
                         f"{type(exc).__name__}: {exc}")
        return Answer(command, int(error.code), _dumps(error.to_json(version)))


class CniServer:
    """Serves `weavepy-cni` clients on a unix socket until cancelled.

    `backend_factory` runs on the worker thread before the socket opens (so the backend is
    created, used and closed on that one thread); it is the place to create the pod bridge.
    """

    def __init__(self, backend_factory: Callable[[], PodNetworkBackend],
                 socket_path: str | os.PathLike[str],
                 *, on_request: RequestObserver | None = None,
                 read_timeout: float = READ_TIMEOUT) -> None:
        self.backend_factory = backend_factory
        self.read_timeout = read_timeout
        self.socket_path = Path(socket_path)
        self.on_request = on_request
        self.backend: PodNetworkBackend | None = None
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the server's worker thread (where the backend lives) and wait.

        The wait cannot be cancelled half-way: kernel work, once started, is finished.
        """
        if self._worker is None:
            raise RuntimeError("the CNI server is not running")
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        future = self._worker.submit(fn, *args)
        future.add_done_callback(lambda _: token.run_sync_soon(done.set))
        with trio.CancelScope(shield=True):
            await done.wait()
        return future.result()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        self._worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="weavepy-cni")
        listener: trio.SocketListener | None = None
        try:
            self.backend = await self.call(self.backend_factory)
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(
                _bind_private_socket(self.socket_path)))
            log.info("CNI server listening on %s", self.socket_path)
            task_status.started()
            await trio.serve_listeners(self._handle, [listener])
        finally:
            with trio.CancelScope(shield=True):
                if listener is not None:
                    await listener.aclose()
                    with contextlib.suppress(FileNotFoundError):
                        self.socket_path.unlink()
                if self.backend is not None:
                    await self.call(self.backend.close)
            self._worker.shutdown(wait=True)
            self._worker = None

    async def _handle(self, stream: trio.SocketStream) -> None:
        started = trio.current_time()
        result: Answer | None = None
        work = 0.0
        try:
            async with stream:
                data = await self._read_request(stream)
                if data is None:
                    return
                assert self.backend is not None
                answered, work = await self.call(timed_answer, self.backend, data)
                while answered.later is not None:
                    await answered.later()  # the worker thread serves others meanwhile
                    answered, more = await self.call(timed_answer, self.backend, data)
                    work += more
                result = answered
                with trio.move_on_after(WRITE_TIMEOUT):
                    await stream.send_all(answered.to_wire())
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("CNI client went away: %s", exc)
        finally:
            if result is not None:
                elapsed = trio.current_time() - started
                log.debug("CNI %s -> code %d in %.2f ms (work %.2f ms)", result.command,
                          result.code, elapsed * 1e3, work * 1e3)
                if self.on_request is not None:
                    self.on_request(result.command, result.code, elapsed)

    async def _read_request(self, stream: trio.SocketStream) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        with trio.move_on_after(self.read_timeout) as scope:
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_REQUEST_BYTES:
                    log.warning("CNI request larger than %d bytes dropped", MAX_REQUEST_BYTES)
                    error = CniError(ErrorCode.IO_FAILURE, "request too large",
                                     f"more than {MAX_REQUEST_BYTES} bytes")
                    await stream.send_all(encode_wire_reply(int(error.code),
                                                            _dumps(error.to_json())))
                    return None
                chunks.append(chunk)
        if scope.cancelled_caught:
            log.warning("CNI client sent no complete request within %.1f s", self.read_timeout)
            return None
        return b"".join(chunks)


def _bind_private_socket(path: Path) -> socket.socket:
    """A listening unix socket at `path` with mode 0600, replacing only a stale socket."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise RuntimeError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
        else:
            raise RuntimeError(f"another process is serving {path}; is an agent running?")
        finally:
            probe.close()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tmp))
        os.chmod(tmp, 0o600)
        sock.listen(128)
        os.replace(tmp, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return sock


# --- standalone entry -------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m weavepy.cni.server",
        description="Serve weavepy-cni requests for one static pod block (no cluster).")
    parser.add_argument("--socket", default=DEFAULT_SOCKET_PATH, help="unix socket path")
    parser.add_argument("--bridge", default="weavepy0", help="pod bridge name")
    parser.add_argument("--block", required=True, type=ipaddress.IPv4Network,
                        help="pod block, e.g. 198.19.5.0/24; the bridge gets its first address")
    parser.add_argument("--state-dir", default="/var/lib/weavepy/cni", type=Path,
                        help="where pod allocations are kept")
    parser.add_argument("--mtu", type=int, default=1500, help="pod and bridge MTU")
    parser.add_argument("--gso-max-size", type=int, default=None,
                        help="gso_max_size of pod veths (at most the encrypted TUN's)")
    parser.add_argument("--gso-max-segs", type=int, default=None,
                        help="gso_max_segs of pod veths")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


async def _serve_standalone(args: argparse.Namespace) -> None:
    from weavepy.cni.backend import BridgeBackend, PodLinkSettings, StaticBlockAllocator

    def build() -> BridgeBackend:
        allocator = StaticBlockAllocator(args.block, args.state_dir)
        settings = PodLinkSettings(mtu=args.mtu, gso_max_size=args.gso_max_size,
                                   gso_max_segs=args.gso_max_segs)
        backend = BridgeBackend(allocator, bridge=args.bridge, settings=settings)
        gateway = ipaddress.IPv4Interface(f"{allocator.gateway}/{args.block.prefixlen}")
        backend.podnet.ensure_bridge(args.bridge, [gateway], args.mtu)
        return backend

    server = CniServer(build, args.socket)
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await nursery.start(server.serve)
            async for signum in signals:
                log.info("signal %d: stopping", signum)
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trio.run(_serve_standalone, args)


if __name__ == "__main__":
    main()
