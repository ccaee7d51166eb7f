"""The `weavepy` command line: one click group; each command is a thin shell over a module.

Rule: a user mistake, or an agent that is down, prints one readable line (click's
`Error: ...`) and exits non-zero; a traceback means a bug in weavepy. Commands that talk to a
running agent use its local HTTP API through `weavepy.apiclient` (stdlib only, so they start
fast); only `launch` imports the agent. Commands that change the node (connect, forget,
rmpeer, stop, external, reset) send the API token from the agent's state directory
(`--state-dir`, `$WEAVEPY_STATE_DIR` or the config file, as the agent finds it; see
weavepy.apitoken); the views need none.
"""

from __future__ import annotations

import base64
import importlib
import json
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from weavepy import __version__
from weavepy.config import SETTINGS, ConfigError, load_config, parse_peer
from weavepy.logfmt import LOG_FORMATS, configure_logging

F = TypeVar("F", bound=Callable[..., Any])
GIVE_BACK_WAIT = 25.0  # s; the agent answers within 15 (weavepy.control.RMPEER_TIMEOUT)


class LazyGroup(click.Group):
    """A click group whose heavier commands are imported only when they run (or `--help`).

    `weavepy launch` and the CNI path therefore never import the development tooling or the
    manifest renderer.
    """

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            module, attr = self.lazy[cmd_name].split(":")
            command = getattr(importlib.import_module(module), attr)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]},
             lazy={"sandbox": "weavepy.devtools.sandbox_cli:sandbox_group",
                   "chaos": "weavepy.devtools.chaos.cli:chaos_command",
                   "manifest": "weavepy.manifest:manifest_command"})
@click.version_option(__version__, prog_name="weavepy")
@click.option("--log-level", default="warning", show_default=True, envvar="WEAVEPY_LOG_LEVEL",
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
              help="[env: $WEAVEPY_LOG_LEVEL]")
@click.option("--log-format", default="text", show_default=True, envvar="WEAVEPY_LOG_FORMAT",
              type=click.Choice(LOG_FORMATS), help="json: one JSON object a line "
              "[env: $WEAVEPY_LOG_FORMAT]")
def main(log_level: str, log_format: str) -> None:
    """weavepy: a pod network with memberlist gossip, VXLAN or WireGuard tunnels, and CNI."""
    configure_logging(log_level, log_format)


@main.command("demo")
@click.option("--nodes", "-n", default=3, show_default=True, type=click.IntRange(2, 20))
@click.option("--keep", is_flag=True, help="leave the sandbox running (remove it with "
              "`weavepy sandbox down PREFIX`)")
@click.option("--encrypt", is_flag=True, help="pod traffic over the WireGuard path")
def demo(nodes: int, keep: bool, encrypt: bool) -> None:
    """Build a local cluster in network namespaces, show it working, tear it down."""
    from weavepy.devtools.demo import run_demo

    raise SystemExit(run_demo(nodes=nodes, keep=keep, echo=click.echo, encrypt=encrypt))


@main.command("install-cni")
@click.option("--bin-dir", default="/opt/cni/bin", show_default=True,
              help="where the weavepy-cni plugin goes")
@click.option("--conf-dir", default="/etc/cni/net.d", show_default=True,
              help="where 10-weavepy.conflist goes")
@click.option("--interpreter", default=None, metavar="PATH",
              help="the Python binary the plugin runs with (default: this one)")
@click.option("--socket", "socket_path", default=None, metavar="PATH",
              help="the agent's CNI socket [default: /run/weavepy/cni.sock]")
def install_cni_command(bin_dir: str, conf_dir: str, interpreter: str | None,
                        socket_path: str | None) -> None:
    """Install the weavepy-cni plugin and its network configuration (the init container's
    job; the agent does it itself with `launch --install-cni`)."""
    from weavepy.cni.install import InstallError, install_cni
    from weavepy.cni.protocol import DEFAULT_SOCKET_PATH

    try:
        installed = install_cni(bin_dir, conf_dir, interpreter=interpreter,
                                socket_path=socket_path or DEFAULT_SOCKET_PATH)
    except (InstallError, OSError) as exc:
        raise click.ClickException(f"install-cni: {exc}") from None
    click.echo(f"installed {installed.plugin} (python {installed.interpreter}) and "
               f"{installed.conflist}")


# ---------------------------------------------------------------------------------------------
# Agent commands

