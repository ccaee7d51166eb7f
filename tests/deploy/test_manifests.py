"""The Kubernetes manifests: `weavepy manifest` output and deploy/*.yaml.

Every rendering (default settings, and several non-default ones) is validated by the real
`kubernetes-validate --strict` (offline OpenAPI schemas) against the oldest and the newest
Kubernetes version we target; deploy/*.yaml must equal the default rendering; and the settings
in the ConfigMap must load with the agent's own configuration loader."""

from __future__ import annotations

import base64
import secrets
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from tests.conftest import require
from weavepy.config import load_config
from weavepy.manifest import (
    ManifestError,
    ManifestSettings,
    manifest_command,
    render_files,
    render_objects,
    render_uninstall_yaml,
    render_yaml,
)

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S_VERSIONS = ("1.29.0", "1.37.0")  # oldest and newest we validate against
VALIDATOR = Path(sys.executable).with_name("kubernetes-validate")

KEY = base64.b64encode(secrets.token_bytes(32)).decode()
NON_DEFAULT = {
    "namespaced-encrypted": ManifestSettings(
        namespace="weavepy-system", image="registry.example/weavepy:test",
        image_pull_policy="Always", ipalloc_range="198.19.0.0/16", block_prefix="26",
        gossip_port="7000", vxlan_port="4789", vxlan_vni="42", mtu="1400", profile="wan",
        peers=("198.18.7.1", "198.18.7.2:7000"), keyring=f"{KEY}\n", log_level="debug",
        host_pid=True, tun_device=True, cni_bin_dir="/home/kubernetes/bin", ipam="kubernetes"),
    "privileged-plain": ManifestSettings(
        ipalloc_range="198.19.128.0/17", kube_peers=False, peers=("198.18.9.9",),
        encrypt=False, privileged=True, metrics_addr="127.0.0.1:9100"),
}


