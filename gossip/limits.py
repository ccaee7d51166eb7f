"""Size caps for everything gossip reads off the wire.

This module owns the numbers, nothing else. The rule it keeps: every decoder checks a claimed
size against one of these caps *before* it buffers or allocates for it, so a peer can never make
us hold more than the cap. The defaults are memberlist HEAD's hardening limits (net.go:
maxPushStateBytes, maxPushStateNodes, maxUserMsgBytes, maxDecompressedBytes, maxPushPullRequests;
MetaMaxSize; UDPBufferSize), plus three of our own that memberlist does not have, each explained
where it is declared.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps on what we accept and on what we send; all sizes are in bytes."""

    # memberlist maxPushStateBytes: an encrypted stream's length, and a push/pull's user state.
    max_push_state_bytes: int = 20 * MIB
    # memberlist maxPushStateNodes: node entries in one push/pull header.
    max_push_state_nodes: int = 1 << 20
    # memberlist maxUserMsgBytes: the raw body of a TCP user message.
    max_user_msg_bytes: int = 20 * MIB
    # memberlist maxDecompressedBytes (= 2 x push state): the output of one LZW stream. We also use
    # it as the cap on a whole plaintext stream, which memberlist leaves uncapped.
    max_decompressed_bytes: int = 40 * MIB
    # memberlist maxPushPullRequests: concurrent inbound push/pulls (enforced by the transport).
    max_concurrent_push_pull: int = 128
    # memberlist UDPBufferSize: the largest UDP payload we send.
    udp_buffer_size: int = 1400
    # memberlist net_transport udpPacketBufSize: the receive buffer for one datagram.
    udp_receive_size: int = 65536
    # memberlist MetaMaxSize: node metadata (serf tags).
    meta_max_size: int = 512
    # Ours: the decompressed size of one UDP packet. memberlist applies the 40 MiB stream cap here
    # too, but no memberlist sender compresses more than a datagram's worth, and pure-Python LZW
    # on 40 MiB costs seconds of CPU per forged 64 KiB packet.
    max_packet_decompressed_bytes: int = 1 * MIB
    # Ours: how deeply compound/compress wrappers may nest in one packet. memberlist sends at most
    # crc(compress(compound(...))) and does not bound recursion; we must (Python's stack).
    max_packet_nesting: int = 4
    # Ours: one msgpack object inside a plaintext stream (a node entry, a header, an error). Real
    # ones are under a few KiB; the compress wrapper is capped by max_push_state_bytes instead.
    max_stream_object_bytes: int = 1 * MIB


DEFAULT_LIMITS = Limits()
