"""`weavepy manifest`: the Kubernetes objects that run weavepy, rendered for given settings.

This module owns the shape of the deployment: ServiceAccount, least-privilege ClusterRole and
binding, the settings ConfigMap, the keyring Secret, and the DaemonSet with its init container,
host paths, probes and permissions. Objects are built as Python data and dumped with PyYAML
(no text templates), so every output is well-formed YAML and a value can never break quoting.

The rules it keeps:

* **The agent's own parsers check every setting.** Values pass through `weavepy.config`'s
  settings table before they are rendered, so a manifest never carries a value the agent would
  refuse at start; all mistakes are reported at once (`ManifestError.problems`).
* **deploy/*.yaml are these objects with the default settings**, annotated with comments that
  justify each permission; tests/deploy checks they stay equal, and validates both with
  kubernetes-validate --strict.
* **Secrets are rendered only when asked** (`--keyring-file`, `--generate-key`). Otherwise the
  DaemonSet refers to the Secret `weavepy-keyring` that the operator creates once, so
  re-applying the output never rotates the cluster's key.

Why the DaemonSet needs what it asks for (the comments in deploy/daemonset.yaml say the same):
the agent programs the host's network (hostNetwork, NET_ADMIN), enters pod network namespaces
to wire their veths (SYS_ADMIN for setns, the runtime's /var/run/netns with HostToContainer
propagation), and serves the CNI socket the host's plugin connects to (/run/weavepy). The init
container is privileged for as long as it runs: it writes host sysctls (read-only in an
unprivileged container), loads kernel modules, and installs the plugin, a self-contained Python
runtime for it, and the network configuration into the host's CNI directories.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from gossip.hostport import parse_host_port
from weavepy import __version__
from weavepy.config import DEFAULT_API_PORT, DEFAULT_METRICS_PORT, SETTINGS_BY_NAME, parse_peer

__all__ = [
    "DEFAULT_IMAGE",
    "ManifestError",
    "ManifestSettings",
    "manifest_command",
    "render_files",
    "render_objects",
    "render_uninstall_objects",
    "render_yaml",
]

DEFAULT_IMAGE = f"weavepy:{__version__}"
APP = "weavepy"
KEYRING_SECRET = "weavepy-keyring"
KEYRING_MOUNT = "/etc/weavepy/keyring"
HOST_RUNTIME_DIR = "/opt/weavepy"  # the plugin's Python runtime on the host (see node-init.sh)
DEFAULT_METRICS_ADDR = "0.0.0.0:6782"  # Weave's metrics port; scraped over the node's address
LABELS = {"app.kubernetes.io/name": APP}


class ManifestError(ValueError):
    """The settings cannot be rendered; `problems` holds one readable line per mistake."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class ManifestSettings:
    """What `weavepy manifest` can set. Agent settings are strings as a user types them; None
    leaves the agent's default."""

    namespace: str = "kube-system"
    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    ipalloc_range: str | None = None
    block_prefix: str | None = None
    gossip_port: str | None = None
    vxlan_port: str | None = None
    vxlan_vni: str | None = None
    mtu: str | None = None
    profile: str | None = None
    peers: tuple[str, ...] = ()
    kube_peers: bool = True
    ipam: str | None = None  # weavepy (the agent's default) or kubernetes
    metrics_addr: str = DEFAULT_METRICS_ADDR
    encrypt: bool = True
    keyring: str | None = field(default=None, repr=False)  # keyring file text to put in a Secret
    log_level: str = "info"
    privileged: bool = False
    host_pid: bool = False
    tun_device: bool = False
    cni_bin_dir: str = "/opt/cni/bin"
    cni_conf_dir: str = "/etc/cni/net.d"
    state_dir: str = "/var/lib/weavepy"
    run_dir: str = "/run/weavepy"


_AGENT_ENV = (  # (settings field, agent setting, environment variable)
    ("ipalloc_range", "ipalloc_range", "WEAVEPY_IPALLOC_RANGE"),
    ("block_prefix", "block_prefix", "WEAVEPY_BLOCK_PREFIX"),
    ("gossip_port", "gossip_port", "WEAVEPY_GOSSIP_PORT"),
    ("vxlan_port", "vxlan_port", "WEAVEPY_VXLAN_PORT"),
    ("vxlan_vni", "vxlan_vni", "WEAVEPY_VXLAN_VNI"),
    ("mtu", "mtu", "WEAVEPY_MTU"),
    ("profile", "profile", "WEAVEPY_PROFILE"),
    ("ipam", "ipam", "WEAVEPY_IPAM"),
)


