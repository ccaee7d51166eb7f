"""Keys and the cryptographic primitives of the WireGuard protocol, built from libraries.

This module owns every primitive the protocol names (whitepaper section 5.4):
DH (X25519), AEAD (ChaCha20-Poly1305 with a 64-bit little-endian counter nonce),
XAEAD (XChaCha20-Poly1305, used only for cookie replies), HASH (BLAKE2s-256),
MAC (keyed BLAKE2s-128), HMAC (HMAC over BLAKE2s-256) and the KDF1/2/3 chain (HKDF with
HMAC-BLAKE2s, exactly as the protocol defines it), plus TAI64N timestamps.

The rule it keeps: no cipher is written here. X25519 and the AEADs come from `cryptography`,
BLAKE2s and HMAC from the standard library. XChaCha20 is the ChaCha20-Poly1305 AEAD keyed with
an HChaCha20 subkey; HChaCha20's output is read off one block of `cryptography`'s raw ChaCha20
keystream (a keystream block is the permuted state plus the input state, so subtracting the
known input words leaves the permutation output HChaCha20 returns).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

KEY_SIZE = 32
TAG_SIZE = 16
HASH_SIZE = 32
MAC_SIZE = 16
XNONCE_SIZE = 24
TAI64N_SIZE = 12

_TAI64_BASE = 0x400000000000000A
# wireguard-go and the kernel drop the low 24 bits of the nanoseconds so that a timestamp does
# not leak the precise clock; we do the same.
_TAI64N_WHITENER_MASK = 0xFFFFFF
_CHACHA_CONSTANTS = struct.unpack("<4I", b"expand 32-byte k")
_NONCE_PREFIX = b"\x00\x00\x00\x00"
_U64 = struct.Struct("<Q")


class CryptoError(Exception):
    """An AEAD tag did not verify, or a key exchange produced a weak shared secret."""


class WeakPublicKey(CryptoError):
    """X25519 with this public key gives the all-zero shared secret (a low-order point)."""


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A Curve25519 public key: 32 bytes. Hashable, so peers are keyed by it."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_SIZE:
            raise ValueError(f"a public key is {KEY_SIZE} bytes, got {len(self.raw)}")

    @classmethod
    def from_base64(cls, text: str) -> PublicKey:
        return cls(_decode_key(text))

    def to_base64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    def __str__(self) -> str:
        return self.to_base64()

    def __repr__(self) -> str:
        return f"PublicKey({self.to_base64()!r})"


class PrivateKey:
    """A Curve25519 private key (clamped by X25519), with its public key cached."""

    __slots__ = ("_key", "public_key", "raw")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_SIZE:
            raise ValueError(f"a private key is {KEY_SIZE} bytes, got {len(raw)}")
        self.raw = bytes(raw)
        self._key = X25519PrivateKey.from_private_bytes(self.raw)
        self.public_key = PublicKey(self._key.public_key().public_bytes_raw())

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(X25519PrivateKey.generate().private_bytes_raw())

    @classmethod
    def from_base64(cls, text: str) -> PrivateKey:
        return cls(_decode_key(text))

    def to_base64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    def exchange(self, peer: PublicKey) -> bytes:
        """DH(self, peer). Raises WeakPublicKey for low-order points (all-zero result)."""
        try:
            shared = self._key.exchange(X25519PublicKey.from_public_bytes(peer.raw))
        except ValueError as exc:  # cryptography refuses the all-zero shared secret itself
            raise WeakPublicKey(str(exc)) from exc
        if not any(shared):
            raise WeakPublicKey("X25519 gave the all-zero shared secret")
        return shared

    def __repr__(self) -> str:
        return f"PrivateKey(public={self.public_key.to_base64()!r})"


def _decode_key(text: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a base64 key: {text!r}") from exc
    if len(raw) != KEY_SIZE:
        raise ValueError(f"a key is {KEY_SIZE} bytes (44 base64 characters), got {len(raw)}")
    return raw


# ---------------------------------------------------------------------------- hash, mac, kdf


def blake2s_hash(*parts: bytes) -> bytes:
    """HASH(parts...): BLAKE2s with a 32-byte digest over the concatenation."""
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def blake2s_mac(key: bytes, data: bytes) -> bytes:
    """MAC(key, data): keyed BLAKE2s with a 16-byte digest."""
    return hashlib.blake2s(data, digest_size=MAC_SIZE, key=key).digest()


def hmac_blake2s(key: bytes, *parts: bytes) -> bytes:
    """HMAC(key, parts...) with BLAKE2s-256 as the hash (RFC 2104, 64-byte block)."""
    mac = hmac.new(key, digestmod=hashlib.blake2s)
    for part in parts:
        mac.update(part)
    return mac.digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    prk = hmac_blake2s(key, data)
    return hmac_blake2s(prk, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    prk = hmac_blake2s(key, data)
    t1 = hmac_blake2s(prk, b"\x01")
    t2 = hmac_blake2s(prk, t1, b"\x02")
    return t1, t2


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    prk = hmac_blake2s(key, data)
    t1 = hmac_blake2s(prk, b"\x01")
    t2 = hmac_blake2s(prk, t1, b"\x02")
    t3 = hmac_blake2s(prk, t2, b"\x03")
    return t1, t2, t3


# ---------------------------------------------------------------------------- AEAD


def counter_nonce(counter: int) -> bytes:
    """The 96-bit AEAD nonce: 32 zero bits, then the 64-bit counter little-endian."""
    return _NONCE_PREFIX + _U64.pack(counter)


def aead_seal(key: bytes, counter: int, plaintext: bytes, associated: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(counter_nonce(counter), plaintext, associated)


def aead_open(key: bytes, counter: int, ciphertext: bytes, associated: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(counter_nonce(counter), ciphertext, associated)
    except InvalidTag as exc:
        raise CryptoError("AEAD tag mismatch") from exc


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20(key, nonce16) -> 32-byte subkey (draft-irtf-cfrg-xchacha section 2.2).

    `cryptography`'s ChaCha20 takes the 16 bytes of state words 12..15 as its "nonce" (a 32-bit
    block counter then a 96-bit nonce), which is exactly HChaCha20's input layout.
    """
    if len(key) != KEY_SIZE or len(nonce16) != 16:
        raise ValueError("HChaCha20 takes a 32-byte key and a 16-byte nonce")
    encryptor = Cipher(algorithms.ChaCha20(key, nonce16), mode=None).encryptor()
    block = struct.unpack("<16I", encryptor.update(bytes(64)))
    nonce_words = struct.unpack("<4I", nonce16)
    head = [(block[i] - _CHACHA_CONSTANTS[i]) & 0xFFFFFFFF for i in range(4)]
    tail = [(block[12 + i] - nonce_words[i]) & 0xFFFFFFFF for i in range(4)]
    return struct.pack("<8I", *head, *tail)


def xaead_seal(key: bytes, nonce24: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """XChaCha20-Poly1305 seal (cookie replies)."""
    subkey = hchacha20(key, nonce24[:16])
    return ChaCha20Poly1305(subkey).encrypt(_NONCE_PREFIX + nonce24[16:], plaintext, associated)


def xaead_open(key: bytes, nonce24: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    subkey = hchacha20(key, nonce24[:16])
    try:
        return ChaCha20Poly1305(subkey).decrypt(
            _NONCE_PREFIX + nonce24[16:], ciphertext, associated
        )
    except InvalidTag as exc:
        raise CryptoError("XAEAD tag mismatch") from exc


# ---------------------------------------------------------------------------- TAI64N


def tai64n(wall_time: float) -> bytes:
    """TAI64N label of a Unix wall-clock time, with the low nanosecond bits whitened."""
    seconds = int(wall_time // 1)
    nanos = int((wall_time - seconds) * 1e9) & ~_TAI64N_WHITENER_MASK
    return struct.pack(">QI", _TAI64_BASE + seconds, nanos)
