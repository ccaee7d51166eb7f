"""The Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s handshake of WireGuard, as pure functions.

Theory of operation (whitepaper section 5.4.2-5.4.5). Each peer has one `Handshake` record.
Messages move it through these states, and nothing else may:

    operation            allowed from                          leads to
    -------------------  ------------------------------------  ----------------------
    create_initiation    any state                             INITIATION_CREATED
    consume_initiation   any state                             INITIATION_CONSUMED
    create_response      INITIATION_CONSUMED                   RESPONSE_CREATED
    consume_response     INITIATION_CREATED                    RESPONSE_CONSUMED
    derive_keys          RESPONSE_CREATED, RESPONSE_CONSUMED   ZEROED (keys handed out)

The initiator sends (e, s, timestamp) encrypted to the responder's static key; the responder
answers with its ephemeral and proves it knows everything (es, ss, ee, se, psk). The chaining
key that survives is split into the two transport keys. Consuming an initiation happens in two
steps, because the peer is only known after decrypting its static key:
`open_initiation` (device-wide: our static key only) then `consume_initiation` (that peer's
record: timestamp replay and flood checks, then commit).

The rules it keeps: a failed operation leaves the record exactly as it was (work happens on
copies and is committed at the end); a replayed or too-frequent initiation never commits; time
comes in as arguments (`wall_time` for the TAI64N timestamp, `now` for the flood check).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tunnel.wireguard.keys import (
    KEY_SIZE,
    TAI64N_SIZE,
    CryptoError,
    PrivateKey,
    PublicKey,
    aead_open,
    aead_seal,
    blake2s_hash,
    kdf1,
    kdf2,
    kdf3,
    tai64n,
)
from tunnel.wireguard.messages import Initiation, Response

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
INITIAL_CHAIN_KEY = blake2s_hash(CONSTRUCTION)
INITIAL_HASH = blake2s_hash(INITIAL_CHAIN_KEY, IDENTIFIER)
ZERO_TIMESTAMP = bytes(TAI64N_SIZE)


class HandshakeState(enum.Enum):
    ZEROED = "zeroed"
    INITIATION_CREATED = "initiation created"
    INITIATION_CONSUMED = "initiation consumed"
    RESPONSE_CREATED = "response created"
    RESPONSE_CONSUMED = "response consumed"


_ANY = frozenset(HandshakeState)
ALLOWED_FROM: dict[str, frozenset[HandshakeState]] = {
    "create_initiation": _ANY,
    "consume_initiation": _ANY,
    "create_response": frozenset({HandshakeState.INITIATION_CONSUMED}),
    "consume_response": frozenset({HandshakeState.INITIATION_CREATED}),
    "derive_keys": frozenset({HandshakeState.RESPONSE_CREATED, HandshakeState.RESPONSE_CONSUMED}),
}


class HandshakeError(Exception):
    """A handshake message that must be dropped. `reason` names the drop counter."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _require(hs: Handshake, operation: str) -> None:
    if hs.state not in ALLOWED_FROM[operation]:
        raise HandshakeError("unexpected_handshake", f"{operation} in state {hs.state.value}")


def _mix_hash(h: bytes, data: bytes) -> bytes:
    return blake2s_hash(h, data)


@dataclass(slots=True)
class Handshake:
    """The handshake record of one peer (ours to keep, one per remote static key)."""

    local_static: PrivateKey
    remote_static: PublicKey
    preshared_key: bytes = bytes(KEY_SIZE)
    state: HandshakeState = HandshakeState.ZEROED
    hash: bytes = b""
    chain_key: bytes = b""
    local_ephemeral: PrivateKey | None = None
    remote_ephemeral: PublicKey | None = None
    local_index: int = 0
    remote_index: int = 0
    last_timestamp: bytes = ZERO_TIMESTAMP
    last_initiation_consumed_at: float = float("-inf")
    last_sent_at: float = float("-inf")
    static_static: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if len(self.preshared_key) != KEY_SIZE:
            raise ValueError("a preshared key is 32 bytes")
        # DH(s_local, s_remote) never changes; a weak remote key makes the peer unusable.
        self.static_static = self.local_static.exchange(self.remote_static)

    def clear(self) -> None:
        self.state = HandshakeState.ZEROED
        self.hash = self.chain_key = b""
        self.local_ephemeral = None
        self.remote_ephemeral = None
        self.local_index = 0


@dataclass(frozen=True, slots=True)
class OpenedInitiation:
    """An initiation whose static key decrypted: who sent it, and the transcript so far."""

    message: Initiation
    remote_static: PublicKey
    hash: bytes
    chain_key: bytes


@dataclass(frozen=True, slots=True)
class DerivedKeys:
    send_key: bytes
    receive_key: bytes
    is_initiator: bool
    local_index: int
    remote_index: int


def create_initiation(hs: Handshake, sender_index: int, wall_time: float) -> Initiation:
    """Build an initiation (MAC fields left zero) and move to INITIATION_CREATED."""
    _require(hs, "create_initiation")
    h = _mix_hash(INITIAL_HASH, hs.remote_static.raw)
    ephemeral = PrivateKey.generate()
    e_pub = ephemeral.public_key.raw
    ck = kdf1(INITIAL_CHAIN_KEY, e_pub)
    h = _mix_hash(h, e_pub)
    ck, key = kdf2(ck, ephemeral.exchange(hs.remote_static))
    encrypted_static = aead_seal(key, 0, hs.local_static.public_key.raw, h)
    h = _mix_hash(h, encrypted_static)
    ck, key = kdf2(ck, hs.static_static)
    encrypted_timestamp = aead_seal(key, 0, tai64n(wall_time), h)
    h = _mix_hash(h, encrypted_timestamp)

    hs.hash, hs.chain_key = h, ck
    hs.local_ephemeral = ephemeral
    hs.remote_ephemeral = None
    hs.local_index = sender_index
    hs.state = HandshakeState.INITIATION_CREATED
    return Initiation(sender_index, e_pub, encrypted_static, encrypted_timestamp)