def _setting_options(names: set[str] | None = None) -> Callable[[F], F]:
    """click options for the settings in weavepy.config.SETTINGS (all, or those in `names`)."""

    def decorate(fn: F) -> F:
        for setting in reversed(SETTINGS):
            if not setting.flag or (names is not None and setting.name not in names):
                continue
            envs = ", ".join(f"${e}" for e in setting.envs)
            help_text = f"{setting.help}" + (f" [env: {envs}]" if envs else "")
            if setting.is_flag:
                option = click.option(setting.flag_name, setting.name, is_flag=True,
                                      default=None, help=help_text)
            else:
                option = click.option(setting.flag_name, setting.name, default=None,
                                      metavar=setting.metavar, help=help_text)
            fn = option(fn)
        fn = click.option("--config", "config_file", default=None, metavar="FILE",
                          help="YAML file with the same settings [env: $WEAVEPY_CONFIG]")(fn)
        return fn

    return decorate


def _load(flags: dict[str, Any], config_file: str | None) -> Any:
    try:
        return load_config(flags, os.environ, config_file)
    except ConfigError as exc:
        for problem in exc.problems[:-1]:
            click.echo(f"Error: {problem}", err=True)
        raise click.ClickException(exc.problems[-1]) from None


def _client(api_addr: str | None, token: str | None = None) -> Any:
    from weavepy.apiclient import ApiClient

    text = api_addr or os.environ.get("WEAVEPY_API_ADDR") or "127.0.0.1:6784"
    try:
        host, port = parse_peer(text, 6784)
    except ValueError as exc:
        raise click.ClickException(f"--api-addr: {exc}") from None
    return ApiClient(host, port, token=token)


def _token(config: Any) -> tuple[str | None, str]:
    """The API token in the agent's state directory (None if this user cannot read it), and
    the line to print if the agent refuses the request (HTTP 401)."""
    from weavepy.apitoken import TOKEN_FILE, TokenError, read_token

    try:
        token = read_token(config.state_dir)
    except TokenError as exc:
        return None, (f"the agent refused: no API token ({exc}); run as root on the node, or "
                      f"pass --state-dir")
    return token, (f"the agent refused the API token in {config.state_dir / TOKEN_FILE}; pass "
                   f"the agent's --state-dir")


def _changing_client(api_addr: str | None, config_file: str | None,
                     flags: dict[str, Any]) -> tuple[Any, str]:
    """A client for requests that change the node: it carries the API token (see `_token`).
    Returns it with the line for a refusal."""
    token, refused = _token(_load(flags, config_file))
    return _client(api_addr, token), refused


def _call(fn: Callable[[], Any], refused: str | None = None) -> Any:
    """`fn()`, with the agent's errors as one line (`refused` for a 401: the API token)."""
    from weavepy.apiclient import AgentRefused, AgentUnavailable

    try:
        return fn()
    except AgentRefused as exc:
        if exc.status == 401 and refused is not None:
            raise click.ClickException(refused) from None
        raise click.ClickException(str(exc)) from None
    except AgentUnavailable as exc:
        raise click.ClickException(str(exc)) from None


api_option = click.option("--api-addr", default=None, metavar="IP:PORT",
                          help="the agent's API [env: $WEAVEPY_API_ADDR; default 127.0.0.1:6784]")
# Where a command that changes the node finds the API token: the agent's state directory.
token_options = _setting_options({"state_dir"})


@main.command("launch")
@click.argument("peers", nargs=-1)
@_setting_options()
@click.option("--detach", is_flag=True, help="run in the background; log to RUN_DIR/agent.log")
def launch(peers: tuple[str, ...], config_file: str | None, detach: bool,
           **flags: Any) -> None:
    """Run the node agent (in the foreground unless --detach), joining PEERS (host[:port])."""
    if peers:
        flags["peers"] = list(peers)
    config = _load(flags, config_file)
    if detach:
        _detach(config)
        return
    from weavepy.agent import AgentError, run_agent

    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    for warning in config.warnings:
        logging.getLogger("weavepy.config").warning("%s", warning)
    try:
        run_agent(config)
    except AgentError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass


def _detach(config: Any) -> None:
    from weavepy.apiclient import AgentUnavailable, ApiClient

    argv = [a for a in sys.argv[1:] if a != "--detach"]
    config.run_dir.mkdir(parents=True, exist_ok=True)
    log_path = config.run_dir / "agent.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "weavepy.cli", *argv], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    client = ApiClient(config.api_addr[0], config.api_addr[1], timeout=2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
            raise click.ClickException(f"the agent exited ({proc.returncode}): "
                                       f"{tail[0] if tail else 'see ' + str(log_path)}")
        try:
            client.get("/healthz")
            click.echo(f"weavepy agent running, pid {proc.pid}, log {log_path}")
            return
        except AgentUnavailable:
            time.sleep(0.2)
    raise click.ClickException(f"the agent (pid {proc.pid}) did not answer within 30 s; "
                               f"see {log_path}")


