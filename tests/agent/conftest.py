"""Fixtures for the agent tests: weavepy agents running in sandbox nodes.

`agent_box(nodes)` builds a sandbox (with the shared `sandbox_factory`, so it is always torn
down) and an `AgentBox` over it: one generated gossip key, the pod range 198.19.0.0/16 in /24
blocks, and the LAN gossip profile unless a test asks otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from weavepy.devtools.agentbox import AgentBox


@pytest.fixture
def agent_box(sandbox_factory: Callable[..., Any]) -> Callable[..., AgentBox]:
    def make(nodes: int = 3, **kwargs: Any) -> AgentBox:
        box = sandbox_factory(nodes=nodes)
        return AgentBox(box, pod_range=str(box.pod_range), **kwargs)

    return make
