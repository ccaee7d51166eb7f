"""LZW exactly as Go's `compress/lzw` speaks it with LSB bit order and 8-bit literals.

memberlist compresses packets and streams with `lzw.NewWriter(w, lzw.LSB, 8)` (util.go,
`lzwLitWidth`), and Python's standard library has no LZW, so this module owns both directions.

Theory of operation (facts from Go's compress/lzw reader.go and writer.go, re-implemented):

* Codes 0-255 are literals, 256 is *clear*, 257 is *eof*; new strings get codes from 258 up.
  Codes start 9 bits wide and grow one bit each time the next code to assign reaches a power of
  two, up to 12 bits. Bits are packed least-significant first.
* The writer always starts with a clear code, and ends with eof padded to a whole byte. When the
  code it would assign next reaches 4095, it emits clear (at 12 bits) and starts a fresh table;
  so for any input there is exactly one byte string that Go produces, and `compress` produces it.
* The reader accepts clear anywhere (including first and repeated), and, like Go's, keeps
  decoding with a frozen table if a foreign writer fills all 4096 codes without clearing. A
  stream that ends before eof is an error (Go: io.ErrUnexpectedEOF); bytes after eof are ignored.

The rule this module keeps: `decompress` never produces more than `max_size` bytes, and every
malformed input raises `DecodeError("lzw", ...)`, never anything else.
"""

from __future__ import annotations

from gossip.messages import DecodeError

LITERAL_WIDTH = 8
CLEAR_CODE = 1 << LITERAL_WIDTH  # 256
EOF_CODE = CLEAR_CODE + 1  # 257
MAX_WIDTH = 12
MAX_CODE = (1 << MAX_WIDTH) - 1  # 4095: the writer clears when it would assign this code


def compress(data: bytes) -> bytes:
    """Return `data` LZW-compressed, byte-identical to Go's `lzw.NewWriter(w, lzw.LSB, 8)`."""
    out = bytearray()
    # Pending output bits, least significant first; flushed four bytes at a time.
    bits = CLEAR_CODE
    n_bits = LITERAL_WIDTH + 1
    if not data:
        # Go's Close() with no prior data writes clear then eof, both 9 bits wide.
        bits |= EOF_CODE << n_bits
        n_bits += LITERAL_WIDTH + 1
        return bytes(_flush_all(out, bits, n_bits))

    width = LITERAL_WIDTH + 1
    last_assigned = EOF_CODE  # Go's writer `hi`
    grow_at = 1 << width  # Go's `overflow`
    # (prefix code << 8 | next byte) -> code for that string
    table: dict[int, int] = {}
    lookup = table.get
    code = data[0]
    for byte in memoryview(data)[1:]:
        key = (code << 8) | byte
        found = lookup(key)
        if found is not None:
            code = found
            continue
        bits |= code << n_bits
        n_bits += width
        if n_bits >= 32:
            out += (bits & 0xFFFFFFFF).to_bytes(4, "little")
            bits >>= 32
            n_bits -= 32
        code = byte
        last_assigned += 1
        if last_assigned == grow_at:
            width += 1
            grow_at <<= 1
        if last_assigned == MAX_CODE:
            bits |= CLEAR_CODE << n_bits
            n_bits += width
            width = LITERAL_WIDTH + 1
            last_assigned = EOF_CODE
            grow_at = 1 << width
            table.clear()
            continue
        table[key] = last_assigned

    # Close(): the pending code, the same bookkeeping as any emitted code, then eof.
    bits, n_bits = _flush_words(out, bits | (code << n_bits), n_bits + width)
    last_assigned += 1
    if last_assigned == grow_at:
        width += 1
    if last_assigned == MAX_CODE:
        bits, n_bits = _flush_words(out, bits | (CLEAR_CODE << n_bits), n_bits + width)
        width = LITERAL_WIDTH + 1
    bits |= EOF_CODE << n_bits
    n_bits += width
    return bytes(_flush_all(out, bits, n_bits))


def _flush_words(out: bytearray, bits: int, n_bits: int) -> tuple[int, int]:
    while n_bits >= 32:
        out += (bits & 0xFFFFFFFF).to_bytes(4, "little")
        bits >>= 32
        n_bits -= 32
    return bits, n_bits


def _flush_all(out: bytearray, bits: int, n_bits: int) -> bytearray:
    n_bytes = (n_bits + 7) // 8
    out += bits.to_bytes(n_bytes, "little")
    return out


def decompress(data: bytes, max_size: int) -> bytes:
    """Return the LZW-decompressed `data`; raise DecodeError("lzw") if it is malformed or would
    grow past `max_size` bytes."""
    out = bytearray()
    # entries[code] is the byte string `code` stands for; the empty string marks clear and eof.
    # Slots at or above `next_code` may hold strings from before the last clear: never read.
    entries: list[bytes] = [bytes((i,)) for i in range(CLEAR_CODE)] + [b""] * (MAX_CODE + 1 - 256)
    width = LITERAL_WIDTH + 1
    mask = (1 << width) - 1
    next_code = EOF_CODE  # Go's reader `hi`: codes below it are defined, or clear/eof
    grow_at = 1 << width
    last_entry = b""  # the previous code's string; empty after a clear or once the table is full
    bits = 0
    n_bits = 0
    pos = 0
    size = 0
    while True:
        if n_bits < width:
            chunk = data[pos : pos + 8]
            bits |= int.from_bytes(chunk, "little") << n_bits
            n_bits += 8 * len(chunk)
            pos += 8
            if n_bits < width:
                raise DecodeError("lzw", "input ends before the eof code")
        code = bits & mask
        bits >>= width
        n_bits -= width

        if code < next_code:
            entry = entries[code]
            if not entry:
                if code == CLEAR_CODE:
                    width = LITERAL_WIDTH + 1
                    mask = (1 << width) - 1
                    next_code = EOF_CODE
                    grow_at = 1 << width
                    last_entry = b""
                    continue
                return bytes(out)  # eof
            if last_entry:
                entries[next_code] = last_entry + entry[:1]
        elif code == next_code and last_entry:
            # The one code the writer can send before we have defined it: the previous string
            # followed by its own first byte.
            entry = last_entry + last_entry[:1]
            entries[next_code] = entry
        elif code == EOF_CODE:  # right after a clear, when next_code is still EOF_CODE
            return bytes(out)
        else:
            raise DecodeError("lzw", f"invalid code {code} (next free {next_code})")

        size += len(entry)
        if size > max_size:
            raise DecodeError("lzw", f"output exceeds {max_size} bytes")
        out += entry
        last_entry = entry
        next_code += 1
        if next_code >= grow_at:
            if width == MAX_WIDTH:
                # Table full and no clear from the writer: keep decoding, define nothing more.
                last_entry = b""
                next_code = grow_at
            else:
                width += 1
                mask = (1 << width) - 1
                grow_at <<= 1