def _echo_output(items: list[Any]) -> None:
    """Lines and tables from weavepy.statusview: rich tables on a terminal, plain text when
    piped (stable, for scripts and snapshot tests)."""
    from weavepy.statusview import Table

    console = None
    if sys.stdout.isatty():
        from rich.console import Console

        console = Console()
    for item in items:
        if not isinstance(item, Table):
            click.echo(item)
        elif console is not None:
            from rich.table import Table as RichTable

            table = RichTable(title=item.title, title_justify="left")
            for column in item.header:
                table.add_column(column)
            for row in item.rows:
                table.add_row(*row)
            console.print(table)
        else:
            click.echo(item.plain())


def _show(api_addr: str | None, path: str, as_json: bool, render: Callable[[Any], list[Any]],
          part: str | None = None) -> None:
    doc = _call(lambda: _client(api_addr).get(path))
    if as_json:
        click.echo(json.dumps(doc if part is None else doc.get(part), indent=2, sort_keys=True))
    else:
        _echo_output(render(doc))


json_option = click.option("--json", "as_json", is_flag=True, help="machine-readable output")


@main.group("status", invoke_without_command=True)
@json_option
@api_option
@click.pass_context
def status(ctx: click.Context, as_json: bool, api_addr: str | None) -> None:
    """This node at a glance: version, readiness, encryption, discovery, members,
    connections, IPAM state (with the command that fixes it) and the data path."""
    if ctx.invoked_subcommand is None:
        from weavepy.statusview import render_summary

        _show(api_addr, "/status", as_json, render_summary)


@status.command("peers")
@json_option
@api_option
def status_peers(as_json: bool, api_addr: str | None) -> None:
    """Every member: state, underlay and gossip address, blocks, routes programmed."""
    from weavepy.statusview import render_peers

    _show(api_addr, "/status", as_json, render_peers, "peers")


@status.command("connections")
@json_option
@api_option
def status_connections(as_json: bool, api_addr: str | None) -> None:
    """Per peer: data path, encryption, MTU, state, and the reason for any fallback."""
    from weavepy.statusview import render_connections

    _show(api_addr, "/status", as_json, render_connections, "connections")


@status.command("targets")
@json_option
@api_option
def status_targets(as_json: bool, api_addr: str | None) -> None:
    """Join targets (launch peers and `connect`): state, attempts, last error."""
    from weavepy.statusview import render_targets

    _show(api_addr, "/status", as_json, render_targets, "targets")


@status.command("ipam")
@json_option
@api_option
def status_ipam(as_json: bool, api_addr: str | None) -> None:
    """Address space: state, blocks per node, used and free, unreachable owners."""
    from weavepy.statusview import render_ipam

    _show(api_addr, "/status", as_json, render_ipam, "ipam")


@status.command("policy")
@json_option
@api_option
def status_policy(as_json: bool, api_addr: str | None) -> None:
    """NetworkPolicy: source, policies, the pods of this node they isolate, drops, errors."""
    from weavepy.statusview import render_policy

    _show(api_addr, "/policy", as_json, render_policy)


@main.group("policy")
def policy() -> None:
    """NetworkPolicy on this node (docs/policy.md)."""


@policy.command("explain")
@click.argument("src")
@click.argument("dst")
@click.argument("port", metavar="PORT/PROTO")
@json_option
@api_option
def policy_explain(src: str, dst: str, port: str, as_json: bool, api_addr: str | None) -> None:
    """May SRC open a connection to DST on PORT/PROTO (80/TCP, 53/UDP, or ICMP)? SRC and DST
    are pods (NAMESPACE/NAME) or addresses. The verdict comes from the live state, with the
    policies that decided it; the exit status is 0 when allowed, 1 when denied."""
    from urllib.parse import urlencode

    from weavepy.statusview import render_explain

    query = urlencode({"src": src, "dst": dst, "port": port})
    doc = _call(lambda: _client(api_addr).get(f"/policy/explain?{query}"))
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        _echo_output(render_explain(doc))
    sys.exit(0 if doc.get("allowed") else 1)


