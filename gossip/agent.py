"""The standalone gossip agent: `python -m gossip agent --name N --bind ADDR:PORT ...`.

This module owns the command line and the agent's lifetime, and no protocol: it builds a
`GossipService`, joins the seeds, prints one JSON line per membership event on stdout
(`event`, `name`, `addr`, `port`, `tags`, `time`; our own `join` comes first, so a supervisor
learns the real port when it asked for port 0), and leaves gracefully on SIGTERM or SIGINT.

The rule it keeps for operators: a bad flag or an unusable file costs one readable line on
stderr and exit status 2, never a traceback; a runtime failure (the port is taken, no seed
answered) is one line and exit status 1; a graceful leave exits 0. Logs go to stderr.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

import click
import trio

from gossip.config import GossipConfig
from gossip.events import MemberEvent
from gossip.hostport import HostKind, parse_host_port
from gossip.keyring import Keyring
from gossip.tags import encode_tags
from gossip.transport import (
    DEFAULT_LEAVE_TIMEOUT,
    DEFAULT_PORT,
    GossipService,
    JoinError,
)

logger = logging.getLogger(__name__)

PROFILES = {"lan": GossipConfig.lan, "wan": GossipConfig.wan, "local": GossipConfig.local}
EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2
PROGRAM = "gossip"


class AgentError(Exception):
    """A runtime failure reported as one line (exit status 1)."""


@dataclass(frozen=True, slots=True)
class AgentOptions:
    name: str
    bind: tuple[str, int]
    advertise: tuple[str, int] | None
    join: tuple[tuple[str, int], ...]
    tags: dict[str, str]
    keyring: Keyring | None
    config: GossipConfig
    leave_timeout: float


def event_line(event: MemberEvent, wall_time: float) -> str:
    """One event as the agent prints it: a JSON object on one line."""
    return json.dumps(
        {
            "event": event.kind.value,
            "name": event.name,
            "addr": str(ipaddress.ip_address(event.addr)),
            "port": event.port,
            "tags": dict(event.tags),
            "time": round(wall_time, 6),
        },
        sort_keys=False,
    )


async def run_agent(options: AgentOptions, out: TextIO) -> int:
    """Run until SIGTERM/SIGINT, then leave gracefully. Return the exit status."""
    service = GossipService(
        options.config,
        options.name,
        options.bind,
        options.advertise,
        keyring=options.keyring,
        tags=options.tags,
    )
    error: str | None = None
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with contextlib.AsyncExitStack() as stack:
            try:
                svc = await stack.enter_async_context(service)
            except OSError as exc:
                raise AgentError(str(exc)) from None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_print_events, svc.events(), out)
                error = await _join(svc, options.join)
                if error is None:
                    async for signum in signals:
                        logger.info("received %s, leaving", signal.Signals(signum).name)
                        break
                    if not await svc.leave(options.leave_timeout):
                        logger.warning("the leave broadcast did not finish in time")
                    await trio.sleep(0)  # let the printer take the last events
                nursery.cancel_scope.cancel()
    if error is not None:
        raise AgentError(error)
    return EXIT_OK


async def _join(svc: GossipService, seeds: Sequence[tuple[str, int]]) -> str | None:
    """Join the seeds, if any; return why it failed, or None."""
    if not seeds:
        return None
    try:
        joined = await svc.join(seeds)
    except (JoinError, OSError) as exc:
        return str(exc)
    logger.info("joined %d of %d seeds", joined, len(seeds))
    return None


async def _print_events(events: trio.MemoryReceiveChannel[MemberEvent], out: TextIO) -> None:
    # Writes go through a worker thread: a reader that stops reading our stdout stalls this
    # task (and, past the channel's buffer, costs events, counted), never the event loop.
    stream = trio.wrap_file(out)
    async for event in events:
        # The event's own moment on the wall clock, however long it waited in the channel.
        wall = time.time() - (trio.current_time() - event.time)
        await stream.write(event_line(event, wall) + "\n")
        await stream.flush()


# -- command line ------------------------------------------------------------------------------


def _address(
    value: str, what: str, default_port: int, *, hosts: HostKind, allow_port_zero: bool = False
) -> tuple[str, int]:
    try:
        return parse_host_port(
            value, default_port=default_port, allow_port_zero=allow_port_zero, hosts=hosts
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=what) from None


def _tags(values: Sequence[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", param_hint="--tag")
        tags[key] = text
    try:
        encode_tags(tags)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--tag") from None
    return tags


@click.group(name=PROGRAM, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Memberlist-compatible gossip (SWIM + Lifeguard); serf agents are peers."""


