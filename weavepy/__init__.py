"""weavepy: the node agent (config, identity, IPAM, reconciler, API, CLI, CNI, sandbox)."""

__version__ = "0.1.0"
