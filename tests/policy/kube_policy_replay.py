"""A stand-in for the Kubernetes API server (none can run here) serving NetworkPolicy, Pod
and Namespace lists and watches from scripts, over HTTPS on 127.0.0.1, checking the bearer
token like the API server. It extends tests/deploy/kube_replay.py (nodes) to the three kinds
policy reads; the objects are built by the tests in the API server's wire shape (v1.31)."""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.deploy.kube_replay import Seen, Watch

PATHS = {"NetworkPolicy": "/apis/networking.k8s.io/v1/networkpolicies",
         "Pod": "/api/v1/pods", "Namespace": "/api/v1/namespaces"}
LIST_KIND = {"NetworkPolicy": ("NetworkPolicyList", "networking.k8s.io/v1"),
             "Pod": ("PodList", "v1"), "Namespace": ("NamespaceList", "v1")}


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def listing(kind: str, version: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    list_kind, api_version = LIST_KIND[kind]
    return {"kind": list_kind, "apiVersion": api_version,
            "metadata": {"resourceVersion": version}, "items": items}


class PolicyReplayApi:
    """Scripts per kind: `lists[kind]` answers in order (the last repeats; a Watch with
    `status` is an error answer), `watches[kind]` likewise; when a kind's watch script runs
    out the stream stays open, like a quiet cluster."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.lists: dict[str, deque[Any]] = {kind: deque() for kind in PATHS}
        self.watches: dict[str, deque[Watch]] = {kind: deque() for kind in PATHS}
        self.seen: list[Seen] = []

    def app(self) -> Starlette:
        routes = []
        for kind, path in PATHS.items():
            async def endpoint(request: Request, kind: str = kind) -> Response:
                self.seen.append(Seen(request.method, request.url.path,
                                      dict(request.query_params),
                                      {k.lower(): v for k, v in request.headers.items()},
                                      await request.body()))
                if request.headers.get("authorization") != f"Bearer {self.token}":
                    return JSONResponse(status(401, "Unauthorized", "Unauthorized"), 401)
                if request.query_params.get("watch") in ("true", "1"):
                    return self._watch(kind)
                answers = self.lists[kind]
                answer = answers.popleft() if len(answers) > 1 else answers[0]
                if isinstance(answer, Watch):
                    return JSONResponse(answer.body, status_code=answer.status or 500)
                return JSONResponse(answer)
            routes.append(Route(path, endpoint, methods=["GET"]))
        return Starlette(routes=routes)

    def _watch(self, kind: str) -> Response:
        script = self.watches[kind].popleft() if self.watches[kind] else Watch(hang=True)
        if script.status is not None:
            return JSONResponse(script.body, status_code=script.status)

        async def stream() -> Any:
            for line in script.lines:
                yield (line if isinstance(line, str) else json.dumps(line)) + "\n"
                await trio.sleep(0)
            if script.hang:
                await trio.sleep_forever()

        return StreamingResponse(stream(), media_type="application/json")

    def requests(self, kind: str, *, watch: bool | None = None) -> list[Seen]:
        return [s for s in self.seen if s.path == PATHS[kind]
                and (watch is None or (s.query.get("watch") == "true") == watch)]
