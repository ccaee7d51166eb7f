"""NetworkPolicy, Pod and Namespace as frozen values, parsed from Kubernetes-format dicts.

This module owns what weavepy understands of networking.k8s.io/v1 NetworkPolicy and of the
Pod and Namespace fields that policy reads. Every other policy module works on these values.

The rule it keeps: **a bad object is one readable error, never a traceback, and never a
silently different meaning.** `parse_object` raises `PolicyInputError` naming the object
(kind namespace/name) and the field (`spec.ingress[0].from[1].ipBlock.except[0]`). Unknown
fields inside a NetworkPolicy's spec are errors too: a typo such as `podselector` would
otherwise read as an empty selector, which selects every pod.

Defaults follow the API server's: a port's protocol is TCP; `policyTypes`, when absent, is
Ingress, plus Egress when `spec.egress` has at least one rule; a namespace always carries the
label `kubernetes.io/metadata.name` with its own name; a namespace nobody described is one
with only that label.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from typing import Any, Literal

__all__ = [
    "CONTAINER_ID_ANNOTATION",
    "NAME_LABEL",
    "PROTOCOLS",
    "Attachment",
    "ClusterState",
    "ContainerPort",
    "IPBlock",
    "LabelSelector",
    "Labels",
    "Namespace",
    "NetworkPolicy",
    "Peer",
    "Pod",
    "PolicyInputError",
    "PolicyPort",
    "Requirement",
    "Rule",
    "attach",
    "parse_namespace",
    "parse_network_policy",
    "parse_object",
    "parse_pod",
]

Protocol = Literal["TCP", "UDP", "SCTP"]
PROTOCOLS: tuple[Protocol, ...] = ("TCP", "UDP", "SCTP")
Direction = Literal["ingress", "egress"]
NAME_LABEL = "kubernetes.io/metadata.name"
CONTAINER_ID_ANNOTATION = "weavepy.io/container-id"
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
TERMINAL_PHASES = ("Succeeded", "Failed")
_SERVICE_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9]|-(?!-))*(?<!-)$")


class PolicyInputError(ValueError):
    """An object cannot be used; the message names the object and the field, in one line."""


class Labels(Mapping[str, str]):
    """An immutable, hashable label map."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        pairs = items.items() if isinstance(items, Mapping) else items
        self._items: dict[str, str] = dict(sorted(pairs))

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return f"Labels({self._items!r})"

    def text(self) -> str:
        """`k=v,k=v` (sorted), for humans."""
        return ",".join(f"{k}={v}" for k, v in self._items.items())


@dataclass(frozen=True)
class Requirement:
    """One matchExpressions entry."""

    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        if self.operator == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels

    def text(self) -> str:
        if self.operator == "Exists":
            return self.key
        if self.operator == "DoesNotExist":
            return f"!{self.key}"
        word = "in" if self.operator == "In" else "notin"
        return f"{self.key} {word} ({','.join(sorted(self.values))})"


