"""weavepy.hostrules: the rules weavepy needs in the host's firewall so that pods reach the world.

Egress masquerade in weavepy's own nftables table, forward accepts where a host's drop lives,
and an optional guard for the local API port: `plan` decides (pure), `apply` reads the host and
applies (docs/egress.md explains what and why). The agent calls `HostRules.ensure(spec)` on
every reconcile pass and `HostRules.remove()` on reset.
"""

from weavepy.hostrules.apply import (
    HostRules,
    HostRulesError,
    HostRulesState,
    enable_bridge_netfilter,
)
from weavepy.hostrules.plan import HostRulesSpec

__all__ = ["HostRules", "HostRulesError", "HostRulesSpec", "HostRulesState",
           "enable_bridge_netfilter"]
