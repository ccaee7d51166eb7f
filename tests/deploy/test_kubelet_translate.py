"""weavepy.devtools.kubelet.translate: the manifest's pod spec becomes podman runs, mechanically
(sans-IO; tests/deploy/test_image_daemonset.py runs what it returns)."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from weavepy.devtools.kubelet import (
    SERVICE_ACCOUNT_MOUNT,
    ApiAccess,
    NodeContext,
    UnsupportedSpec,
    translate,
)
from weavepy.manifest import ManifestSettings, render_objects

KEY = base64.b64encode(bytes(range(32))).decode()
NODE = NodeContext("n2", "198.18.0.12", Path("/tmp/node-n2"), "/proc/42/ns/net", "/wp-n2")
API = ApiAccess("198.18.0.2", 6443, "tok", b"PEM")


def objects(**settings: Any) -> list[dict[str, Any]]:
    return render_objects(ManifestSettings(keyring=KEY + "\n", **settings))


def pod_spec(objs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = next(o for o in objs if o["kind"] == "DaemonSet")["spec"][
        "template"]["spec"]
    return spec


def pairs(args: tuple[str, ...], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_the_default_daemonset_translates() -> None:
    objs = objects(image="localhost/weavepy:test")
    plan = translate(pod_spec(objs), objs, NODE, "weavepy-n2", "kube-system")
    (init,), (agent,) = plan.init_containers, plan.containers
    # host network is the node's namespace; privileges as the manifest says
    for container in (init, agent):
        assert pairs(container.run_args, "--network") == ["ns:/proc/42/ns/net"]
        assert pairs(container.run_args, "--security-opt") == ["seccomp=unconfined"]
    assert "--privileged" in init.run_args and "--privileged" not in agent.run_args
    assert pairs(agent.run_args, "--cap-drop") == ["ALL"]
    assert pairs(agent.run_args, "--cap-add") == ["NET_ADMIN", "SYS_ADMIN"]
    assert "--read-only" in agent.run_args
    # command replaces the entrypoint, args follow the image
    assert json.loads(pairs(init.run_args, "--entrypoint")[0]) == [
        "/usr/lib/weavepy/node-init.sh"]
    image_at = init.run_args.index("localhost/weavepy:test")
    assert init.run_args[image_at + 1:][:2] == ("--cni-bin-dir", "/opt/cni/bin")
    # env: the ConfigMap, then the node's name
    env = dict(e.split("=", 1) for e in pairs(agent.run_args, "--env"))
    assert env["WEAVEPY_NAME"] == "n2" and env["WEAVEPY_KUBE_PEERS"] == "true"
    # hostPaths are the node's directories; propagation and read-only carry over
    volumes = pairs(agent.run_args, "--volume")
    assert "/tmp/node-n2/var/run/netns:/var/run/netns:rw,rslave" in volumes
    assert "/tmp/node-n2/etc/cni/net.d:/etc/cni/net.d:ro,rprivate" in volumes
    assert pairs(agent.run_args, "--mount") == [
        "type=tmpfs,destination=/tmp,tmpfs-size=16777216"]
    # the Secret's key, with its mode, read-only
    secret = next(v for v in plan.volumes if v.kind == "secret")
    assert secret.files == (("keyring", (KEY + "\n").encode(), 0o400),)
    assert f"{secret.path}:/etc/weavepy/keyring:ro,rprivate" in volumes
    assert agent.stop_timeout == 30 and set(agent.probes) == {
        "startupProbe", "livenessProbe", "readinessProbe"}
    # without an API server: no token, no service variables
    assert not any(SERVICE_ACCOUNT_MOUNT in v for v in volumes)
    assert "KUBERNETES_SERVICE_HOST" not in env


def test_an_api_server_gives_the_service_account_and_variables() -> None:
    objs = objects()
    node = NodeContext(NODE.name, NODE.address, NODE.root, NODE.netns_path,
                       NODE.cgroup_parent, API)
    plan = translate(pod_spec(objs), objs, node, "weavepy-n2", "kube-system")
    agent = plan.containers[0]
    env = dict(e.split("=", 1) for e in pairs(agent.run_args, "--env"))
    assert (env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"]) == (
        "198.18.0.2", "6443")
    token = next(v for v in plan.volumes if v.name == "kube-api-access")
    assert {name: content for name, content, _ in token.files} == {
        "token": b"tok", "ca.crt": b"PEM", "namespace": b"kube-system"}
    assert f"{token.path}:{SERVICE_ACCOUNT_MOUNT}:ro,rprivate" in pairs(agent.run_args,
                                                                         "--volume")


@pytest.mark.parametrize("change", [
    lambda spec: spec.update(hostAliases=[]),
    lambda spec: spec["containers"][0].update(workingDir="/"),
    lambda spec: spec["containers"][0]["securityContext"].update(runAsUser=1000),
    lambda spec: spec.update(hostPID=True),
    lambda spec: spec.update(hostNetwork=False),
    lambda spec: spec["volumes"].append({"name": "x", "configMap": {"name": "y"}}),
])
def test_what_the_stand_in_cannot_honour_is_refused(change: Any) -> None:
    objs = objects()
    spec = copy.deepcopy(pod_spec(objs))
    change(spec)
    with pytest.raises(UnsupportedSpec):
        translate(spec, objs, NODE, "weavepy-n2")


def test_a_missing_secret_is_refused() -> None:
    objs = [o for o in objects() if o["kind"] != "Secret"]
    with pytest.raises(UnsupportedSpec, match="weavepy-keyring"):
        translate(pod_spec(objs), objs, NODE, "weavepy-n2")
