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

The I/O around it (TUN, UDP, worker processes) lives in device.py and the data-plane modules;
this package imports nothing from gossip or weavepy.
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
