#!/usr/bin/env python3
"""Build the self-contained Python runtime that runs weavepy-cni on a Kubernetes host.

The CNI plugin is executed by the container runtime *on the host*, not in the weavepy image,
and a host may have no Python at all (or one we cannot rely on). So the image carries a small
runtime that the DaemonSet's init container copies to the host (deploy/node-init.sh), and
`weavepy install-cni --interpreter` points the plugin's #! line at it.

The rule it keeps: **the runtime needs nothing from the host but the kernel.** It holds

* the interpreter binary, patched (patchelf) to load its own dynamic loader and libraries
  from the bundle, by absolute path (not $ORIGIN, which glibc resolves through /proc), so
  the host's glibc version does not matter;
* the shared libraries it and the extension modules it needs link against (from `ldd`);
* the standard-library modules the plugin can import (what its imports load in a fresh
  interpreter, plus `encodings`, which the interpreter loads at start), compiled to
  unchecked-hash bytecode so nothing is re-compiled or written on the host;
* `ID`: a digest of all of the above, which names the directory on the host
  (`INSTALL_ROOT/python-ID`), so an upgrade installs beside the old runtime instead of over it.

Usage (deploy/Containerfile runs it with Debian's /usr/bin/python3):
    python3 deploy/host-python.py --plugin weavepy/cni/plugin.py \
        --install-root /opt/weavepy --out /usr/lib/weavepy/host-python
The bundle in --out is patched for the path it will have on the host, INSTALL_ROOT/python-ID.
Without --out it is built in place there (what the tests do).
"""

from __future__ import annotations

import argparse
import ast
import compileall
import hashlib
import os
import py_compile
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

# What the interpreter imports at start-up that modulefinder cannot see from the plugin.
STARTUP_PACKAGES = ("encodings",)
LDD_LINE = re.compile(r"^\s*(?:(\S+)\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


class BuildError(RuntimeError):
    """The runtime cannot be built as asked."""


def shared_libraries(binary: Path) -> list[Path]:
    """The resolved shared libraries `binary` loads (the dynamic loader included)."""
    try:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True,
                             timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BuildError(f"ldd {binary} failed: {exc}") from None
    libraries = []
    for line in out.splitlines():
        if "not a dynamic executable" in line or "statically linked" in line:
            return []
        match = LDD_LINE.match(line)
        if match:
            libraries.append(Path(match.group(2)))
        elif "not found" in line:
            raise BuildError(f"{binary}: {line.strip()}")
    return libraries


def plugin_imports(plugin: Path) -> set[str]:
    """Every absolute module name the plugin's source imports, anywhere in it."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(plugin.read_text(), str(plugin))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


_LOAD_AND_LIST = (
    "import importlib, sys\n"
    "for name in sys.argv[1:]:\n"
    "    importlib.import_module(name)\n"
    "for module in list(sys.modules.values()):\n"
    "    if getattr(module, '__file__', None):\n"
    "        print(module.__file__)\n"
)


def stdlib_modules(plugin: Path) -> tuple[list[Path], list[Path]]:
    """(pure-Python files, extension modules) of the standard library the plugin can import:
    every module its imports load (found by importing them in a fresh `-IS` interpreter, so
    the answer is exact, not a static over-estimate), the start-up packages, and os.py."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    names = sorted(plugin_imports(plugin))
    try:
        listed = subprocess.run([sys.executable, "-IS", "-c", _LOAD_AND_LIST, *names],
                                capture_output=True, text=True, check=True, timeout=60).stdout
    except subprocess.CalledProcessError as exc:
        raise BuildError(f"importing the plugin's modules ({', '.join(names)}) failed: "
                         f"{exc.stderr.strip().splitlines()[-1:]}") from None
    python_files: set[Path] = {stdlib / "os.py"}  # the landmark getpath looks for
    extensions: set[Path] = set()
    for line in listed.splitlines():
        path = Path(line).resolve()
        if not path.is_relative_to(stdlib):
            raise BuildError(f"{plugin} loads {path}, outside the standard library; the "
                             f"plugin must stay stdlib-only")
        (extensions if path.suffix == ".so" else python_files).add(path)
    for package in STARTUP_PACKAGES:  # codecs are looked up by name at run time: take all
        python_files.update((stdlib / package).glob("*.py"))
    return sorted(python_files), sorted(extensions)


def _digest(paths: list[Path], extra: bytes) -> str:
    digest = hashlib.sha256(extra)
    for path in paths:
        digest.update(str(path).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def build(plugin: Path, install_root: Path, out: Path | None, interpreter: Path) -> Path:
    """Build the runtime of `interpreter` (the one running this script: its standard library
    is the one bundled); returns the directory it was written to."""
    interpreter = interpreter.resolve()
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    python_files, extensions = stdlib_modules(plugin)
    libraries: dict[str, Path] = {}
    for binary in (interpreter, *extensions):
        for library in shared_libraries(binary):
            libraries.setdefault(library.name, library.resolve())
    loader = next((p for name, p in libraries.items() if name.startswith("ld-linux")), None)
    if loader is None:
        raise BuildError(f"{interpreter}: no dynamic loader in its ldd output")
    loader_name = next(name for name in libraries if name.startswith("ld-linux"))
    inputs = [interpreter, *python_files, *extensions, *libraries.values()]
    runtime_id = _digest(inputs, plugin.read_bytes())
    final = install_root / f"python-{runtime_id}"
    target = out or final
    if target.exists():
        shutil.rmtree(target)
    work = Path(tempfile.mkdtemp(prefix=".host-python.", dir=target.parent))
    try:
        (work / "bin").mkdir()
        (work / "lib").mkdir()
        shutil.copy2(interpreter, work / "bin" / version)
        os.symlink(version, work / "bin" / "python3")
        for name, library in libraries.items():
            shutil.copy2(library, work / "lib" / name)
        library_dir = work / "lib" / version
        (library_dir / "lib-dynload").mkdir(parents=True)  # getpath's exec_prefix landmark
        for source in python_files:
            destination = library_dir / source.relative_to(stdlib)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)
        for extension in extensions:
            shutil.copy2(extension, library_dir / "lib-dynload" / extension.name)
        subprocess.run(["patchelf", "--set-interpreter", str(final / "lib" / loader_name),
                        "--force-rpath", "--set-rpath", str(final / "lib"),
                        str(work / "bin" / version)], check=True, timeout=60)
        for extension in (library_dir / "lib-dynload").glob("*.so"):
            subprocess.run(["patchelf", "--force-rpath", "--set-rpath", str(final / "lib"),
                            str(extension)], check=True, timeout=60)
        if not compileall.compile_dir(
                library_dir, quiet=1, ddir=str(final / "lib" / version),
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH):
            raise BuildError("compiling the bundled standard library failed")
        (work / "ID").write_text(runtime_id + "\n")
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugin", type=Path, required=True, help="weavepy/cni/plugin.py")
    parser.add_argument("--install-root", type=Path, required=True,
                        help="where the runtime will live on the host (python-ID under it)")
    parser.add_argument("--out", type=Path, help="build here instead (the image's copy)")
    args = parser.parse_args(argv)
    try:
        where = build(args.plugin, args.install_root, args.out, Path(sys.executable))
    except (BuildError, OSError, subprocess.CalledProcessError) as exc:
        sys.stderr.write(f"host-python: {exc}\n")
        return 1
    sys.stdout.write(f"{where}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
