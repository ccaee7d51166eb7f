"""The agent's local HTTP API: a small Starlette app served by hypercorn's trio worker.

This module owns the HTTP surface (routes, request parsing, status codes, JSON shapes) and
nothing else: every answer comes from an `AgentControl`, the narrow interface that
weavepy.control's `NodeControl` implements. The documented contract is docs/api.md.

The rules it keeps:

* It listens on loopback only (the configuration refuses anything else), like Weave's
  127.0.0.1:6784. Loopback is not enough on its own (hostNetwork with `route_localnet=1`
  makes 127.0.0.1 reachable from the network), so **every request that is not a GET needs
  the API token** (weavepy.apitoken): `Authorization: Bearer <token>`, else 401. The rule is
  structural: `build_app` puts the check in front of every route whose method is not GET,
  so a new endpoint that changes the node cannot forget it. GETs (status, report, pods,
  health, readiness) stay open on loopback, so probes and `weavepy status` work
  unprivileged; they show nothing secret (the configuration's secrets are masked).
* Every error is JSON `{"error": "<one readable sentence>"}` with a fitting status code, so
  the CLI can print it as one line. The node refuses requests with weavepy.control's domain
  errors, and `CONTROL_ERROR_STATUS` is the one place that maps them to codes (400 invalid,
  404 not found, 409 conflict, 503 unavailable); what this module refuses itself (an
  unreadable, oversized or wrongly typed body) is an `ApiError` with its code.
* Handlers do no blocking work; what takes time (a join, an rmpeer decision) is awaited on the
  agent's trio loop, bounded by the agent.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import urllib.parse
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Protocol

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from weavepy.apitoken import TOKEN_FILE, bearer_matches
from weavepy.control import Conflict, ControlError, Invalid, NotFound, Unavailable

__all__ = ["CONTROL_ERROR_STATUS", "AgentControl", "ApiError", "build_app", "build_metrics_app",
           "check_bindable", "serve_api"]

log = logging.getLogger(__name__)

# The HTTP status code of each kind of request the node refuses (weavepy.control).
CONTROL_ERROR_STATUS: dict[type[ControlError], int] = {
    Invalid: 400,
    NotFound: 404,
    Conflict: 409,
    Unavailable: 503,
}


class ApiError(Exception):
    """A request this module refuses before the node sees it; `status` is the HTTP code, the
    message one sentence."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class AgentControl(Protocol):
    """What the API needs from the agent."""

    def status(self) -> dict[str, Any]: ...

    async def pods(self) -> list[dict[str, Any]]:
        """Every pod attachment on this node (docs/api.md, `GET /pods`)."""
        ...

    def readiness(self) -> tuple[bool, list[str]]:
        """(ready, reasons it is not ready)."""
        ...

    async def connect(self, peers: list[str], replace: bool) -> dict[str, Any]: ...

    def forget(self, peers: list[str]) -> dict[str, Any]: ...

    async def rmpeer(self, name: str, force: bool) -> dict[str, Any]: ...

    async def reload_keyring(self) -> dict[str, Any]:
        """Read the gossip keyring file again and use it as it now is."""

    async def leave(self) -> dict[str, Any]:
        """Give this node's address space back to the cluster (by quorum)."""
        ...

    def request_stop(self, leave: bool = True) -> None: ...

    def wg_config(self, name: str) -> str:
        """The wg-quick configuration of external peer `name`."""
        ...

    def add_external(self, raw: object) -> dict[str, Any]: ...

    def remove_external(self, name: str) -> dict[str, Any]: ...

    async def policy(self) -> dict[str, Any]:
        """NetworkPolicy on this node: source, policies, isolated pods, drops (`GET /policy`)."""
        ...

    def explain(self, src: str, dst: str, port: str) -> dict[str, Any]:
        """The verdict on one connection, and the policies that decided it."""
        ...


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _truthy(text: str | None) -> bool:
    return (text or "").lower() in ("1", "true", "yes", "on")


