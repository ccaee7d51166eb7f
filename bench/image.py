"""bench.image: the size of weavepy's image, and how long its agent takes to answer.

What `make image` builds (deploy/build-image.sh; a build is reused when the tag exists):

- size: the image unpacked (what `podman images` shows) and its OCI archive (compressed
  layers: what an airgapped node is sent and a registry stores);
- start: from `podman run` of the agent's container (the DaemonSet's pod spec from `weavepy
  manifest --no-kube-peers`, translated by weavepy.devtools.kubelet) on a one-node sandbox to
  its API answering GET /status; the first run founds the node's state, the others restart on
  it, as a rolling update does. The init container's run is timed too;
- anchor: the same agent launched as a plain process from the project's venv in the same node
  (`python -m weavepy.cli launch`), alternated with the container runs: the ratio is what the
  image and the container cost over a process.

    python -m bench image [--runs 5]
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench.common import table
from weavepy.devtools.agentbox import AgentBox, http_json
from weavepy.devtools.kubelet import WEAVEPY_VIEWS, PodmanHost, translate
from weavepy.devtools.sandbox import Sandbox, SandboxNode

REPO = Path(__file__).resolve().parents[1]
POD_RANGE = "198.19.0.0/16"
IMAGE_STORE = Path("/var/lib/containers/storage")  # where deploy/build-image.sh puts it


def _build() -> tuple[str, Path]:
    done = subprocess.run(["bash", str(REPO / "deploy" / "build-image.sh")],
                          capture_output=True, text=True, timeout=3600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"deploy/build-image.sh failed:\n{done.stderr[-3000:]}")
    tag = done.stdout.strip().splitlines()[-1]
    return tag, REPO / "build" / "image" / f"weavepy-{tag.split(':', 1)[1]}.oci.tar"


def _until_status(node: SandboxNode, started: float, alive: Callable[[], bool]) -> float:
    """Seconds from `started` until the agent in `node` answers GET /status with 200."""
    deadline = started + 120
    while time.monotonic() < deadline:
        answer = node.call(http_json, "GET", "/status", 6784, None, 2.0, timeout=10)
        if answer is not None and answer[0] == 200:
            return time.monotonic() - started
        if not alive():
            raise RuntimeError("the agent exited before answering")
        time.sleep(0.05)
    raise RuntimeError("the agent did not answer /status in 120 s")


def run(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench image")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    build_started = time.monotonic()
    tag, archive = _build()
    build_seconds = time.monotonic() - build_started
    size = int(subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", tag],
                              capture_output=True, text=True, check=True, timeout=60).stdout)
    scratch = Path(tempfile.mkdtemp(prefix="wpimg-bench-"))
    keyring = scratch / "keyring"
    keyring.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    rendered = subprocess.run(
        [sys.executable, "-m", "weavepy.cli", "manifest", "--image", tag, "--ipalloc-range",
         POD_RANGE, "--no-kube-peers", "--keyring-file", str(keyring)],
        capture_output=True, text=True, check=True, timeout=60, cwd=REPO).stdout
    objects: list[dict[str, Any]] = [o for o in yaml.safe_load_all(rendered) if o]
    daemonset = next(o for o in objects if o["kind"] == "DaemonSet")
    box = Sandbox.create(nodes=1)
    node = box.nodes[0]
    host = PodmanHost(node, Path(f"/tmp/wpb-{box.prefix}"), [IMAGE_STORE], WEAVEPY_VIEWS)
    container: list[float] = []
    process: list[float] = []
    init: list[float] = []
    try:
        host.start()
        (host.root / "lib" / "modules").mkdir(parents=True, exist_ok=True)
        plan = translate(daemonset["spec"]["template"]["spec"], objects, host.context(),
                         f"weavepy-{node.name}", daemonset["metadata"]["namespace"])
        host.prepare(plan)
        agent = plan.containers[0]
        # the anchor runs on the container's state, key and directories (the last flag wins)
        rig = AgentBox(box, pod_range=POD_RANGE, extra_args=[
            "--state-dir", str(host.root / "var" / "lib" / "weavepy"),
            "--run-dir", str(host.root / "run" / "weavepy"), "--keyring-file", str(keyring)])
        for _ in range(args.runs):
            started = time.monotonic()
            host.run_init(plan.init_containers[0])
            init.append(time.monotonic() - started)
            started = time.monotonic()
            host.start_container(agent)
            container.append(_until_status(node, started, lambda: host.alive(agent)))
            host.stop_container(agent)
            started = time.monotonic()
            proc = rig.launch(node)
            process.append(_until_status(node, started, proc.alive))
            rig.stop(node)
    finally:
        host.close()
        box.destroy()
        subprocess.run(["rm", "-rf", str(host.root), str(scratch)], check=False, timeout=60)

    def cell(values: list[float]) -> str:
        later = values[1:] or values
        return (f"{statistics.median(later):.2f} s (min {min(later):.2f}, max "
                f"{max(later):.2f}; first start {values[0]:.2f})")

    ratio = statistics.median(container[1:] or container) / statistics.median(
        process[1:] or process)
    lines = [
        f"Image `{tag}` (`make image`: Debian 12 base made with debootstrap, Python 3.11, "
        f"the venv from deploy/requirements.lock). This run's `make image` took "
        f"{build_seconds:.0f} s (a reused tag takes about a second).",
        "",
        table(["what", "size"], [
            ["image, unpacked (podman images)", f"{size / 1e6:.1f} MB"],
            ["OCI archive (compressed layers)", f"{archive.stat().st_size / 1e6:.1f} MB"],
        ]),
        "",
        f"Start to GET /status answering, {args.runs} runs each, alternated; median of the "
        f"restarts (runs 2..{args.runs}):",
        "",
        table(["start", "time"], [
            ["agent container (`podman run`, the manifest's pod spec)", cell(container)],
            ["anchor: the agent as a process from the venv", cell(process)],
            ["init container (node-init.sh), run to completion", cell(init)],
        ]),
        "",
        f"container / process: {ratio:.2f}x. 1-minute load average at the end: "
        f"{os.getloadavg()[0]:.1f} (2 cores); the min-max spread is beside each median.",
    ]
    return "\n".join(lines)
