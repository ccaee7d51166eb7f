"""weavepy-cni: the CNI plugin binary, a thin client of the node's weavepy agent.

This module owns what runs each time a container runtime executes the plugin. The rule it
keeps: **it is a single stdlib-only file that does no network work itself and starts in a few
milliseconds**. It forwards the CNI environment and stdin to the agent over a unix socket
(wire format in `weavepy.cni.protocol`), prints the agent's answer, and exits 0 or 1. Only
VERSION is answered locally; with no agent listening it answers CNI error 11 (try again later).

Why it looks unusual: a runtime runs the plugin for every pod, so start-up time is pod start
time. `import json`, `socket` and `typing` each cost ~10 ms here (they pull in `re`, `enum`
and friends); the C modules behind them (`_json`, `_socket`) cost ~0.3 ms. So this file uses
those C modules directly, falls back to the pure-Python ones where they are missing (on
interpreters other than CPython), reads the environment from `posix` rather than `os`, and
writes its annotations as strings (no `__future__` import, no `typing` at run time).
`weavepy.cni.install` embeds this file (with its bytecode) in the installed executable behind
a `#!<interpreter> -IS` line, so it must never import from `weavepy`.
"""

import posix  # already loaded by the interpreter; `os` would cost ~1.4 ms more
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any, BinaryIO, TextIO

try:  # CPython's C accelerators: the same code `json` and `socket` use, minus the imports
    import _json
    import _socket as socket_module
except ImportError:  # pragma: no cover - non-CPython interpreters
    import json as _json_fallback
    import socket as socket_module  # type: ignore[no-redef]

    _json = None  # type: ignore[assignment]

SPEC_VERSION = "1.1.0"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")
DEFAULT_SOCKET_PATH = "/run/weavepy/cni.sock"
WIRE_VERSION = 1
CONNECT_TIMEOUT = 5.0
REPLY_TIMEOUT = 120.0  # ADD may wait for the agent to claim a new block
MAX_REPLY_BYTES = 4 << 20

ERR_INVALID_ENVIRONMENT = 4
ERR_IO_FAILURE = 5
ERR_DECODE_FAILURE = 6
ERR_INVALID_NETWORK_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11


class PluginError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


# --- JSON through the C accelerator -------------------------------------------------------------


