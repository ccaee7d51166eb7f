"""A stand-in for kube-proxy (nftables mode): its ClusterIP rules, rendered for a sandbox node.

kube-proxy cannot run here (it needs a Kubernetes API), so the Services tests install the rules
it would write, in its shape (kubernetes' pkg/proxy/nftables/proxier.go; the facts, not its
code): a table `ip kube-proxy`; a verdict map `service-ips` keyed by ClusterIP . protocol .
port, consulted from nat chains on prerouting and output (priority -100, dstnat); one chain per
service port that marks for masquerade traffic from outside the cluster range and picks an
endpoint with `numgen random`; one chain per endpoint that marks hairpin traffic (source = the
endpoint itself) and DNATs to the endpoint's IP:port; masquerade on postrouting (priority 100,
srcnat) of whatever carries the mark 0x4000, clearing the mark first; and the filter checks on
the forward hook that reject traffic to a ClusterIP port without a service.

`render(services, cluster_range, service_range)` returns one `nft -f` transaction that replaces
the table whole, as kube-proxy's full sync does. It is applied inside sandbox nodes only.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

TABLE = "kube-proxy"
MASQUERADE_MARK = "0x4000"  # kube-proxy's default --masquerade-bit 14


@dataclass(frozen=True)
class ServicePort:
    """One port of a ClusterIP Service and its endpoints (IP, port)."""

    namespace: str
    name: str
    port_name: str
    protocol: str  # "tcp" or "udp"
    cluster_ip: str
    port: int
    endpoints: tuple[tuple[str, int], ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}/{self.protocol}/{self.port_name}"

    def chain(self) -> str:
        return f"service-{_hash(self.key)}-{self.key}"

    def endpoint_chain(self, ip: str, port: int) -> str:
        name = f"{self.key}__{ip}/{port}"
        return f"endpoint-{_hash(name)}-{name}"


def _hash(text: str) -> str:
    """kube-proxy's chain-name prefix: 8 characters of base32(sha256(name))."""
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:8]


def render(services: Sequence[ServicePort], cluster_range: str, service_range: str) -> str:
    """The whole `ip kube-proxy` table for `services`, as one nft transaction."""
    cluster_ips = sorted({s.cluster_ip for s in services})
    lines = [
        f"table ip {TABLE} {{ }}",
        f"delete table ip {TABLE}",
        f'add table ip {TABLE} {{ comment "rules for kube-proxy" ; }}',
        f'add set ip {TABLE} cluster-ips {{ type ipv4_addr ; comment "Active ClusterIPs" ; }}',
        f"add map ip {TABLE} service-ips {{ type ipv4_addr . inet_proto . inet_service : "
        f'verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }}',
        f"add map ip {TABLE} no-endpoint-services {{ type ipv4_addr . inet_proto . "
        f'inet_service : verdict ; comment "vmap to drop or reject packets to services with '
        f'no endpoints" ; }}',
        f"add chain ip {TABLE} nat-prerouting {{ type nat hook prerouting priority -100 ; }}",
        f"add chain ip {TABLE} nat-output {{ type nat hook output priority -100 ; }}",
        f"add chain ip {TABLE} nat-postrouting {{ type nat hook postrouting priority 100 ; }}",
        f"add chain ip {TABLE} filter-forward {{ type filter hook forward priority 0 ; }}",
        f"add chain ip {TABLE} services",
        f"add chain ip {TABLE} mark-for-masquerade",
        f"add chain ip {TABLE} masquerading",
        f"add chain ip {TABLE} cluster-ips-check",
        f"add chain ip {TABLE} service-endpoints-check",
        f"add rule ip {TABLE} nat-prerouting jump services",
        f"add rule ip {TABLE} nat-output jump services",
        f"add rule ip {TABLE} nat-postrouting jump masquerading",
        f"add rule ip {TABLE} filter-forward ct state new jump service-endpoints-check",
        f"add rule ip {TABLE} filter-forward ct state new jump cluster-ips-check",
        f"add rule ip {TABLE} services ip daddr . meta l4proto . th dport vmap @service-ips",
        f"add rule ip {TABLE} mark-for-masquerade mark set mark or {MASQUERADE_MARK}",
        f"add rule ip {TABLE} masquerading mark and {MASQUERADE_MARK} == 0 return",
        f"add rule ip {TABLE} masquerading mark set mark xor {MASQUERADE_MARK}",
        f"add rule ip {TABLE} masquerading masquerade fully-random",
        f'add rule ip {TABLE} cluster-ips-check ip daddr @cluster-ips reject comment "Reject '
        f'traffic to invalid ports of ClusterIPs"',
        f"add rule ip {TABLE} cluster-ips-check ip daddr {{ {service_range} }} drop comment "
        f'"Drop traffic to unallocated ClusterIPs"',
        f"add rule ip {TABLE} service-endpoints-check ip daddr . meta l4proto . th dport vmap "
        f"@no-endpoint-services",
    ]
    if cluster_ips:
        lines.append(f"add element ip {TABLE} cluster-ips {{ {', '.join(cluster_ips)} }}")
    chains: list[str] = []  # every chain first: a rule may only jump to a chain that exists
    rules: list[str] = []
    for svc in services:
        chain = svc.chain()
        chains.append(chain)
        rules.append(f"add rule ip {TABLE} {chain} ip daddr {svc.cluster_ip} ip saddr != "
                     f"{cluster_range} jump mark-for-masquerade")
        picks = ", ".join(f"{i} : goto {svc.endpoint_chain(ip, port)}"
                          for i, (ip, port) in enumerate(svc.endpoints))
        rules.append(f"add rule ip {TABLE} {chain} numgen random mod {len(svc.endpoints)} "
                     f"vmap {{ {picks} }}")
        for ip, port in svc.endpoints:
            endpoint = svc.endpoint_chain(ip, port)
            chains.append(endpoint)
            rules += [
                f"add rule ip {TABLE} {endpoint} ip saddr {ip} jump mark-for-masquerade",
                f"add rule ip {TABLE} {endpoint} meta l4proto {svc.protocol} dnat to "
                f"{ip}:{port}",
            ]
        rules.append(f"add element ip {TABLE} service-ips {{ {svc.cluster_ip} . "
                     f"{svc.protocol} . {svc.port} : goto {chain} }}")
    lines += [f"add chain ip {TABLE} {chain}" for chain in chains]
    return "\n".join(lines + rules) + "\n"
