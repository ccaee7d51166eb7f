"""A worker that runs libnftables transactions inside the network namespace it was started in
(the tests start it with `unshare -n`, a namespace of its own that dies with it).

Protocol: one JSON request per line on stdin, `{"commands": [...], "list": [family, table]}`;
one JSON answer per line on stdout, `{"ok": true, "listing": [...]}` or `{"ok": false,
"error": "..."}`."""

from __future__ import annotations

import json
import sys

from weavepy.nft import Nft, NftError


def main() -> None:
    nft = Nft()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            nft.run(request.get("commands", []))
            listing = nft.list_table(*request["list"]) if request.get("list") else None
            answer = {"ok": True, "listing": listing}
        except NftError as exc:
            answer = {"ok": False, "error": str(exc)}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