@dataclass(frozen=True)
class LabelSelector:
    """matchLabels AND every matchExpressions entry; the empty selector selects everything."""

    match_labels: Labels = field(default_factory=Labels)
    match_expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return (all(labels.get(k) == v for k, v in self.match_labels.items())
                and all(r.matches(labels) for r in self.match_expressions))

    @property
    def is_empty(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def text(self) -> str:
        """Kubernetes' selector string (`a=b,c in (d),!e`), sorted; `{}` when empty."""
        parts = [f"{k}={v}" for k, v in self.match_labels.items()]
        parts += sorted(r.text() for r in self.match_expressions)
        return ",".join(parts) if parts else "{}"


@dataclass(frozen=True)
class IPBlock:
    """A CIDR and the blocks inside it that are excluded. IPv6 blocks never match (pods here
    are IPv4); they are kept so that a policy reads as written."""

    cidr: IPv4Network | IPv6Network
    excepts: tuple[IPv4Network | IPv6Network, ...] = ()

    def contains(self, address: IPv4Address) -> bool:
        if not isinstance(self.cidr, IPv4Network) or address not in self.cidr:
            return False
        return not any(address in block for block in self.excepts)

    def text(self) -> str:
        if not self.excepts:
            return str(self.cidr)
        return f"{self.cidr} except {', '.join(str(b) for b in self.excepts)}"


@dataclass(frozen=True)
class Peer:
    """One `from`/`to` entry: pods by selectors, or an ipBlock.

    podSelector alone: pods of the policy's namespace; namespaceSelector alone: every pod of
    the matching namespaces; both: matching pods of matching namespaces."""

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None

    def text(self, namespace: str) -> str:
        if self.ip_block is not None:
            return f"ipBlock {self.ip_block.text()}"
        pods = self.pod_selector.text() if self.pod_selector is not None else "{}"
        if self.namespace_selector is None:
            return f"pods {pods} in namespace {namespace}"
        return f"pods {pods} in namespaces {self.namespace_selector.text()}"


@dataclass(frozen=True)
class PolicyPort:
    """A port rule: a protocol and a number, a range (port..end_port), a name, or every port
    (port None)."""

    protocol: Protocol = "TCP"
    port: int | str | None = None
    end_port: int | None = None

    def text(self) -> str:
        if self.port is None:
            return f"{self.protocol} (all ports)"
        if self.end_port is not None:
            return f"{self.port}-{self.end_port}/{self.protocol}"
        return f"{self.port}/{self.protocol}"


@dataclass(frozen=True)
class Rule:
    """An ingress or egress rule: empty `peers` means every peer, empty `ports` every port
    of every protocol."""

    peers: tuple[Peer, ...] = ()
    ports: tuple[PolicyPort, ...] = ()


@dataclass(frozen=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: LabelSelector = field(default_factory=LabelSelector)
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    policy_types: frozenset[Direction] = frozenset({"ingress"})

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def affects(self, direction: Direction) -> bool:
        return direction in self.policy_types

    def rules(self, direction: Direction) -> tuple[Rule, ...]:
        return self.ingress if direction == "ingress" else self.egress


@dataclass(frozen=True)
class ContainerPort:
    port: int
    protocol: Protocol = "TCP"
    name: str | None = None


@dataclass(frozen=True)
class Pod:
    """A pod as policy sees it. `ip` and `node` may be unknown (None) until the pod runs."""

    namespace: str
    name: str
    labels: Labels = field(default_factory=Labels)
    ip: IPv4Address | None = None
    node: str | None = None
    ports: tuple[ContainerPort, ...] = ()
    container_id: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def named_port(self, name: str, protocol: Protocol) -> int | None:
        """The number of container port `name`, if it is served over `protocol`."""
        for port in self.ports:
            if port.name == name and port.protocol == protocol:
                return port.port
        return None


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Labels = field(default_factory=Labels)

    def __post_init__(self) -> None:
        if self.labels.get(NAME_LABEL) != self.name:
            object.__setattr__(self, "labels",
                               Labels({**self.labels, NAME_LABEL: self.name}))


@dataclass(frozen=True)
class ClusterState:
    """Everything policy is computed from. Pods that share an address keep only the first by
    namespace/name (`address_conflicts` names the others)."""

    policies: tuple[NetworkPolicy, ...] = ()
    pods: tuple[Pod, ...] = ()
    namespaces: tuple[Namespace, ...] = ()

    @cached_property
    def _namespaces(self) -> dict[str, Namespace]:
        return {ns.name: ns for ns in self.namespaces}

    def namespace_labels(self, name: str) -> Labels:
        found = self._namespaces.get(name)
        return found.labels if found is not None else Namespace(name).labels

    @cached_property
    def _by_address(self) -> dict[IPv4Address, Pod]:
        found: dict[IPv4Address, Pod] = {}
        for pod in sorted(self.pods, key=lambda p: p.key):
            if pod.ip is not None:
                found.setdefault(pod.ip, pod)
        return found

    def pod_at(self, address: IPv4Address) -> Pod | None:
        return self._by_address.get(address)

    @property
    def addressed_pods(self) -> list[Pod]:
        """Pods with an address, one per address, sorted by namespace/name."""
        return sorted(self._by_address.values(), key=lambda p: p.key)

    @property
    def address_conflicts(self) -> list[Pod]:
        return [p for p in self.pods if p.ip is not None and self._by_address[p.ip] != p]

    def pod(self, key: str) -> Pod | None:
        return next((p for p in self.pods if p.key == key), None)

    def policy(self, key: str) -> NetworkPolicy | None:
        return next((p for p in self.policies if p.key == key), None)


@dataclass(frozen=True)
class Attachment:
    """A pod this node's CNI plugin attached: its container ID, address and node, and the
    namespace/name the runtime passed (K8S_POD_NAMESPACE/K8S_POD_NAME), when it did."""

    container_id: str
    ip: IPv4Address
    node: str
    namespace: str | None = None
    name: str | None = None


def attach(state: ClusterState, attachments: Iterable[Attachment]) -> ClusterState:
    """`state` with this node's attachments: a pod known by container ID, else by
    namespace/name, takes the attachment's address and node (the CNI plugin knows them
    first); an attachment no pod describes becomes a pod without labels, in its namespace
    (`default` if the runtime gave none), named after it or its container ID."""
    by_id = {p.container_id: p for p in state.pods if p.container_id}
    by_key = {p.key: p for p in state.pods}
    pods = dict(by_key)
    for found in attachments:
        namespace = found.namespace or "default"
        pod = by_id.get(found.container_id) or by_key.get(
            f"{namespace}/{found.name or found.container_id}")
        if pod is None:
            pod = Pod(namespace, found.name or found.container_id)
        pods[pod.key] = dataclasses.replace(pod, ip=found.ip, node=found.node,
                                            container_id=found.container_id)
    return dataclasses.replace(state, pods=tuple(pods[k] for k in sorted(pods)))


# -- parsing ------------------------------------------------------------------------------------


class _Where:
    """The object and field an error is about."""

    def __init__(self, kind: str, name: str, path: str = "") -> None:
        self.kind, self.name, self.path = kind, name, path

    def at(self, part: str | int) -> _Where:
        if isinstance(part, int):
            return _Where(self.kind, self.name, f"{self.path}[{part}]")
        return _Where(self.kind, self.name, f"{self.path}.{part}" if self.path else part)

    def error(self, message: str) -> PolicyInputError:
        where = f"{self.path}: " if self.path else ""
        return PolicyInputError(f"{self.kind} {self.name}: {where}{message}")


def _mapping(value: Any, where: _Where, *, allowed: Sequence[str] | None = None,
             ) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise where.error(f"must be an object, not {_describe(value)}")
    if allowed is not None:
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            raise where.error(f"unknown field {unknown[0]!r} (expected one of "
                              f"{', '.join(allowed)})")
    return value


def _list(value: Any, where: _Where) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise where.error(f"must be a list, not {_describe(value)}")
    return value


def _string(value: Any, where: _Where) -> str:
    if not isinstance(value, str) or not value:
        raise where.error(f"must be a non-empty string, not {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if len(value) < 40 else repr(value[:37] + "...")
    if isinstance(value, bool | int | float) or value is None:
        return repr(value)
    return f"a {type(value).__name__}"


def _labels(value: Any, where: _Where) -> Labels:
    items = _mapping(value, where)
    pairs = []
    for key, text in items.items():
        if not isinstance(key, str) or not key:
            raise where.error(f"label keys must be non-empty strings, not {_describe(key)}")
        if isinstance(text, bool) or not isinstance(text, str | int | float):
            raise where.at(key).error(f"a label value must be a string, not {_describe(text)}")
        pairs.append((key, str(text)))
    return Labels(pairs)


def _selector(value: Any, where: _Where) -> LabelSelector:
    spec = _mapping(value, where, allowed=("matchLabels", "matchExpressions"))
    expressions = []
    for i, raw in enumerate(_list(spec.get("matchExpressions"), where.at("matchExpressions"))):
        here = where.at("matchExpressions").at(i)
        entry = _mapping(raw, here, allowed=("key", "operator", "values"))
        key = _string(entry.get("key"), here.at("key"))
        operator = entry.get("operator")
        if operator not in OPERATORS:
            raise here.at("operator").error(f"must be one of {', '.join(OPERATORS)}, not "
                                            f"{_describe(operator)}")
        values = tuple(str(v) for v in _list(entry.get("values"), here.at("values")))
        if operator in ("In", "NotIn") and not values:
            raise here.at("values").error(f"must not be empty for operator {operator}")
        if operator in ("Exists", "DoesNotExist") and values:
            raise here.at("values").error(f"must be empty for operator {operator}")
        expressions.append(Requirement(key, operator, tuple(sorted(set(values)))))
    return LabelSelector(_labels(spec.get("matchLabels"), where.at("matchLabels")),
                         tuple(expressions))


def _network(value: Any, where: _Where) -> IPv4Network | IPv6Network:
    text = _string(value, where)
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise where.error(f"{text!r} is not a CIDR") from None


def _ip_block(value: Any, where: _Where) -> IPBlock:
    spec = _mapping(value, where, allowed=("cidr", "except"))
    cidr = _network(spec.get("cidr"), where.at("cidr"))
    excepts = []
    for i, raw in enumerate(_list(spec.get("except"), where.at("except"))):
        block = _network(raw, where.at("except").at(i))
        if (block.version != cidr.version or not block.subnet_of(cidr)  # type: ignore[arg-type]
                or block == cidr):
            raise where.at("except").at(i).error(f"{block} must be a strict subset of {cidr}")
        excepts.append(block)
    return IPBlock(cidr, tuple(excepts))


def _peer(value: Any, where: _Where) -> Peer:
    spec = _mapping(value, where, allowed=("podSelector", "namespaceSelector", "ipBlock"))
    if not spec:
        raise where.error("a peer needs podSelector, namespaceSelector or ipBlock")
    if "ipBlock" in spec:
        if "podSelector" in spec or "namespaceSelector" in spec:
            raise where.error("ipBlock cannot be combined with podSelector or "
                              "namespaceSelector")
        return Peer(ip_block=_ip_block(spec["ipBlock"], where.at("ipBlock")))
    pods = (_selector(spec["podSelector"], where.at("podSelector"))
            if "podSelector" in spec else None)
    namespaces = (_selector(spec["namespaceSelector"], where.at("namespaceSelector"))
                  if "namespaceSelector" in spec else None)
    return Peer(pod_selector=pods, namespace_selector=namespaces)


def _port_number(value: Any, where: _Where) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise where.error(f"must be a port number 1-65535, not {_describe(value)}")
    return value


def _protocol(value: Any, where: _Where) -> Protocol:
    if value is None:
        return "TCP"
    for protocol in PROTOCOLS:
        if value == protocol:
            return protocol
    raise where.error(f"must be TCP, UDP or SCTP, not {_describe(value)}")


def _policy_port(value: Any, where: _Where) -> PolicyPort:
    spec = _mapping(value, where, allowed=("protocol", "port", "endPort"))
    protocol = _protocol(spec.get("protocol"), where.at("protocol"))
    raw = spec.get("port")
    port: int | str | None
    if raw is None:
        port = None
    elif isinstance(raw, str):
        if not _SERVICE_NAME.match(raw) or len(raw) > 15:
            raise where.at("port").error(
                f"{raw!r} is neither a number nor a port name (at most 15 lowercase letters, "
                f"digits and single dashes, with at least one letter)")
        port = raw
    else:
        port = _port_number(raw, where.at("port"))
    end_port = None
    if spec.get("endPort") is not None:
        end_port = _port_number(spec["endPort"], where.at("endPort"))
        if not isinstance(port, int):
            raise where.at("endPort").error("needs a numeric port")
        if end_port < port:
            raise where.at("endPort").error(f"must be >= port ({port}), not {end_port}")
    return PolicyPort(protocol, port, end_port)


def _rule(value: Any, where: _Where, peers_field: str) -> Rule:
    spec = _mapping(value, where, allowed=(peers_field, "ports"))
    peers = tuple(_peer(p, where.at(peers_field).at(i))
                  for i, p in enumerate(_list(spec.get(peers_field), where.at(peers_field))))
    ports = tuple(_policy_port(p, where.at("ports").at(i))
                  for i, p in enumerate(_list(spec.get("ports"), where.at("ports"))))
    return Rule(peers, ports)


def _metadata(obj: Mapping[str, Any], kind: str, *, namespaced: bool,
              ) -> tuple[str, str, Mapping[str, Any]]:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        raise PolicyInputError(f"{kind} without metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise PolicyInputError(f"{kind} without metadata.name")
    namespace = meta.get("namespace", "default") if namespaced else ""
    if namespaced and (not isinstance(namespace, str) or not namespace):
        raise PolicyInputError(f"{kind} {name}: metadata.namespace must be a non-empty string")
    return namespace, name, meta


def parse_network_policy(obj: Mapping[str, Any]) -> NetworkPolicy:
    """A NetworkPolicy from its Kubernetes form (metadata.namespace defaults to `default`)."""
    namespace, name, _ = _metadata(obj, "NetworkPolicy", namespaced=True)
    where = _Where("NetworkPolicy", f"{namespace}/{name}")
    version = obj.get("apiVersion", "networking.k8s.io/v1")
    if version != "networking.k8s.io/v1":
        raise where.at("apiVersion").error(f"must be networking.k8s.io/v1, not "
                                           f"{_describe(version)}")
    spec = _mapping(obj.get("spec"), where.at("spec"),
                    allowed=("podSelector", "ingress", "egress", "policyTypes"))
    selector = _selector(spec.get("podSelector"), where.at("spec.podSelector"))
    ingress = tuple(_rule(r, where.at("spec.ingress").at(i), "from")
                    for i, r in enumerate(_list(spec.get("ingress"), where.at("spec.ingress"))))
    egress = tuple(_rule(r, where.at("spec.egress").at(i), "to")
                   for i, r in enumerate(_list(spec.get("egress"), where.at("spec.egress"))))
    types: set[Direction] = set()
    if spec.get("policyTypes") is None:
        types.add("ingress")
        if egress:
            types.add("egress")
    else:
        for i, raw in enumerate(_list(spec["policyTypes"], where.at("spec.policyTypes"))):
            if raw == "Ingress":
                types.add("ingress")
            elif raw == "Egress":
                types.add("egress")
            else:
                raise where.at("spec.policyTypes").at(i).error(
                    f"must be Ingress or Egress, not {_describe(raw)}")
    return NetworkPolicy(namespace, name, selector, ingress, egress, frozenset(types))


def _first_ipv4(status: Mapping[str, Any], where: _Where) -> IPv4Address | None:
    candidates = [status.get("podIP")]
    candidates += [entry.get("ip") for entry in _list(status.get("podIPs"), where.at("podIPs"))
                   if isinstance(entry, Mapping)]
    for text in candidates:
        if not isinstance(text, str) or not text:
            continue
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise where.at("podIP").error(f"{text!r} is not an IP address") from None
        if isinstance(address, IPv4Address):
            return address
    return None


def parse_pod(obj: Mapping[str, Any]) -> Pod | None:
    """A Pod from its Kubernetes form; None for pods policy does not govern (host network,
    or finished: a finished pod's address may already belong to another pod)."""
    namespace, name, meta = _metadata(obj, "Pod", namespaced=True)
    where = _Where("Pod", f"{namespace}/{name}")
    spec = _mapping(obj.get("spec"), where.at("spec"))
    status = _mapping(obj.get("status"), where.at("status"))
    if spec.get("hostNetwork") is True or status.get("phase") in TERMINAL_PHASES:
        return None
    ports = []
    for group in ("initContainers", "containers"):
        for i, container in enumerate(_list(spec.get(group), where.at(f"spec.{group}"))):
            here = where.at(f"spec.{group}").at(i)
            raw_ports = _mapping(container, here).get("ports")
            for j, raw in enumerate(_list(raw_ports, here.at("ports"))):
                entry = _mapping(raw, here.at("ports").at(j))
                ports.append(ContainerPort(
                    _port_number(entry.get("containerPort"),
                                 here.at("ports").at(j).at("containerPort")),
                    _protocol(entry.get("protocol"), here.at("ports").at(j).at("protocol")),
                    entry.get("name") if isinstance(entry.get("name"), str) else None))
    node = spec.get("nodeName")
    annotations = _mapping(meta.get("annotations"), where.at("metadata.annotations"))
    container_id = annotations.get(CONTAINER_ID_ANNOTATION)
    return Pod(namespace, name, _labels(meta.get("labels"), where.at("metadata.labels")),
               _first_ipv4(status, where.at("status")),
               node if isinstance(node, str) and node else None, tuple(ports),
               container_id if isinstance(container_id, str) and container_id else None)


def parse_namespace(obj: Mapping[str, Any]) -> Namespace:
    _, name, meta = _metadata(obj, "Namespace", namespaced=False)
    return Namespace(name, _labels(meta.get("labels"),
                                   _Where("Namespace", name, "metadata.labels")))


def parse_object(obj: Any) -> NetworkPolicy | Pod | Namespace | None:
    """A NetworkPolicy, Pod or Namespace by its `kind`; None for a pod policy ignores."""
    if not isinstance(obj, Mapping):
        raise PolicyInputError(f"expected a Kubernetes object, not {_describe(obj)}")
    kind = obj.get("kind")
    if kind == "NetworkPolicy":
        return parse_network_policy(obj)
    if kind == "Pod":
        return parse_pod(obj)
    if kind == "Namespace":
        return parse_namespace(obj)
    raise PolicyInputError(f"kind {_describe(kind)} is not NetworkPolicy, Pod or Namespace")
