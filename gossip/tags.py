"""Serf-style node tags carried in memberlist's node `Meta`.

This module owns the tag encoding from serf's serf.go (encodeTags / decodeTags):
`Meta = 0xFF + msgpack map[string]string` in go-msgpack's old spec (strings as raw), at most 512
bytes (memberlist MetaMaxSize). Serf reads any Meta that is empty or does not start with 0xFF as
the pre-tags "role" string, so `decode_tags(b"")` is `{"role": ""}`, exactly what `serf members`
shows for a bare memberlist node.

The rules it keeps: we encode keys in sorted order (Go's map order is random, so serf's own bytes
are not reproducible; any order decodes the same), `encode_tags` refuses tags that do not fit, and
`decode_tags` never raises: like serf, it keeps whatever it could decode and logs the rest.
Strings are UTF-8 with surrogate escapes, so any byte string a Go peer sends survives a round trip.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import msgpack

from gossip.limits import DEFAULT_LIMITS

TAG_MAGIC_BYTE = 0xFF
ROLE_TAG = "role"

logger = logging.getLogger(__name__)


def encode_tags(tags: Mapping[str, str], max_size: int = DEFAULT_LIMITS.meta_max_size) -> bytes:
    """Encode tags as serf's node Meta; raise ValueError if they exceed `max_size` bytes."""
    items = {_raw(k): _raw(v) for k, v in sorted(tags.items())}
    packed: bytes = msgpack.packb(items, use_bin_type=False)
    meta = bytes((TAG_MAGIC_BYTE,)) + packed
    if len(meta) > max_size:
        raise ValueError(f"encoded tags are {len(meta)} bytes, more than the {max_size} allowed")
    return meta


def decode_tags(meta: bytes) -> dict[str, str]:
    """Decode a node's Meta as serf does: tags, or the legacy role string."""
    if not meta or meta[0] != TAG_MAGIC_BYTE:
        return {ROLE_TAG: _text(meta)}
    try:
        decoded = msgpack.unpackb(
            meta[1:], raw=True, strict_map_key=False, max_array_len=0, max_ext_len=0
        )
    except msgpack.ExtraData as extra:
        decoded = extra.unpacked  # go-msgpack ignores trailing bytes
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        logger.warning("failed to decode tags: %s", exc)
        return {}
    if not isinstance(decoded, dict):
        logger.warning("failed to decode tags: not a map")
        return {}
    tags: dict[str, str] = {}
    for key, value in decoded.items():
        if isinstance(key, bytes) and isinstance(value, bytes | None):
            tags[_text(key)] = _text(value or b"")
        else:
            logger.warning("ignoring a tag that is not a string pair: %r=%r", key, value)
    return tags


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _text(raw: bytes) -> str:
    return bytes(raw).decode("utf-8", "surrogateescape")
