"""gossip: SWIM membership with the Lifeguard extensions, wire-compatible with HashiCorp memberlist.

A reusable library: it imports nothing from weavepy or tunnel. Protocol logic is sans-IO
(bytes and time in; packets, streams, events and deadlines out); trio code only moves bytes.
"""
