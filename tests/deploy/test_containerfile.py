"""deploy/Containerfile agrees with the manifests, node-init.sh and deploy/build-image.sh
(consistency checks of the files; tests/deploy/test_image_daemonset.py builds and runs the
image)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from weavepy.manifest import HOST_RUNTIME_DIR, ManifestSettings, render_objects

REPO = Path(__file__).resolve().parents[2]
CONTAINERFILE = (REPO / "deploy" / "Containerfile").read_text()
NODE_INIT = (REPO / "deploy" / "node-init.sh").read_text()
BUILD_IMAGE = (REPO / "deploy" / "build-image.sh").read_text()


def instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n\s*", " ", CONTAINERFILE)
    out = []
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_base_is_debian_bookworm_slim_and_nothing_is_downloaded() -> None:
    assert "ARG DEBIAN=docker.io/library/debian:bookworm-slim" in CONTAINERFILE
    assert "ARG DEBIAN_BUILD=${DEBIAN}" in CONTAINERFILE
    froms = [rest for word, rest in instructions() if word == "FROM"]
    assert froms == ["${DEBIAN_BUILD} AS build", "${DEBIAN}"]
    runs = " ".join(rest for word, rest in instructions() if word == "RUN")
    assert not re.search(r"\b(curl|wget|git clone)\b", runs)
    assert all(word != "ADD" for word, _ in instructions())


def test_copied_sources_exist() -> None:
    for word, rest in instructions():
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _ = shlex.split(rest)
            for source in sources:
                assert (REPO / source).exists(), source


def test_paths_agree_with_the_daemonset_and_node_init() -> None:
    runs = " ".join(rest for word, rest in instructions() if word == "RUN")
    assert f"--install-root {HOST_RUNTIME_DIR}" in runs
    bundled = re.search(r"WEAVEPY_HOST_RUNTIME:-(\S+)\}", NODE_INIT)
    assert bundled and f"--out {bundled.group(1)}" in runs
    pod = next(o for o in render_objects(ManifestSettings())
               if o["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    init_command = pod["initContainers"][0]["command"][0]
    assert f"COPY deploy/node-init.sh {init_command}" in CONTAINERFILE
    assert pod["containers"][0]["command"][0] == "weavepy"
    assert "ln -s /usr/lib/weavepy/venv/bin/weavepy /usr/local/bin/weavepy" in runs
    _, run_stage = stage_packages()
    for tool in ("kmod", "procps", "python3", "python3-nftables"):  # node-init.sh, nft.py
        assert tool in run_stage


def stage_packages() -> tuple[set[str], set[str]]:
    """The Debian packages each stage asks apt-ensure for."""
    runs = [rest for word, rest in instructions() if word == "RUN" and "apt-ensure " in rest]
    build, run = (set(r.rsplit("apt-ensure ", 1)[1].split()) for r in runs)
    return build, run


def shell_array(name: str) -> set[str]:
    match = re.search(rf"^{name}=\(([^)]*)\)", BUILD_IMAGE, re.M)
    assert match, name
    return set(match.group(1).split())


def test_the_local_bases_hold_every_package_so_the_build_needs_no_network() -> None:
    """build-image.sh's bases must already have what each stage asks apt-ensure for: it builds
    with --network none."""
    build_stage, run_stage = stage_packages()
    run_base = shell_array("RUN_PACKAGES")
    build_base = run_base | shell_array("BUILD_PACKAGES")
    assert run_stage <= run_base, run_stage - run_base
    assert build_stage - {"libc-bin"} <= build_base, build_stage - build_base  # essential
    assert not run_base & shell_array("RUN_PURGE")
