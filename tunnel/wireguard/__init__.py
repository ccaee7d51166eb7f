"""The WireGuard protocol in userspace, plus the weavepy super-packet extension.

Layout, from the bottom up:

    keys.py        primitives (X25519, ChaCha20-Poly1305, XChaCha20, BLAKE2s, HMAC, KDF, TAI64N)
    messages.py    wire formats of message types 1-4 and the extension's fragments
    replay.py      the sliding replay window
    cookie.py      mac1/mac2, cookie replies, under-load detection, rate limiting
    noise.py       the Noise_IKpsk2 handshake as a state table and pure functions
    timers.py      every timer rule and constant
    allowedips.py  cryptokey routing (longest prefix match)
    session.py     keypairs, transport sealing/opening, keypair rotation
    core.py        the sans-IO device that ties them together (bytes and time in, bytes out)
    segment.py     userspace TSO/GRO for TCP super-packets (numpy column operations)
    extension.py   the weavepy super-packet extension's framing
    plane.py       commands and reports between the control plane and the engines
    send.py        the sans-IO TX engine: TUN reads in, datagrams (UDP GSO sends) out
    receive.py     the sans-IO RX engine: UDP (GRO) reads in, TUN writes out
    workers.py     one worker process per direction around an engine
    device.py      the trio control process and `WireGuardInterface` (what the agent embeds)

docs/wireguard.md explains the design. This package imports nothing from gossip or weavepy.
"""

from tunnel.wireguard.core import (
    Device,
    DeviceConfig,
    EndpointChanged,
    HandshakeCompleted,
    HandshakeGaveUp,
    KeepaliveRequested,
    KeypairsChanged,
    KeysZeroed,
    PeerConfig,
)
from tunnel.wireguard.keys import PrivateKey, PublicKey
from tunnel.wireguard.timers import TimerConfig

__all__ = [
    "Device",
    "DeviceConfig",
    "EndpointChanged",
    "HandshakeCompleted",
    "HandshakeGaveUp",
    "KeepaliveRequested",
    "KeypairsChanged",
    "KeysZeroed",
    "PeerConfig",
    "PrivateKey",
    "PublicKey",
    "TimerConfig",
]