@cli.command()
@click.option("--name", required=True, help="Node name, unique in the cluster.")
@click.option("--bind", "bind_text", required=True, metavar="ADDR:PORT",
              help="Address for the UDP and TCP listeners (port 0 picks a free one).")
@click.option("--advertise", "advertise_text", metavar="ADDR:PORT",
              help="Address peers reach us at (default: the bind address).")
@click.option("--join", "join_texts", multiple=True, metavar="ADDR:PORT",
              help="A seed to join; repeatable. Exit 1 if none answers.")
@click.option("--tag", "tag_texts", multiple=True, metavar="KEY=VALUE",
              help="A serf tag to advertise; repeatable.")
@click.option("--keyring-file", type=click.Path(dir_okay=False),
              help="serf keyring file (JSON list of base64 keys) or one base64 key per line.")
@click.option("--profile", type=click.Choice(sorted(PROFILES)), default="lan", show_default=True,
              help="memberlist timing profile.")
@click.option("--leave-timeout", type=click.FloatRange(min=0.0), default=DEFAULT_LEAVE_TIMEOUT,
              show_default=True, help="Seconds to spend broadcasting our leave.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="warning", show_default=True, help="Log level (logs go to stderr).")
def agent(
    name: str,
    bind_text: str,
    advertise_text: str | None,
    join_texts: tuple[str, ...],
    tag_texts: tuple[str, ...],
    keyring_file: str | None,
    profile: str,
    leave_timeout: float,
    log_level: str,
) -> None:
    """Run a gossip member; print one JSON line per membership event."""
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    keyring = None
    if keyring_file is not None:
        try:
            keyring = Keyring.from_file(keyring_file)
        except (OSError, ValueError) as exc:
            raise click.BadParameter(str(exc), param_hint="--keyring-file") from None
    bind = _address(bind_text, "--bind", DEFAULT_PORT, hosts="ip", allow_port_zero=True)
    advertise = None
    if advertise_text:
        advertise = _address(advertise_text, "--advertise", bind[1], hosts="ip")
    elif ipaddress.ip_address(bind[0]).is_unspecified:
        raise click.BadParameter("a wildcard bind address needs --advertise", param_hint="--bind")
    options = AgentOptions(
        name=name,
        bind=bind,
        advertise=advertise,
        join=tuple(_address(text, "--join", DEFAULT_PORT, hosts="name") for text in join_texts),
        tags=_tags(tag_texts),
        keyring=keyring,
        config=PROFILES[profile](),
        leave_timeout=leave_timeout,
    )
    try:
        status = trio.run(run_agent, options, sys.stdout)
    except (AgentError, ValueError) as exc:
        _fail(str(exc), EXIT_RUNTIME)
    sys.exit(status)


def _fail(message: str, status: int) -> None:
    sys.stderr.write(f"{PROGRAM}: error: {message}\n")
    sys.stderr.flush()
    sys.exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the CLI; usage errors are one line and exit status 2."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name=PROGRAM,
                 standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        # click prints help for a bare group: that is an answer, not an error.
        sys.stdout.write((exc.ctx.get_help() if exc.ctx else "") + "\n")
        return EXIT_USAGE
    except click.UsageError as exc:
        _fail(exc.format_message().replace("\n", " "), EXIT_USAGE)
    except click.ClickException as exc:
        _fail(exc.format_message().replace("\n", " "), EXIT_USAGE)
    except click.Abort:
        _fail("aborted", EXIT_RUNTIME)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_RUNTIME)
    return EXIT_OK
