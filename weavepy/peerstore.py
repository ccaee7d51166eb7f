"""The peer lists a restart starts from: the files in the state directory that remember peers.

This module owns two files, both written by the running agent and read by the next start:

* `known-peers.json`: the live members' gossip addresses (`host:port`), kept as serf keeps its
  snapshot. A node launched without peers (the founder) rejoins them at its next start, so it
  finds its cluster again at once after a crash or a reboot;
* `external-peers.json`: the external WireGuard hosts declared through the API
  (`weavepy external add`); those declared in the configuration are not written here, since the
  configuration declares them again at every start.

Why a module of its own: both files exist only so that a restart remembers what the previous
run learned, and neither belongs to the parts that use the lists. The join schedule
(`weavepy.targets`) is sans-IO and the external peers are not join targets; `weavepy.reset`
removes both files by the names kept here.

The rules it keeps: a missing or unreadable file reads as an empty list (with a warning for an
unreadable one), never as a failed start; a file that cannot be written is a warning, never a
stop; writes are atomic and durable (`weavepy.fileio.atomic_write`), readable by root only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from weavepy.config import parse_peer
from weavepy.fileio import atomic_write
from weavepy.wgpath import ExternalPeer, parse_external_peer

__all__ = ["EXTERNAL_PEERS_FILE", "KNOWN_PEERS_FILE", "load_external_peers", "load_known_peers",
           "save_external_peers", "save_known_peers"]

log = logging.getLogger(__name__)

KNOWN_PEERS_FILE = "known-peers.json"
EXTERNAL_PEERS_FILE = "external-peers.json"  # external peers declared through the API


def load_known_peers(state_dir: Path) -> list[str]:
    """The members' addresses saved by the last run ([] if none or unreadable)."""
    try:
        doc = json.loads((state_dir / KNOWN_PEERS_FILE).read_bytes())
        peers = [str(p) for p in doc["peers"]]
        for peer in peers:
            parse_peer(peer)
        return peers
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring %s: %s", state_dir / KNOWN_PEERS_FILE, exc)
        return []


def save_known_peers(state_dir: Path, peers: list[str]) -> bool:
    """Remember the live members' addresses; False (and a warning) if the file is not written."""
    try:
        atomic_write(state_dir / KNOWN_PEERS_FILE,
                           json.dumps({"version": 1, "peers": peers}).encode())
    except OSError as exc:
        log.warning("cannot save known peers in %s: %s", state_dir, exc)
        return False
    return True


def load_external_peers(state_dir: Path) -> dict[str, ExternalPeer]:
    """The external peers declared through the API by an earlier run ({} if none)."""
    try:
        doc = json.loads((state_dir / EXTERNAL_PEERS_FILE).read_bytes())
        return {p.name: p for p in (parse_external_peer(raw) for raw in doc["peers"])}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring %s: %s", state_dir / EXTERNAL_PEERS_FILE, exc)
        return {}


def save_external_peers(state_dir: Path, peers: Iterable[ExternalPeer]) -> None:
    """Remember the external peers declared through the API (a warning if not written)."""
    doc = [p.to_json() for p in sorted(peers, key=lambda p: p.name)]
    try:
        atomic_write(state_dir / EXTERNAL_PEERS_FILE,
                           json.dumps({"version": 1, "peers": doc}).encode())
    except OSError as exc:
        log.warning("cannot save external peers in %s: %s", state_dir, exc)
