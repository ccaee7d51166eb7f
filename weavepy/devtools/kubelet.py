"""A kubelet stand-in: runs a Kubernetes pod spec with podman on a sandbox node.

No Kubernetes runs here (no API server, no kubelet), yet the DaemonSet that `weavepy manifest`
prints should run for real. This module does a kubelet's part of that, mechanically:

* `translate()` is sans-IO. From a pod spec (a DaemonSet's template), the ConfigMaps and
  Secrets the manifest ships, and a node, it returns a `PodPlan`: the volumes to prepare and,
  for each init container and each container in order, its `podman run` arguments and its
  probes. Every field of the spec is translated or listed in `IGNORED` with the reason a
  kubelet-less run may leave it; anything else raises `UnsupportedSpec`, so a manifest change
  the stand-in cannot honour fails loudly instead of being dropped.
* `PodmanHost` is a sandbox node seen as a container host: the node's network namespace, plus
  a mount namespace of its own in which `/run` and `/opt` are private tmpfs and the host paths
  the node's own software shares with the pod (the CNI directories, the plugin's runtime, the
  agent's socket, the pod network namespaces) are the node's directories, at their real paths.
  podman runs there with its own storage and configuration, so nodes share nothing but the
  read-only image store.

How the spec maps (what a kubelet and containerd do): `hostNetwork` is the node's network
namespace (`--network ns:`), never the machine's; a hostPath P is the node's directory ROOT/P;
with an API server (`ApiAccess`, a stand-in too), every container gets
$KUBERNETES_SERVICE_HOST/PORT and a pod with a service account its token and CA;
a Secret volume is written under the pod's directory and mounted read-only; an emptyDir of
medium Memory is a tmpfs of its size limit; `command` replaces the image's entrypoint and
`args` its command; env comes from `envFrom` first, then `env` (field references resolved for
the node); capabilities, privileged and readOnlyRootFilesystem carry over; seccomp is
unconfined (the kubelet's default without a seccompProfile); terminationGracePeriodSeconds is
the stop timeout. Probes are returned as data and run by `PodmanHost.probe` the way the kubelet
runs them: httpGet from the node's network namespace, exec inside the container.

The rules it keeps: nothing runs in the machine's own network namespace; everything it creates
lives under the node's directory or in the node's namespaces, and `close()` removes it.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weavepy.devtools.sandbox import ManagedProcess, SandboxError, SandboxNode

__all__ = ["IGNORED", "SERVICE_ACCOUNT_MOUNT", "WEAVEPY_VIEWS", "ApiAccess", "ContainerPlan",
           "NodeContext", "PodPlan", "PodmanHost", "UnsupportedSpec", "VolumePlan", "translate"]

# Fields a kubelet-less run leaves alone, and why. With the translated ones below they are all
# the stand-in accepts: any other field fails.
IGNORED = {
    "dnsPolicy": "host network: the container uses the node's resolver configuration",
    "priorityClassName": "scheduling: the pod is placed on its node by hand",
    "tolerations": "scheduling: the pod is placed on its node by hand",
    "resources": "scheduling requests; no limits are set",
    "ports": "host network: containerPorts are informational",
}
POD_FIELDS = {"hostNetwork", "hostPID", "initContainers", "containers", "volumes",
              "serviceAccountName", "terminationGracePeriodSeconds"} | IGNORED.keys()
CONTAINER_FIELDS = {"name", "image", "imagePullPolicy", "command", "args", "env", "envFrom",
                    "securityContext", "volumeMounts", "startupProbe", "livenessProbe",
                    "readinessProbe"} | IGNORED.keys()
SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
SECURITY_FIELDS = {"privileged", "readOnlyRootFilesystem", "capabilities"}
MOUNT_FIELDS = {"name", "mountPath", "readOnly", "mountPropagation"}
PROPAGATION = {None: "rprivate", "None": "rprivate", "HostToContainer": "rslave",
               "Bidirectional": "rshared"}
PULL = {"IfNotPresent": "missing", "Never": "never", "Always": "always"}
PROBE_KINDS = ("startupProbe", "livenessProbe", "readinessProbe")


class UnsupportedSpec(ValueError):
    """The pod spec asks for something the stand-in does not do (the message says what)."""


@dataclass(frozen=True)
class ApiAccess:
    """The API server as the kubelet hands it to pods: the `kubernetes` Service's address (as
    $KUBERNETES_SERVICE_HOST/PORT) and, for a pod with a service account, its token and the
    cluster's CA (mounted at SERVICE_ACCOUNT_MOUNT)."""

    host: str
    port: int
    token: str
    ca_pem: bytes


