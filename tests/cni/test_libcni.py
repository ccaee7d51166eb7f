"""libcni (the Go runtime library containerd and cri-o use) drives ADD, CHECK and DEL of our
conflist. The driver is ours (tests/cni/libcni_driver/main.go, a cnitool stand-in); the
chaining, version negotiation, result parsing and cache are libcni's, built in the test setup
from Debian's golang-github-appc-cni-dev, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.cni.cnirun import Pod
from tests.conftest import require, require_binary

pytestmark = [pytest.mark.netns, pytest.mark.peer, pytest.mark.timeout(120)]

GOPATH = "/usr/share/gocode"
LIBCNI = Path(GOPATH, "src/github.com/containernetworking/cni/libcni")
DRIVER_SOURCE = Path(__file__).with_name("libcni_driver") / "main.go"


@pytest.fixture(scope="session")
def libcni_driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = require_binary("go", "golang-go")
    require(LIBCNI.is_dir(), "needs libcni sources (Debian golang-github-appc-cni-dev)")
    root = tmp_path_factory.mktemp("libcni")
    source = root / "src"
    source.mkdir()
    shutil.copy(DRIVER_SOURCE, source / "main.go")
    env = dict(os.environ, GO111MODULE="off", GOPATH=GOPATH, GOPROXY="off", GOFLAGS="",
               GOCACHE=str(root / "gocache"), CGO_ENABLED="0")
    binary = root / "libcni-driver"
    proc = subprocess.run([go, "build", "-o", str(binary), "."], cwd=source, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"building the libcni driver failed:\n{proc.stderr}"
    return binary


def _drive(cni, driver: Path, cache: Path, action: str, conflist: Path, pod: Pod,
           cap_args: dict | None = None, cni_args: str = "") -> subprocess.CompletedProcess[str]:
    env = [f"CNI_PATH={':'.join(cni.cni_path)}", f"CNI_CACHE_DIR={cache}",
           f"CAP_ARGS={json.dumps(cap_args or {})}", f"DRIVER_CNI_ARGS={cni_args}"]
    return cni.node.run(["env", *env, str(driver), action, str(conflist), pod.netns,
                         pod.container_id, pod.ifname], check=False, timeout=60)


def _installed_conflist(cni, tmp_path: Path, version: str, **kwargs) -> Path:
    """The conflist exactly as `install_cni` writes it (weavepy, then portmap)."""
    from weavepy.cni.install import install_cni

    installed = install_cni(tmp_path / "bin", tmp_path / f"net.d-{version}",
                            socket_path=str(cni.socket_path), cni_version=version, **kwargs)
    return installed.conflist


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0"])
def test_libcni_add_check_del(cni_cluster, libcni_driver: Path, tmp_path: Path,
                              version: str) -> None:
    cluster = cni_cluster(nodes=1)
    cni = cluster.nodes[0]
    conflist = _installed_conflist(cni, tmp_path, version)
    cache = tmp_path / "cache"
    pod = cluster.new_pod("lib")

    validate = _drive(cni, libcni_driver, cache, "validate", conflist, pod)
    assert validate.returncode == 0, validate.stderr  # VERSION of both plugins agrees
    assert "portMappings" in validate.stdout

    add = _drive(cni, libcni_driver, cache, "add", conflist, pod,
                 cni_args="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=lib")
    assert add.returncode == 0, add.stderr
    result = json.loads(add.stdout)  # libcni re-encodes our result in its own types
    assert result["cniVersion"] == version
    (ip,) = result["ips"]
    assert ip["address"].startswith("198.19.1.") and ip["gateway"] == str(cni.gateway)
    assert result["interfaces"][ip["interface"]]["name"] == "eth0"
    assert cni.allocations()[0]["owner"] == "default/lib"

    if version != "0.3.0" and version != "0.3.1":  # CHECK exists from 0.4.0 on
        check = _drive(cni, libcni_driver, cache, "check", conflist, pod)
        assert check.returncode == 0, check.stderr
        cluster.pod_exec(pod, ["ip", "route", "flush", "default"])
        check = _drive(cni, libcni_driver, cache, "check", conflist, pod)
        assert check.returncode != 0 and "route 0.0.0.0/0 via" in check.stderr, check.stderr

    delete = _drive(cni, libcni_driver, cache, "del", conflist, pod)
    assert delete.returncode == 0, delete.stderr
    assert cni.allocations() == [] and cni.host_veths() == []
    # the runtime removes the namespace, then deletes again with an empty CNI_NETNS
    cluster.remove_pod_netns(pod)
    again = _drive(cni, libcni_driver, cache, "del", conflist, Pod(pod.container_id, ""))
    assert again.returncode == 0, again.stderr


def test_libcni_host_port_through_the_installed_conflist(cni_cluster, libcni_driver: Path,
                                                         tmp_path: Path) -> None:
    cluster = cni_cluster(nodes=1)
    cni = cluster.nodes[0]
    conflist = _installed_conflist(cni, tmp_path, "1.0.0")
    cache = tmp_path / "cache"
    pod = cluster.new_pod("ports")
    caps = {"portMappings": [{"hostPort": 18081, "containerPort": 80, "protocol": "tcp"}]}
    add = _drive(cni, libcni_driver, cache, "add", conflist, pod, cap_args=caps)
    assert add.returncode == 0, add.stderr
    pod_ip = json.loads(add.stdout)["ips"][0]["address"].split("/")[0]
    nat = cni.node.run(["iptables", "-t", "nat", "-S"]).stdout
    assert "--dport 18081" in nat and pod_ip in nat
    # libcni hands DEL the cached runtimeConfig, so portmap removes its rules
    delete = _drive(cni, libcni_driver, cache, "del", conflist, pod, cap_args=caps)
    assert delete.returncode == 0, delete.stderr
    assert "--dport 18081" not in cni.node.run(["iptables", "-t", "nat", "-S"]).stdout
    assert cni.allocations() == []


def test_libcni_reports_our_error_codes(cni_cluster, libcni_driver: Path,
                                        tmp_path: Path) -> None:
    cluster = cni_cluster(nodes=1)
    cni = cluster.nodes[0]
    conflist = _installed_conflist(cni, tmp_path, "1.0.0", with_portmap=False)
    add = _drive(cni, libcni_driver, tmp_path / "cache", "add", conflist,
                 Pod("nons", "/run/netns/wpcni-missing"))
    assert add.returncode != 0
    assert "does not exist" in add.stderr, add.stderr
    cni.stop()  # no agent: libcni surfaces code 11 with our message
    add = _drive(cni, libcni_driver, tmp_path / "cache", "add", conflist,
                 cluster.new_pod("noagent"))
    assert add.returncode != 0 and "weavepy agent is not running" in add.stderr, add.stderr
