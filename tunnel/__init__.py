"""tunnel: node-to-node data paths (kernel VXLAN, WireGuard protocol over TUN).

It imports nothing from gossip: it is told which peers exist and programs the data path.
"""
