"""The `weavepy` command line: one click group; each command is a thin shell over a module.

Rule: a user mistake prints one readable line (click's `Error: ...`) and exits non-zero; a
traceback means a bug in weavepy.
"""

from __future__ import annotations

import logging

import click

from weavepy import __version__
from weavepy.sandbox_cli import sandbox_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="weavepy")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
def main(log_level: str) -> None:
    """weavepy: a pod network with memberlist gossip, VXLAN or WireGuard tunnels, and CNI."""
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command("demo")
@click.option("--nodes", "-n", default=3, show_default=True, type=click.IntRange(2, 20))
@click.option("--keep", is_flag=True, help="leave the sandbox running (remove it with "
              "`weavepy sandbox down PREFIX`)")
def demo(nodes: int, keep: bool) -> None:
    """Build a local cluster in network namespaces, show it working, tear it down."""
    from weavepy.demo import run_demo

    raise SystemExit(run_demo(nodes=nodes, keep=keep, echo=click.echo))


main.add_command(sandbox_group)


if __name__ == "__main__":
    main()
