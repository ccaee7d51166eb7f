"""The CNI request: what a runtime hands the plugin, parsed and validated (sans-IO).

This module owns the translation from the CNI execution protocol (environment variables plus
a JSON network configuration on stdin, SPEC.md section 2 and 3) into a typed `CniRequest`, the
spec's error codes, and the small wire format between the `weavepy-cni` client and the agent.
The rule it keeps: **every malformed input becomes a `CniError` with the spec's code and a
message that names the offending variable or key; nothing here touches the kernel, a file or
a clock**, so the agent can validate a request before any work is done.

Error codes (SPEC.md "Error", and libcni `pkg/types`): 1 incompatible version, 2 unsupported
field, 3 unknown container, 4 invalid environment variables, 5 I/O failure, 6 decode failure,
7 invalid network config, 8 invalid network namespace (libcni's `ErrInvalidNetNS`), 11 try
again later, 50/51 plugin not available (STATUS), 999 internal.

Runtimes differ in small ways that this module absorbs:

- `CNI_ARGS` pairs come in any order (containerd shuffles them between calls), with or
  without `IgnoreUnknown`; unknown keys are kept, not rejected.
- `runtimeConfig` keys are matched case-insensitively: containerd 1.6 sends Go field names
  (`HostPort`, `ContainerPort`, `IngressRate`) where the conventions document `hostPort`.
- DEL may come with an empty `CNI_NETNS` (after the runtime removed the namespace), and GC
  omits `cni.dev/valid-attachments` when the list is empty (Go's `omitempty`).

Wire format, client to agent (one request per unix-socket connection; the client half-closes
after sending): a JSON object ``{"wire": 1, "env": {"CNI_COMMAND": ..., ...}, "stdin": "..."}``
carrying the plugin's `CNI_*` environment and its stdin text. The agent answers with
``{"wire": 1, "code": N, "stdout": "..."}`` and closes; the client prints `stdout` verbatim and
exits 0 when `code` is 0, else 1.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from weavepy.cni.result import DNS, SUPPORTED_VERSIONS, Result, ResultFormatError, parse_dns
from weavepy.cni.result import parse_result as _parse_result

SPEC_VERSION = "1.1.0"
WIRE_VERSION = 1
DEFAULT_SOCKET_PATH = "/run/weavepy/cni.sock"
MAX_IFNAME_LENGTH = 15  # IFNAMSIZ - 1

_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_NETWORK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


class ErrorCode(enum.IntEnum):
    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    UNKNOWN_CONTAINER = 3
    INVALID_ENVIRONMENT = 4
    IO_FAILURE = 5
    DECODE_FAILURE = 6
    INVALID_NETWORK_CONFIG = 7
    INVALID_NETNS = 8
    TRY_AGAIN_LATER = 11
    PLUGIN_NOT_AVAILABLE = 50
    LIMITED_CONNECTIVITY = 51
    INTERNAL = 999


class CniError(Exception):
    """An error the plugin reports to the runtime as a CNI error object."""

    def __init__(self, code: ErrorCode, msg: str, details: str = "") -> None:
        super().__init__(f"{msg}: {details}" if details else msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str | None = None) -> dict[str, Any]:
        version = cni_version if cni_version in SUPPORTED_VERSIONS else SPEC_VERSION
        return {"cniVersion": version, "code": int(self.code), "msg": self.msg,
                "details": self.details}


class Command(enum.StrEnum):
    ADD = "ADD"
    DEL = "DEL"
    CHECK = "CHECK"
    STATUS = "STATUS"
    GC = "GC"
    VERSION = "VERSION"


# The first spec version that defines each command; older configs must not use it.
_COMMAND_SINCE = {Command.CHECK: "0.4.0", Command.STATUS: "1.1.0", Command.GC: "1.1.0"}


def version_key(version: str) -> tuple[int, ...]:
    """A sortable key for a dotted spec version ("0.4.0" -> (0, 4, 0))."""
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        raise CniError(ErrorCode.INCOMPATIBLE_VERSION, "malformed cniVersion",
                       f"{version!r} is not a dotted version number") from None


@dataclass(frozen=True)
class PodIdentity:
    """The Kubernetes pod behind a sandbox, from the `K8S_POD_*` CNI_ARGS."""

    namespace: str = ""
    name: str = ""
    infra_container_id: str = ""
    uid: str = ""

    def label(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


@dataclass(frozen=True)
class PortMapping:
    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str = ""


@dataclass(frozen=True)
class Bandwidth:
    ingress_rate: int = 0
    ingress_burst: int = 0
    egress_rate: int = 0
    egress_burst: int = 0


@dataclass(frozen=True)
class RuntimeConfig:
    """The capability arguments the runtime passed (SPEC.md "Deriving runtimeConfig")."""

    port_mappings: tuple[PortMapping, ...] = ()
    bandwidth: Bandwidth | None = None
    mac: str = ""
    ips: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Attachment:
    """One attachment of a container to the network: the (CNI_CONTAINERID, CNI_IFNAME) pair."""

    container_id: str
    ifname: str


@dataclass(frozen=True)
class NetworkConfig:
    cni_version: str
    name: str
    type: str
    socket_path: str = DEFAULT_SOCKET_PATH
    dns: DNS = field(default_factory=DNS)
    prev_result: Result | None = None
    runtime_config: RuntimeConfig = field(default_factory=RuntimeConfig)
    valid_attachments: frozenset[Attachment] = frozenset()
    raw: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CniRequest:
    command: Command
    config: NetworkConfig
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: Mapping[str, str] = field(default_factory=dict)
    pod: PodIdentity | None = None
    path: tuple[str, ...] = ()

    @property
    def attachment(self) -> Attachment:
        return Attachment(self.container_id, self.ifname)


# --- environment --------------------------------------------------------------------------------


def parse_command(env: Mapping[str, str]) -> Command:
    value = env.get("CNI_COMMAND", "")
    if not value:
        raise CniError(ErrorCode.INVALID_ENVIRONMENT, "missing environment variable CNI_COMMAND")
    try:
        return Command(value)
    except ValueError:
        raise CniError(ErrorCode.INVALID_ENVIRONMENT, "invalid environment variable CNI_COMMAND",
                       f"unknown command {value!r}; expected one of "
                       f"{', '.join(c.value for c in Command)}") from None


def parse_cni_args(text: str) -> dict[str, str]:
    """`CNI_ARGS` ("K1=V1;K2=V2", any order) as a dict; empty pairs are skipped."""
    out: dict[str, str] = {}
    for pair in text.split(";"):
        if not pair.strip():
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(ErrorCode.INVALID_ENVIRONMENT, "invalid environment variable CNI_ARGS",
                           f"pair {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


def pod_identity(args: Mapping[str, str]) -> PodIdentity | None:
    """The pod named by the `K8S_POD_*` arguments, or None when the runtime is not Kubernetes."""
    keys = ("K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID")
    if not any(args.get(k) for k in keys):
        return None
    return PodIdentity(*(args.get(k, "") for k in keys))


def validate_ifname(name: str, variable: str = "CNI_IFNAME") -> None:
    """The kernel's rules for an interface name (as libcni's ValidateInterfaceName)."""
    problem = ""
    if not name:
        problem = "is empty"
    elif len(name) > MAX_IFNAME_LENGTH:
        problem = f"is longer than {MAX_IFNAME_LENGTH} characters"
    elif name in (".", ".."):
        problem = "is '.' or '..'"
    elif any(c == "/" or c == ":" or c.isspace() for c in name):
        problem = "contains '/', ':' or whitespace"
    if problem:
        raise CniError(ErrorCode.INVALID_ENVIRONMENT, f"invalid environment variable {variable}",
                       f"interface name {name!r} {problem}")


def _require_env(env: Mapping[str, str], names: tuple[str, ...]) -> None:
    missing = [n for n in names if not env.get(n)]
    if missing:
        raise CniError(ErrorCode.INVALID_ENVIRONMENT,
                       f"missing environment variable{'s' if len(missing) > 1 else ''} "
                       f"{', '.join(missing)}")


# --- configuration ------------------------------------------------------------------------------


def decode_config(stdin: bytes) -> dict[str, Any]:
    """The network configuration JSON object from stdin."""
    try:
        obj = json.loads(stdin.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CniError(ErrorCode.DECODE_FAILURE, "cannot decode the network configuration",
                       f"stdin is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise CniError(ErrorCode.DECODE_FAILURE, "cannot decode the network configuration",
                       f"expected a JSON object, got {type(obj).__name__}")
    return obj


def config_version(config: Mapping[str, Any]) -> str:
    """The configuration's cniVersion, checked against the versions weavepy speaks."""
    version = config.get("cniVersion")
    if version is None:
        raise CniError(ErrorCode.INCOMPATIBLE_VERSION, "incompatible CNI version",
                       "the configuration has no cniVersion, which means 0.1.0; weavepy "
                       f"supports {', '.join(SUPPORTED_VERSIONS)}")
    if not isinstance(version, str):
        raise CniError(ErrorCode.INVALID_NETWORK_CONFIG, "invalid network config",
                       f"cniVersion must be a string, got {version!r}")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(ErrorCode.INCOMPATIBLE_VERSION, "incompatible CNI version",
                       f"cniVersion {version!r} is not supported; weavepy supports "
                       f"{', '.join(SUPPORTED_VERSIONS)}")
    return version