def _check(settings: ManifestSettings) -> list[str]:
    problems: list[str] = []
    for attr, setting, _ in _AGENT_ENV:
        value = getattr(settings, attr)
        if value is None:
            continue
        try:
            SETTINGS_BY_NAME[setting].parse(value)
        except ValueError as exc:
            problems.append(f"--{attr.replace('_', '-')}: {exc}")
    if settings.ipam == "kubernetes" and not settings.kube_peers:
        problems.append("--ipam kubernetes takes each node's podCIDR from the Kubernetes API: "
                        "drop --no-kube-peers")
    for peer in settings.peers:
        try:
            parse_peer(peer)
        except ValueError as exc:
            problems.append(f"--peer {peer}: {exc}")
    try:
        _metrics_port(settings.metrics_addr)
    except ValueError as exc:
        problems.append(f"--metrics-addr: must be IPv4-ADDRESS:PORT: {exc}")
    if not settings.namespace or len(settings.namespace) > 63 or not all(
            c.isdigit() or ("a" <= c <= "z") or c == "-" for c in settings.namespace):
        problems.append(f"--namespace: {settings.namespace!r} is not a namespace name "
                        f"(lowercase letters, digits and '-')")
    if not settings.image or any(c.isspace() for c in settings.image):
        problems.append(f"--image: {settings.image!r} is not an image reference")
    if settings.keyring is not None:
        if not settings.encrypt:
            problems.append("--no-encrypt and a keyring do not go together")
        else:
            problems.extend(_keyring_problems(settings.keyring))
    for attr in ("cni_bin_dir", "cni_conf_dir", "state_dir", "run_dir"):
        if not getattr(settings, attr).startswith("/"):
            problems.append(f"--{attr.replace('_', '-')}: must be an absolute path")
    return problems


def _keyring_problems(text: str) -> list[str]:
    keys = [line.strip() for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]
    if text.strip().startswith("["):
        return []  # serf's JSON list; the agent parses it
    if not keys:
        return ["the keyring has no key (one base64 key per line; the first is primary)"]
    problems = []
    for number, key in enumerate(keys, 1):
        try:
            raw = base64.b64decode(key, validate=True)
        except ValueError:
            problems.append(f"keyring key {number} is not base64 (make one with `weavepy "
                            f"keygen`)")
            continue
        if len(raw) not in (16, 24, 32):
            problems.append(f"keyring key {number} decodes to {len(raw)} bytes, not 16, 24 "
                            f"or 32")
    return problems


