"""`install_cni`: the plugin file (absolute real interpreter, self-contained, bytecode with a
source fallback), the conflist, atomic replacement; and the client's local answers."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from weavepy.cni import plugin
from weavepy.cni.install import InstallError, conflist, install_cni, resolve_interpreter


def _run(path: Path, command: str, stdin: str, **env: str) -> subprocess.CompletedProcess[str]:
    # an empty environment apart from CNI_*: the plugin must need nothing else (no PATH,
    # no PYTHONPATH, no virtualenv)
    return subprocess.run([str(path)], input=stdin, env={"CNI_COMMAND": command, **env},
                          capture_output=True, text=True, timeout=30)


def test_install_writes_a_self_contained_plugin_and_the_conflist(tmp_path: Path) -> None:
    installed = install_cni(tmp_path / "bin", tmp_path / "net.d")
    text = installed.plugin.read_text()
    first = text.splitlines()[0]
    assert first == f"#!{installed.interpreter} -IS"
    assert os.path.isabs(installed.interpreter) and "shims" not in installed.interpreter
    assert Path(installed.interpreter).read_bytes()[:4] == b"\x7fELF"
    assert "from weavepy" not in text and "import weavepy" not in text
    assert os.stat(installed.plugin).st_mode & 0o777 == 0o755
    conf = json.loads(installed.conflist.read_text())
    assert installed.conflist.name == "10-weavepy.conflist"
    assert conf == {"cniVersion": "1.0.0", "name": "weavepy", "plugins": [
        {"type": "weavepy-cni"},
        {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}]}
    proc = _run(installed.plugin, "VERSION", '{"cniVersion": "1.0.0"}')
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["supportedVersions"][-1] == "1.1.0"
    # reinstalling replaces both files and leaves no temporary files behind
    again = install_cni(tmp_path / "bin", tmp_path / "net.d", socket_path="/run/x/cni.sock")
    assert json.loads(again.conflist.read_text())["plugins"][0]["socketPath"] == \
        "/run/x/cni.sock"
    assert sorted(p.name for p in (tmp_path / "bin").iterdir()) == ["weavepy-cni"]
    assert sorted(p.name for p in (tmp_path / "net.d").iterdir()) == ["10-weavepy.conflist"]


def test_plugin_falls_back_to_its_source_when_the_bytecode_does_not_fit(tmp_path: Path) -> None:
    installed = install_cni(tmp_path / "bin", tmp_path / "net.d")
    tag = sys.implementation.cache_tag
    text = installed.plugin.read_text()
    assert f"if sys.implementation.cache_tag == {tag!r}:" in text
    installed.plugin.write_text(text.replace(f"== {tag!r}:", "== 'cpython-0':"))
    proc = _run(installed.plugin, "VERSION", '{"cniVersion": "0.4.0"}')
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cniVersion"] == "0.4.0"


def test_another_interpreter_compiles_its_own_bytecode(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Installing for an interpreter other than the running one compiles in a child process of
    # that interpreter (its bytecode format may differ). Pretend to run elsewhere to take that
    # path with the one real interpreter we are sure of.
    real = resolve_interpreter()
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    installed = install_cni(tmp_path / "bin", tmp_path / "net.d", interpreter=real)
    text = installed.plugin.read_text()
    assert f"if sys.implementation.cache_tag == {sys.implementation.cache_tag!r}:" in text
    proc = _run(installed.plugin, "VERSION", "")
    assert proc.returncode == 0, proc.stderr


def test_shims_and_scripts_are_refused(tmp_path: Path) -> None:
    shim = tmp_path / "python3"
    shim.write_text("#!/bin/sh\nexec python3 \"$@\"\n")
    shim.chmod(0o755)
    with pytest.raises(InstallError, match="not an executable binary"):
        resolve_interpreter(str(shim))
    with pytest.raises(InstallError):
        resolve_interpreter(str(tmp_path / "missing"))


def test_conflist_options() -> None:
    doc = conflist(network_name="pods", cni_version="0.4.0", with_portmap=False,
                   extra_plugins=[{"type": "tuning", "mtu": 1400}])
    assert doc["name"] == "pods" and doc["cniVersion"] == "0.4.0"
    assert [p["type"] for p in doc["plugins"]] == ["weavepy-cni", "tuning"]


def _local(env: dict[str, str], stdin: bytes) -> tuple[int, dict[str, object]]:
    out = io.StringIO()
    status = plugin.run(env, io.BytesIO(stdin), out)
    return status, json.loads(out.getvalue())


@pytest.mark.parametrize(("env", "stdin", "code"), [
    ({}, b"{}", 4),
    ({"CNI_COMMAND": "NOPE"}, b"{}", 4),
    ({"CNI_COMMAND": "ADD"}, b"{not json", 6),
    ({"CNI_COMMAND": "ADD"}, b"\xff\xfe", 6),
    ({"CNI_COMMAND": "ADD"}, b"[]", 6),
    ({"CNI_COMMAND": "ADD"}, b'{"cniVersion": "1.0.0", "socketPath": "rel.sock"}', 7),
    ({"CNI_COMMAND": "DEL"}, b'{"cniVersion": "0.4.0", "socketPath": "/nonexistent/s"}', 11),
])
def test_client_answers_locally(env: dict[str, str], stdin: bytes, code: int) -> None:
    status, out = _local(env, stdin)
    assert status == 1 and out["code"] == code
    assert set(out) == {"cniVersion", "code", "msg", "details"}


def test_client_json_helpers_match_the_json_module() -> None:
    tricky = 'quote " backslash \\ newline \n tab \t unicode é ☃ \x01'
    assert json.loads(plugin.json_string(tricky)) == tricky
    doc = {"a": [1, 2.5, None, True], "b": {"c": "d"}, "e": -3, "f": 1e300}
    assert plugin.json_loads(json.dumps(doc)) == doc
    assert plugin.json_loads(' \n {"x": "y"}\n ') == {"x": "y"}
    for bad in ('{"x": 1} trailing', "", "{", "nul"):
        with pytest.raises(ValueError):
            plugin.json_loads(bad)
    request = json.loads(plugin.build_request({"CNI_COMMAND": "ADD", "HOME": "/root"}, "{}"))
    assert request == {"wire": 1, "env": {"CNI_COMMAND": "ADD"}, "stdin": "{}"}
