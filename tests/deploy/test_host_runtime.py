"""deploy/host-python.py: the Python runtime the init container puts on a Kubernetes host for
weavepy-cni needs nothing from the host but the kernel.

Built from Debian's /usr/bin/python3 (what the image uses) with patchelf, then: the plugin is
installed against it exactly as the init container does (`install_cni(interpreter=...)`), and
run both on this machine and inside an empty chroot that holds nothing but the runtime and the
plugin (no /bin, no /lib, no /usr): a host without Python."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require, require_binary, require_root

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
DEBIAN_PYTHON = Path("/usr/bin/python3")
PLUGIN_SOURCE = REPO / "weavepy" / "cni" / "plugin.py"


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_binary("patchelf")
    require_binary("ldd", "libc-bin")
    require(DEBIAN_PYTHON.exists(), "needs Debian's python3 (package python3)")
    root = tmp_path_factory.mktemp("host-runtime") / "opt-weavepy"
    root.mkdir()
    built = subprocess.run([str(DEBIAN_PYTHON), str(REPO / "deploy" / "host-python.py"),
                            "--plugin", str(PLUGIN_SOURCE), "--install-root", str(root)],
                           capture_output=True, text=True, timeout=100)
    assert built.returncode == 0, built.stderr
    return Path(built.stdout.strip())


def run_plugin(argv: list[str], command: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30,
                          env={"CNI_COMMAND": command, "CNI_CONTAINERID": "c0ffee",
                               "CNI_NETNS": "/var/run/netns/none", "CNI_IFNAME": "eth0",
                               "CNI_PATH": "/opt/cni/bin"})


def test_runtime_layout_and_loader(runtime: Path) -> None:
    runtime_id = (runtime / "ID").read_text().strip()
    assert runtime.name == f"python-{runtime_id}"
    interpreter = runtime / "bin" / "python3"
    loader = subprocess.run(["patchelf", "--print-interpreter", str(interpreter.resolve())],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loader.startswith(f"{runtime}/lib/ld-linux")
    probe = subprocess.run([str(interpreter), "-IS", "-c",
                            "import sys, json, _json, _socket; print(sys.prefix); "
                            "print(json.loads('[1]'))"],
                           capture_output=True, text=True, timeout=30, env={})
    assert probe.returncode == 0 and probe.stderr == "", probe.stderr
    assert probe.stdout.splitlines() == [str(runtime), "[1]"]
    size = sum(p.stat().st_size for p in runtime.rglob("*") if p.is_file())
    assert size < 40 * 1024 * 1024  # a copy to every node at every agent start


def test_plugin_runs_on_the_runtime(runtime: Path, tmp_path: Path) -> None:
    from weavepy.cni.install import install_cni

    installed = install_cni(tmp_path / "bin", tmp_path / "net.d",
                            interpreter=str(runtime / "bin" / "python3"),
                            socket_path=str(tmp_path / "nobody-listens.sock"))
    assert installed.plugin.read_text().splitlines()[0].startswith(f"#!{runtime}/bin/python3")
    version = run_plugin([str(installed.plugin)], "VERSION")
    assert version.returncode == 0, version.stderr
    assert "1.0.0" in json.loads(version.stdout)["supportedVersions"]
    conf = json.loads(installed.conflist.read_text())["plugins"][0]
    conf.update(cniVersion="1.0.0", name="weavepy")
    add = run_plugin([str(installed.plugin)], "ADD", json.dumps(conf))
    assert add.returncode == 1
    assert json.loads(add.stdout)["code"] == 11  # try again later: no agent listening


def test_plugin_runs_in_an_empty_chroot(runtime: Path, tmp_path: Path) -> None:
    """Only the kernel is shared: the chroot has the runtime at its host path and the plugin."""
    require_root()
    chroot = require_binary("chroot", "coreutils")
    from weavepy.cni.install import install_cni

    installed = install_cni(tmp_path / "bin", tmp_path / "net.d",
                            interpreter=str(runtime / "bin" / "python3"))
    jail = tmp_path / "jail"
    shutil.copytree(runtime, jail / runtime.relative_to("/"), symlinks=True)
    shutil.copy2(installed.plugin, jail / "weavepy-cni")
    assert sorted(p.name for p in jail.iterdir()) == [runtime.parts[1], "weavepy-cni"]
    version = run_plugin([chroot, str(jail), "/weavepy-cni"], "VERSION")
    assert version.returncode == 0, version.stderr
    assert version.stderr == ""
    assert json.loads(version.stdout)["cniVersion"]
    add = run_plugin([chroot, str(jail), "/weavepy-cni"], "ADD",
                     json.dumps({"cniVersion": "1.0.0", "name": "weavepy",
                                 "type": "weavepy-cni"}))
    assert json.loads(add.stdout)["code"] == 11, add.stdout + add.stderr