@dataclass(frozen=True)
class NodeContext:
    """The node a pod runs on, as the translation needs it."""

    name: str  # spec.nodeName
    address: str  # status.hostIP (and, with host network, status.podIP)
    root: Path  # the node's filesystem: hostPath P is ROOT/P
    netns_path: str  # the node's network namespace (host networking)
    cgroup_parent: str  # where the pod's cgroups go (cgroupfs)
    api: ApiAccess | None = None  # None: no API server (service accounts get no token)


@dataclass(frozen=True)
class VolumePlan:
    """Something to prepare on the node before a container mounts it."""

    name: str
    kind: str  # "hostPath" | "secret" | "emptyDir"
    path: Path | None = None  # hostPath: the node's directory; secret: where its files go
    host_path_type: str = ""  # hostPath's type ("" = no check)
    files: tuple[tuple[str, bytes, int], ...] = ()  # secret: (relative path, content, mode)
    tmpfs_bytes: int | None = None  # emptyDir in memory: its size limit


@dataclass(frozen=True)
class ContainerPlan:
    name: str  # the container's name in the spec
    podman_name: str  # its name on the node
    init: bool
    run_args: tuple[str, ...]  # `podman run` arguments after `run` (no --detach/--rm)
    stop_timeout: int
    probes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class PodPlan:
    pod_name: str
    volumes: tuple[VolumePlan, ...]
    init_containers: tuple[ContainerPlan, ...]
    containers: tuple[ContainerPlan, ...]

    def container(self, name: str) -> ContainerPlan:
        for plan in (*self.init_containers, *self.containers):
            if plan.name == name:
                return plan
        raise KeyError(f"no container {name} in pod {self.pod_name}")


def _unknown(what: str, spec: Mapping[str, Any], known: set[str]) -> None:
    extra = sorted(set(spec) - known)
    if extra:
        raise UnsupportedSpec(f"{what}: the stand-in does not handle {', '.join(extra)}")


