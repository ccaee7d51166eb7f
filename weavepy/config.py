"""The agent's configuration: one frozen `AgentConfig`, loaded from flags, environment and a file.

This module owns every setting of the node agent, its default, the environment variables that
set it (Weave-style names such as `IPALLOC_RANGE` and `WEAVE_MTU` are accepted beside the
`WEAVEPY_*` ones) and its validation. The settings are *data*: the table `SETTINGS` lists them
once, and the CLI builds its `launch` flags from the same table, so a flag, its variable and its
file key can never drift apart.

The rules it keeps:

* Precedence is flags > environment > file > defaults, setting by setting.
* Loading never stops at the first mistake: every bad value becomes one readable line in
  `ConfigError.problems` (``--mtu: must be between 576 and 9216, got 70``), so a user fixes all
  of them in one go.
* Nothing here touches the network or the kernel; what needs the host (the underlay interface,
  the automatic MTU, overlap with host routes) is resolved by the agent at launch.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import re
import shlex
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from gossip.hostport import parse_host_port

__all__ = [
    "DEFAULT_API_PORT",
    "DEFAULT_CNI_BIN_DIR",
    "DEFAULT_CNI_CONF_DIR",
    "DEFAULT_GOSSIP_PORT",
    "DEFAULT_METRICS_PORT",
    "PROFILES",
    "SETTINGS",
    "AgentConfig",
    "ConfigError",
    "Setting",
    "load_config",
    "parse_duration",
    "parse_peer",
]

DEFAULT_GOSSIP_PORT = 6783  # Weave's control port; serf uses 7946
DEFAULT_API_PORT = 6784  # Weave's local HTTP API port
DEFAULT_METRICS_PORT = 6782  # Weave's metrics port
DEFAULT_CNI_CONF_DIR = Path("/etc/cni/net.d")
DEFAULT_CNI_BIN_DIR = Path("/opt/cni/bin")
DEFAULT_WG_PORT = 51820
DEFAULT_RECLAIM_AFTER = 24 * 3600.0  # long enough that a reboot or an upgrade never triggers it
PROFILES = ("lan", "wan", "local")
IPAM_MODES = ("weavepy", "kubernetes")  # who owns pod address space (docs/ipam.md)
MIN_MTU, MAX_MTU = 576, 9216

_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.\-]{0,251}[A-Za-z0-9])?$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,15}$")
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class ConfigError(ValueError):
    """The configuration cannot be used; `problems` holds one readable line per mistake."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class SettingProblems(ValueError):
    """A value with several mistakes (a list with more than one bad item): one line each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


# ---------------------------------------------------------------------------------------------
# Value parsers: each takes what a flag, a variable or a YAML file gives and returns the typed
# value, or raises ValueError with a message that completes "<setting>: ...".


def _text(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return str(value).strip()


def _int_between(low: int, high: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        text = _text(value)
        try:
            number = int(text, 10)
        except ValueError:
            raise ValueError(f"must be a whole number, got {text!r}") from None
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high}, got {number}")
        return number

    return parse


def parse_duration(value: object) -> float:
    """Seconds from `90`, `90s`, `500ms`, `30m`, `24h`, `1h30m` or `2d`; must be positive."""
    text = _text(value).lower()
    try:
        seconds = float(text)
    except ValueError:
        pos, seconds = 0, 0.0
        for match in _DURATION_RE.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            pos = match.end()
        if pos != len(text) or not text:
            raise ValueError(f"not a duration (like 90s, 30m, 24h): {text!r}") from None
    if not seconds > 0:
        raise ValueError(f"must be positive, got {text!r}")
    return seconds


def _cidr(value: object) -> ipaddress.IPv4Network:
    """An IPv4 range, `198.19.0.0/16` (a bare address is its /32), host bits clear."""
    text = _text(value)
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        detail = str(exc)
        if "has host bits set" in detail:
            base = ipaddress.ip_network(text, strict=False)
            detail = f"host bits are set (did you mean {base}?)"
        raise ValueError(f"not a CIDR range: {text!r}: {detail}") from None
    if not isinstance(network, ipaddress.IPv4Network):
        raise ValueError(f"{network} is IPv6; weavepy's pod network is IPv4 only")
    return network


def _range(value: object) -> ipaddress.IPv4Network:
    network = _cidr(value)
    if network.prefixlen < 8 or network.prefixlen > 30:
        raise ValueError(f"{network} must have a prefix between /8 and /30")
    if network.is_loopback or network.is_multicast or network.is_link_local:
        raise ValueError(f"{network} is a loopback, multicast or link-local range")
    return network


def _name(value: object) -> str:
    text = _text(value)
    if not _NAME_RE.match(text):
        raise ValueError(f"{text!r} is not a node name (1-253 of letters, digits, '.', '-', '_')")
    return text


def _ifname(value: object) -> str:
    text = _text(value)
    if not _IFNAME_RE.match(text):
        raise ValueError(f"{text!r} is not an interface name (1-15 of [A-Za-z0-9_.-])")
    return text


def parse_peer(value: object, default_port: int = DEFAULT_GOSSIP_PORT) -> tuple[str, int]:
    """A peer's gossip address, `host`, `host:port` or `[v6]:port`, as (host, port); the host is
    an IP address or a DNS name. The syntax and its errors are gossip.hostport's."""
    return parse_host_port(_text(value), default_port=default_port)


