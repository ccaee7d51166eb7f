"""The one door to nftables: libnftables' JSON API, through the netfilter project's binding.

Rule: one call is one atomic kernel transaction (a batch applies whole or not at all), and it
acts in the network namespace of the calling process. Nothing here knows what a rule means:
callers build JSON commands with pure code and read JSON back. The binding is Debian's
`python3-nftables` (linked into the venv by `.ci/bootstrap` and the image); without it, the
first call raises one readable `NftError`.
"""

from __future__ import annotations

import importlib
import socket
import struct
from typing import Any

Command = dict[str, Any]

NETLINK_NETFILTER = 12
NFT_MSG_GETGEN = (10 << 8) | 16  # NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN
NFTA_GEN_ID = 1
NLMSG_ERROR = 2


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

    def generation(self) -> int:
        """The namespace's nftables generation: it changes with every committed transaction
        (anyone's), so an unchanged value means no table changed since it was read. Asked of
        the kernel directly (NFT_MSG_GETGEN); libnftables does not expose it."""
        request = struct.pack("=IHHII", 20, NFT_MSG_GETGEN, 1, 1, 0) + bytes(4)
        try:
            with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
                sock.settimeout(5)
                sock.send(request)
                reply = sock.recv(4096)
        except OSError as exc:
            raise NftError(f"cannot read the nftables generation: {exc}") from None
        length, kind = struct.unpack_from("=IH", reply)
        offset = 20  # the netlink header and the nfgenmsg
        while kind != NLMSG_ERROR and offset + 4 <= min(length, len(reply)):
            size, attribute = struct.unpack_from("=HH", reply, offset)
            if attribute == NFTA_GEN_ID and size >= 8:
                return int(struct.unpack_from("!I", reply, offset + 4)[0])
            offset += (size + 3) & ~3 or 4
        raise NftError("the kernel did not say the nftables generation")