async def _peer_list(request: Request) -> tuple[list[str], bool]:
    """Peers and `replace` from a JSON body ({"peers": [...], "replace": bool}), a form or the
    query string (Weave's `peer=...&replace=true`)."""
    replace = _truthy(request.query_params.get("replace"))
    peers = list(request.query_params.getlist("peer"))
    body = await request.body()
    if len(body) > 65536:
        raise ApiError(413, "request body larger than 64 KiB")
    content_type = request.headers.get("content-type", "")
    if body and "json" in content_type:
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ApiError(400, 'the body must be a JSON object like {"peers": ["host:port"]}')
        raw = doc.get("peers", [])
        if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
            raise ApiError(400, '"peers" must be a list of strings')
        peers.extend(raw)
        replace = replace or bool(doc.get("replace", False))
    elif body:
        form = _urlencoded_form(body, content_type)
        peers.extend(form.get("peer", []))
        replace = replace or _truthy(form.get("replace", [""])[-1])
    return peers, replace


def _urlencoded_form(body: bytes, content_type: str) -> dict[str, list[str]]:
    """Weave's form style (`peer=a&peer=b`), parsed with the standard library.

    Only urlencoded bodies (or bodies without a content type, as curl -d sends) are forms here;
    anything else gets a 415 that names the two accepted formats."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type not in ("", "application/x-www-form-urlencoded"):
        raise ApiError(415, f"unsupported body type {media_type!r}: send JSON "
                            '({"peers": ["host:port"]}) or a form (peer=host:port)')
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "the form body is not UTF-8") from None
    return urllib.parse.parse_qs(text, keep_blank_values=False, max_num_fields=1000)


Handler = Callable[[Request], Awaitable[Response]]


def build_app(control: AgentControl, token: str) -> Starlette:
    """The ASGI app over `control`; routes are listed in docs/api.md. Requests that are not
    GETs must carry `token` (weavepy.apitoken)."""

    def guarded(handler: Handler) -> Handler:
        async def wrapper(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as exc:
                return _error(exc.status, exc.message)
            except ControlError as exc:
                return _error(CONTROL_ERROR_STATUS[type(exc)], str(exc))

        return wrapper

    def authorized(handler: Handler) -> Handler:
        async def wrapper(request: Request) -> Response:
            presented = request.headers.get("authorization")
            if bearer_matches(token, presented):
                return await handler(request)
            problem = "no API token" if presented is None else "a wrong API token"
            return JSONResponse(
                {"error": f"{request.method} {request.url.path} changes the node and came with "
                          f"{problem}: send `Authorization: Bearer TOKEN` with the token in "
                          f"{TOKEN_FILE} of the agent's state directory (readable by root)"},
                status_code=401, headers={"WWW-Authenticate": "Bearer"})

        return wrapper

    def route(path: str, handler: Handler, method: str) -> Route:
        endpoint = guarded(handler)
        return Route(path, endpoint if method == "GET" else authorized(endpoint),
                     methods=[method])

    async def status(request: Request) -> Response:
        return JSONResponse(control.status())

    async def report(request: Request) -> Response:
        # The whole status document, under the stable schema docs/report.schema.json.
        return JSONResponse(control.status())

    async def status_part(request: Request) -> Response:
        part = request.path_params["part"]
        doc = control.status()
        if part not in doc or not isinstance(doc[part], dict | list):
            raise ApiError(404, f"no status section {part!r}")
        return JSONResponse(doc[part])

    async def pods(request: Request) -> Response:
        return JSONResponse({"pods": await control.pods()})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def readyz(request: Request) -> Response:
        ready, reasons = control.readiness()
        return JSONResponse({"ready": ready, "reasons": reasons},
                            status_code=200 if ready else 503)

    async def connect(request: Request) -> Response:
        peers, replace = await _peer_list(request)
        if not peers and not replace:
            raise ApiError(400, "name at least one peer (host or host:port)")
        return JSONResponse(await control.connect(peers, replace))

    async def forget(request: Request) -> Response:
        peers, _ = await _peer_list(request)
        if not peers:
            raise ApiError(400, "name at least one peer (host or host:port)")
        return JSONResponse(control.forget(peers))

    async def rmpeer(request: Request) -> Response:
        name = request.path_params["name"]
        force = _truthy(request.query_params.get("force"))
        return JSONResponse(await control.rmpeer(name, force))

    async def reload_keyring(request: Request) -> Response:
        return JSONResponse(await control.reload_keyring())

    async def leave(request: Request) -> Response:
        return JSONResponse(await control.leave())

    async def wg_config(request: Request) -> Response:
        name = request.path_params["name"]
        return JSONResponse({"name": name, "config": control.wg_config(name)})

    async def add_external(request: Request) -> Response:
        body = await request.body()
        if len(body) > 65536:
            raise ApiError(413, "request body larger than 64 KiB")
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        return JSONResponse(control.add_external(doc))

    async def remove_external(request: Request) -> Response:
        return JSONResponse(control.remove_external(request.path_params["name"]))

    async def policy(request: Request) -> Response:
        return JSONResponse(await control.policy())

    async def explain(request: Request) -> Response:
        query = request.query_params
        missing = [name for name in ("src", "dst", "port") if not query.get(name)]
        if missing:
            raise ApiError(400, f"give {', '.join(missing)} (like ?src=x/a&dst=y/b&port=80/TCP)")
        return JSONResponse(control.explain(query["src"], query["dst"], query["port"]))

    async def stop(request: Request) -> Response:
        wanted = request.query_params.get("leave")
        leave = wanted is None or _truthy(wanted)
        control.request_stop(leave=leave)
        return JSONResponse({"stopping": True, "leaving": leave}, status_code=202)

    routes = [
        route("/status", status, "GET"),
        route("/status/{part}", status_part, "GET"),
        route("/report", report, "GET"),
        route("/pods", pods, "GET"),
        route("/policy", policy, "GET"),
        route("/policy/explain", explain, "GET"),
        route("/healthz", healthz, "GET"),
        route("/readyz", readyz, "GET"),
        route("/connect", connect, "POST"),
        route("/forget", forget, "POST"),
        route("/peer", leave, "DELETE"),
        route("/peer/{name}", rmpeer, "DELETE"),
        route("/keyring/reload", reload_keyring, "POST"),
        route("/stop", stop, "POST"),
        route("/wg-config/{name}", wg_config, "GET"),
        route("/external-peers", add_external, "POST"),
        route("/external-peers/{name}", remove_external, "DELETE"),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        return _error(code, f"{request.method} {request.url.path}: "
                      f"{'no such endpoint' if code == 404 else 'method not allowed'}")

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def build_metrics_app(render: Callable[[], Awaitable[bytes]]) -> Starlette:
    """`GET /metrics`: `await render()` (the Prometheus text exposition) at every scrape."""
    from weavepy.metrics import CONTENT_TYPE_LATEST

    async def metrics(request: Request) -> Response:
        return Response(await render(), media_type=CONTENT_TYPE_LATEST)

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(getattr(exc, "status_code", 404), "only GET /metrics is served here")

    return Starlette(routes=[Route("/metrics", metrics, methods=["GET"])],
                     exception_handlers={404: not_found, 405: not_found})


def check_bindable(host: str, port: int) -> None:
    """Raise OSError with a readable message if the API address cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            hint = " (is another weavepy agent running?)" if exc.errno == errno.EADDRINUSE else ""
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}{hint}"
                          ) from None


async def serve_api(app: Starlette, host: str, port: int, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `app` on host:port until cancelled (hypercorn's trio worker)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = log
    config.graceful_timeout = 1.0
    config.include_server_header = False

    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve, app, config))  # type: ignore[arg-type]
        task_status.started()
