"""The one door to nftables: libnftables' JSON API, through the netfilter project's binding.

Rule: one call is one atomic kernel transaction (a batch applies whole or not at all), and it
acts in the network namespace of the calling process. Nothing here knows what a rule means:
callers build JSON commands with pure code and read JSON back. The binding is Debian's
`python3-nftables` (linked into the venv by `.ci/bootstrap` and the image); without it, the
first call raises one readable `NftError`.
"""

from __future__ import annotations

import importlib
from typing import Any

Command = dict[str, Any]


class NftError(Exception):
    """nftables refused a transaction, or the binding is missing; the message is one line."""


class Nft:
    """A libnftables context that speaks JSON and returns rule handles."""

    def __init__(self) -> None:
        try:
            binding = importlib.import_module("nftables")
        except ImportError as exc:
            raise NftError("nftables support needs Debian's python3-nftables "
                           "(apt-get install python3-nftables)") from exc
        self._ctx = binding.Nftables()
        self._ctx.set_json_output(True)
        self._ctx.set_handle_output(True)

    def run(self, commands: list[Command]) -> list[Command]:
        """Run `commands` as one transaction and return the objects nftables printed."""
        if not commands:
            return []
        rc, output, error = self._ctx.json_cmd({"nftables": commands})
        if rc != 0:
            raise NftError(" ".join(str(error).split()) or f"nftables failed (rc {rc})")
        if not output:
            return []
        return [item for item in output.get("nftables", []) if "metainfo" not in item]

    def list_table(self, family: str, name: str) -> list[Command] | None:
        """Every object of table `family name`, or None when the table does not exist."""
        try:
            return self.run([{"list": {"table": {"family": family, "name": name}}}])
        except NftError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise

    def ruleset_text(self) -> str:
        """The whole ruleset as `nft list ruleset` prints it (for comparisons and reports)."""
        self._ctx.set_json_output(False)
        try:
            rc, output, error = self._ctx.cmd("list ruleset")
        finally:
            self._ctx.set_json_output(True)
        if rc != 0:
            raise NftError(" ".join(str(error).split()))
        return str(output)
