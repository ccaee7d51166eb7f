"""Import every module of the given packages, then write bytecode for exactly what was loaded.

deploy/Containerfile runs it in the image with the venv's interpreter:

    python compile-loaded.py weavepy gossip tunnel --skip weavepy.devtools \
        --module hypercorn.trio --module hypercorn.trio.tcp_server \
        --module rich.console --module rich.table --module nftables

(the --module ones are what weavepy imports inside functions or loads when serving: the API
server, `weavepy status`, the nftables door.)

Two jobs in one pass:

* **a check**: every module of weavepy, gossip and tunnel imports in the image (a dependency the
  image lost, or a shared library it lacks, fails the build instead of the first agent start);
* **start time without the size**: the image is read-only and keeps no bytecode of its own
  (the base has none, the venv's was removed), so the agent would compile every module at each
  start. This writes bytecode for the modules the import loaded (weavepy's, its dependencies'
  and the standard library's), and for nothing else: the parts of the libraries weavepy never
  loads stay source only. Unchecked-hash bytecode, because files in an image never change.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import pkgutil
import py_compile
import sys
from pathlib import Path


def import_all(packages: list[str], skip: tuple[str, ...], modules: list[str]) -> int:
    """Import each package and every module under it (but `skip`), and `modules`; the count
    imported."""
    for name in modules:
        importlib.import_module(name)
    count = len(modules)
    for name in packages:
        package = importlib.import_module(name)
        count += 1
        for info in pkgutil.walk_packages(package.__path__, f"{name}."):
            if info.name.startswith(skip):
                continue
            importlib.import_module(info.name)
            count += 1
    return count


def compile_loaded() -> tuple[int, int]:
    """Write bytecode for every loaded module that has a source file; (files, bytes)."""
    files = size = 0
    for module in list(sys.modules.values()):
        source = getattr(module, "__file__", None)
        if not source or not source.endswith(".py"):
            continue
        cached = importlib.util.cache_from_source(source)
        py_compile.compile(source, cfile=cached, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        files += 1
        size += Path(cached).stat().st_size
    return files, size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="+")
    parser.add_argument("--skip", action="append", default=[],
                        help="a module prefix not to import (repeatable)")
    parser.add_argument("--module", action="append", default=[],
                        help="a single module to import as well (repeatable)")
    args = parser.parse_args(argv)
    imported = import_all(args.packages, tuple(args.skip), args.module)
    files, size = compile_loaded()
    sys.stderr.write(f"compile-loaded: imported {imported} modules of {', '.join(args.packages)};"
                     f" bytecode for the {files} modules loaded ({size / 1e6:.1f} MB)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