def _peers(value: object) -> tuple[str, ...]:
    """A list (file), or a string of peers separated by spaces or commas (flags, env)."""
    items: list[object]
    if isinstance(value, list | tuple):
        items = []
        for item in value:
            items.extend(re.split(r"[\s,]+", _text(item)))
    else:
        items = list(re.split(r"[\s,]+", _text(value)))
    peers: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item:
            continue
        parse_peer(item)
        if item not in peers:
            peers.append(item)
    return tuple(peers)


def _advertise(value: object) -> str:
    text = _text(value)
    host, _ = parse_host_port(text, default_port=DEFAULT_GOSSIP_PORT, hosts="ipv4")
    if ipaddress.IPv4Address(host).is_unspecified:
        raise ValueError(f"must be a specific IPv4 address, got {text!r}")
    return text


def _mtu(value: object) -> int | None:
    text = _text(value).lower()
    if text in ("", "auto", "0"):
        return None
    return _int_between(MIN_MTU, MAX_MTU)(text)


def _path(value: object) -> Path:
    text = _text(value)
    if not text:
        raise ValueError("must not be empty")
    return Path(text).expanduser()


def _optional_path(value: object) -> Path | None:
    text = _text(value)
    return Path(text).expanduser() if text else None


def _api_addr(value: object) -> tuple[str, int]:
    host, port = parse_host_port(_text(value), default_port=DEFAULT_API_PORT, hosts="ip")
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"the API listens on loopback only (127.0.0.1 or ::1), not {host}")
    return host, port


def _encrypt_key(value: object) -> bytes | None:
    text = _text(value)
    if not text:
        return None
    try:
        key = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ValueError("must be a base64 key (make one with `weavepy keygen`)") from None
    if len(key) not in (16, 24, 32):
        raise ValueError(f"must decode to 16, 24 or 32 bytes, not {len(key)}")
    return key


WEAVE_PASSWORD_SALT = b"weavepy gossip key from WEAVE_PASSWORD v1"
WEAVE_PASSWORD_ROUNDS = 200_000


def weave_password_key(value: object) -> bytes | None:
    """Weave's `WEAVE_PASSWORD`: any string, stretched into a 32-byte gossip key.

    PBKDF2-HMAC-SHA256 with a fixed salt, so every node given the same password derives the same
    key (a password is low in entropy: the rounds make guessing it from captured traffic slow).
    """
    text = _text(value)
    if not text:
        return None
    return hashlib.pbkdf2_hmac("sha256", text.encode(), WEAVE_PASSWORD_SALT,
                               WEAVE_PASSWORD_ROUNDS)


@dataclass(frozen=True)
class IpallocInit:
    """How a node without IPAM state meets its first cluster (Weave's `--ipalloc-init`).

    `consensus`: found only once `count // 2 + 1` stateless nodes (this one included) hear each
    other; `seed`: only the named nodes may found the cluster (the lowest live name does);
    `observer`: never found and never own space (pods cannot be started on this node).
    """

    mode: str
    count: int | None = None
    seeds: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.mode == "consensus":
            return f"consensus={self.count}"
        if self.mode == "seed":
            return "seed=" + ",".join(self.seeds)
        return self.mode


def _ipalloc_init(value: object) -> IpallocInit | None:
    text = _text(value)
    if not text:
        return None
    mode, _, arg = text.partition("=")
    mode = mode.strip().lower()
    if mode == "observer" and not arg:
        return IpallocInit("observer")
    if mode == "consensus":
        if not arg:  # Weave's default count is the number of peers; weavepy's rules then apply
            return None
        count = _int_between(1, 10_000)(arg)
        return IpallocInit("consensus", count=count)
    if mode == "seed" and arg:
        return IpallocInit("seed", seeds=_names(arg))
    raise ValueError(f"must be consensus=N, seed=NAME,... or observer, got {text!r}")


