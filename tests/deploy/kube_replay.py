"""A local HTTPS server that replays recorded Kubernetes API responses (see kube_api/README.md).

It stands in for the API server, which cannot run here: it serves `GET /api/v1/nodes` (list,
and `watch=true` streams from a script), `PATCH /api/v1/nodes/NAME/status`, checks the bearer
token like the API server does (401 otherwise), and records every request so tests can check
what the client asked. It listens on 127.0.0.1 only, with a certificate from a throw-away CA
that the test writes into a fake service-account directory.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

DATA = Path(__file__).with_name("kube_api")


def recorded(name: str) -> Any:
    """A recorded JSON response (or, for .jsonl, its list of lines as dicts)."""
    text = (DATA / name).read_text()
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


@dataclass
class Watch:
    """One scripted watch response: `lines` (dicts or raw strings), then close or hang; or an
    error `status` code with a Status body."""

    lines: list[Any] = field(default_factory=list)
    hang: bool = False
    status: int | None = None
    body: Any = None


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


async def _quiet_stream() -> Any:
    await trio.sleep_forever()
    yield ""


class ReplayApi:
    """The scripted API. Lists and watches are served in order; when the watch script runs out
    the server holds the stream open (like a quiet cluster)."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.lists: deque[Any] = deque()
        self.watches: deque[Watch] = deque()
        self.patch_response: Any = recorded("node-n1-patched.json")
        self.seen: list[Seen] = []
        self.watch_started = trio.Event()

    def app(self) -> Starlette:
        async def nodes(request: Request) -> Response:
            denied = await self._record(request)
            if denied is not None:
                return denied
            if request.query_params.get("watch") in ("true", "1"):
                return self._watch()
            doc = self.lists.popleft() if len(self.lists) > 1 else self.lists[0]
            return JSONResponse(doc)

        async def node_status(request: Request) -> Response:
            denied = await self._record(request)
            if denied is not None:
                return denied
            return JSONResponse(self.patch_response)

        return Starlette(routes=[
            Route("/api/v1/nodes", nodes, methods=["GET"]),
            Route("/api/v1/nodes/{name}/status", node_status, methods=["PATCH"]),
            *self.policy_routes(),
        ])

    def policy_routes(self) -> list[Route]:
        """What the agent's NetworkPolicy source lists and watches (Pods, Namespaces and
        NetworkPolicies of every namespace), served empty: lists with no items, and watches
        on which nothing happens (until the client ends them)."""
        def empty(kind: str) -> Any:
            async def listing(request: Request) -> Response:
                denied = await self._record(request)
                if denied is not None:
                    return denied
                if request.query_params.get("watch") in ("true", "1"):
                    return StreamingResponse(_quiet_stream(), media_type="application/json")
                return JSONResponse({"kind": f"{kind}List", "apiVersion": "v1",
                                     "metadata": {"resourceVersion": "1"}, "items": []})

            return listing

        return [Route("/api/v1/pods", empty("Pod"), methods=["GET"]),
                Route("/api/v1/namespaces", empty("Namespace"), methods=["GET"]),
                Route("/apis/networking.k8s.io/v1/networkpolicies", empty("NetworkPolicy"),
                      methods=["GET"])]

    async def _record(self, request: Request) -> Response | None:
        self.seen.append(Seen(request.method, request.url.path, dict(request.query_params),
                              {k.lower(): v for k, v in request.headers.items()},
                              await request.body()))
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return JSONResponse(recorded("status-401.json"), status_code=401)
        return None

    def _watch(self) -> Response:
        script = self.watches.popleft() if self.watches else Watch(hang=True)
        if script.status is not None:
            return JSONResponse(script.body, status_code=script.status)
        started = self.watch_started

        async def stream() -> Any:
            started.set()
            for line in script.lines:
                yield (line if isinstance(line, str) else json.dumps(line)) + "\n"
                await trio.sleep(0)
            if script.hang:
                await trio.sleep_forever()

        return StreamingResponse(stream(), media_type="application/json")

    def requests(self, method: str = "GET", path: str = "/api/v1/nodes") -> list[Seen]:
        return [s for s in self.seen if s.method == method and s.path == path]


def make_ca_and_server_cert(directory: Path, address: str = "127.0.0.1"
                            ) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for `address`: (ca.crt, server.crt, key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weavepy-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.IPv4Address(address))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = (directory / "ca.crt", directory / "server.crt",
                                    directory / "server.key")
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_path, cert_path, key_path


async def serve_replay(api: ReplayApi, cert: Path, key: Path, *, bind: str = "127.0.0.1:0",
                       task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `api` over HTTPS on `bind` (by default 127.0.0.1 and a free port; the port is
    given to task_status) until cancelled."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [bind]
    config.certfile = str(cert)
    config.keyfile = str(key)
    config.accesslog = None
    config.graceful_timeout = 0.5
    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(serve, api.app(), config)  # type: ignore[arg-type]
        task_status.started(int(urls[0].rsplit(":", 1)[1]))
