"""Shared test plumbing: the skip-or-fail rule, the sandbox fixture, the agent fixture and the
bounded wait of trio tests (`wait_until`).

The rule: a test that needs root, a network namespace or a third-party peer calls `require(...)`.
Outside CI an unmet need skips with the reason printed (pytest -ra shows it); with CI=true it
fails, because CI must never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio

pytest_plugins = ["pytester"]

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {timeout} s waiting until {what}")


def require(condition: bool, why: str) -> None:
    """Skip (or, under CI=true, fail) the calling test unless `condition` holds."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true and this test cannot run: {why}", pytrace=False)
    pytest.skip(why)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root (network namespaces, netlink)")
    require(shutil.which("ip") is not None, "needs iproute2's `ip`")
    require(os.path.isdir("/run/netns") or os.access("/run", os.W_OK), "needs /run/netns")


def require_binary(name: str, package: str | None = None) -> str:
    path = shutil.which(name)
    require(path is not None, f"needs `{name}` (Debian package {package or name})")
    assert path is not None
    return path


@pytest.fixture
def sandbox_factory() -> Iterator[object]:
    """Build sandboxes with a per-test prefix; everything is torn down even if the test fails."""
    require_root()
    from weavepy.devtools.sandbox import Sandbox

    made: list[Sandbox] = []

    def make(nodes: int = 3, **kwargs: object) -> Sandbox:
        box = Sandbox.create(nodes=nodes, **kwargs)  # type: ignore[arg-type]
        made.append(box)
        return box

    try:
        yield make
    finally:
        for box in made:
            box.destroy()


@pytest.fixture
def agent_box(sandbox_factory: Callable[..., Any]) -> Callable[..., Any]:
    """`agent_box(nodes, **kwargs)`: a sandbox (torn down with `sandbox_factory`) and an
    `AgentBox` over it: one generated gossip key, the pod range 198.19.0.0/16 in /24 blocks
    unless a test asks otherwise, and the LAN gossip profile."""
    from weavepy.devtools.agentbox import AgentBox

    def make(nodes: int = 3, **kwargs: Any) -> AgentBox:
        box = sandbox_factory(nodes=nodes)
        return AgentBox(box, pod_range=str(box.pod_range), **kwargs)

    return make