def _lower_keys(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k).lower(): v for k, v in obj.items()}


def _config_error(details: str) -> CniError:
    return CniError(ErrorCode.INVALID_NETWORK_CONFIG, "invalid network config", details)


def _int_field(obj: Mapping[str, Any], key: str, where: str, default: int = 0) -> int:
    value = obj.get(key.lower(), default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _config_error(f"{where}: {key} must be a non-negative integer, got {value!r}")
    return value


def parse_runtime_config(obj: object) -> RuntimeConfig:
    """`runtimeConfig`, with keys matched case-insensitively at every level."""
    if obj is None:
        return RuntimeConfig()
    if not isinstance(obj, Mapping):
        raise _config_error("runtimeConfig must be an object")
    top = _lower_keys(obj)
    mappings: list[PortMapping] = []
    raw_mappings = top.get("portmappings") or []
    if not isinstance(raw_mappings, list):
        raise _config_error("runtimeConfig.portMappings must be a list")
    for entry in raw_mappings:
        if not isinstance(entry, Mapping):
            raise _config_error("each runtimeConfig.portMappings entry must be an object")
        low = _lower_keys(entry)
        where = "runtimeConfig.portMappings"
        protocol = low.get("protocol") or "tcp"
        host_ip = low.get("hostip") or ""
        if not isinstance(protocol, str) or not isinstance(host_ip, str):
            raise _config_error(f"{where}: protocol and hostIP must be strings")
        mappings.append(PortMapping(
            host_port=_int_field(low, "hostPort", where),
            container_port=_int_field(low, "containerPort", where),
            protocol=protocol.lower(),
            host_ip=host_ip,
        ))
    bandwidth = None
    raw_bandwidth = top.get("bandwidth")
    if raw_bandwidth is not None:
        if not isinstance(raw_bandwidth, Mapping):
            raise _config_error("runtimeConfig.bandwidth must be an object")
        low = _lower_keys(raw_bandwidth)
        where = "runtimeConfig.bandwidth"
        bandwidth = Bandwidth(*(_int_field(low, k, where) for k in (
            "ingressRate", "ingressBurst", "egressRate", "egressBurst")))
    mac = top.get("mac") or ""
    if not isinstance(mac, str):
        raise _config_error("runtimeConfig.mac must be a string")
    raw_ips = top.get("ips") or []
    if not isinstance(raw_ips, list) or not all(isinstance(i, str) for i in raw_ips):
        raise _config_error("runtimeConfig.ips must be a list of strings")
    try:
        ips = tuple(ipaddress.ip_interface(i) for i in raw_ips)
    except ValueError as exc:
        raise _config_error(f"runtimeConfig.ips: {exc}") from None
    return RuntimeConfig(tuple(mappings), bandwidth, mac, ips, dict(obj))


def _valid_attachments(config: Mapping[str, Any]) -> frozenset[Attachment]:
    raw = config.get("cni.dev/valid-attachments")
    if raw is None:
        return frozenset()  # libcni omits an empty list (omitempty): nothing is valid
    if not isinstance(raw, list):
        raise _config_error("cni.dev/valid-attachments must be a list")
    out = set()
    for entry in raw:
        if not isinstance(entry, Mapping):
            raise _config_error("each cni.dev/valid-attachments entry must be an object")
        cid, ifname = entry.get("containerID"), entry.get("ifname")
        if not isinstance(cid, str) or not isinstance(ifname, str) or not cid or not ifname:
            raise _config_error(f"valid attachment {dict(entry)!r} needs containerID and ifname")
        out.add(Attachment(cid, ifname))
    return frozenset(out)


def parse_network_config(config: Mapping[str, Any], version: str) -> NetworkConfig:
    name = config.get("name")
    if not isinstance(name, str) or not _NETWORK_NAME.fullmatch(name):
        raise _config_error(f"network name {name!r} must start with a letter or digit and "
                            "hold only letters, digits, '_', '.' and '-'")
    plugin_type = config.get("type", "")
    if not isinstance(plugin_type, str):
        raise _config_error(f"type must be a string, got {plugin_type!r}")
    socket_path = config.get("socketPath", DEFAULT_SOCKET_PATH)
    if not isinstance(socket_path, str) or not socket_path.startswith("/"):
        raise _config_error(f"socketPath must be an absolute path, got {socket_path!r}")
    dns_obj = config.get("dns")
    if dns_obj is None:
        dns_obj = {}
    if not isinstance(dns_obj, Mapping):
        raise _config_error("dns must be an object")
    try:
        dns = parse_dns(dns_obj)
    except ResultFormatError as exc:
        raise _config_error(f"dns: {exc}") from None
    prev = config.get("prevResult")
    try:
        prev_result = _parse_result(prev) if prev is not None else None
    except ResultFormatError as exc:
        raise CniError(ErrorCode.DECODE_FAILURE, "cannot decode prevResult", str(exc)) from None
    return NetworkConfig(
        cni_version=version,
        name=name,
        type=plugin_type,
        socket_path=socket_path,
        dns=dns,
        prev_result=prev_result,
        runtime_config=parse_runtime_config(config.get("runtimeConfig")),
        valid_attachments=_valid_attachments(config),
        raw=config,
    )


# --- the whole request --------------------------------------------------------------------------


def parse_request(env: Mapping[str, str], stdin: bytes) -> CniRequest:
    """Validate a plugin invocation and return it as a `CniRequest`; raise `CniError`."""
    command = parse_command(env)
    if command in (Command.ADD, Command.CHECK):
        _require_env(env, ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"))
    elif command is Command.DEL:
        _require_env(env, ("CNI_CONTAINERID", "CNI_IFNAME"))
    raw = decode_config(stdin)
    version = config_version(raw)
    since = _COMMAND_SINCE.get(command)
    if since and version_key(version) < version_key(since):
        raise CniError(ErrorCode.INCOMPATIBLE_VERSION, "incompatible CNI version",
                       f"{command} needs cniVersion {since} or newer; the config says {version}")
    config = parse_network_config(raw, version)
    path = tuple(p for p in env.get("CNI_PATH", "").split(":") if p)
    if command in (Command.STATUS, Command.GC, Command.VERSION):
        return CniRequest(command=command, config=config, path=path)
    container_id = env["CNI_CONTAINERID"]
    if not _CONTAINER_ID.fullmatch(container_id):
        raise CniError(ErrorCode.INVALID_ENVIRONMENT,
                       "invalid environment variable CNI_CONTAINERID",
                       f"{container_id!r} must start with a letter or digit and hold only "
                       "letters, digits, '_', '.' and '-'")
    ifname = env["CNI_IFNAME"]
    validate_ifname(ifname)
    netns = env.get("CNI_NETNS", "")
    if netns and not netns.startswith("/"):
        raise CniError(ErrorCode.INVALID_ENVIRONMENT, "invalid environment variable CNI_NETNS",
                       f"{netns!r} is not an absolute path")
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    return CniRequest(command=command, config=config, container_id=container_id, netns=netns,
                      ifname=ifname, args=args, pod=pod_identity(args), path=path)


def version_reply(stdin: bytes) -> dict[str, Any]:
    """The VERSION answer: the input's cniVersion echoed, and every version weavepy speaks."""
    try:
        raw = json.loads(stdin.decode("utf-8")) if stdin.strip() else {}
    except (UnicodeDecodeError, ValueError) as exc:
        raise CniError(ErrorCode.DECODE_FAILURE, "cannot decode the VERSION request",
                       str(exc)) from None
    asked = raw.get("cniVersion") if isinstance(raw, dict) else None
    return {"cniVersion": asked if isinstance(asked, str) and asked else SPEC_VERSION,
            "supportedVersions": list(SUPPORTED_VERSIONS)}


def best_effort_version(stdin: bytes) -> str | None:
    """The cniVersion of a request that may be malformed, for labelling its error reply."""
    try:
        raw = json.loads(stdin.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    version = raw.get("cniVersion") if isinstance(raw, dict) else None
    return version if isinstance(version, str) else None


# --- the client/agent wire format ---------------------------------------------------------------


def decode_wire_request(data: bytes) -> tuple[dict[str, str], bytes]:
    """The (environment, stdin) pair a `weavepy-cni` client sent."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CniError(ErrorCode.DECODE_FAILURE, "cannot decode the plugin's request",
                       str(exc)) from None
    if not isinstance(obj, dict) or obj.get("wire") != WIRE_VERSION:
        raise CniError(ErrorCode.INCOMPATIBLE_VERSION, "plugin and agent versions differ",
                       f"the agent speaks wire version {WIRE_VERSION}; reinstall the plugin "
                       "with `weavepy install-cni`")
    env, stdin = obj.get("env"), obj.get("stdin")
    if (not isinstance(env, dict) or not isinstance(stdin, str)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        raise CniError(ErrorCode.DECODE_FAILURE, "cannot decode the plugin's request",
                       "env must map strings to strings and stdin must be a string")
    return env, stdin.encode("utf-8", "surrogatepass")


def encode_wire_reply(code: int, stdout: str) -> bytes:
    return json.dumps({"wire": WIRE_VERSION, "code": code, "stdout": stdout}).encode("utf-8")
