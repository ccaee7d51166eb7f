"""The Kubernetes stand-in serves what the agent's NetworkPolicy source lists and watches, so
the agent tests of --kube-peers get a policy state (empty) and their CNI ADDs proceed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.agent.kube_live_api import LiveApi
from tests.deploy.kube_fixtures import TOKEN, account  # noqa: F401 (the service-account fixture)
from tests.deploy.kube_replay import serve_replay
from weavepy.policy.kubesource import KubePolicySource


@pytest.fixture
async def standin(account: tuple[Path, Path, Path],  # noqa: F811
                  monkeypatch: pytest.MonkeyPatch, nursery: trio.Nursery
                  ) -> AsyncIterator[Path]:
    directory, cert, key = account
    port: int = await nursery.start(serve_replay, LiveApi(TOKEN), cert, key)  # type: ignore[arg-type]
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(port))
    yield directory


async def test_the_policy_source_gets_an_empty_state(standin: Path) -> None:
    async with KubePolicySource.in_cluster(service_account_dir=standin) as source, \
            source.watch_state() as states:
        with trio.fail_after(15):
            state = await states.receive()
    assert state.policies == () and state.pods == (), state
