"""The benchmark runner: `python -m bench NAME [ARGS...]` (or `make bench NAME=...`).

Each benchmark is a module `bench/<NAME>.py` with `run(args: list[str]) -> str` that measures
weavepy and its anchor side by side in the same run and returns a markdown report (tables with
ratios). The runner prints the report and appends it, stamped with the date and the machine, to
bench/RESULTS.md. Benchmarks may draw PNGs into bench/plots/ (matplotlib, Agg backend).
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "RESULTS.md"


def available() -> list[str]:
    skip = {"__init__", "__main__", "common"}
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if p.stem not in skip)


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.node()}: {os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB, "
            f"kernel {platform.release()}, Python {platform.python_version()}")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(f"usage: python -m bench NAME [ARGS...]\nbenchmarks: {', '.join(available())}")
        return 0 if argv else 2
    name, args = argv[0], argv[1:]
    if name not in available():
        print(f"Error: no benchmark named {name!r} (have: {', '.join(available())})",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{name}")
    started = time.monotonic()
    report: str = module.run(args)
    elapsed = time.monotonic() - started
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    entry = (f"\n## {name} — {stamp}\n\nMachine: {machine()}. Command: "
             f"`python -m bench {' '.join(argv)}` ({elapsed:.0f} s).\n\n{report.strip()}\n")
    print(entry)
    if not os.environ.get("WEAVEPY_BENCH_NO_RECORD"):
        with RESULTS.open("a") as out:
            out.write(entry)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
