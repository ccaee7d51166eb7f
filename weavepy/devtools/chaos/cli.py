"""`weavepy chaos`: the click command that runs a chaos schedule and prints its report.

It owns the command line only (options, output format, exit codes): 0 when every invariant
held, 1 on any violation, 2 when the run could not start (bad schedule, no root, the cluster
never came up). The lead registers `chaos_command` in `weavepy.cli`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
from pathlib import Path

import click

from weavepy.devtools.chaos.schedule import PROFILES, ScheduleError, generate, load_schedule

__all__ = ["chaos_command"]


@click.command("chaos")
@click.option("--nodes", type=click.IntRange(3, 50), default=5, show_default=True,
              help="sandbox nodes (ignored with --schedule, which names its own)")
@click.option("--seed", type=int, default=None,
              help="seed of the fault schedule (default: a fresh one, printed for replay)")
@click.option("--duration", type=click.FloatRange(1, None), default=None,
              help="seconds of faults to generate (soak: 1800 unless given)")
@click.option("--profile", type=click.Choice(PROFILES), default="default", show_default=True,
              help="short: 3 faults; default: one of each kind; soak: random faults")
@click.option("--schedule", "schedule_file", type=click.Path(exists=True, dir_okay=False,
                                                             path_type=Path),
              default=None, help="a YAML schedule (see `--print-schedule`)")
@click.option("--convergence-bound", type=click.FloatRange(1, 3600), default=30.0,
              show_default=True, help="seconds within which kernel state must follow "
                                      "membership")
@click.option("--print-schedule", is_flag=True, help="print the schedule as YAML and exit")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--keep", is_flag=True, help="leave the sandbox up for inspection")
def chaos_command(nodes: int, seed: int | None, duration: float | None, profile: str,
                  schedule_file: Path | None, convergence_bound: float, print_schedule: bool,
                  as_json: bool, keep: bool) -> None:
    """Run a sandboxed cluster through kills, partitions, impairments and stalls, checking
    the invariants live. Exits 1 on any violation; the seed replays the run."""
    try:
        if schedule_file is not None:
            schedule = load_schedule(schedule_file.read_text())
        else:
            schedule = generate(seed if seed is not None else secrets.randbelow(10**9), nodes,
                                profile, duration, convergence_bound)
    except (ScheduleError, OSError) as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    if print_schedule:
        click.echo(schedule.to_yaml(), nl=False)
        return
    if os.geteuid() != 0:
        click.echo("Error: weavepy chaos needs root (it builds network namespaces)", err=True)
        sys.exit(2)
    from weavepy.devtools.chaos.runner import ChaosSetupError, RunOptions, run_chaos

    logging.getLogger("weavepy").setLevel(logging.WARNING)
    progress = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    try:
        report = run_chaos(schedule, RunOptions(keep=keep, echo=progress))
    except ChaosSetupError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=1))
    else:
        click.echo(report.to_text(), nl=False)
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    chaos_command()
