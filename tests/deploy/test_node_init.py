"""deploy/node-init.sh, the DaemonSet's init container, run for real in a network namespace of
the test's own (its sysctls then change only that namespace; `unshare --net`).

Two stand-ins, both said here: `modprobe` records its arguments instead of loading modules into
this machine's kernel (that would change every test's bridges), and `weavepy install-cni` is a
tiny wrapper that calls `weavepy.cni.install.install_cni` with the same flags, until the CLI
verb lands (see /tmp/agent-requests.md). The runtime it copies is really built by
deploy/host-python.py, and the plugin it installs really runs on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require, require_binary, require_root

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
DEBIAN_PYTHON = Path("/usr/bin/python3")

INSTALL_CNI_STANDIN = """#!{python}
import argparse, sys
sys.path.insert(0, {repo!r})
from weavepy.cni.install import install_cni
if sys.argv[1] != "install-cni":
    sys.exit("stand-in knows only install-cni")
p = argparse.ArgumentParser()
for flag in ("--bin-dir", "--conf-dir", "--interpreter", "--socket"):
    p.add_argument(flag, required=True)
a = p.parse_args(sys.argv[2:])
install_cni(a.bin_dir, a.conf_dir, interpreter=a.interpreter, socket_path=a.socket)
"""


def node_init(tmp_path: Path, bundled: Path, runtime_dir: Path, *extra: str
              ) -> subprocess.CompletedProcess[str]:
    tools = tmp_path / "tools"
    tools.mkdir(exist_ok=True)
    (tools / "modprobe").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/modprobe.log\n")
    (tools / "weavepy").write_text(INSTALL_CNI_STANDIN.format(python=sys.executable,
                                                              repo=str(REPO)))
    for tool in tools.iterdir():
        tool.chmod(0o755)
    script = (f"{REPO}/deploy/node-init.sh --cni-bin-dir {tmp_path}/cni-bin "
              f"--cni-conf-dir {tmp_path}/net.d --runtime-dir {runtime_dir} "
              f"--socket {tmp_path}/cni.sock {' '.join(extra)} && "
              f"echo forward=$(cat /proc/sys/net/ipv4/ip_forward)")
    env = {"PATH": f"{tools}:/usr/sbin:/usr/bin:/sbin:/bin", "WEAVEPY_HOST_RUNTIME": str(bundled)}
    return subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True,
                          text=True, timeout=60, env=env)


def test_node_init_installs_runtime_and_plugin(tmp_path: Path) -> None:
    require_root()
    require_binary("unshare", "util-linux")
    require_binary("patchelf")
    require(DEBIAN_PYTHON.exists(), "needs Debian's python3 (package python3)")
    runtime_dir = tmp_path / "opt-weavepy"
    bundled = tmp_path / "image-host-python"  # where the image keeps it
    built = subprocess.run([str(DEBIAN_PYTHON), str(REPO / "deploy" / "host-python.py"),
                            "--plugin", str(REPO / "weavepy" / "cni" / "plugin.py"),
                            "--install-root", str(runtime_dir), "--out", str(bundled)],
                           capture_output=True, text=True, timeout=100)
    assert built.returncode == 0, built.stderr
    runtime_id = (bundled / "ID").read_text().strip()
    runtime_dir.mkdir()
    for age, name in ((300, "python-old1"), (200, "python-old2")):  # earlier versions
        (runtime_dir / name).mkdir()
        stamp = time.time() - age
        os.utime(runtime_dir / name, (stamp, stamp))

    first = node_init(tmp_path, bundled, runtime_dir)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "forward=1"  # in the test's namespace only
    assert (tmp_path / "modprobe.log").read_text().split() == ["vxlan", "tun", "br_netfilter"]
    target = runtime_dir / f"python-{runtime_id}"
    assert f"installed the CNI plugin's Python runtime in {target}" in first.stderr
    # the new runtime and the newest previous one stay; older ones go
    assert sorted(p.name for p in runtime_dir.iterdir()) == [f"python-{runtime_id}",
                                                             "python-old2"]
    plugin = tmp_path / "cni-bin" / "weavepy-cni"
    assert plugin.read_text().startswith(f"#!{target}/bin/python3")
    conflist = json.loads((tmp_path / "net.d" / "10-weavepy.conflist").read_text())
    assert conflist["plugins"][0]["socketPath"] == str(tmp_path / "cni.sock")
    version = subprocess.run([str(plugin)], env={"CNI_COMMAND": "VERSION"}, input="",
                             capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and json.loads(version.stdout)["supportedVersions"]

    again = node_init(tmp_path, bundled, runtime_dir)  # every agent restart runs it again
    assert again.returncode == 0, again.stderr
    assert "installed the CNI plugin's Python runtime" not in again.stderr


def test_node_init_uninstall_removes_what_it_installed(tmp_path: Path) -> None:
    """`node-init.sh --uninstall` (the init container of `weavepy manifest --uninstall`) removes
    the conflist, the plugin and every runtime, and leaves other plugins and configurations."""
    require_root()
    require_binary("unshare", "util-linux")
    require_binary("patchelf")
    require(DEBIAN_PYTHON.exists(), "needs Debian's python3 (package python3)")
    runtime_dir = tmp_path / "opt-weavepy"
    bundled = tmp_path / "image-host-python"
    built = subprocess.run([str(DEBIAN_PYTHON), str(REPO / "deploy" / "host-python.py"),
                            "--plugin", str(REPO / "weavepy" / "cni" / "plugin.py"),
                            "--install-root", str(runtime_dir), "--out", str(bundled)],
                           capture_output=True, text=True, timeout=100)
    assert built.returncode == 0, built.stderr
    installed = node_init(tmp_path, bundled, runtime_dir)
    assert installed.returncode == 0, installed.stderr
    (runtime_dir / "python-older").mkdir()  # a runtime an earlier version left
    (tmp_path / "cni-bin" / "portmap").write_text("another plugin\n")
    (tmp_path / "net.d" / "20-other.conflist").write_text("{}\n")

    removed = node_init(tmp_path, bundled, runtime_dir, "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert sorted(p.name for p in (tmp_path / "cni-bin").iterdir()) == ["portmap"]
    assert sorted(p.name for p in (tmp_path / "net.d").iterdir()) == ["20-other.conflist"]
    assert list(runtime_dir.iterdir()) == []
    assert "removed the runtime" in removed.stderr
    again = node_init(tmp_path, bundled, runtime_dir, "--uninstall")  # nothing left: fine
    assert again.returncode == 0 and "removed" not in again.stderr


def test_node_init_names_agree_with_install_cni() -> None:
    from weavepy.cni.install import CONFLIST_NAME, PLUGIN_NAME

    script = (REPO / "deploy" / "node-init.sh").read_text()
    assert f"\nplugin_name={PLUGIN_NAME}\n" in script
    assert f"\nconflist_name={CONFLIST_NAME}\n" in script


def test_node_init_refuses_unknown_arguments(tmp_path: Path) -> None:
    done = subprocess.run(["sh", str(REPO / "deploy" / "node-init.sh"), "--frobnicate"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "unknown argument: --frobnicate" in done.stderr
