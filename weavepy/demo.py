"""The demo: a local multi-node cluster in network namespaces, shown working, then removed.

It builds on the sandbox only, so it never touches the machine's own network; everything it
creates carries a fresh prefix and is torn down on the way out, also on Ctrl-C or failure.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable

from weavepy.sandbox import Sandbox, SandboxError

PING_RTT = re.compile(r"= [\d.]+/([\d.]+)/")


def _ping(box: Sandbox, src: int, dst_ip: str) -> str:
    result = box.nodes[src].run(["ping", "-c", "3", "-i", "0.05", "-W", "1", dst_ip],
                                check=False, timeout=10)
    match = PING_RTT.search(result.stdout)
    return f"{float(match.group(1)):.2f} ms" if result.returncode == 0 and match else "FAIL"


def run_demo(nodes: int, keep: bool, echo: Callable[[str], None]) -> int:
    """Run the demo; returns the process exit code (0 when every check passed)."""
    if os.geteuid() != 0:
        echo("Error: the demo needs root (it creates network namespaces)")
        return 1
    started = time.monotonic()
    echo(f"weavepy demo: building a {nodes}-node sandbox in network namespaces ...")
    try:
        box = Sandbox.create(nodes=nodes)
    except (SandboxError, ValueError) as exc:
        echo(f"Error: {exc}")
        return 1
    failures = 0
    try:
        echo(f"sandbox {box.prefix}: underlay {box.underlay}, pod range {box.pod_range}")
        echo("")
        echo(f"{'node':<6}{'namespace':<18}{'underlay address':<18}")
        for node in box.nodes:
            echo(f"{node.name:<6}{node.netns:<18}{node.underlay_ip:<18}")
        echo("")
        echo("underlay reachability (ping average round trip, from row to column):")
        echo("      " + "".join(f"{n.name:>10}" for n in box.nodes))
        for i, src in enumerate(box.nodes):
            cells = []
            for dst in box.nodes:
                if dst is src:
                    cells.append(f"{'-':>10}")
                    continue
                cell = _ping(box, i, dst.underlay_ip)
                failures += cell == "FAIL"
                cells.append(f"{cell:>10}")
            echo(f"{src.name:<6}" + "".join(cells))
        echo("")
        verdict = "all nodes reach each other" if not failures else f"{failures} paths FAILED"
        echo(f"result: {verdict} ({time.monotonic() - started:.1f} s)")
    finally:
        if keep:
            echo(f"sandbox kept: remove it with `weavepy sandbox down {box.prefix}`")
        else:
            box.destroy()
            echo(f"sandbox {box.prefix} removed")
    return 1 if failures else 0