def validate(paths: list[Path]) -> None:
    """Run kubernetes-validate --strict on `paths` for each version; fail with its output."""
    require(VALIDATOR.exists(), "needs kubernetes-validate (pip install kubernetes-validate)")
    for version in K8S_VERSIONS:
        done = subprocess.run([str(VALIDATOR), "--strict", "--quiet", "-k", version,
                               *map(str, paths)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"k8s {version}:\n{done.stdout}{done.stderr}"
        assert "FAIL" not in done.stdout and "ERROR" not in done.stdout, done.stdout


def kinds(objects: list[dict[str, Any]]) -> list[str]:
    return [o["kind"] for o in objects]


def daemonset(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == "DaemonSet")


def test_rendered_manifests_pass_strict_validation(tmp_path: Path) -> None:
    paths = []
    for name, settings in {"default": ManifestSettings(), **NON_DEFAULT}.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(render_yaml(settings))
        paths.append(path)
    validate(paths)


def test_uninstall_manifest_passes_strict_validation(tmp_path: Path) -> None:
    paths = []
    for name, settings in {"default": ManifestSettings(), **NON_DEFAULT}.items():
        path = tmp_path / f"uninstall-{name}.yaml"
        path.write_text(render_uninstall_yaml(settings))
        paths.append(path)
    validate(paths)
    objects = list(yaml.safe_load_all(paths[0].read_text()))
    init = daemonset(objects)["spec"]["template"]["spec"]["initContainers"][0]
    assert init["command"] == ["/usr/lib/weavepy/node-init.sh"]
    assert init["args"][0] == "--uninstall" and "--state-dir" in init["args"]


def test_manifest_uninstall_flag_prints_only_the_uninstall_daemonset() -> None:
    result = CliRunner().invoke(manifest_command, ["--uninstall"])
    assert result.exit_code == 0, result.output
    objects = [o for o in yaml.safe_load_all(result.stdout) if o]
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("DaemonSet", "weavepy-uninstall")]
    assert "delete weavepy's objects first" in result.stderr


def test_deploy_files_pass_strict_validation() -> None:
    validate([DEPLOY / "rbac.yaml", DEPLOY / "configmap.yaml", DEPLOY / "daemonset.yaml",
              DEPLOY / "secret.example.yaml"])


def test_deploy_files_equal_the_default_rendering() -> None:
    for name, text in render_files(ManifestSettings()).items():
        on_disk = list(yaml.safe_load_all((DEPLOY / name).read_text()))
        assert on_disk == list(yaml.safe_load_all(text)), (
            f"deploy/{name} differs from `weavepy manifest --output-dir`; update the file "
            f"(keep its comments)")
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["rbac.yaml", "configmap.yaml", "daemonset.yaml"]


def test_default_objects_and_permissions() -> None:
    objects = render_objects(ManifestSettings())
    assert kinds(objects) == ["ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                              "ConfigMap", "DaemonSet"]
    role = objects[1]
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
        {"apiGroups": [""], "resources": ["pods", "namespaces"],
         "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
         "verbs": ["get", "list", "watch"]}]
    pod = daemonset(objects)["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    agent = pod["containers"][0]
    security = agent["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN"]}
    # the API server rejects allowPrivilegeEscalation=false beside added SYS_ADMIN
    assert security.get("allowPrivilegeEscalation") is not False
    assert pod["initContainers"][0]["securityContext"] == {"privileged": True}
    probes = {agent[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe")}
    assert probes == {"/healthz", "/readyz"}
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    assert mounts["netns"]["mountPropagation"] == "HostToContainer"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["lib-modules"]["hostPath"] == {"path": "/lib/modules", "type": "Directory"}
    assert {"state", "run", "cni-bin", "cni-conf", "netns", "keyring"} <= set(volumes)


def test_non_default_settings_reach_the_objects() -> None:
    objects = render_objects(NON_DEFAULT["namespaced-encrypted"])
    assert kinds(objects)[0] == "Namespace" and "Secret" in kinds(objects)
    assert all(o["metadata"].get("namespace") in (None, "weavepy-system") for o in objects)
    secret = next(o for o in objects if o["kind"] == "Secret")
    assert base64.b64decode(secret["data"]["keyring"]).decode() == f"{KEY}\n"
    pod = daemonset(objects)["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    ports = {(p["name"], p["containerPort"]) for p in pod["containers"][0]["ports"]}
    assert {("gossip-tcp", 7000), ("gossip-udp", 7000), ("vxlan", 4789)} <= ports
    assert {"name": "tun", "hostPath": {"path": "/dev/net/tun", "type": "CharDevice"}} \
        in pod["volumes"]
    plain = render_objects(NON_DEFAULT["privileged-plain"])
    plain_pod = daemonset(plain)["spec"]["template"]["spec"]
    assert ("metrics", 9100) in {
        (p["name"], p["containerPort"]) for p in plain_pod["containers"][0]["ports"]}
    assert plain_pod["containers"][0]["securityContext"]["privileged"] is True
    assert "capabilities" not in plain_pod["containers"][0]["securityContext"]
    assert all(v["name"] != "keyring" for v in plain_pod["volumes"])
    # a settings change changes the pod template, so kubectl apply rolls the agents
    hashes = {daemonset(render_objects(s))["spec"]["template"]["metadata"]["annotations"][
        "weavepy.io/config-hash"] for s in (ManifestSettings(), *NON_DEFAULT.values())}
    assert len(hashes) == 3


@pytest.mark.parametrize("settings", [ManifestSettings(), *NON_DEFAULT.values()],
                         ids=["default", *NON_DEFAULT])
def test_the_agent_accepts_the_configmap(settings: ManifestSettings, tmp_path: Path) -> None:
    """The ConfigMap's variables load with the agent's own loader, and the paths the
    DaemonSet uses (socket, probes) are the ones the agent will use."""
    objects = render_objects(settings)
    data = next(o for o in objects if o["kind"] == "ConfigMap")["data"]
    env = {**data, "WEAVEPY_NAME": "node-a"}
    if "WEAVEPY_KEYRING_FILE" in env:  # the Secret's mount point, here a file of the test's
        keyring = tmp_path / "keyring"
        keyring.write_text(f"{KEY}\n")
        env["WEAVEPY_KEYRING_FILE"] = str(keyring)
    config = load_config({}, env, None)
    if settings.ipalloc_range:
        assert str(config.ipalloc_range) == settings.ipalloc_range
    assert config.ipam == (settings.ipam or "weavepy")
    pod = daemonset(objects)["spec"]["template"]["spec"]
    init_args = pod["initContainers"][0]["args"]
    assert init_args[init_args.index("--socket") + 1] == str(config.cni_socket)
    probe = pod["containers"][0]["readinessProbe"]["httpGet"]
    assert (probe["host"], probe["port"]) == config.api_addr


def test_all_mistakes_are_reported_at_once() -> None:
    bad = ManifestSettings(ipalloc_range="198.19.0.1/16", gossip_port="70000", mtu="70",
                           namespace="Kube_System", peers=("not a host",),
                           metrics_addr="everywhere", keyring="not-a-key\n",
                           cni_bin_dir="opt/cni/bin")
    with pytest.raises(ManifestError) as caught:
        render_objects(bad)
    problems = caught.value.problems
    assert len(problems) == 8, problems
    assert any("did you mean 198.19.0.0/16" in p for p in problems)
    assert any(p.startswith("--gossip-port:") for p in problems)
    assert any("weavepy keygen" in p for p in problems)


def test_command_renders_to_stdout_and_notes_the_secret() -> None:
    runner = CliRunner()
    result = runner.invoke(manifest_command, ["--ipalloc-range", "198.19.0.0/16"])
    assert result.exit_code == 0, result.output
    documents = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert kinds(documents) == ["ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                "ConfigMap", "DaemonSet"]
    assert documents[3]["data"]["WEAVEPY_IPALLOC_RANGE"] == "198.19.0.0/16"
    assert "kubectl -n kube-system create secret generic weavepy-keyring" in result.stderr


def test_command_writes_files_and_a_private_secret(tmp_path: Path) -> None:
    keyring = tmp_path / "keyring"
    keyring.write_text(f"{KEY}\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(manifest_command, ["--keyring-file", str(keyring),
                                                   "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["configmap.yaml", "daemonset.yaml",
                                                     "rbac.yaml", "secret.yaml"]
    assert stat.S_IMODE((out / "secret.yaml").stat().st_mode) == 0o600
    validate(sorted(out.iterdir()))


def test_command_errors_are_one_line_each(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(manifest_command, ["--ipalloc-range", "nonsense", "--mtu", "5"])
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 2 and "--ipalloc-range" in errors[0] and "--mtu" in errors[1]
    key = tmp_path / "k"
    key.write_text(KEY)
    both = runner.invoke(manifest_command, ["--keyring-file", str(key), "--generate-key"])
    assert both.exit_code == 1 and "use one" in both.stderr
    plain = runner.invoke(manifest_command, ["--no-encrypt"])
    assert plain.exit_code == 0 and "NOT be encrypted" in plain.stderr
    generated = runner.invoke(manifest_command, ["--generate-key"])
    secret = next(d for d in yaml.safe_load_all(generated.stdout) if d and d["kind"] == "Secret")
    assert len(base64.b64decode(base64.b64decode(secret["data"]["keyring"]).strip())) == 32


def test_kubernetes_ipam_needs_the_api() -> None:
    data = next(o for o in render_objects(ManifestSettings(ipam="kubernetes"))
                if o["kind"] == "ConfigMap")["data"]
    assert (data["WEAVEPY_IPAM"], data["WEAVEPY_KUBE_PEERS"]) == ("kubernetes", "true")
    assert "WEAVEPY_IPAM" not in next(o for o in render_objects(ManifestSettings())
                                      if o["kind"] == "ConfigMap")["data"]
    with pytest.raises(ManifestError) as caught:
        render_objects(ManifestSettings(ipam="kubernetes", kube_peers=False))
    assert caught.value.problems == ["--ipam kubernetes takes each node's podCIDR from the "
                                     "Kubernetes API: drop --no-kube-peers"]
    runner = CliRunner()
    shown = runner.invoke(manifest_command, ["--ipam", "kubernetes", "--no-encrypt"])
    assert shown.exit_code == 0 and "WEAVEPY_IPAM: kubernetes" in shown.output