class _DecodeContext:
    """The attributes `_json.make_scanner` reads (the same ones `json.JSONDecoder` has)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> float:
        return float(name.replace("Infinity", "inf"))


def json_loads(text: str) -> "Any":
    if _json is None:  # pragma: no cover
        return _json_fallback.loads(text)
    # typeshed types the argument as a scanner; the C code only reads the attributes above
    context: Any = _DecodeContext()
    scan: Callable[[str, int], tuple[Any, int]] = _json.make_scanner(context)
    body = text.strip(" \t\n\r")
    try:
        value, end = scan(body, 0)
    except (StopIteration, ValueError, SystemError):
        # Malformed input. CPython 3.11's scanner builds its error from `json.decoder` only if
        # that is already imported (else SystemError), so let the full decoder say what is
        # wrong: this path is rare and may be slow.
        return _json_module().loads(text)
    if end != len(body):
        return _json_module().loads(text)
    return value


def _json_module() -> "Any":
    import json

    return json


def json_string(text: str) -> str:
    if _json is None:  # pragma: no cover
        return str(_json_fallback.dumps(text))
    return str(_json.encode_basestring_ascii(text))


def json_object(fields: "Mapping[str, str | int]") -> str:
    """A flat JSON object of strings and integers (all this client ever writes)."""
    parts = []
    for key, value in fields.items():
        rendered = str(value) if isinstance(value, int) else json_string(value)
        parts.append(f"{json_string(key)}:{rendered}")
    return "{" + ",".join(parts) + "}"


def error_json(error: PluginError, cni_version: "str | None") -> str:
    version = cni_version if cni_version in SUPPORTED_VERSIONS else SPEC_VERSION
    return json_object({"cniVersion": version, "code": error.code, "msg": error.msg,
                        "details": error.details})


# --- the exchange with the agent ----------------------------------------------------------------


def build_request(env: "Mapping[str, str]", stdin_text: str) -> bytes:
    cni_env = {k: v for k, v in env.items() if k.startswith("CNI_")}
    return ("{" + f'"wire":{WIRE_VERSION},"env":{json_object(cni_env)},'
            f'"stdin":{json_string(stdin_text)}' + "}").encode("ascii")


def exchange(socket_path: str, request: bytes, reply_timeout: float = REPLY_TIMEOUT) -> bytes:
    """Send one request to the agent and return its whole reply."""
    sock = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(socket_path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise PluginError(
                ERR_TRY_AGAIN_LATER, "the weavepy agent is not running on this node",
                f"cannot connect to {socket_path}: {exc.strerror}; start the weavepy agent "
                "(it creates this socket) and the runtime will retry") from None
        except OSError as exc:
            raise PluginError(ERR_TRY_AGAIN_LATER, "cannot reach the weavepy agent",
                              f"connect to {socket_path}: {exc}") from None
        sock.settimeout(reply_timeout)
        chunks = []
        size = 0
        try:
            sock.sendall(request)
            sock.shutdown(socket_module.SHUT_WR)
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_REPLY_BYTES:
                    raise PluginError(ERR_IO_FAILURE, "the weavepy agent's reply is too large",
                                      f"more than {MAX_REPLY_BYTES} bytes")
                chunks.append(chunk)
        except TimeoutError:
            raise PluginError(ERR_TRY_AGAIN_LATER, "the weavepy agent did not answer in time",
                              f"no reply on {socket_path} within {reply_timeout:.0f} s") from None
        except OSError as exc:
            raise PluginError(ERR_TRY_AGAIN_LATER, "lost the connection to the weavepy agent",
                              f"{socket_path}: {exc}") from None
    finally:
        sock.close()
    if not chunks:
        raise PluginError(ERR_TRY_AGAIN_LATER, "the weavepy agent closed the connection",
                          f"no reply on {socket_path} (is the agent shutting down?)")
    return b"".join(chunks)


def decode_reply(data: bytes) -> "tuple[int, str]":
    try:
        reply = json_loads(data.decode("utf-8"))
        code, stdout = reply["code"], reply["stdout"]
        if reply.get("wire") != WIRE_VERSION or not isinstance(code, int) \
                or not isinstance(stdout, str):
            raise ValueError("unexpected fields")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PluginError(ERR_IO_FAILURE, "cannot decode the weavepy agent's reply",
                          f"{exc}; the plugin and the agent may be different versions") from None
    return code, stdout


# --- the plugin ---------------------------------------------------------------------------------


def version_json(config: object) -> str:
    asked = config.get("cniVersion") if isinstance(config, dict) else None
    version = asked if isinstance(asked, str) and asked else SPEC_VERSION
    listed = ",".join(json_string(v) for v in SUPPORTED_VERSIONS)
    return "{" + f'"cniVersion":{json_string(version)},"supportedVersions":[{listed}]' + "}"


def run(env: "Mapping[str, str]", stdin: "BinaryIO", stdout: "TextIO") -> int:
    """One plugin invocation; returns the exit status."""
    cni_version: str | None = None
    try:
        command = env.get("CNI_COMMAND", "")
        if command not in COMMANDS:
            raise PluginError(
                ERR_INVALID_ENVIRONMENT,
                "missing environment variable CNI_COMMAND" if not command
                else "invalid environment variable CNI_COMMAND",
                f"got {command!r}; expected one of {', '.join(COMMANDS)}")
        try:
            data = stdin.read()
        except OSError as exc:
            raise PluginError(ERR_IO_FAILURE, "cannot read the network configuration",
                              str(exc)) from None
        try:
            text = data.decode("utf-8")
            config = json_loads(text) if text.strip() or command != "VERSION" else {}
        except ValueError as exc:
            raise PluginError(ERR_DECODE_FAILURE, "cannot decode the network configuration",
                              f"stdin is not UTF-8 JSON: {exc}") from None
        if not isinstance(config, dict):
            raise PluginError(ERR_DECODE_FAILURE, "cannot decode the network configuration",
                              "expected a JSON object")
        version = config.get("cniVersion")
        cni_version = version if isinstance(version, str) else None
        if command == "VERSION":
            stdout.write(version_json(config))
            return 0
        socket_path = config.get("socketPath") or DEFAULT_SOCKET_PATH
        if not isinstance(socket_path, str) or not socket_path.startswith("/"):
            raise PluginError(ERR_INVALID_NETWORK_CONFIG, "invalid network config",
                              f"socketPath must be an absolute path, got {socket_path!r}")
        code, answer = decode_reply(exchange(socket_path, build_request(env, text)))
    except PluginError as error:
        stdout.write(error_json(error, cni_version))
        return 1
    stdout.write(answer)
    return 0 if code == 0 else 1


def cni_environment() -> "dict[str, str]":
    """The CNI_* variables of this process, decoded as `os.environ` would."""
    out = {}
    for key, value in posix.environ.items():
        if key.startswith(b"CNI_"):
            out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    return out


def main() -> None:
    status = run(cni_environment(), sys.stdin.buffer, sys.stdout)
    sys.stdout.flush()
    sys.exit(status)


if __name__ == "__main__":
    main()
