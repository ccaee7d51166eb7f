"""The node's identity: its name, VTEP MAC, WireGuard key pair and cluster ID, kept on disk.

This module owns `identity.json` in the state directory (written with `fileio.atomic_write`:
atomic, durable, mode 0600).

The rules it keeps:

* An identity is created once, on the first launch, and then only read: the VTEP MAC and the
  WireGuard key stay the same across restarts, so peers' kernel entries stay valid.
* A file that does not parse or does not validate is never replaced silently: loading raises
  `IdentityError` with a sentence saying what is wrong and how to recover (`weavepy reset`).
* The state directory belongs to one node name; launching it under another name is refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from weavepy.fileio import atomic_write

__all__ = [
    "IDENTITY_FILE",
    "Identity",
    "IdentityError",
    "load_or_create",
    "random_vtep_mac",
]

IDENTITY_FILE = "identity.json"
FORMAT_VERSION = 1
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class IdentityError(Exception):
    """The identity file cannot be used; the message says why and how to recover."""


def random_vtep_mac() -> str:
    """A random locally administered unicast MAC (first octet x2, x6, xA or xE)."""
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def _public_key(private: bytes) -> bytes:
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True)
class Identity:
    """Who this node is to its peers. `wg_private_key` never leaves this file and the process."""

    name: str
    vtep_mac: str
    wg_private_key: bytes
    cluster_id: str | None = None

    @classmethod
    def generate(cls, name: str) -> Identity:
        private = X25519PrivateKey.generate().private_bytes_raw()
        return cls(name=name, vtep_mac=random_vtep_mac(), wg_private_key=private)

    @property
    def wg_public_key(self) -> bytes:
        return _public_key(self.wg_private_key)

    @property
    def wg_public_key_b64(self) -> str:
        return base64.b64encode(self.wg_public_key).decode()

    def with_cluster_id(self, cluster_id: str) -> Identity:
        return replace(self, cluster_id=cluster_id)

    def to_json(self) -> bytes:
        doc = {
            "version": FORMAT_VERSION,
            "name": self.name,
            "vtep_mac": self.vtep_mac,
            "wireguard_private_key": base64.b64encode(self.wg_private_key).decode(),
            "cluster_id": self.cluster_id,
        }
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> Identity:
        """Parse and validate; raises ValueError naming the first problem."""
        try:
            doc: Any = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not valid JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if doc.get("version") != FORMAT_VERSION:
            raise ValueError(f"unknown format version {doc.get('version')!r}")
        name, mac = doc.get("name"), doc.get("vtep_mac")
        key_text, cluster_id = doc.get("wireguard_private_key"), doc.get("cluster_id")
        if not isinstance(name, str) or not name:
            raise ValueError("missing node name")
        if not isinstance(mac, str) or not _MAC_RE.match(mac) or int(mac[:2], 16) & 1:
            raise ValueError(f"bad VTEP MAC {mac!r}")
        if not isinstance(key_text, str):
            raise ValueError("missing WireGuard private key")
        try:
            key = base64.b64decode(key_text, validate=True)
        except binascii.Error:
            raise ValueError("the WireGuard private key is not base64") from None
        if len(key) != 32:
            raise ValueError(f"the WireGuard private key has {len(key)} bytes, not 32")
        if cluster_id is not None and (not isinstance(cluster_id, str) or not cluster_id):
            raise ValueError(f"bad cluster ID {cluster_id!r}")
        return cls(name=name, vtep_mac=mac, wg_private_key=key, cluster_id=cluster_id)

    def save(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(state_dir / IDENTITY_FILE, self.to_json())


def load(state_dir: Path) -> Identity | None:
    """The stored identity, None if there is none; IdentityError if it is unusable."""
    path = state_dir / IDENTITY_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return Identity.from_json(data)
    except ValueError as exc:
        raise IdentityError(
            f"identity file {path} is corrupt: {exc}. It holds this node's VTEP MAC and keys; "
            f"restore it from a backup, or run `weavepy reset` to start this node as a new member"
        ) from None


def load_or_create(state_dir: Path, name: str) -> tuple[Identity, bool]:
    """This node's identity and whether it was just created. Refuses a renamed node."""
    found = load(state_dir)
    if found is not None:
        if found.name != name:
            raise IdentityError(
                f"the state in {state_dir} belongs to node {found.name!r}, not {name!r}: "
                f"relaunch with --name {found.name}, or run `weavepy reset` to start as {name!r}"
            )
        return found, False
    identity = Identity.generate(name)
    try:
        identity.save(state_dir)
    except OSError as exc:
        raise IdentityError(f"cannot write {state_dir / IDENTITY_FILE}: "
                            f"{exc.strerror or exc}") from None
    return identity, True
