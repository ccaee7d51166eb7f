"""Denial-of-service mitigation: MAC1/MAC2, cookie replies, the under-load state and rate limit.

Theory of operation (whitepaper section 5.3):

* Every handshake message carries `mac1 = MAC(HASH("mac1----" || responder_public), msg_a)`,
  so a responder can drop garbage before doing any Curve25519 work. It is always checked.
* A responder that is *under load* also requires `mac2 = MAC(cookie, msg_b)`, where the cookie
  is `MAC(secret, source address)` and the secret changes every COOKIE_REFRESH_TIME. A message
  without a valid mac2 gets a cookie reply instead of a response: the cookie, encrypted with
  XChaCha20-Poly1305 under `HASH("cookie--" || responder_public)` with mac1 as associated data,
  so only the sender of that exact message can use it. Valid-mac2 messages are then rate
  limited per source IP (a token bucket, like wireguard-go's 20/s with a burst of 5).
* The initiator side (`CookieGenerator`, one per peer) adds mac1 always and mac2 while it holds
  a cookie younger than COOKIE_REFRESH_TIME.

The rule it keeps: time comes in as `now` (monotonic seconds); randomness comes from the
`random_bytes` callable given at construction (os.urandom in production).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from tunnel.wireguard.keys import (
    MAC_SIZE,
    XNONCE_SIZE,
    CryptoError,
    PublicKey,
    blake2s_hash,
    blake2s_mac,
    xaead_open,
    xaead_seal,
)
from tunnel.wireguard.messages import CookieReply

LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

Address = tuple[str, int]
RandomBytes = Callable[[int], bytes]


def address_bytes(addr: Address) -> bytes:
    """The bytes a cookie is bound to: the packed IP address, then the port little-endian."""
    return ipaddress.ip_address(addr[0]).packed + struct.pack("<H", addr[1])


def _mac_offsets(message: bytes) -> tuple[int, int]:
    mac2_at = len(message) - MAC_SIZE
    return mac2_at - MAC_SIZE, mac2_at


class CookieChecker:
    """The responder's side: verifies mac1/mac2 of messages sent to our public key."""

    def __init__(
        self,
        local_public: PublicKey,
        refresh_time: float,
        random_bytes: RandomBytes = os.urandom,
    ) -> None:
        self._mac1_key = blake2s_hash(LABEL_MAC1, local_public.raw)
        self._encryption_key = blake2s_hash(LABEL_COOKIE, local_public.raw)
        self._refresh_time = refresh_time
        self._random_bytes = random_bytes
        self._secret = b""
        self._secret_set_at = float("-inf")

    def check_mac1(self, message: bytes) -> bool:
        mac1_at, mac2_at = _mac_offsets(message)
        expected = blake2s_mac(self._mac1_key, message[:mac1_at])
        return hmac.compare_digest(expected, message[mac1_at:mac2_at])

    def check_mac2(self, message: bytes, source: Address, now: float) -> bool:
        if now - self._secret_set_at > self._refresh_time:
            return False
        cookie = blake2s_mac(self._secret, address_bytes(source))
        _, mac2_at = _mac_offsets(message)
        expected = blake2s_mac(cookie, message[:mac2_at])
        return hmac.compare_digest(expected, message[mac2_at:])

    def create_reply(self, message: bytes, sender_index: int, source: Address, now: float) -> bytes:
        """A cookie reply for `message` (an initiation or response we will not answer)."""
        if now - self._secret_set_at > self._refresh_time:
            self._secret = self._random_bytes(32)
            self._secret_set_at = now
        cookie = blake2s_mac(self._secret, address_bytes(source))
        mac1_at, mac2_at = _mac_offsets(message)
        nonce = self._random_bytes(XNONCE_SIZE)
        sealed = xaead_seal(self._encryption_key, nonce, cookie, message[mac1_at:mac2_at])
        return CookieReply(sender_index, nonce, sealed).pack()


class CookieGenerator:
    """The initiator's side for one peer: adds mac1 and, while we hold a cookie, mac2."""

    def __init__(self, remote_public: PublicKey, refresh_time: float) -> None:
        self._mac1_key = blake2s_hash(LABEL_MAC1, remote_public.raw)
        self._encryption_key = blake2s_hash(LABEL_COOKIE, remote_public.raw)
        self._refresh_time = refresh_time
        self._cookie = b""
        self._cookie_set_at = float("-inf")
        self._last_mac1: bytes | None = None

    def add_macs(self, message: bytes, now: float) -> bytes:
        """`message` with its two MAC fields (its last 32 bytes) filled in."""
        mac1_at, _ = _mac_offsets(message)
        mac1 = blake2s_mac(self._mac1_key, message[:mac1_at])
        self._last_mac1 = mac1
        with_mac1 = message[:mac1_at] + mac1
        if now - self._cookie_set_at > self._refresh_time:
            return with_mac1 + bytes(MAC_SIZE)
        return with_mac1 + blake2s_mac(self._cookie, with_mac1)

    def consume_reply(self, reply: CookieReply, now: float) -> bool:
        """Store the cookie in `reply`; False if it does not decrypt against our last mac1."""
        if self._last_mac1 is None:
            return False
        try:
            cookie = xaead_open(
                self._encryption_key, reply.nonce, reply.encrypted_cookie, self._last_mac1
            )
        except CryptoError:
            return False
        self._cookie = cookie
        self._cookie_set_at = now
        return True

    @property
    def has_cookie(self) -> bool:
        return bool(self._cookie)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    last: float


class RateLimiter:
    """Token bucket per source IP for handshake messages accepted while under load."""

    def __init__(self, per_second: float = 20.0, burst: float = 5.0) -> None:
        self._per_second = per_second
        self._burst = burst
        self._buckets: dict[str, _Bucket] = {}
        self._last_sweep = float("-inf")

    def allow(self, ip: str, now: float) -> bool:
        if now - self._last_sweep > 1.0:
            self._buckets = {k: b for k, b in self._buckets.items() if now - b.last <= 1.0}
            self._last_sweep = now
        bucket = self._buckets.get(ip)
        if bucket is None:
            self._buckets[ip] = _Bucket(self._burst - 1.0, now)
            return True
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.last) * self._per_second)
        bucket.last = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        return False


class LoadMonitor:
    """Decides when the device is under load: too many handshake messages in one second.

    wireguard-go looks at its handshake queue depth; a sans-IO core has no queue, so it counts
    handshake messages per second instead (the runner may also report its backlog). Once
    triggered, the state lasts `hold_time` seconds.
    """

    def __init__(self, threshold_per_second: int, hold_time: float) -> None:
        self._threshold = threshold_per_second
        self._hold_time = hold_time
        self._window_start = float("-inf")
        self._count = 0
        self._until = float("-inf")

    def note_handshake(self, now: float) -> None:
        if now - self._window_start >= 1.0:
            self._window_start = now
            self._count = 0
        self._count += 1
        if self._count > self._threshold:
            self._until = now + self._hold_time

    def note_backlog(self, queued: int, now: float) -> None:
        if queued > self._threshold:
            self._until = now + self._hold_time

    def under_load(self, now: float) -> bool:
        return now < self._until
