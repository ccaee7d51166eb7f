"""memberlist's gossip encryption: a keyring of AES keys and the AES-GCM packet/stream envelopes.

This module owns the keys and the two envelope formats, from memberlist security.go, keyring.go
and net.go (encryptLocalState / decryptRemoteState):

* packet:  [vsn u8][nonce 12][AES-GCM ciphertext || tag 16], additional data = the label (empty
  without labels). Version 1 encrypts the plaintext as is; version 0 (memberlist protocol 1 only)
  first PKCS7-pads it to the AES block size.
* stream:  [10][u32 BE length of the rest][the packet envelope], additional data = those first
  five bytes followed by the stream label.

The rules it keeps: we always send version 1 and accept 0 and 1; we encrypt with the primary key
and try every key on receive, primary first, as memberlist does; any failure raises
`DecodeError("decrypt")` and never returns unauthenticated bytes. Keys are 16, 24 or 32 bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gossip.messages import DecodeError, MessageType

VALID_KEY_SIZES = (16, 24, 32)
NONCE_SIZE = 12
TAG_SIZE = 16
BLOCK_SIZE = 16
SEND_VERSION = 1
STREAM_HEADER_SIZE = 5  # [10][u32 length]
_MIN_LENGTH = {0: 1 + NONCE_SIZE + BLOCK_SIZE + TAG_SIZE, 1: 1 + NONCE_SIZE + TAG_SIZE}
# Bytes a version-1 envelope adds to a packet (memberlist encryptOverhead).
PACKET_OVERHEAD = 1 + NONCE_SIZE + TAG_SIZE


def validate_key(key: bytes) -> None:
    """Raise ValueError unless `key` has an AES key size."""
    if len(key) not in VALID_KEY_SIZES:
        raise ValueError(f"key size must be 16, 24 or 32 bytes, not {len(key)}")


class Keyring:
    """An ordered set of keys; the first is the primary (used to encrypt)."""

    def __init__(self, keys: Sequence[bytes], primary: bytes | None = None) -> None:
        keys = [bytes(k) for k in keys]
        if primary is None:
            if not keys:
                raise ValueError("a keyring needs at least one key")
            primary = keys[0]
        validate_key(primary)
        for key in keys:
            validate_key(key)
        self._keys: list[bytes] = []
        self._ciphers: dict[bytes, AESGCM] = {}
        self._install([primary, *keys], primary)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Keyring:
        """Load serf's keyring file (a JSON list of base64 keys, the first is primary), or a text
        file with one base64 key per line (blank lines and `#` comments ignored)."""
        text = Path(path).read_text()
        stripped = text.strip()
        if stripped.startswith("["):
            try:
                entries = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not a JSON list of keys: {exc}") from exc
            if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
                raise ValueError(f"{path}: expected a JSON list of base64 strings")
        else:
            entries = [
                line.strip()
                for line in text.splitlines()
                if line.strip() and not line.strip().startswith("#")
            ]
        if not entries:
            raise ValueError(f"{path}: the keyring file contains no keys")
        keys = []
        for entry in entries:
            try:
                keys.append(base64.b64decode(entry, validate=True))
            except binascii.Error as exc:
                raise ValueError(f"{path}: a key is not valid base64: {exc}") from exc
        return cls(keys, keys[0])

    # -- memberlist's keyring operations -------------------------------------------------------

    @property
    def primary(self) -> bytes:
        return self._keys[0]

    @property
    def keys(self) -> tuple[bytes, ...]:
        """All keys, primary first."""
        return tuple(self._keys)

    def install(self, key: bytes) -> None:
        """Add a key for decryption (memberlist AddKey); a no-op if it is already installed."""
        validate_key(key)
        if key not in self._keys:
            self._install([*self._keys, bytes(key)], self._keys[0])

    def use(self, key: bytes) -> None:
        """Make an installed key the primary (memberlist UseKey)."""
        if key not in self._keys:
            raise ValueError("requested key is not in the keyring")
        self._install(self._keys, key)

    def remove(self, key: bytes) -> None:
        """Remove a key (memberlist RemoveKey); the primary cannot be removed."""
        if key == self._keys[0]:
            raise ValueError("removing the primary key is not allowed")
        self._install([k for k in self._keys if k != key], self._keys[0])

    def replace(self, keys: Sequence[bytes]) -> None:
        """Make the keyring exactly `keys`, the first the primary, in one step (a keyring file
        read again). The three steps of a rotation are three such reloads: add the new key
        second, then put it first, then drop the old one."""
        if not keys:
            raise ValueError("a keyring needs at least one key")
        for key in keys:
            validate_key(key)
        self._install([bytes(k) for k in keys], bytes(keys[0]))

    def _install(self, keys: Sequence[bytes], primary: bytes) -> None:
        ordered = [primary]
        for key in keys:
            if key not in ordered:
                ordered.append(key)
        self._keys = ordered
        self._ciphers = {k: self._ciphers.get(k) or AESGCM(k) for k in ordered}

    # -- envelopes ------------------------------------------------------------------------------

    def encrypt_packet(self, plain: bytes, label: bytes = b"") -> bytes:
        """Seal `plain` as a version-1 packet envelope with the primary key."""
        return self._seal(plain, label)

    def decrypt_packet(self, data: bytes, label: bytes = b"") -> bytes:
        """Open a packet envelope (version 0 or 1) with any installed key."""
        return self._open(data, label)

    def encrypt_stream(self, plain: bytes, label: bytes = b"") -> bytes:
        """Return the whole encrypted stream frame: [10][u32 length][envelope]."""
        header = struct.pack(">BI", MessageType.ENCRYPT, PACKET_OVERHEAD + len(plain))
        return header + self._seal(plain, header + label)

    def decrypt_stream_payload(self, header5: bytes, body: bytes, label: bytes = b"") -> bytes:
        """Open the envelope `body` that followed the 5-byte stream header `header5`."""
        if len(header5) != STREAM_HEADER_SIZE or header5[0] != MessageType.ENCRYPT:
            raise DecodeError("decrypt", "not an encrypted-stream header")
        return self._open(body, bytes(header5) + label)

    def _seal(self, plain: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        sealed = self._ciphers[self._keys[0]].encrypt(nonce, bytes(plain), aad or None)
        return bytes((SEND_VERSION,)) + nonce + sealed

    def _open(self, data: bytes, aad: bytes) -> bytes:
        if not data:
            raise DecodeError("decrypt", "empty payload")
        version = data[0]
        if version not in _MIN_LENGTH:
            raise DecodeError("decrypt", f"unsupported encryption version {version}")
        if len(data) < _MIN_LENGTH[version]:
            raise DecodeError("decrypt", f"payload too small to decrypt: {len(data)} bytes")
        nonce = bytes(data[1 : 1 + NONCE_SIZE])
        sealed = bytes(data[1 + NONCE_SIZE :])
        for key in self._keys:
            try:
                plain = self._ciphers[key].decrypt(nonce, sealed, aad or None)
            except InvalidTag:
                continue
            return plain if version == 1 else _pkcs7_unpad(plain)
        raise DecodeError("decrypt", "no installed key could decrypt the message")


def encrypt_packet_v0(key: bytes, plain: bytes, label: bytes = b"") -> bytes:
    """Seal a version-0 (PKCS7-padded) packet envelope, as memberlist protocol 1 senders do.

    We never send version 0; this exists so tests can prove we still accept it.
    """
    validate_key(key)
    pad = BLOCK_SIZE - len(plain) % BLOCK_SIZE
    nonce = os.urandom(NONCE_SIZE)
    padded = bytes(plain) + bytes((pad,)) * pad
    return b"\x00" + nonce + AESGCM(key).encrypt(nonce, padded, label or None)


def _pkcs7_unpad(padded: bytes) -> bytes:
    pad = padded[-1] if padded else 0
    if not 1 <= pad <= BLOCK_SIZE or pad > len(padded):
        raise DecodeError("decrypt", "bad PKCS7 padding in a version-0 payload")
    return padded[:-pad]
