"""The local API's token: what a request must show to change the node.

This module owns `api-token` in the state directory: the agent creates it once
(`load_or_create`, at launch), the CLI reads it (`read_token`), and the API checks the
`Authorization: Bearer <token>` header of every request that is not a GET against it
(`bearer_matches`). Why a token and not loopback alone: under hostNetwork a node with
`route_localnet=1` lets other hosts reach 127.0.0.1 (kubernetes#90259), so "only local
processes can reach the API" does not hold on every host; reading a root-owned file does.

The rules it keeps:

* The file is 32 random bytes (URL-safe base64), mode 0600, written once through
  `weavepy.fileio.atomic_write` (atomic and durable) and then only read, so a CLI
  that read it keeps working across agent restarts. A file that holds no token is not
  replaced silently: `load_or_create` raises `TokenError`, whose sentence says how to recover.
* The token never leaves the file, the agent's memory and the header: it is not logged and
  not part of the status document or the report.
* Comparisons take constant time (`hmac.compare_digest`).
* Stdlib only at import, so the CLI stays quick.
"""

from __future__ import annotations

import hmac
import re
import secrets
from pathlib import Path

__all__ = ["TOKEN_FILE", "TokenError", "bearer_matches", "load_or_create", "read_token"]

TOKEN_FILE = "api-token"
TOKEN_BYTES = 32
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")  # token_urlsafe(32): 43 characters


class TokenError(Exception):
    """No usable token at the path; the message is one readable sentence."""


def read_token(state_dir: Path) -> str:
    """The token in `state_dir`; TokenError saying why there is none (missing, not
    readable by this user, or not a token)."""
    path = state_dir / TOKEN_FILE
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        raise TokenError(f"{path} does not exist") from None
    except PermissionError:
        raise TokenError(f"cannot read {path}: permission denied") from None
    except OSError as exc:
        raise TokenError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not _TOKEN_RE.match(text):
        raise TokenError(f"{path} does not hold an API token")
    return text


def load_or_create(state_dir: Path) -> str:
    """The agent's token: the one in `state_dir`, or a new one written there (mode 0600)."""
    from weavepy.fileio import atomic_write

    path = state_dir / TOKEN_FILE
    if not path.exists():
        token = secrets.token_urlsafe(TOKEN_BYTES)
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(path, f"{token}\n".encode())
        except OSError as exc:
            raise TokenError(f"cannot write the API token {path}: {exc.strerror or exc}"
                             ) from None
        return token
    try:
        return read_token(state_dir)
    except TokenError as exc:
        raise TokenError(f"{exc}; remove it and launch again (the agent writes a new token, "
                         f"and the CLI reads it from there)") from None


def bearer_matches(token: str, authorization: str | None) -> bool:
    """True when the `Authorization` header value is `Bearer <token>` (constant time)."""
    if not authorization or not token:
        return False
    scheme, _, presented = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), token.encode())
