"""containerd's CRI plugin as a kubelet drives it, for the tests that need real pods.

Two parts: `containerd_config()`, a containerd 1.6 configuration of a test's own (root, state,
sockets, runc root and CNI directories are the caller's; what this sandbox's root cannot do is
turned off: oom_score_adj, AppArmor), and a small kubelet stand-in over gRPC (PyPI
container-runtime-interface-api, CRI v1): `run_pod` (RunPodSandbox, then a container in it),
`exec_sync`, `wget` and `remove_pods`. There is no kubelet here; these calls are the ones a
kubelet makes for a pod.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PAUSE_CMD = ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 1; done"]

CONTAINERD_CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{image}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = {netns_under_state}
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{runc_root}"

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin_dir}"
    conf_dir = "{conf_dir}"
    max_conf_num = 1
"""


def containerd_config(*, root: Path, state: Path, socket: Path, runc_root: Path,
                      bin_dir: str | Path, conf_dir: str | Path, image: str,
                      netns_under_state: bool) -> str:
    """containerd's configuration. With `netns_under_state`, pod network namespaces go under
    the state directory; without, in /var/run/netns as on a real node."""
    return CONTAINERD_CONFIG.format(
        root=root, state=state, socket=socket, runc_root=runc_root, bin_dir=bin_dir,
        conf_dir=conf_dir, image=image, netns_under_state=str(netns_under_state).lower())


def run_pod(runtime: Any, name: str, *, image: str, command: Sequence[str], log_dir: Path,
            cgroup_parent: str, host_port: int | None = None,
            container_port: int = 8080) -> tuple[str, str, str]:
    """RunPodSandbox + one container running `command`; (sandbox id, container id, pod IP)."""
    from cri_api.v1 import api_pb2

    ports = [] if host_port is None else [api_pb2.PortMapping(
        protocol=api_pb2.TCP, container_port=container_port, host_port=host_port)]
    sandbox_config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace="default",
                                            uid=str(uuid.uuid4()), attempt=0),
        hostname=name,
        log_directory=str(log_dir / name),
        port_mappings=ports,
        linux=api_pb2.LinuxPodSandboxConfig(cgroup_parent=cgroup_parent),
    )
    sandbox_id = runtime.RunPodSandbox(
        api_pb2.RunPodSandboxRequest(config=sandbox_config), timeout=120).pod_sandbox_id
    status = runtime.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id), timeout=30).status
    container_config = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="web", attempt=0),
        image=api_pb2.ImageSpec(image=image),
        command=list(command),
        log_path="web.log",
    )
    container_id = runtime.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=sandbox_id, config=container_config, sandbox_config=sandbox_config),
        timeout=120).container_id
    runtime.StartContainer(api_pb2.StartContainerRequest(container_id=container_id),
                           timeout=60)
    return sandbox_id, container_id, status.network.ip


def pod_ip(runtime: Any, sandbox_id: str) -> str:
    from cri_api.v1 import api_pb2

    status = runtime.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id), timeout=30).status
    return str(status.network.ip)


def exec_sync(runtime: Any, container_id: str, argv: Sequence[str],
              timeout: int = 20) -> tuple[int, str, str]:
    """Run `argv` in the container (the runtime kills it after `timeout` seconds)."""
    from cri_api.v1 import api_pb2

    reply = runtime.ExecSync(api_pb2.ExecSyncRequest(container_id=container_id, cmd=list(argv),
                                                     timeout=timeout), timeout=timeout + 20)
    return (reply.exit_code, reply.stdout.decode(errors="replace"),
            reply.stderr.decode(errors="replace"))


def wget(runtime: Any, container_id: str, url: str, attempts: int = 10) -> str:
    """HTTP GET from inside a pod (busybox wget; its -T option crashes this static build, so
    ExecSync's timeout bounds it instead)."""
    err = ""
    for _ in range(attempts):  # httpd may take a moment to listen after StartContainer
        code, out, err = exec_sync(runtime, container_id, ["wget", "-q", "-O", "-", url])
        if code == 0:
            return out
        time.sleep(0.3)
    raise AssertionError(f"wget {url} failed: {err}")


def remove_pod(runtime: Any, sandbox_id: str) -> None:
    """StopPodSandbox (CNI DEL with the netns) then RemovePodSandbox (DEL again, no netns)."""
    from cri_api.v1 import api_pb2

    runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id),
                           timeout=120)
    runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
                             timeout=120)


def remove_pods(runtime: Any) -> None:
    """Remove every pod sandbox the runtime has (teardown: failures are not reported)."""
    from cri_api.v1 import api_pb2

    with contextlib.suppress(Exception):
        listed = runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30)
        for item in listed.items:
            remove_pod(runtime, item.id)
