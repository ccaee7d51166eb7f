"""A tiny client for the agent's local HTTP API, for the CLI (stdlib only, imports in ~ms).

This module owns turning an API call into a Python value or an `AgentUnavailable` /
`AgentRefused` error whose message is one readable line, and sending the API token when the
caller has one. It keeps the CLI free of the server's
heavy imports (Starlette, hypercorn).
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from typing import Any

__all__ = ["AgentRefused", "AgentUnavailable", "ApiClient"]

DEFAULT_TIMEOUT = 15.0


class AgentUnavailable(Exception):
    """No agent answers at the API address."""


class AgentRefused(Exception):
    """The agent answered with an error; the message is its sentence."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ApiClient:
    """Calls to the agent at host:port; with `token` (weavepy.apitoken), every request
    carries `Authorization: Bearer <token>`, which the requests that change the node need."""

    def __init__(self, host: str, port: int, timeout: float = DEFAULT_TIMEOUT,
                 token: str | None = None) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._token = token

    def request(self, method: str, path: str, body: Any = None,
                query: dict[str, str] | None = None) -> Any:
        if query:
            path = f"{path}?{urllib.parse.urlencode(query)}"
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except ConnectionRefusedError:
            raise AgentUnavailable(
                f"the weavepy agent is not running (nothing listens on {self.host}:{self.port}); "
                f"start it with `weavepy launch`") from None
        except TimeoutError:
            raise AgentUnavailable(f"the weavepy agent at {self.host}:{self.port} did not answer "
                                   f"within {self.timeout:.0f} s") from None
        except OSError as exc:
            raise AgentUnavailable(f"cannot reach the weavepy agent at {self.host}:{self.port}: "
                                   f"{exc.strerror or exc}") from None
        except http.client.HTTPException as exc:  # e.g. closed mid-answer while stopping
            raise AgentUnavailable(f"the weavepy agent at {self.host}:{self.port} broke off "
                                   f"its answer ({type(exc).__name__})") from None
        finally:
            conn.close()
        try:
            doc = json.loads(data) if data else None
        except ValueError:
            raise AgentRefused(response.status, f"the agent sent a non-JSON answer "
                               f"(HTTP {response.status})") from None
        if response.status >= 400 and not (response.status == 503 and path == "/readyz"):
            message = doc.get("error") if isinstance(doc, dict) else None
            raise AgentRefused(response.status, message or f"HTTP {response.status}")
        return doc

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body)

    def delete(self, path: str, query: dict[str, str] | None = None) -> Any:
        return self.request("DELETE", path, query=query)