@main.command("ps")
@json_option
@api_option
def ps(as_json: bool, api_addr: str | None) -> None:
    """Every pod on this node: container ID, interface (pod side and host veth), the pod's
    MAC and addresses (as Weave's `weave ps`)."""
    from weavepy.statusview import render_pods

    _show(api_addr, "/pods", as_json, render_pods, "pods")


@main.command("report")
@json_option
@api_option
def report(as_json: bool, api_addr: str | None) -> None:
    """Everything the agent knows (--json: the stable schema in docs/report.schema.json)."""
    from weavepy.statusview import render_report

    _show(api_addr, "/report", as_json, render_report)


@main.command("connect")
@click.argument("peers", nargs=-1, required=True)
@click.option("--replace", is_flag=True, help="replace the target list instead of adding")
@api_option
@token_options
def connect(peers: tuple[str, ...], replace: bool, api_addr: str | None,
            config_file: str | None, **flags: Any) -> None:
    """Join PEERS (host[:port]) and keep retrying them until `forget`."""
    for peer in peers:
        try:
            parse_peer(peer)
        except ValueError as exc:
            raise click.ClickException(f"{peer}: {exc}") from None
    client, refused = _changing_client(api_addr, config_file, flags)
    doc = _call(lambda: client.post("/connect", {"peers": list(peers), "replace": replace}),
                refused)
    click.echo(f"targets: {', '.join(doc['targets']) or '(none)'}")


@main.command("forget")
@click.argument("peers", nargs=-1, required=True)
@api_option
@token_options
def forget(peers: tuple[str, ...], api_addr: str | None, config_file: str | None,
           **flags: Any) -> None:
    """Stop trying to join PEERS (members already joined stay)."""
    client, refused = _changing_client(api_addr, config_file, flags)
    doc = _call(lambda: client.post("/forget", {"peers": list(peers)}), refused)
    if doc.get("unknown"):
        click.echo(f"not targets: {', '.join(doc['unknown'])}", err=True)
    click.echo(f"targets: {', '.join(doc['targets']) or '(none)'}")


@main.command("rmpeer")
@click.argument("name")
@click.option("--force", is_flag=True, help="remove even without a majority of voters, or "
              "while the node still looks live (you promise it is gone)")
@api_option
@token_options
def rmpeer(name: str, force: bool, api_addr: str | None, config_file: str | None,
           **flags: Any) -> None:
    """Reclaim the address space of node NAME, which is gone for good."""
    query = {"force": "true"} if force else None
    client, refused = _changing_client(api_addr, config_file, flags)
    doc = _call(lambda: client.delete(f"/peer/{name}", query), refused)
    click.echo(doc.get("message") or json.dumps(doc))


@main.command("reload-keyring")
@api_option
@token_options
def reload_keyring(api_addr: str | None, config_file: str | None, **flags: Any) -> None:
    """Read the gossip keyring file again (a step of a key rotation, without a restart)."""
    client, refused = _changing_client(api_addr, config_file, flags)
    doc = _call(lambda: client.post("/keyring/reload"), refused)
    click.echo(f"gossip keyring reloaded: {doc['keys']} key(s), the first (sha256 "
               f"{doc['primary_sha256']}...) encrypts")


@main.command("stop")
@click.option("--no-leave", is_flag=True,
              help="Do not leave the cluster (as on SIGTERM): for a restart, peers keep their "
                   "routes to this node's pods.")
@api_option
@token_options
def stop(no_leave: bool, api_addr: str | None, config_file: str | None, **flags: Any) -> None:
    """Stop the agent gracefully: it leaves the cluster, so peers drop their routes to it at
    once; pods and this node's kernel state stay. SIGTERM stops without leaving."""
    client, refused = _changing_client(api_addr, config_file, flags)
    _call(lambda: client.post("/stop?leave=false" if no_leave else "/stop"), refused)
    if not _wait_down(client, 15):
        raise click.ClickException("the agent accepted the stop but still answers after 15 s")
    click.echo("weavepy agent stopped")


def _wait_down(client: Any, seconds: float) -> bool:
    from weavepy.apiclient import AgentUnavailable

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            client.get("/healthz")
        except AgentUnavailable:
            return True
        time.sleep(0.1)
    return False


@main.command("reset")
@_setting_options({"name", "state_dir", "run_dir", "vxlan_device", "bridge", "wg_device",
                   "api_addr"})
@click.option("--force", is_flag=True, help="do not ask for confirmation, and do not ask the "
              "cluster to take the address space back first (it says what is left for rmpeer)")
