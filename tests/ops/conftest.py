"""Fixtures for the operability tests: the Kubernetes stand-in's (agents come from the root
conftest's `agent_box`, always torn down)."""

from __future__ import annotations

from tests.deploy.kube_fixtures import account, cluster  # noqa: F401 (shared fixtures)