def _no_masq_cidrs(value: object) -> tuple[ipaddress.IPv4Network, ...]:
    """Destinations never masqueraded: a list (file), or ranges separated by commas or spaces
    (flags, env). Every bad range is its own problem."""
    items: list[str] = []
    for item in value if isinstance(value, list | tuple) else [value]:
        items.extend(n for n in re.split(r"[\s,]+", _text(item)) if n)
    networks: list[ipaddress.IPv4Network] = []
    problems: list[str] = []
    for item in items:
        try:
            network = _cidr(item)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if network.prefixlen == 0:
            problems.append(f"{network} would exclude every destination; use --no-masquerade "
                            f"to switch masquerading off")
        elif network not in networks:
            networks.append(network)
    if problems:
        raise SettingProblems(problems)
    return tuple(networks)


def _names(value: object) -> tuple[str, ...]:
    """Node names: a list (file), or a string separated by spaces or commas (flags, env)."""
    items: list[str] = []
    for item in value if isinstance(value, list | tuple) else [value]:
        items.extend(n for n in re.split(r"[\s,]+", _text(item)) if n)
    return tuple(dict.fromkeys(_name(n) for n in items))


def _external_peers(value: object) -> tuple[Any, ...]:
    """Declared stock-WireGuard hosts: a YAML list of {name, public_key, allowed_ips,
    endpoint}, or the same as JSON text (environment)."""
    from weavepy.wgpath import parse_external_peer

    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as exc:
            raise ValueError(f"must be a JSON list of external peers ({exc.msg})") from None
    if not isinstance(value, list):
        raise ValueError(f"must be a list of external peers, got {type(value).__name__}")
    peers = tuple(parse_external_peer(item) for item in value)
    names = [p.name for p in peers]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"external peer names must be unique: {', '.join(duplicates)}")
    return peers


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = _text(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {text!r}")


def _metrics_addr(value: object) -> tuple[str, int] | None:
    """`IP:PORT` (any IP: Prometheus scrapes from elsewhere), or `off`/empty to disable."""
    text = _text(value)
    if text.lower() in ("", "off", "none"):
        return None
    return parse_host_port(text, default_port=DEFAULT_METRICS_PORT, hosts="ip")


def _profile(value: object) -> str:
    text = _text(value).lower()
    if text not in PROFILES:
        raise ValueError(f"must be one of {', '.join(PROFILES)}, got {text!r}")
    return text


def _ipam_mode(value: object) -> str:
    text = _text(value).lower()
    if text not in IPAM_MODES:
        raise ValueError(f"must be one of {', '.join(IPAM_MODES)}, got {text!r}")
    return text


# ---------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Setting:
    """One configurable value: its field, flag, variables, parser, default and help."""

    name: str
    parse: Callable[[object], Any]
    default: Callable[[], Any]
    help: str
    envs: tuple[str, ...] = ()
    metavar: str = "VALUE"
    flag: bool = True  # False: environment and file only (secrets never go on a command line)
    is_flag: bool = False  # a boolean switch on the command line
    option: str = ""  # the command-line flag when it is not --<name> (e.g. --encrypt)
    # A switch that turns the setting off: its flag and variables say "no" (--no-masquerade,
    # $WEAVEPY_NO_MASQUERADE=1), the file names the setting itself (masquerade: false)
    negated: bool = False
    # A variable whose value means something else than the flag's (WEAVE_PASSWORD: any string)
    env_parse: Mapping[str, Callable[[object], Any]] = field(default_factory=dict)

    @property
    def flag_name(self) -> str:
        return self.option or "--" + self.name.replace("_", "-")


def _const(value: Any) -> Callable[[], Any]:
    return lambda: value


SETTINGS: tuple[Setting, ...] = (
    Setting("name", _name, socket.gethostname, "this node's name (unique in the cluster)",
            ("WEAVEPY_NAME",), "NAME"),
    Setting("peers", _peers, _const(()), "peers to join, as host or host:port (also the "
            "launch arguments)", ("WEAVEPY_PEERS", "WEAVE_PEERS", "KUBE_PEERS"), "PEERS",
            flag=False),
    Setting("ipalloc_range", _range, _const(ipaddress.IPv4Network("10.32.0.0/12")),
            "the cluster's pod address range", ("IPALLOC_RANGE", "WEAVEPY_IPALLOC_RANGE"), "CIDR"),
    Setting("block_prefix", _int_between(8, 30), _const(24),
            "prefix length of the blocks the range is cut into", ("WEAVEPY_BLOCK_PREFIX",), "N"),
    Setting("ipalloc_init", _ipalloc_init, _const(None), "how a node without IPAM state meets "
            "its cluster: consensus=N, seed=NAME,... or observer (default: weavepy's rules, "
            "docs/ipam.md)", ("WEAVEPY_IPALLOC_INIT", "IPALLOC_INIT"), "MODE"),
    Setting("ipam", _ipam_mode, _const("weavepy"), "who owns pod address space: weavepy "
            "(its own IPAM over gossip; works without Kubernetes) or kubernetes (each Node's "
            "podCIDR; needs --kube-peers)", ("WEAVEPY_IPAM",), "MODE"),
    Setting("gossip_port", _int_between(1, 65535), _const(DEFAULT_GOSSIP_PORT),
            "gossip port (TCP and UDP)", ("WEAVEPY_GOSSIP_PORT", "WEAVE_PORT"), "PORT"),
    Setting("vxlan_vni", _int_between(0, (1 << 24) - 1), _const(1), "VXLAN network identifier",
            ("WEAVEPY_VXLAN_VNI",), "VNI"),
    Setting("vxlan_port", _int_between(1, 65535), _const(8472), "VXLAN UDP port",
            ("WEAVEPY_VXLAN_PORT",), "PORT"),
    Setting("vxlan_device", _ifname, _const("weavepy.1"), "name of the VXLAN device",
            ("WEAVEPY_VXLAN_DEVICE",), "IFNAME"),
    Setting("bridge", _ifname, _const("weavepy0"), "name of the pod bridge",
            ("WEAVEPY_BRIDGE",), "IFNAME"),
    Setting("iface", _ifname, _const(None), "underlay interface (default: the one with the "
            "default route, or the only one)", ("WEAVEPY_IFACE",), "IFNAME"),
    Setting("advertise_addr", _advertise, _const(None), "address (and port) peers reach this "
            "node at, for NAT (default: the underlay address)",
            ("WEAVEPY_ADVERTISE_ADDR",), "IP[:PORT]"),
    Setting("mtu", _mtu, _const(None), "pod and overlay MTU (default auto: underlay MTU - 50)",
            ("WEAVEPY_MTU", "WEAVE_MTU"), "MTU"),
    Setting("keyring_file", _optional_path, _const(None), "gossip keyring (serf's JSON list "
            "of base64 keys, or one key per line)", ("WEAVEPY_KEYRING_FILE",), "FILE"),
    Setting("encrypt", _encrypt_key, _const(None), "gossip key, base64 (environment or "
            "file only; $WEAVE_PASSWORD: any string, stretched into a key)",
            ("WEAVEPY_ENCRYPT", "WEAVE_PASSWORD"), "KEY", flag=False,
            env_parse={"WEAVE_PASSWORD": weave_password_key}),
    Setting("state_dir", _path, _const(Path("/var/lib/weavepy")), "persistent state directory",
            ("WEAVEPY_STATE_DIR",), "DIR"),
    Setting("run_dir", _path, _const(Path("/run/weavepy")), "runtime directory (CNI socket)",
            ("WEAVEPY_RUN_DIR",), "DIR"),
    Setting("api_addr", _api_addr, _const(("127.0.0.1", DEFAULT_API_PORT)),
            "local HTTP API address (loopback only)", ("WEAVEPY_API_ADDR", "WEAVE_HTTP_ADDR"),
            "IP:PORT"),
    Setting("reclaim_after", parse_duration, _const(DEFAULT_RECLAIM_AFTER),
            "reclaim a gone node's blocks after this long (like 24h)",
            ("WEAVEPY_RECLAIM_AFTER",), "DURATION"),
    Setting("ipam_lease", parse_duration, _const(3600.0),
            "how long a node may hand out addresses without hearing from a majority of voters",
            ("WEAVEPY_IPAM_LEASE",), "DURATION"),
    Setting("reconcile_interval", parse_duration, _const(30.0),
            "re-check the kernel state at least this often", ("WEAVEPY_RECONCILE_INTERVAL",),
            "DURATION"),
    Setting("profile", _profile, _const("lan"), "gossip timing profile: lan, wan or local",
            ("WEAVEPY_PROFILE",), "PROFILE"),
    Setting("metrics_addr", _metrics_addr, _const(("127.0.0.1", DEFAULT_METRICS_PORT)),
            "Prometheus /metrics address (IP:PORT, or off)",
            ("WEAVEPY_METRICS_ADDR", "WEAVE_STATUS_ADDR"),
            "IP:PORT"),
    Setting("kube_peers", _bool, _const(False), "take peers from the Kubernetes API (the "
            "nodes' InternalIPs) and set the node's NetworkUnavailable=False when ready",
            ("WEAVEPY_KUBE_PEERS",), is_flag=True),
    Setting("kubeconfig", _optional_path, _const(None), "with --kube-peers: reach the API "
            "server through this kubeconfig file instead of the pod's service account",
            ("WEAVEPY_KUBECONFIG",), "FILE"),
    Setting("install_cni", _bool, _const(False), "install the weavepy-cni plugin and its "
            "conflist at start (else the init container or `weavepy install-cni` does)",
            ("WEAVEPY_INSTALL_CNI",), is_flag=True),
    Setting("cni_conf_dir", _optional_path, _const(None), "CNI configuration directory; "
            "/readyz waits for the conflist there (default /etc/cni/net.d with --kube-peers "
            "or --install-cni, else not checked)", ("WEAVEPY_CNI_CONF_DIR",), "DIR"),
    Setting("cni_bin_dir", _path, _const(DEFAULT_CNI_BIN_DIR), "CNI plugin directory (for "
            "--install-cni)", ("WEAVEPY_CNI_BIN_DIR",), "DIR"),
    Setting("encrypt_all", _bool, _const(False), "encrypt pod traffic to every peer with "
            "WireGuard (default: kernel VXLAN, unencrypted)", ("WEAVEPY_ENCRYPT_ALL",),
            is_flag=True, option="--encrypt"),
    Setting("encrypt_peers", _names, _const(()), "encrypt pod traffic to these peers (node "
            "names, comma separated) with WireGuard", ("WEAVEPY_ENCRYPT_PEERS",), "NAMES"),
    Setting("wg_port", _int_between(1, 65535), _const(DEFAULT_WG_PORT),
            "WireGuard UDP port", ("WEAVEPY_WG_PORT",), "PORT"),
    Setting("wg_device", _ifname, _const("weavepy.wg"), "name of the WireGuard TUN device",
            ("WEAVEPY_WG_DEVICE",), "IFNAME"),
    Setting("wg_standard_only", _bool, _const(False), "do not announce the WireGuard "
            "super-packet extension (wgx): encrypted peers get standard transport messages only",
            ("WEAVEPY_WG_STANDARD_ONLY",), is_flag=True),
    Setting("external_peers", _external_peers, _const(()), "hosts with stock WireGuard that "
            "join the pod network (file: a list of {name, public_key, allowed_ips, endpoint}; "
            "environment: the same as JSON)", ("WEAVEPY_EXTERNAL_PEERS",), "LIST", flag=False),
    Setting("masquerade", _bool, _const(True), "do not masquerade pods' traffic to "
            "destinations outside the cluster range (routers outside must then route the pod "
            "range back; docs/egress.md); file: masquerade: false",
            ("WEAVEPY_NO_MASQUERADE",), is_flag=True, option="--no-masquerade", negated=True),
    Setting("no_masq_cidrs", _no_masq_cidrs, _const(()), "destinations never masqueraded "
            "(comma separated CIDRs: a VPC range, the service range)",
            ("WEAVEPY_NO_MASQ_CIDRS",), "CIDR,..."),
    Setting("policy", _bool, _const(True), "do not enforce NetworkPolicy (by default the "
            "agent enforces it: from the Kubernetes API with --kube-peers, from --policy-dir "
            "when set); file: policy: false. The agent then removes its policy table",
            ("WEAVEPY_NO_POLICY",), is_flag=True, option="--no-policy", negated=True),
    Setting("policy_dir", _optional_path, _const(None), "enforce the NetworkPolicies, "
            "Namespaces and Pod labels in this directory of Kubernetes YAML, watched for "
            "changes (instead of the Kubernetes API; docs/policy.md)",
            ("WEAVEPY_POLICY_DIR",), "DIR"),
    Setting("policy_audit", _bool, _const(False), "audit NetworkPolicy: log and count what "
            "policy would drop, and let it pass", ("WEAVEPY_POLICY_AUDIT",), is_flag=True),
)
SETTINGS_BY_NAME: Mapping[str, Setting] = {s.name: s for s in SETTINGS}
CONFIG_FILE_ENV = "WEAVEPY_CONFIG"
EXTRA_ARGS_ENV = "EXTRA_ARGS"  # Weave's extra launch arguments: read as weavepy flags

# Weave Net variables that weavepy does not take as a setting, and what it does instead. A set
# one gives one warning line at launch (a DaemonSet copied from Weave's keeps working).
WEAVE_ONLY_VARIABLES: Mapping[str, str] = {
    "CONN_LIMIT": "gossip opens no connection per peer (SWIM probes one member at a time), so "
                  "there is no connection limit to set",
    "CHECKPOINT_DISABLE": "weavepy never contacts a version-check service; nothing to disable",
    "HAIRPIN_MODE": "hairpin is always on for pod bridge ports (a pod reaches itself through a "
                    "Service)",
    "EXPECT_NPC": "the agent enforces NetworkPolicy itself (docs/policy.md); there is no "
                  "separate weave-npc container to expect",
    "IPTABLES_BACKEND": "host rules are written with nftables in weavepy's own table; the "
                        "forward accepts go to whichever iptables backend holds a drop "
                        "(docs/egress.md)",
    "WEAVE_EXPOSE_IP": "the host reaches pods through each block's bridge gateway; there is "
                       "nothing to expose",
    "WEAVE_NO_FASTDP": "pod traffic takes kernel VXLAN, or the WireGuard path with --encrypt; "
                       "there is no sleeve mode",
    "WEAVE_NPC_EXTRA_ARGS": "policy settings are agent settings (--policy-*, docs/policy.md)",
    "HOST_ROOT": "the init container installs the CNI files through the manifest's hostPath "
                 "mounts",
    "WEAVE_DEBUG": "use --log-level debug ($WEAVEPY_LOG_LEVEL)",
}
# Weave variables taken with Weave's meaning, beside the settings' own (`Setting.envs`).
NO_MASQ_LOCAL_ENV = "NO_MASQ_LOCAL"
# weaver flags that have no weavepy equivalent, for EXTRA_ARGS (value-taking ones consume one)
WEAVE_ONLY_FLAGS: Mapping[str, bool] = {
    "--conn-limit": True, "--nickname": True, "--no-dns": False, "--dns-domain": True,
    "--host-root": True, "--db-prefix": True, "--docker-api": True, "--datapath": True,
    "--expect-npc": False, "--no-fastdp": False, "--trusted-subnets": True,
    "--no-discovery": False, "--no-restart": False, "--http-addr": True, "--status-addr": True,
    "--plugin": False, "--proxy": False, "--no-masq-local": False, "--ipalloc-default-subnet": True,
}


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent needs to know before it touches the host. Build with `load_config`."""

    name: str
    peers: tuple[str, ...]
    ipalloc_range: ipaddress.IPv4Network
    block_prefix: int
    gossip_port: int
    vxlan_vni: int
    vxlan_port: int
    vxlan_device: str
    bridge: str
    iface: str | None
    advertise_addr: str | None
    mtu: int | None
    keyring_file: Path | None
    encrypt: bytes | None = field(repr=False)
    state_dir: Path
    run_dir: Path
    api_addr: tuple[str, int]
    reclaim_after: float
    ipam_lease: float
    reconcile_interval: float
    profile: str
    metrics_addr: tuple[str, int] | None
    kube_peers: bool
    install_cni: bool
    cni_conf_dir: Path | None
    cni_bin_dir: Path
    encrypt_all: bool = False
    encrypt_peers: tuple[str, ...] = ()
    wg_port: int = DEFAULT_WG_PORT
    wg_device: str = "weavepy.wg"
    wg_standard_only: bool = False
    external_peers: tuple[Any, ...] = ()  # weavepy.wgpath.ExternalPeer
    ipalloc_init: IpallocInit | None = None
    masquerade: bool = True
    no_masq_cidrs: tuple[ipaddress.IPv4Network, ...] = ()
    ipam: str = "weavepy"  # one of IPAM_MODES
    kubeconfig: Path | None = None
    policy: bool = True
    policy_dir: Path | None = None
    policy_audit: bool = False
    config_file: Path | None = None
    warnings: tuple[str, ...] = ()  # Weave variables and flags set but not taken (logged once)

    @property
    def cni_socket(self) -> Path:
        return self.run_dir / "cni.sock"

    @property
    def cni_conf_check_dir(self) -> Path | None:
        """Where /readyz expects the conflist: the configured directory, else the default one
        when this node is a Kubernetes node or installs CNI itself, else None (not checked)."""
        if self.cni_conf_dir is not None:
            return self.cni_conf_dir
        return DEFAULT_CNI_CONF_DIR if (self.kube_peers or self.install_cni) else None

    @property
    def encrypted(self) -> bool:
        return self.keyring_file is not None or self.encrypt is not None

    @property
    def api_url(self) -> str:
        host, port = self.api_addr
        return f"http://{host if ':' not in host else f'[{host}]'}:{port}"

    def peer_addresses(self) -> list[tuple[str, int]]:
        return [parse_peer(p, self.gossip_port) for p in self.peers]

    def to_public_dict(self) -> dict[str, Any]:
        """The settings as JSON-able values, secrets masked (for `status` and logs)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "encrypt":
                value = "(set)" if value else None
            elif f.name == "external_peers":
                value = [p.to_json() for p in value]
            elif isinstance(value, Path | ipaddress.IPv4Network | IpallocInit):
                value = str(value)
            elif isinstance(value, tuple):
                value = [str(v) if isinstance(v, ipaddress.IPv4Network) else v for v in value]
            out[f.name] = value
        return out


def _read_file(path: Path) -> tuple[dict[str, object], list[str]]:
    """The YAML file as {setting name: raw value}, and problems (unknown keys, bad syntax)."""
    where = f"config file {path}"
    try:
        text = path.read_text()
    except OSError as exc:
        return {}, [f"{where}: cannot read it: {exc.strerror or exc}"]
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        return {}, [f"{where}: not valid YAML{at}: {getattr(exc, 'problem', exc)}"]
    if data is None:
        return {}, []
    if not isinstance(data, dict):
        return {}, [f"{where}: must be a mapping of settings, got {type(data).__name__}"]
    values: dict[str, object] = {}
    problems: list[str] = []
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in SETTINGS_BY_NAME:
            known = ", ".join(s.name.replace("_", "-") for s in SETTINGS)
            problems.append(f"{where}: unknown setting {key!r} (known: {known})")
            continue
        values[name] = value
    return values, problems


def load_config(
    flags: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> AgentConfig:
    """Build the configuration; raise ConfigError listing every problem found.

    `flags` holds the values given on the command line (absent or None: not given), keyed by
    setting name; `env` is the environment (usually os.environ); `config_file` (or
    $WEAVEPY_CONFIG) names an optional YAML file with the same keys.
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = env or {}
    problems: list[str] = []
    unknown = sorted(set(flags) - set(SETTINGS_BY_NAME))
    if unknown:
        raise ConfigError([f"internal: unknown settings {unknown}"])
    extra, warnings, extra_problems = _extra_args(env.get(EXTRA_ARGS_ENV, ""))
    problems.extend(extra_problems)
    warnings.extend(_weave_variable_warnings(env, problems))
    file_path = config_file or env.get(CONFIG_FILE_ENV) or None
    file_values: dict[str, object] = {}
    if file_path:
        file_values, file_problems = _read_file(Path(file_path))
        problems.extend(file_problems)
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw: object = None
        source = ""
        parse = setting.parse
        negated = setting.negated  # the flag and the variables say "no"; the file does not
        if setting.name in flags and not (setting.is_flag and flags[setting.name] is False):
            raw, source = flags[setting.name], setting.flag_name
        elif setting.name in extra:
            raw, source = extra[setting.name], f"${EXTRA_ARGS_ENV}: {setting.flag_name}"
        else:
            for var in setting.envs:
                if env.get(var, "") != "":
                    raw, source = env[var], f"${var}"
                    parse = setting.env_parse.get(var, parse)
                    break
            else:
                if setting.name in file_values:
                    raw, source = file_values[setting.name], f"{file_path}: {setting.name}"
                    negated = False
        if source == "":
            values[setting.name] = setting.default()
            continue
        try:
            value = parse(raw)
            values[setting.name] = not value if negated else value
        except SettingProblems as exc:
            problems.extend(f"{source}: {problem}" for problem in exc.problems)
            values[setting.name] = setting.default()
        except ValueError as exc:
            problems.append(f"{source}: {exc}")
            values[setting.name] = setting.default()
    if not problems:
        problems.extend(_cross_checks(values))
    if problems:
        raise ConfigError(problems)
    return AgentConfig(**values, config_file=Path(file_path) if file_path else None,
                       warnings=tuple(warnings))


def _extra_args(text: str) -> tuple[dict[str, object], list[str], list[str]]:
    """Weave's `EXTRA_ARGS` read as weavepy launch flags: (values, warnings, problems).

    Words that are not flags are peers, as on Weave's command line. A Weave flag with no
    weavepy equivalent is a warning; anything else unknown is a problem.
    """
    where = f"${EXTRA_ARGS_ENV}"
    try:
        words = shlex.split(text)
    except ValueError as exc:
        return {}, [], [f"{where}: {exc}"]
    by_flag = {s.flag_name: s for s in SETTINGS if s.flag}
    values: dict[str, object] = {}
    warnings: list[str] = []
    problems: list[str] = []
    peers: list[str] = []
    index = 0
    while index < len(words):
        word = words[index]
        index += 1
        if not word.startswith("--"):
            peers.append(word)
            continue
        flag, has_value, value = word.partition("=")
        setting = by_flag.get(flag)
        if setting is None and flag in WEAVE_ONLY_FLAGS:
            if WEAVE_ONLY_FLAGS[flag] and not has_value:
                index += 1
            warnings.append(f"{where}: {flag} is a Weave Net flag with no weavepy "
                            "equivalent; ignored")
            continue
        if setting is None:
            problems.append(f"{where}: unknown flag {flag} (see `weavepy launch --help`)")
            continue
        if setting.is_flag:
            values[setting.name] = value if has_value else True
            continue
        if not has_value:
            if index >= len(words):
                problems.append(f"{where}: {flag} needs a value")
                continue
            value = words[index]
            index += 1
        values[setting.name] = value
    if peers:
        values["peers"] = peers
    return values, warnings, problems


def _weave_variable_warnings(env: Mapping[str, str], problems: list[str]) -> list[str]:
    """One line for each Weave variable that is set but not taken as a setting."""
    warnings = [f"${var} is Weave Net's and not used by weavepy: {instead}"
                for var, instead in WEAVE_ONLY_VARIABLES.items() if env.get(var, "") != ""]
    if env.get(NO_MASQ_LOCAL_ENV, "") != "":
        try:
            keep_local_sources = _bool(env[NO_MASQ_LOCAL_ENV])
        except ValueError as exc:
            problems.append(f"${NO_MASQ_LOCAL_ENV}: {exc}")
        else:
            if not keep_local_sources:
                warnings.append(f"${NO_MASQ_LOCAL_ENV}=0 has no effect: weavepy never "
                                "masquerades traffic delivered to this node's pods, so they "
                                "always see the client's address")
    return warnings


def _cross_checks(values: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    network: ipaddress.IPv4Network = values["ipalloc_range"]
    prefix: int = values["block_prefix"]
    if prefix < network.prefixlen:
        problems.append(f"--block-prefix: /{prefix} blocks do not fit in the range {network}")
    elif prefix - network.prefixlen > 16:
        problems.append(f"--block-prefix: {network} in /{prefix} blocks makes "
                        f"{1 << (prefix - network.prefixlen)} blocks; at most 65536 "
                        f"(use a shorter --block-prefix)")
    if values["vxlan_device"] == values["bridge"]:
        problems.append("--bridge: must differ from --vxlan-device")
    if values["wg_device"] in (values["vxlan_device"], values["bridge"]):
        problems.append("--wg-device: must differ from --vxlan-device and --bridge")
    for host in values["external_peers"]:
        inside = [str(n) for n in host.allowed_ips if n.overlaps(network)]
        if inside:
            problems.append(f"external peer {host.name}: {', '.join(inside)} overlaps the "
                            f"cluster range {network} (pods get those addresses)")
    if values["wg_port"] in (values["vxlan_port"], values["gossip_port"]):
        problems.append("--wg-port: must differ from --vxlan-port and --gossip-port")
    if values["ipam_lease"] > values["reclaim_after"]:
        problems.append(f"--ipam-lease ({values['ipam_lease']:g}s) must not exceed "
                        f"--reclaim-after ({values['reclaim_after']:g}s)")
    if values["ipam"] == "kubernetes" and not values["kube_peers"]:
        problems.append("--ipam kubernetes takes each node's podCIDR from the Kubernetes API: "
                        "add --kube-peers ($WEAVEPY_KUBE_PEERS=true)")
    if values["policy_dir"] is not None and not values["policy"]:
        problems.append("--policy-dir and --no-policy contradict each other: drop one")
    if values["policy_audit"] and not values["policy"]:
        problems.append("--policy-audit and --no-policy contradict each other: drop one")
    if values["keyring_file"] is not None and values["encrypt"] is not None:
        problems.append("--keyring-file and $WEAVEPY_ENCRYPT both set a gossip key; use one")
    return problems
