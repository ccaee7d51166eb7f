"""Fixtures of the policy tests: an nftables worker in a network namespace of its own."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import Phase, settings

from tests.conftest import require, require_root
from tests.deploy.kube_fixtures import account  # noqa: F401 (the service-account fixture)

# `--hypothesis-profile=no-shrink`: report the first counterexample at once (for checking that
# a deliberately broken compiler fails the property tests; shrinking can take minutes)
settings.register_profile("no-shrink", phases=[Phase.explicit, Phase.reuse, Phase.generate])

ROOT = Path(__file__).resolve().parents[2]


class JsonWorker:
    """A helper process of the policy tests, spoken to in JSON lines: one request, one answer
    (tests/policy/nft_worker.py, applier_worker.py, drop_worker.py)."""

    def __init__(self, argv: list[str]) -> None:
        self.name = argv[argv.index("-m") + 1]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=ROOT)

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"{self.name} died"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, **message: Any) -> dict[str, Any]:
        """`request`, and the worker must not have answered with an error."""
        reply = self.request(message)
        assert "error" not in reply, reply["error"]
        return reply

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class NftWorker(JsonWorker):
    """Runs transactions in an anonymous network namespace (`unshare -n`), one at a time."""

    def __init__(self) -> None:
        super().__init__(["unshare", "-n", sys.executable, "-m", "tests.policy.nft_worker"])

    def run(self, commands: list[dict[str, Any]], table: str | None = None,
            family: str = "inet") -> dict[str, Any]:
        return self.request({"commands": commands, "list": [family, table] if table else None})


def bridged_pods(box: Any, node: Any, addresses: dict[str, str], gateway: str) -> dict[str, Any]:
    """Pods as namespaces on one bridge (`pbr`, `gateway`/24) of `node`, with br_netfilter on,
    so their traffic passes the forward hook: short name -> the pod's namespace."""
    node.run(["ip", "link", "add", "pbr", "type", "bridge"])
    node.run(["ip", "addr", "add", f"{gateway}/24", "dev", "pbr"])
    node.run(["ip", "link", "set", "pbr", "up"])
    node.run(["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"])
    pods = {}
    for short, address in addresses.items():
        ns = box.add_netns(f"p{short}")
        node.run(["ip", "link", "add", f"veth{short}", "type", "veth", "peer", "name", "eth0",
                  "netns", ns.netns])
        node.run(["ip", "link", "set", f"veth{short}", "master", "pbr", "up"])
        ns.run(["ip", "addr", "add", f"{address}/24", "dev", "eth0"])
        ns.run(["ip", "link", "set", "eth0", "up"])
        ns.run(["ip", "route", "add", "default", "via", gateway])
        pods[short] = ns
    return pods


@pytest.fixture(scope="module")
def nft_worker() -> Iterator[NftWorker]:
    require_root()
    require(shutil.which("unshare") is not None, "needs util-linux's unshare")
    try:
        import nftables  # noqa: F401
    except ImportError:
        require(False, "needs Debian's python3-nftables")
    worker = NftWorker()
    try:
        yield worker
    finally:
        worker.close()
