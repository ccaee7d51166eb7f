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
    """Cuts a ciphertext into fragments without copying it.

    The caller seals into `buffer`; `layout` writes the fragments' headers into a small buffer
    of its own and returns an iovec (header, chunk, header, chunk, ...) over both, for one UDP
    GSO sendmsg: the kernel gathers the pieces while it copies them anyway, so the ciphertext
    is never copied in userspace. The views are made once (the buffers never move).
    """

    def __init__(self, max_datagram: int, max_message: int = 1 << 17) -> None:
        self.max_datagram = max_datagram
        self.chunk = max_datagram - SUPER_HEADER_SIZE
        self.max_count = min(MAX_FRAGMENTS, -(-max_message // self.chunk))
        self.buffer = bytearray(self.max_count * self.chunk)
        self.view = memoryview(self.buffer)
        self._headers = bytearray(self.max_count * SUPER_HEADER_SIZE)
        self._indices = bytes(range(self.max_count))
        headers = memoryview(self._headers)
        self._iovec: list[memoryview] = []
        for index in range(self.max_count):
            at = index * SUPER_HEADER_SIZE
            self._iovec.append(headers[at : at + SUPER_HEADER_SIZE])
            self._iovec.append(self.view[index * self.chunk : (index + 1) * self.chunk])

    def layout(self, length: int, receiver: int, counter: int) -> tuple[list[memoryview], int]:
        """Headers for the first `length` bytes of `buffer`; return (iovec, fragment count)."""
        chunk = self.chunk
        count = -(-length // chunk)
        if count > self.max_count:
            raise ValueError("super-packet too large for one extension message")
        end = count * SUPER_HEADER_SIZE
        self._headers[:end] = (
            SUPER_HEADER.pack(MESSAGE_SUPER_FRAGMENT, 0, count, 0, receiver, counter) * count
        )
        self._headers[1:end:SUPER_HEADER_SIZE] = self._indices[:count]
        iovec = self._iovec[: 2 * count - 1]
        iovec.append(self.view[(count - 1) * chunk : length])
        return iovec, count


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


def whole_message(headers: bytes | bytearray | memoryview, count: int) -> bool:
    """`headers` are the first `count` fragment headers of one read, back to back: are they
    one whole message, fragments 0..count-1 in order? (As in gather_batch: the first and the
    last are checked; the AEAD authenticates everything else.)"""
    if count < 1 or len(headers) < count * SUPER_HEADER_SIZE:
        return False
    last = (count - 1) * SUPER_HEADER_SIZE
    return (
        headers[0] == MESSAGE_SUPER_FRAGMENT
        and headers[1] == 0
        and headers[2] == count
        and headers[last + 1] == count - 1
        and headers[last + 4 : last + SUPER_HEADER_SIZE] == headers[4:SUPER_HEADER_SIZE]
    )


class Scatter:
    """Where a UDP read lands when an extension message is expected: an iovec that puts each
    datagram's header in `headers` and its chunk of ciphertext in `cipher`, so that one whole
    message arrives as one contiguous ciphertext and is opened where it lies (no gather copy).

    It only fits datagrams of `max_datagram` bytes (the sender's size, normally the same as
    ours) or a single datagram; anything else is put back in order with `linearize`.
    """

    def __init__(self, max_datagram: int, capacity: int) -> None:
        self.max_datagram = max_datagram
        chunk = max_datagram - SUPER_HEADER_SIZE
        count = -(-capacity // max_datagram)
        self.headers = bytearray(count * SUPER_HEADER_SIZE)
        self.cipher = bytearray(count * chunk)
        self.cipher_view = memoryview(self.cipher)
        headers = memoryview(self.headers)
        self.buffers: list[memoryview] = []
        for index in range(count):
            at = index * SUPER_HEADER_SIZE
            self.buffers.append(headers[at : at + SUPER_HEADER_SIZE])
            self.buffers.append(self.cipher_view[index * chunk : (index + 1) * chunk])

    def message(self, size: int, segment: int) -> int | None:
        """After a read of `size` bytes (GRO segment `segment`): the ciphertext length in
        `cipher` if the read is one whole message laid out as intended, else None."""
        count = -(-size // segment) if segment else 1
        if count > 1 and segment != self.max_datagram:
            return None
        if size - count * SUPER_HEADER_SIZE <= 0 or not whole_message(self.headers, count):
            return None
        return size - count * SUPER_HEADER_SIZE

    def linearize(self, size: int, out: bytearray) -> None:
        """Copy the first `size` bytes of the read back into `out`, in order."""
        at = 0
        for piece in self.buffers:
            if at >= size:
                return
            length = min(len(piece), size - at)
            out[at : at + length] = piece[:length]
            at += length


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
