"""A policy applier with the drop reader beside it, living in a sandbox node as the agent's
would: Kubernetes-format objects in, compile, apply, read the NFLOG group, answer.

Started by the tests with `ip netns exec NODE python -m tests.policy.drop_worker NODE WINDOW`.
Protocol: one JSON request per line on stdin, one JSON answer per line on stdout:
`{"op": "apply", "objects": [...], "audit": false}` -> `{"kind"}`;
`{"op": "drops"}` -> `{"lines": [every line written so far], "status": DropReader.status()}`;
`{"op": "advance", "seconds": S}` -> `{}` (moves the drop log's clock forward)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import trio

from weavepy.nft import Nft
from weavepy.policy.applier import PolicyApplier
from weavepy.policy.compiler import CompileOptions, compile_policy
from weavepy.policy.droplog import DropLog
from weavepy.policy.dropreader import DropReader
from weavepy.policy.sources import PolicyStore


class Worker:
    def __init__(self, node: str, window: float) -> None:
        self.node = node
        self.offset = 0.0
        self.lines: list[str] = []
        self.applier = PolicyApplier(Nft())
        self.drops = DropLog(window=window)
        self.reader = DropReader(self.drops, CompileOptions().log_group,
                                 clock=lambda: time.monotonic() + self.offset,
                                 write=self.lines.append)

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "apply":
            store = PolicyStore()
            for kind in ("NetworkPolicy", "Pod", "Namespace"):
                store.replace(kind, [o for o in request["objects"] if o.get("kind") == kind])
            state = store.snapshot()
            compiled = compile_policy(state, self.node,
                                      CompileOptions(audit=bool(request.get("audit"))))
            self.drops.update(state, compiled)
            return {"kind": self.applier.apply(compiled.ruleset).kind}
        if op == "drops":
            return {"lines": self.lines, "status": self.reader.status()}
        if op == "advance":
            self.offset += float(request["seconds"])
            return {}
        return {"error": f"unknown op {op!r}"}


async def main() -> None:
    worker = Worker(sys.argv[1], float(sys.argv[2]))
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.reader.run)
        sys.stdout.write(json.dumps({"ready": True}) + "\n")
        sys.stdout.flush()
        while line := await trio.to_thread.run_sync(sys.stdin.readline):
            sys.stdout.write(json.dumps(worker.answer(json.loads(line))) + "\n")
            sys.stdout.flush()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
