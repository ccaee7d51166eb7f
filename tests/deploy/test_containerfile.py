"""deploy/Containerfile agrees with the manifests and node-init.sh (no image can be built here:
there is no container engine, so these are consistency checks of the file itself)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from weavepy.manifest import HOST_RUNTIME_DIR, ManifestSettings, render_objects

REPO = Path(__file__).resolve().parents[2]
CONTAINERFILE = (REPO / "deploy" / "Containerfile").read_text()
NODE_INIT = (REPO / "deploy" / "node-init.sh").read_text()


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
    froms = [rest for word, rest in instructions() if word == "FROM"]
    assert froms == ["${DEBIAN} AS build", "${DEBIAN}"]
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
    for tool in ("kmod", "procps", "python3"):  # modprobe and sysctl for node-init.sh
        assert re.search(rf"install -y --no-install-recommends [^&]*\b{tool}\b", runs)
