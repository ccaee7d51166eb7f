"""A small CNI runtime for tests: executes a conflist's plugins the way SPEC.md section 3 says.

It is our own code (like cnitool), used to drive the reference plugins chained after ours;
the libcni and containerd tests use third-party runtimes instead. Every plugin runs inside a
sandbox node (`ip netns exec`), because a runtime runs plugins in the host's namespace.

Per plugin it inserts `name`, `cniVersion`, `runtimeConfig` (the capability arguments the
plugin declares) and `prevResult`; it caches the final ADD result for CHECK and DEL, and runs
DEL in reverse order, as libcni does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from weavepy.devtools.sandbox import SandboxNode


class PluginFailed(AssertionError):
    def __init__(self, plugin: str, command: str, rc: int, output: str, stderr: str) -> None:
        super().__init__(f"{plugin} {command} exited {rc}: {output} {stderr}".strip())
        self.plugin = plugin
        self.command = command
        self.rc = rc
        try:
            self.error: dict[str, Any] = json.loads(output)
        except ValueError:
            self.error = {}


@dataclass(frozen=True)
class Pod:
    container_id: str
    netns: str
    ifname: str = "eth0"
    cni_args: str = ""
    capability_args: Mapping[str, Any] = field(default_factory=dict)


def find_plugin(name: str, cni_path: Sequence[str]) -> str:
    for directory in cni_path:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(f"plugin {name} not found in {':'.join(cni_path)}")


def exec_plugin(node: SandboxNode, plugin: str, cni_path: Sequence[str], command: str,
                conf: Mapping[str, Any] | bytes, pod: Pod | None = None,
                env: Mapping[str, str] | None = None, timeout: float = 30,
                ) -> tuple[int, str, str]:
    """Run one plugin once inside `node`; return (exit status, stdout, stderr)."""
    variables = {"CNI_COMMAND": command, "CNI_PATH": ":".join(cni_path)}
    if pod is not None:
        variables.update(CNI_CONTAINERID=pod.container_id, CNI_NETNS=pod.netns,
                         CNI_IFNAME=pod.ifname, CNI_ARGS=pod.cni_args)
    variables.update(env or {})
    stdin = conf.decode() if isinstance(conf, bytes) else json.dumps(conf)
    proc = node.run(["env", *(f"{k}={v}" for k, v in variables.items()),
                     find_plugin(plugin, cni_path)], check=False, input=stdin, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


@dataclass
class ChainRunner:
    """Runs one network configuration list for pods on one node."""

    node: SandboxNode
    conflist: Mapping[str, Any]
    cni_path: Sequence[str]
    cache: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def _request(self, plugin: Mapping[str, Any], pod: Pod,
                 prev: dict[str, Any] | None) -> dict[str, Any]:
        conf = {k: v for k, v in plugin.items() if k != "capabilities"}
        conf["name"] = self.conflist["name"]
        conf["cniVersion"] = self.conflist["cniVersion"]
        wanted = {k for k, on in plugin.get("capabilities", {}).items() if on}
        runtime = {k: v for k, v in pod.capability_args.items() if k in wanted}
        if runtime:
            conf["runtimeConfig"] = runtime
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    def _run(self, command: str, plugin: Mapping[str, Any], pod: Pod,
             prev: dict[str, Any] | None) -> str:
        rc, out, err = exec_plugin(self.node, plugin["type"], self.cni_path, command,
                                   self._request(plugin, pod, prev), pod)
        if rc != 0:
            raise PluginFailed(plugin["type"], command, rc, out, err)
        return out

    def add(self, pod: Pod) -> dict[str, Any]:
        prev: dict[str, Any] | None = None
        for plugin in self.conflist["plugins"]:
            prev = json.loads(self._run("ADD", plugin, pod, prev))
        assert prev is not None
        self.cache[(pod.container_id, pod.ifname)] = prev
        return prev

    def check(self, pod: Pod) -> None:
        prev = self.cache[(pod.container_id, pod.ifname)]
        for plugin in self.conflist["plugins"]:
            self._run("CHECK", plugin, pod, prev)

    def delete(self, pod: Pod) -> None:
        prev = self.cache.get((pod.container_id, pod.ifname))
        for plugin in reversed(self.conflist["plugins"]):
            self._run("DEL", plugin, pod, prev)
        self.cache.pop((pod.container_id, pod.ifname), None)