def _objects_by(objects: Sequence[Mapping[str, Any]], kind: str) -> dict[str, Mapping[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o.get("kind") == kind}


def _secret_data(secret: Mapping[str, Any]) -> dict[str, bytes]:
    data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    data.update({k: v.encode() for k, v in (secret.get("stringData") or {}).items()})
    return data


def _field_ref(path: str, node: NodeContext, pod_name: str) -> str:
    values = {"spec.nodeName": node.name, "metadata.name": pod_name,
              "status.hostIP": node.address, "status.podIP": node.address}
    if path not in values:
        raise UnsupportedSpec(f"env fieldRef {path} is not resolved by the stand-in")
    return values[path]


def _environment(container: Mapping[str, Any], node: NodeContext, pod_name: str,
                 config_maps: Mapping[str, Mapping[str, Any]]) -> list[str]:
    env: dict[str, str] = {}
    if node.api is not None:  # the kubelet's service variables come first; the pod's win
        env.update(KUBERNETES_SERVICE_HOST=node.api.host,
                   KUBERNETES_SERVICE_PORT=str(node.api.port))
    for source in container.get("envFrom", []):
        _unknown("envFrom", source, {"configMapRef"})
        name = source["configMapRef"]["name"]
        if name not in config_maps:
            raise UnsupportedSpec(f"envFrom: ConfigMap {name} is not in the manifest")
        env.update({k: str(v) for k, v in (config_maps[name].get("data") or {}).items()})
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = str(variable["value"])
        elif "fieldRef" in variable.get("valueFrom", {}):
            env[variable["name"]] = _field_ref(variable["valueFrom"]["fieldRef"]["fieldPath"],
                                               node, pod_name)
        else:
            raise UnsupportedSpec(f"env {variable['name']}: only value and fieldRef")
    return [arg for key, value in env.items() for arg in ("--env", f"{key}={value}")]


def _volumes(spec: Mapping[str, Any], node: NodeContext, pod_dir: Path,
             secrets: Mapping[str, Mapping[str, Any]]) -> dict[str, VolumePlan]:
    plans: dict[str, VolumePlan] = {}
    for volume in spec.get("volumes", []):
        name = volume["name"]
        if "hostPath" in volume:
            host_path = volume["hostPath"]["path"]
            if not host_path.startswith("/"):
                raise UnsupportedSpec(f"volume {name}: hostPath {host_path} is not absolute")
            kind = volume["hostPath"].get("type", "")
            if kind not in ("", "DirectoryOrCreate", "Directory"):
                raise UnsupportedSpec(f"volume {name}: hostPath type {kind}")
            plans[name] = VolumePlan(name, "hostPath", node.root / host_path.lstrip("/"),
                                     host_path_type=kind)
        elif "secret" in volume:
            source = volume["secret"]
            _unknown(f"volume {name}", source, {"secretName", "defaultMode", "items"})
            secret_name = source["secretName"]
            if secret_name not in secrets:
                raise UnsupportedSpec(f"volume {name}: Secret {secret_name} is not in the "
                                      f"manifest (a kubelet would wait for it)")
            data = _secret_data(secrets[secret_name])
            mode = int(source.get("defaultMode", 0o644))
            items = source.get("items") or [{"key": k, "path": k} for k in sorted(data)]
            files = []
            for item in items:
                if item["key"] not in data:
                    raise UnsupportedSpec(f"volume {name}: Secret {secret_name} has no key "
                                          f"{item['key']}")
                files.append((item["path"], data[item["key"]], int(item.get("mode", mode))))
            plans[name] = VolumePlan(name, "secret", pod_dir / "volumes" / name,
                                     files=tuple(files))
        elif "emptyDir" in volume:
            source = volume["emptyDir"] or {}
            if source.get("medium") != "Memory":
                plans[name] = VolumePlan(name, "emptyDir", pod_dir / "volumes" / name)
            else:
                plans[name] = VolumePlan(name, "emptyDir", None,
                                         tmpfs_bytes=_quantity(source.get("sizeLimit", "64Mi")))
        else:
            raise UnsupportedSpec(f"volume {name}: only hostPath, secret and emptyDir")
    return plans


def _quantity(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "k": 1000, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if str(text).endswith(suffix):
            return int(str(text)[: -len(suffix)]) * factor
    return int(text)


def _mounts(container: Mapping[str, Any], volumes: Mapping[str, VolumePlan]) -> list[str]:
    args: list[str] = []
    for mount in container.get("volumeMounts", []):
        _unknown(f"volumeMount {mount.get('name')}", mount, MOUNT_FIELDS)
        volume = volumes.get(mount["name"])
        if volume is None:
            raise UnsupportedSpec(f"volumeMount {mount['name']}: no such volume")
        target = mount["mountPath"]
        if volume.tmpfs_bytes is not None:
            args += ["--mount", f"type=tmpfs,destination={target},tmpfs-size="
                     f"{volume.tmpfs_bytes}"]
            continue
        propagation = mount.get("mountPropagation")
        if propagation not in PROPAGATION:
            raise UnsupportedSpec(f"volumeMount {mount['name']}: propagation {propagation}")
        read_only = mount.get("readOnly", False) or volume.kind == "secret"
        options = ["ro" if read_only else "rw", PROPAGATION[propagation]]
        args += ["--volume", f"{volume.path}:{target}:{','.join(options)}"]
    return args


def _security(container: Mapping[str, Any]) -> list[str]:
    context = container.get("securityContext", {})
    _unknown(f"container {container['name']} securityContext", context, SECURITY_FIELDS)
    args = ["--security-opt", "seccomp=unconfined"]  # the kubelet's default (no profile set)
    if context.get("privileged"):
        args.append("--privileged")
    capabilities = context.get("capabilities", {})
    _unknown("capabilities", capabilities, {"add", "drop"})
    args += [arg for cap in capabilities.get("drop", []) for arg in ("--cap-drop", cap)]
    args += [arg for cap in capabilities.get("add", []) for arg in ("--cap-add", cap)]
    if context.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]
    return args


def _probes(container: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    probes: dict[str, Mapping[str, Any]] = {}
    for kind in PROBE_KINDS:
        probe = container.get(kind)
        if probe is None:
            continue
        handlers = [h for h in ("httpGet", "exec", "tcpSocket") if h in probe]
        if len(handlers) != 1:
            raise UnsupportedSpec(f"{kind}: needs exactly one of httpGet, exec, tcpSocket")
        probes[kind] = probe
    return probes


def translate(pod_spec: Mapping[str, Any], objects: Sequence[Mapping[str, Any]],
              node: NodeContext, pod_name: str, namespace: str = "default") -> PodPlan:
    """The podman runs (and volumes) that realise `pod_spec` on `node`; see the module doc."""
    _unknown("pod spec", pod_spec, POD_FIELDS)
    if not pod_spec.get("hostNetwork"):
        raise UnsupportedSpec("the stand-in runs host-network pods only")
    if pod_spec.get("hostPID"):
        raise UnsupportedSpec("hostPID would share the machine's PIDs, not the node's")
    grace = int(pod_spec.get("terminationGracePeriodSeconds", 30))
    pod_dir = node.root / "pods" / pod_name
    volumes = _volumes(pod_spec, node, pod_dir, _objects_by(objects, "Secret"))
    config_maps = _objects_by(objects, "ConfigMap")
    account: list[str] = []
    if pod_spec.get("serviceAccountName") and node.api is not None:
        # what the kubelet projects into every container of a pod with a service account
        token_dir = pod_dir / "volumes" / "kube-api-access"
        volumes["kube-api-access"] = VolumePlan("kube-api-access", "secret", token_dir, files=(
            ("token", node.api.token.encode(), 0o644), ("ca.crt", node.api.ca_pem, 0o644),
            ("namespace", namespace.encode(), 0o644)))
        account = ["--volume", f"{token_dir}:{SERVICE_ACCOUNT_MOUNT}:ro,rprivate"]

    def plan(container: Mapping[str, Any], init: bool) -> ContainerPlan:
        _unknown(f"container {container.get('name')}", container, CONTAINER_FIELDS)
        pull = container.get("imagePullPolicy", "IfNotPresent")
        podman_name = f"{pod_name}_{container['name']}"
        args = [
            "--name", podman_name, "--pull", PULL[pull],
            "--network", f"ns:{node.netns_path}", "--hostname", node.name,
            "--cgroup-parent", node.cgroup_parent, "--stop-timeout", str(grace),
            "--label", f"io.kubernetes.pod.name={pod_name}",
            "--label", f"io.kubernetes.container.name={container['name']}",
            *_security(container), *_environment(container, node, pod_name, config_maps),
            *_mounts(container, volumes), *account,
        ]
        if "command" in container:
            args += ["--entrypoint", json.dumps(container["command"])]
        args += [container["image"], *container.get("args", [])]
        return ContainerPlan(container["name"], podman_name, init, tuple(args), grace,
                             _probes(container))

    return PodPlan(
        pod_name, tuple(volumes.values()),
        tuple(plan(c, True) for c in pod_spec.get("initContainers", [])),
        tuple(plan(c, False) for c in pod_spec["containers"]),
    )


# ---------------------------------------------------------------------------------------------
# The node as a container host


PODMAN_STORAGE = """\
[storage]
driver = "overlay"
graphroot = "{root}/podman/storage"
runroot = "{root}/podman/run"

[storage.options]
additionalimagestores = [{image_stores}]
"""
# nofile/nproc: podman's defaults need CAP_SYS_RESOURCE, which this sandbox's root lacks.
PODMAN_CONFIG = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{root}/podman/events.log"
tmp_dir = "{root}/podman/tmp"

[network]
network_backend = "cni"
network_config_dir = "{root}/podman/net.d"
"""
PRIVATE_TMPFS = ("/run", "/opt")  # a node's own, in its mount namespace
# The host paths of weavepy's DaemonSet that the node's own software uses at their real paths
# (the container runtime puts pod namespaces in /var/run/netns and runs the CNI plugin, which
# finds its runtime in /opt/weavepy and the agent's socket in /run/weavepy): `views` for it.
WEAVEPY_VIEWS = ("/run/weavepy", "/var/run/netns", "/opt/weavepy", "/opt/cni/bin",
                 "/etc/cni/net.d")


def http_probe(host: str, port: int, path: str, timeout: float) -> tuple[bool, str]:
    """One httpGet probe from this network namespace: success is a status of 200 to 399."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read(2000).decode(errors="replace")
        return 200 <= response.status < 400, f"{response.status} {body}"
    except OSError as exc:
        return False, f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


class PodmanHost:
    """A sandbox node turned into a container host (see the module doc). `views` are the host
    paths the node's own software shares with its pods: each is the node's directory ROOT/P,
    mounted at P in the node's mount namespace (P must lie in a private tmpfs of the node, or
    exist already), as a shared mount, so mounts made under it later (pod network namespaces)
    reach the containers that mount it with HostToContainer propagation."""

    def __init__(self, node: SandboxNode, root: Path, image_stores: Sequence[Path],
                 views: Sequence[str]) -> None:
        self.node = node
        self.root = root
        self.image_stores = list(image_stores)
        self.views = list(views)
        self.holder: ManagedProcess | None = None
        self.running: dict[str, ContainerPlan] = {}
        self.cgroup_parent = f"/{node.netns}-kubelet"

    # -- set-up and teardown -------------------------------------------------------------------

    def context(self, api: ApiAccess | None = None) -> NodeContext:
        return NodeContext(self.node.name, self.node.underlay_ip, self.root,
                           f"/proc/{self._holder_pid()}/ns/net", self.cgroup_parent, api)

    def start(self) -> None:
        for sub in ("podman/storage", "podman/run", "podman/tmp", "podman/net.d"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        stores = ", ".join(json.dumps(str(s)) for s in self.image_stores)
        (self.root / "podman" / "storage.conf").write_text(
            PODMAN_STORAGE.format(root=self.root, image_stores=stores))
        (self.root / "podman" / "containers.conf").write_text(PODMAN_CONFIG.format(root=self.root))
        # `ip netns exec` gives a process a mount namespace with a fresh /sys and without the
        # cgroup hierarchies podman needs: go back to this process's mount namespace, and
        # take a private copy of it (propagation slave: nothing leaks back to the machine).
        self.holder = self.node.start("host", [
            "nsenter", f"--mount=/proc/{os.getpid()}/ns/mnt", "--",
            "unshare", "--mount", "--propagation", "slave", "--", "sleep", "infinity"])
        mine = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                if (os.readlink(f"/proc/{self.holder.pid}/ns/mnt") != mine and
                        Path(f"/proc/{self.holder.pid}/comm").read_text().strip() == "sleep"):
                    break
            if time.monotonic() > deadline or not self.holder.alive():
                raise SandboxError(f"the mount namespace of {self.node.name} did not start: "
                                   f"{self.holder.log_text()[-500:]}")
            time.sleep(0.02)
        script = ["set -e"]
        script += [f"mount -t tmpfs -o mode=0755 {self.node.netns}-node {shlex.quote(p)}"
                   for p in PRIVATE_TMPFS]
        for view in self.views:
            source = self.root / view.lstrip("/")
            source.mkdir(parents=True, exist_ok=True)
            real = os.path.realpath(view)
            if not (any(real.startswith(p + "/") for p in PRIVATE_TMPFS) or Path(real).is_dir()):
                raise SandboxError(f"{view} is neither in a private tmpfs of the node nor an "
                                   f"existing directory: it cannot be a mount point")
            s, v = shlex.quote(str(source)), shlex.quote(view)
            script += [f"mkdir -p {v}", f"mount --bind {s} {s}", f"mount --make-shared {s}",
                       f"mount --bind {s} {v}"]
        self.host_shell("\n".join(script))

    def close(self) -> None:
        """Remove every container of this node, then its namespace holder; the node's
        directory is the caller's to remove."""
        if self.holder is not None and self.holder.alive():
            with contextlib.suppress(Exception):
                self.podman("rm", "--force", "--all", "--time", "5", timeout=120, check=False)
        self.running.clear()
        if self.holder is not None:
            self.holder.stop(timeout=5)
        cgroups = Path("/sys/fs/cgroup")
        parent = self.cgroup_parent.lstrip("/")
        for directory in [cgroups / parent, *(h / parent for h in cgroups.iterdir()
                                              if h.is_dir())]:
            with contextlib.suppress(OSError):
                directory.rmdir()

    # -- running things on the node --------------------------------------------------------------

    def _holder_pid(self) -> int:
        if self.holder is None or not self.holder.alive():
            raise SandboxError(f"the node host of {self.node.name} is not running")
        return self.holder.pid

    def enter(self) -> list[str]:
        """An argv prefix that runs a command in the node's mount namespace (prefix it to
        `node.run` or `node.start` argv: the network namespace is the node's then)."""
        return ["nsenter", f"--mount=/proc/{self._holder_pid()}/ns/mnt", "--"]

    def host_shell(self, script: str, timeout: float = 60) -> str:
        return self.node.run([*self.enter(), "sh", "-c", script], timeout=timeout).stdout

    def podman(self, *args: str, timeout: float = 120, check: bool = True,
               input: str | None = None) -> subprocess.CompletedProcess[str]:
        env = [f"CONTAINERS_CONF={self.root}/podman/containers.conf",
               f"CONTAINERS_STORAGE_CONF={self.root}/podman/storage.conf"]
        return self.node.run([*self.enter(), "env", *env, "podman", *args], check=check,
                             timeout=timeout, input=input)

    # -- pods ------------------------------------------------------------------------------------

    def prepare(self, plan: PodPlan) -> None:
        """Make the pod's volumes on the node, as the kubelet does before its containers."""
        for volume in plan.volumes:
            if volume.kind == "hostPath" and volume.path is not None:
                if volume.host_path_type == "Directory" and not volume.path.is_dir():
                    raise SandboxError(f"hostPath {volume.name}: {volume.path} is not a "
                                       f"directory on {self.node.name} (type Directory)")
                volume.path.mkdir(parents=True, exist_ok=True)
            elif volume.kind == "secret" and volume.path is not None:
                volume.path.mkdir(parents=True, exist_ok=True)
                for relative, content, mode in volume.files:
                    target = volume.path / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(content)
                    target.chmod(mode)
            elif volume.path is not None:
                volume.path.mkdir(parents=True, exist_ok=True)

    def run_init(self, container: ContainerPlan, timeout: float = 180) -> str:
        """Run an init container to completion; its output. SandboxError if it fails."""
        done = self.podman("run", "--rm", *container.run_args, timeout=timeout, check=False)
        if done.returncode != 0:
            raise SandboxError(f"init container {container.name} on {self.node.name} exited "
                               f"{done.returncode}: {(done.stderr + done.stdout)[-3000:]}")
        return done.stdout + done.stderr

    def start_container(self, container: ContainerPlan) -> str:
        """Start an app container in the background; its id."""
        started = self.podman("run", "--detach", *container.run_args)
        self.running[container.name] = container
        return started.stdout.strip()

    def run_pod(self, plan: PodPlan) -> None:
        """What the kubelet does for a new pod: volumes, the init containers one after the
        other (each must succeed), then the containers."""
        self.prepare(plan)
        for container in plan.init_containers:
            self.run_init(container)
        for container in plan.containers:
            self.start_container(container)

    def stop_container(self, container: ContainerPlan) -> int:
        """SIGTERM, SIGKILL after the grace period (as the kubelet asks the runtime); then
        remove it. Returns its exit code."""
        self.podman("stop", "--time", str(container.stop_timeout), container.podman_name,
                    timeout=container.stop_timeout + 60)
        code = self.podman("inspect", "--format", "{{.State.ExitCode}}",
                           container.podman_name).stdout.strip()
        self.podman("rm", container.podman_name)
        self.running.pop(container.name, None)
        return int(code)

    def alive(self, container: ContainerPlan) -> bool:
        state = self.podman("inspect", "--format", "{{.State.Status}}", container.podman_name,
                            check=False)
        return state.returncode == 0 and state.stdout.strip() == "running"

    def logs(self, container: ContainerPlan) -> str:
        done = self.podman("logs", container.podman_name, check=False)
        return done.stdout + done.stderr

    def probe(self, container: ContainerPlan, kind: str) -> tuple[bool, str]:
        """Run the container's probe `kind` once, as the kubelet does; (passed, what it saw)."""
        probe = container.probes[kind]
        timeout = float(probe.get("timeoutSeconds", 1))
        if "httpGet" in probe:
            get = probe["httpGet"]
            if get.get("scheme", "HTTP") != "HTTP":
                raise UnsupportedSpec(f"{kind}: only HTTP")
            host = get.get("host", self.node.underlay_ip)  # the pod IP is the node's
            result: tuple[bool, str] = self.node.call(
                http_probe, host, int(get["port"]), get.get("path", "/"), timeout,
                timeout=timeout + 10)
            return result
        if "exec" in probe:
            done = self.podman("exec", container.podman_name, *probe["exec"]["command"],
                               timeout=timeout + 30, check=False)
            return done.returncode == 0, done.stdout + done.stderr
        raise UnsupportedSpec(f"{kind}: tcpSocket probes are not run by the stand-in")

    def wait_probe(self, container: ContainerPlan, kind: str, timeout: float = 120) -> str:
        """Probe until it passes (bounded); what the passing probe saw."""
        deadline = time.monotonic() + timeout
        seen = ""
        while time.monotonic() < deadline:
            if not self.alive(container):
                raise SandboxError(f"{container.podman_name} on {self.node.name} is not "
                                   f"running:\n{self.logs(container)[-3000:]}")
            passed, seen = self.probe(container, kind)
            if passed:
                return seen
            time.sleep(0.5)
        raise SandboxError(f"{kind} of {container.podman_name} on {self.node.name} did not "
                           f"pass in {timeout:.0f} s; last: {seen[:500]}\n"
                           f"{self.logs(container)[-3000:]}")
