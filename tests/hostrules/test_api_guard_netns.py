"""The local API stays local where 127.0.0.1 is reachable from the network (issue 15).

Under hostNetwork with `route_localnet=1` (kube-proxy sets it), a host on the same network can
send packets to a node's 127.0.0.1 and reach what listens there (kubernetes#90259). Here n2
plays that host: `route_localnet=1` on both nodes, and on n2 a policy rule ahead of the local
table with a /32 route that sends 127.0.0.1 to n1's underlay address (inside the sandbox
only). A plain server on n1's 127.0.0.1 shows that the path works; the agent's API on the same
address must not answer through it, while it answers locally, and the metrics port, on the
address the operator chose, still answers from n2.
"""

from __future__ import annotations

import http.client
import re
import subprocess
from typing import Any

import pytest

from tests.agent.traffic import echo_server_argv, tcp_echo
from tests.conftest import require_binary
from weavepy.devtools.agentbox import API_PORT, AgentBox, http_json

pytestmark = [pytest.mark.netns]

CONTROL_PORT = 7200
METRICS_PORT = 6782
LOCAL_TABLE_PREF = 100  # the local table's rule, moved behind ours
ROUTE_TABLE = 100


def _route_localnet() -> None:
    with open("/proc/sys/net/ipv4/conf/all/route_localnet", "w") as sysctl:
        sysctl.write("1\n")


def _send_loopback_to(gateway: str) -> None:
    """In this node: packets to 127.0.0.1 leave through eth0 to `gateway`."""
    for argv in (["ip", "rule", "add", "pref", str(LOCAL_TABLE_PREF), "lookup", "local"],
                 ["ip", "rule", "del", "pref", "0", "lookup", "local"],
                 ["ip", "rule", "add", "pref", "10", "to", "127.0.0.1/32", "lookup",
                  str(ROUTE_TABLE)],
                 ["ip", "route", "add", "127.0.0.1/32", "via", gateway, "dev", "eth0",
                  "table", str(ROUTE_TABLE)]):
        subprocess.run(argv, check=True, capture_output=True, timeout=10)


def _metrics_from(host: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(host, METRICS_PORT, timeout=5)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def _guard_drops() -> int:
    text = subprocess.run(["nft", "list", "counter", "ip", "weavepy", "api_guard_drops"],
                          check=True, capture_output=True, text=True, timeout=10).stdout
    found = re.search(r"packets (\d+)", text)
    assert found is not None, text
    return int(found.group(1))


@pytest.mark.timeout(120)
def test_the_api_does_not_answer_the_network_even_with_route_localnet(sandbox_factory: Any
                                                                      ) -> None:
    require_binary("nft", "nftables")
    box = sandbox_factory(nodes=2)
    n1, n2 = box.nodes
    rig = AgentBox(box, pod_range=str(box.pod_range))
    rig.launch(n1, extra=["--metrics-addr", f"{n1.underlay_ip}:{METRICS_PORT}"])
    rig.wait_api(n1)
    rig.wait("the API guard in place", lambda: (
        (rules := (rig.status(n1) or {}).get("host_rules")) is not None
        and rules["present"] and rules["api_guard_port"] == API_PORT), timeout=30)
    for node in (n1, n2):
        node.call(_route_localnet)
    n2.call(_send_loopback_to, n1.underlay_ip)
    control = n1.start("loopback-echo", echo_server_argv("127.0.0.1", CONTROL_PORT))
    rig.wait("the loopback server", lambda: "listening" in control.log_text(), timeout=15)

    # the path works: n2 reaches what listens on n1's 127.0.0.1
    assert n2.call(tcp_echo, n2.underlay_ip, "127.0.0.1", CONTROL_PORT, b"hello") == b"tcp:hello"
    # the agent's API on the same address does not answer n2 (the SYN is dropped)
    assert n2.call(http_json, "GET", "/status", API_PORT, None, 3.0, timeout=20) is None
    assert n1.call(_guard_drops) > 0
    # locally it answers, and the metrics port answers n2 on the address it was given
    assert rig.status(n1) is not None
    code, text = n2.call(_metrics_from, n1.underlay_ip)
    assert code == 200 and "weavepy_build_info" in text
