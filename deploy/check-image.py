"""Check, in the built image, that the encrypted path's libraries still do their work.

deploy/Containerfile runs it with the venv's interpreter, after the build stage took out of
the venv what weavepy does not load (numpy's unused subpackages, rich's optional renderers):

    python check-image.py

It runs what the WireGuard path runs, with the image's numpy and cryptography: a Noise
handshake between two peers (X25519, BLAKE2s, ChaCha20-Poly1305), a transport round trip, a
tampered packet refused, and the numpy checksum of a large packet against the arithmetic done
with Python integers. Any difference ends the build with a non-zero exit.
"""

from __future__ import annotations

import os
import sys

from tunnel.wireguard.keys import CryptoError, PrivateKey, aead_open, aead_seal
from tunnel.wireguard.messages import Initiation
from tunnel.wireguard.noise import (
    Handshake,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
    derive_keys,
    open_initiation,
)
from tunnel.wireguard.segment import ones_complement_sum


def check_handshake_and_transport() -> None:
    initiator_key, responder_key = PrivateKey.generate(), PrivateKey.generate()
    psk = os.urandom(32)
    initiator = Handshake(initiator_key, responder_key.public_key, psk)
    responder = Handshake(responder_key, initiator_key.public_key, psk)
    initiation = create_initiation(initiator, 1, wall_time=1_700_000_000.0)
    opened = open_initiation(responder_key, Initiation.parse(initiation.pack()))
    consume_initiation(responder, opened, now=0.0, min_interval=0.02)
    response = create_response(responder, 2)
    responder_keys = derive_keys(responder)
    consume_response(initiator, response)
    initiator_keys = derive_keys(initiator)
    if initiator_keys.send_key != responder_keys.receive_key:
        raise SystemExit("check-image: the handshake derived different keys")
    payload = os.urandom(1400)
    sealed = aead_seal(initiator_keys.send_key, 7, payload, b"")
    if aead_open(responder_keys.receive_key, 7, sealed, b"") != payload:
        raise SystemExit("check-image: a transport packet did not open to what was sealed")
    tampered = bytes([sealed[0] ^ 1]) + sealed[1:]
    try:
        aead_open(responder_keys.receive_key, 7, tampered, b"")
    except CryptoError:
        return
    raise SystemExit("check-image: a tampered transport packet opened")


def check_numpy_checksum() -> None:
    for length in (512, 4099, 65001):
        data = os.urandom(length)
        padded = data + bytes(length & 1)
        total = sum(int.from_bytes(padded[i : i + 2], "big") for i in range(0, len(padded), 2))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        if ones_complement_sum(data) != total:
            raise SystemExit(f"check-image: numpy's checksum of {length} bytes is wrong")


def main() -> int:
    check_handshake_and_transport()
    check_numpy_checksum()
    sys.stderr.write("check-image: handshake, transport and numpy checksums work\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
