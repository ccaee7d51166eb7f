"""The IPAM error types the agent catches, counts and shows.

This module owns the exception vocabulary of `weavepy.ipam` and nothing else. The rule it
keeps: every error carries a short, stable `reason` label (used as a metric label) and a
human sentence; none of them is ever raised for a condition the core can simply count.
"""

from __future__ import annotations


class IpamError(Exception):
    """Base of every error raised by weavepy.ipam."""


class IpamDecodeError(IpamError):
    """A message or state blob is malformed; `reason` is a short metric label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ConfigError(IpamError):
    """The core was built with settings that cannot work (bad range, lease > reclaim_after)."""


class RmpeerError(IpamError):
    """An operator's rmpeer cannot be carried out; the message says why and what to do."""


class CorruptStateError(IpamError):
    """A persisted state file failed validation; it was moved aside, never silently reset."""

    def __init__(self, path: str, moved_to: str | None, reason: str) -> None:
        where = f"; moved aside to {moved_to}" if moved_to else ""
        super().__init__(
            f"IPAM state file {path} is corrupt ({reason}){where}. The node will not start "
            "with an empty state on its own, because that would forget blocks this node owns. "
            "If the node's pods are gone, run `weavepy reset` to start it as a new member; "
            "otherwise restore the file."
        )
        self.path = path
        self.moved_to = moved_to
        self.reason = reason