def open_initiation(local_static: PrivateKey, message: Initiation) -> OpenedInitiation:
    """First half of consuming an initiation: find out which static key sent it."""
    h = _mix_hash(INITIAL_HASH, local_static.public_key.raw)
    h = _mix_hash(h, message.ephemeral)
    ck = kdf1(INITIAL_CHAIN_KEY, message.ephemeral)
    try:
        shared = local_static.exchange(PublicKey(message.ephemeral))
        ck, key = kdf2(ck, shared)
        remote_static = aead_open(key, 0, message.encrypted_static, h)
    except CryptoError as exc:
        raise HandshakeError("decrypt_failed", "initiation static key") from exc
    h = _mix_hash(h, message.encrypted_static)
    return OpenedInitiation(message, PublicKey(remote_static), h, ck)


def consume_initiation(
    hs: Handshake, opened: OpenedInitiation, now: float, min_interval: float
) -> None:
    """Second half: authenticate the timestamp, refuse replays and floods, then commit."""
    _require(hs, "consume_initiation")
    if opened.remote_static != hs.remote_static:
        raise HandshakeError("unknown_peer", "initiation for another peer's record")
    message = opened.message
    try:
        ck, key = kdf2(opened.chain_key, hs.static_static)
        timestamp = aead_open(key, 0, message.encrypted_timestamp, opened.hash)
    except CryptoError as exc:
        raise HandshakeError("decrypt_failed", "initiation timestamp") from exc
    if timestamp <= hs.last_timestamp:
        raise HandshakeError("handshake_replay", "timestamp not newer than the last one")
    if now - hs.last_initiation_consumed_at <= min_interval:
        raise HandshakeError("handshake_flood", "initiations from this peer come too fast")

    hs.hash = _mix_hash(opened.hash, message.encrypted_timestamp)
    hs.chain_key = ck
    hs.remote_index = message.sender
    hs.remote_ephemeral = PublicKey(message.ephemeral)
    hs.last_timestamp = timestamp
    hs.last_initiation_consumed_at = max(now, hs.last_initiation_consumed_at)
    hs.state = HandshakeState.INITIATION_CONSUMED


def create_response(hs: Handshake, sender_index: int) -> Response:
    """Answer a consumed initiation (MAC fields left zero); moves to RESPONSE_CREATED."""
    _require(hs, "create_response")
    assert hs.remote_ephemeral is not None
    ephemeral = PrivateKey.generate()
    e_pub = ephemeral.public_key.raw
    h = _mix_hash(hs.hash, e_pub)
    ck = kdf1(hs.chain_key, e_pub)
    ck = kdf1(ck, ephemeral.exchange(hs.remote_ephemeral))
    ck = kdf1(ck, ephemeral.exchange(hs.remote_static))
    ck, tau, key = kdf3(ck, hs.preshared_key)
    h = _mix_hash(h, tau)
    encrypted_nothing = aead_seal(key, 0, b"", h)
    h = _mix_hash(h, encrypted_nothing)

    hs.hash, hs.chain_key = h, ck
    hs.local_ephemeral = ephemeral
    hs.local_index = sender_index
    hs.state = HandshakeState.RESPONSE_CREATED
    return Response(sender_index, hs.remote_index, e_pub, encrypted_nothing)


def consume_response(hs: Handshake, message: Response) -> None:
    """Finish the initiator's side: verify the responder's proof; moves to RESPONSE_CONSUMED."""
    _require(hs, "consume_response")
    if message.receiver != hs.local_index:
        raise HandshakeError("unknown_index", "response to another initiation")
    assert hs.local_ephemeral is not None
    try:
        remote_ephemeral = PublicKey(message.ephemeral)
        h = _mix_hash(hs.hash, message.ephemeral)
        ck = kdf1(hs.chain_key, message.ephemeral)
        ck = kdf1(ck, hs.local_ephemeral.exchange(remote_ephemeral))
        ck = kdf1(ck, hs.local_static.exchange(remote_ephemeral))
        ck, tau, key = kdf3(ck, hs.preshared_key)
        h = _mix_hash(h, tau)
        aead_open(key, 0, message.encrypted_nothing, h)
    except CryptoError as exc:
        raise HandshakeError("decrypt_failed", "response") from exc
    hs.hash = _mix_hash(h, message.encrypted_nothing)
    hs.chain_key = ck
    hs.remote_ephemeral = remote_ephemeral
    hs.remote_index = message.sender
    hs.state = HandshakeState.RESPONSE_CONSUMED


def derive_keys(hs: Handshake) -> DerivedKeys:
    """Split the chaining key into transport keys and zero the handshake."""
    _require(hs, "derive_keys")
    first, second = kdf2(hs.chain_key, b"")
    is_initiator = hs.state is HandshakeState.RESPONSE_CONSUMED
    send_key, receive_key = (first, second) if is_initiator else (second, first)
    keys = DerivedKeys(send_key, receive_key, is_initiator, hs.local_index, hs.remote_index)
    hs.clear()
    return keys
