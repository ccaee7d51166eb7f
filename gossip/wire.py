"""memberlist's wire format: message values (gossip.messages) <-> the exact bytes Go sends.

This module owns framing and encoding, and no behaviour. Facts from memberlist net.go, util.go,
security.go (v0.2.2, as in Debian's serf 0.9.4) and go-msgpack v0.5.5; our own code.

Theory of operation
-------------------
A message is `[type byte] + msgpack(struct)`: a map keyed by the Go field names, written sorted by
name (go-msgpack encodes struct-to-map from its sorted field list, in v0.5.5 and v2 alike), in the
*old* msgpack spec: strings and []byte are both "raw" (fixraw/raw16/raw32, never str8/bin), so we
encode with `use_bin_type=False` and decode with `raw=True`. go-msgpack v0.5.5 (Debian's serf)
writes non-negative Go `int`s as msgpack uints, as msgpack-python does; v2 (newer memberlist)
writes them as signed ints. Every version decodes any key order and any integer width, so we
match v0.5.5 byte for byte and read both. `omitempty` exists only on the Source* fields of ping
and indirect ping; any other empty []byte is a nil slice in Go and goes out as msgpack nil. The
packet form of a user message is `[8] + payload`, unframed.

Packets (UDP) are layered, outermost first::

    [encryption envelope]  ->  [12][crc32 BE][...]  ->  [9] compress{Algo, Buf=LZW(...)}
                           ->  [7][n][n x u16 BE length][parts...]  ->  messages

`PacketCodec` builds and peels these layers. On receive, as memberlist does, the CRC wrapper is
recognised only outermost; compound and compress may nest (we bound the depth); every part of a
compound is decoded on its own, so one bad part never costs the others.

Streams (TCP) carry one message each and have no length prefix unless encrypted
(`[10][u32 length][envelope]`); when compression is on the whole message is always wrapped as
`[9] compress{...}`. A push/pull is `[6]` header{Nodes, UserStateLen, Join}, Nodes node-state
maps, then UserStateLen raw bytes; a user message is `[8]` header{UserMsgLen} then the raw bytes.
The peer holds the connection open for our reply, so `StreamDecoder` knows a message is complete
from its own structure, never from EOF.

Rules kept here: decoders raise only `DecodeError(reason)` (reasons are short metric labels:
empty, unknown_type, msgpack, field, compound, crc, lzw, compress, decrypt, not_encrypted,
too_deep, too_large, truncated); every claimed size is checked against `Limits` before anything
is buffered or allocated for it. Names travel as raw bytes; we read them as UTF-8 with surrogate
escapes so that any Go string survives a round trip unchanged.
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from gossip import lzw
from gossip.keyring import PACKET_OVERHEAD, STREAM_HEADER_SIZE, Keyring
from gossip.limits import DEFAULT_LIMITS, Limits
from gossip.messages import (
    Ack,
    Alive,
    Dead,
    DecodeError,
    ErrResp,
    IndirectPing,
    Message,
    MessageType,
    Nack,
    NodeStateCode,
    PacketMessage,
    Ping,
    PushNodeState,
    PushPull,
    StreamMessage,
    Suspect,
    UserMsg,
)

LZW_ALGO = 0
MAX_COMPOUND_PARTS = 255
MAX_COMPOUND_PART_BYTES = 0xFFFF
COMPOUND_HEADER_OVERHEAD = 2  # [7][count]
COMPOUND_PART_OVERHEAD = 2  # u16 length per part
CRC_OVERHEAD = 5  # [12][crc32]

# -- struct schemas --------------------------------------------------------------------------


class _Kind(enum.Enum):
    U8 = 8
    U16 = 16
    U32 = 32
    INT = 64  # Go `int` (64-bit)
    BOOL = "bool"
    STR = "str"
    BYTES = "bytes"


@dataclass(frozen=True, slots=True)
class _Field:
    attr: str  # the Python attribute (or header key) it maps to
    key: bytes  # the Go field name, exactly as encoded
    kind: _Kind
    omitempty: bool = False


class _Schema:
    """One Go struct: its fields as declared (the order of go-msgpack's array form), as written
    (go-msgpack writes struct-to-map sorted by field name, bytewise), and indexed by Go name."""

    __slots__ = ("by_key", "declared", "written")

    def __init__(self, *spec: tuple[str, str, _Kind] | tuple[str, str, _Kind, bool]) -> None:
        self.declared = tuple(
            _Field(s[0], s[1].encode(), s[2], len(s) > 3 and bool(s[3])) for s in spec
        )
        self.written = tuple(sorted(self.declared, key=lambda f: f.key))
        self.by_key = {f.key: f for f in self.declared}


_K = _Kind
_PING = _Schema(
    ("seq_no", "SeqNo", _K.U32),
    ("node", "Node", _K.STR),
    ("source_addr", "SourceAddr", _K.BYTES, True),
    ("source_port", "SourcePort", _K.U16, True),
    ("source_node", "SourceNode", _K.STR, True),
)
_INDIRECT_PING = _Schema(
    ("seq_no", "SeqNo", _K.U32),
    ("target", "Target", _K.BYTES),
    ("port", "Port", _K.U16),
    ("node", "Node", _K.STR),
    ("nack", "Nack", _K.BOOL),
    ("source_addr", "SourceAddr", _K.BYTES, True),
    ("source_port", "SourcePort", _K.U16, True),
    ("source_node", "SourceNode", _K.STR, True),
)
_ACK = _Schema(("seq_no", "SeqNo", _K.U32), ("payload", "Payload", _K.BYTES))
_NACK = _Schema(("seq_no", "SeqNo", _K.U32))
_SUSPECT = _Schema(
    ("incarnation", "Incarnation", _K.U32),
    ("node", "Node", _K.STR),
    ("from_node", "From", _K.STR),
)
_ALIVE = _Schema(
    ("incarnation", "Incarnation", _K.U32),
    ("node", "Node", _K.STR),
    ("addr", "Addr", _K.BYTES),
    ("port", "Port", _K.U16),
    ("meta", "Meta", _K.BYTES),
    ("vsn", "Vsn", _K.BYTES),
)
_DEAD = _SUSPECT
_ERR = _Schema(("error", "Error", _K.STR))
_PUSH_PULL_HEADER = _Schema(
    ("nodes", "Nodes", _K.INT),
    ("user_state_len", "UserStateLen", _K.INT),
    ("join", "Join", _K.BOOL),
)
_PUSH_NODE_STATE = _Schema(
    ("name", "Name", _K.STR),
    ("addr", "Addr", _K.BYTES),
    ("port", "Port", _K.U16),
    ("meta", "Meta", _K.BYTES),
    ("incarnation", "Incarnation", _K.U32),
    ("state", "State", _K.INT),
    ("vsn", "Vsn", _K.BYTES),
)
_USER_MSG_HEADER = _Schema(("user_msg_len", "UserMsgLen", _K.INT))
_COMPRESS = _Schema(("algo", "Algo", _K.U8), ("buf", "Buf", _K.BYTES))

# Packet-level message types whose body is one struct: type -> (value class, schema).
_PACKET_STRUCTS: dict[int, tuple[type[Any], _Schema]] = {
    MessageType.PING: (Ping, _PING),
    MessageType.INDIRECT_PING: (IndirectPing, _INDIRECT_PING),
    MessageType.ACK: (Ack, _ACK),
    MessageType.NACK: (Nack, _NACK),
    MessageType.SUSPECT: (Suspect, _SUSPECT),
    MessageType.ALIVE: (Alive, _ALIVE),
    MessageType.DEAD: (Dead, _DEAD),
}
_STRUCT_OF_CLASS: dict[type[Any], tuple[MessageType, _Schema]] = {
    cls: (MessageType(t), schema) for t, (cls, schema) in _PACKET_STRUCTS.items()
}
_STRUCT_OF_CLASS[ErrResp] = (MessageType.ERR, _ERR)

# -- encoding --------------------------------------------------------------------------------


def _encode_value(value: Any, kind: _Kind) -> Any:
    if kind is _Kind.STR:
        if not isinstance(value, str):
            raise TypeError(f"expected str, got {type(value).__name__}")
        return value.encode("utf-8", "surrogateescape")
    if kind is _Kind.BYTES:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"expected bytes, got {type(value).__name__}")
        return bytes(value) if len(value) else None  # Go: an empty []byte is a nil slice
    if kind is _Kind.BOOL:
        return bool(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected int, got {type(value).__name__}")
    if kind is _Kind.INT:
        if not -(1 << 63) <= value < 1 << 63:
            raise ValueError(f"{value} does not fit a Go int")
    elif not 0 <= value < 1 << kind.value:
        raise ValueError(f"{value} does not fit a uint{kind.value}")
    return value


def _encode_struct(values: Callable[[str], Any], schema: _Schema) -> bytes:
    fields: dict[bytes, Any] = {}
    for f in schema.written:
        value = values(f.attr)
        if f.omitempty and not value:
            continue
        try:
            fields[f.key] = _encode_value(value, f.kind)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{f.key.decode()}: {exc}") from exc
    packed: bytes = msgpack.packb(fields, use_bin_type=False)
    return packed


def _encode_object(obj: object, schema: _Schema) -> bytes:
    return _encode_struct(lambda attr: getattr(obj, attr), schema)


def _encode_mapping(values: dict[str, Any], schema: _Schema) -> bytes:
    return _encode_struct(values.__getitem__, schema)


def encode_message(msg: Message) -> bytes:
    """Encode one message as `[type] + body`, byte-identical to memberlist.

    A `UserMsg` gets its packet form (`[8] + payload`); a `PushPull` gets the stream body
    (`[6]` header, node states, user state). Invalid field values raise TypeError/ValueError.
    """
    if isinstance(msg, UserMsg):
        return bytes((MessageType.USER,)) + bytes(msg.payload)
    if isinstance(msg, PushPull):
        return _encode_push_pull(msg)
    msg_type, schema = _STRUCT_OF_CLASS[type(msg)]
    return bytes((msg_type,)) + _encode_object(msg, schema)


def _encode_push_pull(msg: PushPull) -> bytes:
    header = {"nodes": len(msg.nodes), "user_state_len": len(msg.user_state), "join": msg.join}
    out = [bytes((MessageType.PUSH_PULL,)), _encode_mapping(header, _PUSH_PULL_HEADER)]
    out.extend(_encode_object(node, _PUSH_NODE_STATE) for node in msg.nodes)
    out.append(bytes(msg.user_state))
    return b"".join(out)


def _encode_stream_message(msg: StreamMessage) -> bytes:
    if isinstance(msg, UserMsg):
        header = _encode_mapping({"user_msg_len": len(msg.payload)}, _USER_MSG_HEADER)
        return bytes((MessageType.USER,)) + header + bytes(msg.payload)
    return encode_message(msg)


def encode_compressed(data: bytes) -> bytes:
    """Wrap `data` as `[9] compress{Algo: LZW, Buf: LZW(data)}` (memberlist compressPayload)."""
    body = _encode_mapping({"algo": LZW_ALGO, "buf": lzw.compress(data)}, _COMPRESS)
    return bytes((MessageType.COMPRESS,)) + body


def make_compound(parts: Sequence[bytes]) -> bytes:
    """Join encoded messages as `[7][count][count x u16 BE length][parts...]`."""
    if len(parts) > MAX_COMPOUND_PARTS:
        raise ValueError(f"a compound holds at most {MAX_COMPOUND_PARTS} parts, not {len(parts)}")
    lengths = [len(p) for p in parts]
    if any(n > MAX_COMPOUND_PART_BYTES for n in lengths):
        raise ValueError(f"a compound part is at most {MAX_COMPOUND_PART_BYTES} bytes")
    header = struct.pack(f">BB{len(parts)}H", MessageType.COMPOUND, len(parts), *lengths)
    return header + b"".join(parts)


def compound_size(part_sizes: Sequence[int]) -> int:
    """The encoded size of one packet carrying parts of these sizes (a bare part if only one)."""
    if len(part_sizes) == 1:
        return part_sizes[0]
    return COMPOUND_HEADER_OVERHEAD + sum(COMPOUND_PART_OVERHEAD + n for n in part_sizes)


def pack_parts(parts: Sequence[bytes], budget: int) -> list[list[bytes]]:
    """Group encoded messages into as few packets of at most `budget` bytes as we can.

    First-fit decreasing over the compound size (`compound_size`), at most 255 parts a packet;
    within a packet, parts keep their given order. A part too big for any packet travels alone.
    """
    order = sorted(range(len(parts)), key=lambda i: len(parts[i]), reverse=True)
    bins: list[list[int]] = []
    sizes: list[int] = []  # compound size of each bin if it held >= 2 parts
    for i in order:
        cost = COMPOUND_PART_OVERHEAD + len(parts[i])
        for b, members in enumerate(bins):
            if len(members) < MAX_COMPOUND_PARTS and sizes[b] + cost <= budget:
                members.append(i)
                sizes[b] += cost
                break
        else:
            bins.append([i])
            sizes.append(COMPOUND_HEADER_OVERHEAD + cost)
    return [[parts[i] for i in sorted(members)] for members in bins]


# -- decoding: structs -----------------------------------------------------------------------


def _decode_value(value: Any, f: _Field) -> Any:
    kind = f.kind
    if value is None:  # go-msgpack decodes nil into any field as its zero value
        return _ZERO[kind]
    if kind is _Kind.STR:
        if isinstance(value, bytes):
            return value.decode("utf-8", "surrogateescape")
    elif kind is _Kind.BYTES:
        if isinstance(value, bytes):
            return value
        if isinstance(value, list) and all(type(b) is int and 0 <= b <= 255 for b in value):
            return bytes(value)
    elif kind is _Kind.BOOL:
        if isinstance(value, bool):
            return value
        if type(value) is int and value in (0, 1):  # go-msgpack accepts fixnum 0/1 as a bool
            return bool(value)
    elif type(value) is int:
        if kind is _Kind.INT:
            if -(1 << 63) <= value < 1 << 63:
                return value
        elif 0 <= value < 1 << kind.value:
            return value
        raise DecodeError("field", f"{f.key.decode()}: {value} out of range for {kind.name}")
    raise DecodeError("field", f"{f.key.decode()}: unexpected {type(value).__name__}")


_ZERO: dict[_Kind, Any] = {
    _Kind.U8: 0,
    _Kind.U16: 0,
    _Kind.U32: 0,
    _Kind.INT: 0,
    _Kind.BOOL: False,
    _Kind.STR: "",
    _Kind.BYTES: b"",
}


def _decode_struct(obj: Any, schema: _Schema) -> dict[str, Any]:
    """Map a decoded msgpack value onto a schema, as go-msgpack fills a struct: missing fields
    keep their zero value, unknown keys are skipped, and the array form maps by position."""
    values = {f.attr: _ZERO[f.kind] for f in schema.declared}
    if isinstance(obj, dict):
        by_key = schema.by_key
        for key, value in obj.items():
            f = by_key.get(key)
            if f is not None:
                values[f.attr] = _decode_value(value, f)
    elif isinstance(obj, list):
        for f, value in zip(schema.declared, obj, strict=False):
            values[f.attr] = _decode_value(value, f)
    else:
        raise DecodeError("msgpack", f"expected a map, got {type(obj).__name__}")
    return values


# Containers in our structs are tiny; these caps stop a 5-byte header from allocating gigabytes.
_MAX_CONTAINER = 64


def _unpack_one(data: bytes | memoryview) -> Any:
    """Decode the first msgpack object in `data`; trailing bytes are ignored, as in Go."""
    try:
        return msgpack.unpackb(
            data,
            raw=True,
            max_array_len=_MAX_CONTAINER,
            max_map_len=_MAX_CONTAINER,
            max_ext_len=0,
        )
    except msgpack.ExtraData as extra:
        return extra.unpacked
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise DecodeError("msgpack", str(exc)) from None


def _node_state(values: dict[str, Any]) -> PushNodeState:
    state = values.pop("state")
    try:
        values["state"] = NodeStateCode(state)
    except ValueError:
        raise DecodeError("field", f"State: unknown node state {state}") from None
    return PushNodeState(**values)


# -- decoding: packets -----------------------------------------------------------------------


@dataclass(slots=True)
class DecodedPacket:
    """What one packet held: the messages that decoded, and one error per part that did not."""

    messages: list[PacketMessage] = field(default_factory=list)
    errors: list[DecodeError] = field(default_factory=list)


class _PacketWalk:
    """One packet's descent through compound/compress wrappers, with its shared budgets."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.result = DecodedPacket()
        self.decompress_budget = limits.max_packet_decompressed_bytes

    def top(self, data: bytes | memoryview) -> None:
        try:
            if len(data) >= CRC_OVERHEAD and data[0] == MessageType.HAS_CRC:
                (expected,) = struct.unpack_from(">I", data, 1)
                body = memoryview(data)[CRC_OVERHEAD:]
                if zlib.crc32(body) != expected:
                    raise DecodeError("crc", "checksum mismatch")
                data = body
            self.command(data, 0)
        except DecodeError as err:
            self.result.errors.append(err)

    def command(self, data: bytes | memoryview, depth: int) -> None:
        if not data:
            raise DecodeError("empty", "missing message type byte")
        msg_type = data[0]
        body = memoryview(data)[1:]
        known = _PACKET_STRUCTS.get(msg_type)
        if known is not None:
            cls, schema = known
            self.result.messages.append(cls(**_decode_struct(_unpack_one(body), schema)))
        elif msg_type == MessageType.USER:
            self.result.messages.append(UserMsg(bytes(body)))
        elif msg_type == MessageType.COMPOUND:
            self._compound(body, depth + 1)
        elif msg_type == MessageType.COMPRESS:
            self.command(self._decompress(body, depth + 1), depth + 1)
        else:
            raise DecodeError("unknown_type", f"message type {msg_type} is not valid in a packet")

    def _compound(self, body: memoryview, depth: int) -> None:
        if depth > self.limits.max_packet_nesting:
            raise DecodeError("too_deep", "compound nested too deeply")
        if len(body) < 1:
            raise DecodeError("compound", "missing compound length byte")
        count = body[0]
        if len(body) < 1 + 2 * count:
            raise DecodeError("compound", "truncated length slice")
        lengths = struct.unpack_from(f">{count}H", body, 1)
        offset = 1 + 2 * count
        for i, length in enumerate(lengths):
            if offset + length > len(body):
                self.result.errors.append(
                    DecodeError("compound", f"{count - i} truncated messages")
                )
                return
            try:
                self.command(body[offset : offset + length], depth)
            except DecodeError as err:
                self.result.errors.append(err)
            offset += length

    def _decompress(self, body: memoryview, depth: int) -> bytes:
        if depth > self.limits.max_packet_nesting:
            raise DecodeError("too_deep", "compress nested too deeply")
        values = _decode_struct(_unpack_one(body), _COMPRESS)
        if values["algo"] != LZW_ALGO:
            raise DecodeError("compress", f"unknown compression algorithm {values['algo']}")
        plain = lzw.decompress(values["buf"], self.decompress_budget)
        self.decompress_budget -= len(plain)
        if not plain:
            raise DecodeError("compress", "decompressed message is empty")
        return plain


def decode_message_parts(data: bytes, limits: Limits = DEFAULT_LIMITS) -> DecodedPacket:
    """Decode a plaintext packet the way memberlist handles one: never raises.

    An optional outermost CRC wrapper is verified; compound parts decode independently, so the
    result holds every message that decoded and one `DecodeError` for each part that did not.
    """
    walk = _PacketWalk(limits)
    walk.top(data)
    return walk.result


def decode_message(data: bytes, limits: Limits = DEFAULT_LIMITS) -> list[PacketMessage]:
    """Decode a plaintext packet; raise the first `DecodeError` if any part of it is bad."""
    result = decode_message_parts(data, limits)
    if result.errors:
        raise result.errors[0]
    return result.messages


class PacketCodec:
    """Builds and peels whole UDP payloads: compound, compression, CRC and encryption."""

    def __init__(
        self,
        keyring: Keyring | None,
        compression: bool,
        limits: Limits = DEFAULT_LIMITS,
        verify_incoming: bool = True,
        verify_outgoing: bool = True,
    ) -> None:
        self.keyring = keyring
        self.compression = compression
        self.limits = limits
        # memberlist GossipVerifyIncoming/Outgoing: switch off to roll encryption out.
        self.verify_incoming = verify_incoming
        self.verify_outgoing = verify_outgoing

    def overhead(self, *, crc: bool) -> int:
        """Bytes that CRC and encryption add around a packet (compression only ever shrinks)."""
        extra = CRC_OVERHEAD if crc else 0
        if self.keyring is not None and self.verify_outgoing:
            extra += PACKET_OVERHEAD
        return extra

    def encode(self, parts: Sequence[bytes], *, crc: bool) -> bytes:
        """One UDP payload carrying `parts` (already-encoded messages), as memberlist sends it:
        compound if several; LZW only if that is smaller; CRC-wrapped if `crc` (the peer's PMax is
        at least 5); then encrypted with the primary key when a keyring is set."""
        if not parts:
            raise ValueError("nothing to encode")
        payload = bytes(parts[0]) if len(parts) == 1 else make_compound(parts)
        if self.compression:
            compressed = encode_compressed(payload)
            if len(compressed) < len(payload):
                payload = compressed
        if crc:
            payload = struct.pack(">BI", MessageType.HAS_CRC, zlib.crc32(payload)) + payload
        if self.keyring is not None and self.verify_outgoing:
            payload = self.keyring.encrypt_packet(payload)
        return payload

    def pack(self, parts: Sequence[bytes], *, crc: bool) -> list[bytes]:
        """Encode `parts` into as few payloads of at most `limits.udp_buffer_size` as we can."""
        budget = self.limits.udp_buffer_size - self.overhead(crc=crc)
        return [self.encode(group, crc=crc) for group in pack_parts(parts, budget)]

    def decode_parts(self, data: bytes) -> DecodedPacket:
        """Decrypt (trying every key) and decode a UDP payload; never raises."""
        if self.keyring is not None:
            try:
                data = self.keyring.decrypt_packet(data)
            except DecodeError as err:
                if self.verify_incoming:
                    return DecodedPacket(errors=[err])
                # Rolling upgrade: treat what does not decrypt as plaintext.
        return decode_message_parts(data, self.limits)

    def decode(self, data: bytes) -> list[PacketMessage]:
        """Like `decode_parts`, but raise the first `DecodeError` instead of returning it."""
        result = self.decode_parts(data)
        if result.errors:
            raise result.errors[0]
        return result.messages


# -- streams ---------------------------------------------------------------------------------


def encode_stream(
    msg: StreamMessage,
    *,
    keyring: Keyring | None,
    compression: bool,
    label: bytes = b"",
) -> bytes:
    """Everything we write on a TCP stream for `msg` (memberlist rawSendMsgStream): always
    LZW-wrapped when compression is on, then framed as `[10][len]` + envelope if a keyring is
    given. (`label` only feeds the encryption's additional data; Debian's serf has no labels.)"""
    data = _encode_stream_message(msg)
    if compression:
        data = encode_compressed(data)
    if keyring is not None:
        data = keyring.encrypt_stream(data, label)
    return data


class _Stage(enum.Enum):
    TYPE = "type"
    ENCRYPTED_HEADER = "encrypted header"
    ENCRYPTED_BODY = "encrypted body"
    OBJECTS = "msgpack objects"
    RAW = "raw bytes"
    DONE = "done"


_STREAM_TYPES = frozenset(
    {MessageType.PING, MessageType.ACK, MessageType.ERR, MessageType.USER, MessageType.PUSH_PULL}
)
_FEED_CHUNK = 64 * 1024


class StreamDecoder:
    """Incremental decoder for the one message a memberlist stream carries.

    Feed it bytes as they arrive; `feed` returns the message once it is complete (and ignores
    anything after it, which memberlist never reads), else None. Claimed sizes are checked against
    `limits` before anything is buffered for them. After a DecodeError the stream is dead: every
    later `feed` or `eof` raises the same error.
    """

    def __init__(
        self,
        keyring: Keyring | None = None,
        limits: Limits = DEFAULT_LIMITS,
        *,
        verify_incoming: bool = True,
        label: bytes = b"",
    ) -> None:
        self._keyring = keyring
        self._limits = limits
        self._verify_incoming = verify_incoming
        self._label = label
        self._allow_encrypted = True
        self._allow_compressed = True
        self._stage = _Stage.TYPE
        self._msg_type = -1
        self._received = 0  # bytes of this message consumed so far
        self._pending = bytearray()  # bytes gathered for a fixed-size stage
        self._need = 0  # how many bytes the fixed-size stage wants
        self._frame_header = b""  # [10][u32 length] of an encrypted stream
        self._unpacker: msgpack.Unpacker | None = None
        self._header: dict[str, Any] = {}
        self._nodes: list[PushNodeState] = []
        self._result: StreamMessage | None = None
        self._error: DecodeError | None = None

    @property
    def done(self) -> bool:
        return self._stage is _Stage.DONE

    def feed(self, data: bytes) -> StreamMessage | None:
        """Consume `data`; return the message when it is complete, None while more is needed."""
        if self._error is not None:
            raise self._error
        view = memoryview(data)
        try:
            while view and self._stage is not _Stage.DONE:
                taken = self._step(view[:_FEED_CHUNK])
                view = view[taken:]
        except DecodeError as err:
            self._error = err
            self._unpacker = None
            self._pending = bytearray()
            raise
        if self._stage is _Stage.DONE and self._result is not None:
            result, self._result = self._result, None
            return result
        return None

    def eof(self) -> None:
        """The peer closed its side: raise DecodeError("truncated") if a message is unfinished."""
        if self._error is not None:
            raise self._error
        if self._stage is not _Stage.DONE and (self._received or self._stage is not _Stage.TYPE):
            raise DecodeError("truncated", f"stream ended during the {self._stage.value}")

    # -- stages ------------------------------------------------------------------------------

    def _step(self, chunk: memoryview) -> int:
        """Consume a prefix of `chunk` for the current stage; return how many bytes it took."""
        if self._stage is _Stage.TYPE:
            self._received = 1
            self._start(chunk[0])
            return 1
        if self._stage is _Stage.OBJECTS:
            return self._feed_objects(chunk)
        taken = min(self._need - len(self._pending), len(chunk))
        self._pending += chunk[:taken]
        self._received += taken
        if len(self._pending) == self._need:
            fixed = bytes(self._pending)
            self._pending.clear()
            self._fixed_done(fixed)
        return taken

    def _start(self, msg_type: int) -> None:
        self._msg_type = msg_type
        if msg_type == MessageType.ENCRYPT:
            if not self._allow_encrypted:
                raise DecodeError("unknown_type", "an encrypted message inside a stream")
            if self._keyring is None:
                raise DecodeError("decrypt", "remote state is encrypted and we have no keyring")
            self._expect(_Stage.ENCRYPTED_HEADER, STREAM_HEADER_SIZE - 1)
            return
        if self._keyring is not None and self._verify_incoming and self._allow_encrypted:
            raise DecodeError("not_encrypted", "encryption is on but the stream is plaintext")
        if msg_type == MessageType.COMPRESS:
            if not self._allow_compressed:
                raise DecodeError("unknown_type", "a compressed message inside a compressed one")
            self._start_objects(self._limits.max_push_state_bytes)
        elif msg_type in _STREAM_TYPES:
            self._start_objects(self._limits.max_stream_object_bytes)
        else:
            raise DecodeError("unknown_type", f"message type {msg_type} is not valid on a stream")

    def _expect(self, stage: _Stage, count: int) -> None:
        self._stage = stage
        self._need = count
        self._pending.clear()

    def _fixed_done(self, data: bytes) -> None:
        if self._stage is _Stage.ENCRYPTED_HEADER:
            (length,) = struct.unpack(">I", data)
            if length > self._limits.max_push_state_bytes:
                raise DecodeError("too_large", f"encrypted stream of {length} bytes")
            if length == 0:
                raise DecodeError("decrypt", "empty encrypted stream")
            self._frame_header = bytes((MessageType.ENCRYPT,)) + data
            self._expect(_Stage.ENCRYPTED_BODY, length)
        elif self._stage is _Stage.ENCRYPTED_BODY:
            assert self._keyring is not None
            plain = self._keyring.decrypt_stream_payload(self._frame_header, data, self._label)
            self._finish_with(self._decode_inner(plain, allow_compressed=True))
        else:  # _Stage.RAW
            self._finish_raw(data)

    def _start_objects(self, max_object: int) -> None:
        self._stage = _Stage.OBJECTS
        self._unpacker = msgpack.Unpacker(
            raw=True,
            max_buffer_size=max_object + _FEED_CHUNK,
            max_str_len=max_object,
            max_bin_len=max_object,
            max_array_len=_MAX_CONTAINER,
            max_map_len=_MAX_CONTAINER,
            max_ext_len=0,
        )

    def _feed_objects(self, chunk: memoryview) -> int:
        unpacker = self._unpacker
        assert unpacker is not None
        self._received += len(chunk)
        if self._received > self._limits.max_decompressed_bytes:
            raise DecodeError("too_large", "plaintext stream exceeds the decompressed-size cap")
        try:
            unpacker.feed(chunk)
            while self._stage is _Stage.OBJECTS:
                self._on_object(unpacker.unpack())
        except msgpack.OutOfData:
            return len(chunk)
        except msgpack.BufferFull:
            raise DecodeError("too_large", "a msgpack object exceeds its cap") from None
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise DecodeError("msgpack", str(exc)) from None
        # The objects ended inside this chunk: what the unpacker still holds is raw data.
        if self._stage is _Stage.RAW:
            rest = unpacker.read_bytes(self._need)
            self._pending += rest
            if len(self._pending) == self._need:
                fixed = bytes(self._pending)
                self._pending.clear()
                self._fixed_done(fixed)
        self._unpacker = None
        return len(chunk)

    def _on_object(self, obj: Any) -> None:
        t = self._msg_type
        if t == MessageType.COMPRESS:
            values = _decode_struct(obj, _COMPRESS)
            if values["algo"] != LZW_ALGO:
                raise DecodeError("compress", f"unknown compression algorithm {values['algo']}")
            plain = lzw.decompress(values["buf"], self._limits.max_decompressed_bytes)
            if not plain:
                raise DecodeError("compress", "decompressed message is empty")
            self._finish_with(self._decode_inner(plain, allow_compressed=False))
        elif t == MessageType.PING:
            self._finish_with(Ping(**_decode_struct(obj, _PING)))
        elif t == MessageType.ACK:
            self._finish_with(Ack(**_decode_struct(obj, _ACK)))
        elif t == MessageType.ERR:
            self._finish_with(ErrResp(**_decode_struct(obj, _ERR)))
        elif t == MessageType.USER:
            length = _decode_struct(obj, _USER_MSG_HEADER)["user_msg_len"]
            if not 0 <= length <= self._limits.max_user_msg_bytes:
                raise DecodeError("too_large", f"user message length {length}")
            self._expect_raw(length)
        elif not self._header:  # push/pull header
            self._header = _decode_struct(obj, _PUSH_PULL_HEADER)
            nodes = self._header["nodes"]
            if not 0 <= nodes <= self._limits.max_push_state_nodes:
                raise DecodeError("too_large", f"push/pull claims {nodes} nodes")
            state_len = self._header["user_state_len"]
            if not 0 <= state_len <= self._limits.max_push_state_bytes:
                raise DecodeError("too_large", f"push/pull user state of {state_len} bytes")
            self._after_node()
        else:
            self._nodes.append(_node_state(_decode_struct(obj, _PUSH_NODE_STATE)))
            self._after_node()

    def _after_node(self) -> None:
        if len(self._nodes) == self._header["nodes"]:
            self._expect_raw(self._header["user_state_len"])

    def _expect_raw(self, length: int) -> None:
        if length == 0:
            self._finish_raw(b"")
        else:
            self._expect(_Stage.RAW, length)

    def _finish_raw(self, raw: bytes) -> None:
        if self._msg_type == MessageType.USER:
            self._finish_with(UserMsg(raw))
        else:
            self._finish_with(
                PushPull(join=self._header["join"], nodes=tuple(self._nodes), user_state=raw)
            )

    def _finish_with(self, msg: StreamMessage) -> None:
        self._result = msg
        self._stage = _Stage.DONE
        self._pending = bytearray()
        self._nodes = []

    def _decode_inner(self, plain: bytes, *, allow_compressed: bool) -> StreamMessage:
        """Decode a complete decrypted or decompressed message body."""
        inner = StreamDecoder(self._keyring, self._limits, verify_incoming=False)
        inner._allow_encrypted = False
        inner._allow_compressed = allow_compressed
        msg = inner.feed(plain)
        if msg is None:
            raise DecodeError(
                "truncated", f"the wrapped message ended during the {inner._stage.value}"
            )
        return msg