def _meta(name: str, settings: ManifestSettings, *, namespaced: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespaced:
        meta["namespace"] = settings.namespace
    meta["labels"] = {**LABELS, "app.kubernetes.io/version": __version__}
    return meta


def _config_data(settings: ManifestSettings) -> dict[str, str]:
    data: dict[str, str] = {}
    for attr, _, env in _AGENT_ENV:
        value = getattr(settings, attr)
        if value is not None:
            data[env] = str(value)
    data["WEAVEPY_KUBE_PEERS"] = "true" if settings.kube_peers else "false"
    if settings.peers:
        data["WEAVEPY_PEERS"] = " ".join(settings.peers)
    data["WEAVEPY_METRICS_ADDR"] = settings.metrics_addr
    data["WEAVEPY_API_ADDR"] = f"127.0.0.1:{DEFAULT_API_PORT}"
    data["WEAVEPY_STATE_DIR"] = settings.state_dir
    data["WEAVEPY_RUN_DIR"] = settings.run_dir
    if settings.encrypt:
        data["WEAVEPY_KEYRING_FILE"] = f"{KEYRING_MOUNT}/keyring"
    return data


def _host_path(name: str, path: str, kind: str) -> dict[str, Any]:
    return {"name": name, "hostPath": {"path": path, "type": kind}}


def _probe(path: str, period: int, failures: int, timeout: int = 3) -> dict[str, Any]:
    return {"httpGet": {"host": "127.0.0.1", "port": DEFAULT_API_PORT, "path": path},
            "periodSeconds": period, "failureThreshold": failures, "timeoutSeconds": timeout}


def _daemonset(settings: ManifestSettings, config_hash: str) -> dict[str, Any]:
    init_mounts = [
        {"name": "cni-bin", "mountPath": "/opt/cni/bin"},
        {"name": "cni-conf", "mountPath": "/etc/cni/net.d"},
        {"name": "host-runtime", "mountPath": HOST_RUNTIME_DIR},
        {"name": "lib-modules", "mountPath": "/lib/modules", "readOnly": True},
    ]
    agent_mounts: list[dict[str, Any]] = [
        {"name": "state", "mountPath": settings.state_dir},
        {"name": "run", "mountPath": settings.run_dir},
        {"name": "netns", "mountPath": "/var/run/netns", "mountPropagation": "HostToContainer"},
        {"name": "cni-conf", "mountPath": "/etc/cni/net.d", "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        _host_path("state", settings.state_dir, "DirectoryOrCreate"),
        _host_path("run", settings.run_dir, "DirectoryOrCreate"),
        _host_path("netns", "/var/run/netns", "DirectoryOrCreate"),
        _host_path("cni-bin", settings.cni_bin_dir, "DirectoryOrCreate"),
        _host_path("cni-conf", settings.cni_conf_dir, "DirectoryOrCreate"),
        _host_path("host-runtime", HOST_RUNTIME_DIR, "DirectoryOrCreate"),
        _host_path("lib-modules", "/lib/modules", "Directory"),
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]
    if settings.encrypt:
        agent_mounts.append({"name": "keyring", "mountPath": KEYRING_MOUNT, "readOnly": True})
        volumes.append({"name": "keyring", "secret": {
            "secretName": KEYRING_SECRET, "defaultMode": 0o400,
            "items": [{"key": "keyring", "path": "keyring"}]}})
    if settings.tun_device:
        agent_mounts.append({"name": "tun", "mountPath": "/dev/net/tun"})
        volumes.append(_host_path("tun", "/dev/net/tun", "CharDevice"))

    agent_security: dict[str, Any]
    if settings.privileged:
        agent_security = {"privileged": True, "readOnlyRootFilesystem": True}
    else:
        agent_security = {
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN"]},
        }
    env: list[dict[str, Any]] = [
        {"name": "WEAVEPY_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    ]
    pod_spec: dict[str, Any] = {
        "serviceAccountName": APP,
        "hostNetwork": True,
        "hostPID": settings.host_pid,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "priorityClassName": "system-node-critical",
        "tolerations": [{"operator": "Exists"}],
        "terminationGracePeriodSeconds": 30,
        "initContainers": [{
            "name": "install-cni",
            "image": settings.image,
            "imagePullPolicy": settings.image_pull_policy,
            "command": ["/usr/lib/weavepy/node-init.sh"],
            "args": ["--cni-bin-dir", "/opt/cni/bin", "--cni-conf-dir", "/etc/cni/net.d",
                     "--runtime-dir", HOST_RUNTIME_DIR, "--socket",
                     f"{settings.run_dir}/cni.sock"],
            "securityContext": {"privileged": True},
            "volumeMounts": init_mounts,
        }],
        "containers": [{
            "name": APP,
            "image": settings.image,
            "imagePullPolicy": settings.image_pull_policy,
            "command": ["weavepy", "--log-level", settings.log_level, "launch"],
            "envFrom": [{"configMapRef": {"name": f"{APP}-config"}}],
            "env": env,
            "ports": [{"name": "gossip-tcp", "containerPort": _port(settings.gossip_port, 6783),
                       "protocol": "TCP"},
                      {"name": "gossip-udp", "containerPort": _port(settings.gossip_port, 6783),
                       "protocol": "UDP"},
                      {"name": "vxlan", "containerPort": _port(settings.vxlan_port, 8472),
                       "protocol": "UDP"},
                      {"name": "metrics", "containerPort": _metrics_port(settings.metrics_addr),
                       "protocol": "TCP"}],
            "securityContext": agent_security,
            "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
            "startupProbe": _probe("/healthz", 2, 60),
            "livenessProbe": _probe("/healthz", 10, 6, timeout=5),
            "readinessProbe": _probe("/readyz", 5, 2),
            "volumeMounts": agent_mounts,
        }],
        "volumes": volumes,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _meta(APP, settings),
        "spec": {
            "selector": {"matchLabels": dict(LABELS)},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "minReadySeconds": 5,
            "template": {
                "metadata": {"labels": dict(LABELS),
                             "annotations": {"weavepy.io/config-hash": config_hash}},
                "spec": pod_spec,
            },
        },
    }


def _metrics_port(metrics_addr: str) -> int:
    """The port of `IPV4[:PORT]` (Weave's 6782 if none); HostPortError if it is not that."""
    return parse_host_port(metrics_addr, default_port=DEFAULT_METRICS_PORT, hosts="ipv4")[1]


def _port(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def render_objects(settings: ManifestSettings) -> list[dict[str, Any]]:
    """Every object, in apply order; ManifestError if a setting is wrong."""
    problems = _check(settings)
    if problems:
        raise ManifestError(problems)
    objects: list[dict[str, Any]] = []
    if settings.namespace != "kube-system":
        objects.append({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": _meta(settings.namespace, settings, namespaced=False)})
    objects.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(APP, settings)})
    objects.append({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": _meta(APP, settings, namespaced=False),
        "rules": [
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
            # NetworkPolicy (docs/policy.md): the policies and the pods and namespaces they
            # select, watched by every agent
            {"apiGroups": [""], "resources": ["pods", "namespaces"],
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
             "verbs": ["get", "list", "watch"]},
        ],
    })
    objects.append({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": _meta(APP, settings, namespaced=False),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": APP},
        "subjects": [{"kind": "ServiceAccount", "name": APP,
                      "namespace": settings.namespace}],
    })
    data = _config_data(settings)
    objects.append({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": _meta(f"{APP}-config", settings), "data": data})
    if settings.keyring is not None:
        text = settings.keyring if settings.keyring.endswith("\n") else settings.keyring + "\n"
        objects.append({"apiVersion": "v1", "kind": "Secret",
                        "metadata": _meta(KEYRING_SECRET, settings), "type": "Opaque",
                        "data": {"keyring": base64.b64encode(text.encode()).decode()}})
    digest = hashlib.sha256(repr(sorted(data.items())).encode()).hexdigest()[:16]
    objects.append(_daemonset(settings, digest))
    return objects


def render_uninstall_objects(settings: ManifestSettings) -> list[dict[str, Any]]:
    """The DaemonSet that removes weavepy from every node, once weavepy's own objects are
    deleted: its init container runs `node-init.sh --uninstall` (the conflist, the plugin, the
    plugin's runtimes, then `weavepy reset`: devices, pod veths, state); then it idles, so
    `kubectl rollout status` shows when every node is done. ManifestError if a setting is
    wrong."""
    problems = _check(settings)
    if problems:
        raise ManifestError(problems)
    name = f"{APP}-uninstall"
    labels = {"app.kubernetes.io/name": name}
    mounts = [
        {"name": "cni-bin", "mountPath": "/opt/cni/bin"},
        {"name": "cni-conf", "mountPath": "/etc/cni/net.d"},
        {"name": "host-runtime", "mountPath": HOST_RUNTIME_DIR},
        {"name": "state", "mountPath": settings.state_dir},
        {"name": "run", "mountPath": settings.run_dir},
    ]
    volumes = [
        _host_path("cni-bin", settings.cni_bin_dir, "DirectoryOrCreate"),
        _host_path("cni-conf", settings.cni_conf_dir, "DirectoryOrCreate"),
        _host_path("host-runtime", HOST_RUNTIME_DIR, "DirectoryOrCreate"),
        _host_path("state", settings.state_dir, "DirectoryOrCreate"),
        _host_path("run", settings.run_dir, "DirectoryOrCreate"),
    ]
    pod_spec: dict[str, Any] = {
        "hostNetwork": True,  # `weavepy reset` removes the node's devices
        "tolerations": [{"operator": "Exists"}],
        "terminationGracePeriodSeconds": 1,
        "initContainers": [{
            "name": "uninstall",
            "image": settings.image,
            "imagePullPolicy": settings.image_pull_policy,
            "command": ["/usr/lib/weavepy/node-init.sh"],
            "args": ["--uninstall", "--cni-bin-dir", "/opt/cni/bin", "--cni-conf-dir",
                     "/etc/cni/net.d", "--runtime-dir", HOST_RUNTIME_DIR,
                     "--state-dir", settings.state_dir, "--run-dir", settings.run_dir],
            "securityContext": {"privileged": True},
            "volumeMounts": mounts,
        }],
        "containers": [{
            "name": "done",
            "image": settings.image,
            "imagePullPolicy": settings.image_pull_policy,
            "command": ["sleep", "infinity"],
            "securityContext": {"readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
            "resources": {"requests": {"cpu": "1m", "memory": "8Mi"}},
        }],
        "volumes": volumes,
    }
    objects: list[dict[str, Any]] = []
    if settings.namespace != "kube-system":
        objects.append({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": _meta(settings.namespace, settings, namespaced=False)})
    objects.append({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": name, "namespace": settings.namespace,
                     "labels": {**labels, "app.kubernetes.io/version": __version__}},
        "spec": {"selector": {"matchLabels": dict(labels)},
                 "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec}},
    })
    return objects


def _dump(objects: Sequence[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False, width=100)


def render_yaml(settings: ManifestSettings) -> str:
    """One multi-document YAML of every object, for `kubectl apply -f -`."""
    header = (f"# weavepy {__version__} on Kubernetes, rendered by `weavepy manifest`.\n"
              f"# Why each permission is needed: deploy/daemonset.yaml and docs/kubernetes.md.\n")
    return header + "---\n" + _dump(render_objects(settings))


def render_uninstall_yaml(settings: ManifestSettings) -> str:
    """The uninstall DaemonSet as YAML, for `kubectl apply -f -`."""
    header = (f"# Removes weavepy {__version__} from every node (`weavepy manifest --uninstall`):"
              f"\n# apply it after deleting weavepy's objects, delete it once its pods run.\n")
    return header + "---\n" + _dump(render_uninstall_objects(settings))


def render_files(settings: ManifestSettings) -> dict[str, str]:
    """The objects split like deploy/: rbac.yaml, configmap.yaml, daemonset.yaml (and
    namespace.yaml, secret.yaml when rendered)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    file_of = {"Namespace": "namespace.yaml", "ServiceAccount": "rbac.yaml",
               "ClusterRole": "rbac.yaml", "ClusterRoleBinding": "rbac.yaml",
               "ConfigMap": "configmap.yaml", "Secret": "secret.yaml",
               "DaemonSet": "daemonset.yaml"}
    for obj in render_objects(settings):
        groups.setdefault(file_of[obj["kind"]], []).append(obj)
    return {name: _dump(objs) for name, objs in groups.items()}


# ---------------------------------------------------------------------------------------------
# The command


@click.command("manifest")
@click.option("--ipalloc-range", metavar="CIDR", help="the cluster's pod address range "
              "[agent default 10.32.0.0/12]")
@click.option("--block-prefix", metavar="N", help="prefix length of the blocks the range is "
              "cut into [agent default 24]")
@click.option("--image", default=DEFAULT_IMAGE, show_default=True,
              help="the weavepy image (build it with deploy/Containerfile)")
@click.option("--image-pull-policy", default="IfNotPresent", show_default=True,
              type=click.Choice(["Always", "IfNotPresent", "Never"]))
@click.option("--namespace", default="kube-system", show_default=True)
@click.option("--gossip-port", metavar="PORT", help="gossip port, TCP and UDP [6783]")
@click.option("--vxlan-port", metavar="PORT", help="VXLAN UDP port [8472]")
@click.option("--vxlan-vni", metavar="VNI", help="VXLAN network identifier [1]")
@click.option("--mtu", metavar="MTU", help="pod MTU [auto: underlay MTU - 50]")
@click.option("--profile", type=click.Choice(["lan", "wan", "local"]),
              help="gossip timing profile [lan]")
@click.option("--peer", "peers", multiple=True, metavar="HOST[:PORT]",
              help="a peer outside the cluster to join as well (repeatable)")
@click.option("--kube-peers/--no-kube-peers", default=True, show_default=True,
              help="find peers through the Kubernetes API (the nodes' InternalIPs)")
@click.option("--ipam", type=click.Choice(["weavepy", "kubernetes"]),
              help="who owns pod address space: weavepy's own IPAM, or each Node's podCIDR "
              "(kube-controller-manager --allocate-node-cidrs; --ipalloc-range must contain "
              "the cluster CIDR) [agent default weavepy]")
@click.option("--metrics-addr", default=DEFAULT_METRICS_ADDR, show_default=True,
              metavar="IP:PORT", help="where the agent serves Prometheus metrics")
@click.option("--encrypt/--no-encrypt", default=True, show_default=True,
              help="encrypt gossip with the keyring in the Secret weavepy-keyring")
@click.option("--keyring-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="put this keyring (one base64 key per line) into the Secret")
@click.option("--generate-key", is_flag=True, help="put a new random key into the Secret "
              "(apply once; re-applying output with a new key rotates it everywhere at once)")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--privileged", is_flag=True, help="run the agent privileged instead of with "
              "NET_ADMIN and SYS_ADMIN (runtimes that refuse /dev/net/tun otherwise)")
@click.option("--host-pid", is_flag=True, help="share the host's PID namespace (runtimes that "
              "name pod namespaces /proc/PID/ns/net, such as cri-dockerd)")
@click.option("--tun-device", is_flag=True, help="give the agent /dev/net/tun (the "
              "userspace encrypted data path)")
@click.option("--cni-bin-dir", default="/opt/cni/bin", show_default=True,
              help="the host's CNI plugin directory (GKE: /home/kubernetes/bin)")
@click.option("--cni-conf-dir", default="/etc/cni/net.d", show_default=True,
              help="the host's CNI configuration directory")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="write rbac.yaml, configmap.yaml, daemonset.yaml (and secret.yaml) here "
              "instead of one document to stdout")
@click.option("--uninstall", is_flag=True, help="render the DaemonSet that removes weavepy "
              "from every node instead (its plugin, configuration, runtimes, devices and "
              "state); apply it after deleting weavepy's objects")
def manifest_command(ipalloc_range: str | None, block_prefix: str | None, image: str,
                     image_pull_policy: str, namespace: str, gossip_port: str | None,
                     vxlan_port: str | None, vxlan_vni: str | None, mtu: str | None,
                     profile: str | None, peers: tuple[str, ...], kube_peers: bool,
                     ipam: str | None, metrics_addr: str, encrypt: bool, keyring_file: Path | None,
                     generate_key: bool, log_level: str, privileged: bool, host_pid: bool,
                     tun_device: bool, cni_bin_dir: str, cni_conf_dir: str,
                     output_dir: Path | None, uninstall: bool) -> None:
    """Render the Kubernetes manifests: `weavepy manifest ... | kubectl apply -f -`."""
    if keyring_file is not None and generate_key:
        raise click.ClickException("--keyring-file and --generate-key both set the key; "
                                   "use one")
    keyring = None
    if keyring_file is not None:
        try:
            keyring = keyring_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise click.ClickException(f"--keyring-file {keyring_file}: {exc}") from None
    elif generate_key:
        keyring = base64.b64encode(secrets.token_bytes(32)).decode() + "\n"
    settings = ManifestSettings(
        namespace=namespace, image=image, image_pull_policy=image_pull_policy,
        ipalloc_range=ipalloc_range, block_prefix=block_prefix, gossip_port=gossip_port,
        vxlan_port=vxlan_port, vxlan_vni=vxlan_vni, mtu=mtu, profile=profile, peers=peers,
        kube_peers=kube_peers, ipam=ipam, metrics_addr=metrics_addr, encrypt=encrypt,
        keyring=keyring, log_level=log_level, privileged=privileged, host_pid=host_pid,
        tun_device=tun_device, cni_bin_dir=cni_bin_dir, cni_conf_dir=cni_conf_dir)
    try:
        if uninstall:
            text = render_uninstall_yaml(settings)
            files = {"uninstall.yaml": text}
        elif output_dir is not None:
            files = render_files(settings)
        else:
            text = render_yaml(settings)
    except ManifestError as exc:
        for problem in exc.problems[:-1]:
            click.echo(f"Error: {problem}", err=True)
        raise click.ClickException(exc.problems[-1]) from None
    if uninstall:
        click.echo(f"note: delete weavepy's objects first; once every {APP}-uninstall pod runs, "
                   f"the nodes are clean: then `kubectl -n {namespace} delete daemonset "
                   f"{APP}-uninstall`", err=True)
    elif encrypt and keyring is None:
        click.echo(f"note: the agents read their gossip key from the Secret {KEYRING_SECRET} "
                   f"in {namespace}; create it once, before the pods can start:\n"
                   f"  weavepy keygen > keyring && kubectl -n {namespace} create secret "
                   f"generic {KEYRING_SECRET} --from-file=keyring=keyring", err=True)
    elif not encrypt:
        click.echo("warning: gossip will NOT be encrypted: anyone who reaches the gossip port "
                   "can join the cluster and claim address space", err=True)
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        for name, body in files.items():
            (output_dir / name).write_text(body)
            if name == "secret.yaml":
                (output_dir / name).chmod(0o600)
        click.echo(f"wrote {', '.join(sorted(files))} to {output_dir}", err=True)
    else:
        click.echo(text, nl=False)
