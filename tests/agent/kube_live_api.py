"""A stand-in for the Kubernetes API server that agents in sandbox nodes talk to.

No API server can run on this machine (tests/deploy/kube_api/README.md), so agent tests of
`--kube-peers` and `--ipam kubernetes` talk to this: the replay server of
tests/deploy/kube_replay.py (HTTPS with a throw-away CA, bearer-token check, every request
recorded) serving a *live* Node table instead of recorded answers. `GET /api/v1/nodes` lists
it; `?watch=true` streams its changes as they happen, from the `resourceVersion` asked for (the
events since then first, as the API server does); the NetworkUnavailable patch is accepted.

Each node's agent gets its own stand-in inside that node's network namespace, on 127.0.0.1, so
no test traffic leaves the namespace. Each stand-in follows a command file of its own, so a
test can show a change to some agents and not to others, as an API server that part of the
cluster cannot reach would; by default a change goes to every node's file. Pods, Namespaces
and NetworkPolicies (what the agent's policy source lists and watches) are served empty. One
JSON object a line:

    {"op": "put", "node": NODE}        ADDED (MODIFIED if a node of that name exists)
    {"op": "delete", "name": NAME}     DELETED

`LiveKube` (the test's side) starts the stand-ins, writes each agent's kubeconfig and appends
the commands. The stand-in process: python -m tests.agent.kube_live_api CERT KEY TOKEN
COMMANDS PORT_FILE (it writes its port to PORT_FILE once it serves).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.deploy.kube_replay import ReplayApi, make_ca_and_server_cert, serve_replay

if TYPE_CHECKING:
    from weavepy.devtools.sandbox import ManagedProcess, SandboxNode

POLL = 0.05  # seconds between looks at the command file
TOKEN = "eyJhbGciOiJSUzI1NiJ9.sandbox-standin"
REPO = Path(__file__).resolve().parents[2]


def node_object(name: str, address: str, pod_cidrs: Sequence[str] = ()) -> dict[str, Any]:
    """A Node as the API sends it, with what weavepy reads: its InternalIP and, once
    kube-controller-manager allocated one, its podCIDR(s)."""
    spec: dict[str, Any] = {"providerID": f"standin://{name}"}
    if pod_cidrs:
        spec["podCIDR"], spec["podCIDRs"] = pod_cidrs[0], list(pod_cidrs)
    return {"kind": "Node", "apiVersion": "v1", "metadata": {"name": name}, "spec": spec,
            "status": {"addresses": [{"type": "InternalIP", "address": address},
                                     {"type": "Hostname", "address": name}]}}


class LiveApi(ReplayApi):
    """The replay server over a Node table that changes while agents watch it."""

    def __init__(self, token: str) -> None:
        super().__init__(token)
        self.nodes: dict[str, dict[str, Any]] = {}
        self.version = 100
        self.log: list[tuple[int, dict[str, Any]]] = []  # (version, watch event)
        self.watchers: list[trio.MemorySendChannel[dict[str, Any]]] = []

    def app(self) -> Starlette:
        async def nodes(request: Request) -> Response:
            denied = await self._record(request)
            if denied is not None:
                return denied
            if request.query_params.get("watch") in ("true", "1"):
                return self._live_watch(request.query_params.get("resourceVersion"))
            return JSONResponse({"kind": "NodeList", "apiVersion": "v1",
                                 "metadata": {"resourceVersion": str(self.version)},
                                 "items": list(self.nodes.values())})

        async def node_status(request: Request) -> Response:
            denied = await self._record(request)
            if denied is not None:
                return denied
            return JSONResponse(self.nodes.get(request.path_params["name"], {}))

        return Starlette(routes=[
            Route("/api/v1/nodes", nodes, methods=["GET"]),
            Route("/api/v1/nodes/{name}/status", node_status, methods=["PATCH"]),
            *self.policy_routes(),
        ])

    def _live_watch(self, since: str | None) -> Response:
        send, receive = trio.open_memory_channel[dict[str, Any]](1024)
        if since is not None and since.isdigit():
            for version, event in self.log:
                if version > int(since):
                    send.send_nowait(event)
        self.watchers.append(send)

        async def stream() -> Any:
            async with receive:
                async for event in receive:
                    yield json.dumps(event) + "\n"

        return StreamingResponse(stream(), media_type="application/json")

    def apply(self, command: dict[str, Any]) -> None:
        self.version += 1
        if command["op"] == "put":
            node = json.loads(json.dumps(command["node"]))
            name = node["metadata"]["name"]
            kind = "MODIFIED" if name in self.nodes else "ADDED"
            self.nodes[name] = node
        else:
            node = self.nodes.pop(command["name"])
            kind = "DELETED"
        node["metadata"]["resourceVersion"] = str(self.version)
        event = {"type": kind, "object": node}
        self.log.append((self.version, event))
        for send in list(self.watchers):
            try:
                send.send_nowait(event)
            except (trio.BrokenResourceError, trio.WouldBlock):
                self.watchers.remove(send)


async def follow_commands(api: LiveApi, path: Path) -> None:
    """Apply each complete line appended to `path`, forever."""
    offset = 0
    while True:
        data = path.read_bytes() if path.exists() else b""
        end = data.rfind(b"\n") + 1
        for line in data[offset:end].splitlines():
            if line.strip():
                api.apply(json.loads(line))
        offset = max(offset, end)
        await trio.sleep(POLL)


async def main(cert: Path, key: Path, token: str, commands: Path, port_file: Path) -> None:
    api = LiveApi(token)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow_commands, api, commands)
        port: int = await nursery.start(serve_replay, api, cert, key)
        port_file.write_text(f"{port}\n")


class LiveKube:
    """The test's side: one stand-in per node (`serve`), each agent's kubeconfig, and the
    commands that change the Node table, for every node or only the nodes `seen_by` names."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca, self.cert, self.key = make_ca_and_server_cert(directory)
        self.history: list[dict[str, Any]] = []  # what every node was told, for late starters
        self.standins: dict[str, ManagedProcess] = {}

    def put(self, name: str, address: str, pod_cidrs: Sequence[str] = (),
            seen_by: Sequence[SandboxNode] | None = None) -> None:
        self._tell({"op": "put", "node": node_object(name, address, pod_cidrs)}, seen_by)

    def delete(self, name: str, seen_by: Sequence[SandboxNode] | None = None) -> None:
        self._tell({"op": "delete", "name": name}, seen_by)

    def kubeconfig(self, node: SandboxNode) -> Path:
        """Where `serve` wrote the kubeconfig of `node`'s agent."""
        return self.directory / f"{node.name}.kubeconfig"

    def _commands(self, name: str) -> Path:
        return self.directory / f"{name}.commands.jsonl"

    def _tell(self, command: dict[str, Any], seen_by: Sequence[SandboxNode] | None) -> None:
        if seen_by is None:
            self.history.append(command)
        names = list(self.standins) if seen_by is None else [node.name for node in seen_by]
        for name in names:
            with self._commands(name).open("a") as out:
                out.write(json.dumps(command) + "\n")

    def serve(self, node: SandboxNode, timeout: float = 30) -> Path:
        """Start the stand-in inside `node` (it first hears every change told to all nodes so
        far); the kubeconfig its agent is to use."""
        port_file = self.directory / f"{node.name}.port"
        port_file.unlink(missing_ok=True)
        self._commands(node.name).write_text(
            "".join(json.dumps(command) + "\n" for command in self.history))
        self.standins[node.name] = node.start("kube-api", [
            sys.executable, "-m", "tests.agent.kube_live_api", str(self.cert), str(self.key),
            TOKEN, str(self._commands(node.name)), str(port_file)], cwd=str(REPO))
        deadline = time.monotonic() + timeout
        while not port_file.exists() or not port_file.read_text().endswith("\n"):
            if not self.standins[node.name].alive() or time.monotonic() > deadline:
                raise AssertionError(f"the API stand-in in {node.name} did not start:\n"
                                     + self.standins[node.name].log_text()[-2000:])
            time.sleep(0.05)
        kubeconfig = self.kubeconfig(node)
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {
                "server": f"https://127.0.0.1:{int(port_file.read_text())}",
                "certificate-authority": str(self.ca)}}],
            "users": [{"name": "weavepy", "user": {"token": TOKEN}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin",
                                                         "user": "weavepy"}}]}))
        return kubeconfig

    def stop(self, node: SandboxNode) -> None:
        """The API becomes unreachable from `node` (its stand-in stops)."""
        self.standins[node.name].kill()


if __name__ == "__main__":
    cert_arg, key_arg, token_arg, commands_arg, port_arg = sys.argv[1:6]
    trio.run(main, Path(cert_arg), Path(key_arg), token_arg, Path(commands_arg), Path(port_arg))
