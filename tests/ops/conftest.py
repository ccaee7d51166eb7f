"""Fixtures for the operability tests: weavepy agents in sandbox nodes (always torn down)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.deploy.kube_fixtures import account, cluster  # noqa: F401 (shared fixtures)
from weavepy.devtools.agentbox import AgentBox


@pytest.fixture
def agent_box(sandbox_factory: Callable[..., Any]) -> Callable[..., AgentBox]:
    def make(nodes: int = 3, **kwargs: Any) -> AgentBox:
        box = sandbox_factory(nodes=nodes)
        return AgentBox(box, pod_range=str(box.pod_range), **kwargs)

    return make
