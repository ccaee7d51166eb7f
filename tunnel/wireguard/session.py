"""Transport sessions: keypairs, their counters and replay windows, and their rotation.

A `Keypair` is what one completed handshake yields: a send key, a receive key, the two 32-bit
indices that route messages to it, and its birth time. It seals type-4 messages with a 64-bit
counter (the AEAD nonce) and opens them: the counter is checked against the replay window
before decryption (cheap refusal) and recorded only after the tag verified.

A peer holds up to three keypairs (whitepaper section 5.4.6, wireguard-go's keypairs):

    slot      holds
    --------  ---------------------------------------------------------------------------
    current   the keypair we send with
    previous  the one before it, still accepted on receive so in-flight packets survive
    next      a responder's new keypair, not used for sending until the initiator has
              proven it has it too (its first transport message arrives under it)

Rotation rules: an initiator's new keypair becomes current at once (current -> previous; a
pending next, if any, becomes previous instead); a responder's goes to next and previous is
dropped. Receiving on `next` promotes it (current -> previous).

The rule it keeps: a keypair past REJECT_AFTER_TIME or REJECT_AFTER_MESSAGES neither sends nor
receives; the caller passes `now` and the limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from tunnel.wireguard.keys import TAG_SIZE, kdf1
from tunnel.wireguard.messages import (
    KEEPALIVE_SIZE,
    MESSAGE_TRANSPORT,
    TRANSPORT_HEADER,
    TRANSPORT_HEADER_SIZE,
    padded_length,
)
from tunnel.wireguard.replay import ReplayWindow

# Domain separation for the weavepy super-packet extension: its AES-256-GCM keys are derived
# from the transport keys, so one key is never used with two ciphers.
EXTENSION_LABEL = b"weavepy super-packet v1 aes256gcm"

_NONCE_PREFIX = b"\x00\x00\x00\x00"


class TransportError(Exception):
    """A transport message to drop; `reason` names the drop counter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class KeypairSnapshot:
    """The picklable facts of a keypair, for handing it to a data-plane worker process."""

    send_key: bytes
    receive_key: bytes
    is_initiator: bool
    local_index: int
    remote_index: int
    created: float


@dataclass(eq=False, slots=True)
class Keypair:
    send_key: bytes
    receive_key: bytes
    is_initiator: bool
    local_index: int
    remote_index: int
    created: float
    send_counter: int = 0
    replay: ReplayWindow = field(default_factory=ReplayWindow)
    sender: ChaCha20Poly1305 = field(init=False, repr=False)
    receiver: ChaCha20Poly1305 = field(init=False, repr=False)
    _extension: tuple[AESGCM, AESGCM] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.sender = ChaCha20Poly1305(self.send_key)
        self.receiver = ChaCha20Poly1305(self.receive_key)

    @classmethod
    def from_snapshot(cls, snap: KeypairSnapshot) -> Keypair:
        return cls(
            snap.send_key,
            snap.receive_key,
            snap.is_initiator,
            snap.local_index,
            snap.remote_index,
            snap.created,
        )

    def snapshot(self) -> KeypairSnapshot:
        return KeypairSnapshot(
            self.send_key,
            self.receive_key,
            self.is_initiator,
            self.local_index,
            self.remote_index,
            self.created,
        )

    @property
    def extension_ciphers(self) -> tuple[AESGCM, AESGCM]:
        """(send, receive) AES-256-GCM for the super-packet extension, derived on first use."""
        if self._extension is None:
            self._extension = (
                AESGCM(kdf1(self.send_key, EXTENSION_LABEL)),
                AESGCM(kdf1(self.receive_key, EXTENSION_LABEL)),
            )
        return self._extension

    def usable_for_sending(self, now: float, reject_after_time: float, reject_after: int) -> bool:
        return self.send_counter < reject_after and now - self.created < reject_after_time

    def seal(self, packet: bytes, mtu: int) -> bytes:
        """A type-4 message carrying `packet` (zero-padded), using the next send counter."""
        counter = self.send_counter
        self.send_counter = counter + 1
        pad = padded_length(len(packet), mtu) - len(packet)
        plaintext = packet + bytes(pad) if pad else packet
        header = TRANSPORT_HEADER.pack(MESSAGE_TRANSPORT, self.remote_index, counter)
        return header + self.sender.encrypt(_NONCE_PREFIX + header[8:16], plaintext, None)

    def open(self, message: bytes, reject_after: int) -> bytes:
        """Authenticate and decrypt a type-4 message for this keypair; replays are refused."""
        if len(message) < KEEPALIVE_SIZE:
            raise TransportError("truncated")
        counter = int.from_bytes(message[8:16], "little")
        if not self.replay.check(counter, reject_after):
            raise TransportError("replay")
        try:
            plaintext = self.receiver.decrypt(
                _NONCE_PREFIX + message[8:16], message[TRANSPORT_HEADER_SIZE:], None
            )
        except InvalidTag:
            raise TransportError("decrypt_failed") from None
        if not self.replay.accept(counter, reject_after):
            raise TransportError("replay")
        return plaintext


# Re-exported for callers that size buffers.
TRANSPORT_OVERHEAD = TRANSPORT_HEADER_SIZE + TAG_SIZE


class KeypairSlots:
    """previous / current / next keypairs of one peer, with the rotation rules above."""

    __slots__ = ("current", "next", "previous")

    def __init__(self) -> None:
        self.previous: Keypair | None = None
        self.current: Keypair | None = None
        self.next: Keypair | None = None

    def install(self, keypair: Keypair) -> list[Keypair]:
        """Place a fresh keypair; return the keypairs that fell out (to unregister)."""
        dropped: list[Keypair] = []
        if keypair.is_initiator:
            if self.next is not None:
                if self.current is not None:
                    dropped.append(self.current)
                if self.previous is not None:
                    dropped.append(self.previous)
                self.previous, self.next = self.next, None
            else:
                if self.previous is not None:
                    dropped.append(self.previous)
                self.previous = self.current
            self.current = keypair
        else:
            if self.next is not None:
                dropped.append(self.next)
            if self.previous is not None:
                dropped.append(self.previous)
            self.next, self.previous = keypair, None
        return dropped

    def received_with(self, keypair: Keypair) -> tuple[bool, Keypair | None]:
        """Promote `next` if `keypair` is it: (promoted, keypair that fell out of `previous`)."""
        if keypair is not self.next:
            return False, None
        old = self.previous
        self.previous, self.current, self.next = self.current, self.next, None
        return True, old

    def all(self) -> list[Keypair]:
        return [k for k in (self.previous, self.current, self.next) if k is not None]

    def clear(self) -> list[Keypair]:
        everything = self.all()
        self.previous = self.current = self.next = None
        return everything
