"""A stand-in for the Kubernetes API server, run inside one sandbox node by the agent tests.

No API server can run on this machine (tests/deploy/kube_api/README.md), so the agent tests of
`--kube-peers` talk to this instead: the replay server of tests/deploy/kube_replay.py (HTTPS on
127.0.0.1 with a throw-away CA, bearer-token check) serving a live node table rather than
recorded answers: `GET /api/v1/nodes` lists it, `?watch=true` streams its changes as they
happen, and the NetworkUnavailable patch is accepted; Pods, Namespaces and NetworkPolicies
(what the agent's NetworkPolicy source lists and watches) are served as empty lists. The test
changes the table by appending commands to a file the stand-in follows, one JSON object a line:

    {"op": "add", "name": "n3", "address": "198.18.0.13"}     ADDED (MODIFIED if it exists)
    {"op": "delete", "name": "n3"}                            DELETED

Each node's agent gets its own stand-in inside that node's network namespace (on 127.0.0.1,
so no test traffic leaves the namespace), which lets a test show a deletion to some agents and
not to others, as an API server that part of the cluster cannot reach would.

Run: python -m tests.agent.kube_standin CERT KEY TOKEN COMMANDS PORT_FILE
(it writes the port it listens on to PORT_FILE once it serves).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.deploy.kube_replay import ReplayApi, serve_replay

POLL = 0.05  # seconds between looks at the command file


def node_object(name: str, address: str, version: int) -> dict[str, Any]:
    """A Node in the API's wire shape, with what weavepy reads of it."""
    return {"kind": "Node", "apiVersion": "v1",
            "metadata": {"name": name, "resourceVersion": str(version)},
            "status": {"addresses": [{"type": "InternalIP", "address": address},
                                     {"type": "Hostname", "address": name}]}}


class LiveApi(ReplayApi):
    """The replay server over a node table that changes while agents watch it."""

    def __init__(self, token: str) -> None:
        super().__init__(token)
        self.nodes: dict[str, dict[str, Any]] = {}
        self.version = 100
        self.watchers: list[trio.MemorySendChannel[dict[str, Any]]] = []

    def app(self) -> Starlette:
        async def nodes(request: Request) -> Response:
            denied = await self._record(request)
            if denied is not None:
                return denied
            if request.query_params.get("watch") in ("true", "1"):
                return self._live_watch()
            return JSONResponse({"kind": "NodeList", "apiVersion": "v1",
                                 "metadata": {"resourceVersion": str(self.version)},
                                 "items": list(self.nodes.values())})

        async def node_status(request: Request) -> Response:
            denied = await self._record(request)
            if denied is not None:
                return denied
            return JSONResponse(self.nodes.get(request.path_params["name"], {}))

        def empty(kind: str) -> Any:
            async def listing(request: Request) -> Response:
                denied = await self._record(request)
                if denied is not None:
                    return denied
                if request.query_params.get("watch") in ("true", "1"):
                    return StreamingResponse(_quiet_stream(), media_type="application/json")
                return JSONResponse({"kind": f"{kind}List", "apiVersion": "v1",
                                     "metadata": {"resourceVersion": str(self.version)},
                                     "items": []})

            return listing

        return Starlette(routes=[
            Route("/api/v1/nodes", nodes, methods=["GET"]),
            Route("/api/v1/nodes/{name}/status", node_status, methods=["PATCH"]),
            # what the agent's NetworkPolicy source lists and watches: nothing, here
            Route("/api/v1/pods", empty("Pod"), methods=["GET"]),
            Route("/api/v1/namespaces", empty("Namespace"), methods=["GET"]),
            Route("/apis/networking.k8s.io/v1/networkpolicies", empty("NetworkPolicy"),
                  methods=["GET"]),
        ])

    def _live_watch(self) -> Response:
        send, receive = trio.open_memory_channel[dict[str, Any]](256)
        self.watchers.append(send)

        async def stream() -> Any:
            async with receive:
                async for event in receive:
                    yield json.dumps(event) + "\n"

        return StreamingResponse(stream(), media_type="application/json")

    def apply(self, command: dict[str, Any]) -> None:
        self.version += 1
        name = command["name"]
        if command["op"] == "add":
            kind = "MODIFIED" if name in self.nodes else "ADDED"
            node = node_object(name, command["address"], self.version)
            self.nodes[name] = node
        else:
            node = self.nodes.pop(name)
            node["metadata"]["resourceVersion"] = str(self.version)
            kind = "DELETED"
        for send in list(self.watchers):
            try:
                send.send_nowait({"type": kind, "object": node})
            except (trio.BrokenResourceError, trio.WouldBlock):
                self.watchers.remove(send)


async def _quiet_stream() -> Any:
    """A watch on which nothing happens (until the client ends it)."""
    await trio.sleep_forever()
    yield ""


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


if __name__ == "__main__":
    cert, key, token, commands, port_file = sys.argv[1:6]
    trio.run(main, Path(cert), Path(key), token, Path(commands), Path(port_file))
