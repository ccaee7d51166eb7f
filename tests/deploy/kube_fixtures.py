"""Fixtures for tests that talk to the replaying Kubernetes API (kube_replay.py): a
service-account directory and a running replay server, imported by the conftest.py of each
test directory that uses them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.deploy.kube_replay import ReplayApi, make_ca_and_server_cert, serve_replay

TOKEN = "eyJhbGciOiJSUzI1NiJ9.test-token-1"


@dataclass
class Cluster:
    api: ReplayApi
    account: Path
    port: int


@pytest.fixture
def account(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    directory = tmp_path / "serviceaccount"
    directory.mkdir()
    ca, cert, key = make_ca_and_server_cert(tmp_path)
    (directory / "ca.crt").write_bytes(ca.read_bytes())
    (directory / "token").write_text(TOKEN)
    (directory / "namespace").write_text("kube-system")
    yield directory, cert, key


@pytest.fixture
async def cluster(account: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch,
                  nursery: trio.Nursery) -> AsyncIterator[Cluster]:
    directory, cert, key = account
    api = ReplayApi(TOKEN)
    port: int = await nursery.start(serve_replay, api, cert, key)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(port))
    yield Cluster(api, directory, port)
