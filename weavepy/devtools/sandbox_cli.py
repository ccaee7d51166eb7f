"""`weavepy sandbox ...`: build, inspect, use and remove sandboxes from the shell.

It only translates command-line words into `weavepy.devtools.sandbox` calls; a user mistake
becomes one readable line and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import os
from typing import Any

import click

from weavepy.devtools.sandbox import PREFIX_FAMILY, Sandbox, SandboxError


def _require_root() -> None:
    if os.geteuid() != 0:
        raise click.ClickException("the sandbox needs root (it creates network namespaces)")


@click.group("sandbox")
def sandbox_group() -> None:
    """Simulated hosts in network namespaces (for the demo, tests and benchmarks)."""


@sandbox_group.command("up")
@click.option("--nodes", "-n", default=3, show_default=True, type=click.IntRange(1, 200))
@click.option("--prefix", default=None, help=f"name prefix (starts with '{PREFIX_FAMILY}')")
@click.option("--underlay", default="198.18.0.0/24", show_default=True)
@click.option("--pod-range", default="198.19.0.0/16", show_default=True)
def up(nodes: int, prefix: str | None, underlay: str, pod_range: str) -> None:
    """Create a sandbox and leave it running; prints its prefix."""
    _require_root()
    try:
        box = Sandbox.create(nodes=nodes, prefix=prefix, underlay=underlay, pod_range=pod_range)
    except (ValueError, SandboxError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(box.prefix)


@sandbox_group.command("status")
@click.argument("prefix", required=False)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def status(prefix: str | None, as_json: bool) -> None:
    """List sandboxes, or one sandbox's nodes and addresses."""
    _require_root()
    prefixes = [prefix] if prefix else Sandbox.list_prefixes()
    report: list[dict[str, Any]] = []
    for pfx in prefixes:
        try:
            box = Sandbox.attach(pfx)
        except SandboxError as exc:
            if prefix:
                raise click.ClickException(str(exc)) from exc
            report.append({"prefix": pfx, "error": "incomplete (run `weavepy sandbox down`)"})
            continue
        nodes: list[dict[str, Any]] = []
        for node in box.nodes:
            try:
                addrs = node.addresses()
            except SandboxError:
                addrs = ["(namespace missing)"]
            nodes.append({"name": node.name, "netns": node.netns,
                          "underlay_ip": node.underlay_ip, "addresses": addrs})
        report.append({"prefix": pfx, "nodes": nodes})
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    if not report:
        click.echo("no sandboxes")
    for entry in report:
        click.echo(f"sandbox {entry['prefix']}")
        if "error" in entry:
            click.echo(f"  {entry['error']}")
        for row in entry.get("nodes", []):
            click.echo(f"  {row['name']:<5} {row['netns']:<16} {', '.join(row['addresses'])}")


@sandbox_group.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("prefix")
@click.argument("node")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(prefix: str, node: str, argv: tuple[str, ...]) -> None:
    """Run a command inside a sandbox node: weavepy sandbox exec PREFIX n1 -- ip addr"""
    _require_root()
    try:
        target = Sandbox.attach(prefix).node(node)
    except (SandboxError, KeyError) as exc:
        raise click.ClickException(str(exc).strip("'\"")) from exc
    os.execvp("ip", ["ip", "netns", "exec", target.netns, *argv])


@sandbox_group.command("down")
@click.argument("prefix", required=False)
@click.option("--all", "everything", is_flag=True,
              help=f"remove every sandbox (prefix family '{PREFIX_FAMILY}')")
def down(prefix: str | None, everything: bool) -> None:
    """Remove a sandbox (or all of them): processes, namespaces, links."""
    _require_root()
    if not prefix and not everything:
        raise click.ClickException("name a PREFIX or pass --all")
    prefixes = Sandbox.list_prefixes() if everything else [prefix or ""]
    for pfx in prefixes:
        try:
            removed = Sandbox.down(pfx)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"{pfx}: removed {len(removed)} objects")
