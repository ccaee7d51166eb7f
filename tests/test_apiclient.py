"""The CLI's API client: an agent that goes away mid-answer (as during `weavepy stop`) is
"unavailable", one readable line, never an http.client traceback."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from weavepy.apiclient import AgentUnavailable, ApiClient


@pytest.fixture
def half_answering_server() -> Iterator[int]:
    """On loopback: answers one request with a header promising 100 bytes, sends 5, closes."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"ok\"")

    worker = threading.Thread(target=serve, daemon=True)
    worker.start()
    yield port
    worker.join(timeout=5)
    listener.close()


def test_an_answer_broken_off_is_agent_unavailable(half_answering_server: int) -> None:
    client = ApiClient("127.0.0.1", half_answering_server, timeout=5)
    with pytest.raises(AgentUnavailable, match="broke off its answer \\(IncompleteRead\\)"):
        client.get("/healthz")
