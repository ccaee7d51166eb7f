"""Fixtures for the deployment tests: the replaying Kubernetes API (kube_fixtures.py)."""

from tests.deploy.kube_fixtures import account, cluster  # noqa: F401 (shared fixtures)