def reset(config_file: str | None, force: bool, **flags: Any) -> None:
    """Give this node's address space back to the cluster (if its agent runs and a majority of
    voters is reachable), stop the agent, then remove this node's VXLAN device, pod bridge,
    pod veths and state: the node forgets its blocks and identity and can join any cluster as
    new. Whatever could not be given back is named, with the rmpeer that reclaims it."""
    from weavepy.apiclient import AgentRefused, AgentUnavailable, ApiClient

    if os.geteuid() != 0:
        raise click.ClickException("weavepy reset needs root (it removes network devices)")
    config = _load(flags, config_file)
    if not force and sys.stdin.isatty():
        click.confirm(f"Remove this node's pod network and its state in {config.state_dir}?",
                      abort=True)
    gave_back = not force and _give_space_back(config)
    token, refused = _token(config)
    client = ApiClient(config.api_addr[0], config.api_addr[1], timeout=5, token=token)
    try:
        client.post("/stop")
        if not _wait_down(client, 15):
            raise click.ClickException("the agent still answers after 15 s; stop it first")
        click.echo("stopped the running agent")
    except AgentUnavailable:
        pass
    except AgentRefused as exc:
        reason = refused if exc.status == 401 else f"the agent refused to stop: {exc}"
        raise click.ClickException(reason) from None
    from weavepy.reset import ResetError, reset_node, space_left

    left = None if gave_back else space_left(config)
    if left is not None:
        click.echo(left)
    try:
        removed = reset_node(config)
    except ResetError as exc:
        raise click.ClickException(f"reset failed: {exc}") from None
    click.echo(f"removed {len(removed)} items" + (": " + ", ".join(removed) if removed else ""))


def _give_space_back(config: Any) -> bool:
    """Ask a running agent to give its blocks back by quorum (DELETE /peer); says what
    happened. False when no agent answers or the cluster could not decide."""
    from weavepy.apiclient import AgentRefused, AgentUnavailable, ApiClient

    token, _ = _token(config)
    client = ApiClient(config.api_addr[0], config.api_addr[1], timeout=GIVE_BACK_WAIT,
                       token=token)
    try:
        doc = client.delete("/peer")
    except AgentUnavailable:
        return False  # not running: what it holds is named from its saved state
    except AgentRefused as exc:
        click.echo(f"could not give the address space back: {exc}")
        return False
    click.echo(doc.get("message") or json.dumps(doc))
    return True


@main.command("wg-config")
@click.argument("name")
@api_option
def wg_config(name: str, api_addr: str | None) -> None:
    """Print the wg-quick configuration that lets external host NAME (stock WireGuard) join
    the pod network; fill in its private key."""
    doc = _call(lambda: _client(api_addr).get(f"/wg-config/{name}"))
    click.echo(doc["config"], nl=False)


@main.group("external")
def external() -> None:
    """Declare hosts with stock WireGuard that join the pod network (on each node)."""


@external.command("add")
@click.argument("name")
@click.option("--public-key", required=True, help="the host's WireGuard public key (base64)")
@click.option("--allowed-ips", required=True, metavar="CIDR[,CIDR...]",
              help="the host's overlay address(es), outside the pod range")
@click.option("--endpoint", default=None, metavar="IP:PORT",
              help="where the host listens (omit when it is behind NAT: it is learned from "
              "its first handshake)")
@api_option
@token_options
def external_add(name: str, public_key: str, allowed_ips: str, endpoint: str | None,
                 api_addr: str | None, config_file: str | None, **flags: Any) -> None:
    """Declare (or replace) external peer NAME on this node."""
    body = {"name": name, "public_key": public_key, "allowed_ips": allowed_ips,
            "endpoint": endpoint}
    client, refused = _changing_client(api_addr, config_file, flags)
    doc = _call(lambda: client.post("/external-peers", body), refused)
    click.echo(f"external peers: {', '.join(p['name'] for p in doc['external_peers'])}")


@external.command("rm")
@click.argument("name")
@api_option
@token_options
def external_rm(name: str, api_addr: str | None, config_file: str | None,
                **flags: Any) -> None:
    """Remove external peer NAME from this node."""
    client, refused = _changing_client(api_addr, config_file, flags)
    doc = _call(lambda: client.delete(f"/external-peers/{name}"), refused)
    click.echo(f"external peers: {', '.join(p['name'] for p in doc['external_peers']) or '-'}")


@main.command("keygen")
def keygen() -> None:
    """Print a new random 32-byte gossip key (base64), for --keyring-file or $WEAVEPY_ENCRYPT."""
    click.echo(base64.b64encode(secrets.token_bytes(32)).decode())


if __name__ == "__main__":
    main()
