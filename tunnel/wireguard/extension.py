"""The weavepy super-packet extension: one AEAD message per TUN super-packet, in fragments.

Why: per-segment AEAD and userspace segmentation cost Python about 2 us per 1.4 KB segment;
sealing a whole 62 KB super-packet once costs 8 us (AES-GCM) and the segments never exist in
userspace at all (docs/dataplane-facts.md: 4-6 Gbit/s against 1-2).

Negotiation. A node announces the capability in its gossip tags; the agent passes
`extension_ok=True` for peers that announced it. Only then does the sender use it; a stock
WireGuard peer never receives one of these messages (its `extension_ok` stays False). The
receiver accepts extension messages from any peer whose keys authenticate them.

Keys and counters. The handshake is plain WireGuard. The extension's AES-256-GCM key for each
direction is KDF1(transport key, "weavepy super-packet v1 aes256gcm"), so a key never serves two
ciphers. Its 64-bit counter is the keypair's ordinary send counter (standard and extension
messages share one counter space and one replay window), so the nonce (32 zero bits + counter,
little-endian) never repeats under a key, and rekeying, REJECT_AFTER_* and the timers apply
unchanged.

Wire format. Plaintext = the 10-byte virtio-net header + the IP super-packet, exactly as read
from the TUN; ciphertext = AES-256-GCM(plaintext) with its 16-byte tag. The ciphertext is cut
into chunks of (max datagram - 16) bytes, each sent in one UDP datagram behind a 16-byte header:

    offset  size  field
    0       1     type = 0x77
    1       1     fragment index (0-based)
    2       1     fragment count (1..255)
    3       1     flags (0; reserved)
    4       4     receiver index (little-endian, as in type-4 messages)
    8       8     counter (little-endian)

All fragments but the last have the same size, so a message leaves in one UDP GSO sendmsg and
usually arrives in one UDP GRO read. Losing one fragment loses the super-packet (TCP recovers).
The header is not authenticated on its own: a changed index, count or counter makes the AEAD
fail. Reassembly of fragments that arrive split across reads is bounded (`Reassembly`).
"""

from __future__ import annotations

import collections
import struct

import numpy as np

from tunnel.wireguard.messages import MESSAGE_SUPER_FRAGMENT, SUPER_HEADER_SIZE

SUPER_HEADER = struct.Struct("<BBBBIQ")
MAX_FRAGMENTS = 255


class Fragmenter:
    """Lays a ciphertext out as fragments with headers in one reusable buffer (numpy copies)."""

    def __init__(self, max_datagram: int, max_message: int = 1 << 17) -> None:
        self.max_datagram = max_datagram
        self.chunk = max_datagram - SUPER_HEADER_SIZE
        count = -(-max_message // self.chunk)
        self.buffer = bytearray(count * max_datagram)
        self._array = np.frombuffer(self.buffer, dtype=np.uint8)
        headers = np.zeros((count, SUPER_HEADER_SIZE), dtype=np.uint8)
        headers[:, 0] = MESSAGE_SUPER_FRAGMENT
        headers[:, 1] = np.arange(count) & 0xFF
        self._headers = headers

    def layout(self, ciphertext: memoryview, receiver: int, counter: int) -> tuple[int, int]:
        """Write the fragments; return (bytes used in `buffer`, fragment count)."""
        length = len(ciphertext)
        chunk, size = self.chunk, self.max_datagram
        count = -(-length // chunk)
        if count > MAX_FRAGMENTS:
            raise ValueError("super-packet too large for one extension message")
        headers = self._headers[:count]
        headers[:, 2] = count
        headers[:, 4:8] = np.frombuffer(struct.pack("<I", receiver), dtype=np.uint8)
        headers[:, 8:16] = np.frombuffer(struct.pack("<Q", counter), dtype=np.uint8)
        rows = self._array[: count * size].reshape(count, size)
        rows[:, :SUPER_HEADER_SIZE] = headers
        source = np.frombuffer(ciphertext, dtype=np.uint8)
        full = length // chunk
        if full:
            rows[:full, SUPER_HEADER_SIZE:] = source[: full * chunk].reshape(full, chunk)
        tail = length - full * chunk
        if tail:
            rows[full, SUPER_HEADER_SIZE : SUPER_HEADER_SIZE + tail] = source[full * chunk :]
        used = (count - 1) * size + SUPER_HEADER_SIZE + (tail or chunk)
        return used, count


def gather_batch(batch: memoryview, segment: int, out: bytearray) -> int | None:
    """If `batch` (one GRO read) holds exactly one whole message in order, copy its ciphertext
    into `out` and return its length; otherwise None (the caller reassembles fragment by
    fragment)."""
    total = len(batch)
    if total < SUPER_HEADER_SIZE or batch[0] != MESSAGE_SUPER_FRAGMENT or batch[1] != 0:
        return None
    count = batch[2]
    if count == 0 or -(-total // segment) != count:
        return None
    last = (count - 1) * segment
    if total - last <= SUPER_HEADER_SIZE:  # the last datagram is no fragment
        return None
    if batch[last + 1] != count - 1 or batch[last + 4 : last + 16] != batch[4:16]:
        return None
    chunk = segment - SUPER_HEADER_SIZE
    length = total - count * SUPER_HEADER_SIZE
    if length > len(out):
        return None
    rows = np.frombuffer(batch, dtype=np.uint8, count=(count - 1) * segment)
    target = np.frombuffer(out, dtype=np.uint8)
    if count > 1:
        target[: (count - 1) * chunk] = rows.reshape(count - 1, segment)[
            :, SUPER_HEADER_SIZE:
        ].ravel()
    target[(count - 1) * chunk : length] = np.frombuffer(batch, dtype=np.uint8)[
        last + SUPER_HEADER_SIZE : total
    ]
    return length


class Reassembly:
    """Fragments of messages that did not arrive as one batch, bounded in messages kept."""

    def __init__(self, max_pending: int = 64) -> None:
        self.max_pending = max_pending
        self._pending: collections.OrderedDict[bytes, list[bytes | None]] = (
            collections.OrderedDict()
        )
        self.evicted = 0

    def add(self, fragment: memoryview) -> tuple[bytes, bytes] | None:
        """Store one fragment; when its message is complete return (header key, ciphertext).

        The key is bytes 4..16 of the header (receiver index + counter).
        """
        index, count = fragment[1], fragment[2]
        if count == 0 or index >= count:
            raise ValueError("bad_fragment")
        key = bytes(fragment[4:16])
        parts = self._pending.get(key)
        if parts is None:
            if len(self._pending) >= self.max_pending:
                self._pending.popitem(last=False)
                self.evicted += 1
            parts = self._pending[key] = [None] * count
        elif len(parts) != count:
            raise ValueError("bad_fragment")
        parts[index] = bytes(fragment[SUPER_HEADER_SIZE:])
        if any(p is None for p in parts):
            return None
        del self._pending[key]
        return key, b"".join(p for p in parts if p is not None)
